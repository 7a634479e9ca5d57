//! The shared VM scenarios (`workspace_tests::scenarios`) run against the Dragonball backend.
//!
//! They boot Linux, ping it through a TAP and talk to its agent. On this host they cannot run:
//! the nested KVM has no vmx/svm and a stock kernel does not finish booting under it (see
//! FACTS.md), so each test is ignored with that reason. On a host with hardware
//! virtualization they also need:
//!
//! - a guest kernel with `CONFIG_VIRTIO_MMIO=y` and `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y`
//!   (Debian's kernels lack the latter: build one), since devices are announced as
//!   `virtio_mmio.device=` on the command line;
//! - the scenarios' NIC is handed over as pre-opened TAP fds (`NetworkBackend::TapFds`),
//!   which this backend refuses today (it opens its TAP by name), and the agent is reached
//!   through a hybrid vsock device the scenario must add. Those two gaps make the scenarios
//!   fail with a typed "unsupported" error rather than hang.
#![cfg(feature = "dragonball")]

use std::path::Path;
use std::sync::Arc;

use hypervisor::{Hypervisor, HypervisorConfig};
use hypervisor_dragonball::{DragonballHypervisor, DragonballOptions};
use workspace_tests::{scenarios, test_logger, Backend, GuestAssets};

const REASON: &str = "needs hardware virtualization (vmx/svm) to boot Linux, and a guest kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (Debian's lacks it)";

struct Dragonball;

impl Backend for Dragonball {
    fn create(&self, run_root: &Path) -> Arc<dyn Hypervisor> {
        Arc::new(DragonballHypervisor::new(
            test_logger(),
            DragonballOptions {
                run_root: run_root.to_path_buf(),
                ..Default::default()
            },
        ))
    }

    fn config(&self, assets: &GuestAssets) -> HypervisorConfig {
        HypervisorConfig {
            kernel: assets.kernel.clone(),
            initrd: Some(assets.initrd.clone()),
            memory_mib: 256,
            ..Default::default()
        }
    }

    fn can_boot(&self) -> Result<(), String> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if !Path::new("/dev/kvm").exists() {
            Err("/dev/kvm is missing".into())
        } else if !hw {
            Err(REASON.into())
        } else {
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs hardware virtualization (vmx/svm) to boot Linux, and a guest kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (Debian's lacks it)"]
async fn boot_ping_and_agent() {
    scenarios::boot_ping_and_agent(&Dragonball, 1, &|_pid, _nic| Ok(()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs hardware virtualization (vmx/svm) to boot Linux, and a guest kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (Debian's lacks it)"]
async fn pause_and_resume() {
    scenarios::pause_and_resume(&Dragonball).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs hardware virtualization (vmx/svm) to boot Linux, and a guest kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (Debian's lacks it)"]
async fn stop_is_final() {
    scenarios::stop_is_final(&Dragonball).await.unwrap();
}
