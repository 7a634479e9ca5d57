//! The device model: what a caller asks for, and what the guest will see.
//!
//! Values are validated here, once, by [`DeviceConfig::validate`]; backends may rely on a
//! validated config.

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Largest number of queue pairs a network device may ask for (QEMU's and Linux's limit).
pub const MAX_QUEUE_PAIRS: u16 = 256;
/// Smallest MTU Linux accepts on an Ethernet device carrying IPv4.
pub const MIN_MTU: u32 = 68;
/// Largest MTU accepted (a 64 KiB jumbo frame).
pub const MAX_MTU: u32 = 65_535;
/// Longest Linux interface name, in bytes, without the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// A device's id inside one sandbox: short ASCII, unique, stable (`net0`, `blk1`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(String);

impl DeviceId {
    /// Checks and wraps an id: 1 to 32 ASCII letters, digits, `-` or `_`, starting with a
    /// letter (QEMU rejects ids that start otherwise).
    pub fn new(id: impl Into<String>) -> Result<Self, ConfigError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 32
            && id.starts_with(|c: char| c.is_ascii_alphabetic())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if ok {
            Ok(DeviceId(id))
        } else {
            Err(ConfigError::new(
                "id",
                format!(
                    "{id:?} is not a valid device id: use 1 to 32 ASCII letters, digits, '-' or '_', starting with a letter"
                ),
            ))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// True for a unicast, non-zero address, the only kind a NIC may use as its own.
    pub fn is_valid_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0 && self.0 != [0; 6]
    }

    /// A locally administered address derived from `seed`, stable for the same seed.
    pub fn local_from_seed(seed: &[u8]) -> Self {
        // FNV-1a: small, stable across Rust versions (unlike the std hasher).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        MacAddress([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddress({self})")
    }
}

impl FromStr for MacAddress {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ConfigError::new(
                "mac",
                format!("{s:?} is not a MAC address: write six hex octets like 02:00:00:00:00:01"),
            )
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddress(out))
    }
}

impl Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a network device's frames come from on the host.
#[derive(Debug, Clone)]
pub enum NetworkBackend {
    /// A TAP device by name; the backend opens it (in the sandbox's network namespace).
    TapName(String),
    /// Already-open TAP queue fds, one per queue pair (see the `netdev` crate).
    TapFds {
        /// The TAP's interface name, for logs and for the guest-facing description.
        name: String,
        /// One fd per queue pair.
        queues: Vec<Arc<OwnedFd>>,
    },
}

impl NetworkBackend {
    /// The host interface name.
    pub fn tap_name(&self) -> &str {
        match self {
            NetworkBackend::TapName(n) => n,
            NetworkBackend::TapFds { name, .. } => name,
        }
    }
}

/// A virtio network device.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Host side.
    pub backend: NetworkBackend,
    /// The guest NIC's MAC address.
    pub guest_mac: MacAddress,
    /// Number of RX/TX queue pairs; more than one enables multi-queue.
    pub queue_pairs: u16,
    /// Virtqueue size (a power of two, 64 to 1024). `None` leaves the VMM's default.
    pub queue_size: Option<u16>,
    /// MTU the guest should use. `None` leaves the default (1500).
    pub mtu: Option<u32>,
}

impl NetworkConfig {
    /// A single-queue device on the named TAP.
    pub fn tap(name: impl Into<String>, guest_mac: MacAddress) -> Self {
        NetworkConfig {
            backend: NetworkBackend::TapName(name.into()),
            guest_mac,
            queue_pairs: 1,
            queue_size: None,
            mtu: None,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let name = self.backend.tap_name();
        if name.is_empty() || name.len() > MAX_IFNAME_LEN {
            return Err(ConfigError::new(
                "tap",
                format!("interface name {name:?} must be 1 to {MAX_IFNAME_LEN} bytes"),
            ));
        }
        if !self.guest_mac.is_valid_unicast() {
            return Err(ConfigError::new(
                "guest_mac",
                format!(
                    "{} is multicast or zero; a NIC needs a unicast address (first octet even)",
                    self.guest_mac
                ),
            ));
        }
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::new(
                "queue_pairs",
                format!(
                    "{} is out of range: use 1 to {MAX_QUEUE_PAIRS}",
                    self.queue_pairs
                ),
            ));
        }
        if let NetworkBackend::TapFds { queues, .. } = &self.backend {
            if queues.len() != usize::from(self.queue_pairs) {
                return Err(ConfigError::new(
                    "queue_pairs",
                    format!(
                        "{} queue pairs requested but {} TAP queue fds given: pass one fd per queue pair",
                        self.queue_pairs,
                        queues.len()
                    ),
                ));
            }
        }
        if let Some(q) = self.queue_size {
            if !(64..=1024).contains(&q) || !q.is_power_of_two() {
                return Err(ConfigError::new(
                    "queue_size",
                    format!("{q} is not a power of two between 64 and 1024"),
                ));
            }
        }
        if let Some(mtu) = self.mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(ConfigError::new(
                    "mtu",
                    format!("{mtu} is out of range: use {MIN_MTU} to {MAX_MTU}"),
                ));
            }
        }
        Ok(())
    }
}

