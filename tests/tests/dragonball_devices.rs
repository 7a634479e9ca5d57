//! The Dragonball backend's virtio-mmio devices with the test guest's drivers: real frames
//! over a real TAP, a host file read and written through virtio-blk, and the host side of
//! hybrid vsock.
//!
//! # How frames cross the TAP
//!
//! The VMM opens its TAP by name (dbs-utils `Tap::open_named`), so the test creates it
//! *persistent* in a private namespace and closes its own fds. The test's end is a second
//! TAP in that namespace, a *peer* whose queue fd the test keeps and drives with `netdev`'s
//! async I/O (`AsyncTapQueue`); `tc` `mirred` filters on both ingress sides connect the two
//! interfaces. What the guest sends, the VMM writes into its TAP fd, the kernel receives on
//! the VMM's interface and redirects out of the peer, whose queue fd the test reads; what
//! the test writes into the peer's fd the kernel redirects out of the VMM's interface, to
//! the VMM's fd. (The test cannot instead hold a queue of the VMM's own TAP: a frame
//! written into any queue fd enters the host stack, never another queue.)
#![cfg(feature = "dragonball")]

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hypervisor::device::{BlockConfig, BlockDriver, GuestLocation, NetworkConfig, VsockConfig};
use hypervisor::{
    AgentAddress, DeviceConfig, DeviceManager, Error, ExitReason, Hypervisor, HypervisorConfig,
    MacAddress, SandboxSpec, Vm, VmExit, VmState,
};
use hypervisor_dragonball::{Dragonball, DragonballHypervisor, DragonballOptions};
use workspace_tests::{require_root, test_guest, test_logger, unique_name};

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const FRAME_TIMEOUT: Duration = Duration::from_secs(20);
const ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x02, 0xdb, 0, 0, 0, 0x01];
const TEST_MAC: [u8; 6] = [0x02, 0xdb, 0, 0, 0, 0xaa];

struct TestVm {
    vm: Arc<DragonballHypervisor>,
    /// Every device goes through the manager, which decides cold or hot plug.
    devices: DeviceManager,
    _dir: tempfile::TempDir,
}

impl TestVm {
    async fn prepared(params: &[&str], netns: Option<PathBuf>) -> TestVm {
        assert!(
            Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: the Dragonball backend runs guests on KVM only"
        );
        let dir = tempfile::tempdir().unwrap();
        let opts = DragonballOptions {
            run_root: dir.path().to_path_buf(),
            ..Default::default()
        };
        let vm = Arc::new(Vm::new(Dragonball::new(test_logger(), opts)));
        let spec = SandboxSpec {
            id: unique_name("dbd"),
            netns,
            config: HypervisorConfig {
                kernel: test_guest(),
                kernel_params: params.iter().map(|s| s.to_string()).collect(),
                memory_mib: 64,
                vcpus: 1,
                ..Default::default()
            },
        };
        vm.prepare(&spec).await.expect("prepare");
        TestVm {
            devices: DeviceManager::new(vm.clone()),
            vm,
            _dir: dir,
        }
    }

    /// Adds a device through the manager (ids `net0`, `blk0`, ... in order).
    async fn add(&self, config: DeviceConfig) -> hypervisor::Result<hypervisor::DeviceInfo> {
        self.devices.add(config).await
    }

    async fn console(&self) -> String {
        let path = self.vm.console_log().await.expect("console log");
        String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
    }

