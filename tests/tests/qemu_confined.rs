//! QEMU confined: it dies with its owner, and it runs under its seccomp filter, as an
//! unprivileged user, chrooted, with private run files; real guests under TCG, real TAPs in a
//! namespace the test creates.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hypervisor::{Hypervisor, HypervisorConfig, SandboxSpec};
use hypervisor_qemu::{QemuHypervisor, QemuOptions};
use workspace_tests::{require_root, test_logger, unique_name, GuestAssets};

/// Set in the environment of the child that plays the owner of a QEMU.
const OWNER_ROLE: &str = "QEMU_CONFINED_OWNER_ROLE";
/// The line the owner prints once its QEMU runs.
const OWNER_READY: &str = "owner-ready";

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
        let hv = QemuHypervisor::new(
            test_logger(),
            QemuOptions {
                run_root: run_root.to_path_buf(),
                ..Default::default()
            },
        );
        let config = match role {
            "plain" => assets_config(),
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
