//! Handing TAP fds to a VMM: over a Unix socket (`SCM_RIGHTS`, as QMP `getfd`
//! expects) or to a child process at known fd numbers.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use command_fds::{CommandFdExt, FdMapping};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use crate::{sys, Error, Result};

/// Sends `payload` with `fds` attached (`SCM_RIGHTS`) over the connected Unix socket
/// `socket`, for example a QMP `getfd` command with the fd it names.
///
/// Returns the number of payload bytes sent; on a stream socket the fds travel with
/// the first byte, so a caller that gets a short count sends the rest without fds.
/// The call never raises `SIGPIPE`. On a non-blocking socket that is full it returns
/// an error whose [`Error::is_would_block`] is true and whose
/// `std::io::Error` conversion has kind `WouldBlock`, so it fits tokio's
/// `UnixStream::try_io(Interest::WRITABLE, ..)`:
///
/// ```no_run
/// # async fn qmp(stream: &tokio::net::UnixStream, tap: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
/// use std::os::fd::AsFd;
/// use tokio::io::Interest;
/// let cmd = br#"{"execute":"getfd","arguments":{"fdname":"tap0q0"}}"#;
/// let sent = stream
///     .async_io(Interest::WRITABLE, || {
///         netdev::send_with_fds(stream.as_fd(), cmd, &[tap]).map_err(Into::into)
///     })
///     .await?;
/// # let _ = sent; Ok(()) }
/// ```
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<usize> {
    send_raw(socket, payload, fds).map_err(|source| Error::Io {
        step: format!("Sending {} fds over a Unix socket", fds.len()),
        source,
    })
}

fn send_raw(
    socket: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    let iov = [IoSlice::new(payload)];
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return Ok(other?),
        }
    }
}

/// The fds a child process gets, at consecutive numbers from 3 (or a chosen start).
///
/// In the child each chosen fd has close-on-exec cleared at its number; every other
/// fd above 2 is marked close-on-exec before the exec, so the child gets exactly
/// fds 0, 1, 2 and these. The parent's copies stay close-on-exec (netdev opens every
/// fd with `O_CLOEXEC`) and are closed when the command is dropped.
///
/// ```no_run
/// # fn main() -> netdev::Result<()> {
/// use std::process::Command;
/// let tap = netdev::TapBuilder::new("tap%d").multi_queue(true).queues(2).create()?;
/// let mut fds = netdev::ChildFds::new();
/// let numbers = fds.extend(tap.into_queues());
/// let fds_arg = numbers.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(":");
/// let mut qemu = Command::new("qemu-system-x86_64");
/// qemu.arg("-netdev").arg(format!("tap,id=net0,vhost=off,fds={fds_arg}"));
/// fds.apply(&mut qemu)?;
/// let _child = qemu.spawn();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ChildFds {
    mappings: Vec<FdMapping>,
    next: RawFd,
}

impl Default for ChildFds {
    fn default() -> Self {
        ChildFds::new()
    }
}

impl ChildFds {
    /// No fds yet; the first goes to number 3.
    pub fn new() -> ChildFds {
        ChildFds::starting_at(3)
    }

    /// No fds yet; the first goes to number `first` (at least 3).
    pub fn starting_at(first: RawFd) -> ChildFds {
        ChildFds {
            mappings: Vec::new(),
            next: first.max(3),
        }
    }

    /// Adds `fd`; returns its number in the child.
    pub fn push(&mut self, fd: OwnedFd) -> RawFd {
        let child_fd = self.next;
        self.next += 1;
        self.mappings.push(FdMapping {
            parent_fd: fd,
            child_fd,
        });
        child_fd
    }

    /// Adds every fd of `fds`; returns their numbers in the child, in order.
    pub fn extend(&mut self, fds: impl IntoIterator<Item = OwnedFd>) -> Vec<RawFd> {
        fds.into_iter().map(|fd| self.push(fd)).collect()
    }

    /// The child numbers assigned so far.
    pub fn numbers(&self) -> Vec<RawFd> {
        self.mappings.iter().map(|m| m.child_fd).collect()
    }

    fn into_parts(self) -> (Vec<FdMapping>, libc::c_uint) {
        (self.mappings, self.next as libc::c_uint)
    }

    /// Installs the fds on a [`std::process::Command`].
    pub fn apply(self, cmd: &mut std::process::Command) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let (mappings, first_other) = self.into_parts();
        cmd.fd_mappings(mappings).map_err(collision)?;
        // SAFETY: the hook runs between fork and exec; it calls one system call and
        // does not allocate or take locks.
        unsafe {
            cmd.pre_exec(move || sys::cloexec_from(first_other));
        }
        Ok(())
    }

    /// Installs the fds on a [`tokio::process::Command`].
    #[cfg(feature = "tokio")]
    pub fn apply_tokio(self, cmd: &mut tokio::process::Command) -> Result<()> {
        let (mappings, first_other) = self.into_parts();
        cmd.fd_mappings(mappings).map_err(collision)?;
        // SAFETY: the hook runs between fork and exec; it calls one system call and
        // does not allocate or take locks.
        unsafe {
            cmd.pre_exec(move || sys::cloexec_from(first_other));
        }
        Ok(())
    }
}

fn collision(_: command_fds::FdMappingCollision) -> Error {
    Error::InvalidConfig {
        name: "child fds".into(),
        reason: "two fds map to the same child number".into(),
    }
}

/// Sends `payload` and `fds` over a tokio [`UnixStream`](tokio::net::UnixStream),
/// waiting for the socket to become writable as needed.
#[cfg(feature = "tokio")]
pub async fn send_with_fds_async(
    stream: &tokio::net::UnixStream,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<usize> {
    use std::os::fd::AsFd;
    stream
        .async_io(tokio::io::Interest::WRITABLE, || {
            send_raw(stream.as_fd(), payload, fds)
        })
        .await
        .map_err(|source| Error::Io {
            step: format!("Sending {} fds over a Unix socket", fds.len()),
            source,
        })
}
