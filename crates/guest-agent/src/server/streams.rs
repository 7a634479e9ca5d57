//! The agent's ends of stdio streams, each served by a thread of its own.
//!
//! An output stream reads its descriptor only while the host's credit lasts, so a host
//! that reads slowly stops the process (its pipe fills) instead of growing the agent's
//! memory. An input stream queues at most the credit it granted and grants more as it
//! writes. Both wait in `poll` on their descriptor and on a cancel pipe, so ending a
//! connection wakes them at once.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::{pipe2, read, write};

use super::{lock, log, Connection};
use crate::protocol::{StreamFrame, STREAM_CHUNK, STREAM_WINDOW};

/// Stream ids are unique for the agent's lifetime, across connections.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Waits until `fd` is ready for `events` (`true`) or the stream is cancelled (`false`).
fn wait_ready(fd: &OwnedFd, events: PollFlags, cancel: &OwnedFd) -> io::Result<bool> {
    loop {
        let mut fds = [
            PollFd::new(fd.as_fd(), events),
            PollFd::new(cancel.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if fds[1].any().unwrap_or(true) {
            return Ok(false);
        }
        if fds[0].any().unwrap_or(false) {
            return Ok(true);
        }
    }
}

/// The cancel pipe: dropping the write end makes the read end readable (POLLHUP).
struct Cancel {
    write: Mutex<Option<OwnedFd>>,
}

impl Cancel {
    fn new() -> io::Result<(Cancel, OwnedFd)> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
        Ok((
            Cancel {
                write: Mutex::new(Some(write)),
            },
            read,
        ))
    }

    fn fire(&self) {
        lock(&self.write).take();
    }
}

#[derive(Default)]
struct OutputState {
    credit: u64,
    cancelled: bool,
}

/// Agent to host: the state shared between the connection and the reading thread.
pub(super) struct OutputShared {
    id: u64,
    state: Mutex<OutputState>,
    changed: Condvar,
    cancel: Cancel,
}

impl OutputShared {
    pub(super) fn start(conn: &Arc<Connection>, fd: OwnedFd) -> io::Result<Arc<Self>> {
        set_nonblocking(&fd)?;
        let (cancel, cancel_read) = Cancel::new()?;
        let shared = Arc::new(OutputShared {
            id: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            state: Mutex::default(),
            changed: Condvar::new(),
            cancel,
        });
        let (conn, thread_shared) = (Arc::clone(conn), Arc::clone(&shared));
        thread::Builder::new()
            .name(format!("stream-{}", shared.id))
            .spawn(move || thread_shared.run(&conn, &fd, &cancel_read))?;
        Ok(shared)
    }

    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) fn add_credit(&self, bytes: u64) {
        let mut state = lock(&self.state);
        state.credit = state.credit.saturating_add(bytes);
        self.changed.notify_all();
    }

    pub(super) fn cancel(&self) {
        lock(&self.state).cancelled = true;
        self.changed.notify_all();
        self.cancel.fire();
    }

    /// Credit to read with, after waiting for some; `None` once cancelled.
    fn take_credit(&self) -> Option<usize> {
        let mut state = lock(&self.state);
        while state.credit == 0 && !state.cancelled {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        (!state.cancelled).then(|| usize::try_from(state.credit).unwrap_or(usize::MAX))
    }

    fn run(&self, conn: &Connection, fd: &OwnedFd, cancel: &OwnedFd) {
        let mut buf = vec![0u8; STREAM_CHUNK];
        loop {
            let Some(credit) = self.take_credit() else {
                return;
            };
            match wait_ready(fd, PollFlags::POLLIN, cancel) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    log(&format!("Stream {}: waiting for output: {e}", self.id));
                    break;
                }
            }
            let want = credit.min(STREAM_CHUNK);
            match read(fd, &mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    {
                        let mut state = lock(&self.state);
                        state.credit -= n as u64;
                    }
                    if conn.send(&StreamFrame::data(self.id, &buf[..n])).is_err() {
                        conn.forget(self.id);
                        return;
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                // A pty master reads EIO once the last slave descriptor is closed.
                Err(Errno::EIO) => break,
                Err(e) => {
                    log(&format!("Stream {}: reading output: {e}", self.id));
                    break;
                }
            }
        }
        conn.forget(self.id);
        if !lock(&self.state).cancelled {
            // The host may be gone; the frame is then lost with it.
            let _ = conn.send(&StreamFrame::eof(self.id));
        }
    }
}

