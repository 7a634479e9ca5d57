//! Real QEMU guests through the `Hypervisor` trait (TCG where KVM is not really usable).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hypervisor::{
    Accelerator, Device, DeviceConfig, DeviceId, Error, Hypervisor, HypervisorConfig, PlugMode,
    SandboxSpec,
};
use hypervisor_qemu::qmp::QmpError;
use hypervisor_qemu::QemuVm;
use serde_json::json;
use workspace_tests::qemu::{block_nodes, device_ids, hmp, Kept, Qemu};
use workspace_tests::{fd_targets, scenarios, test_logger, Backend, GuestAssets, Sandbox};

const QEMU: Qemu = Qemu::Q35;

/// Writes a 1 MiB file with a known pattern and returns its sha256.
fn pattern_image(path: &Path) -> Result<String> {
    let pattern: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 24) as u8)
        .collect();
    std::fs::write(path, &pattern)?;
    let out = workspace_tests::run("sha256sum", &[path.to_str().context("UTF-8 path")?])?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

async fn guest_exec(sb: &mut Sandbox, argv: &[&str]) -> Result<String> {
    Ok(sb.guest_ok(argv).await?.trim().to_string())
}

/// The configuration's `image` is the guest's first disk, read-only, with the host's bytes.
async fn image_is_the_first_read_only_disk(sb: &mut Sandbox, sha256: &str) -> Result<()> {
    let ro = guest_exec(sb, &["cat", "/sys/block/vda/ro"]).await?;
    ensure!(
        ro == "1",
        "/sys/block/vda/ro is {ro:?}: the image is writable"
    );
    let sum = guest_exec(sb, &["sha256sum", "/dev/vda"]).await?;
    ensure!(
        sum.split_whitespace().next() == Some(sha256),
        "the guest read {sum} from /dev/vda, the image is {sha256}"
    );
    Ok(())
}

/// Makes `fd` survive `exec`, as a careless runtime's fds would.
fn inheritable(fd: &impl AsRawFd) -> Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl(F_SETFD) on a descriptor this test owns changes only its flags.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    ensure!(rc == 0, "fcntl: {}", std::io::Error::last_os_error());
    // SAFETY: as above, F_GETFD only reads the flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    ensure!(
        flags & libc::FD_CLOEXEC == 0,
        "fd {fd} is still close-on-exec"
    );
    Ok(())
}

/// Inodes of the Unix sockets of the network namespaces of `pid` and of this process, with
/// their bound paths. (A socket is listed in the namespace it was created in: the backend
/// binds QEMU's sockets before QEMU enters the sandbox's namespace.)
fn unix_socket_paths(pid: u32) -> Result<HashMap<u64, String>> {
    let mut paths = HashMap::new();
    for table in [
        format!("/proc/{pid}/net/unix"),
        "/proc/self/net/unix".into(),
    ] {
        let table = std::fs::read_to_string(table)?;
        paths.extend(table.lines().skip(1).filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(6)?.parse().ok()?, f.get(7).unwrap_or(&"").to_string()))
        }));
    }
    Ok(paths)
}

/// `/dev/net/tun` fds QEMU holds: one per TAP queue.
fn tun_fds(pid: u32) -> Result<usize> {
    Ok(fd_targets(pid)?
        .iter()
        .filter(|(_, t)| t == "/dev/net/tun")
        .count())
}

/// What QEMU may hold, beside what it opens for itself.
struct Intended<'a> {
    run_dir: &'a Path,
    queues: usize,
    image: &'a Path,
}

