//! VM templates on real QEMU (TCG): a template source booted, saved and stopped; clones started
//! from it, reached through their agents and by ping over hot-plugged NICs; what a clone keeps
//! when the template's files go; pause, resume, stop and a killed QEMU on a clone; and a clone
//! from a bad template failing with nothing left.
//!
//! The cases run one at a time (a lock below): the machine has two cores for TCG guests, and
//! the cases compare this process's fd table.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hypervisor::{Boot, Error, Hypervisor, HypervisorConfig, SandboxSpec, TemplateFiles, VmState};
use hypervisor_qemu::QemuVm;
use workspace_tests::qemu::{Kept, Qemu};
use workspace_tests::{error_chain, Backend, GuestAssets, Sandbox};

/// One case at a time: see the module docs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_alone(case: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(case)
}

/// A template directory on tmpfs (the template's RAM lives in it), removed when dropped.
fn template_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("vm-template-")
        .tempdir_in("/dev/shm")?)
}

fn config(backend: &impl Backend, assets: &GuestAssets, boot: Boot) -> HypervisorConfig {
    HypervisorConfig {
        boot,
        ..backend.config(assets)
    }
}

/// This process's fds that point into `dir`.
fn fds_into(dir: &Path) -> Result<Vec<String>> {
    let dir = dir.display().to_string();
    Ok(workspace_tests::fd_targets(std::process::id())?
        .into_iter()
        .filter(|(_, t)| t.starts_with(&dir))
        .map(|(fd, t)| format!("{fd} -> {t}"))
        .collect())
}

/// QEMU processes whose command line names sandbox `id` (`-name sandbox-ID`).
fn qemu_of(id: &str) -> Vec<u32> {
    let name = format!("sandbox-{id}");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|a| a == name.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// This process's open fds, as `fd -> target` (without the listing's own handle).
fn own_fds() -> Result<Vec<String>> {
    let me = std::process::id();
    let mut fds: Vec<String> = workspace_tests::fd_targets(me)?
        .into_iter()
        .map(|(fd, target)| format!("{fd} -> {target}"))
        .filter(|f| !f.ends_with(&format!("/proc/{me}/fd")))
        .collect();
    fds.sort();
    Ok(fds)
}

/// Checks this process has the fds it had `before`.
fn same_fds(before: &[String]) -> Result<()> {
    let after = own_fds()?;
    let new: Vec<_> = after.iter().filter(|f| !before.contains(f)).collect();
    ensure!(new.is_empty(), "fds left open: {new:?}");
    Ok(())
}

/// `Pss` and `Private_Dirty` of `pid`, in KiB, from `smaps_rollup`.
fn pss_private_dirty(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in smaps_rollup of {pid}"))
    };
    Ok((field("Pss:")?, field("Private_Dirty:")?))
}

/// Every confinement on: an unprivileged user and a chroot (the seccomp filter is on by
/// default).
fn confine(config: &mut HypervisorConfig) {
    config.rootless = true;
    config.rootless_user = hypervisor::config::DEFAULT_ROOTLESS_USER.into();
    config.chroot = true;
}

/// `Rss` and `Private_Dirty` of `pid`'s mappings of `file`, in KiB, from `smaps`: the
/// guest RAM's share of the clone's memory.
fn mapping_of(pid: u32, file: &Path) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let file = file.display().to_string();
    let (mut rss, mut dirty, mut inside) = (0, 0, false);
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            inside = line.ends_with(&file);
            continue;
        }
        if !inside {
            continue;
        }
        let kib = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        };
        if first == "Rss:" {
            rss += kib().unwrap_or(0);
        } else if first == "Private_Dirty:" {
            dirty += kib().unwrap_or(0);
        }
    }
    Ok((rss, dirty))
}

