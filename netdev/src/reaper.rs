//! Deferred teardown: closing a TAP queue waits for an RCU grace period (about 16 ms
//! each), so callers on a critical path hand the work to a background thread.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};

use crate::{Error, Result, Tap};

enum Job {
    Close(Vec<OwnedFd>),
    CloseTap(Box<Tap>),
    Delete(Box<Tap>),
}

#[derive(Default)]
struct State {
    pending: usize,
    errors: Vec<Error>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    idle: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes and deletes TAPs on a background thread.
///
/// Handing a [`Tap`] to the reaper returns at once; [`Reaper::flush`] waits until
/// everything handed over so far is gone, and dropping the reaper waits too, so
/// nothing is leaked.
pub struct Reaper {
    tx: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper")
            .field("pending", &self.pending())
            .finish()
    }
}

impl Reaper {
    /// Starts the background thread.
    pub fn new() -> Result<Reaper> {
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared::default());
        let worker_shared = Arc::clone(&shared);
        let worker = thread::Builder::new()
            .name("netdev-reaper".into())
            .spawn(move || {
                for job in rx {
                    let result = match job {
                        Job::Close(fds) => {
                            drop(fds);
                            Ok(())
                        }
                        Job::CloseTap(tap) => {
                            drop(tap);
                            Ok(())
                        }
                        Job::Delete(tap) => tap.delete(),
                    };
                    let mut state = worker_shared.lock();
                    if let Err(err) = result {
                        state.errors.push(err);
                    }
                    state.pending -= 1;
                    if state.pending == 0 {
                        worker_shared.idle.notify_all();
                    }
                }
            })
            .map_err(|source| Error::Io {
                step: "Starting the TAP reaper thread".into(),
                source,
            })?;
        Ok(Reaper {
            tx: Some(tx),
            worker: Some(worker),
            shared,
        })
    }

    fn submit(&self, job: Job) {
        self.shared.lock().pending += 1;
        let sent = self.tx.as_ref().map(|tx| tx.send(job));
        if let Some(Err(mpsc::SendError(job))) = sent {
            // The worker is gone (it cannot be, short of a panic): do the work here.
            let result = match job {
                Job::Close(_) | Job::CloseTap(_) => Ok(()),
                Job::Delete(tap) => tap.delete(),
            };
            let mut state = self.shared.lock();
            if let Err(err) = result {
                state.errors.push(err);
            }
            state.pending -= 1;
        }
    }

    /// Closes the TAP's fds in the background. A non-persistent TAP disappears if
    /// these were its last fds.
    pub fn close(&self, tap: Tap) {
        self.submit(Job::CloseTap(Box::new(tap)));
    }

    /// Closes fds in the background (for example the parent's copies of queues
    /// handed to a VMM).
    pub fn close_fds(&self, fds: Vec<OwnedFd>) {
        self.submit(Job::Close(fds));
    }

    /// Deletes the TAP in the background: clears persistence, then closes its fds.
    pub fn delete(&self, tap: Tap) {
        self.submit(Job::Delete(Box::new(tap)));
    }

    /// How many hand-overs are not finished yet.
    pub fn pending(&self) -> usize {
        self.shared.lock().pending
    }

    /// Waits until everything handed over so far is closed or deleted, and returns
    /// the errors of deletions that failed since the last flush.
    pub fn flush(&self) -> Vec<Error> {
        let mut state = self.shared.lock();
        while state.pending > 0 {
            state = self
                .shared
                .idle
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        std::mem::take(&mut state.errors)
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
