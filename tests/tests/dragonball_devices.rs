//! The Dragonball backend's virtio-mmio devices with the test guest's drivers: real frames
//! over a real TAP, a host file read and written through virtio-blk, and the host side of
//! hybrid vsock.
//!
//! # How frames cross the TAP
//!
//! The VMM opens the TAP by name (dbs-utils `Tap::open_named`), so the test creates it
//! *persistent* in a private namespace and closes its own fd: a single-queue TAP takes one
//! attached fd, and the VMM's must be it. The test then talks to the TAP's *network
//! interface* with an `AF_PACKET` socket bound to it (ethertype 0x88b5) inside the
//! namespace: what the guest sends, the VMM writes into its TAP fd, the kernel receives on
//! the interface and the packet socket sees it; what the test sends on the packet socket the
//! kernel transmits on the interface, which hands it to the TAP fd the VMM reads. (A second
//! queue of a multi-queue TAP would not do: frames written into any queue fd enter the host
//! stack, never another queue, and the kernel spreads host-to-guest frames over queues.)
#![cfg(feature = "dragonball")]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hypervisor::device::{BlockConfig, BlockDriver, GuestLocation, NetworkConfig, VsockConfig};
use hypervisor::{
    AgentAddress, Device, DeviceConfig, DeviceId, Error, ExitReason, Hypervisor, HypervisorConfig,
    MacAddress, SandboxSpec, VmExit, VmState,
};
use hypervisor_dragonball::{DragonballHypervisor, DragonballOptions};
use workspace_tests::{require_root, test_logger, unique_name};

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const FRAME_TIMEOUT: Duration = Duration::from_secs(20);
const ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x02, 0xdb, 0, 0, 0, 0x01];
const TEST_MAC: [u8; 6] = [0x02, 0xdb, 0, 0, 0, 0xaa];

fn test_guest() -> PathBuf {
    let path = std::env::var_os("TESTGUEST_ELF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/testguest/testguest.elf")
        });
    let path = path.canonicalize().unwrap_or(path);
    assert!(
        path.exists(),
        "the test guest {} is missing: run `make test-guest` first",
        path.display()
    );
    path
}

struct TestVm {
    vm: Arc<DragonballHypervisor>,
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
        let vm = Arc::new(DragonballHypervisor::new(test_logger(), opts));
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
        TestVm { vm, _dir: dir }
    }

    async fn add(
        &self,
        id: &str,
        config: DeviceConfig,
    ) -> hypervisor::Result<hypervisor::DeviceInfo> {
        self.vm
            .add_device(Device {
                id: DeviceId::new(id).unwrap(),
                config,
            })
            .await
    }

    async fn console(&self) -> String {
        let path = self.vm.console_log().await.expect("console log");
        String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
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

/// A persistent TAP in a private namespace, and a packet socket on it.
struct TapNs {
    ns: netdev::NetNs,
    tap: String,
}

impl TapNs {
    fn new() -> TapNs {
        require_root();
        let ns = netdev::NetNs::create(&unique_name("dbn")).expect("creating a namespace");
        let tap = unique_name("dbt");
        let t = netdev::TapBuilder::new(&tap)
            .persist(true)
            .up(true)
            .netns(ns.path())
            .create()
            .expect("creating the TAP");
        // Close our queue: the VMM attaches to the persistent device by name. The link is
        // up already, so the packet socket bound below is not told "network is down".
        drop(t);
        TapNs { ns, tap }
    }

    /// An `AF_PACKET` socket for ethertype 0x88b5 bound to the TAP, with a receive timeout.
    fn packet_socket(&self) -> OwnedFd {
        let tap = self.tap.clone();
        self.ns
            .run(move || packet_socket(&tap))
            .expect("entering the namespace")
            .expect("opening the packet socket")
    }
}

fn packet_socket(ifname: &str) -> std::io::Result<OwnedFd> {
    let proto = ETHERTYPE.to_be();
    // SAFETY: plain socket(2) call; the result is checked and owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let index = nix::net::if_::if_nametoindex(ifname).map_err(std::io::Error::from)?;
    // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: FRAME_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval; the pointer and length describe `tv`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Receives one frame (blocking, up to the socket's timeout) on a blocking thread.
async fn recv_frame(sock: &Arc<OwnedFd>) -> Vec<u8> {
    let sock = sock.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 2048];
        // SAFETY: recv(2) into a buffer we own, of the length given.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(
            n >= 0,
            "no frame on the TAP within {FRAME_TIMEOUT:?}: {}",
            std::io::Error::last_os_error()
        );
        buf.truncate(n as usize);
        buf
    })
    .await
    .unwrap()
}