/// Boots a template source in `dir`, waits for its agent, saves it and stops it. The test's
/// namespace, TAPs and run directory go with it.
async fn make_template(
    assets: &GuestAssets,
    dir: &Path,
    adjust: fn(&mut HypervisorConfig),
) -> Result<TemplateFiles> {
    let backend = Kept::new(Qemu::Q35).adjust(adjust);
    let boot = Boot::TemplateSource { dir: dir.into() };
    let mut sb = Sandbox::prepare(&backend, config(&backend, assets, boot)).await?;
    ensure!(
        sb.hv.capabilities().await.templates,
        "QEMU says it has no templates"
    );
    let began = Instant::now();
    sb.start().await.context("booting the template source")?;
    eprintln!(
        "template source: spawn to agent ready {:?}",
        began.elapsed()
    );
    let pid = sb.hv.pids().await?.vmm;
    // A save that cannot write its state fails naming the file, and the source runs on.
    let state = TemplateFiles::in_dir(dir).state;
    std::fs::create_dir(&state)?;
    let err = sb.hv.save_template().await.unwrap_err();
    ensure!(
        error_chain(&err).contains(&*state.to_string_lossy()),
        "{}",
        error_chain(&err)
    );
    ensure!(
        sb.hv.state().await == VmState::Running,
        "the failed save left the VM {:?}",
        sb.hv.state().await
    );
    sb.agent().health(Duration::from_secs(5)).await?;
    std::fs::remove_dir(&state)?;
    let began = Instant::now();
    let files = sb.hv.save_template().await.context("save_template")?;
    eprintln!(
        "template saved in {:?}: state {} bytes",
        began.elapsed(),
        std::fs::metadata(&files.state)?.len()
    );
    ensure!(sb.hv.state().await == VmState::Paused, "the source runs on");
    let status = backend
        .hypervisor()
        .qmp_execute("query-status", None)
        .await?;
    ensure!(
        status["status"] == "postmigrate",
        "QEMU's run state after the save: {status}"
    );
    ensure!(files == TemplateFiles::in_dir(dir), "{files:?}");
    sb.teardown(Some(pid)).await?;
    Ok(files)
}

/// A clone of the template in `dir`, its agent answering; prints spawn to agent-ready.
/// A template made unconfined in a directory of its own, and two backends for its clones.
async fn plain_template(assets: &GuestAssets) -> Result<(tempfile::TempDir, Kept, Kept)> {
    Qemu::Q35.can_boot().map_err(anyhow::Error::msg)?;
    let dir = template_dir()?;
    make_template(assets, dir.path(), |_| {}).await?;
    Ok((dir, Kept::new(Qemu::Q35), Kept::new(Qemu::Q35)))
}

async fn clone_of(backend: &Kept, assets: &GuestAssets, dir: &Path) -> Result<(Sandbox, u32)> {
    let boot = Boot::FromTemplate { dir: dir.into() };
    let mut sb = Sandbox::prepare(backend, config(backend, assets, boot)).await?;
    let began = Instant::now();
    sb.start().await.context("starting a clone")?;
    let ready = began.elapsed();
    let pid = sb.hv.pids().await?.vmm;
    eprintln!("clone {}: spawn to agent ready {ready:?}", sb.id);
    ensure!(
        ready < Duration::from_secs(10),
        "the clone's agent took {ready:?}"
    );
    Ok((sb, pid))
}

async fn guest(sb: &mut Sandbox, argv: &[&str]) -> Result<String> {
    Ok(sb.guest_ok(argv).await?.trim().to_string())
}

/// Hot-plugs a NIC on `10.SUBNET.0.0/24`, configures it through the agent and pings it;
/// returns the MAC the guest has on it.
async fn nic_and_ping(sb: &mut Sandbox, subnet: u8) -> Result<String> {
    let mut nic = sb.tap(subnet, 1)?;
    let info = sb.devices.add(nic.network()).await.context("NIC hotplug")?;
    ensure!(info.hotplugged, "the clone's NIC was not hot-plugged");
    sb.configure_when_seen(&nic).await?;
    sb.wait_ping(&nic.guest_ip, Duration::from_secs(20)).await?;
    let macs = guest(sb, &["cat", "/sys/class/net/eth0/address"]).await?;
    ensure!(
        macs == nic.mac.to_string(),
        "the guest's eth0 is {macs}, the NIC {}",
        nic.mac
    );
    Ok(macs)
}

