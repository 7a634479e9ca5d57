//! [`TapBuilder`]: creating a TAP, or opening an existing one, and applying its settings.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::device::Tap;
use super::{Offloads, TapFlags, Target, VNET_HDR_LEN_MIN, VNET_HDR_LEN_V1};
use crate::{name, netns, sys, Error, Result};

/// Options for creating or opening a TAP; see the crate documentation for an example.
///
/// [`TapBuilder::create`] creates the device if the name is free and opens it if a TAP
/// of that name exists with the same queue mode (unless [`must_create`] is set). Every
/// setting given is applied to the device, existing or not; unset ones are left alone.
///
/// [`must_create`]: TapBuilder::must_create
#[derive(Clone, Debug)]
pub struct TapBuilder {
    name: String,
    queues: usize,
    multi_queue: bool,
    vnet_hdr: Option<usize>,
    offloads: Option<Offloads>,
    persist: Option<bool>,
    owner: Option<u32>,
    group: Option<u32>,
    mtu: Option<u32>,
    mac: Option<[u8; 6]>,
    up: Option<bool>,
    netns: Option<PathBuf>,
    nonblocking: bool,
    must_create: bool,
}

impl TapBuilder {
    /// Starts a TAP named exactly `name`, or by a kernel template such as `tap%d`.
    ///
    /// Defaults: one queue, single-queue mode, a 12-byte vnet header, offloads
    /// [`Offloads::NONE`] (set explicitly), not persistent, blocking fds, the calling
    /// thread's network namespace.
    pub fn new(name: impl Into<String>) -> TapBuilder {
        TapBuilder {
            name: name.into(),
            queues: 1,
            multi_queue: false,
            vnet_hdr: Some(VNET_HDR_LEN_V1),
            offloads: None,
            persist: None,
            owner: None,
            group: None,
            mtu: None,
            mac: None,
            up: None,
            netns: None,
            nonblocking: false,
            must_create: false,
        }
    }

    /// Number of queue fds to open (default 1). More than one needs
    /// [`multi_queue(true)`](TapBuilder::multi_queue).
    pub fn queues(mut self, n: usize) -> Self {
        self.queues = n;
        self
    }

    /// Creates the device with `IFF_MULTI_QUEUE` (default false). The mode is never
    /// inferred from the queue count; a one-queue multi-queue TAP is valid.
    pub fn multi_queue(mut self, on: bool) -> Self {
        self.multi_queue = on;
        self
    }

    /// The vnet header: `Some(size)` sets `IFF_VNET_HDR` and `TUNSETVNETHDRSZ`
    /// (10, 12 or larger), `None` disables it. Default `Some(12)`.
    pub fn vnet_hdr(mut self, size: Option<usize>) -> Self {
        self.vnet_hdr = size;
        self
    }

    /// The offload mask. Without a call, [`Offloads::NONE`] is set, so a reused
    /// persistent device never keeps offloads from an earlier user. Offloads need a
    /// vnet header.
    pub fn offloads(mut self, offloads: Offloads) -> Self {
        self.offloads = Some(offloads);
        self
    }

    /// Makes the device persistent (it survives its fds) or not. Unset, a new device
    /// is not persistent and an existing one keeps its setting.
    pub fn persist(mut self, on: bool) -> Self {
        self.persist = Some(on);
        self
    }

    /// Lets the user `uid` open the device without `CAP_NET_ADMIN` (`TUNSETOWNER`).
    pub fn owner(mut self, uid: u32) -> Self {
        self.owner = Some(uid);
        self
    }

    /// Lets members of `gid` open the device without `CAP_NET_ADMIN` (`TUNSETGROUP`).
    pub fn group(mut self, gid: u32) -> Self {
        self.group = Some(gid);
        self
    }

    /// Sets the MTU.
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// Sets the Ethernet address.
    pub fn mac(mut self, mac: [u8; 6]) -> Self {
        self.mac = Some(mac);
        self
    }

    /// Brings the link up or down. Unset, a new device stays down.
    pub fn up(mut self, up: bool) -> Self {
        self.up = Some(up);
        self
    }

    /// Creates the device in the network namespace `netns` (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`, or a bare name for `/run/netns/NAME`).
    ///
    /// The work runs on a short-lived thread; the calling thread's namespace never
    /// changes, and the returned fds keep working from any thread.
    pub fn netns(mut self, netns: impl AsRef<Path>) -> Self {
        self.netns = Some(netns::resolve(netns.as_ref()));
        self
    }

    /// Opens the queue fds with `O_NONBLOCK` (needed for async I/O). Default false.
    pub fn nonblocking(mut self, on: bool) -> Self {
        self.nonblocking = on;
        self
    }

