//! VM scenarios, written once against `Arc<dyn Hypervisor>` and run by each backend's tests.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use guest_agent::protocol::ExecRequest;
use hypervisor::device::{BlockConfig, BlockDriver};
use hypervisor::{DeviceConfig, Error, ExitReason, VmState};

use crate::{Backend, GuestAssets, Sandbox, TestNic};

const PING_LIMIT: Duration = Duration::from_secs(60);
const AGENT_CALL: Duration = Duration::from_secs(30);

async fn booted_with_nic(backend: &dyn Backend, queues: u16) -> Result<(Sandbox, TestNic)> {
    backend.can_boot().map_err(anyhow::Error::msg)?;
    let assets = GuestAssets::find();
    let mut config = backend.config(&assets);
    // Linux enables min(queue pairs, online CPUs) pairs: one vCPU per pair shows them all.
    config.vcpus = config.vcpus.max(u32::from(queues));
    let mut sb = Sandbox::prepare(backend, config).await?;
    let mut nic = sb.tap(1, queues)?;
    sb.devices
        .add(nic.network())
        .await
        .context("cold-plugging the NIC")?;
    sb.start().await?;
    sb.configure(&nic).await?;
    Ok((sb, nic))
}

async fn vmm_pid(sb: &Sandbox) -> Result<u32> {
    Ok(sb.hv.pids().await?.vmm)
}

/// Boots with a multi-queue NIC, pings the guest from the namespace, and checks the guest
/// agent's view of the NIC: its MAC and `queues` queue pairs. `inspect` sees the VMM pid and
/// the NIC while the guest runs.
pub async fn boot_ping_and_agent(
    backend: &dyn Backend,
    queues: u16,
    inspect: &dyn Fn(u32, &TestNic) -> Result<()>,
) -> Result<()> {
    let (mut sb, nic) = booted_with_nic(backend, queues).await?;
    sb.wait_ping(&nic.guest_ip, PING_LIMIT).await?;

    let ifaces = sb.agent().list_interfaces(AGENT_CALL).await?;
    let mac = nic.mac.to_string();
    let guest = ifaces
        .iter()
        .find(|i| i.mac.as_deref() == Some(mac.as_str()))
        .with_context(|| format!("the guest has no NIC with MAC {mac}: {ifaces:?}"))?;
    ensure!(guest.up, "guest NIC {} is down", guest.name);
    ensure!(
        guest.addresses.contains(&format!("{}/24", nic.guest_ip)),
        "guest NIC addresses: {:?}",
        guest.addresses
    );
    ensure!(
        guest.rx_queues == u32::from(queues) && guest.tx_queues == u32::from(queues),
        "guest sees {} rx / {} tx queues, expected {queues}",
        guest.rx_queues,
        guest.tx_queues
    );

    let pid = vmm_pid(&sb).await?;
    inspect(pid, &nic)?;
    sb.teardown(Some(pid)).await
}