/// QEMU's whole fd table is what it was meant to have: stdin on /dev/null and its output on
/// pipes; exactly one `/dev/net/tun` fd per TAP queue (and one vhost-net fd per queue when
/// the host has vhost-net); Unix sockets only at its run directory's QMP and agent paths
/// (listening, and the connections to them); the console log and the image; and the kinds
/// QEMU creates itself (eventfd, signalfd and other anonymous inodes, `/dev/null`, KVM).
/// Anything else, such as the test's inheritable marker file or socket, is a leak.
fn qemu_holds_exactly_its_fds(pid: u32, want: &Intended<'_>) -> Result<()> {
    let fds = fd_targets(pid)?;
    let sockets = unix_socket_paths(pid)?;
    let qmp = want.run_dir.join("qmp.sock").display().to_string();
    let agent = want.run_dir.join("agent.sock").display().to_string();
    let console = want.run_dir.join("console.log").display().to_string();
    let image = want.image.display().to_string();
    let vhost = hypervisor_qemu::host::HostFeatures::probe().vhost_net;
    let (mut tun, mut vhost_net, mut socket_paths) = (0, 0, Vec::new());
    let mut unexpected = Vec::new();
    for (n, target) in &fds {
        let t = target.as_str();
        match (n, t) {
            (0, "/dev/null") => {}
            (1 | 2, t) if t.starts_with("pipe:") => {}
            (0..=2, _) => unexpected.push((n, t)),
            (_, "/dev/net/tun") => tun += 1,
            (_, "/dev/vhost-net") if vhost => vhost_net += 1,
            (_, "/dev/null" | "/dev/kvm") => {}
            (_, t) if t.starts_with("anon_inode:") => {}
            (_, t) if t.starts_with("socket:[") => {
                let inode: u64 = t
                    .trim_start_matches("socket:[")
                    .trim_end_matches(']')
                    .parse()?;
                match sockets.get(&inode) {
                    Some(p) if *p == qmp || *p == agent => socket_paths.push(p.clone()),
                    _ => unexpected.push((n, t)),
                }
            }
            (_, t) if t == console || t == image => {}
            _ => unexpected.push((n, t)),
        }
    }
    ensure!(
        unexpected.is_empty(),
        "QEMU holds fds it was not meant to have: {unexpected:?}; all: {fds:?}"
    );
    ensure!(
        tun == want.queues,
        "QEMU holds {tun} TAP fds, expected {}: {fds:?}",
        want.queues
    );
    ensure!(
        vhost_net == if vhost { want.queues } else { 0 },
        "QEMU holds {vhost_net} vhost-net fds: {fds:?}"
    );
    for path in [&qmp, &agent] {
        ensure!(
            socket_paths.contains(path),
            "QEMU holds no socket at {path}: {fds:?}"
        );
    }
    for path in [&console, &image] {
        ensure!(
            fds.iter().any(|(_, t)| t == path),
            "QEMU does not hold {path}: {fds:?}"
        );
    }
    Ok(())
}

