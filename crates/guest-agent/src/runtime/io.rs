//! Process stdio: pipes or a pty, split into the agent's ends and the child's.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use nix::unistd::pipe2;

use super::plan::ChildStdio;
use super::{Error, ProcessIo, Stdio};

/// Both ends of a process's stdio until the child has been cloned.
#[derive(Debug)]
pub(crate) struct StdioPair {
    /// The agent's ends (pid filled in later).
    pub(crate) io: ProcessIo,
    /// The child's ends; dropped in the parent once the child exists.
    child: Vec<OwnedFd>,
    fds: [RawFd; 3],
    tty: bool,
    /// A dup of the pty master, kept by the runtime for resizing.
    pub(crate) master: Option<OwnedFd>,
}

fn pipe(id: &str) -> Result<(OwnedFd, OwnedFd), Error> {
    pipe2(OFlag::O_CLOEXEC).map_err(|source| Error::Sys {
        id: id.to_string(),
        step: "Creating a stdio pipe",
        source,
    })
}

pub(crate) fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl StdioPair {
    pub(crate) fn new(id: &str, stdio: &Stdio) -> Result<StdioPair, Error> {
        match *stdio {
            Stdio::Pipes { stdin } => {
                let (stdin_r, stdin_w, stdin_child) = if stdin {
                    let (r, w) = pipe(id)?;
                    (Some(w), r.as_raw_fd(), Some(r))
                } else {
                    // No stdin: the child reads /dev/null's equivalent, an empty closed pipe.
                    let (r, w) = pipe(id)?;
                    drop(w);
                    (None, r.as_raw_fd(), Some(r))
                };
                let (out_r, out_w) = pipe(id)?;
                let (err_r, err_w) = pipe(id)?;
                let fds = [stdin_w, out_w.as_raw_fd(), err_w.as_raw_fd()];
                let child = stdin_child.into_iter().chain([out_w, err_w]).collect();
                Ok(StdioPair {
                    io: ProcessIo {
                        stdin: stdin_r,
                        stdout: Some(out_r),
                        stderr: Some(err_r),
                        pid: 0,
                    },
                    child,
                    fds,
                    tty: false,
                    master: None,
                })
            }
            Stdio::Terminal { rows, cols } => {
                let sys = |step| {
                    move |source| Error::Sys {
                        id: id.to_string(),
                        step,
                        source,
                    }
                };
                let pty = openpty(&winsize(rows, cols), None).map_err(sys("Opening a pty"))?;
                // openpty cannot set close-on-exec; set it before anything else execs.
                for fd in [&pty.master, &pty.slave] {
                    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                        .map_err(sys("Setting close-on-exec on the pty"))?;
                }
                let dup = |fd: &OwnedFd| -> Result<OwnedFd, Error> {
                    fd.as_fd()
                        .try_clone_to_owned()
                        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
                        .map_err(sys("Duplicating the pty master"))
                };
                let stdin = dup(&pty.master)?;
                let master = dup(&pty.master)?;
                let slave = pty.slave.as_raw_fd();
                Ok(StdioPair {
                    io: ProcessIo {
                        stdin: Some(stdin),
                        stdout: Some(pty.master),
                        stderr: None,
                        pid: 0,
                    },
                    child: vec![pty.slave],
                    fds: [slave, slave, slave],
                    tty: true,
                    master: Some(master),
                })
            }
        }
    }

    pub(crate) fn child(&self) -> ChildStdio {
        ChildStdio {
            fds: self.fds,
            tty: self.tty,
        }
    }

    /// Closes the child's ends in the agent, once the child holds its own copies.
    pub(crate) fn close_child_ends(&mut self) {
        self.child.clear();
    }
}

nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, Winsize);

/// `TIOCSWINSZ` on a pty master: the process gets `SIGWINCH` and the new size.
pub(crate) fn set_winsize(master: &OwnedFd, rows: u16, cols: u16) -> Result<(), Errno> {
    // SAFETY: TIOCSWINSZ reads one Winsize from the pointer, which lives across the call.
    unsafe { tiocswinsz(master.as_raw_fd(), &winsize(rows, cols)) }.map(drop)
}
