//! QEMU confined: it dies with its owner, and it runs under its seccomp filter, as an
//! unprivileged user, chrooted, with private run files; real guests under TCG, real TAPs in a
//! namespace the test creates.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use anyhow::{bail, ensure, Context, Result};
use hypervisor::{Error, Hypervisor, HypervisorConfig, SandboxSpec};
use workspace_tests::qemu::{Kept, Qemu};
use workspace_tests::{require_root, scenarios, test_logger, unique_name, GuestAssets, TestNic};

/// The unprivileged ids the confined QEMU takes: numeric, so the test needs no user on the
/// host; no process of the host runs as them.
const CONFINED_UID: u32 = 64_123;
const CONFINED_USER: &str = "64123:64123";

/// Set in the environment of the child that plays the owner of a QEMU.
const OWNER_ROLE: &str = "QEMU_CONFINED_OWNER_ROLE";
/// The line the owner prints once its QEMU runs.
const OWNER_READY: &str = "owner-ready";

/// Every confinement on: Kata's seccomp filter, an unprivileged user, a chroot.
fn confined_config() -> HypervisorConfig {
    let mut config = assets_config();
    confine(&mut config);
    config
}

/// Turns every confinement on in `config`.
fn confine(config: &mut HypervisorConfig) {
    config.seccomp_sandbox = Some(hypervisor::config::DEFAULT_SECCOMP_SANDBOX.into());
    config.rootless = true;
    config.rootless_user = CONFINED_USER.into();
    config.chroot = true;
}

fn assets_config() -> HypervisorConfig {
    let assets = GuestAssets::find();
    HypervisorConfig {
        kernel: assets.kernel,
        initrd: Some(assets.initrd),
        memory_mib: 256,
        ..Default::default()
    }
}

/// The owner's part: starts a QEMU with the configuration `role` names, prints its pid and
/// run directory, and waits to be killed.
fn play_owner(role: &str, run_root: &Path) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let res: Result<()> = rt.block_on(async {
        let hv = hypervisor::Vm::new(hypervisor_qemu::Qemu::new(
            test_logger(),
            Qemu::options(run_root),
        ));
        let config = match role {
            "plain" => assets_config(),
            "confined" => confined_config(),
            other => bail!("unknown owner role {other:?}"),
        };
        let id = std::env::var("QEMU_CONFINED_OWNER_ID").context("the sandbox id")?;
        hv.prepare(&SandboxSpec {
            id,
            netns: None,
            config,
        })
        .await?;
        hv.start(Duration::from_secs(60)).await?;
        let pid = hv.pids().await?.vmm;
        println!("{OWNER_READY} {pid}");
        std::future::pending::<()>().await;
        Ok(())
    });
    eprintln!("owner failed: {res:?}");
    std::process::exit(3)
}

/// Waits until `pid` exits (its pidfd turns readable), at most `limit`.
fn wait_pid_exit(pid: u32, limit: Duration) -> Result<bool> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        // Already gone (and reaped).
        return Ok(true);
    }
    // SAFETY: `raw` is a descriptor the kernel just created and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: poll(2) on one pollfd that lives on this stack frame for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    ensure!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    Ok(n == 1)
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Runs this test binary again as the owner of a QEMU (`role`), kills the owner with
/// SIGKILL, and checks its QEMU is gone within two seconds.
fn owner_death_kills_qemu(test_name: &str, role: &str) -> Result<()> {
    require_root();
    let run_root = tempfile::tempdir()?;
    let id = unique_name("own");
    let mut owner = Command::new(std::env::current_exe()?)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(OWNER_ROLE, role)
        .env("QEMU_CONFINED_OWNER_ID", &id)
        .env("QEMU_CONFINED_RUN_ROOT", run_root.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running the owner")?;
    let stdout = owner.stdout.take().context("the owner's stdout")?;
    let mut qemu_pid = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        // libtest prints "test NAME ... " before the test's own output, on the same line.
        if let Some((_, pid)) = line.split_once(OWNER_READY) {
            qemu_pid = Some(pid.trim().parse::<u32>()?);
            break;
        }
    }
    let Some(qemu_pid) = qemu_pid else {
        let status = owner.wait()?;
        bail!("the owner ended ({status}) without starting QEMU");
    };
    let stat = std::fs::read_to_string(format!("/proc/{qemu_pid}/status"))?;
    ensure!(
        stat.lines()
            .any(|l| l.starts_with("PPid:") && l.contains(&owner.id().to_string())),
        "QEMU {qemu_pid} is not the owner's child: {stat}"
    );

    let killed = Instant::now();
    owner.kill()?;
    let status = owner.wait()?;
    ensure!(
        std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL),
        "the owner was not killed by SIGKILL: {status}"
    );
    let gone = wait_pid_exit(qemu_pid, Duration::from_secs(2))?;
    let took = killed.elapsed();
    if !gone {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(qemu_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        bail!("QEMU {qemu_pid} outlived its owner by more than 2 s");
    }
    eprintln!(
        "QEMU {qemu_pid} ended {} ms after its owner was killed",
        took.as_millis()
    );
    // Nothing of that sandbox runs any more (a zombie awaiting its new parent aside).
    let left: Vec<u32> = processes_mentioning(&format!("sandbox-{id}"))
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    !s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(false)
        })
        .collect();
    ensure!(
        left.is_empty(),
        "processes of sandbox {id} still run: {left:?}"
    );
    // The dead owner could not clean up its run directory; the test removes it.
    run_root.close()?;
    Ok(())
}