/// Draws from the guest's RNG: two UUIDs and 16 bytes of getrandom (through /dev/urandom).
async fn draws(sb: &mut Sandbox) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for _ in 0..2 {
        out.push(guest(sb, &["cat", "/proc/sys/kernel/random/uuid"]).await?);
    }
    out.push(guest(sb, &["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"]).await?);
    Ok(out)
}

#[test]
fn clones_start_fast_take_their_own_nics_and_outlive_the_template_files() -> Result<()> {
    run_alone(async {
        let assets = GuestAssets::find();
        Qemu::Q35.can_boot().map_err(anyhow::Error::msg)?;
        // Children are reaped through a process-wide SIGCHLD handler, set up with the first.
        tokio::process::Command::new("true").status().await?;
        let before = own_fds()?;
        let dir = template_dir()?;
        // The source's QEMU runs unprivileged and chrooted, as does the second clone's: the
        // template's files reach them as fds.
        make_template(&assets, dir.path(), confine).await?;

        let backend_a = Kept::new(Qemu::Q35);
        let backend_b = Kept::new(Qemu::Q35).adjust(confine);
        let (mut a, pid_a) = clone_of(&backend_a, &assets, dir.path()).await?;
        let (pss, dirty) = pss_private_dirty(pid_a)?;
        eprintln!(
            "clone {} idle: Pss {} KiB, Private_Dirty {} KiB",
            a.id, pss, dirty
        );
        let (ram, ram_dirty) = mapping_of(pid_a, &TemplateFiles::in_dir(dir.path()).memory)?;
        eprintln!(
            "clone {} idle: guest RAM mapping Rss {ram} KiB, Private_Dirty {ram_dirty} KiB (the rest is QEMU's own)",
            a.id
        );
        ensure!(
            ram > 0,
            "no mapping of the template's memory file in QEMU {pid_a}"
        );
        // Nor does a clone hold a copy of the kernel: its QEMU got a stub in a memfd as
        // `-kernel`, and no initrd.
        let argv: Vec<String> = std::fs::read(format!("/proc/{pid_a}/cmdline"))?
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        ensure!(
            !argv.iter().any(|a| a == "-initrd"),
            "a clone got an initrd: {argv:?}"
        );
        let kernel = argv
            .iter()
            .skip_while(|a| *a != "-kernel")
            .nth(1)
            .context("a clone's QEMU has no -kernel")?;
        let fd = kernel
            .strip_prefix("/proc/self/fd/")
            .with_context(|| format!("a clone's -kernel {kernel} is not an fd"))?;
        let target = std::fs::read_link(format!("/proc/{pid_a}/fd/{fd}"))?;
        ensure!(
            target.to_string_lossy().starts_with("/memfd:clone-kernel"),
            "a clone's -kernel is {}, not the stub",
            target.display()
        );
        let (mut b, pid_b) = clone_of(&backend_b, &assets, dir.path()).await?;
        let status = std::fs::read_to_string(format!("/proc/{pid_b}/status"))?;
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap_or("?");
        ensure!(
            !uid.split_whitespace().skip(1).any(|u| u == "0"),
            "the confined clone's QEMU runs as root: {uid}"
        );
        let root = std::fs::read_link(format!("/proc/{pid_b}/root"))?;
        ensure!(
            root != Path::new("/"),
            "the confined clone's QEMU is not chrooted"
        );

        // Each clone has its own generation id, so a guest that watches it reseeds.
        let genid = |kept: &Kept| {
            let hv = kept.hypervisor();
            async move {
                let v = hv.qmp_execute("query-vm-generation-id", None).await?;
                anyhow::Ok(v["guid"].as_str().unwrap_or_default().to_string())
            }
        };
        let (ga, gb) = (genid(&backend_a).await?, genid(&backend_b).await?);
        ensure!(
            !ga.is_empty() && ga != gb,
            "clones' vmgenid: {ga:?} and {gb:?}"
        );

        let mac_a = nic_and_ping(&mut a, 51).await?;
        let mac_b = nic_and_ping(&mut b, 52).await?;
        ensure!(mac_a != mac_b, "both clones have MAC {mac_a}");

        // Deleting the template's files under running clones: their RAM mappings stay.
        let files = TemplateFiles::in_dir(dir.path());
        std::fs::remove_file(&files.memory)?;
        std::fs::remove_file(&files.state)?;
        for sb in [&mut a, &mut b] {
            // Touches 64 MiB of guest pages the template never wrote.
            guest(
                sb,
                &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
            )
            .await?;
            let health = sb.agent().health(Duration::from_secs(5)).await?;
            eprintln!(
                "clone {} after the template's files went: {health:?}",
                sb.id
            );
        }
        let nic_a = a.ip(&["-j", "link", "show", "type", "tun"])?;
        ensure!(nic_a.contains("tap51"), "{nic_a}");
        a.wait_ping("10.51.0.2", Duration::from_secs(10)).await?;

        a.teardown(Some(pid_a)).await?;
        b.teardown(Some(pid_b)).await?;
        let left = fds_into(dir.path())?;
        ensure!(left.is_empty(), "fds left into the template: {left:?}");
        same_fds(&before)
    })
}

