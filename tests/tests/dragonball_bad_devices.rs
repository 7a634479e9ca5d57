//! Bad device input to the Dragonball backend fails clearly and leaves nothing behind in
//! this process: no `db-*` thread, no fd, no KVM mapping, no TAP it created, no socket file.
//!
//! The VMM runs in the test process, so the check is on `/proc/self`. This file holds one
//! test only: the test harness runs a binary's tests in parallel threads of one process, and
//! another test's VM would change the same counts.
#![cfg(feature = "dragonball")]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hypervisor::device::{BlockConfig, BlockDriver, NetworkConfig, VsockConfig};
use hypervisor::{
    Device, DeviceConfig, DeviceId, DeviceManager, Error, Hypervisor, HypervisorConfig, MacAddress,
    PlugMode, SandboxSpec, Vm, VmState,
};
use hypervisor_dragonball::{Dragonball, DragonballHypervisor, DragonballOptions};
use workspace_tests::{fd_targets, require_root, test_guest, test_logger, unique_name};

const TIMEOUT: Duration = Duration::from_secs(30);
const MAC: MacAddress = MacAddress([0x02, 0xdb, 0, 0, 0, 0x07]);

/// What this process holds that a VMM could leave behind.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    fds: BTreeSet<String>,
    threads: BTreeSet<String>,
    kvm_maps: usize,
}

fn held() -> Held {
    let fds = fd_targets(std::process::id())
        .expect("reading /proc/self/fd")
        .into_iter()
        // The directory handle that lists them.
        .filter(|(_, t)| !t.starts_with("/proc/"))
        .map(|(n, t)| format!("{n} -> {t}"))
        .collect();
    let threads = std::fs::read_dir("/proc/self/task")
        .expect("reading /proc/self/task")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let comm = comm.trim().to_string();
            comm.starts_with("db-").then(|| {
                let tid = e.file_name().to_string_lossy().into_owned();
                format!("{tid} {comm}")
            })
        })
        .collect();
    let kvm_maps = std::fs::read_to_string("/proc/self/maps")
        .expect("reading /proc/self/maps")
        .lines()
        .filter(|l| l.contains("kvm"))
        .count();
    Held {
        fds,
        threads,
        kvm_maps,
    }
}

/// A prepared VM (test guest, 64 MiB) in `netns`, with its run directory.
async fn prepared(netns: Option<&Path>) -> (Arc<DragonballHypervisor>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let vm = Arc::new(Vm::new(Dragonball::new(
        test_logger(),
        DragonballOptions {
            run_root: dir.path().to_path_buf(),
            ..Default::default()
        },
    )));
    vm.prepare(&SandboxSpec {
        id: unique_name("dbbad"),
        netns: netns.map(Path::to_path_buf),
        config: HypervisorConfig {
            kernel: test_guest(),
            kernel_params: vec!["testguest.action=hlt_forever".into()],
            memory_mib: 64,
            vcpus: 1,
            ..Default::default()
        },
    })
    .await
    .expect("prepare");
    (vm, dir)
}

/// Adds a device straight to the VM, bypassing the device manager (which refuses some of
/// these itself): the backend's own checks are under test.
async fn add(vm: &DragonballHypervisor, id: &str, config: DeviceConfig) -> hypervisor::Result<()> {
    vm.add_device(
        Device {
            id: DeviceId::new(id).unwrap(),
            config,
        },
        PlugMode::Cold,
    )
    .await
    .map(|_| ())
}

fn nic(tap: &str, pairs: u16) -> DeviceConfig {
    let mut c = NetworkConfig::tap(tap, MAC);
    c.queue_pairs = pairs;
    DeviceConfig::Network(c)
}

fn disk(path: &Path, read_only: bool) -> DeviceConfig {
    DeviceConfig::Block(BlockConfig {
        path: path.to_path_buf(),
        read_only,
        driver: BlockDriver::VirtioBlkMmio,
    })
}

