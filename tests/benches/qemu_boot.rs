//! QEMU boot, hotplug and stop through this layer, side by side with QEMU started the way a
//! user would by hand (`ip tuntap add` + `ip netns exec ... qemu-system-x86_64 -netdev
//! tap,ifname=...`, hotplug with QMP `netdev_add ifname=` + `device_add`), both reaching the
//! same guest agent and answering the same ping. Both sides use the accelerator and vhost-net
//! setting the layer picks on this host, and the same guest hardware.
//!
//! Run: `cargo bench -p workspace-tests --bench qemu_boot` (as root, after
//! `make guest-assets guest-assets-debian`). `BOOTS=N` sets the number of boots per side (default 5);
//! `BENCH_QUICK=1` does one boot per side unless `BOOTS` says otherwise, to check that the
//! benchmark runs (its numbers are not results).
//!
//! A third side is the layer with the q35 guest as it was before the lean cold boot:
//! Debian's packaged cloud kernel with its modules (`make guest-assets-debian`), the
//! backend's own kernel parameters only (no [`LEAN_KERNEL_PARAMS`]), QEMU's default firmware
//! (SeaBIOS, not qboot) and translation buffer size, set through [`QemuOptions`], and the
//! initramfs gzip-compressed (`gzip -6n`) as `make guest-assets` wrote it then. The layer's
//! and the by-hand sides boot the current default (the kernel built for the job, lean
//! parameters, qboot, a 32 MiB translation buffer under TCG, the initramfs uncompressed). A
//! fourth side is the layer's default with Debian's kernel instead: what the kernel built for
//! the job is worth on its own, against the kernel a user would otherwise pick.
//!
//! It ends with the issues' goals: the layer adds less than 50 ms to a boot and less than
//! 100 ms to a NIC hotplug, each the difference of the p50s of the same span on the layer's
//! and the by-hand side; and a cold boot to agent ready at least 25% faster than the old q35
//! default, the p50s of that span on the layer's two sides.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_agent::client::AgentClient;
use guest_agent::protocol::InterfaceConfig;
use hypervisor::{Accelerator, AgentChannelKind};
use hypervisor_qemu::cmdline::{Accel, LEAN_KERNEL_PARAMS, QBOOT};
use hypervisor_qemu::host::HostFeatures;
use hypervisor_qemu::qmp::QmpClient;
use hypervisor_qemu::{QemuOptions, DEFAULT_TB_SIZE_MIB};
use serde_json::json;
use workspace_tests::bench::Samples;
use workspace_tests::qemu::{Kept, Qemu};
use workspace_tests::{machine, require_root, run, unique_name, Backend, GuestAssets, Sandbox};

/// How often the guest agent is asked whether a hot-plugged NIC is there and up.
const POLL: Duration = Duration::from_millis(10);

/// Boot span compared for the first goal.
const BOOT_SPAN: &str = "boot: TAP create -> first ping reply";
/// Hotplug span compared for the second goal.
const HOTPLUG_SPAN: &str = "hotplug: TAP create -> guest link up";
/// Boot span compared for the third goal.
const READY_SPAN: &str = "boot: start -> agent ready";
/// The backend's own kernel parameters, as the by-hand side writes them.
const BASE_PARAMS: &str = "console=ttyS0 reboot=t panic=-1";

/// The layer's side: q35 (1 vCPU and 256 MiB, the defaults) without the test harness's log
/// lines, which would weigh on the timings, and with the agent on virtio-serial as on the
/// by-hand side (vsock would change the guest hardware).
fn layer_backend() -> Kept {
    Kept::new(Qemu::Q35)
        .logger(|| slog::Logger::root(slog::Discard, slog::o!()))
        .adjust(|config| config.agent_channel = AgentChannelKind::VirtioSerial)
}

/// The layer's side with the q35 guest as it booted before the lean cold boot: Debian's
/// kernel, no lean kernel parameters, QEMU's default firmware.
fn old_default_backend() -> Kept {
    layer_backend()
        .options(|root| QemuOptions {
            boot_params: String::new(),
            q35_firmware: None,
            tcg_tb_size_mib: None,
            ..Qemu::options(root)
        })
        .adjust(|config| {
            config.agent_channel = AgentChannelKind::VirtioSerial;
            config.kernel = GuestAssets::debian().kernel;
            config.initrd = OLD_INITRD.get().cloned();
        })
}

