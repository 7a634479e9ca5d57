//! The backend factory: the one place that knows which backends this build contains.
//!
//! Every `#[cfg(feature = ...)]` that picks a hypervisor backend lives in this file and
//! nowhere else. The rest of the shim asks [`compiled`], [`create`] and [`probe_host`], and
//! gets a [`BackendError`] naming the cargo feature and the `make` knob when it asks for a
//! backend this build does not carry.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hypervisor::{Accelerator, Hypervisor, HypervisorConfig};

/// A hypervisor backend, compiled in or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// QEMU as a child process (`hypervisor-qemu`).
    Qemu,
    /// The in-process Dragonball VMM (`hypervisor-dragonball`).
    Dragonball,
}

impl BackendKind {
    /// Every backend the shim knows of, compiled in or not.
    pub const ALL: [BackendKind; 2] = [BackendKind::Qemu, BackendKind::Dragonball];

    /// The name used in configuration files (`[hypervisor.NAME]`) and messages.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Dragonball => "dragonball",
        }
    }

    /// The cargo feature of this crate that compiles the backend in.
    pub fn feature(self) -> &'static str {
        self.name()
    }

    /// Parses a configuration name.
    pub fn parse(name: &str) -> Option<BackendKind> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Whether this build contains the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Qemu => cfg!(feature = "qemu"),
            BackendKind::Dragonball => cfg!(feature = "dragonball"),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The backends compiled into this build, in [`BackendKind::ALL`] order.
pub fn compiled() -> Vec<BackendKind> {
    BackendKind::ALL
        .into_iter()
        .filter(|b| b.is_compiled())
        .collect()
}

/// Why a backend cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend exists but this build does not contain it.
    #[error(
        "the {:?} hypervisor is not compiled into this shim; rebuild with --features {} (make build HYPERVISOR={} or all)",
        backend.name(), backend.feature(), backend.name()
    )]
    NotCompiled {
        /// The backend asked for.
        backend: BackendKind,
    },
}

/// Where a backend keeps its per-sandbox run directories.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Parent of the per-sandbox run directories.
    pub run_root: PathBuf,
}

/// A backend handle in state `Created`.
pub fn create(
    kind: BackendKind,
    log: &slog::Logger,
    opts: &BackendOptions,
) -> Result<Arc<dyn Hypervisor>, BackendError> {
    match kind {
        #[cfg(feature = "qemu")]
        BackendKind::Qemu => {
            let qemu_opts = hypervisor_qemu::QemuOptions {
                run_root: opts.run_root.clone(),
                ..Default::default()
            };
            Ok(Arc::new(hypervisor::Vm::new(hypervisor_qemu::Qemu::new(
                log.clone(),
                qemu_opts,
            ))))
        }
        #[cfg(feature = "dragonball")]
        BackendKind::Dragonball => {
            let db_opts = hypervisor_dragonball::DragonballOptions {
                kvm_path: KVM_DEVICE.into(),
                run_root: opts.run_root.clone(),
                ..Default::default()
            };
            Ok(Arc::new(hypervisor::Vm::new(
                hypervisor_dragonball::Dragonball::new(log.clone(), db_opts),
            )))
        }
        #[allow(unreachable_patterns)]
        other => {
            let _ = (log, &opts.run_root);
            Err(BackendError::NotCompiled { backend: other })
        }
    }
}

/// The KVM device the in-process backend opens.
#[cfg(feature = "dragonball")]
const KVM_DEVICE: &str = "/dev/kvm";

/// What a backend sees on this host.
#[derive(Debug, Clone)]
pub struct HostProbe {
    /// The accelerator the backend would use and why, or why it cannot run.
    pub accelerator: Result<(String, String), String>,
    /// The VMM binary the backend runs, for backends that run one.
    pub vmm_binary: Option<PathBuf>,
    /// Whether `/dev/vhost-net` is usable, when the backend cares.
    pub vhost_net: Option<bool>,
    /// Whether `/dev/vhost-vsock` is usable, when the backend cares.
    pub vhost_vsock: Option<bool>,
    /// What the accelerator found cannot do here, when it is usable only in part.
    pub kvm_caveat: Option<String>,
    /// Whether the VM runs inside the shim's own process ([`hypervisor::Capabilities`]).
    pub in_process: bool,
}

