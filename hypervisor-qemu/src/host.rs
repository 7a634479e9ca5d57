//! What this host offers QEMU: hardware virtualization, vhost-net, vhost-vsock.
//!
//! A `/dev/kvm` node alone proves nothing: nested setups expose one that cannot boot Linux.
//! KVM is chosen only when the CPU advertises `vmx` or `svm` *and* `/dev/kvm` opens.

use std::fs::OpenOptions;
use std::path::Path;

use hypervisor::{Accelerator, ConfigError};

use crate::cmdline::Accel;

/// Host facts that decide QEMU options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFeatures {
    /// The CPU advertises `vmx` (Intel VT-x) or `svm` (AMD-V).
    pub hw_virt: bool,
    /// `/dev/kvm` opens read-write.
    pub kvm_device: bool,
    /// `/dev/vhost-net` opens read-write.
    pub vhost_net: bool,
    /// `/dev/vhost-vsock` opens read-write.
    pub vhost_vsock: bool,
}

impl HostFeatures {
    /// Probes the running host.
    pub fn probe() -> Self {
        HostFeatures {
            hw_virt: hypervisor::host::probe_hardware_virtualization().unwrap_or(false),
            kvm_device: opens_rw("/dev/kvm"),
            vhost_net: opens_rw("/dev/vhost-net"),
            vhost_vsock: opens_rw("/dev/vhost-vsock"),
        }
    }

    /// Resolves the configured accelerator, with the reason to log.
    pub fn choose_accel(&self, wanted: Accelerator) -> Result<(Accel, String), ConfigError> {
        let kvm_ok = self.hw_virt && self.kvm_device;
        let why_not = if !self.hw_virt {
            "the CPU advertises neither vmx nor svm"
        } else {
            "/dev/kvm cannot be opened read-write"
        };
        match wanted {
            Accelerator::Kvm if kvm_ok => Ok((Accel::Kvm, "KVM requested and usable".into())),
            Accelerator::Kvm => Err(ConfigError::new(
                "accelerator",
                format!("KVM was requested but {why_not}; use \"auto\" or \"tcg\""),
            )),
            Accelerator::Tcg => Ok((Accel::Tcg, "TCG requested".into())),
            Accelerator::Auto if kvm_ok => Ok((
                Accel::Kvm,
                "hardware virtualization present and /dev/kvm usable".into(),
            )),
            Accelerator::Auto => Ok((Accel::Tcg, format!("falling back to TCG: {why_not}"))),
        }
    }
}

fn opens_rw(path: &str) -> bool {
    Path::new(path).exists() && OpenOptions::new().read(true).write(true).open(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_VIRT: HostFeatures = HostFeatures {
        hw_virt: false,
        kvm_device: true,
        vhost_net: false,
        vhost_vsock: false,
    };

    #[test]
    fn a_kvm_node_without_cpu_support_falls_back_to_tcg() {
        let (accel, why) = NO_VIRT.choose_accel(Accelerator::Auto).unwrap();
        assert_eq!(accel, Accel::Tcg);
        assert!(why.contains("neither vmx nor svm"), "{why}");
    }

    #[test]
    fn forcing_kvm_without_support_is_a_config_error() {
        let err = NO_VIRT.choose_accel(Accelerator::Kvm).unwrap_err();
        assert_eq!(err.field, "accelerator");
    }

    #[test]
    fn real_support_picks_kvm() {
        let h = HostFeatures {
            hw_virt: true,
            ..NO_VIRT
        };
        assert_eq!(h.choose_accel(Accelerator::Auto).unwrap().0, Accel::Kvm);
        assert_eq!(h.choose_accel(Accelerator::Tcg).unwrap().0, Accel::Tcg);
    }
}