fn tap_exists(ns: &netdev::NetNs, name: &str) -> bool {
    let name = name.to_string();
    ns.run(move || nix::net::if_::if_nametoindex(name.as_str()).is_ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_devices_fail_clearly_and_leave_nothing_running() {
    require_root();
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the Dragonball backend runs guests on KVM only"
    );
    let ns = netdev::NetNs::create(&unique_name("dbn")).expect("creating a namespace");
    let single = unique_name("dbt");
    drop(
        netdev::TapBuilder::new(&single)
            .persist(true)
            .netns(ns.path())
            .create()
            .expect("creating a single-queue TAP"),
    );
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(4096).unwrap();
    let not_a_file = tempfile::tempdir().unwrap();
    let before = held();

    // A TAP that does not exist: start fails naming it, after the vsock socket and the
    // block image were opened by add_device; all of them must go.
    let (vm, _dir) = prepared(Some(ns.path())).await;
    add(&vm, "blk0", disk(img.path(), false)).await.unwrap();
    add(
        &vm,
        "vsock0",
        DeviceConfig::Vsock(VsockConfig { guest_cid: 3 }),
    )
    .await
    .unwrap();
    let socket = match vm.agent_address().await.unwrap() {
        hypervisor::AgentAddress::HybridVsock { path, .. } => path,
        other => panic!("expected hybrid vsock, got {other:?}"),
    };
    add(&vm, "net0", nic("dbnotap0", 1)).await.unwrap();
    let err = vm.start(TIMEOUT).await.unwrap_err();
    let text = workspace_tests::error_chain(&err);
    assert!(
        text.contains("\"dbnotap0\" does not exist")
            && text.contains(&ns.path().display().to_string()),
        "{text}"
    );
    assert_eq!(vm.state().await, VmState::Stopped);
    vm.cleanup().await.unwrap();
    assert!(
        !tap_exists(&ns, "dbnotap0"),
        "start created the missing TAP"
    );
    assert!(
        !socket.exists(),
        "the vsock socket outlived the failed start"
    );
    assert_eq!(held(), before, "after a start on a missing TAP");

    // Two queue pairs on a single-queue TAP: start fails naming the TAP and the fix.
    let (vm, _dir) = prepared(Some(ns.path())).await;
    add(&vm, "net0", nic(&single, 2)).await.unwrap();
    let text = workspace_tests::error_chain(&vm.start(TIMEOUT).await.unwrap_err());
    assert!(
        text.contains(&single) && text.contains("multi-queue TAP is needed"),
        "{text}"
    );
    vm.cleanup().await.unwrap();
    assert!(tap_exists(&ns, &single), "the runtime's TAP was removed");
    assert_eq!(held(), before, "after two pairs on a single-queue TAP");

    // Two NICs with one MAC; a missing image; an image that cannot be opened for writing
    // (a directory: root ignores file modes). Refused at add_device, nothing kept open.
    let (vm, _dir) = prepared(Some(ns.path())).await;
    add(&vm, "net0", nic(&single, 1)).await.unwrap();
    let err = add(&vm, "net1", nic("dbother0", 1)).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(c) if c.field == "network.guest_mac"),
        "{err:?}"
    );
    let text = workspace_tests::error_chain(&err);
    assert!(
        text.contains("02:db:00:00:00:07") && text.contains("net0"),
        "{text}"
    );
    let err = add(&vm, "blk0", disk(Path::new("/nonexistent/disk.img"), true))
        .await
        .unwrap_err();
    let text = workspace_tests::error_chain(&err);
    assert!(
        matches!(err, Error::Device { .. }) && text.contains("/nonexistent/disk.img"),
        "{text}"
    );
    let err = add(&vm, "blk1", disk(not_a_file.path(), false))
        .await
        .unwrap_err();
    let text = workspace_tests::error_chain(&err);
    assert!(
        matches!(err, Error::Device { .. })
            && text.contains(&not_a_file.path().display().to_string()),
        "{text}"
    );
    // A directory opens read-only, but is no disk image.
    let err = add(&vm, "blk2", disk(not_a_file.path(), true))
        .await
        .unwrap_err();
    let text = workspace_tests::error_chain(&err);
    assert!(
        text.contains("not a regular file or a block device"),
        "{text}"
    );
    // A shared filesystem: unsupported, naming the backend; the capabilities say so.
    let share_dir = tempfile::tempdir().unwrap();
    let share = DeviceConfig::SharedFs(hypervisor::SharedFsConfig::new("t", share_dir.path()));
    let err = add(&vm, "fs0", share).await.unwrap_err();
    let text = workspace_tests::error_chain(&err);
    assert!(
        err.is_unsupported() && text.contains("dragonball") && text.contains("virtio-fs"),
        "{text}"
    );
    let caps = vm.capabilities().await;
    assert!(!caps.shared_fs && !caps.shared_fs_hotplug, "{caps:?}");
    // The refused devices took no window: the good NIC starts alone, and stops cleanly.
    vm.start(TIMEOUT)
        .await
        .expect("start with the one good NIC");
    vm.stop().await.unwrap();
    vm.cleanup().await.unwrap();
    assert_eq!(held(), before, "after refused add_device calls");

    // Through the device manager: a batch whose last device fails is rolled back, the
    // devices already added (a vsock socket, an open image) are dropped before start.
    let (vm, dir) = prepared(Some(ns.path())).await;
    let devices = DeviceManager::new(vm.clone());
    let err = devices
        .add_all(vec![
            DeviceConfig::Vsock(VsockConfig { guest_cid: 3 }),
            disk(img.path(), false),
            disk(Path::new("/nonexistent/disk.img"), true),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Device { .. }), "{err:?}");
    assert!(devices.list().await.is_empty());
    let sockets: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| !p.is_dir())
        .collect();
    assert!(sockets.is_empty(), "left in the run directory: {sockets:?}");
    assert_eq!(held(), before, "after a rolled-back batch, before cleanup");
    // The windows are free again: a good NIC added now starts alone.
    devices.add(nic(&single, 1)).await.unwrap();
    vm.start(TIMEOUT).await.expect("start after the rollback");
    vm.stop().await.unwrap();
    vm.cleanup().await.unwrap();
    assert_eq!(held(), before, "after the rolled-back batch");

    netdev::delete_tap(&single, Some(ns.path())).unwrap();
}

/// Every path under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}