/// The Debian guest's initramfs gzip-compressed, as the old default booted it (made by
/// [`main`]).
static OLD_INITRD: OnceLock<PathBuf> = OnceLock::new();

/// The layer's default with Debian's packaged kernel and its modules.
fn debian_kernel_backend() -> Kept {
    layer_backend().adjust(|config| {
        let debian = GuestAssets::debian();
        config.agent_channel = AgentChannelKind::VirtioSerial;
        config.kernel = debian.kernel;
        config.initrd = Some(debian.initrd);
    })
}

/// Writes `initrd` gzip-compressed into `dir` as `make guest-assets` used to.
fn gzip_initrd(initrd: &std::path::Path, dir: &std::path::Path) -> Result<PathBuf> {
    let out = dir.join("initramfs.img.gz");
    let status = std::process::Command::new("gzip")
        .args(["-6n"])
        .stdin(std::fs::File::open(initrd).with_context(|| format!("opening {initrd:?}"))?)
        .stdout(std::fs::File::create(&out)?)
        .status()
        .context("running gzip")?;
    if !status.success() {
        bail!("gzip of {initrd:?} failed: {status}");
    }
    Ok(out)
}

/// CPU time (user + system) QEMU process `pid` has used so far, in seconds: on a busy
/// machine the wall time of a boot stretches, its CPU time much less.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) start with field 3, state.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.len() < 13 {
        bail!("/proc/{pid}/stat has too few fields: {stat}");
    }
    let ticks = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?
        .context("no clock tick rate")? as f64;
    Ok(ticks / hz)
}