fn send_frame(sock: &OwnedFd, frame: &[u8]) {
    // SAFETY: send(2) of a buffer we own, of the length given, on a bound packet socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        n,
        frame.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// The error and its sources, one per line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push('\n');
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

fn nic(tap: &str) -> DeviceConfig {
    DeviceConfig::Network(NetworkConfig::tap(tap, MacAddress(GUEST_MAC)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_frames_cross_a_real_tap_and_the_guest_echoes_ours() {
    let tn = TapNs::new();
    let sock = Arc::new(tn.packet_socket());
    let t = TestVm::prepared(
        &["testguest.action=net_echo"],
        Some(tn.ns.path().to_path_buf()),
    )
    .await;
    let info = t.add("net0", nic(&tn.tap)).await.expect("add the NIC");
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
    let hello = recv_frame(&sock).await;
    assert_eq!(&hello[..6], &[0xff; 6], "{hello:02x?}");
    assert_eq!(&hello[6..12], &GUEST_MAC);
    assert_eq!(&hello[12..14], &ETHERTYPE.to_be_bytes());
    assert_eq!(&hello[14..], b"testguest hello");

    // One frame to the guest; it comes back with the addresses swapped.
    let payload = format!("echo me {}", unique_name("p"));
    let mut frame = Vec::new();
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&TEST_MAC);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(payload.as_bytes());
    send_frame(&sock, &frame);
    let echo = recv_frame(&sock).await;
    assert_eq!(&echo[..6], &TEST_MAC, "{echo:02x?}");
    assert_eq!(&echo[6..12], &GUEST_MAC);
    assert_eq!(&echo[12..14], &ETHERTYPE.to_be_bytes());
    assert_eq!(&echo[14..], payload.as_bytes());

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
async fn a_missing_tap_fails_start_and_is_not_created() {
    require_root();
    let ns = netdev::NetNs::create(&unique_name("dbn")).unwrap();
    let t = TestVm::prepared(
        &["testguest.action=net_echo"],
        Some(ns.path().to_path_buf()),
    )
    .await;
    t.add("net0", nic("dbnotap0"))
        .await
        .expect("added: the TAP is checked at start");
    let err = t.vm.start(BOOT_TIMEOUT).await.unwrap_err();
    let chain = error_chain(&err);
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
    t.add("net0", nic("dbtapa")).await.unwrap();
    let err = t.add("net1", nic("dbtapb")).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(c) if c.field == "network.guest_mac"),
        "{err:?}"
    );
    let caps = t.vm.capabilities().await;
    assert!(!caps.network_hotplug && !caps.block_hotplug && !caps.multi_queue && caps.vsock);
    t.vm.cleanup().await.unwrap();

    let t = TestVm::prepared(&["testguest.action=hlt_forever"], None).await;
    t.vm.start(BOOT_TIMEOUT).await.unwrap();
    let err = t.add("net0", nic("dbtapa")).await.unwrap_err();
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
    let info = t.add("blk0", disk(img.path(), true)).await.unwrap();
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
        t.add("blk0", disk(img.path(), read_only)).await.unwrap();
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
        .add("blk0", disk(Path::new("/nonexistent/disk.img"), true))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Device { .. }), "{err:?}");
    // Read-write on a file opened read-only by permission: root ignores modes, so use a
    // directory, which no one can open for writing.
    let dir = tempfile::tempdir().unwrap();
    let err = t.add("blk1", disk(dir.path(), false)).await.unwrap_err();
    assert!(matches!(err, Error::Device { .. }), "{err:?}");
    t.vm.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_vsock_is_the_agent_address_and_its_socket_answers_connect() {
    let t = TestVm::prepared(&["testguest.action=hlt_forever"], None).await;
    let err = t.vm.agent_address().await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    t.add("vsock0", DeviceConfig::Vsock(VsockConfig { guest_cid: 3 }))
        .await
        .unwrap();
    let AgentAddress::HybridVsock { path, port } = t.vm.agent_address().await.unwrap() else {
        panic!("expected hybrid vsock");
    };
    assert_eq!(port, 1024);
    assert!(path.exists(), "{}", path.display());
    let err = t
        .add("vsock1", DeviceConfig::Vsock(VsockConfig { guest_cid: 4 }))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    t.vm.start(BOOT_TIMEOUT).await.unwrap();

    // A bad line is answered by closing the connection.
    let mut bad = std::os::unix::net::UnixStream::connect(&path).unwrap();
    bad.set_read_timeout(Some(FRAME_TIMEOUT)).unwrap();
    bad.write_all(b"HELLO 1024\n").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        bad.read(&mut buf).unwrap(),
        0,
        "a bad command must be refused"
    );

    // A good one is accepted and waits for the guest (which has no vsock driver).
    let mut good = std::os::unix::net::UnixStream::connect(&path).unwrap();
    good.write_all(b"CONNECT 1024\n").unwrap();
    good.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let e = good.read(&mut buf).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    t.vm.cleanup().await.unwrap();
    assert!(!path.exists(), "the vsock socket outlived the VM");
}
