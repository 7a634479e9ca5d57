//! Process stdio: pipes, or a terminal allocated inside the container, split into the agent's
//! ends and the child's.
//!
//! A terminal is a pty of the container's own devpts instance, as runc makes it: the child opens
//! the container's `/dev/ptmx` once its mounts are in place, so the slave resolves to a
//! `/dev/pts/N` path inside the container (`tty`, `ttyname`). It sends the master back over a
//! console socket (a socketpair made before the clone, `SCM_RIGHTS`), which
//! [`StdioPair::receive_terminal`] reads once the child has reported.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::pty::Winsize;
use nix::sys::socket::{
    recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::unistd::pipe2;

use super::plan::{ChildStdio, ChildTerminal};
use super::{sys, Error, ProcessIo, Stdio};

/// Both ends of a process's stdio until the child has been cloned.
#[derive(Debug)]
pub(crate) struct StdioPair {
    /// The agent's ends (pid filled in later; a terminal's after [`StdioPair::receive_terminal`]).
    pub(crate) io: ProcessIo,
    /// The child's ends; dropped in the parent once the child exists.
    child: Vec<OwnedFd>,
    fds: [RawFd; 3],
    terminal: Option<Terminal>,
}

/// The agent's side of a terminal still to be received.
#[derive(Debug)]
struct Terminal {
    /// The agent's end of the console socket.
    socket: OwnedFd,
    /// The child's end (also in `StdioPair::child` until closed).
    child_socket: RawFd,
    rows: u16,
    cols: u16,
}

fn pipe(id: &str) -> Result<(OwnedFd, OwnedFd), Error> {
    pipe2(OFlag::O_CLOEXEC).map_err(sys(id, "Creating a stdio pipe"))
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
                    terminal: None,
                })
            }
            Stdio::Terminal { rows, cols } => {
                let (socket, child_socket) = socketpair(
                    AddressFamily::Unix,
                    SockType::Stream,
                    None,
                    SockFlag::SOCK_CLOEXEC,
                )
                .map_err(sys(id, "Creating the console socket"))?;
                Ok(StdioPair {
                    io: ProcessIo {
                        stdin: None,
                        stdout: None,
                        stderr: None,
                        pid: 0,
                    },
                    fds: [-1; 3],
                    terminal: Some(Terminal {
                        socket,
                        child_socket: child_socket.as_raw_fd(),
                        rows,
                        cols,
                    }),
                    child: vec![child_socket],
                })
            }
        }
    }

    pub(crate) fn child(&self) -> ChildStdio {
        ChildStdio {
            fds: self.fds,
            terminal: self.terminal.as_ref().map(|t| ChildTerminal {
                socket: t.child_socket,
                rows: t.rows,
                cols: t.cols,
            }),
        }
    }

    /// Closes the child's ends in the agent, once the child holds its own copies.
    pub(crate) fn close_child_ends(&mut self) {
        self.child.clear();
    }

    /// With a terminal, takes the pty master the child sent (it sends it before it reports
    /// ready or executes, so it is already queued: this never blocks). `io.stdout` becomes the
    /// master, `io.stdin` a dup of it; the returned dup is the runtime's, for resizing.
    pub(crate) fn receive_terminal(&mut self, id: &str) -> Result<Option<OwnedFd>, Error> {
        let Some(terminal) = self.terminal.take() else {
            return Ok(None);
        };
        let master = receive_fd(&terminal.socket).map_err(sys(id, "Receiving the pty master"))?;
        let dup = || {
            master
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
                .map_err(sys(id, "Duplicating the pty master"))
        };
        let stdin = dup()?;
        let resize = dup()?;
        self.io.stdin = Some(stdin);
        self.io.stdout = Some(master);
        Ok(Some(resize))
    }
}

/// One fd passed with `SCM_RIGHTS` on `socket`, already queued (`MSG_DONTWAIT`).
fn receive_fd(socket: &OwnedFd) -> Result<OwnedFd, Errno> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut received = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: SCM_RIGHTS installed these fds in this process; nothing else owns them.
            received.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    match (received.len(), truncated) {
        (1, false) => Ok(received.remove(0)),
        // Nothing sent (the child never got that far), or not exactly one fd.
        _ => Err(Errno::EBADMSG),
    }
}

nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, Winsize);

/// `TIOCSWINSZ` on a pty master: the process gets `SIGWINCH` and the new size.
pub(crate) fn set_winsize(master: &OwnedFd, rows: u16, cols: u16) -> Result<(), Errno> {
    // SAFETY: TIOCSWINSZ reads one Winsize from the pointer, which lives across the call.
    unsafe { tiocswinsz(master.as_raw_fd(), &winsize(rows, cols)) }.map(drop)
}
