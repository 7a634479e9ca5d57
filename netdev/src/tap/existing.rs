//! TAPs this process did not create: adopting a queue fd, deleting a persistent TAP by name.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use super::{TapFlags, Target};
use crate::{name, netns, sys, Error, Result};

/// A TAP queue fd that something else opened, verified with `TUNGETIFF`.
#[derive(Debug)]
pub struct AdoptedTap {
    name: String,
    flags: TapFlags,
    fd: OwnedFd,
}

impl AdoptedTap {
    /// The device's name (in the namespace it was opened in).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TUN driver flags.
    pub fn flags(&self) -> TapFlags {
        self.flags
    }

    /// The queue fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Gives the fd back.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for AdoptedTap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Takes ownership of an fd opened elsewhere (for example passed by a parent) after
/// checking that it is a queue of a TAP, and reads its name and flags.
///
/// A pipe, a regular file, a socket, an unattached `/dev/net/tun` fd or a TUN (not
/// TAP) fd gives [`Error::NotATap`]; the fd is closed in that case.
pub fn adopt(fd: OwnedFd) -> Result<AdoptedTap> {
    let step = "Adopting a TAP fd".to_owned();
    let (name, flags) = match sys::tun_get_iff(fd.as_fd()) {
        Ok(v) => v,
        Err(source) => {
            return Err(match source.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EBADFD) | Some(libc::EINVAL)
                | Some(libc::EBADF) => Error::NotATap {
                    step,
                    source: Some(source),
                },
                _ => Error::Io { step, source },
            })
        }
    };
    let flags = TapFlags(flags as u32);
    if !flags.is_tap() {
        return Err(Error::NotATap {
            step: format!("Adopting the fd of {name:?}"),
            source: None,
        });
    }
    Ok(AdoptedTap { name, flags, fd })
}

/// Deletes the persistent TAP `name` in `netns` (or the caller's namespace): attaches
/// to it, clears persistence and detaches.
///
/// The interface disappears once no one else holds a queue fd.
pub fn delete_tap(name: &str, netns: Option<&Path>) -> Result<()> {
    name::validate(name)?;
    if name.contains('%') {
        return Err(Error::InvalidName {
            name: name.to_owned(),
            reason: "a template names no device",
        });
    }
    let target = Target {
        name: name.to_owned(),
        netns: netns.map(netns::resolve),
    };
    let work = || -> Result<()> {
        let step = target.step("Deleting");
        // TUNSETIFF would create a missing device: check that it exists first.
        let ctl = sys::control_socket()
            .map_err(|e| target.error("Opening a control socket to delete", e))?;
        if let Err(source) = sys::if_index(ctl.as_fd(), name) {
            return Err(match source.raw_os_error() {
                Some(libc::ENODEV) => Error::TapNotFound { step },
                _ => Error::Io { step, source },
            });
        }
        let fd =
            sys::open_tun(false).map_err(|e| target.error("Opening /dev/net/tun to delete", e))?;
        let base = libc::IFF_TAP | libc::IFF_NO_PI;
        // The queue mode must match to attach; try both. IFF_VNET_HDR does not matter
        // for an attach that only clears persistence.
        let attached = sys::tun_set_iff(fd.as_fd(), name, base)
            .or_else(|_| sys::tun_set_iff(fd.as_fd(), name, base | libc::IFF_MULTI_QUEUE));
        if let Err(source) = attached {
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied { step, source },
                Some(libc::EBUSY) => Error::NameBusy {
                    step,
                    detail: "the device is a single-queue TAP open elsewhere; close it there",
                    source: Some(source),
                },
                _ => Error::NameBusy {
                    step,
                    detail: "no TAP of this name can be opened",
                    source: Some(source),
                },
            });
        }
        sys::tun_set_persist(fd.as_fd(), false).map_err(|e| target.error("Deleting", e))
    };
    match &target.netns {
        None => work(),
        Some(path) => netns::run_in_with_step(path, &target.step("Deleting"), work),
    }
}