/// The owner role, when this process is the child of [`owner_death_kills_qemu`].
fn owner_role() -> Option<(String, PathBuf)> {
    let role = std::env::var(OWNER_ROLE).ok()?;
    let root = std::env::var("QEMU_CONFINED_RUN_ROOT").ok()?;
    Some((role, PathBuf::from(root)))
}

#[test]
fn qemu_dies_within_two_seconds_of_its_owner() -> Result<()> {
    if let Some((role, root)) = owner_role() {
        play_owner(&role, &root);
    }
    owner_death_kills_qemu("qemu_dies_within_two_seconds_of_its_owner", "plain")
}

#[test]
fn a_confined_qemu_dies_within_two_seconds_of_its_owner() -> Result<()> {
    if let Some((role, root)) = owner_role() {
        play_owner(&role, &root);
    }
    // The id change before exec must not have cleared the parent-death signal.
    owner_death_kills_qemu(
        "a_confined_qemu_dies_within_two_seconds_of_its_owner",
        "confined",
    )
}

/// A confined QEMU backend for the shared scenarios; it keeps its run root so the test can
/// look at the files.
fn confined() -> Kept {
    Kept::new(Qemu::Q35).adjust(confine)
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

fn mode_of(path: &Path) -> Result<u32> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("{}", path.display()))?;
    Ok(meta.permissions().mode() & 0o7777)
}