    /// Fails with [`Error::AlreadyExists`] if the name exists (`IFF_TUN_EXCL`)
    /// instead of opening the existing TAP. Default false.
    pub fn must_create(mut self, on: bool) -> Self {
        self.must_create = on;
        self
    }

    fn target(&self) -> Target {
        Target {
            name: self.name.clone(),
            netns: self.netns.clone(),
        }
    }

    fn validate(&self) -> Result<bool> {
        let template = name::validate(&self.name)?;
        let invalid = |reason: String| {
            Err(Error::InvalidConfig {
                name: self.name.clone(),
                reason,
            })
        };
        if self.queues == 0 {
            return invalid("the queue count is 0; ask for at least one queue".into());
        }
        if self.queues > 1 && !self.multi_queue {
            return invalid(format!("{} queues need multi_queue(true)", self.queues));
        }
        if let Some(size) = self.vnet_hdr {
            if size < VNET_HDR_LEN_MIN || size > i32::MAX as usize {
                return invalid(format!(
                    "a vnet header of {size} bytes is too small; use 10, 12 or more"
                ));
            }
        }
        if let Some(offloads) = self.offloads {
            if let Some(reason) = offloads.conflict() {
                return invalid(format!("offloads {offloads:?}: {reason}"));
            }
            if offloads != Offloads::NONE && self.vnet_hdr.is_none() {
                return invalid("offloads need a vnet header; set vnet_hdr(Some(12))".into());
            }
        }
        Ok(template)
    }

    /// Creates (or opens) the TAP and applies every setting.
    ///
    /// On any failure nothing is left behind: fds opened so far are closed, and a
    /// device this call made persistent is made non-persistent again, so a device it
    /// created disappears. Invalid names and settings fail before any system call.
    pub fn create(&self) -> Result<Tap> {
        let template = self.validate()?;
        match &self.netns {
            None => self.create_here(template),
            Some(path) => {
                let step = self.target().step("Creating");
                netns::run_in_with_step(path, &step, || self.create_here(template))
            }
        }
    }