/// Probes the host as `kind` would, for `wanted` and the configured VMM `binary`.
pub fn probe_host(
    kind: BackendKind,
    wanted: Accelerator,
    binary: Option<&Path>,
) -> Result<HostProbe, BackendError> {
    match kind {
        #[cfg(feature = "qemu")]
        BackendKind::Qemu => {
            let host = hypervisor_qemu::host::HostFeatures::probe();
            Ok(HostProbe {
                accelerator: host
                    .choose_accel(wanted)
                    .map(|(a, why)| (a.as_str().to_string(), why))
                    .map_err(|e| e.to_string()),
                vmm_binary: Some(
                    binary
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| hypervisor_qemu::QemuOptions::default().default_binary),
                ),
                vhost_net: Some(host.vhost_net),
                vhost_vsock: Some(host.vhost_vsock),
                kvm_caveat: None,
                in_process: false,
            })
        }
        #[cfg(feature = "dragonball")]
        BackendKind::Dragonball => {
            // In-process: no VMM binary, and no vhost (its devices are its own).
            let _ = binary;
            let kvm = Path::new(KVM_DEVICE);
            let accelerator = if wanted == Accelerator::Tcg {
                Err(
                    "accelerator \"tcg\" asked for, but the Dragonball backend runs only on KVM; use \"kvm\" or \"auto\", or the QEMU backend"
                        .to_string(),
                )
            } else {
                hypervisor_dragonball::kvm::open(kvm)
                    .map(|_| {
                        (
                            "kvm".to_string(),
                            format!(
                                "{} opens, speaks API version {} and has the capabilities the in-process VMM uses",
                                kvm.display(),
                                hypervisor_dragonball::kvm::KVM_API_VERSION
                            ),
                        )
                    })
                    .map_err(|e| format!("{e}: the Dragonball backend has no software fallback"))
            };
            let kvm_caveat = match (
                &accelerator,
                hypervisor::host::probe_hardware_virtualization(),
            ) {
                (Ok(_), Ok(false)) => Some(NESTED_KVM_CAVEAT.to_string()),
                (Ok(_), Err(why)) => {
                    let why = anyhow::Error::from(why);
                    Some(format!("cannot tell whether the CPU has vmx/svm ({why:#})"))
                }
                _ => None,
            };
            Ok(HostProbe {
                accelerator,
                vmm_binary: None,
                vhost_net: None,
                vhost_vsock: None,
                kvm_caveat,
                in_process: true,
            })
        }
        #[allow(unreachable_patterns)]
        other => {
            let _ = (wanted, binary);
            Err(BackendError::NotCompiled { backend: other })
        }
    }
}

/// One confinement of the VMM process, as `sandbox check` reports it.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// `seccomp`, `rootless` or `chroot`.
    pub name: &'static str,
    /// `Some(true)`: configured and it can work here; `Some(false)`: configured and it cannot;
    /// `None`: not configured.
    pub works: Option<bool>,
    /// What is configured and what was found.
    pub detail: String,
}

/// The confinement `config` gives the VMM of `kind` on this host. Empty for in-process
/// backends, which run no VMM process to confine.
pub fn confinement(kind: BackendKind, config: &HypervisorConfig) -> Vec<Confinement> {
    match kind {
        #[cfg(feature = "qemu")]
        BackendKind::Qemu => {
            use hypervisor_qemu::ConfinementState;
            let binary = config
                .path
                .clone()
                .unwrap_or_else(|| hypervisor_qemu::QemuOptions::default().default_binary);
            hypervisor_qemu::check_confinement(config, &binary)
                .into_iter()
                .map(|c| Confinement {
                    name: c.name,
                    works: match c.state {
                        ConfinementState::Active => Some(true),
                        ConfinementState::Broken => Some(false),
                        ConfinementState::Off => None,
                    },
                    detail: c.detail,
                })
                .collect()
        }
        #[allow(unreachable_patterns)]
        _ => {
            let _ = config;
            Vec::new()
        }
    }
}

/// What a KVM without hardware virtualization can run, as `sandbox check` says it.
#[cfg_attr(not(feature = "dragonball"), allow(dead_code))]
const NESTED_KVM_CAVEAT: &str = "the CPU advertises no vmx/svm (a nested KVM): a minimal guest runs, but a Linux guest does not boot on this host (it stops on instructions this KVM cannot emulate); boot Linux under Dragonball on a host with hardware virtualization, or use the QEMU backend (TCG) here";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in BackendKind::ALL {
            assert_eq!(BackendKind::parse(b.name()), Some(b));
        }
        assert_eq!(BackendKind::parse("firecracker"), None);
    }

    #[test]
    fn a_backend_left_out_names_its_feature_and_make_knob() {
        let err = BackendError::NotCompiled {
            backend: BackendKind::Dragonball,
        }
        .to_string();
        assert!(err.contains("--features dragonball"), "{err}");
        assert!(
            err.contains("make build HYPERVISOR=dragonball or all"),
            "{err}"
        );
    }
}