/// Hot-plugs a second NIC, configures it through the agent, pings through it, then unplugs it
/// and checks the guest no longer lists it.
pub async fn nic_hotplug_and_unplug(backend: &dyn Backend) -> Result<()> {
    let (mut sb, _nic) = booted_with_nic(backend, 1).await?;
    let mut second = sb.tap(2, 2)?;
    let info = sb
        .devices
        .add(second.network())
        .await
        .context("hot-plugging the second NIC")?;
    ensure!(info.hotplugged, "{info:?} is not marked hot-plugged");
    ensure!(info.mac == Some(second.mac));

    // The guest may need a moment to probe the new PCI device: retry the configuration.
    let mut configured = None;
    for _ in 0..60 {
        match sb.configure(&second).await {
            Ok(name) => {
                configured = Some(name);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let name = configured.context("the guest never showed the hot-plugged NIC")?;
    sb.wait_ping(&second.guest_ip, PING_LIMIT).await?;

    sb.devices
        .remove(&info.id)
        .await
        .context("unplugging the second NIC")?;
    let ifaces = sb.agent().list_interfaces(AGENT_CALL).await?;
    ensure!(
        !ifaces.iter().any(|i| i.name == name),
        "the guest still lists {name} after unplug: {ifaces:?}"
    );
    ensure!(
        !sb.ping_once(&second.guest_ip).await,
        "the unplugged NIC still answers"
    );
    let pid = vmm_pid(&sb).await?;
    sb.teardown(Some(pid)).await
}

/// Hot-plugs a read-only disk holding a known pattern and reads it back in the guest.
pub async fn block_hotplug_reads_pattern(backend: &dyn Backend) -> Result<()> {
    let (mut sb, _nic) = booted_with_nic(backend, 1).await?;
    let image = sb.run_root.path().join("pattern.img");
    let pattern: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&image, &pattern)?;
    let expected = crate::run("sha256sum", &[image.to_str().expect("UTF-8 path")])?;
    let expected = expected
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();

    let before = guest_disks(&mut sb).await?;
    let info = sb
        .devices
        .add(DeviceConfig::Block(BlockConfig {
            path: image.clone(),
            read_only: true,
            driver: BlockDriver::VirtioBlkPci,
        }))
        .await
        .context("hot-plugging the disk")?;
    ensure!(info.hotplugged);

    let mut disk = None;
    for _ in 0..60 {
        let now = guest_disks(&mut sb).await?;
        if let Some(d) = now.into_iter().find(|d| !before.contains(d)) {
            disk = Some(d);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let disk = disk.context("no new disk appeared in the guest")?;
    let out = sb
        .agent()
        .exec(
            ExecRequest {
                argv: vec!["sha256sum".into(), format!("/dev/{disk}")],
                timeout_ms: Some(20_000),
            },
            AGENT_CALL,
        )
        .await?;
    ensure!(out.exit_code == Some(0), "sha256sum failed: {}", out.stderr);
    let got = out.stdout.split_whitespace().next().unwrap_or_default();
    ensure!(
        got == expected,
        "guest read {got} from /dev/{disk}, host file is {expected}"
    );

    sb.devices
        .remove(&info.id)
        .await
        .context("unplugging the disk")?;
    let after = guest_disks(&mut sb).await?;
    ensure!(!after.contains(&disk), "/dev/{disk} is still in the guest");
    let pid = vmm_pid(&sb).await?;
    sb.teardown(Some(pid)).await
}

async fn guest_disks(sb: &mut Sandbox) -> Result<Vec<String>> {
    let out = sb
        .agent()
        .exec(
            ExecRequest {
                argv: vec!["ls".into(), "/sys/block".into()],
                timeout_ms: Some(5_000),
            },
            AGENT_CALL,
        )
        .await?;
    Ok(out
        .stdout
        .split_whitespace()
        .filter(|d| d.starts_with("vd"))
        .map(String::from)
        .collect())
}

/// A paused guest stops answering ping; resumed, it answers again.
pub async fn pause_and_resume(backend: &dyn Backend) -> Result<()> {
    let (sb, nic) = booted_with_nic(backend, 1).await?;
    sb.wait_ping(&nic.guest_ip, PING_LIMIT).await?;
    sb.hv.pause().await.context("pause")?;
    ensure!(sb.hv.state().await == VmState::Paused);
    for _ in 0..3 {
        ensure!(
            !sb.ping_once(&nic.guest_ip).await,
            "a paused guest answered ping"
        );
    }
    ensure!(
        matches!(sb.hv.pause().await, Err(Error::InvalidState { .. })),
        "pausing twice must be an invalid state"
    );
    sb.hv.resume().await.context("resume")?;
    ensure!(sb.hv.state().await == VmState::Running);
    sb.wait_ping(&nic.guest_ip, PING_LIMIT).await?;
    let pid = vmm_pid(&sb).await?;
    sb.teardown(Some(pid)).await
}

/// `kill -9` of the VMM is reported by `wait_exit`, and cleanup still leaves nothing.
pub async fn vmm_killed_is_reported(backend: &dyn Backend) -> Result<()> {
    let (sb, _nic) = booted_with_nic(backend, 1).await?;
    let pid = vmm_pid(&sb).await?;
    crate::run("kill", &["-9", &pid.to_string()])?;
    let exit = tokio::time::timeout(Duration::from_secs(20), sb.hv.wait_exit())
        .await
        .context("wait_exit did not return after kill -9")??;
    ensure!(
        exit.reason == ExitReason::Killed && exit.signal == Some(9),
        "wait_exit reported {exit:?}"
    );
    ensure!(sb.hv.state().await == VmState::Stopped);
    sb.teardown(Some(pid)).await
}

/// Stop powers the guest off gracefully (where the backend can), moves to `Stopped`,
/// `wait_exit` reports it, and adding a device after is refused.
pub async fn stop_is_final(backend: &dyn Backend) -> Result<()> {
    let (sb, _nic) = booted_with_nic(backend, 1).await?;
    let pid = vmm_pid(&sb).await?;
    sb.hv.stop().await?;
    let exit = sb.hv.wait_exit().await?;
    ensure!(exit.reason == ExitReason::Stopped, "{exit:?}");
    // Graceful where the backend has a power button: the guest powered itself off. (An
    // in-process VMM without ACPI ends the vCPUs itself; teardown checks they are gone.)
    if backend.stop_powers_the_guest_off() {
        let console = sb.hv.console_log().await.context("no console log")?;
        let text = String::from_utf8_lossy(&std::fs::read(&console)?).into_owned();
        ensure!(
            text.contains("reboot: Power down"),
            "the guest did not power off by itself; console tail: {}",
            &text[text.len().saturating_sub(400)..]
        );
    }
    let mut third = sb.tap(3, 1)?;
    match sb.devices.add(third.network()).await {
        Err(Error::InvalidState {
            state: VmState::Stopped,
            ..
        }) => {}
        other => bail!("adding a device after stop gave {other:?}"),
    }
    sb.teardown(Some(pid)).await
}