/// What the confinement looks like from the host while the guest runs.
fn check_confinement(pid: u32, run_root: &Path) -> Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name| status_field(&status, name).unwrap_or_default().to_string();
    ensure!(
        field("Seccomp") == "2",
        "QEMU is not under a seccomp filter: {status}"
    );
    let ids = |name| {
        field(name)
            .split_whitespace()
            .map(|v| v.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    ensure!(
        ids("Uid") == [CONFINED_UID; 4] && ids("Gid") == [CONFINED_UID; 4],
        "QEMU does not run as {CONFINED_USER}: Uid {:?} Gid {:?}",
        ids("Uid"),
        ids("Gid")
    );
    ensure!(
        field("Groups") == CONFINED_UID.to_string(),
        "QEMU kept other groups: {:?}",
        field("Groups")
    );
    // CAP_SYS_CHROOT (bit 18), nothing else.
    ensure!(
        field("CapEff") == "0000000000040000" && field("CapPrm") == "0000000000040000",
        "QEMU holds capabilities besides CAP_SYS_CHROOT: eff {} prm {}",
        field("CapEff"),
        field("CapPrm")
    );
    ensure!(field("NoNewPrivs") == "1", "no_new_privs is not set");

    let run_dirs: Vec<PathBuf> = std::fs::read_dir(run_root)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    let [run_dir] = run_dirs.as_slice() else {
        bail!(
            "expected one run directory in {}: {run_dirs:?}",
            run_root.display()
        );
    };
    let root = std::fs::read_link(format!("/proc/{pid}/root"))?;
    ensure!(
        root == run_dir.join("chroot"),
        "QEMU's root is {}, not its chroot directory",
        root.display()
    );
    ensure!(
        std::fs::read_dir(run_dir.join("chroot"))?.next().is_none(),
        "the chroot directory is not empty"
    );
    let want: [(&Path, u32); 7] = [
        (run_root, 0o700),
        (run_dir, 0o700),
        (&run_dir.join("qmp.sock"), 0o600),
        (&run_dir.join("agent.sock"), 0o600),
        (&run_dir.join("console.log"), 0o600),
        (&run_dir.join("qemu.log"), 0o600),
        (&run_dir.join("chroot"), 0o111),
    ];
    for (path, mode) in want {
        let got = mode_of(path)?;
        ensure!(
            got == mode,
            "{} has mode {got:o}, expected {mode:o}",
            path.display()
        );
        let owner = std::fs::metadata(path)?.uid();
        ensure!(
            owner == 0,
            "{} is owned by uid {owner}, not root",
            path.display()
        );
    }
    // The guest's console reached the root-owned 0600 log through the passed fd.
    let console = std::fs::read_to_string(run_dir.join("console.log"))?;
    ensure!(
        console.contains("Linux version"),
        "the console log has no boot messages"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_qemu_boots_answers_ping_and_runs_unprivileged_in_its_chroot() -> Result<()> {
    let backend = confined();
    let inspect = |pid: u32, _nic: &TestNic| check_confinement(pid, &backend.run_root());
    scenarios::boot_ping_and_agent(&backend, 1, &inspect).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_qemu_hotplugs_a_nic_the_guest_answers_on() -> Result<()> {
    scenarios::nic_hotplug_and_unplug(&confined()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_qemu_hotplugs_a_disk_the_guest_reads() -> Result<()> {
    scenarios::block_hotplug_reads_pattern(&confined()).await
}

/// Prepares with `config` and expects a configuration error naming `key`, with nothing
/// created under the run root.
async fn refused(config: HypervisorConfig, key: &str, words: &str) -> Result<()> {
    require_root();
    let run_root = tempfile::tempdir()?;
    let hv = hypervisor::Vm::new(hypervisor_qemu::Qemu::new(
        test_logger(),
        Qemu::options(&run_root.path().join("run")),
    ));
    let id = unique_name("bad");
    let err = hv
        .prepare(&SandboxSpec {
            id: id.clone(),
            netns: None,
            config,
        })
        .await
        .expect_err("prepare must refuse the configuration");
    let Error::InvalidConfig(e) = &err else {
        bail!("not a configuration error: {err:?}");
    };
    ensure!(
        e.field == key,
        "the error names {:?}, not {key:?}: {e}",
        e.field
    );
    ensure!(e.to_string().contains(words), "unclear message: {e}");
    ensure!(
        !run_root.path().join("run").exists(),
        "prepare created {} although it refused",
        run_root.path().join("run").display()
    );
    ensure!(
        processes_mentioning(&format!("sandbox-{id}")).is_empty(),
        "a QEMU of {id} runs"
    );
    hv.cleanup().await?;
    Ok(())
}

#[tokio::test]
async fn an_unknown_seccomp_sub_option_is_refused_naming_the_key() -> Result<()> {
    let config = HypervisorConfig {
        seccomp_sandbox: Some("on,obsolete=deny,networking=deny".into()),
        ..assets_config()
    };
    refused(
        config,
        "seccomp_sandbox",
        "\"networking\" is not a sub-option",
    )
    .await
}

#[tokio::test]
async fn a_rootless_user_that_does_not_exist_is_refused_naming_the_key() -> Result<()> {
    let config = HypervisorConfig {
        rootless: true,
        rootless_user: "kq-no-such-user".into(),
        ..assets_config()
    };
    refused(config, "rootless_user", "does not exist on this host").await
}

#[tokio::test]
async fn a_kernel_the_rootless_user_cannot_read_is_refused_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not read")?;
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600))?;
    let config = HypervisorConfig {
        kernel,
        ..confined_config()
    };
    refused(
        config,
        "kernel",
        "cannot be read by QEMU's user 64123:64123",
    )
    .await
}

/// A configured console log outside the run directory is private too, even when it existed
/// with a looser mode; and the run directory is 0700 under a run root made 0700.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_console_log_is_made_0600_and_the_run_root_0700() -> Result<()> {
    require_root();
    let logs = tempfile::tempdir()?;
    std::fs::set_permissions(logs.path(), std::fs::Permissions::from_mode(0o755))?;
    let console = logs.path().join("console.log");
    std::fs::write(&console, b"old")?;
    std::fs::set_permissions(&console, std::fs::Permissions::from_mode(0o644))?;
    let run_root = tempfile::tempdir()?;
    // A run root that exists with a looser mode is tightened.
    std::fs::set_permissions(run_root.path(), std::fs::Permissions::from_mode(0o755))?;
    let hv = hypervisor::Vm::new(hypervisor_qemu::Qemu::new(
        test_logger(),
        Qemu::options(run_root.path()),
    ));
    let id = unique_name("con");
    hv.prepare(&SandboxSpec {
        id: id.clone(),
        netns: None,
        config: HypervisorConfig {
            console_log: Some(console.clone()),
            ..assets_config()
        },
    })
    .await?;
    hv.start(Duration::from_secs(60)).await?;
    let pid = hv.pids().await?.vmm;
    let modes = [
        (mode_of(run_root.path())?, 0o700, "run root"),
        (mode_of(&run_root.path().join(&id))?, 0o700, "run directory"),
        (mode_of(&console)?, 0o600, "configured console log"),
    ];
    hv.stop().await?;
    hv.cleanup().await?;
    for (got, want, what) in modes {
        ensure!(
            got == want,
            "the {what} has mode {got:o}, expected {want:o}"
        );
    }
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} is still alive after cleanup"
    );
    ensure!(
        !run_root.path().join(&id).exists(),
        "the run directory is left behind"
    );
    ensure!(console.exists(), "the configured console log was removed");
    Ok(())
}
