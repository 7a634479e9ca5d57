//! Shared filesystems (virtio-fs) in real QEMU guests under TCG, through the trait and the
//! device manager: cold and hot shares mounted in the guest with `mount -t virtiofs`, writes
//! seen on the host (and refused in a read-only share), a killed virtiofsd named by the next
//! device operation, bad input that leaves no daemon and no socket, and no daemon after
//! teardown.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use hypervisor::{
    DeviceConfig, DeviceKind, Error, HypervisorConfig, SandboxSpec, SharedFsConfig, SharedFsKind,
};
use hypervisor_qemu::QemuVm;
use workspace_tests::containers::daemons_serving;
use workspace_tests::qemu::{device_ids, Kept, Qemu};
use workspace_tests::{error_chain, Backend, GuestAssets, Sandbox};

/// q35 with virtio-fs on, the daemon found where `make deps` puts it.
fn backend() -> Kept {
    Kept::new(Qemu::Q35).adjust(|c| c.shared_fs = SharedFsKind::VirtioFs)
}

/// Runs `argv` in the guest; its exit code, stdout and stderr.
async fn guest_run(sb: &mut Sandbox, argv: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = sb.guest_run(argv).await?;
    Ok((out.exit_code, out.stdout, out.stderr))
}

async fn guest_ok(sb: &mut Sandbox, argv: &[&str]) -> Result<String> {
    sb.guest_ok(argv).await
}

/// Mounts share `tag` at `target` in the guest, retrying while the guest has not probed a
/// hot-plugged device yet (every 250 ms, at most 60 s).
async fn mount_share(sb: &mut Sandbox, tag: &str, target: &str) -> Result<()> {
    guest_ok(sb, &["mkdir", "-p", target]).await?;
    let began = Instant::now();
    loop {
        let (code, _, err) = guest_run(sb, &["mount", "-t", "virtiofs", tag, target]).await?;
        if code == Some(0) {
            return Ok(());
        }
        if began.elapsed() > Duration::from_secs(60) {
            bail!("mount -t virtiofs {tag} {target} failed in the guest: {err}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The virtiofsd files (socket, log) in a run directory.
fn daemon_files(run_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("virtiofsd-"))
        })
        .collect()
}

fn share(tag: &str, dir: &Path, read_only: bool) -> DeviceConfig {
    DeviceConfig::SharedFs(SharedFsConfig {
        read_only,
        ..SharedFsConfig::new(tag, dir)
    })
}

/// The virtiofsd processes serving `dir` that this process started.
fn our_daemons_serving(dir: &Path) -> Vec<u32> {
    daemons_serving(dir)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.to_string();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(std::process::id())
        })
        .collect()
}