#[derive(Default)]
struct InputState {
    queue: VecDeque<Vec<u8>>,
    /// Credit granted and not yet used by data frames.
    outstanding: u64,
    eof: bool,
    cancelled: bool,
}

/// Host to agent: the state shared between the connection and the writing thread.
pub(super) struct InputShared {
    id: u64,
    state: Mutex<InputState>,
    changed: Condvar,
    cancel: Cancel,
    conn: Arc<Connection>,
}

impl InputShared {
    pub(super) fn start(conn: &Arc<Connection>, fd: OwnedFd) -> io::Result<Arc<Self>> {
        set_nonblocking(&fd)?;
        let (cancel, cancel_read) = Cancel::new()?;
        let shared = Arc::new(InputShared {
            id: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            state: Mutex::default(),
            changed: Condvar::new(),
            cancel,
            conn: Arc::clone(conn),
        });
        let thread_shared = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("stream-{}", shared.id))
            .spawn(move || thread_shared.run(fd, &cancel_read))?;
        Ok(shared)
    }

    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) fn grant_initial(&self) {
        self.grant(STREAM_WINDOW);
    }

    fn grant(&self, bytes: u64) {
        {
            let mut state = lock(&self.state);
            if state.cancelled || state.eof {
                return;
            }
            state.outstanding += bytes;
        }
        // The host may be gone; then the stream is reset anyway.
        let _ = self.conn.send(&StreamFrame::credit(self.id, bytes));
    }

    /// Queues data from the host; more than the credit it holds is refused.
    pub(super) fn push(&self, bytes: Vec<u8>) -> Result<(), String> {
        let mut state = lock(&self.state);
        if state.eof || state.cancelled {
            return Err(format!("Stream {}: data after its end", self.id));
        }
        let len = bytes.len() as u64;
        if len > state.outstanding {
            return Err(format!(
                "Stream {}: the host sent {len} bytes on {} of credit; dropped",
                self.id, state.outstanding
            ));
        }
        state.outstanding -= len;
        state.queue.push_back(bytes);
        self.changed.notify_all();
        Ok(())
    }

    /// No more data: the descriptor is closed once the queue is written.
    pub(super) fn close(&self) {
        lock(&self.state).eof = true;
        self.changed.notify_all();
    }

    pub(super) fn cancel(&self) {
        lock(&self.state).cancelled = true;
        self.changed.notify_all();
        self.cancel.fire();
    }

    /// The next chunk to write; `None` at the end (eof with nothing queued, or cancelled).
    fn next_chunk(&self) -> Option<Vec<u8>> {
        let mut state = lock(&self.state);
        loop {
            if state.cancelled {
                return None;
            }
            if let Some(chunk) = state.queue.pop_front() {
                return Some(chunk);
            }
            if state.eof {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn run(&self, fd: OwnedFd, cancel: &OwnedFd) {
        // After the process stops reading (EPIPE), data is still taken and credited so the
        // host is never stuck, but dropped.
        let mut broken = false;
        while let Some(chunk) = self.next_chunk() {
            let mut written = 0;
            while !broken && written < chunk.len() {
                match wait_ready(&fd, PollFlags::POLLOUT, cancel) {
                    Ok(true) => {}
                    Ok(false) => return self.conn.forget(self.id),
                    Err(_) => broken = true,
                }
                match write(&fd, &chunk[written..]) {
                    Ok(n) => written += n,
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(_) => broken = true,
                }
            }
            self.grant(chunk.len() as u64);
        }
        self.conn.forget(self.id);
        drop(fd);
    }
}

/// The agent's handle on an input stream, kept by whoever must close it (`close_stdin`).
#[derive(Clone)]
pub struct InputHandle(Arc<InputShared>);

impl std::fmt::Debug for InputHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("InputHandle").field(&self.0.id).finish()
    }
}

impl InputHandle {
    pub(super) fn new(shared: Arc<InputShared>) -> Self {
        InputHandle(shared)
    }

    /// The stream's id.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Closes the descriptor once the data already received is written.
    pub fn close(&self) {
        self.0.close();
    }
}