/// The fd check can fail: a child holding an inherited file and socket is flagged, naming
/// them.
#[test]
fn the_fd_check_flags_inherited_fds() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker-not-for-the-vmm");
    let file = std::fs::File::create(&marker).unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    inheritable(&file).unwrap();
    inheritable(&a).unwrap();
    let socket = std::fs::read_link(format!("/proc/self/fd/{}", a.as_raw_fd())).unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let verdict = qemu_holds_exactly_its_fds(
        child.id(),
        &Intended {
            run_dir: dir.path(),
            queues: 0,
            image: Path::new("/nonexistent"),
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let err = verdict.expect_err("a child with inherited fds passed the check");
    let text = format!("{err}");
    let unexpected = text.split("; all:").next().unwrap_or_default();
    assert!(unexpected.contains(&marker.display().to_string()), "{text}");
    assert!(unexpected.contains(&socket.display().to_string()), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q35_guest_answers_ping_and_agent_sees_two_queue_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rootfs.img");
    pattern_image(&image).unwrap();
    // Fds a runtime might hold without close-on-exec when it starts a VM: they must not
    // reach QEMU.
    let marker = dir.path().join("marker-not-for-the-vmm");
    let marker_file = OwnedFd::from(std::fs::File::create(&marker).unwrap());
    let (marker_a, marker_b) = UnixStream::pair().unwrap();
    for fd in [&marker_file as &dyn AsRawFd, &marker_a, &marker_b] {
        inheritable(&fd.as_raw_fd()).unwrap();
    }
    let marker_sockets: Vec<String> = [&marker_a, &marker_b]
        .iter()
        .map(|s| {
            std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd()))
                .unwrap()
                .display()
                .to_string()
        })
        .collect();

    let backend = Kept::new(Qemu {
        image: Some(image.clone()),
        ..Qemu::Q35
    });
    scenarios::boot_ping_and_agent(&backend, 2, &|pid, _nic| {
        let fds = fd_targets(pid)?;
        let leaked: Vec<_> = fds
            .iter()
            .filter(|(_, t)| Path::new(t) == marker || marker_sockets.contains(t))
            .collect();
        ensure!(
            leaked.is_empty(),
            "the test's inheritable fds leaked into QEMU: {leaked:?}"
        );
        let run_root = backend.run_root();
        let run_dir = std::fs::read_dir(&run_root)?
            .next()
            .context("no run directory")??
            .path();
        qemu_holds_exactly_its_fds(
            pid,
            &Intended {
                run_dir: &run_dir,
                queues: 2,
                image: &image,
            },
        )?;
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

/// A configured console log gets the guest's console (its boot and its power-off) and is the
/// user's: cleanup removes the run directory and keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_console_log_gets_the_console_and_outlives_cleanup() {
    let assets = GuestAssets::find();
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("guest-console.log");
    let config = HypervisorConfig {
        console_log: Some(path.clone()),
        ..QEMU.config(&assets)
    };
    let mut sb = Sandbox::prepare(&QEMU, config).await.unwrap();
    assert_eq!(sb.hv.console_log().await.as_deref(), Some(path.as_path()));
    sb.start().await.unwrap();
    let pid = sb.hv.pids().await.unwrap().vmm;
    // Teardown checks that no process, run directory or TAP is left.
    sb.teardown(Some(pid)).await.unwrap();
    let console = std::fs::read_to_string(&path).unwrap();
    assert!(console.contains("Linux version"), "{console}");
    assert!(console.contains("reboot: Power down"), "{console}");
}

/// microvm (virtio-mmio): a 2-queue NIC shows 2 queue pairs in the guest, the image is a
/// read-only `virtio-blk-device`, and hotplug is refused with a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_boots_with_two_queues_and_image_and_refuses_hotplug() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rootfs.img");
    let sha = pattern_image(&image).unwrap();
    let microvm = Qemu {
        machine: "microvm",
        image: Some(image),
        ..Qemu::Q35
    };
    let assets = GuestAssets::find();
    let mut config = microvm.config(&assets);
    // Linux enables min(queue pairs, online CPUs) pairs.
    config.vcpus = 2;
    let mut sb = Sandbox::prepare(&microvm, config).await.unwrap();
    let mut nic = sb.tap(1, 2).unwrap();
    sb.devices.add(nic.network()).await.unwrap();
    sb.start().await.unwrap();
    sb.configure(&nic).await.unwrap();
    sb.wait_ping(&nic.guest_ip, Duration::from_secs(60))
        .await
        .unwrap();
    let ifaces = sb
        .agent()
        .list_interfaces(Duration::from_secs(30))
        .await
        .unwrap();
    let mac = nic.mac.to_string();
    let guest = ifaces
        .iter()
        .find(|i| i.mac.as_deref() == Some(mac.as_str()))
        .unwrap_or_else(|| panic!("no guest NIC with MAC {mac}: {ifaces:?}"));
    assert_eq!(
        (guest.rx_queues, guest.tx_queues),
        (2, 2),
        "queue pairs the guest sees on microvm"
    );
    image_is_the_first_read_only_disk(&mut sb, &sha)
        .await
        .unwrap();
    assert!(!sb.hv.capabilities().await.network_hotplug);

    let mut second = sb.tap(2, 1).unwrap();
    let err = sb.devices.add(second.network()).await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert!(err.to_string().contains("machine type"), "{err}");
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

/// Prepares a sandbox with `config` (its kernel replaced by `/k`) in `netns`, expects a
/// configuration error, and checks that prepare left no run directory and the VM in
/// `Created`.
async fn prepare_config_error(
    netns: Option<&str>,
    config: HypervisorConfig,
) -> hypervisor::ConfigError {
    let run_root = tempfile::tempdir().unwrap();
    let hv = QEMU.create(run_root.path());
    let err = hv
        .prepare(&SandboxSpec {
            id: workspace_tests::unique_name("bad"),
            netns: netns.map(PathBuf::from),
            config: HypervisorConfig {
                kernel: "/k".into(),
                ..config
            },
        })
        .await
        .unwrap_err();
    let Error::InvalidConfig(c) = err else {
        panic!("expected InvalidConfig, got {err}");
    };
    assert!(
        std::fs::read_dir(run_root.path()).unwrap().next().is_none(),
        "prepare left a run directory behind"
    );
    assert_eq!(hv.state().await, hypervisor::VmState::Created);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_namespace_is_a_config_error_naming_it() {
    let c = prepare_config_error(
        Some("/run/netns/does-not-exist-here"),
        HypervisorConfig::default(),
    )
    .await;
    assert_eq!(c.field, "netns", "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_machine_type_is_rejected() {
    let c = prepare_config_error(
        None,
        HypervisorConfig {
            machine_type: Some("pc-i440fx".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(c.field, "machine_type");
    assert!(c.problem.contains("q35"), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runtime_reattaches_from_saved_state() {
    let assets = GuestAssets::find();
    let mut sb = Sandbox::prepare(&QEMU, QEMU.config(&assets)).await.unwrap();
    let mut nic = sb.tap(1, 1).unwrap();
    sb.devices.add(nic.network()).await.unwrap();
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
    sb.devices = hypervisor::DeviceManager::new(sb.hv.clone());
    let restored: Arc<dyn Hypervisor> = Arc::new(
        hypervisor_qemu::restore(test_logger(), Qemu::options(sb.run_root.path()), saved)
            .await
            .unwrap(),
    );
    sb.hv = restored;
    sb.devices = hypervisor::DeviceManager::new(sb.hv.clone());
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

/// The `image` key naming a file that does not exist fails prepare, naming the key, and
/// leaves no run directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_a_config_error_naming_the_key() {
    let c = prepare_config_error(
        None,
        HypervisorConfig {
            image: Some("/nonexistent/rootfs.img".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(c.field, "image");
    assert!(c.problem.contains("/nonexistent/rootfs.img"), "{c}");
}

fn device(id: &str, config: DeviceConfig) -> Device {
    Device {
        id: DeviceId::new(id).expect("valid id"),
        config,
    }
}

/// The QMP command whose failure `err` (a device error at `step`) carries.
fn failed_qmp_command(err: &Error, id: &str, step: &str) -> Result<String> {
    let Error::Device {
        id: got,
        step: got_step,
        source,
    } = err
    else {
        bail!("expected a device error, got {err}");
    };
    ensure!(got.as_str() == id, "the error names {got}, not {id}: {err}");
    ensure!(got_step == step, "the error's step is {got_step:?}: {err}");
    match source.downcast_ref::<QmpError>() {
        Some(QmpError::Command { command, desc, .. }) => {
            ensure!(!desc.is_empty(), "QEMU's message is missing: {err}");
            Ok(command.clone())
        }
        _ => bail!("the cause is not a QMP command error: {source:?}"),
    }
}

/// A hotplug that fails after QEMU took some of it leaves nothing: `netdev_add` failing
/// closes the fds passed with `getfd` (`closefd`); `device_add` failing removes the netdev
/// (`netdev_del`) or the block node (`blockdev-del`). Checked in QEMU (its fd table, `info
/// network`, its block nodes), on the host (the TAP goes away with its last fd), and by the
/// same ids plugging fine afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q35_failed_hotplugs_roll_back_everything() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rootfs.img");
    let sha = pattern_image(&image).unwrap();
    let disk = dir.path().join("data.img");
    pattern_image(&disk).unwrap();
    let backend = Kept::new(Qemu {
        image: Some(image),
        ..Qemu::Q35
    });
    let assets = GuestAssets::find();
    let mut sb = Sandbox::prepare(&backend, backend.config(&assets))
        .await
        .unwrap();
    let qemu = backend.hypervisor();
    let mut nic = sb.tap(1, 1).unwrap();
    sb.devices.add(nic.network()).await.unwrap();
    sb.start().await.unwrap();
    sb.configure(&nic).await.unwrap();
    sb.wait_ping(&nic.guest_ip, Duration::from_secs(60))
        .await
        .unwrap();
    image_is_the_first_read_only_disk(&mut sb, &sha)
        .await
        .unwrap();
    let pid = sb.hv.pids().await.unwrap().vmm;
    let tun_before = tun_fds(pid).unwrap();
    assert_eq!(tun_before, 1);

    // netdev_add fails (its id is taken behind the backend's back), after getfd passed both
    // queue fds.
    qemu.qmp_execute(
        "netdev_add",
        Some(json!({ "type": "hubport", "id": "net2", "hubid": 0 })),
    )
    .await
    .unwrap();
    let mut second = sb.tap(2, 2).unwrap();
    let err = sb
        .hv
        .add_device(second.device("net2"), PlugMode::Hot)
        .await
        .unwrap_err();
    assert_eq!(
        failed_qmp_command(&err, "net2", "Adding the netdev of").unwrap(),
        "netdev_add"
    );
    assert_eq!(
        tun_fds(pid).unwrap(),
        tun_before,
        "the fds passed with getfd stayed in QEMU"
    );
    let taps = sb.taps().unwrap();
    assert!(
        !taps.contains(&second.tap),
        "{} is left: someone still holds a queue fd ({taps:?})",
        second.tap
    );
    qemu.qmp_execute("netdev_del", Some(json!({ "id": "net2" })))
        .await
        .unwrap();

    // device_add fails: the root port the backend picks is taken behind its back.
    qemu.qmp_execute(
        "device_add",
        Some(json!({ "driver": "virtio-rng-pci", "id": "blocker", "bus": "rp0", "addr": "0x0" })),
    )
    .await
    .unwrap();
    let mut third = sb.tap(3, 2).unwrap();
    let err = sb
        .hv
        .add_device(third.device("net3"), PlugMode::Hot)
        .await
        .unwrap_err();
    assert_eq!(
        failed_qmp_command(&err, "net3", "Hot-plugging network").unwrap(),
        "device_add"
    );
    let network = hmp(&qemu, "info network").await.unwrap();
    assert!(
        !network.contains("net3"),
        "the netdev of the failed NIC is left: {network}"
    );
    assert_eq!(tun_fds(pid).unwrap(), tun_before, "TAP fds left in QEMU");
    let taps = sb.taps().unwrap();
    assert!(
        !taps.contains(&third.tap),
        "{} is left: {taps:?}",
        third.tap
    );

    let data = || {
        DeviceConfig::Block(hypervisor::device::BlockConfig {
            path: disk.clone(),
            read_only: true,
            driver: hypervisor::device::BlockDriver::VirtioBlkPci,
        })
    };
    let err = sb
        .hv
        .add_device(device("blk1", data()), PlugMode::Hot)
        .await
        .unwrap_err();
    assert_eq!(
        failed_qmp_command(&err, "blk1", "Hot-plugging block").unwrap(),
        "device_add"
    );
    let nodes = block_nodes(&qemu).await.unwrap();
    assert!(
        !nodes.iter().any(|n| n == "blk1"),
        "the block node of the failed disk is left: {nodes:?}"
    );

    // Once the port is free again, the same ids plug: nothing of the failed attempts holds
    // them.
    qemu.qmp_execute("device_del", Some(json!({ "id": "blocker" })))
        .await
        .unwrap();
    let began = Instant::now();
    loop {
        let gone = !device_ids(&qemu)
            .await
            .unwrap()
            .iter()
            .any(|id| id == "blocker");
        if gone {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "the guest never released the blocking device"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut third = sb.tap(3, 2).unwrap();
    sb.hv
        .add_device(third.device("net3"), PlugMode::Hot)
        .await
        .unwrap();
    assert_eq!(tun_fds(pid).unwrap(), tun_before + 2);
    sb.configure_when_seen(&third).await.unwrap();
    sb.wait_ping(&third.guest_ip, Duration::from_secs(60))
        .await
        .unwrap();
    sb.hv
        .add_device(device("blk1", data()), PlugMode::Hot)
        .await
        .unwrap();
    assert!(block_nodes(&qemu)
        .await
        .unwrap()
        .iter()
        .any(|n| n == "blk1"));
    sb.teardown(Some(pid)).await.unwrap();
}

/// The child enters the namespace even when one of its fds is placed at the number the
/// namespace file has in the parent: the fd numbers are arranged so that they collide
/// (the namespace file, opened inside `spawn`, takes the lowest free number, which is where
/// the passed fd goes in the child).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_enters_the_namespace_when_a_passed_fd_takes_its_number() {
    use std::os::unix::fs::MetadataExt;

    workspace_tests::require_root();
    let ns = netdev::NetNs::create(&workspace_tests::unique_name("sp")).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    let lowest_free = (0..)
        .find(|&fd| {
            // SAFETY: F_GETFD only reads the fd table; EBADF means the number is free.
            unsafe { libc::fcntl(fd, libc::F_GETFD) == -1 }
        })
        .unwrap();
    let mut fds = netdev::ChildFds::starting_at(lowest_free);
    let at = fds.push(r);
    let mut child = hypervisor_qemu::process::spawn(
        Path::new("/bin/sleep"),
        &["30".to_string()],
        fds,
        Some(ns.path()),
        &logs.path().join("sleep.log"),
        None,
    )
    .await
    .unwrap();
    let pid = child.pid;
    let inode = |p: String| std::fs::metadata(p).map(|m| m.ino()).ok();
    let entered = inode(format!("/proc/{pid}/ns/net"));
    let held = std::fs::read_link(format!("/proc/{pid}/fd/{at}"));
    // SAFETY: kill(2) on the child this test spawned.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    child.exited.wait_for(|s| s.is_some()).await.unwrap();
    drop(w);
    assert_eq!(
        entered,
        inode(ns.path().display().to_string()),
        "the child is not in the namespace"
    );
    assert!(
        held.as_ref()
            .is_ok_and(|t| t.to_string_lossy().starts_with("pipe:")),
        "fd {at} in the child is {held:?}, not the pipe"
    );
    ns.delete().unwrap();
}