/// Waits for process `pid` (not a child of this test) to exit, through a pidfd.
async fn wait_gone(pid: u32) -> Result<()> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        // Already gone (ESRCH).
        return Ok(());
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
    let fd = unsafe { <OwnedFd as FromRawFd>::from_raw_fd(fd as i32) };
    let ready = tokio::task::spawn_blocking(move || {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and `fd` stays open for the call.
        unsafe { libc::poll(&mut p, 1, 10_000) }
    })
    .await?;
    ensure!(ready == 1, "process {pid} did not exit within 10 s");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_shares_are_mounted_writes_land_on_the_host_and_a_read_only_one_refuses_them() {
    let backend = backend();
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("from-host"), "host\n").unwrap();
    let config = backend.config(&GuestAssets::find());
    let mut sb = Sandbox::prepare(&backend, config).await.unwrap();
    assert!(sb.hv.capabilities().await.shared_fs);
    let a = sb
        .devices
        .add(share("rwShare", rw.path(), false))
        .await
        .unwrap();
    let b = sb
        .devices
        .add(share("roShare", ro.path(), true))
        .await
        .unwrap();
    assert!(!a.hotplugged && a.kind == DeviceKind::SharedFs);
    sb.start().await.unwrap();
    let pid = sb.hv.pids().await.unwrap().vmm;

    // One daemon per share, with its socket and log 0600 in the run directory.
    assert_eq!(our_daemons_serving(rw.path()).len(), 1);
    assert_eq!(our_daemons_serving(ro.path()).len(), 1);
    let run_dir = backend.run_root().join(&sb.id);
    let files = daemon_files(&run_dir);
    assert_eq!(files.len(), 4, "{files:?}");
    for f in &files {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }

    mount_share(&mut sb, "rwShare", "/mnt/rw").await.unwrap();
    mount_share(&mut sb, "roShare", "/mnt/ro").await.unwrap();
    guest_ok(&mut sb, &["sh", "-c", "echo from-guest > /mnt/rw/written"])
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(rw.path().join("written")).unwrap(),
        "from-guest\n"
    );
    assert_eq!(
        guest_ok(&mut sb, &["cat", "/mnt/ro/from-host"])
            .await
            .unwrap(),
        "host\n"
    );
    let (code, _, err) = guest_run(&mut sb, &["sh", "-c", "echo x > /mnt/ro/written"])
        .await
        .unwrap();
    assert_ne!(code, Some(0));
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!ro.path().join("written").exists());
    let _ = b;

    sb.teardown(Some(pid)).await.unwrap();
    assert!(daemons_serving(rw.path()).is_empty());
    assert!(daemons_serving(ro.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_hot_plugged_into_a_running_q35_guest_is_mounted_then_unplugged() {
    let backend = backend();
    let dir = tempfile::tempdir().unwrap();
    let config = backend.config(&GuestAssets::find());
    let mut sb = Sandbox::prepare(&backend, config).await.unwrap();
    sb.start().await.unwrap();
    let pid = sb.hv.pids().await.unwrap().vmm;
    assert!(sb.hv.capabilities().await.shared_fs_hotplug);

    let info = sb
        .devices
        .add(share("hotShare", dir.path(), false))
        .await
        .unwrap();
    assert!(info.hotplugged, "{info:?}");
    let qemu = backend.hypervisor();
    assert!(device_ids(&qemu)
        .await
        .unwrap()
        .contains(&format!("dev-{}", info.id)));
    assert_eq!(our_daemons_serving(dir.path()).len(), 1);
    mount_share(&mut sb, "hotShare", "/mnt/hot").await.unwrap();
    guest_ok(&mut sb, &["sh", "-c", "echo hot > /mnt/hot/f"])
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("f")).unwrap(),
        "hot\n"
    );

    guest_ok(&mut sb, &["umount", "/mnt/hot"]).await.unwrap();
    sb.devices.remove(&info.id).await.unwrap();
    assert!(!device_ids(&qemu)
        .await
        .unwrap()
        .contains(&format!("dev-{}", info.id)));
    let chardevs = qemu.qmp_execute("query-chardev", None).await.unwrap();
    assert!(
        !chardevs.to_string().contains(&format!("chr-{}", info.id)),
        "{chardevs}"
    );
    assert!(daemons_serving(dir.path()).is_empty());
    let run_dir = backend.run_root().join(&sb.id);
    assert!(daemon_files(&run_dir)
        .iter()
        .all(|f| !f.to_string_lossy().ends_with(".sock")));

    sb.teardown(Some(pid)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_virtiofsd_fails_the_next_device_operation_naming_it() {
    let backend = backend();
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let config = backend.config(&GuestAssets::find());
    let mut sb = Sandbox::prepare(&backend, config).await.unwrap();
    let fs = sb
        .devices
        .add(share("victim", dir.path(), false))
        .await
        .unwrap();
    sb.start().await.unwrap();
    let pid = sb.hv.pids().await.unwrap().vmm;
    assert_eq!(our_daemons_serving(dir.path()).len(), 1);
    let daemons = daemons_serving(dir.path());
    for pid in &daemons {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    for pid in daemons {
        wait_gone(pid).await.unwrap();
    }

    let err = sb
        .devices
        .add(share("second", other.path(), false))
        .await
        .unwrap_err();
    let chain = error_chain(&err);
    assert!(chain.contains("virtiofsd"), "{chain}");
    assert!(chain.contains(fs.id.as_str()), "{chain}");
    assert!(daemons_serving(other.path()).is_empty());
    // The VM itself still runs, and stops cleanly.
    assert_eq!(sb.hv.state().await, hypervisor::VmState::Running);
    sb.teardown(Some(pid)).await.unwrap();
}

/// Adds `config` to a prepared VM, expects an error, and checks no daemon serves `dir` and
/// the run directory holds no virtiofsd file.
async fn refused(config: DeviceConfig, dir: &Path, sb: &Sandbox, run_dir: &Path) -> Error {
    let err = sb.devices.add(config).await.unwrap_err();
    assert!(daemons_serving(dir).is_empty(), "{err}");
    assert!(daemon_files(run_dir).is_empty(), "{err}");
    err
}

fn field(err: &Error) -> String {
    match err {
        Error::InvalidConfig(c) => c.field.clone(),
        other => panic!("expected InvalidConfig, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shares_are_refused_naming_the_key_and_leave_no_daemon_or_socket() {
    let assets = GuestAssets::find();
    let dir = tempfile::tempdir().unwrap();

    // Shares on a VM with shared_fs = none.
    let plain = Kept::new(Qemu::Q35);
    let sb = Sandbox::prepare(&plain, plain.config(&assets))
        .await
        .unwrap();
    assert!(!sb.hv.capabilities().await.shared_fs);
    let run_dir = plain.run_root().join(&sb.id);
    let e = refused(share("t", dir.path(), false), dir.path(), &sb, &run_dir).await;
    assert_eq!(field(&e), "shared_fs", "{e}");
    sb.teardown(None).await.unwrap();

    let backend = backend();
    let sb = Sandbox::prepare(&backend, backend.config(&assets))
        .await
        .unwrap();
    let run_dir = backend.run_root().join(&sb.id);
    let missing = dir.path().join("missing");
    let e = refused(share("t", &missing, false), &missing, &sb, &run_dir).await;
    assert_eq!(field(&e), "shared_fs.host_dir", "{e}");
    let first = tempfile::tempdir().unwrap();
    sb.devices
        .add(share("taken", first.path(), false))
        .await
        .unwrap();
    let e = refused(share("taken", dir.path(), false), dir.path(), &sb, &run_dir).await;
    assert_eq!(field(&e), "shared_fs.tag", "{e}");
    assert!(error_chain(&e).contains("fs0"), "{e}");
    sb.devices
        .remove(&hypervisor::DeviceId::new("fs0").unwrap())
        .await
        .unwrap();
    let e = refused(share("", dir.path(), false), dir.path(), &sb, &run_dir).await;
    assert_eq!(field(&e), "shared_fs.tag", "{e}");
    let long = "t".repeat(37);
    let e = refused(share(&long, dir.path(), false), dir.path(), &sb, &run_dir).await;
    assert_eq!(field(&e), "shared_fs.tag", "{e}");
    let mut dax = SharedFsConfig::new("t", dir.path());
    dax.dax = true;
    let e = refused(DeviceConfig::SharedFs(dax), dir.path(), &sb, &run_dir).await;
    assert_eq!(field(&e), "shared_fs.dax", "{e}");
    assert!(sb.devices.list().await.is_empty());
    sb.teardown(None).await.unwrap();

    // A daemon that does not exist fails prepare naming the key, leaving nothing.
    let run_root = tempfile::tempdir().unwrap();
    let hv = backend.create(run_root.path());
    let err = hv
        .prepare(&SandboxSpec {
            id: workspace_tests::unique_name("vfs"),
            netns: None,
            config: HypervisorConfig {
                virtio_fs_daemon: Some("/nonexistent/virtiofsd".into()),
                ..backend.config(&assets)
            },
        })
        .await
        .unwrap_err();
    assert_eq!(field(&err), "virtio_fs_daemon", "{err}");
    assert!(
        std::fs::read_dir(run_root.path()).unwrap().next().is_none(),
        "prepare left a run directory behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_daemon_is_the_rust_virtiofsd_installed_by_make_deps() {
    // The read-only share above needs it; the C daemon is only a fallback.
    let path = Path::new(hypervisor_qemu::virtiofs::DEFAULT_DAEMONS[0]);
    assert!(
        path.exists(),
        "{} is missing: run `make deps`",
        path.display()
    );
    let out = workspace_tests::run(path.to_str().unwrap(), &["--version"]).unwrap();
    assert_eq!(
        hypervisor_qemu::virtiofs::DaemonFlavour::from_version(&out),
        hypervisor_qemu::virtiofs::DaemonFlavour::Rust,
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_mounts_a_cold_share_on_virtio_mmio_and_refuses_a_hot_one() {
    let backend = Kept::new(Qemu {
        machine: "microvm",
        image: None,
        kernel_params: "",
    })
    .adjust(|c| c.shared_fs = SharedFsKind::VirtioFs);
    let dir = tempfile::tempdir().unwrap();
    let late = tempfile::tempdir().unwrap();
    let config = backend.config(&GuestAssets::find());
    let mut sb = Sandbox::prepare(&backend, config).await.unwrap();
    sb.devices
        .add(share("mmioShare", dir.path(), false))
        .await
        .unwrap();
    sb.start().await.unwrap();
    let pid = sb.hv.pids().await.unwrap().vmm;
    let caps = sb.hv.capabilities().await;
    assert!(caps.shared_fs && !caps.shared_fs_hotplug, "{caps:?}");
    mount_share(&mut sb, "mmioShare", "/mnt/m").await.unwrap();
    guest_ok(&mut sb, &["sh", "-c", "echo mmio > /mnt/m/f"])
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("f")).unwrap(),
        "mmio\n"
    );
    let err = sb
        .devices
        .add(share("late", late.path(), false))
        .await
        .unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert!(daemons_serving(late.path()).is_empty());
    sb.teardown(Some(pid)).await.unwrap();
    assert!(daemons_serving(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_qemu_takes_a_hot_plugged_share_through_fds_only() {
    // Unprivileged, chrooted and filtered, QEMU cannot open the daemon's socket by path: it
    // gets the connected socket through getfd.
    let backend = Kept::new(Qemu::Q35).adjust(|c| {
        c.shared_fs = SharedFsKind::VirtioFs;
        c.seccomp_sandbox = Some(hypervisor::config::DEFAULT_SECCOMP_SANDBOX.into());
        c.rootless = true;
        c.rootless_user = hypervisor::config::DEFAULT_ROOTLESS_USER.into();
        c.chroot = true;
    });
    let dir = tempfile::tempdir().unwrap();
    let config = backend.config(&GuestAssets::find());
    let mut sb = Sandbox::prepare(&backend, config).await.unwrap();
    sb.start().await.unwrap();
    let pid = sb.hv.pids().await.unwrap().vmm;
    let info = sb
        .devices
        .add(share("confinedShare", dir.path(), false))
        .await
        .unwrap();
    assert!(info.hotplugged);
    mount_share(&mut sb, "confinedShare", "/mnt/c")
        .await
        .unwrap();
    guest_ok(&mut sb, &["sh", "-c", "echo confined > /mnt/c/f"])
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("f")).unwrap(),
        "confined\n"
    );
    sb.teardown(Some(pid)).await.unwrap();
    assert!(daemons_serving(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_leaves_no_virtiofsd_after_cleanup() {
    let backend = backend();
    let dir = tempfile::tempdir().unwrap();
    let config = backend.config(&GuestAssets::find());
    let mut sb = Sandbox::prepare(&backend, config).await.unwrap();
    sb.devices
        .add(share("orphan", dir.path(), false))
        .await
        .unwrap();
    sb.start().await.unwrap();
    let pid = sb.hv.pids().await.unwrap().vmm;
    assert_eq!(our_daemons_serving(dir.path()).len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exit = sb.hv.wait_exit().await.unwrap();
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit}");
    let run_dir = backend.run_root().join(&sb.id);
    sb.teardown(Some(pid)).await.unwrap();
    let left = daemons_serving(dir.path());
    assert!(left.is_empty(), "virtiofsd left after cleanup: {left:?}");
    assert!(!run_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_daemon_serves_a_read_write_share_and_refuses_a_read_only_one() {
    let c_daemon = Path::new("/usr/lib/qemu/virtiofsd");
    assert!(
        c_daemon.exists(),
        "{} is missing: run `make deps` (Debian package qemu-system-common)",
        c_daemon.display()
    );
    let backend = Kept::new(Qemu::Q35).adjust(|c| {
        c.shared_fs = SharedFsKind::VirtioFs;
        c.virtio_fs_daemon = Some("/usr/lib/qemu/virtiofsd".into());
    });
    let dir = tempfile::tempdir().unwrap();
    let config = backend.config(&GuestAssets::find());
    let mut sb = Sandbox::prepare(&backend, config).await.unwrap();
    let run_dir = backend.run_root().join(&sb.id);
    let e = refused(share("ro", dir.path(), true), dir.path(), &sb, &run_dir).await;
    assert_eq!(field(&e), "shared_fs.read_only", "{e}");
    sb.devices
        .add(share("cShare", dir.path(), false))
        .await
        .unwrap();
    sb.start().await.unwrap();
    let pid = sb.hv.pids().await.unwrap().vmm;
    mount_share(&mut sb, "cShare", "/mnt/c").await.unwrap();
    guest_ok(&mut sb, &["sh", "-c", "echo c > /mnt/c/f"])
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("f")).unwrap(),
        "c\n"
    );
    sb.teardown(Some(pid)).await.unwrap();
    let left = daemons_serving(dir.path());
    assert!(left.is_empty(), "virtiofsd left after cleanup: {left:?}");
}