/// Two clones of one template draw different numbers from their RNGs. Each gets a new vmgenid
/// (checked in the case above through QMP); a guest kernel with the vmgenid driver
/// (`CONFIG_VMGENID`) reseeds on it at once. Without it (Debian's cloud kernel has none), the
/// guest's time-based reseed of its CRNG is what separates them, and it would not for a
/// template saved long after its boot: the case prints which applies.
#[test]
fn two_clones_draw_different_random_numbers() -> Result<()> {
    run_alone(async {
        let assets = GuestAssets::find();
        let (dir, backend_a, backend_b) = plain_template(&assets).await?;
        let (mut a, pid_a) = clone_of(&backend_a, &assets, dir.path()).await?;
        let (mut b, pid_b) = clone_of(&backend_b, &assets, dir.path()).await?;
        let (da, db) = (draws(&mut a).await?, draws(&mut b).await?);
        eprintln!(
            "guest kernel CONFIG_VMGENID: {:?}",
            assets.kernel_option("CONFIG_VMGENID")
        );
        eprintln!("clone {}: {da:?}\nclone {}: {db:?}", a.id, b.id);
        a.teardown(Some(pid_a)).await?;
        b.teardown(Some(pid_b)).await?;
        let same: Vec<_> = da.iter().zip(&db).filter(|(x, y)| x == y).collect();
        if !same.is_empty() {
            let vmgenid = assets.kernel_option("CONFIG_VMGENID").unwrap_or_else(Some);
            bail!(
                "two clones drew the same random numbers {same:?}: the guest did not reseed its RNG on the new vmgenid (guest kernel CONFIG_VMGENID: {})",
                vmgenid.as_deref().unwrap_or("not set; the guest kernel has no vmgenid driver")
            );
        }
        Ok(())
    })
}

