//! Faults injected into real QEMU guests (TCG), each checked for what it leaves behind.
//!
//! Every case ends with the same checks: the sandbox stops and cleans up, no QEMU process is
//! left, no TAP in the test's namespace, no fd in this process beyond those it had before the
//! sandbox, no socket or run file; and a sandbox with the same id prepares again.
//!
//! The cases run one at a time (a lock below): they compare this process's fd table, and the
//! machine has two cores for TCG guests.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hypervisor::device::{BlockConfig, BlockDriver};
use hypervisor::{Device, DeviceConfig, DeviceId, DeviceInfo, PlugMode, SandboxSpec, VmState};
use hypervisor_qemu::{QemuOptions, QemuVm};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use workspace_tests::qemu::{device_ids, devices_behind_ports, hmp, Kept, Qemu};
use workspace_tests::{error_chain, Backend, GuestAssets, Sandbox};

/// One case at a time: see the module docs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `case` alone, on a runtime made once the other cases are done: every runtime adds
/// fds of its own (epoll, eventfd, a signal socket), which must not be taken for leaks.
fn run_alone(case: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(case)
}

/// This process's open fds, as `fd -> target`.
fn own_fds() -> Result<Vec<String>> {
    let mut fds: Vec<String> = workspace_tests::fd_targets(std::process::id())?
        .into_iter()
        .map(|(fd, target)| format!("{fd} -> {target}"))
        // The listing's own handle on /proc/PID/fd.
        .filter(|f| !f.ends_with(&format!("/proc/{}/fd", std::process::id())))
        .collect();
    fds.sort();
    Ok(fds)
}

/// A prepared sandbox of `backend`, and this process's fds from before it.
async fn prepared(backend: &Kept) -> Result<(Sandbox, Vec<String>)> {
    backend
        .can_boot()
        .map_err(|why| anyhow::anyhow!("cannot boot a guest here: {why}"))?;
    // Children are reaped through a process-wide SIGCHLD handler, set up with the first one.
    tokio::process::Command::new("true").status().await?;
    let before = own_fds()?;
    let sb = Sandbox::prepare(backend, backend.config(&GuestAssets::find())).await?;
    Ok((sb, before))
}

