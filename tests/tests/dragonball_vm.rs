//! The Dragonball backend booting real guests in this process, on this host's KVM.
//!
//! Most tests boot the test guest (`guest/testguest`, built by `make test-guest`): a tiny
//! freestanding kernel loaded and entered exactly like a `vmlinux`, which this host's nested
//! KVM can run. The Debian kernel boots through the same path; without hardware
//! virtualization (vmx/svm) it prints its banner and then must end on a typed vCPU fault.
#![cfg(feature = "dragonball")]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::device::NetworkConfig;
use hypervisor::{
    Device, DeviceConfig, DeviceId, DeviceManager, Error, ExitReason, Hypervisor, HypervisorConfig,
    PlugMode, SandboxSpec, VcpuFaultKind, Vm, VmExit, VmState,
};
use hypervisor_dragonball::{Dragonball, DragonballError, DragonballHypervisor, DragonballOptions};
use workspace_tests::{run, test_guest, test_logger, unique_name, GuestAssets};

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Fails the test, with the reason, unless KVM is there.
fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the Dragonball backend runs guests on KVM only (load kvm_intel or kvm_amd, or run on a host with KVM)"
    );
}

/// One VM under test with its own run directory.
struct TestVm {
    vm: Arc<DragonballHypervisor>,
    _dir: tempfile::TempDir,
}

impl TestVm {
    fn new() -> TestVm {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let opts = DragonballOptions {
            run_root: dir.path().to_path_buf(),
            ..Default::default()
        };
        TestVm {
            vm: Arc::new(Vm::new(Dragonball::new(test_logger(), opts))),
            _dir: dir,
        }
    }

    fn with_kvm_path(kvm: &str) -> TestVm {
        let dir = tempfile::tempdir().unwrap();
        let opts = DragonballOptions {
            run_root: dir.path().to_path_buf(),
            kvm_path: kvm.into(),
            ..Default::default()
        };
        TestVm {
            vm: Arc::new(Vm::new(Dragonball::new(test_logger(), opts))),
            _dir: dir,
        }
    }

    /// Prepares and starts the test guest with `params` on its command line.
    async fn boot_test_guest(&self, vcpus: u32, params: &[&str], netns: Option<PathBuf>) {
        let config = HypervisorConfig {
            kernel: test_guest(),
            kernel_params: params.iter().map(|s| s.to_string()).collect(),
            memory_mib: 64,
            vcpus,
            ..Default::default()
        };
        let spec = SandboxSpec {
            id: unique_name("db"),
            netns,
            config,
        };
        self.vm.prepare(&spec).await.expect("prepare");
        self.vm.start(BOOT_TIMEOUT).await.expect("start");
    }

    async fn console(&self) -> String {
        let path = self
            .vm
            .console_log()
            .await
            .expect("a console log after prepare");
        String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned()
    }

