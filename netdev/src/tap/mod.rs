//! TAP devices: the builder ([`builder`]), the created device ([`device`]), adoption and
//! deletion of TAPs made elsewhere ([`existing`]); here, what they share: offloads, flags,
//! link state and the names errors give a TAP.

mod builder;
mod device;
mod existing;

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::Error;

pub use builder::TapBuilder;
pub use device::{attach_queue, Tap};
pub use existing::{adopt, delete_tap, AdoptedTap};

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