fn pid_alive(pid: u32) -> bool {
    // A zombie is gone for our purpose only once reaped: /proc/PID exists until then.
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until no process runs with `needle` in its command line, at most `limit`.
async fn no_process_with(needle: &str, limit: Duration) -> Result<()> {
    let began = Instant::now();
    loop {
        let found = processes_with(needle);
        if found.is_empty() {
            return Ok(());
        }
        if began.elapsed() > limit {
            bail!("processes still running with {needle:?}: {found:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn processes_with(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// QEMU's `-name` for a sandbox.
fn qemu_name(id: &str) -> String {
    format!("sandbox-{id}")
}

/// Stops and cleans up, then checks nothing is left, and that the same id prepares again.
async fn finish(backend: &Kept, sb: Sandbox, fds_before: Vec<String>) -> Result<()> {
    let began = Instant::now();
    sb.hv.stop().await.context("stop")?;
    sb.hv.cleanup().await.context("cleanup")?;
    ensure!(
        began.elapsed() < Duration::from_secs(10),
        "stop and cleanup took {:?}",
        began.elapsed()
    );
    ensure!(sb.hv.state().await == VmState::Stopped);
    no_process_with(&qemu_name(&sb.id), Duration::from_secs(5)).await?;
    let taps = sb.taps()?;
    ensure!(taps.is_empty(), "TAPs left in the namespace: {taps:?}");
    let run_dir = sb.run_root.path().join(&sb.id);
    ensure!(!run_dir.exists(), "{} is left behind", run_dir.display());
    let left: Vec<_> = std::fs::read_dir(sb.run_root.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    ensure!(left.is_empty(), "files left under the run root: {left:?}");

    // The same id, in the same namespace and run root, prepares again.
    let again = backend.create(sb.run_root.path());
    again
        .prepare(&SandboxSpec {
            id: sb.id.clone(),
            netns: Some(sb.ns().path().to_path_buf()),
            config: backend.config(&GuestAssets::find()),
        })
        .await
        .context("preparing the same id again")?;
    again
        .cleanup()
        .await
        .context("cleaning up the second prepare")?;
    drop(again);
    // Teardown drops the agent's connection too; then only the fds from before are left.
    sb.teardown(None).await?;
    let after = own_fds()?;
    let extra: Vec<_> = after.iter().filter(|f| !fds_before.contains(f)).collect();
    ensure!(extra.is_empty(), "fds left open in this process: {extra:?}");
    Ok(())
}

/// Sends `signal` to QEMU.
fn signal(pid: u32, signal: Signal) -> Result<()> {
    kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("{signal} to QEMU {pid}"))
}

async fn vmm_pid(sb: &Sandbox) -> Result<u32> {
    Ok(sb.hv.pids().await.context("pids")?.vmm)
}

/// Runs `op` in a task; checks it is still waiting after `pending` (QEMU is stopped, so it
/// cannot be answered), then kills QEMU and returns how `op` ended and how long it took after
/// the kill.
async fn kill_while_pending<T: Send + 'static>(
    pid: u32,
    op: impl std::future::Future<Output = hypervisor::Result<T>> + Send + 'static,
) -> Result<(hypervisor::Result<T>, Duration)> {
    signal(pid, Signal::SIGSTOP)?;
    let mut task = tokio::spawn(op);
    let early = tokio::time::timeout(Duration::from_millis(500), &mut task).await;
    ensure!(
        early.is_err(),
        "the operation ended while QEMU was stopped: {:?}",
        early.map(|r| r.map(|r| r.map(drop)))
    );
    signal(pid, Signal::SIGKILL)?;
    let killed = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .context("the operation did not end after QEMU was killed")??;
    Ok((ended, killed.elapsed()))
}

fn expect_exit_error<T: std::fmt::Debug>(
    what: &str,
    result: hypervisor::Result<T>,
    took: Duration,
) -> Result<()> {
    let err = match result {
        Ok(v) => bail!("{what} succeeded although QEMU was killed: {v:?}"),
        Err(e) => e,
    };
    let chain = error_chain(&err);
    ensure!(
        took < Duration::from_secs(3),
        "{what} took {took:?} after the kill: {chain}"
    );
    ensure!(
        chain.contains("VMM exited: killed (signal 9)"),
        "{what} does not name QEMU's exit: {chain}"
    );
    Ok(())
}

/// `quit` behind the backend's back closes QMP: the exit is reported, later operations fail
/// at once saying QEMU exited, and stop and cleanup still succeed.
#[test]
fn qmp_closed_by_quit_is_reported_and_later_operations_fail_at_once() -> Result<()> {
    run_alone(async {
        let backend = Kept::new(Qemu::Q35);
        let (mut sb, fds) = prepared(&backend).await?;
        sb.start_vm().await?;
        let qemu = backend.hypervisor();
        // QEMU may answer before it closes the socket, or close first.
        let _ = qemu.qmp_execute("quit", None).await;
        let exit = tokio::time::timeout(Duration::from_secs(10), sb.hv.wait_exit())
            .await
            .context("wait_exit did not report the quit")??;
        println!("exit after quit: {exit}");
        ensure!(sb.hv.state().await == VmState::Stopped);

        let mut nic = sb.tap(1, 1)?;
        let id = DeviceId::new("net0")?;
        let timed = |began: Instant, r: hypervisor::Result<()>| (r, began.elapsed());
        let checks = [
            (
                "add_device",
                timed(
                    Instant::now(),
                    sb.hv
                        .add_device(nic.device("net0"), PlugMode::Hot)
                        .await
                        .map(drop),
                ),
            ),
            (
                "remove_device",
                timed(
                    Instant::now(),
                    sb.hv.remove_device(&id, PlugMode::Hot).await,
                ),
            ),
            ("pause", timed(Instant::now(), sb.hv.pause().await)),
        ];
        for (what, (result, took)) in checks {
            let err = result
                .err()
                .with_context(|| format!("{what} succeeded after quit"))?;
            let chain = error_chain(&err);
            println!("{what} after quit: {chain} ({took:?})");
            ensure!(
                chain.contains("VMM exited"),
                "{what} after quit does not say QEMU exited: {chain}"
            );
            ensure!(took < Duration::from_secs(1), "{what} took {took:?}");
        }
        drop(nic);
        finish(&backend, sb, fds).await
    })
}

/// A TAP deleted under a running VM: the VM keeps running, the NIC unplugs, nothing is left.
#[test]
fn a_tap_deleted_under_a_running_vm_leaves_it_running_and_removable() -> Result<()> {
    run_alone(async {
        let backend = Kept::new(Qemu::Q35);
        let (mut sb, fds) = prepared(&backend).await?;
        sb.start().await?;
        let mut nic = sb.tap(3, 1)?;
        let info = sb.hv.add_device(nic.device("net3"), PlugMode::Hot).await?;
        sb.configure_when_seen(&nic).await?;
        sb.wait_ping(&nic.guest_ip, Duration::from_secs(30)).await?;

        sb.ip(&["link", "del", &nic.tap])?;
        ensure!(!sb.taps()?.contains(&nic.tap), "{} still exists", nic.tap);
        let status = backend
            .hypervisor()
            .qmp_execute("query-status", None)
            .await?;
        ensure!(status["running"] == true, "QEMU is not running: {status}");
        // The guest still answers its agent.
        let ifaces = sb
            .agent()
            .list_interfaces(Duration::from_secs(20))
            .await
            .context("the agent after the TAP went away")?;
        ensure!(!ifaces.is_empty());

        sb.hv
            .remove_device(&info.id, PlugMode::Hot)
            .await
            .context("removing the NIC whose TAP was deleted")?;
        let devices = device_ids(&backend.hypervisor()).await?;
        ensure!(!devices.contains(&"dev-net3".to_string()), "{devices:?}");
        ensure!(!hmp(&backend.hypervisor(), "info network")
            .await?
            .contains("net3:"));
        finish(&backend, sb, fds).await
    })
}

fn short_unplug(run_root: &Path) -> QemuOptions {
    QemuOptions {
        unplug_timeout: Duration::from_secs(6),
        ..Qemu::options(run_root)
    }
}

/// A guest that never acknowledges an unplug: remove_device times out naming the device, its
/// port is not reused, a retry stays pending, and stop preempts that wait.
///
/// The guest ignores the unplug request because its ACPI PCI hotplug driver is disabled
/// (`acpiphp.disable=1`): q35 in QEMU 7.2 signals hotplug through ACPI on its root ports.
#[test]
fn an_unplug_the_guest_ignores_times_out_keeps_its_port_and_does_not_delay_stop() -> Result<()> {
    run_alone(async {
        let backend = Kept::new(Qemu {
            kernel_params: "acpiphp.disable=1",
            ..Qemu::Q35
        })
        .options(short_unplug);
        let (mut sb, fds) = prepared(&backend).await?;
        sb.start().await?;
        let qemu = backend.hypervisor();
        let mut first = sb.tap(4, 1)?;
        let info = sb
            .hv
            .add_device(first.device("net4"), PlugMode::Hot)
            .await?;

        let began = Instant::now();
        let err = sb
            .hv
            .remove_device(&info.id, PlugMode::Hot)
            .await
            .err()
            .context("the unplug succeeded: the guest acknowledged it")?;
        let chain = error_chain(&err);
        println!("ignored unplug: {chain} after {:?}", began.elapsed());
        ensure!(
            chain.contains("net4"),
            "the error does not name the device: {chain}"
        );
        ensure!(
            began.elapsed() >= Duration::from_secs(6) && chain.contains("DEVICE_DELETED"),
            "not an unplug timeout: {chain}"
        );
        ensure!(
            device_ids(&qemu).await?.contains(&"dev-net4".to_string()),
            "QEMU no longer has the device, yet the guest never released it"
        );

        // The next hotplug gets another port.
        let mut second = sb.tap(5, 1)?;
        let info2 = sb
            .hv
            .add_device(second.device("net5"), PlugMode::Hot)
            .await?;
        ensure!(
            info2.location != info.location,
            "the pending device's port was reused: {} and {}",
            info.location,
            info2.location
        );
        let behind = devices_behind_ports(&qemu).await?;
        let buses: Vec<&String> = behind
            .iter()
            .filter(|(id, _)| id == "dev-net4" || id == "dev-net5")
            .map(|(_, port)| port)
            .collect();
        ensure!(
            buses.len() == 2 && buses[0] != buses[1],
            "query-pci does not show both devices on their own ports: {behind:?}"
        );

        // A retry waits again; stop, started meanwhile, does not wait behind it.
        let hv = sb.hv.clone();
        let id = info.id.clone();
        let mut retry = tokio::spawn(async move { hv.remove_device(&id, PlugMode::Hot).await });
        let early = tokio::time::timeout(Duration::from_millis(500), &mut retry).await;
        ensure!(
            early.is_err(),
            "the retried unplug ended at once: {early:?}"
        );
        let stopping = Instant::now();
        sb.hv.stop().await.context("stop")?;
        let took = stopping.elapsed();
        ensure!(
            took < Duration::from_secs(2),
            "stop took {took:?} behind a pending unplug"
        );
        let retried = tokio::time::timeout(Duration::from_secs(2), retry)
            .await
            .context("the retried unplug did not end with stop")??;
        let chain = retried
            .err()
            .map(|e| error_chain(&e))
            .context("the retried unplug succeeded")?;
        println!("retried unplug during stop: {chain}; stop took {took:?}");
        drop((first, second));
        finish(&backend, sb, fds).await
    })
}

fn short_qmp(run_root: &Path) -> QemuOptions {
    QemuOptions {
        qmp_timeout: Duration::from_secs(1),
        ..Qemu::options(run_root)
    }
}

/// A hotplug whose QMP replies come after its timeout (QEMU stopped with SIGSTOP): once QEMU
/// runs again, the backend's record and QEMU agree, and the next hotplug works on a free port.
#[test]
fn a_hotplug_answered_after_its_timeout_is_settled_with_qemu() -> Result<()> {
    run_alone(async {
        let backend = Kept::new(Qemu::Q35).options(short_qmp);
        let (mut sb, fds) = prepared(&backend).await?;
        sb.start().await?;
        let qemu = backend.hypervisor();
        let pid = vmm_pid(&sb).await?;
        let mut late = sb.tap(6, 1)?;
        let late_tap = late.tap.clone();

        signal(pid, Signal::SIGSTOP)?;
        let began = Instant::now();
        let result = sb.hv.add_device(late.device("net6"), PlugMode::Hot).await;
        let took = began.elapsed();
        signal(pid, Signal::SIGCONT)?;
        let err = result
            .err()
            .context("the hotplug succeeded with QEMU stopped")?;
        let chain = error_chain(&err);
        println!("hotplug with QEMU stopped: {chain} after {took:?}");
        ensure!(
            chain.contains("net6") && chain.contains("no answer"),
            "{chain}"
        );
        ensure!(took < Duration::from_secs(5), "took {took:?}");
        drop(late);

        // The next hotplug first settles the earlier one with QEMU.
        let mut next = sb.tap(7, 1)?;
        let info = sb.hv.add_device(next.device("net7"), PlugMode::Hot).await?;
        let devices = device_ids(&qemu).await?;
        let network = hmp(&qemu, "info network").await?;
        let record = sb.hv.save_state().await?;
        let recorded: Vec<String> = record.devices.iter().map(|d| d.id.to_string()).collect();
        println!("QEMU devices {devices:?}; recorded {recorded:?}; info network:\n{network}");
        let qemu_has = devices.contains(&"dev-net6".to_string());
        ensure!(
            qemu_has == recorded.contains(&"net6".to_string()),
            "the record ({recorded:?}) and QEMU ({devices:?}) disagree about net6"
        );
        if qemu_has {
            bail!("net6 was adopted, but its hotplug never passed getfd: QEMU cannot have it");
        }
        ensure!(
            !network.contains("net6:"),
            "the netdev of net6 is left: {network}"
        );
        ensure!(
            !sb.taps()?.contains(&late_tap),
            "QEMU still holds {late_tap}: its getfd name was not closed"
        );
        let behind = devices_behind_ports(&qemu).await?;
        ensure!(
            behind.iter().filter(|(id, _)| id == "dev-net7").count() == 1,
            "{behind:?}"
        );
        ensure!(info.hotplugged);
        sb.configure_when_seen(&next).await?;
        sb.wait_ping(&next.guest_ip, Duration::from_secs(30))
            .await?;
        finish(&backend, sb, fds).await
    })
}

/// A VM that booted far enough to take QMP commands (no agent wait).
async fn running(backend: &Kept) -> Result<(Sandbox, Vec<String>, u32)> {
    let (mut sb, fds) = prepared(backend).await?;
    sb.start_vm().await?;
    let pid = vmm_pid(&sb).await?;
    Ok((sb, fds, pid))
}

/// `kill -9` of QEMU while a NIC hotplug waits for it: the hotplug fails at once naming
/// QEMU's exit.
#[test]
fn kill_of_qemu_during_a_nic_hotplug_fails_it_at_once() -> Result<()> {
    run_alone(async {
        let backend = Kept::new(Qemu::Q35);
        let (sb, fds, pid) = running(&backend).await?;
        let mut nic = sb.tap(8, 2)?;
        let device = nic.device("net8");
        let hv = sb.hv.clone();
        let (result, took) =
            kill_while_pending(
                pid,
                async move { hv.add_device(device, PlugMode::Hot).await },
            )
            .await?;
        expect_exit_error("NIC hotplug", result, took)?;
        finish(&backend, sb, fds).await
    })
}

/// `kill -9` of QEMU while a block hotplug waits for it.
#[test]
fn kill_of_qemu_during_a_block_hotplug_fails_it_at_once() -> Result<()> {
    run_alone(async {
        let backend = Kept::new(Qemu::Q35);
        let (sb, fds, pid) = running(&backend).await?;
        let image = sb.run_root.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 1 << 20])?;
        let device = Device {
            id: DeviceId::new("disk0")?,
            config: DeviceConfig::Block(BlockConfig {
                path: image.clone(),
                read_only: true,
                driver: BlockDriver::VirtioBlkPci,
            }),
        };
        let hv = sb.hv.clone();
        let (result, took): (hypervisor::Result<DeviceInfo>, _) = kill_while_pending(
            pid,
            async move { hv.add_device(device, PlugMode::Hot).await },
        )
        .await?;
        expect_exit_error("block hotplug", result, took)?;
        std::fs::remove_file(&image)?;
        finish(&backend, sb, fds).await
    })
}

/// `kill -9` of QEMU while stop waits for it: stop ends at once.
#[test]
fn kill_of_qemu_during_stop_ends_stop_at_once() -> Result<()> {
    run_alone(async {
        let backend = Kept::new(Qemu::Q35);
        let (sb, fds, pid) = running(&backend).await?;
        let hv = sb.hv.clone();
        let (result, took) = kill_while_pending(pid, async move { hv.stop().await }).await?;
        result.context("stop of a QEMU killed meanwhile")?;
        ensure!(
            took < Duration::from_secs(2),
            "stop took {took:?} after the kill"
        );
        ensure!(!pid_alive(pid), "QEMU {pid} is not reaped after stop");
        finish(&backend, sb, fds).await
    })
}

/// Dropping the future of `start` once QEMU runs (a shim cancelling boot on SIGTERM) kills
/// QEMU and leaves the VM stopped, so cleanup removes everything.
#[test]
fn a_dropped_start_kills_qemu() -> Result<()> {
    run_alone(async {
        let backend = Kept::new(Qemu::Q35);
        let (sb, fds) = prepared(&backend).await?;
        let name = qemu_name(&sb.id);
        let spawned = async {
            while processes_with(&name).is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            started = sb.hv.start(Duration::from_secs(120)) => {
                bail!("start ended before it could be cancelled: {started:?}")
            }
            () = spawned => {}
        }
        // The start future is dropped here.
        ensure!(
            sb.hv.state().await == VmState::Stopped,
            "state after a cancelled start: {}",
            sb.hv.state().await
        );
        no_process_with(&name, Duration::from_secs(5))
            .await
            .context("QEMU outlived the cancelled start")?;
        finish(&backend, sb, fds).await
    })
}

/// QEMU exits 0 on a guest power-off, on a `quit` and on SIGTERM alike; its SHUTDOWN event
/// tells them apart: a `quit` or a signal behind the backend's back is reported as a host
/// request naming it, never as the guest shutting down.
#[test]
fn a_quit_or_a_sigterm_behind_the_backend_is_a_host_request_not_a_guest_shutdown() -> Result<()> {
    run_alone(async {
        for how in ["quit", "SIGTERM"] {
            let backend = Kept::new(Qemu::Q35);
            let (mut sb, fds) = prepared(&backend).await?;
            sb.start_vm().await?;
            let pid = sb.hv.pids().await?.vmm;
            if how == "quit" {
                // QEMU may answer before it closes the socket, or close first.
                let _ = backend.hypervisor().qmp_execute("quit", None).await;
            } else {
                kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
            }
            let exit = tokio::time::timeout(Duration::from_secs(10), sb.hv.wait_exit())
                .await
                .with_context(|| format!("wait_exit did not report the {how}"))??;
            println!("exit after {how}: {exit}");
            let hypervisor::ExitReason::HostRequest(why) = &exit.reason else {
                bail!("{how} is reported as {exit}, not as a host request");
            };
            let named = if how == "quit" {
                "QMP quit"
            } else {
                "terminating on signal 15"
            };
            ensure!(why.contains(named), "{how} reported as {exit}");
            ensure!(exit.code == Some(0), "{exit:?}");
            finish(&backend, sb, fds).await?;
        }
        Ok(())
    })
}