/// How a block device is presented to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BlockDriver {
    /// virtio-blk on PCI (hot-pluggable on QEMU's q35).
    #[default]
    VirtioBlkPci,
    /// virtio-blk on MMIO (cold-plug only).
    VirtioBlkMmio,
}

/// A block device backed by a host file or block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Host path of the image or block device.
    pub path: PathBuf,
    /// Present the device read-only.
    pub read_only: bool,
    /// Guest-facing driver.
    pub driver: BlockDriver,
}

impl BlockConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.path.is_absolute() {
            return Err(ConfigError::new(
                "path",
                format!(
                    "{} is not an absolute path; give the full path of the image",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }
}

/// A virtio-vsock device (the agent's channel on backends that have vsock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest context id; 3 or above (0-2 are reserved).
    pub guest_cid: u32,
}

impl VsockConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(ConfigError::new(
                "guest_cid",
                format!("{} is reserved; use a CID of 3 or above", self.guest_cid),
            ));
        }
        Ok(())
    }
}

/// Longest virtio-fs tag, in bytes (the virtio-fs device's `tag` field).
pub const MAX_SHARED_FS_TAG_LEN: usize = 36;

/// How the guest caches a shared filesystem's data and metadata (Kata's `virtio_fs_cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SharedFsCache {
    /// No caching: every access goes to the host (virtiofsd `--cache never`).
    Never,
    /// Metadata only (virtiofsd `--cache metadata`).
    Metadata,
    /// Cache until the host file changes, as close-to-open consistency allows (`--cache auto`).
    #[default]
    Auto,
    /// Cache everything; for directories only this guest changes (`--cache always`).
    Always,
}

impl SharedFsCache {
    /// The name Kata's configuration and virtiofsd use (`never`, `metadata`, `auto`, `always`).
    pub fn as_str(self) -> &'static str {
        match self {
            SharedFsCache::Never => "never",
            SharedFsCache::Metadata => "metadata",
            SharedFsCache::Auto => "auto",
            SharedFsCache::Always => "always",
        }
    }
}

impl FromStr for SharedFsCache {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" | "none" => Ok(SharedFsCache::Never),
            "metadata" => Ok(SharedFsCache::Metadata),
            "auto" => Ok(SharedFsCache::Auto),
            "always" => Ok(SharedFsCache::Always),
            _ => Err(ConfigError::new(
                "cache",
                format!("{s:?} is not a cache mode: use never, metadata, auto or always"),
            )),
        }
    }
}

/// A host directory shared with the guest (virtio-fs), mounted there with
/// `mount -t virtiofs TAG TARGET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFsConfig {
    /// The name the guest mounts it by: 1 to [`MAX_SHARED_FS_TAG_LEN`] bytes.
    pub tag: String,
    /// The host directory: absolute, existing.
    pub host_dir: PathBuf,
    /// The guest may not change anything in it.
    pub read_only: bool,
    /// The guest's caching.
    pub cache: SharedFsCache,
    /// Map file contents into a DAX window; not supported yet, must be false.
    pub dax: bool,
}

