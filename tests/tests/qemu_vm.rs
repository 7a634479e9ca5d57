//! Real QEMU guests through the `Hypervisor` trait (TCG where KVM is not really usable).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use hypervisor::{
    Accelerator, Device, DeviceConfig, DeviceId, Error, Hypervisor, HypervisorConfig, SandboxSpec,
};
use hypervisor_qemu::{QemuHypervisor, QemuOptions};
use workspace_tests::{fd_targets, scenarios, test_logger, Backend, GuestAssets, Sandbox};

struct Qemu {
    machine: &'static str,
}

const QEMU: Qemu = Qemu { machine: "q35" };

impl Qemu {
    fn options(run_root: &Path) -> QemuOptions {
        QemuOptions {
            run_root: run_root.to_path_buf(),
            ..Default::default()
        }
    }
}

impl Backend for Qemu {
    fn create(&self, run_root: &Path) -> Arc<dyn Hypervisor> {
        Arc::new(QemuHypervisor::new(test_logger(), Self::options(run_root)))
    }

    fn config(&self, assets: &GuestAssets) -> HypervisorConfig {
        HypervisorConfig {
            kernel: assets.kernel.clone(),
            initrd: Some(assets.initrd.clone()),
            machine_type: Some(self.machine.into()),
            memory_mib: 256,
            ..Default::default()
        }
    }

    fn can_boot(&self) -> Result<(), String> {
        let qemu = QemuOptions::default().default_binary;
        if qemu.exists() {
            Ok(())
        } else {
            Err(format!(
                "{} is missing: run `make deps` (Debian package qemu-system-x86)",
                qemu.display()
            ))
        }
    }
}