    /// Waits for a console line containing `marker`.
    async fn wait_console(&self, marker: &str) {
        let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
        loop {
            let console = self.console().await;
            if console.lines().any(|l| l.contains(marker)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {marker:?} on the console within {FRAME_TIMEOUT:?}:\n{console}"
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

    /// Runs the guest to its power-off and returns the console.
    async fn run_to_shutdown(&self) -> String {
        self.vm.start(BOOT_TIMEOUT).await.expect("start");
        let exit = self.wait_exit().await;
        let console = self.console().await;
        assert_eq!(
            exit.reason,
            ExitReason::GuestShutdown,
            "{exit}; console:\n{console}"
        );
        console
    }
}

/// The VMM's persistent TAP and the test's peer TAP, joined by `tc` redirects in a private
/// namespace.
struct TapNs {
    ns: netdev::NetNs,
    tap: String,
    peer: netdev::AsyncTapQueue,
}

impl TapNs {
    /// A single-queue TAP for the VMM (`pairs` 1) or a multi-queue one.
    fn new(pairs: usize) -> TapNs {
        require_root();
        let ns = netdev::NetNs::create(&unique_name("dbn")).expect("creating a namespace");
        let tap = unique_name("dbt");
        let t = netdev::TapBuilder::new(&tap)
            .multi_queue(pairs > 1)
            .persist(true)
            .up(true)
            .netns(ns.path())
            .create()
            .expect("creating the TAP");
        // Close our queue: the VMM attaches to the persistent device by name.
        drop(t);
        let peer_name = unique_name("dbp");
        let peer = netdev::TapBuilder::new(&peer_name)
            .vnet_hdr(None)
            .up(true)
            .nonblocking(true)
            .netns(ns.path())
            .create()
            .expect("creating the peer TAP");
        for (from, to) in [(&tap, &peer_name), (&peer_name, &tap)] {
            tc(&ns, &["qdisc", "add", "dev", from, "ingress"]);
            tc(
                &ns,
                &[
                    "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                    "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
                ],
            );
        }
        let fd = peer.into_queues().pop().expect("one queue");
        let peer = netdev::AsyncTapQueue::new(fd).expect("async peer queue");
        TapNs { ns, tap, peer }
    }

    /// The next frame with our ethertype that leaves the VMM's TAP (others, such as IPv6
    /// neighbour discovery, are skipped).
    async fn recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        loop {
            let n = tokio::time::timeout(FRAME_TIMEOUT, self.peer.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no frame on the TAP within {FRAME_TIMEOUT:?}"))
                .expect("reading the peer TAP");
            if n >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes() {
                return buf[..n].to_vec();
            }
        }
    }

    /// Sends `frame` into the VMM's TAP (out of its interface, to the guest).
    async fn send(&self, frame: &[u8]) {
        let n = self.peer.send(frame).await.expect("writing the peer TAP");
        assert_eq!(n, frame.len());
    }

    /// The VMM TAP's offload features as `ethtool -k` shows them (name, on).
    fn offloads(&self) -> Vec<(String, bool)> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", self.ns.name(), "ethtool", "-k", &self.tap])
            .output()
            .expect("running ethtool (install the ethtool package)");
        assert!(out.status.success(), "ethtool -k: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (name, value) = l.trim().split_once(": ")?;
                Some((name.to_string(), value.starts_with("on")))
            })
            .collect()
    }

    /// Whether `ethtool -k` shows each of `features` as `on`.
    fn offloads_on(&self, features: &[&str]) -> Vec<bool> {
        let all = self.offloads();
        features
            .iter()
            .map(|f| {
                all.iter()
                    .find(|(n, _)| n == f)
                    .unwrap_or_else(|| panic!("ethtool -k shows no {f}: {all:?}"))
                    .1
            })
            .collect()
    }
}

/// Runs `tc -n NS ARGS`, which must succeed.
fn tc(ns: &netdev::NetNs, args: &[&str]) {
    let out = std::process::Command::new("tc")
        .arg("-n")
        .arg(ns.name())
        .args(args)
        .output()
        .expect("running tc (install iproute2)");
    assert!(out.status.success(), "tc {args:?}: {out:?}");
}

/// A frame from us to the guest with `payload`.
fn frame_to_guest(payload: &str) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&TEST_MAC);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(payload.as_bytes());
    frame
}

/// Checks that `echo` is `payload` sent back by the guest with the addresses swapped.
fn assert_echo(echo: &[u8], payload: &str) {
    assert_eq!(&echo[..6], &TEST_MAC, "{echo:02x?}");
    assert_eq!(&echo[6..12], &GUEST_MAC);
    assert_eq!(&echo[12..14], &ETHERTYPE.to_be_bytes());
    assert_eq!(&echo[14..], payload.as_bytes());
}