impl SharedFsConfig {
    /// A read-write share of `host_dir` under `tag`, cache `auto`, no DAX.
    pub fn new(tag: impl Into<String>, host_dir: impl Into<PathBuf>) -> Self {
        SharedFsConfig {
            tag: tag.into(),
            host_dir: host_dir.into(),
            read_only: false,
            cache: SharedFsCache::default(),
            dax: false,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let tag = &self.tag;
        if tag.is_empty() || tag.len() > MAX_SHARED_FS_TAG_LEN {
            return Err(ConfigError::new(
                "tag",
                format!("{tag:?} must be 1 to {MAX_SHARED_FS_TAG_LEN} bytes"),
            ));
        }
        if tag.chars().any(|c| c.is_control() || c == ',' || c == '"') {
            return Err(ConfigError::new(
                "tag",
                format!("{tag:?} has a comma, quote or control character; use letters, digits, '-' or '_'"),
            ));
        }
        let dir = &self.host_dir;
        if !dir.is_absolute() {
            return Err(ConfigError::new(
                "host_dir",
                format!("{} is not an absolute path", dir.display()),
            ));
        }
        if !dir.is_dir() {
            return Err(ConfigError::new(
                "host_dir",
                format!("{} is not an existing directory", dir.display()),
            ));
        }
        if self.dax {
            return Err(ConfigError::new(
                "dax",
                "a DAX window is not supported; set dax to false",
            ));
        }
        Ok(())
    }
}

/// A device a caller asks for.
#[derive(Debug, Clone)]
pub enum DeviceConfig {
    /// A virtio network device.
    Network(NetworkConfig),
    /// A virtio block device.
    Block(BlockConfig),
    /// A virtio-vsock device.
    Vsock(VsockConfig),
    /// A shared host directory (virtio-fs).
    SharedFs(SharedFsConfig),
}

impl DeviceConfig {
    /// The kind of device.
    pub fn kind(&self) -> DeviceKind {
        match self {
            DeviceConfig::Network(_) => DeviceKind::Network,
            DeviceConfig::Block(_) => DeviceKind::Block,
            DeviceConfig::Vsock(_) => DeviceKind::Vsock,
            DeviceConfig::SharedFs(_) => DeviceKind::SharedFs,
        }
    }

    /// Checks every value; the error names the field (`network.mtu`) and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            DeviceConfig::Network(n) => n.validate().map_err(|e| e.within("network")),
            DeviceConfig::Block(b) => b.validate().map_err(|e| e.within("block")),
            DeviceConfig::Vsock(v) => v.validate().map_err(|e| e.within("vsock")),
            DeviceConfig::SharedFs(f) => f.validate().map_err(|e| e.within("shared_fs")),
        }
    }
}

/// A device request: the id it will have and what it is.
#[derive(Debug, Clone)]
pub struct Device {
    /// Unique in the sandbox.
    pub id: DeviceId,
    /// What to attach.
    pub config: DeviceConfig,
}

/// Device kinds, for capabilities and for [`DeviceInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// virtio-net.
    Network,
    /// virtio-blk.
    Block,
    /// virtio-vsock.
    Vsock,
    /// virtio-fs.
    SharedFs,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Network => "network",
            DeviceKind::Block => "block",
            DeviceKind::Vsock => "vsock",
            DeviceKind::SharedFs => "shared filesystem",
        })
    }
}

/// Where the guest finds a device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestLocation {
    /// A PCI device, as a Kata-style PCI path: the slot of each bridge or root port on the
    /// way, then the device's slot, in hex, joined by `/` (`02/00`).
    Pci {
        /// The PCI path.
        path: String,
    },
    /// A virtio-mmio device.
    Mmio {
        /// Base address of the register window.
        base: u64,
        /// Size of the window.
        size: u64,
        /// Interrupt line, when the backend assigns it (QEMU's microvm describes it to the
        /// guest through ACPI instead).
        irq: Option<u32>,
    },
}

