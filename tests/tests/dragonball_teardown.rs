//! Stopping a Dragonball VM leaves nothing behind in this process: no thread, no fd, no
//! memory mapping.
//!
//! The VMM runs in the test process, so the check is on `/proc/self`. This file holds one
//! test only: the test harness runs a binary's tests in parallel threads of one process, and
//! another test's VM would change the same counts.
#![cfg(feature = "dragonball")]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::{ExitReason, Hypervisor, HypervisorConfig, SandboxSpec, Vm, VmState};
use hypervisor_dragonball::{Dragonball, DragonballOptions};
use workspace_tests::{fd_targets, test_guest, test_logger, unique_name};

/// Guest RAM.
const RAM_MIB: u32 = 88;
const TIMEOUT: Duration = Duration::from_secs(30);

fn fds() -> BTreeSet<(i32, String)> {
    fd_targets(std::process::id())
        .expect("reading /proc/self/fd")
        .into_iter()
        .collect()
}

/// The lines of `/proc/self/maps`.
fn maps() -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .expect("reading /proc/self/maps")
        .lines()
        .map(String::from)
        .collect()
}

/// This process's threads that belong to a Dragonball VMM (`db-vcpuN`, `db-vmm`), by id
/// and name. (Others come and go by themselves: the runtime's blocking pool, for one.)
fn threads() -> BTreeSet<(String, String)> {
    std::fs::read_dir("/proc/self/task")
        .expect("reading /proc/self/task")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let comm = comm.trim().to_string();
            comm.starts_with("db-")
                .then(|| (e.file_name().to_string_lossy().into_owned(), comm))
        })
        .collect()
}

/// `VmSize` of this process, in bytes.
fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmSize in /proc/self/status");
    kib << 10
}

/// What this process holds: fds, mappings, address-space size, threads.
struct Snapshot {
    fds: BTreeSet<(i32, String)>,
    maps: Vec<String>,
    vm_size: u64,
    threads: BTreeSet<(String, String)>,
}

fn snapshot() -> Snapshot {
    Snapshot {
        fds: fds(),
        maps: maps(),
        vm_size: vm_size(),
        threads: threads(),
    }
}

/// Boots the test guest with 2 vCPUs, checks the VM shows in this process while it runs,
/// stops it, and returns what the process held before start and after stop.
async fn boot_and_stop() -> (Snapshot, Snapshot) {
    let dir = tempfile::tempdir().unwrap();
    let vm = Arc::new(Vm::new(Dragonball::new(
        test_logger(),
        DragonballOptions {
            run_root: dir.path().to_path_buf(),
            ..Default::default()
        },
    )));
    let spec = SandboxSpec {
        id: unique_name("dbleak"),
        netns: None,
        config: HypervisorConfig {
            kernel: test_guest(),
            kernel_params: vec!["testguest.action=hlt_forever".into()],
            memory_mib: RAM_MIB,
            vcpus: 2,
            ..Default::default()
        },
    };
    vm.prepare(&spec).await.expect("prepare");
    let before = snapshot();

    vm.start(TIMEOUT).await.expect("start");
    let console = vm.console_log().await.expect("a console log");
    let began = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("testguest: action=hlt_forever")
    {
        assert!(began.elapsed() < TIMEOUT, "the test guest did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While it runs, the VM shows: its RAM in the address space, the vCPUs' kvm_run
    // mappings, the VM fd, and its threads.
    let running = snapshot();
    let ram = u64::from(RAM_MIB) << 20;
    assert!(
        running.vm_size >= before.vm_size + ram,
        "VmSize grew by {} bytes only, less than the guest's {RAM_MIB} MiB",
        running.vm_size.saturating_sub(before.vm_size)
    );
    let vcpu_maps = running
        .maps
        .iter()
        .filter(|l| l.contains("kvm-vcpu"))
        .count();
    assert_eq!(vcpu_maps, 2, "{:#?}", running.maps);
    assert!(running.fds.iter().any(|(_, t)| t.contains("kvm-vm")));
    let names: BTreeSet<_> = running.threads.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["db-vcpu0", "db-vcpu1", "db-vmm"]),
        "{:?}",
        running.threads
    );

    vm.stop().await.expect("stop");
    assert_eq!(vm.state().await, VmState::Stopped);
    assert_eq!(vm.wait_exit().await.unwrap().reason, ExitReason::Stopped);
    let after = snapshot();
    vm.cleanup().await.unwrap();
    (before, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_leaves_no_thread_fd_or_memory_mapping_behind() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the Dragonball backend runs guests on KVM only"
    );
    // The C library keeps, by design, what the first VM's threads made it set up: one malloc
    // arena per new thread and a cache of joined threads' stacks, reused by later threads.
    // So the first VM is a warm-up; the second must give back everything it took.
    let _ = boot_and_stop().await;
    let (before, after) = boot_and_stop().await;

    assert!(before.threads.is_empty(), "{:?}", before.threads);
    assert!(
        after.threads.is_empty(),
        "threads left: {:?}",
        after.threads
    );
    let new_fds: Vec<_> = after.fds.difference(&before.fds).collect();
    assert!(new_fds.is_empty(), "fds left open after stop: {new_fds:?}");
    let kvm_left: Vec<_> = after.maps.iter().filter(|l| l.contains("kvm")).collect();
    assert!(kvm_left.is_empty(), "KVM mappings left: {kvm_left:?}");
    let new_maps: Vec<_> = after
        .maps
        .iter()
        .filter(|l| !before.maps.contains(l))
        .collect();
    assert!(
        after.vm_size <= before.vm_size && after.maps.len() <= before.maps.len(),
        "VmSize {} -> {} bytes, {} -> {} mappings after stop; new ones: {new_maps:#?}",
        before.vm_size,
        after.vm_size,
        before.maps.len(),
        after.maps.len()
    );
}