#[test]
fn a_clone_from_a_missing_or_corrupt_state_fails_naming_it_and_leaves_nothing() -> Result<()> {
    run_alone(async {
        workspace_tests::require_root();
        let assets = GuestAssets::find();
        Qemu::Q35.can_boot().map_err(anyhow::Error::msg)?;
        tokio::process::Command::new("true").status().await?;
        let before = own_fds()?;
        let dir = template_dir()?;
        let files = TemplateFiles::in_dir(dir.path());
        // A template's memory file of the right size, and no state.
        std::fs::File::create(&files.memory)?.set_len(256 << 20)?;
        let backend = Kept::new(Qemu::Q35);
        let run_root = tempfile::tempdir()?;
        let spec = |id: &str| SandboxSpec {
            id: id.into(),
            netns: None,
            config: config(
                &backend,
                &assets,
                Boot::FromTemplate {
                    dir: dir.path().into(),
                },
            ),
        };

        let hv: Arc<dyn Hypervisor> = backend.create(run_root.path());
        let id = workspace_tests::unique_name("tm");
        let err = hv.prepare(&spec(&id)).await.unwrap_err();
        ensure!(
            matches!(&err, Error::InvalidConfig(c) if c.field == "boot.dir" && c.problem.contains("state")),
            "a missing state file: {}",
            error_chain(&err)
        );
        ensure!(
            !run_root.path().join(&id).exists(),
            "prepare left its run directory"
        );

        // A corrupt state file: QEMU refuses it at start.
        std::fs::write(&files.state, b"QEVM\0\0\0\x03 this is not a saved VM")?;
        let hv: Arc<dyn Hypervisor> = backend.create(run_root.path());
        let id = workspace_tests::unique_name("tc");
        hv.prepare(&spec(&id)).await?;
        let err = hv.start(Duration::from_secs(60)).await.unwrap_err();
        let text = error_chain(&err);
        eprintln!("corrupt state: {text}");
        ensure!(
            text.contains("Starting from the template state")
                && text.contains(&*files.state.to_string_lossy()),
            "the error does not name the state file: {text}"
        );
        ensure!(
            hv.state().await == VmState::Stopped,
            "{:?}",
            hv.state().await
        );
        ensure!(
            qemu_of(&id).is_empty(),
            "QEMU of {id} is left: {:?}",
            qemu_of(&id)
        );
        hv.cleanup().await?;
        ensure!(
            !run_root.path().join(&id).exists(),
            "cleanup left the run directory"
        );

        // A memory file of another size: refused at prepare, naming it.
        std::fs::File::create(&files.memory)?.set_len(128 << 20)?;
        let hv: Arc<dyn Hypervisor> = backend.create(run_root.path());
        let id = workspace_tests::unique_name("tz");
        let err = hv.prepare(&spec(&id)).await.unwrap_err();
        ensure!(
            error_chain(&err).contains("another configuration"),
            "{}",
            error_chain(&err)
        );
        let left = fds_into(dir.path())?;
        ensure!(left.is_empty(), "fds left into the template: {left:?}");
        same_fds(&before)
    })
}

/// A clone behaves as a cold-booted VM: it pauses (and stops answering), resumes, stops
/// with its guest powering itself off, and a `kill -9` of its QEMU is reported by
/// `wait_exit`; nothing is left after either.
#[test]
fn a_clone_pauses_resumes_stops_and_reports_a_kill_as_a_cold_boot_does() -> Result<()> {
    run_alone(async {
        let assets = GuestAssets::find();
        let (dir, backend_a, backend_b) = plain_template(&assets).await?;

        let (mut a, pid_a) = clone_of(&backend_a, &assets, dir.path()).await?;
        nic_and_ping(&mut a, 53).await?;
        let ip = "10.53.0.2";
        a.hv.pause().await.context("pausing a clone")?;
        ensure!(a.hv.state().await == VmState::Paused);
        for _ in 0..3 {
            ensure!(!a.ping_once(ip).await, "a paused clone answered ping");
        }
        a.hv.resume().await.context("resuming a clone")?;
        a.wait_ping(ip, Duration::from_secs(20)).await?;
        a.hv.stop().await?;
        let exit = a.hv.wait_exit().await?;
        ensure!(
            exit.reason == hypervisor::ExitReason::Stopped,
            "a clone's stop: {exit:?}"
        );
        let console = a.hv.console_log().await.context("no console log")?;
        let text = String::from_utf8_lossy(&std::fs::read(&console)?).into_owned();
        ensure!(
            text.contains("reboot: Power down"),
            "the clone's guest did not power off by itself; console tail: {}",
            &text[text.len().saturating_sub(400)..]
        );
        a.teardown(Some(pid_a)).await?;

        let (b, pid_b) = clone_of(&backend_b, &assets, dir.path()).await?;
        workspace_tests::run("kill", &["-9", &pid_b.to_string()])?;
        let exit = tokio::time::timeout(Duration::from_secs(20), b.hv.wait_exit())
            .await
            .context("wait_exit did not return after kill -9 of a clone")??;
        ensure!(
            exit.reason == hypervisor::ExitReason::Killed && exit.signal == Some(9),
            "a killed clone: {exit:?}"
        );
        ensure!(b.hv.state().await == VmState::Stopped);
        b.teardown(Some(pid_b)).await
    })
}
