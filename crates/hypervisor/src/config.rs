//! Backend-neutral VM configuration.
//!
//! Every field has a default that works for a small sandbox VM; [`HypervisorConfig::validate`]
//! checks the values once so backends can trust them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Largest vCPU count accepted.
pub const MAX_VCPUS: u32 = 288;
/// Smallest guest memory, in MiB, that a Linux guest boots in.
pub const MIN_MEMORY_MIB: u32 = 64;

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Accelerator {
    /// KVM when hardware virtualization is really there, otherwise software emulation.
    #[default]
    Auto,
    /// Hardware virtualization through /dev/kvm; an error if it is not usable.
    Kvm,
    /// Software emulation (QEMU's TCG).
    Tcg,
}

/// Which channel the guest agent is reached on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AgentChannelKind {
    /// vsock when the host has it (`/dev/vhost-vsock` or a hybrid vsock), else virtio-serial.
    #[default]
    Auto,
    /// virtio-vsock (vhost-vsock on QEMU, hybrid vsock on Dragonball).
    Vsock,
    /// A virtio-serial port backed by a Unix socket on the host.
    VirtioSerial,
}

/// The VM's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    /// VMM binary, for backends that run one (QEMU). Ignored by in-process backends.
    pub path: Option<PathBuf>,
    /// Guest kernel (bzImage or vmlinux).
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Root filesystem image, attached read-only as the first block device.
    pub image: Option<PathBuf>,
    /// Extra kernel command-line parameters, appended after the backend's own.
    pub kernel_params: Vec<String>,
    /// Machine type, backend-specific (`q35`, `microvm`). `None` picks the backend default.
    pub machine_type: Option<String>,
    /// Boot vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Accelerator choice.
    pub accelerator: Accelerator,
    /// Do not use vhost-net even when /dev/vhost-net exists.
    pub disable_vhost_net: bool,
    /// Queue pairs for network devices created by the runtime.
    pub network_queues: u16,
    /// Agent channel choice.
    pub agent_channel: AgentChannelKind,
    /// vsock port the agent listens on.
    pub agent_port: u32,
    /// File the guest's serial console is written to (created or truncated at start, kept by
    /// cleanup). `None`: `console.log` in the VM's run directory, removed by cleanup.
    pub console_log: Option<PathBuf>,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            path: None,
            kernel: PathBuf::new(),
            initrd: None,
            image: None,
            kernel_params: Vec::new(),
            machine_type: None,
            vcpus: 1,
            memory_mib: 256,
            accelerator: Accelerator::Auto,
            disable_vhost_net: false,
            network_queues: 1,
            agent_channel: AgentChannelKind::Auto,
            agent_port: 1024,
            console_log: None,
        }
    }
}

impl HypervisorConfig {
    /// Checks the values; the error names the field and how to fix it.
    ///
    /// Paths are checked for form only: whether the files exist is the backend's concern at
    /// start, where the error can name the file the VMM failed on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "kernel",
                "no guest kernel is set; give the path of a bzImage or vmlinux",
            ));
        }
        for (field, p) in [
            ("kernel", Some(&self.kernel)),
            ("initrd", self.initrd.as_ref()),
            ("image", self.image.as_ref()),
            ("path", self.path.as_ref()),
            ("console_log", self.console_log.as_ref()),
        ] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(ConfigError::new(
                        field,
                        format!("{} is not an absolute path", p.display()),
                    ));
                }
            }
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::new(
                "vcpus",
                format!("{} is out of range: use 1 to {MAX_VCPUS}", self.vcpus),
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::new(
                "memory_mib",
                format!(
                    "{} MiB is too small to boot Linux: use at least {MIN_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        if self.network_queues == 0 || self.network_queues > crate::device::MAX_QUEUE_PAIRS {
            return Err(ConfigError::new(
                "network_queues",
                format!(
                    "{} is out of range: use 1 to {}",
                    self.network_queues,
                    crate::device::MAX_QUEUE_PAIRS
                ),
            ));
        }
        if let Some(p) = self.kernel_params.iter().find(|p| p.trim().is_empty()) {
            return Err(ConfigError::new(
                "kernel_params",
                format!("{p:?} is empty; remove it"),
            ));
        }
        if self.agent_port == 0 || self.agent_port == u32::MAX {
            return Err(ConfigError::new(
                "agent_port",
                format!("{} is not a usable vsock port", self.agent_port),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> HypervisorConfig {
        HypervisorConfig {
            kernel: "/var/lib/guest/vmlinuz".into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_with_a_kernel_are_valid() {
        good().validate().unwrap();
    }

    #[test]
    fn missing_kernel_is_named() {
        let err = HypervisorConfig::default().validate().unwrap_err();
        assert_eq!(err.field, "kernel");
    }

    #[test]
    fn bad_values_name_their_field() {
        type Mutation = fn(&mut HypervisorConfig);
        let cases: [(&str, Mutation); 6] = [
            ("vcpus", |c| c.vcpus = 0),
            ("console_log", |c| {
                c.console_log = Some("console.log".into())
            }),
            ("memory_mib", |c| c.memory_mib = 8),
            ("initrd", |c| c.initrd = Some("initrd.img".into())),
            ("network_queues", |c| c.network_queues = 0),
            ("kernel_params", |c| c.kernel_params = vec![" ".into()]),
        ];
        for (field, mutate) in cases {
            let mut c = good();
            mutate(&mut c);
            assert_eq!(c.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn unknown_fields_are_rejected_when_deserializing() {
        let err = serde_json::from_str::<HypervisorConfig>(r#"{"kernal": "/k"}"#).unwrap_err();
        assert!(err.to_string().contains("kernal"), "{err}");
    }
}
