//! [`Tap`]: a created or opened TAP and its queues, link settings and deletion.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::{delete_tap, LinkState, TapFlags, Target};
use crate::{sys, Error, Result};

/// A TAP device and its queue fds.
///
/// Dropping it closes the queues; a non-persistent TAP disappears when its last fd
/// (including copies handed to a VMM) closes. Closing costs an RCU grace period
/// (about 16 ms per queue); use [`Reaper`](crate::Reaper) to keep that off a
/// critical path.
#[derive(Debug)]
pub struct Tap {
    pub(super) name: String,
    pub(super) ifindex: u32,
    pub(super) netns: Option<PathBuf>,
    pub(super) flags: TapFlags,
    pub(super) queues: Vec<OwnedFd>,
    /// An `AF_INET` socket opened in the TAP's namespace, for link ioctls.
    pub(super) ctl: OwnedFd,
}

impl Tap {
    fn target(&self) -> Target {
        Target {
            name: self.name.clone(),
            netns: self.netns.clone(),
        }
    }

    /// The kernel's name of the device (the expanded template, if one was used).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index, read when the device was opened.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The network namespace given to the builder, if any.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// The TUN driver flags at creation.
    pub fn flags(&self) -> TapFlags {
        self.flags
    }

    /// Whether the device is multi-queue.
    pub fn is_multi_queue(&self) -> bool {
        self.flags.multi_queue()
    }

    /// Whether the device is persistent.
    pub fn is_persistent(&self) -> bool {
        self.flags.persist()
    }

    /// The queue fds, in order.
    pub fn queues(&self) -> &[OwnedFd] {
        &self.queues
    }

    /// Takes the queue fds (for example to hand them to a VMM). The device is then
    /// kept alive by those fds alone.
    pub fn into_queues(self) -> Vec<OwnedFd> {
        self.queues
    }

    /// Reads the link's current MTU, address, flags and index.
    pub fn link(&self) -> Result<LinkState> {
        let target = self.target();
        let ctl = self.ctl.as_fd();
        let read = |what: &str, e| target.error(format_args!("Reading the {what} of"), e);
        let flags = sys::if_flags(ctl, &self.name).map_err(|e| read("flags", e))?;
        Ok(LinkState {
            ifindex: sys::if_index(ctl, &self.name).map_err(|e| read("index", e))?,
            mtu: sys::if_mtu(ctl, &self.name).map_err(|e| read("MTU", e))?,
            mac: sys::if_hwaddr(ctl, &self.name).map_err(|e| read("address", e))?,
            up: flags & libc::IFF_UP as u32 != 0,
            running: flags & libc::IFF_RUNNING as u32 != 0,
            flags,
        })
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        sys::if_set_mtu(self.ctl.as_fd(), &self.name, mtu)
            .map_err(|e| self.target().error(format_args!("Setting MTU {mtu} on"), e))
    }

    /// Sets the Ethernet address.
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<()> {
        sys::if_set_hwaddr(self.ctl.as_fd(), &self.name, mac).map_err(|e| {
            self.target()
                .error(format_args!("Setting address {} on", MacDisplay(mac)), e)
        })
    }

    /// Brings the link up or down.
    pub fn set_up(&self, up: bool) -> Result<()> {
        let target = self.target();
        let ctl = self.ctl.as_fd();
        let action = if up { "Bringing up" } else { "Bringing down" };
        let flags = sys::if_flags(ctl, &self.name).map_err(|e| target.error(action, e))?;
        let wanted = if up {
            flags | libc::IFF_UP as u32
        } else {
            flags & !(libc::IFF_UP as u32)
        };
        if wanted != flags {
            sys::if_set_flags(ctl, &self.name, wanted).map_err(|e| target.error(action, e))?;
        }
        Ok(())
    }

    /// Makes the device persistent or not.
    pub fn set_persist(&mut self, on: bool) -> Result<()> {
        let first = self.first_queue("Changing persistence of")?;
        sys::tun_set_persist(first, on)
            .map_err(|e| self.target().error("Changing persistence of", e))?;
        self.flags = self.flags.with_persist(on);
        Ok(())
    }

    fn first_queue(&self, action: &str) -> Result<BorrowedFd<'_>> {
        self.queues
            .first()
            .map(AsFd::as_fd)
            .ok_or_else(|| Error::NotATap {
                step: self.target().step(action),
                source: None,
            })
    }

    fn queue(&self, index: usize, action: &str) -> Result<BorrowedFd<'_>> {
        self.queues
            .get(index)
            .map(AsFd::as_fd)
            .ok_or_else(|| Error::InvalidConfig {
                name: self.name.clone(),
                reason: format!(
                    "{action}: there is no queue {index} (the TAP has {})",
                    self.queues.len()
                ),
            })
    }

    /// Re-enables queue `index` after [`detach_queue`](Tap::detach_queue).
    pub fn attach_queue(&self, index: usize) -> Result<()> {
        attach_queue(self.queue(index, "Attaching a queue")?, true).map_err(|e| {
            self.target()
                .error(format_args!("Attaching queue {index} of"), e)
        })
    }

    /// Disables queue `index` (multi-queue TAPs): the kernel stops using it until it
    /// is attached again. The fd stays open.
    pub fn detach_queue(&self, index: usize) -> Result<()> {
        attach_queue(self.queue(index, "Detaching a queue")?, false).map_err(|e| {
            self.target()
                .error(format_args!("Detaching queue {index} of"), e)
        })
    }

    /// Deletes the device: clears persistence and closes the queues.
    ///
    /// The interface disappears now if these were its last fds, or when the last
    /// copy (for example one held by a VMM) closes.
    ///
    /// If persistence cannot be cleared through this handle's own queues (it holds
    /// none any more, or the ioctl fails), the device is opened again by name and
    /// cleared from there, so a persistent TAP is never left behind silently: the
    /// error returned is the first one, and only when the retry fails too.
    pub fn delete(self) -> Result<()> {
        if !self.flags.persist() {
            drop(self);
            return Ok(());
        }
        let target = self.target();
        let cleared = self.first_queue("Deleting").and_then(|first| {
            sys::tun_set_persist(first, false).map_err(|e| target.error("Deleting", e))
        });
        drop(self);
        match cleared {
            Ok(()) => Ok(()),
            Err(first) => delete_tap(&target.name, target.netns.as_deref()).map_err(|_| first),
        }
    }
}

/// Attaches (`IFF_ATTACH_QUEUE`) or detaches (`IFF_DETACH_QUEUE`) one queue fd of a
/// multi-queue TAP, for fds held outside a [`Tap`].
pub fn attach_queue(queue: BorrowedFd<'_>, attach: bool) -> io::Result<()> {
    sys::tun_set_queue(queue, attach)
}

struct MacDisplay([u8; 6]);

impl fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}