    /// Waits until the console contains `needle`, failing with the console's content.
    async fn wait_console(&self, needle: &str, timeout: Duration) -> String {
        let began = Instant::now();
        loop {
            let text = self.console().await;
            if text.contains(needle) {
                return text;
            }
            assert!(
                began.elapsed() < timeout,
                "the console did not show {needle:?} within {timeout:?}; it has:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_exit(&self) -> VmExit {
        tokio::time::timeout(EXIT_TIMEOUT, self.vm.wait_exit())
            .await
            .expect("the VM did not exit in time")
            .expect("wait_exit")
    }
}

/// Names of this process's threads, by thread id.
fn thread_name(tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_guest_prints_its_cmdline_and_its_poweroff_is_a_guest_shutdown() {
    let t = TestVm::new();
    t.boot_test_guest(1, &["testguest.action=poweroff", "marker=abc123"], None)
        .await;
    let exit = t.wait_exit().await;
    let console = t.console().await;
    assert_eq!(
        exit.reason,
        ExitReason::GuestShutdown,
        "{exit}; console:\n{console}"
    );
    assert!(
        console.contains("testguest: hello from the test guest"),
        "{console}"
    );
    let cmdline = console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("testguest: cmdline="))
        .unwrap_or_else(|| panic!("no cmdline line in:\n{console}"));
    assert!(cmdline.starts_with("console=ttyS0 reboot=k"), "{cmdline}");
    assert!(
        cmdline.ends_with("testguest.action=poweroff marker=abc123"),
        "{cmdline}"
    );
    assert!(console.contains("testguest: e820 entries=3"), "{console}");
    assert!(console.contains("testguest: powering off"), "{console}");
    assert_eq!(t.vm.state().await, VmState::Stopped);
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_guest_makes_no_progress_until_resumed() {
    let t = TestVm::new();
    t.boot_test_guest(
        1,
        &["testguest.action=tick", "testguest.tick_loops=100000"],
        None,
    )
    .await;
    t.wait_console("testguest: tick 3\r\n", BOOT_TIMEOUT).await;

    t.vm.pause().await.expect("pause");
    assert_eq!(t.vm.state().await, VmState::Paused);
    let paused = t.console().await;
    // An observation window: a running guest prints several ticks in this time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = t.console().await;
    assert_eq!(
        paused.len(),
        still.len(),
        "the console grew while paused:\n{}",
        &still[paused.len()..]
    );

    t.vm.resume().await.expect("resume");
    assert_eq!(t.vm.state().await, VmState::Running);
    let last_tick = paused
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("testguest: tick "))
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
        .expect("ticks before the pause");
    t.wait_console(
        &format!("testguest: tick {}\r\n", last_tick + 2),
        BOOT_TIMEOUT,
    )
    .await;

    t.vm.stop().await.expect("stop");
    assert_eq!(t.wait_exit().await.reason, ExitReason::Stopped);
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_vm_can_be_stopped_and_its_threads_are_joined() {
    let t = TestVm::new();
    t.boot_test_guest(
        1,
        &["testguest.action=tick", "testguest.tick_loops=100000"],
        None,
    )
    .await;
    t.wait_console("testguest: tick 1\r\n", BOOT_TIMEOUT).await;
    t.vm.pause().await.expect("pause");
    let pids = t.vm.pids().await.unwrap();
    t.vm.stop().await.expect("stop while paused");
    assert_eq!(t.wait_exit().await.reason, ExitReason::Stopped);
    assert!(pids.vcpus.iter().all(|tid| thread_name(*tid).is_none()));
    let err = t.vm.resume().await.unwrap_err();
    assert!(matches!(err, Error::InvalidState { .. }), "{err}");
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_joins_every_vcpu_thread_and_the_event_thread() {
    let t = TestVm::new();
    t.boot_test_guest(2, &["testguest.action=hlt_forever"], None)
        .await;
    t.wait_console("testguest: action=hlt_forever", BOOT_TIMEOUT)
        .await;
    let pids = t.vm.pids().await.expect("pids while running");
    assert_eq!(pids.vmm, std::process::id());
    assert_eq!(pids.vcpus.len(), 2);
    for (i, tid) in pids.vcpus.iter().enumerate() {
        assert_eq!(
            thread_name(*tid).as_deref(),
            Some(format!("db-vcpu{i}").as_str())
        );
    }
    assert_eq!(thread_name(pids.main_thread).as_deref(), Some("db-vmm"));

    t.vm.stop().await.expect("stop");
    assert_eq!(t.vm.state().await, VmState::Stopped);
    for tid in pids.vcpus.iter().chain([&pids.main_thread]) {
        assert_eq!(
            thread_name(*tid),
            None,
            "thread {tid} is still alive after stop"
        );
    }
    assert_eq!(t.wait_exit().await.reason, ExitReason::Stopped);
    // Stop is idempotent.
    t.vm.stop().await.expect("second stop");
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_guest_ends_the_vm_with_the_exit_reason_and_rip() {
    let t = TestVm::new();
    t.boot_test_guest(1, &["testguest.action=crash"], None)
        .await;
    let exit = t.wait_exit().await;
    let ExitReason::VcpuFault(fault) = &exit.reason else {
        panic!(
            "expected a vCPU fault, got {exit}; console:\n{}",
            t.console().await
        );
    };
    // `ud2` with no usable IDT: #UD, then #DF, then a triple fault.
    assert_eq!(fault.vcpu, 0, "{fault}");
    assert_eq!(fault.kind, VcpuFaultKind::TripleFault, "{fault}");
    assert!(fault.detail.starts_with("KVM_EXIT_SHUTDOWN"), "{fault}");
    let rip = fault.rip.unwrap_or_else(|| panic!("no RIP in {fault}"));
    assert!(
        (0x20_0000..0x21_0000).contains(&rip),
        "RIP {rip:#x} is not in the test guest's code: {fault}"
    );
    assert_eq!(t.vm.state().await, VmState::Stopped);
    // The pids of a VM that ended stay readable; its threads are gone.
    let pids = t.vm.pids().await.unwrap();
    assert!(pids.vcpus.iter().all(|tid| thread_name(*tid).is_none()));
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_cannot_be_hot_plugged_and_pause_is_a_capability() {
    let t = TestVm::new();
    t.boot_test_guest(1, &["testguest.action=hlt_forever"], None)
        .await;
    let caps = t.vm.capabilities().await;
    assert!(caps.pause && !caps.network_hotplug && !caps.block_hotplug);
    let nic = NetworkConfig::tap("tap0", "02:00:00:00:00:01".parse().unwrap());
    // Through the manager, which decides hot plug for a running VM: unsupported.
    let devices = DeviceManager::new(t.vm.clone());
    let err = devices
        .add(DeviceConfig::Network(nic.clone()))
        .await
        .unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert!(devices.list().await.is_empty());
    // Straight to the VM, bypassing the manager: hot is unsupported, cold is not a running
    // VM's mode.
    let device = || Device {
        id: DeviceId::new("net0").unwrap(),
        config: DeviceConfig::Network(nic.clone()),
    };
    let err = t.vm.add_device(device(), PlugMode::Hot).await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    let err = t.vm.add_device(device(), PlugMode::Cold).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidState {
                state: VmState::Running,
                ..
            }
        ),
        "{err:?}"
    );
    t.vm.cleanup().await.unwrap();
    assert_eq!(t.vm.state().await, VmState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_thread_runs_in_the_sandbox_network_namespace() {
    workspace_tests::require_root();
    let name = unique_name("dbns");
    run("ip", &["netns", "add", &name]).unwrap();
    let ns = PathBuf::from(format!("/run/netns/{name}"));
    let t = TestVm::new();
    t.boot_test_guest(1, &["testguest.action=hlt_forever"], Some(ns.clone()))
        .await;
    let pids = t.vm.pids().await.unwrap();
    let in_thread = std::fs::metadata(format!("/proc/self/task/{}/ns/net", pids.main_thread))
        .unwrap()
        .ino();
    let wanted = std::fs::metadata(&ns).unwrap().ino();
    t.vm.cleanup().await.unwrap();
    run("ip", &["netns", "del", &name]).unwrap();
    assert_eq!(
        in_thread,
        wanted,
        "the db-vmm thread is not in {}",
        ns.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_kvm_device_fails_start_with_a_typed_error() {
    let t = TestVm::with_kvm_path("/nonexistent/kvm");
    let spec = SandboxSpec {
        id: unique_name("db"),
        netns: None,
        config: HypervisorConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..Default::default()
        },
    };
    t.vm.prepare(&spec).await.unwrap();
    let err = t.vm.start(BOOT_TIMEOUT).await.unwrap_err();
    let Error::Backend { source, .. } = &err else {
        panic!("expected a backend error, got {err:?}");
    };
    assert!(
        matches!(
            source.downcast_ref::<DragonballError>(),
            Some(DragonballError::KvmUnavailable { .. })
        ),
        "{err:?}"
    );
    assert_eq!(t.vm.state().await, VmState::Stopped);
    t.vm.cleanup().await.unwrap();
}

/// How long the Debian kernel may take to print its banner. Under this host's nested KVM
/// (no vmx/svm) the kernel executes slowly: the banner has come 66-110 s after start.
const BANNER_TIMEOUT: Duration = Duration::from_secs(240);
/// How soon after the banner the nested KVM's failure must be reported.
const FAULT_AFTER_BANNER: Duration = Duration::from_secs(60);

/// Boots the Debian bzImage and initramfs of `make guest-assets-debian` through the same 64-bit
/// boot path as the test guest, and waits for its `Linux version` banner on the serial console.
/// (Under this host's nested KVM the kernel `make guest-assets` builds printed its
/// decompressor's first lines and no banner within 240 s; Debian's is the kernel whose
/// failure there is known and checked.)
///
/// With hardware virtualization (vmx/svm) the boot then goes on to user space. Without it, as
/// under this host's nested KVM, the kernel soon executes an instruction KVM cannot emulate
/// (`lock cmpxchg16b`, `xrstor`, an `int3` self-test were seen): the VM must then end with a
/// typed vCPU fault naming the exit and a RIP in the kernel, promptly, not hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_prints_its_banner_then_ends_on_a_typed_vcpu_fault_or_boots_on() {
    let assets = GuestAssets::debian();
    let hardware = workspace_tests::hardware_virtualization();
    let t = TestVm::new();
    let config = HypervisorConfig {
        kernel: assets.kernel.clone(),
        initrd: Some(assets.initrd.clone()),
        kernel_params: vec!["earlyprintk=serial,ttyS0,115200".into()],
        memory_mib: 256,
        ..Default::default()
    };
    t.vm.prepare(&SandboxSpec {
        id: unique_name("dblinux"),
        netns: None,
        config,
    })
    .await
    .unwrap();
    let began = Instant::now();
    t.vm.start(BOOT_TIMEOUT).await.unwrap();

    // Wait for the banner, or for the VM to end before it (a failure, reported with how).
    let banner_at = loop {
        let text = t.console().await;
        if text.contains("Linux version") {
            break began.elapsed();
        }
        if t.vm.state().await == VmState::Stopped {
            let exit = t.wait_exit().await;
            panic!("the VM ended before the banner: {exit}; console:\n{text}");
        }
        assert!(
            began.elapsed() < BANNER_TIMEOUT,
            "no `Linux version` banner within {BANNER_TIMEOUT:?}; console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("the banner came {banner_at:?} after start");

    if hardware {
        eprintln!("this host has vmx/svm: expecting the boot to reach user space");
        t.wait_console("Run /init as init process", BANNER_TIMEOUT)
            .await;
        assert_eq!(t.vm.state().await, VmState::Running);
        t.vm.stop().await.unwrap();
        assert_eq!(t.wait_exit().await.reason, ExitReason::Stopped);
    } else {
        eprintln!("this host has no vmx/svm: expecting a typed vCPU fault after the banner");
        let exit = tokio::time::timeout(FAULT_AFTER_BANNER, t.vm.wait_exit())
            .await
            .unwrap_or_else(|_| {
                panic!("no exit within {FAULT_AFTER_BANNER:?} of the banner: the VM hangs")
            })
            .expect("wait_exit");
        let fault_at = began.elapsed();
        let console = t.console().await;
        let ExitReason::VcpuFault(fault) = &exit.reason else {
            panic!("expected a vCPU fault, got {exit}; console:\n{console}");
        };
        eprintln!(
            "{fault} ({:?}), {:?} after the banner",
            fault.kind,
            fault_at - banner_at
        );
        assert!(
            matches!(
                fault.kind,
                VcpuFaultKind::EmulationFailure | VcpuFaultKind::InternalError
            ),
            "{fault}; console:\n{console}"
        );
        assert!(
            fault.detail.starts_with("KVM_EXIT_INTERNAL_ERROR"),
            "{fault}"
        );
        // The kernel runs at its high mapping.
        let rip = fault.rip.unwrap_or_else(|| panic!("no RIP in {fault}"));
        assert!(
            rip >= 0xffff_ffff_8000_0000,
            "RIP {rip:#x} is not in the kernel"
        );
        assert_eq!(t.vm.state().await, VmState::Stopped);
    }
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_console_log_gets_the_console_and_outlives_cleanup() {
    let t = TestVm::new();
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("guest-console.log");
    let spec = SandboxSpec {
        id: unique_name("db"),
        netns: None,
        config: HypervisorConfig {
            kernel: test_guest(),
            kernel_params: vec!["testguest.action=poweroff".into()],
            memory_mib: 64,
            console_log: Some(path.clone()),
            ..Default::default()
        },
    };
    t.vm.prepare(&spec).await.unwrap();
    assert_eq!(t.vm.console_log().await.as_deref(), Some(path.as_path()));
    t.vm.start(BOOT_TIMEOUT).await.unwrap();
    let exit = t.wait_exit().await;
    assert_eq!(exit.reason, ExitReason::GuestShutdown, "{exit}");
    t.vm.cleanup().await.unwrap();
    let console = std::fs::read_to_string(&path).unwrap();
    assert!(
        console.contains("testguest: hello from the test guest"),
        "{console}"
    );
    assert!(
        std::fs::read_dir(t._dir.path()).unwrap().next().is_none(),
        "cleanup left a run directory"
    );
}