/// Checks that `hello` is the guest's broadcast hello with `payload`.
fn assert_hello(hello: &[u8], payload: &[u8]) {
    assert_eq!(&hello[..6], &[0xff; 6], "{hello:02x?}");
    assert_eq!(&hello[6..12], &GUEST_MAC);
    assert_eq!(&hello[12..14], &ETHERTYPE.to_be_bytes());
    assert_eq!(&hello[14..], payload);
}

/// The TAP offloads that follow the guest's GUEST_CSUM / GUEST_TSO4 / GUEST_TSO6 /
/// GUEST_ECN (`TUN_F_CSUM`, `TUN_F_TSO4`, `TUN_F_TSO6`, `TUN_F_TSO_ECN`).
const GUEST_OFFLOADS: [&str; 4] = [
    "tx-checksum-ip-generic",
    "tx-tcp-segmentation",
    "tx-tcp6-segmentation",
    "tx-tcp-ecn-segmentation",
];

fn nic(tap: &str) -> DeviceConfig {
    DeviceConfig::Network(NetworkConfig::tap(tap, MacAddress(GUEST_MAC)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_frames_cross_a_real_tap_and_the_guest_echoes_ours() {
    let tn = TapNs::new(1);
    let t = TestVm::prepared(
        &["testguest.action=net_echo"],
        Some(tn.ns.path().to_path_buf()),
    )
    .await;
    let info = t.add(nic(&tn.tap)).await.expect("add the NIC");
    assert_eq!(
        info.location,
        GuestLocation::Mmio {
            base: 0xc000_0000,
            size: 0x1000,
            irq: Some(5)
        }
    );
    assert_eq!(
        (info.mac, info.queue_pairs),
        (Some(MacAddress(GUEST_MAC)), Some(1))
    );
    t.vm.start(BOOT_TIMEOUT).await.expect("start");

    // The guest's hello: broadcast, from its MAC, our ethertype and payload.
    assert_hello(&tn.recv().await, b"testguest hello");
    // The guest acknowledged no offload: the TAP hands it none.
    assert_eq!(
        tn.offloads_on(&GUEST_OFFLOADS),
        [false; 4],
        "{:?}",
        tn.offloads()
    );

    // One frame to the guest; it comes back with the addresses swapped.
    let payload = format!("echo me {}", unique_name("p"));
    tn.send(&frame_to_guest(&payload)).await;
    assert_echo(&tn.recv().await, &payload);

    let exit = t.wait_exit().await;
    let console = t.console().await;
    assert_eq!(exit.reason, ExitReason::GuestShutdown, "{console}");
    assert!(
        console.contains("testguest: net: mac=02:db:00:00:00:01"),
        "{console}"
    );
    assert!(console.contains("testguest: net_echo done"), "{console}");
    t.vm.cleanup().await.unwrap();
    // The VMM detached; the TAP (ours) is still there and no one holds it.
    let tap = tn.tap.clone();
    let exists = tn
        .ns
        .run(move || nix::net::if_::if_nametoindex(tap.as_str()).is_ok())
        .unwrap();
    assert!(exists, "the test's TAP disappeared");
    netdev::delete_tap(&tn.tap, Some(tn.ns.path())).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloads_the_guest_acknowledges_are_set_on_the_tap() {
    let tn = TapNs::new(1);
    let t = TestVm::prepared(
        &["testguest.action=net_echo", "testguest.net_offloads=1"],
        Some(tn.ns.path().to_path_buf()),
    )
    .await;
    t.add(nic(&tn.tap)).await.expect("add the NIC");
    assert_eq!(
        tn.offloads_on(&GUEST_OFFLOADS),
        [false; 4],
        "before start: {:?}",
        tn.offloads()
    );
    t.vm.start(BOOT_TIMEOUT).await.expect("start");
    // The hello follows DRIVER_OK, so the device is active and its offloads are set.
    assert_hello(&tn.recv().await, b"testguest hello");
    assert_eq!(
        tn.offloads_on(&GUEST_OFFLOADS),
        [true; 4],
        "{:?}",
        tn.offloads()
    );
    let payload = format!("offloads {}", unique_name("p"));
    tn.send(&frame_to_guest(&payload)).await;
    assert_echo(&tn.recv().await, &payload);
    let exit = t.wait_exit().await;
    let console = t.console().await;
    assert_eq!(exit.reason, ExitReason::GuestShutdown, "{console}");
    // MAC (bit 5) and the four GUEST_* offloads (bits 1, 7, 8, 9).
    assert_eq!(
        console_value(&console, "testguest: net: features="),
        "0x3a2"
    );
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_queue_pairs_carry_a_frame_each_and_the_guest_echoes_on_either() {
    let tn = TapNs::new(2);
    let t = TestVm::prepared(
        &[
            "testguest.action=net_echo",
            "testguest.net_pairs=2",
            "testguest.net_echoes=2",
        ],
        Some(tn.ns.path().to_path_buf()),
    )
    .await;
    let mut config = NetworkConfig::tap(&tn.tap, MacAddress(GUEST_MAC));
    config.queue_pairs = 2;
    let info = t
        .add(DeviceConfig::Network(config))
        .await
        .expect("add the NIC");
    assert_eq!(info.queue_pairs, Some(2));
    assert!(t.vm.capabilities().await.multi_queue);
    t.vm.start(BOOT_TIMEOUT).await.expect("start");

    // One hello per TX queue, in order: pair 0's, then pair 1's.
    assert_hello(&tn.recv().await, b"testguest hello");
    assert_hello(&tn.recv().await, b"testguest hello q1");
    // Two frames to the guest; the TAP picks the queue, the guest echoes on that pair.
    for n in 0..2 {
        let payload = format!("mq echo {n} {}", unique_name("p"));
        tn.send(&frame_to_guest(&payload)).await;
        assert_echo(&tn.recv().await, &payload);
    }
    let exit = t.wait_exit().await;
    let console = t.console().await;
    assert_eq!(exit.reason, ExitReason::GuestShutdown, "{console}");
    for line in [
        "testguest: net: max_virtqueue_pairs=2",
        "testguest: net: pairs=2 ack=0",
        "testguest: net: sent hello on tx0",
        "testguest: net: sent hello on tx1",
        "testguest: net_echo done",
    ] {
        assert!(console.contains(line), "no {line:?} in:\n{console}");
    }
    // The TAP steers a flow to the queue that last sent it (tun's automatic flow steering),
    // here pair 1's, whose hello went last; it never picks a detached queue. So both frames
    // arriving on rx1 shows VQ_PAIRS_SET attached pair 1's TAP queue.
    let on_rx1 = console
        .lines()
        .filter(|l| l.starts_with("testguest: net: received frame") && l.contains(" on rx1 "))
        .count();
    assert_eq!(on_rx1, 2, "{console}");
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_queue_pairs_on_a_single_queue_tap_fail_start_clearly() {
    let tn = TapNs::new(1);
    let t = TestVm::prepared(
        &["testguest.action=net_echo", "testguest.net_pairs=2"],
        Some(tn.ns.path().to_path_buf()),
    )
    .await;
    let mut config = NetworkConfig::tap(&tn.tap, MacAddress(GUEST_MAC));
    config.queue_pairs = 2;
    t.add(DeviceConfig::Network(config)).await.unwrap();
    let err = t.vm.start(BOOT_TIMEOUT).await.unwrap_err();
    let chain = workspace_tests::error_chain(&err);
    assert!(chain.contains("multi-queue TAP is needed"), "{chain}");
    assert!(chain.contains(&tn.tap), "{chain}");
    assert_eq!(t.vm.state().await, VmState::Stopped);
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tap_fails_start_and_is_not_created() {
    require_root();
    let ns = netdev::NetNs::create(&unique_name("dbn")).unwrap();
    let t = TestVm::prepared(
        &["testguest.action=net_echo"],
        Some(ns.path().to_path_buf()),
    )
    .await;
    t.add(nic("dbnotap0"))
        .await
        .expect("added: the TAP is checked at start");
    let err = t.vm.start(BOOT_TIMEOUT).await.unwrap_err();
    let chain = workspace_tests::error_chain(&err);
    assert!(chain.contains("\"dbnotap0\" does not exist"), "{chain}");
    assert_eq!(t.vm.state().await, VmState::Stopped);
    assert!(matches!(t.wait_exit().await.reason, ExitReason::Crashed(_)));
    let created = ns
        .run(|| nix::net::if_::if_nametoindex("dbnotap0").is_ok())
        .unwrap();
    assert!(!created, "start created the missing TAP");
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nics_with_one_mac_and_hotplug_after_start_are_refused() {
    let t = TestVm::prepared(&["testguest.action=hlt_forever"], None).await;
    t.add(nic("dbtapa")).await.unwrap();
    let err = t.add(nic("dbtapb")).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(c) if c.field == "network.guest_mac"),
        "{err:?}"
    );
    let caps = t.vm.capabilities().await;
    assert!(!caps.network_hotplug && !caps.block_hotplug && caps.multi_queue && caps.vsock);
    t.vm.cleanup().await.unwrap();

    let t = TestVm::prepared(&["testguest.action=hlt_forever"], None).await;
    t.vm.start(BOOT_TIMEOUT).await.unwrap();
    let err = t.add(nic("dbtapa")).await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    t.vm.cleanup().await.unwrap();
}

/// An image of `sectors` sectors whose bytes are a function of their offset.
fn image(sectors: usize) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..sectors * 512)
        .map(|i| ((i * 31) ^ (i >> 9)) as u8)
        .collect();
    f.write_all(&data).unwrap();
    f
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn disk(path: &Path, read_only: bool) -> DeviceConfig {
    DeviceConfig::Block(BlockConfig {
        path: path.to_path_buf(),
        read_only,
        driver: BlockDriver::VirtioBlkMmio,
    })
}

fn console_value<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{console}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_reads_a_host_file_and_its_checksum_matches() {
    let img = image(16);
    let t = TestVm::prepared(&["testguest.action=blk", "testguest.blk_sectors=8"], None).await;
    let info = t.add(disk(img.path(), true)).await.unwrap();
    assert_eq!(info.host.as_deref(), Some(img.path().to_str().unwrap()));
    let console = t.run_to_shutdown().await;
    let mut data = vec![0u8; 8 * 512];
    img.as_file().read_exact_at(&mut data, 0).unwrap();
    assert_eq!(console_value(&console, "testguest: blk: capacity="), "16");
    assert_eq!(
        console_value(&console, "testguest: blk: fnv1a="),
        format!("{:x}", fnv1a(&data))
    );
    assert_eq!(console_value(&console, "testguest: blk: id="), "blk0");
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_write_reaches_a_read_write_file_and_a_read_only_one_refuses_it() {
    let expected: Vec<u8> = (0..512).map(|i| (i * 7 + 3) as u8).collect();
    for read_only in [false, true] {
        let img = image(8);
        let before = std::fs::read(img.path()).unwrap();
        let t = TestVm::prepared(&["testguest.action=blk", "testguest.blk_write=5"], None).await;
        t.add(disk(img.path(), read_only)).await.unwrap();
        let console = t.run_to_shutdown().await;
        let after = std::fs::read(img.path()).unwrap();
        let status = console_value(&console, "testguest: blk: write status=");
        if read_only {
            assert_eq!(status, "1", "VIRTIO_BLK_S_IOERR expected:\n{console}");
            assert_eq!(after, before, "a read-only image changed");
        } else {
            assert_eq!(status, "0", "{console}");
            assert_eq!(&after[5 * 512..6 * 512], &expected[..]);
            assert_eq!(&after[..5 * 512], &before[..5 * 512]);
            assert_eq!(&after[6 * 512..], &before[6 * 512..]);
        }
        t.vm.cleanup().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unreadable_block_images_fail_add_device() {
    let t = TestVm::prepared(&[], None).await;
    let err = t
        .add(disk(Path::new("/nonexistent/disk.img"), true))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Device { .. }), "{err:?}");
    // Read-write on a file opened read-only by permission: root ignores modes, so use a
    // directory, which no one can open for writing.
    let dir = tempfile::tempdir().unwrap();
    let err = t.add(disk(dir.path(), false)).await.unwrap_err();
    assert!(matches!(err, Error::Device { .. }), "{err:?}");
    t.vm.cleanup().await.unwrap();
}

/// Reads one `\n`-terminated line (or what came before EOF).
fn read_line(stream: &mut std::os::unix::net::UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 {
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Whether the device closed `stream` (EOF, or a reset when it closed with our bytes
/// unread) without writing anything.
fn closed_without_answer(stream: &mut std::os::unix::net::UnixStream) -> bool {
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn vsock_client(path: &Path) -> std::os::unix::net::UnixStream {
    let s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(FRAME_TIMEOUT)).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_vsock_connects_host_clients_to_the_guest_and_refuses_bad_ones() {
    let t = TestVm::prepared(&["testguest.action=vsock"], None).await;
    let err = t.vm.agent_address().await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    t.add(DeviceConfig::Vsock(VsockConfig { guest_cid: 3 }))
        .await
        .unwrap();
    let AgentAddress::HybridVsock { path, port } = t.vm.agent_address().await.unwrap() else {
        panic!("expected hybrid vsock");
    };
    assert_eq!(port, 1024);
    assert!(path.exists(), "{}", path.display());
    let err = t
        .add(DeviceConfig::Vsock(VsockConfig { guest_cid: 4 }))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    t.vm.start(BOOT_TIMEOUT).await.unwrap();
    t.wait_console("testguest: vsock: cid=3 listening on port 1024")
        .await;

    // A line that is not CONNECT <port> is answered by closing the connection, and never
    // reaches the guest (checked below: it saw exactly two requests).
    let mut bad = vsock_client(&path);
    bad.write_all(b"HELLO 1024\n").unwrap();
    assert!(
        closed_without_answer(&mut bad),
        "a bad command must be refused"
    );

    // CONNECT to the port the guest listens on: OK <local port>, then a byte stream.
    let mut good = vsock_client(&path);
    good.write_all(b"CONNECT 1024\n").unwrap();
    let ok = read_line(&mut good).unwrap();
    let local: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("expected OK <port>, got {ok:?}"));
    t.wait_console(&format!(
        "testguest: vsock: accepted port 1024 from 2:{local}"
    ))
    .await;
    good.write_all(b"ping").unwrap();
    let mut echo = [0u8; 4];
    good.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");
    t.wait_console(&format!("testguest: vsock: got 4 bytes from 2:{local}"))
        .await;

    // CONNECT to a port nobody listens on: the guest resets it, the client sees EOF.
    let mut nobody = vsock_client(&path);
    nobody.write_all(b"CONNECT 4000\n").unwrap();
    assert!(
        closed_without_answer(&mut nobody),
        "a refused connection must be closed"
    );
    t.wait_console("testguest: vsock: refused port 4000 from 2:")
        .await;

    // The host client closing resets the guest's side of the connection.
    drop(good);
    t.wait_console(&format!("testguest: vsock: reset by 2:{local}"))
        .await;

    let console = t.console().await;
    let requests = console
        .lines()
        .filter(|l| {
            l.starts_with("testguest: vsock: accepted")
                || l.starts_with("testguest: vsock: refused")
        })
        .count();
    assert_eq!(requests, 2, "{console}");
    t.vm.cleanup().await.unwrap();
    assert!(!path.exists(), "the vsock socket outlived the VM");
}
