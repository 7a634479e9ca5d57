//! TAP devices: the builder, the created device, adoption and deletion.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::{name, netns, sys, Error, Result};

/// The vnet header size for virtio-net 1.0 and mergeable rx buffers
/// (`struct virtio_net_hdr_v1`).
pub const VNET_HDR_LEN_V1: usize = 12;
/// The smallest vnet header the kernel accepts (`struct virtio_net_hdr`).
pub const VNET_HDR_LEN_MIN: usize = 10;

/// Segmentation and checksum offloads the guest side can accept, set with
/// `TUNSETOFFLOAD`.
///
/// The mask belongs to the device, not to one fd: opening an existing persistent TAP
/// with [`TapBuilder`] always sets it, clearing what an earlier user left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Offloads {
    /// Partial checksums (`TUN_F_CSUM`). Required by every other offload.
    pub csum: bool,
    /// TCP segmentation over IPv4 (`TUN_F_TSO4`).
    pub tso4: bool,
    /// TCP segmentation over IPv6 (`TUN_F_TSO6`).
    pub tso6: bool,
    /// TCP segmentation with ECN (`TUN_F_TSO_ECN`); needs `tso4` or `tso6`.
    pub ecn: bool,
    /// UDP fragmentation (`TUN_F_UFO`); accepted and ignored by current kernels.
    pub ufo: bool,
}

impl Offloads {
    /// No offloads: every frame is complete and checksummed.
    pub const NONE: Offloads = Offloads {
        csum: false,
        tso4: false,
        tso6: false,
        ecn: false,
        ufo: false,
    };

    /// What a virtio-net guest with checksum and TSO offloads negotiates:
    /// csum, tso4, tso6 and ecn.
    pub const fn virtio_default() -> Offloads {
        Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
            ufo: false,
        }
    }

    /// The `TUN_F_*` mask.
    pub const fn bits(self) -> u32 {
        let mut bits = 0;
        if self.csum {
            bits |= libc::TUN_F_CSUM;
        }
        if self.tso4 {
            bits |= libc::TUN_F_TSO4;
        }
        if self.tso6 {
            bits |= libc::TUN_F_TSO6;
        }
        if self.ecn {
            bits |= libc::TUN_F_TSO_ECN;
        }
        if self.ufo {
            bits |= libc::TUN_F_UFO;
        }
        bits
    }

    /// Why the kernel would reject this combination, if it would.
    fn conflict(self) -> Option<&'static str> {
        if !self.csum && (self.tso4 || self.tso6 || self.ecn || self.ufo) {
            Some("segmentation offloads need csum")
        } else if self.ecn && !(self.tso4 || self.tso6) {
            Some("ecn needs tso4 or tso6")
        } else {
            None
        }
    }
}

/// The current state of a TAP's link, read from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// Interface index.
    pub ifindex: u32,
    /// MTU in bytes.
    pub mtu: u32,
    /// Ethernet address.
    pub mac: [u8; 6],
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Operationally running (`IFF_RUNNING`: up with a queue attached).
    pub running: bool,
    /// The interface flags (`IFF_*` from `SIOCGIFFLAGS`).
    pub flags: u32,
}

/// The TUN driver flags of a TAP (`TUNGETIFF`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TapFlags(u32);

impl TapFlags {
    /// The raw `IFF_*` bits.
    pub fn bits(self) -> u32 {
        self.0
    }
    fn has(self, flag: libc::c_int) -> bool {
        self.0 & flag as u32 != 0
    }
    /// A TAP (Ethernet frames), not a TUN.
    pub fn is_tap(self) -> bool {
        self.has(libc::IFF_TAP)
    }
    /// `IFF_MULTI_QUEUE`.
    pub fn multi_queue(self) -> bool {
        self.has(libc::IFF_MULTI_QUEUE)
    }
    /// `IFF_VNET_HDR`.
    pub fn vnet_hdr(self) -> bool {
        self.has(libc::IFF_VNET_HDR)
    }
    /// `IFF_PERSIST`.
    pub fn persist(self) -> bool {
        self.has(libc::IFF_PERSIST)
    }
    fn with_persist(self, on: bool) -> TapFlags {
        let bit = libc::IFF_PERSIST as u32;
        TapFlags(if on { self.0 | bit } else { self.0 & !bit })
    }
    /// `IFF_NO_PI`.
    pub fn no_pi(self) -> bool {
        self.has(libc::IFF_NO_PI)
    }
}

/// Names the object of an operation for error messages:
/// `TAP "tap0" in netns /run/netns/x`.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub name: String,
    pub netns: Option<PathBuf>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TAP {:?}", self.name)?;
        if let Some(ns) = &self.netns {
            write!(f, " in netns {}", ns.display())?;
        }
        Ok(())
    }
}

impl Target {
    pub fn step(&self, action: impl fmt::Display) -> String {
        format!("{action} {self}")
    }

    /// Maps an errno from a step to the crate's variants.
    pub fn error(&self, action: impl fmt::Display, source: io::Error) -> Error {
        let step = self.step(action);
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied { step, source },
            _ => Error::Io { step, source },
        }
    }
}

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

/// A TAP device and its queue fds.
///
/// Dropping it closes the queues; a non-persistent TAP disappears when its last fd
/// (including copies handed to a VMM) closes. Closing costs an RCU grace period
/// (about 16 ms per queue); use [`Reaper`](crate::Reaper) to keep that off a
/// critical path.
#[derive(Debug)]
pub struct Tap {
    name: String,
    ifindex: u32,
    netns: Option<PathBuf>,
    flags: TapFlags,
    queues: Vec<OwnedFd>,
    /// An `AF_INET` socket opened in the TAP's namespace, for link ioctls.
    ctl: OwnedFd,
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
