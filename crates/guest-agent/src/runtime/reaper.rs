//! Exit collection for the runtime's processes, without touching anyone else's children.
//!
//! Every process the runtime starts (a container's init, an exec'd process) is a direct child of
//! the agent, held by a pidfd from the moment it exists. One reaper thread polls those pidfds and
//! an eventfd (new registrations, shutdown); a readable pidfd means that process exited, and
//! `waitid(P_PIDFD, WEXITED)` reaps exactly it. The reaper never calls `waitpid(-1)`, so the
//! agent's `std::process::Command` users keep waiting for their own children (std's `spawn`
//! itself waits for a child whose exec failed, and would panic if another thread had reaped it).
//!
//! Orphans: a container process whose parent dies is reparented inside its PID namespace (to the
//! container's init; the kernel reaps the rest when the init dies), never to the agent, because
//! subreaper lookup stops at the namespace boundary. The runtime therefore does not set
//! `PR_SET_CHILD_SUBREAPER`: it would only attract orphans of programs the agent runs outside
//! containers, which the guest's PID 1 reaps today.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};

use super::ExitStatus;

/// Locks a mutex, taking the data of a poisoned one (a panicking waiter must not wedge the rest).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One process of a container: its pidfd, its exit once collected, and its terminal if any.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) pid: u32,
    pidfd: OwnedFd,
    exit: Mutex<Option<ExitStatus>>,
    exited: Condvar,
    /// The pty master (a dup of the one handed out), kept for resizing.
    pub(crate) tty: Option<OwnedFd>,
}

impl Proc {
    pub(crate) fn new(pid: u32, pidfd: OwnedFd, tty: Option<OwnedFd>) -> Proc {
        Proc {
            pid,
            pidfd,
            exit: Mutex::new(None),
            exited: Condvar::new(),
            tty,
        }
    }

    pub(crate) fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The exit status, if the process has exited and been reaped.
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        *lock(&self.exit)
    }

    /// Blocks until the process has been reaped.
    pub(crate) fn wait(&self) -> ExitStatus {
        let mut exit = lock(&self.exit);
        loop {
            if let Some(status) = *exit {
                return status;
            }
            exit = self
                .exited
                .wait(exit)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Sends `signal` through the pidfd; a process that already exited is not an error.
    pub(crate) fn signal(&self, signal: i32) -> Result<(), Errno> {
        match pidfd_send_signal(self.pidfd.as_fd(), signal) {
            Err(Errno::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// Reaps the process now, in the calling thread (for one never handed to the reaper).
    pub(crate) fn reap_now(&self) -> ExitStatus {
        let status = loop {
            match waitid(Id::PIDFd(self.pidfd.as_fd()), WaitPidFlag::WEXITED) {
                Err(Errno::EINTR) => continue,
                result => break result,
            }
        };
        let status = convert(status);
        self.record(status);
        status
    }

    fn record(&self, status: ExitStatus) {
        *lock(&self.exit) = Some(status);
        self.exited.notify_all();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn convert(status: nix::Result<WaitStatus>) -> ExitStatus {
    let exited_at_ms = now_ms();
    match status {
        Ok(WaitStatus::Exited(_, code)) => ExitStatus {
            code: Some(code),
            signal: None,
            exited_at_ms,
        },
        Ok(WaitStatus::Signaled(_, signal, _)) => ExitStatus {
            code: None,
            signal: Some(signal as i32),
            exited_at_ms,
        },
        // Only WEXITED is asked for; anything else (or ECHILD) means the status is lost.
        _ => ExitStatus {
            code: None,
            signal: Some(Signal::SIGKILL as i32),
            exited_at_ms,
        },
    }
}

#[derive(Debug, Default)]
struct Shared {
    watched: HashMap<u32, Arc<Proc>>,
    stop: bool,
}

/// The reaper thread and its registrations.
#[derive(Debug)]
pub(crate) struct Reaper {
    shared: Arc<Mutex<Shared>>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    pub(crate) fn start() -> std::io::Result<Reaper> {
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(std::io::Error::from)?,
        );
        let shared = Arc::new(Mutex::new(Shared::default()));
        let thread = std::thread::Builder::new()
            .name("runtime-reaper".into())
            .spawn({
                let shared = shared.clone();
                let wake = wake.clone();
                move || run(&shared, &wake)
            })?;
        Ok(Reaper {
            shared,
            wake,
            thread: Some(thread),
        })
    }

    /// Hands `proc` to the reaper thread, which records its exit.
    pub(crate) fn watch(&self, proc: Arc<Proc>) {
        lock(&self.shared).watched.insert(proc.pid, proc);
        // An eventfd counter only overflows after 2^64 - 2 writes.
        let _ = self.wake.write(1);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(shared: &Mutex<Shared>, wake: &EventFd) {
    loop {
        let procs: Vec<Arc<Proc>> = {
            let shared = lock(shared);
            if shared.stop {
                return;
            }
            shared.watched.values().cloned().collect()
        };
        let mut fds = Vec::with_capacity(procs.len() + 1);
        fds.push(PollFd::new(wake.as_fd(), PollFlags::POLLIN));
        fds.extend(
            procs
                .iter()
                .map(|p| PollFd::new(p.pidfd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => continue,
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        if ready[0] {
            let _ = wake.read();
        }
        for (proc, ready) in procs.iter().zip(&ready[1..]) {
            if !ready {
                continue;
            }
            let status = waitid(
                Id::PIDFd(proc.pidfd()),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
            );
            if let Ok(WaitStatus::StillAlive) = status {
                continue;
            }
            lock(shared).watched.remove(&proc.pid);
            proc.record(convert(status));
        }
    }
}

/// `pidfd_open(2)`: a pidfd (close-on-exec) for `pid`, a child of this process.
pub(crate) fn pidfd_open(pid: u32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> Result<(), Errno> {
    // SAFETY: pidfd_send_signal with a null siginfo and no flags reads no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}
