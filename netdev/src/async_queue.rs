//! Async Ethernet frame I/O on a TAP queue with tokio.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// One TAP queue driven by tokio: each read returns one frame, each write sends one.
///
/// With a vnet header enabled, every frame read starts with that header and every
/// frame written must too. Readiness is handled the tokio way: a `WouldBlock` from
/// the kernel clears the cached readiness before waiting again.
#[derive(Debug)]
pub struct AsyncTapQueue {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncTapQueue {
    /// Registers a queue fd with the current tokio runtime, switching it to
    /// `O_NONBLOCK` if it is not already (the flag belongs to the open file, so
    /// duplicates of the fd become non-blocking too; create the TAP with
    /// [`TapBuilder::nonblocking`](crate::TapBuilder::nonblocking) to make that explicit).
    pub fn new(fd: OwnedFd) -> io::Result<AsyncTapQueue> {
        let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        if !flags.contains(OFlag::O_NONBLOCK) {
            fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        }
        // SAFETY: an `OwnedFd` is open and returns the same number from `as_raw_fd`
        // until it is dropped, and the `AsyncFd` owns it for its whole life.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(io::Error::from)?;
        Ok(AsyncTapQueue { fd })
    }

    /// Reads one frame into `buf`; returns its length. A frame longer than `buf` is
    /// truncated by the kernel.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| retry_eintr(|| nix::unistd::read(fd.get_ref(), buf))) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes one frame; returns the bytes written (the whole frame).
    pub async fn send(&self, frame: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| retry_eintr(|| nix::unistd::write(fd.get_ref(), frame))) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads one frame if one is queued, without waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        retry_eintr(|| nix::unistd::read(self.fd.get_ref(), buf))
    }

    /// Unregisters the fd and gives it back (still non-blocking).
    pub fn into_inner(self) -> OwnedFd {
        self.fd.into_inner()
    }
}

impl AsFd for AsyncTapQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl AsRawFd for AsyncTapQueue {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

fn retry_eintr(mut op: impl FnMut() -> nix::Result<usize>) -> io::Result<usize> {
    loop {
        match op() {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return Ok(other?),
        }
    }
}
