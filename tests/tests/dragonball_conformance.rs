//! The shared VM scenarios (`workspace_tests::scenarios`) run against the Dragonball backend.
//!
//! They boot the guest of `make guest-assets`, ping it through a TAP from the sandbox's
//! namespace and talk to its agent over hybrid vsock. The backend opens its TAP by name in that
//! namespace, so the scenarios hand it a persistent TAP (and delete it after checking the VMM
//! let go); the VMM runs in this process, so teardown checks its threads, not a process.
//!
//! Booting needs what hosts without hardware virtualization lack, so these tests are
//! `#[ignore]`d with the reason, and `make test` runs them (`--ignored`) where the host and
//! the guest kernel have both; run by hand elsewhere, they fail naming what is missing
//! ([`Dragonball::can_boot`]):
//!
//! - hardware virtualization (`vmx` or `svm` in `/proc/cpuinfo`): under a nested KVM without
//!   them a stock kernel executes slowly and dies on an instruction KVM cannot emulate
//!   (`lock cmpxchg16b`) soon after its banner;
//! - a guest kernel with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y` (and `CONFIG_VIRTIO_MMIO`),
//!   since devices are announced as `virtio_mmio.device=` on the command line. The kernel
//!   `make guest-assets` builds sets it (its `config` is read beside it); Debian's cloud
//!   kernel does not. For another kernel point `GUEST_DIR` at it and `GUEST_KERNEL_CONFIG` at
//!   its `.config`.
#![cfg(feature = "dragonball")]

use std::path::Path;
use std::sync::Arc;

use hypervisor::device::VsockConfig;
use hypervisor::{AgentAddress, Device, DeviceConfig, DeviceId, Hypervisor, HypervisorConfig};
use hypervisor_dragonball::{Dragonball as DragonballBackend, DragonballOptions};
use workspace_tests::{scenarios, test_logger, Backend, GuestAssets, Sandbox, TapHandover};

struct Dragonball;

impl Backend for Dragonball {
    fn create(&self, run_root: &Path) -> Arc<dyn Hypervisor> {
        Arc::new(hypervisor::Vm::new(DragonballBackend::new(
            test_logger(),
            DragonballOptions {
                run_root: run_root.to_path_buf(),
                ..Default::default()
            },
        )))
    }

    fn config(&self, assets: &GuestAssets) -> HypervisorConfig {
        HypervisorConfig {
            kernel: assets.kernel.clone(),
            initrd: Some(assets.initrd.clone()),
            memory_mib: 256,
            ..Default::default()
        }
    }

    /// KVM, hardware virtualization, and a kernel that takes its virtio-mmio devices from
    /// the command line.
    fn can_boot(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        if !Path::new("/dev/kvm").exists() {
            missing.push("/dev/kvm is missing: the Dragonball backend runs guests on KVM".into());
        }
        if !workspace_tests::hardware_virtualization() {
            missing.push("no vmx/svm in /proc/cpuinfo: this host's KVM is nested without hardware virtualization, and a stock Linux kernel dies there on an instruction KVM cannot emulate".into());
        }
        let assets = GuestAssets::find();
        let options = assets
            .kernel_option("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES")
            .and_then(|c| Ok((c, assets.kernel_option("CONFIG_VIRTIO_MMIO")?)));
        match options {
            Ok((Some(c), Some(m))) if c == "y" && (m == "y" || m == "m") => {}
            Ok(_) => missing.push(format!(
                "the guest kernel {} lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y (or CONFIG_VIRTIO_MMIO): the Dragonball backend announces its devices as virtio_mmio.device= on the command line; build a kernel with them and set GUEST_DIR and GUEST_KERNEL_CONFIG",
                assets.kernel.display()
            )),
            Err(why) => missing.push(why),
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }

    fn tap_handover(&self) -> TapHandover {
        TapHandover::Name
    }

    /// The agent's channel: a hybrid vsock device.
    fn base_devices(&self) -> Vec<Device> {
        vec![Device {
            id: DeviceId::new("vsock0").expect("valid id"),
            config: DeviceConfig::Vsock(VsockConfig { guest_cid: 3 }),
        }]
    }

    /// No ACPI: stop ends the vCPUs itself.
    fn stop_powers_the_guest_off(&self) -> bool {
        false
    }
}

/// Fails with every missing prerequisite named.
fn require_bootable() {
    if let Err(why) = Dragonball.can_boot() {
        panic!("the Dragonball Linux scenarios cannot run on this host: {why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs vmx/svm and a guest kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y; `make test` runs it where both are present"]
async fn boot_ping_and_agent() {
    require_bootable();
    scenarios::boot_ping_and_agent(&Dragonball, 1, &|_pid, _nic| Ok(()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs vmx/svm and a guest kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y; `make test` runs it where both are present"]
async fn pause_and_resume() {
    require_bootable();
    scenarios::pause_and_resume(&Dragonball).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs vmx/svm and a guest kernel with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y; `make test` runs it where both are present"]
async fn stop_is_final() {
    require_bootable();
    scenarios::stop_is_final(&Dragonball).await.unwrap();
}

/// The test guest under the scenarios' own harness: it runs here, so what the scenarios need
/// from an in-process backend is checked on this host too.
struct TestGuest;

impl Backend for TestGuest {
    fn create(&self, run_root: &Path) -> Arc<dyn Hypervisor> {
        Dragonball.create(run_root)
    }

    fn config(&self, _: &GuestAssets) -> HypervisorConfig {
        HypervisorConfig {
            kernel: workspace_tests::test_guest(),
            kernel_params: vec!["testguest.action=hlt_forever".into()],
            memory_mib: 64,
            ..Default::default()
        }
    }

    fn can_boot(&self) -> Result<(), String> {
        Ok(())
    }

    fn tap_handover(&self) -> TapHandover {
        Dragonball.tap_handover()
    }

    fn base_devices(&self) -> Vec<Device> {
        Dragonball.base_devices()
    }
}

/// The harness hands the VMM a persistent TAP by name, reaches a hybrid vsock agent address,
/// and its teardown sees the VMM's threads end and its TAP let go, then leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scenario_harness_hands_over_a_named_tap_and_tears_down_an_in_process_vmm() {
    let config = TestGuest.config(&GuestAssets {
        kernel: Default::default(),
        initrd: Default::default(),
    });
    let mut sb = Sandbox::prepare(&TestGuest, config).await.unwrap();
    let mut nic = sb.tap(1, 1).unwrap();
    sb.devices.add(nic.network()).await.unwrap();
    // Before start no one holds the persistent TAP.
    let link = sb.ip(&["-j", "link", "show", "dev", &nic.tap]).unwrap();
    assert!(link.contains("\"NO-CARRIER\""), "{link}");

    sb.start_vm().await.unwrap();
    let AgentAddress::HybridVsock { path, .. } = sb.hv.agent_address().await.unwrap() else {
        panic!("expected a hybrid vsock agent address");
    };
    assert!(path.exists(), "{}", path.display());
    // The VMM opened it: the TAP has a queue attached, hence carrier.
    let link = sb.ip(&["-j", "link", "show", "dev", &nic.tap]).unwrap();
    assert!(!link.contains("\"NO-CARRIER\""), "{link}");
    let pids = sb.hv.pids().await.unwrap();
    assert_eq!(pids.vmm, std::process::id());

    sb.teardown(Some(pids.vmm)).await.unwrap();
    for tid in pids.vcpus.iter().chain([&pids.main_thread]) {
        assert!(!Path::new(&format!("/proc/self/task/{tid}")).exists());
    }
}