impl fmt::Display for GuestLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestLocation::Pci { path } => write!(f, "pci {path}"),
            GuestLocation::Mmio { base, size, irq } => {
                write!(f, "mmio {size:#x}@{base:#x}")?;
                match irq {
                    Some(irq) => write!(f, ":{irq}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// An attached device as the guest will see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The device's id.
    pub id: DeviceId,
    /// The device's kind.
    pub kind: DeviceKind,
    /// Where the guest finds it.
    pub location: GuestLocation,
    /// Whether it was hot-plugged.
    pub hotplugged: bool,
    /// Network devices: the guest MAC.
    pub mac: Option<MacAddress>,
    /// Network devices: queue pairs.
    pub queue_pairs: Option<u16>,
    /// Network devices: host TAP name. Block devices: host path. Shared filesystems: host
    /// directory.
    pub host: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac() -> MacAddress {
        "02:00:00:00:00:01".parse().unwrap()
    }

    #[test]
    fn mac_round_trips_through_text() {
        assert_eq!(mac().to_string(), "02:00:00:00:00:01");
        assert_eq!(mac().0, [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn malformed_macs_are_rejected() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "0g:00:00:00:00:01",
            "2:0:0:0:0:1",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn seeded_macs_are_local_unicast_and_stable() {
        let a = MacAddress::local_from_seed(b"sandbox-1/net0");
        assert!(a.is_valid_unicast());
        assert_eq!(a.0[0] & 0x02, 0x02);
        assert_eq!(a, MacAddress::local_from_seed(b"sandbox-1/net0"));
        assert_ne!(a, MacAddress::local_from_seed(b"sandbox-1/net1"));
    }

    #[test]
    fn multicast_guest_mac_is_rejected_naming_the_field() {
        let mut n = NetworkConfig::tap("tap0", mac());
        n.guest_mac = "01:00:5e:00:00:01".parse().unwrap();
        let err = DeviceConfig::Network(n).validate().unwrap_err();
        assert_eq!(err.field, "network.guest_mac");
    }

    #[test]
    fn zero_or_too_many_queue_pairs_are_rejected() {
        for q in [0, MAX_QUEUE_PAIRS + 1] {
            let mut n = NetworkConfig::tap("tap0", mac());
            n.queue_pairs = q;
            let err = DeviceConfig::Network(n).validate().unwrap_err();
            assert_eq!(err.field, "network.queue_pairs");
        }
    }

    #[test]
    fn fd_count_must_match_queue_pairs() {
        let n = NetworkConfig {
            backend: NetworkBackend::TapFds {
                name: "tap0".into(),
                queues: vec![],
            },
            guest_mac: mac(),
            queue_pairs: 2,
            queue_size: None,
            mtu: None,
        };
        let err = DeviceConfig::Network(n).validate().unwrap_err();
        assert!(err.problem.contains("one fd per queue pair"), "{err}");
    }

    #[test]
    fn bad_mtu_queue_size_and_names_are_rejected() {
        let mut n = NetworkConfig::tap("tap0", mac());
        n.mtu = Some(10);
        assert_eq!(
            DeviceConfig::Network(n).validate().unwrap_err().field,
            "network.mtu"
        );
        let mut n = NetworkConfig::tap("tap0", mac());
        n.queue_size = Some(100);
        assert_eq!(
            DeviceConfig::Network(n).validate().unwrap_err().field,
            "network.queue_size"
        );
        let n = NetworkConfig::tap("a-name-that-is-too-long", mac());
        assert_eq!(
            DeviceConfig::Network(n).validate().unwrap_err().field,
            "network.tap"
        );
    }

    #[test]
    fn relative_block_path_and_reserved_cid_are_rejected() {
        let b = BlockConfig {
            path: "disk.img".into(),
            read_only: false,
            driver: BlockDriver::default(),
        };
        assert_eq!(
            DeviceConfig::Block(b).validate().unwrap_err().field,
            "block.path"
        );
        let v = VsockConfig { guest_cid: 2 };
        assert_eq!(
            DeviceConfig::Vsock(v).validate().unwrap_err().field,
            "vsock.guest_cid"
        );
    }

    #[test]
    fn shared_fs_values_are_checked_naming_the_field() {
        let dir = std::env::temp_dir();
        DeviceConfig::SharedFs(SharedFsConfig::new("kataShared", &dir))
            .validate()
            .unwrap();
        let field = |f: SharedFsConfig| DeviceConfig::SharedFs(f).validate().unwrap_err().field;
        assert_eq!(field(SharedFsConfig::new("", &dir)), "shared_fs.tag");
        assert_eq!(
            field(SharedFsConfig::new("x".repeat(37), &dir)),
            "shared_fs.tag"
        );
        assert_eq!(field(SharedFsConfig::new("a,b", &dir)), "shared_fs.tag");
        assert_eq!(field(SharedFsConfig::new("t", "rel")), "shared_fs.host_dir");
        assert_eq!(
            field(SharedFsConfig::new("t", "/nonexistent/share")),
            "shared_fs.host_dir"
        );
        let mut dax = SharedFsConfig::new("t", &dir);
        dax.dax = true;
        assert_eq!(field(dax), "shared_fs.dax");
        assert_eq!(
            "none".parse::<SharedFsCache>().unwrap(),
            SharedFsCache::Never
        );
        assert_eq!(
            "sometimes".parse::<SharedFsCache>().unwrap_err().field,
            "cache"
        );
    }

    #[test]
    fn device_ids_follow_qemu_rules() {
        assert!(DeviceId::new("net0").is_ok());
        for bad in ["", "0net", "net 0", "net/0", &"x".repeat(33)] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
