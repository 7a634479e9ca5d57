//! The process's capabilities (`process.capabilities`): the names of the spec as bit masks.

use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};

use super::Error;

/// Capability names in the order of their numbers (`linux/capability.h`).
const NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capability sets of a process, as masks (bit n = capability n).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CapSets {
    pub(crate) bounding: u64,
    pub(crate) effective: u64,
    pub(crate) permitted: u64,
    pub(crate) inheritable: u64,
    pub(crate) ambient: u64,
    /// The highest capability the kernel knows (`/proc/sys/kernel/cap_last_cap`).
    pub(crate) last: u32,
}

fn number(id: &str, cap: &Capability) -> Result<u32, Error> {
    let name = serde_json::to_value(cap)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    NAMES
        .iter()
        .position(|n| *n == name)
        .map(|n| n as u32)
        .ok_or_else(|| Error::InvalidSpec {
            id: id.to_string(),
            reason: format!("unknown capability {name:?}"),
        })
}

fn mask(id: &str, set: &Option<Capabilities>) -> Result<u64, Error> {
    let mut mask = 0u64;
    for cap in set.iter().flatten() {
        mask |= 1 << number(id, cap)?;
    }
    Ok(mask)
}

/// The masks of the spec's sets; an absent set is empty.
pub(crate) fn cap_sets(id: &str, caps: &LinuxCapabilities) -> Result<CapSets, Error> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NAMES.len() as u32 - 1);
    Ok(CapSets {
        bounding: mask(id, caps.bounding())?,
        effective: mask(id, caps.effective())?,
        permitted: mask(id, caps.permitted())?,
        inheritable: mask(id, caps.inheritable())?,
        ambient: mask(id, caps.ambient())?,
        last,
    })
}