/// QEMU holds exactly its TAP queues from us: one /dev/net/tun fd per queue, and none of the
/// test's own fds.
fn qemu_holds_only_its_fds(pid: u32, queues: usize, marker: &Path) -> Result<()> {
    let fds = fd_targets(pid)?;
    let tun = fds.iter().filter(|(_, t)| t == "/dev/net/tun").count();
    ensure!(
        tun == queues,
        "QEMU holds {tun} TAP fds, expected {queues}: {fds:?}"
    );
    let leaked: Vec<_> = fds.iter().filter(|(_, t)| Path::new(t) == marker).collect();
    ensure!(
        leaked.is_empty(),
        "the test's own fd leaked into QEMU: {leaked:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q35_guest_answers_ping_and_agent_sees_two_queue_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let marker_path = dir.path().join("marker-not-for-the-vmm");
    let _marker = workspace_tests::marker_fd(dir.path()).unwrap();
    scenarios::boot_ping_and_agent(&QEMU, 2, &|pid, _nic| {
        qemu_holds_only_its_fds(pid, 2, &marker_path)?;
        // QEMU runs in the sandbox's namespace.
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net"))?;
        let own = std::fs::read_link("/proc/self/ns/net")?;
        ensure!(
            ns != own,
            "QEMU runs in the test's namespace, not the sandbox's"
        );
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q35_nic_hotplug_then_unplug() {
    scenarios::nic_hotplug_and_unplug(&QEMU).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q35_block_hotplug_reads_the_host_pattern() {
    scenarios::block_hotplug_reads_pattern(&QEMU).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q35_paused_guest_stops_answering_until_resumed() {
    scenarios::pause_and_resume(&QEMU).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q35_kill_of_qemu_is_reported_by_wait() {
    scenarios::vmm_killed_is_reported(&QEMU).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q35_stop_is_final() {
    scenarios::stop_is_final(&QEMU).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_boots_and_refuses_hotplug() {
    let microvm = Qemu { machine: "microvm" };
    let assets = GuestAssets::find();
    let mut sb = Sandbox::prepare(&microvm, microvm.config(&assets))
        .await
        .unwrap();
    let mut nic = sb.tap(1, 1).unwrap();
    sb.hv
        .add_device(Device {
            id: DeviceId::new("net0").unwrap(),
            config: DeviceConfig::Network(nic.take_config()),
        })
        .await
        .unwrap();
    sb.start().await.unwrap();
    sb.configure(&nic).await.unwrap();
    sb.wait_ping(&nic.guest_ip, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!sb.hv.capabilities().await.network_hotplug);

    let mut second = sb.tap(2, 1).unwrap();
    let err = sb
        .hv
        .add_device(Device {
            id: DeviceId::new("net1").unwrap(),
            config: DeviceConfig::Network(second.take_config()),
        })
        .await
        .unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert!(err.to_string().contains("microvm"), "{err}");
    let pid = sb.hv.pids().await.unwrap().vmm;
    sb.teardown(Some(pid)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_kernel_fails_start_with_qemus_message_and_leaves_nothing() {
    let run_root = tempfile::tempdir().unwrap();
    let hv = QEMU.create(run_root.path());
    let id = workspace_tests::unique_name("bad");
    hv.prepare(&SandboxSpec {
        id: id.clone(),
        netns: None,
        config: HypervisorConfig {
            kernel: PathBuf::from("/nonexistent/vmlinuz"),
            accelerator: Accelerator::Tcg,
            ..Default::default()
        },
    })
    .await
    .unwrap();
    let err = hv.start(Duration::from_secs(30)).await.unwrap_err();
    let Error::VmmExited(exit) = &err else {
        panic!("expected VmmExited, got {err}");
    };
    let text = format!("{exit}");
    assert!(
        text.contains("/nonexistent/vmlinuz"),
        "QEMU's message is missing: {text}"
    );
    hv.cleanup().await.unwrap();
    assert!(
        !run_root.path().join(&id).exists(),
        "run directory left behind"
    );
    let qemus = workspace_tests::run("pgrep", &["-f", &format!("sandbox-{id}")]);
    assert!(qemus.is_err(), "a QEMU process is left: {qemus:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_namespace_is_a_config_error_naming_it() {
    let run_root = tempfile::tempdir().unwrap();
    let hv = QEMU.create(run_root.path());
    let err = hv
        .prepare(&SandboxSpec {
            id: workspace_tests::unique_name("bad"),
            netns: Some("/run/netns/does-not-exist-here".into()),
            config: HypervisorConfig {
                kernel: "/k".into(),
                ..Default::default()
            },
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig(ref c) if c.field == "netns"),
        "{err}"
    );
    assert!(std::fs::read_dir(run_root.path()).unwrap().next().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_machine_type_is_rejected() {
    let run_root = tempfile::tempdir().unwrap();
    let hv = QEMU.create(run_root.path());
    let err = hv
        .prepare(&SandboxSpec {
            id: workspace_tests::unique_name("bad"),
            netns: None,
            config: HypervisorConfig {
                kernel: "/k".into(),
                machine_type: Some("pc-i440fx".into()),
                ..Default::default()
            },
        })
        .await
        .unwrap_err();
    let Error::InvalidConfig(c) = &err else {
        panic!("expected InvalidConfig, got {err}");
    };
    assert_eq!(c.field, "machine_type");
    assert!(c.problem.contains("q35"), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runtime_reattaches_from_saved_state() {
    let assets = GuestAssets::find();
    let mut sb = Sandbox::prepare(&QEMU, QEMU.config(&assets)).await.unwrap();
    let mut nic = sb.tap(1, 1).unwrap();
    sb.hv
        .add_device(Device {
            id: DeviceId::new("net0").unwrap(),
            config: DeviceConfig::Network(nic.take_config()),
        })
        .await
        .unwrap();
    sb.start().await.unwrap();
    sb.configure(&nic).await.unwrap();
    sb.wait_ping(&nic.guest_ip, Duration::from_secs(60))
        .await
        .unwrap();

    // The runtime "restarts": its state goes through JSON, the old handle is dropped.
    let saved = sb.hv.save_state().await.unwrap();
    let json = serde_json::to_string(&saved).unwrap();
    let saved: hypervisor::SavedState = serde_json::from_str(&json).unwrap();
    let pid = saved.pids.vmm;
    sb.hv = QEMU.create(sb.run_root.path());
    let restored: Arc<dyn Hypervisor> = Arc::new(
        QemuHypervisor::restore(test_logger(), Qemu::options(sb.run_root.path()), saved)
            .await
            .unwrap(),
    );
    sb.hv = restored;
    assert_eq!(sb.hv.state().await, hypervisor::VmState::Running);
    assert_eq!(sb.hv.pids().await.unwrap().vmm, pid);

    // The re-attached handle controls the same QEMU.
    sb.hv.pause().await.unwrap();
    assert!(
        !sb.ping_once(&nic.guest_ip).await,
        "a paused guest answered"
    );
    sb.hv.resume().await.unwrap();
    sb.wait_ping(&nic.guest_ip, Duration::from_secs(60))
        .await
        .unwrap();
    sb.teardown(None).await.unwrap();
    // The re-attached handle cannot reap QEMU (in this test the first handle, its parent,
    // does, a moment later): what matters is that it no longer runs.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let running = state
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .is_some_and(|s| s != "Z" && s != "X");
    assert!(
        !running,
        "QEMU {pid} still runs after stop and cleanup: {state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_qemu_binary_is_named_and_leaves_nothing() {
    let run_root = tempfile::tempdir().unwrap();
    let hv = QEMU.create(run_root.path());
    let id = workspace_tests::unique_name("bad");
    hv.prepare(&SandboxSpec {
        id: id.clone(),
        netns: None,
        config: HypervisorConfig {
            path: Some("/nonexistent/qemu-system-x86_64".into()),
            kernel: "/k".into(),
            ..Default::default()
        },
    })
    .await
    .unwrap();
    let err = hv.start(Duration::from_secs(10)).await.unwrap_err();
    let chain = format!("{:#}", anyhow::Error::new(err));
    assert!(chain.contains("/nonexistent/qemu-system-x86_64"), "{chain}");
    assert_eq!(hv.state().await, hypervisor::VmState::Stopped);
    hv.cleanup().await.unwrap();
    assert!(
        !run_root.path().join(&id).exists(),
        "run directory left behind"
    );
}