async fn ping_until(ns: &str, addr: &str, limit: Duration) -> Result<()> {
    let began = Instant::now();
    while began.elapsed() < limit {
        let ok = tokio::process::Command::new("ip")
            .args([
                "netns", "exec", ns, "ping", "-c", "1", "-W", "1", "-i", "0.2", addr,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?
            .success();
        if ok {
            return Ok(());
        }
        // A ping that fails at once (no route yet) must not turn this into a busy loop.
        tokio::time::sleep(POLL).await;
    }
    bail!("{addr} did not answer")
}

/// Waits until the guest lists a NIC with `mac`, configures it through the agent (which
/// sets it up), and waits until the guest reports its link up (`operstate` "up"). Polls the
/// agent every [`POLL`].
async fn guest_link_up(agent: &mut AgentClient, mac: &str, ip: &str) -> Result<()> {
    let began = Instant::now();
    let limit = Duration::from_secs(60);
    let mut configured = false;
    loop {
        let ifaces = agent.list_interfaces(Duration::from_secs(10)).await?;
        match ifaces.iter().find(|i| i.mac.as_deref() == Some(mac)) {
            Some(i) if i.up && i.operstate == "up" => return Ok(()),
            Some(_) if !configured => {
                agent
                    .configure_interface(guest_nic(mac, ip), Duration::from_secs(20))
                    .await?;
                configured = true;
                continue;
            }
            _ => {}
        }
        if began.elapsed() > limit {
            bail!("the guest never saw the link of {mac} up within {limit:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The accelerator and vhost-net use the layer picks here, for the by-hand side to match.
struct HostChoice {
    accel: Accel,
    why: String,
    vhost: bool,
}

fn host_choice() -> Result<HostChoice> {
    let host = HostFeatures::probe();
    let (accel, why) = host.choose_accel(Accelerator::Auto)?;
    Ok(HostChoice {
        accel,
        why,
        vhost: host.vhost_net,
    })
}

fn guest_nic(mac: &str, ip: &str) -> InterfaceConfig {
    InterfaceConfig {
        mac: mac.into(),
        set_mac: None,
        addresses: vec![format!("{ip}/24")],
        mtu: None,
        routes: vec![],
    }
}

/// One boot through the layer (`backend`): TAP by netdev, start, agent, ping, hotplug, stop.
async fn layer_once(s: &mut Samples, backend: Kept) -> Result<()> {
    let assets = GuestAssets::find();
    let sb = Sandbox::prepare(&backend, backend.config(&assets)).await?;
    let t = Instant::now();
    let mut nic = sb.tap(1, 1)?;
    s.add("host: TAP create + up", t.elapsed());
    sb.devices.add(nic.network()).await?;

    let t0 = Instant::now();
    sb.hv.start(Duration::from_secs(60)).await?;
    s.add("host: start (spawn + QMP handshake)", t0.elapsed());
    let path = match sb.hv.agent_address().await? {
        hypervisor::AgentAddress::VirtioSerial { path } => path,
        other => bail!("unexpected agent channel {other}"),
    };
    let mut agent = AgentClient::connect_serial(&path).await?;
    agent.wait_ready(Duration::from_secs(60)).await?;
    s.add(READY_SPAN, t0.elapsed());
    let pid = sb.hv.pids().await?.vmm;
    s.add_value("QEMU CPU time to agent ready (s)", cpu_seconds(pid)?);
    agent
        .configure_interface(
            guest_nic(&nic.mac.to_string(), &nic.guest_ip),
            Duration::from_secs(20),
        )
        .await?;
    ping_until(sb.ns().name(), &nic.guest_ip, Duration::from_secs(30)).await?;
    s.add("boot: start -> first ping reply", t0.elapsed());
    s.add(BOOT_SPAN, t.elapsed());

    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    s.add_value("QEMU RSS after boot (MiB)", rss_kb / 1024.0);

    let t1 = Instant::now();
    let mut second = sb.tap(2, 1)?;
    let mac = second.mac.to_string();
    let t2 = Instant::now();
    sb.devices.add(second.network()).await?;
    s.add(
        "host: NIC hotplug (getfd + netdev_add + device_add)",
        t2.elapsed(),
    );
    guest_link_up(&mut agent, &mac, &second.guest_ip).await?;
    s.add(HOTPLUG_SPAN, t1.elapsed());

    let t3 = Instant::now();
    sb.hv.stop().await?;
    s.add("stop: graceful power-off + exit", t3.elapsed());
    sb.teardown(Some(pid)).await
}

/// One boot by hand: `ip tuntap add`, `ip netns exec ... qemu -netdev tap,ifname=`, then a
/// hotplug with QMP `netdev_add ifname=` + `device_add` into a free root port.
async fn by_hand_once(s: &mut Samples, host: &HostChoice) -> Result<()> {
    let assets = GuestAssets::find();
    let ns = netdev::NetNs::create(&unique_name("bh"))?;
    let dir = tempfile::tempdir()?;
    let n = ns.name().to_string();
    let vhost = if host.vhost { "on" } else { "off" };
    let t = Instant::now();
    run(
        "ip",
        &["-n", &n, "tuntap", "add", "tap1", "mode", "tap", "vnet_hdr"],
    )?;
    run("ip", &["-n", &n, "link", "set", "tap1", "up"])?;
    s.add("host: TAP create + up", t.elapsed());
    run(
        "ip",
        &["-n", &n, "addr", "add", "10.1.0.1/24", "dev", "tap1"],
    )?;
    let agent_sock = dir.path().join("agent.sock");
    let qmp_sock = dir.path().join("qmp.sock");
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &n, "qemu-system-x86_64"]);
    match host.accel {
        Accel::Tcg => cmd
            .args(["-machine", "q35", "-accel"])
            .arg(format!("tcg,tb-size={DEFAULT_TB_SIZE_MIB}")),
        Accel::Kvm => cmd.args(["-machine", "q35,accel=kvm"]),
    };
    if host.accel == Accel::Kvm {
        cmd.args(["-cpu", "host"]);
    }
    cmd.args(["-bios", QBOOT])
        .args(["-m", "256M", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", dir.path().join("console.log").display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            qmp_sock.display()
        ))
        .args(["-mon", "chardev=qmp,mode=control"])
        .arg("-kernel")
        .arg(&assets.kernel)
        .arg("-initrd")
        .arg(&assets.initrd)
        .args(["-append", &format!("{BASE_PARAMS} {LEAN_KERNEL_PARAMS}")])
        // The same guest hardware as the layer's q35: four free root ports for hotplug.
        .args([
            "-device",
            "pcie-root-port,id=rp0,bus=pcie.0,addr=0x3,chassis=3,slot=3",
        ])
        .args([
            "-device",
            "pcie-root-port,id=rp1,bus=pcie.0,addr=0x4,chassis=4,slot=4",
        ])
        .args([
            "-device",
            "pcie-root-port,id=rp2,bus=pcie.0,addr=0x5,chassis=5,slot=5",
        ])
        .args([
            "-device",
            "pcie-root-port,id=rp3,bus=pcie.0,addr=0x6,chassis=6,slot=6",
        ])
        .args(["-device", "virtio-serial-pci", "-chardev"])
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            agent_sock.display()
        ))
        .args(["-device", "virtserialport,chardev=agent,name=agent.0"])
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname=tap1,script=no,downscript=no,vhost={vhost}"),
        ])
        // No option ROM, as on the layer's NICs: with one, this side's boot took about 140 ms
        // longer (BENCHMARKS.md).
        .args([
            "-device",
            "virtio-net-pci,netdev=n0,mac=02:00:00:00:01:02,bus=pcie.0,addr=0x2,romfile=",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let t0 = Instant::now();
    let mut qemu = cmd.spawn()?;
    // `ip netns exec` execs QEMU in its own process.
    let pid = qemu.id().context("QEMU's pid")?;
    // By hand there is nothing to wait on but the socket files appearing.
    while !agent_sock.exists() || !qmp_sock.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("QEMU never created its sockets");
        }
    }
    let qmp = QmpClient::connect(&qmp_sock, Duration::from_secs(10)).await?;
    let mut agent = AgentClient::connect_serial(&agent_sock).await?;
    agent.wait_ready(Duration::from_secs(60)).await?;
    s.add(READY_SPAN, t0.elapsed());
    s.add_value("QEMU CPU time to agent ready (s)", cpu_seconds(pid)?);
    agent
        .configure_interface(
            guest_nic("02:00:00:00:01:02", "10.1.0.2"),
            Duration::from_secs(20),
        )
        .await?;
    ping_until(&n, "10.1.0.2", Duration::from_secs(30)).await?;
    s.add("boot: start -> first ping reply", t0.elapsed());
    s.add(BOOT_SPAN, t.elapsed());

    let q = Duration::from_secs(10);
    let t1 = Instant::now();
    run(
        "ip",
        &["-n", &n, "tuntap", "add", "tap2", "mode", "tap", "vnet_hdr"],
    )?;
    run("ip", &["-n", &n, "link", "set", "tap2", "up"])?;
    run(
        "ip",
        &["-n", &n, "addr", "add", "10.2.0.1/24", "dev", "tap2"],
    )?;
    qmp.execute(
        "netdev_add",
        Some(
            json!({"type": "tap", "id": "n1", "ifname": "tap2", "script": "no",
            "downscript": "no", "vhost": host.vhost}),
        ),
        q,
    )
    .await?;
    qmp.execute(
        "device_add",
        Some(
            json!({"driver": "virtio-net-pci", "id": "dev-n1", "netdev": "n1",
            "mac": "02:00:00:00:02:02", "bus": "rp0", "addr": "0x0"}),
        ),
        q,
    )
    .await?;
    guest_link_up(&mut agent, "02:00:00:00:02:02", "10.2.0.2").await?;
    s.add(HOTPLUG_SPAN, t1.elapsed());

    qemu.kill().await.context("killing QEMU")?;
    run("ip", &["-n", &n, "link", "del", "tap1"]).ok();
    run("ip", &["-n", &n, "link", "del", "tap2"]).ok();
    ns.delete()?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    require_root();
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let boots: usize = std::env::var("BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 5 });
    let host = host_choice()?;
    println!("qemu_boot: cargo bench -p workspace-tests --bench qemu_boot (BOOTS={boots})");
    if quick {
        println!("BENCH_QUICK=1: a smoke run; these numbers are not results");
    }
    println!("machine: {}", machine());
    println!(
        "QEMU under {} ({}), vhost-net {}, q35, 1 vCPU, 256 MiB, virtio-serial agent, on every side; guest: busybox initramfs with the agent",
        host.accel.as_str().to_uppercase(),
        host.why,
        if host.vhost { "on" } else { "off" }
    );
    println!(
        "this layer and by hand: the kernel built for the job (make guest-assets), -bios {QBOOT}, tb-size={DEFAULT_TB_SIZE_MIB} under TCG, kernel parameters \"{BASE_PARAMS} {LEAN_KERNEL_PARAMS}\""
    );
    println!(
        "old q35 default: Debian's kernel and its modules, QEMU's default firmware and tb-size, kernel parameters \"{BASE_PARAMS}\", the initramfs gzip -6n"
    );
    let debian = GuestAssets::debian();
    println!(
        "Debian's kernel: {} and {} (make guest-assets-debian)",
        debian.kernel.display(),
        debian.initrd.display()
    );
    println!("load average before: {}", load_average());

    let old_dir = tempfile::tempdir()?;
    let old_initrd = gzip_initrd(&debian.initrd, old_dir.path())?;
    OLD_INITRD
        .set(old_initrd)
        .map_err(|_| anyhow::anyhow!("the old initramfs is set once"))?;

    let mut layer = Samples::default();
    let mut by_hand = Samples::default();
    let mut old = Samples::default();
    let mut packaged = Samples::default();
    // Interleaved, so drift in the machine's load hits every side alike.
    for i in 0..boots {
        layer_once(&mut layer, layer_backend())
            .await
            .with_context(|| format!("layer boot {i}"))?;
        by_hand_once(&mut by_hand, &host)
            .await
            .with_context(|| format!("by-hand boot {i}"))?;
        layer_once(&mut old, old_default_backend())
            .await
            .with_context(|| format!("old-default boot {i}"))?;
        layer_once(&mut packaged, debian_kernel_backend())
            .await
            .with_context(|| format!("Debian-kernel boot {i}"))?;
    }
    println!("load average after: {}", load_average());

    println!();
    println!(
        "| metric | this layer p50 (min-max) | by hand p50 (min-max) | this layer, old q35 default p50 (min-max) | this layer, Debian's kernel p50 (min-max) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let mut seen = Vec::new();
    for name in layer.names().chain(by_hand.names()) {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let seconds = name.contains("(s)");
        let cell = |s: &Samples| match s.p50(name) {
            Some((p50, min, max, n)) if seconds => {
                format!("{p50:.2} ({min:.2}-{max:.2}, n={n})")
            }
            Some((p50, min, max, n)) => format!("{p50:.1} ({min:.1}-{max:.1}, n={n})"),
            None => "-".into(),
        };
        let unit = if name.contains("MiB") || seconds {
            ""
        } else {
            " ms"
        };
        println!(
            "| {name}{unit} | {} | {} | {} | {} |",
            cell(&layer),
            cell(&by_hand),
            cell(&old),
            cell(&packaged)
        );
    }

    println!();
    for (goal, span, limit_ms) in [
        ("the layer adds < 50 ms to a boot", BOOT_SPAN, 50.0),
        (
            "the layer adds < 100 ms to a NIC hotplug",
            HOTPLUG_SPAN,
            100.0,
        ),
    ] {
        let (Some((ours, ..)), Some((theirs, ..))) = (layer.p50(span), by_hand.p50(span)) else {
            println!("goal: {goal}: not measured");
            continue;
        };
        let diff = ours - theirs;
        println!(
            "goal: {goal} ({span}, p50): layer {ours:.1} ms, by hand {theirs:.1} ms, difference {diff:+.1} ms: {}",
            if diff < limit_ms { "met" } else { "NOT met" }
        );
        if quick {
            println!("  (BENCH_QUICK=1, {boots} boot(s): not a result)");
        }
    }
    let goal = "a cold boot to agent ready at least 25% faster than the old q35 default";
    for (side, samples) in [("now", &layer), ("with Debian's kernel", &packaged)] {
        match (samples.p50(READY_SPAN), old.p50(READY_SPAN)) {
            (Some((new, ..)), Some((before, ..))) => {
                let cut = 100.0 * (before - new) / before;
                println!(
                    "goal: {goal} ({READY_SPAN}, p50): {side} {new:.1} ms, old default {before:.1} ms, {cut:.1}% faster: {}",
                    if cut >= 25.0 { "met" } else { "NOT met" }
                );
                if quick {
                    println!("  (BENCH_QUICK=1, {boots} boot(s): not a result)");
                }
            }
            _ => println!("goal: {goal}: {side}: not measured"),
        }
    }
    Ok(())
}

/// The 1-minute load average, to say how busy the machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "unknown".into())
}