    fn create_here(&self, template: bool) -> Result<Tap> {
        let mut target = self.target();
        let first = sys::open_tun(self.nonblocking).map_err(|source| {
            let step = target.step("Opening /dev/net/tun for");
            match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    Error::NoTunDevice { step, source }
                }
                _ => target.error("Opening /dev/net/tun for", source),
            }
        })?;
        let features = sys::tun_get_features(first.as_fd()).map_err(|_| Error::FeatureMissing {
            step: target.step("Reading TUN features for"),
            feature: "TUNGETFEATURES",
        })?;
        let needed = [
            (libc::IFF_TAP, "IFF_TAP"),
            (libc::IFF_NO_PI, "IFF_NO_PI"),
            (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
            (libc::IFF_MULTI_QUEUE, "IFF_MULTI_QUEUE"),
        ];
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if self.vnet_hdr.is_some() {
            flags |= libc::IFF_VNET_HDR;
        }
        if self.multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        for (flag, feature) in needed {
            if flags & flag != 0 && features & flag as u32 == 0 {
                return Err(Error::FeatureMissing {
                    step: target.step("Creating"),
                    feature,
                });
            }
        }
        let first_flags = if self.must_create {
            flags | libc::IFF_TUN_EXCL
        } else {
            flags
        };
        let real_name = sys::tun_set_iff(first.as_fd(), &self.name, first_flags)
            .map_err(|source| self.attach_error(&target, template, flags, source))?;
        if template && !name::matches_template(&self.name, &real_name) {
            return Err(Error::InvalidName {
                name: self.name.clone(),
                reason: "the kernel's name for this template does not match it",
            });
        }
        target.name = real_name;

        let mut partial = Partial {
            queues: vec![first],
            unpersist: false,
        };
        let first = partial.queues[0].as_fd();
        let current = if self.must_create {
            // IFF_TUN_EXCL guarantees a new device with exactly these flags.
            TapFlags(flags as u32)
        } else {
            let (_, current) =
                sys::tun_get_iff(first).map_err(|e| target.error("Reading flags of", e))?;
            TapFlags(current as u32)
        };
        if current.vnet_hdr() != self.vnet_hdr.is_some() {
            return Err(Error::NameBusy {
                step: target.step("Opening"),
                detail: if current.vnet_hdr() {
                    "the device is open elsewhere with a vnet header"
                } else {
                    "the device is open elsewhere without a vnet header"
                },
                source: None,
            });
        }
        if let Some(size) = self.vnet_hdr {
            sys::tun_set_vnet_hdr_size(first, size as libc::c_int).map_err(|e| {
                target.error(format_args!("Setting a {size}-byte vnet header on"), e)
            })?;
        }
        let offloads = self.offloads.unwrap_or(Offloads::NONE);
        sys::tun_set_offload(first, offloads.bits()).map_err(|e| {
            target.error(
                format_args!("Setting offloads {:#x} on", offloads.bits()),
                e,
            )
        })?;
        let persist = self.persist.unwrap_or(current.persist());
        if persist != current.persist() {
            sys::tun_set_persist(first, persist)
                .map_err(|e| target.error("Changing persistence of", e))?;
            partial.unpersist = persist;
        }
        if let Some(uid) = self.owner {
            sys::tun_set_owner(first, uid)
                .map_err(|e| target.error(format_args!("Setting owner {uid} of"), e))?;
        }
        if let Some(gid) = self.group {
            sys::tun_set_group(first, gid)
                .map_err(|e| target.error(format_args!("Setting group {gid} of"), e))?;
        }
        for i in 1..self.queues {
            let fd = sys::open_tun(self.nonblocking)
                .map_err(|e| target.error(format_args!("Opening queue {i} of"), e))?;
            sys::tun_set_iff(fd.as_fd(), &target.name, flags)
                .map_err(|e| self.attach_error(&target, false, flags, e))?;
            partial.queues.push(fd);
        }

        let ctl =
            sys::control_socket().map_err(|e| target.error("Opening a control socket for", e))?;
        let ifindex = sys::if_index(ctl.as_fd(), &target.name)
            .map_err(|e| target.error("Reading the index of", e))?;
        let mut tap = Tap {
            name: target.name.clone(),
            ifindex,
            netns: self.netns.clone(),
            flags: current.with_persist(persist),
            queues: Vec::new(),
            ctl,
        };
        let configured = (|| {
            if let Some(mtu) = self.mtu {
                tap.set_mtu(mtu)?;
            }
            if let Some(mac) = self.mac {
                tap.set_mac(mac)?;
            }
            if let Some(up) = self.up {
                tap.set_up(up)?;
            }
            Ok(())
        })();
        configured?;
        tap.queues = partial.finish();
        Ok(tap)
    }

    /// Explains a failed `TUNSETIFF`.
    fn attach_error(
        &self,
        target: &Target,
        template: bool,
        flags: libc::c_int,
        source: io::Error,
    ) -> Error {
        let step = target.step(if template {
            "Creating"
        } else {
            "Creating or opening"
        });
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied { step, source },
            Some(libc::EBUSY) if self.must_create => Error::AlreadyExists { step },
            Some(libc::EBUSY) => Error::NameBusy {
                step,
                detail: "the device is a single-queue TAP already open elsewhere",
                source: Some(source),
            },
            Some(libc::EINVAL) if !template => diagnose_einval(target, step, flags, source),
            _ => Error::Io { step, source },
        }
    }
}

/// `TUNSETIFF` says EINVAL both for a queue-mode mismatch and for a name held by a
/// non-TAP device. Attaching once with the other queue mode tells them apart; the
/// probe fd is closed at once.
fn diagnose_einval(target: &Target, step: String, flags: libc::c_int, source: io::Error) -> Error {
    let requested_mq = flags & libc::IFF_MULTI_QUEUE != 0;
    let probe = sys::open_tun(false)
        .and_then(|fd| sys::tun_set_iff(fd.as_fd(), &target.name, flags ^ libc::IFF_MULTI_QUEUE));
    match probe {
        Ok(_) => Error::QueueModeMismatch {
            step,
            existing_multi_queue: !requested_mq,
        },
        // A single-queue TAP that is already open answers EBUSY to a single-queue probe.
        Err(e) if requested_mq && e.raw_os_error() == Some(libc::EBUSY) => {
            Error::QueueModeMismatch {
                step,
                existing_multi_queue: false,
            }
        }
        Err(_) => Error::NameBusy {
            step,
            detail: "the name belongs to a device that is not a TAP",
            source: Some(source),
        },
    }
}

/// Queues opened so far during creation; dropped on failure, which closes them after
/// undoing persistence this call set.
struct Partial {
    queues: Vec<OwnedFd>,
    unpersist: bool,
}

impl Partial {
    fn finish(mut self) -> Vec<OwnedFd> {
        self.unpersist = false;
        std::mem::take(&mut self.queues)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.unpersist {
            if let Some(first) = self.queues.first() {
                let _ = sys::tun_set_persist(first.as_fd(), false);
            }
        }
    }
}
