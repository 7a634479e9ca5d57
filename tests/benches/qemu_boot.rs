//! QEMU boot, hotplug and stop through this layer, side by side with QEMU started the way a
//! user would by hand (`ip tuntap add` + `ip netns exec ... qemu-system-x86_64 -netdev
//! tap,ifname=...`), both reaching the same guest agent and answering the same ping.
//!
//! Run: `cargo bench -p workspace-tests --bench qemu_boot` (as root, after
//! `make guest-assets`). `BOOTS=N` sets the number of boots per side (default 5).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_agent::client::AgentClient;
use guest_agent::protocol::InterfaceConfig;
use hypervisor::{Device, DeviceConfig, DeviceId, Hypervisor, HypervisorConfig};
use hypervisor_qemu::{QemuHypervisor, QemuOptions};
use workspace_tests::{require_root, run, unique_name, Backend, GuestAssets, Sandbox};

struct Qemu;

impl Backend for Qemu {
    fn create(&self, run_root: &Path) -> Arc<dyn Hypervisor> {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        Arc::new(QemuHypervisor::new(
            log,
            QemuOptions {
                run_root: run_root.to_path_buf(),
                ..Default::default()
            },
        ))
    }
    fn config(&self, assets: &GuestAssets) -> HypervisorConfig {
        HypervisorConfig {
            kernel: assets.kernel.clone(),
            initrd: Some(assets.initrd.clone()),
            ..Default::default()
        }
    }
    fn can_boot(&self) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Default)]
struct Samples(Vec<(&'static str, f64)>);

impl Samples {
    fn add(&mut self, name: &'static str, d: Duration) {
        self.0.push((name, d.as_secs_f64() * 1e3));
    }
    fn add_value(&mut self, name: &'static str, v: f64) {
        self.0.push((name, v));
    }
    fn p50(&self, name: &str) -> Option<(f64, f64, f64, usize)> {
        let mut v: Vec<f64> = self
            .0
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|s| s.1)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        Some((v[v.len() / 2], v[0], v[v.len() - 1], v.len()))
    }
}

async fn ping_until(ns: &str, addr: &str, limit: Duration) -> Result<()> {
    let began = Instant::now();
    while began.elapsed() < limit {
        let ok = tokio::process::Command::new("ip")
            .args([
                "netns", "exec", ns, "ping", "-c", "1", "-W", "1", "-i", "0.2", addr,
            ])
            .stdout(Stdio::null())
            .status()
            .await?
            .success();
        if ok {
            return Ok(());
        }
    }
    bail!("{addr} did not answer")
}

fn guest_nic(mac: &str, ip: &str) -> InterfaceConfig {
    InterfaceConfig {
        mac: mac.into(),
        addresses: vec![format!("{ip}/24")],
        mtu: None,
        routes: vec![],
    }
}

/// One boot through the layer: TAP by netdev, start, agent, ping, hotplug, stop.
async fn layer_once(s: &mut Samples) -> Result<()> {
    let assets = GuestAssets::find();
    let sb = Sandbox::prepare(&Qemu, Qemu.config(&assets)).await?;
    let t = Instant::now();
    let mut nic = sb.tap(1, 1)?;
    s.add("host: TAP create + up (netdev)", t.elapsed());
    sb.hv
        .add_device(Device {
            id: DeviceId::new("net0")?,
            config: DeviceConfig::Network(nic.take_config()),
        })
        .await?;

    let t0 = Instant::now();
    sb.hv.start(Duration::from_secs(60)).await?;
    s.add("host: start (spawn + QMP handshake)", t0.elapsed());
    let path = match sb.hv.agent_address().await? {
        hypervisor::AgentAddress::VirtioSerial { path } => path,
        other => bail!("unexpected agent channel {other}"),
    };
    let mut agent = AgentClient::connect_serial(&path).await?;
    agent.wait_ready(Duration::from_secs(60)).await?;
    s.add("boot: start -> agent ready", t0.elapsed());
    agent
        .configure_interface(
            guest_nic(&nic.mac.to_string(), &nic.guest_ip),
            Duration::from_secs(20),
        )
        .await?;
    ping_until(sb.ns().name(), &nic.guest_ip, Duration::from_secs(30)).await?;
    s.add("boot: start -> first ping reply", t0.elapsed());

    let pid = sb.hv.pids().await?.vmm;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    s.add_value("QEMU RSS after boot (MiB)", rss_kb / 1024.0);

    let mut second = sb.tap(2, 1)?;
    let mac = second.mac.to_string();
    let t1 = Instant::now();
    sb.hv
        .add_device(Device {
            id: DeviceId::new("net1")?,
            config: DeviceConfig::Network(second.take_config()),
        })
        .await?;
    s.add(
        "host: NIC hotplug (getfd + netdev_add + device_add)",
        t1.elapsed(),
    );
    loop {
        let ifaces = agent.list_interfaces(Duration::from_secs(10)).await?;
        if ifaces
            .iter()
            .any(|i| i.mac.as_deref() == Some(mac.as_str()))
        {
            break;
        }
        if t1.elapsed() > Duration::from_secs(30) {
            bail!("hot-plugged NIC never appeared");
        }
    }
    s.add("hotplug: add_device -> guest lists the NIC", t1.elapsed());

    let t2 = Instant::now();
    sb.hv.stop().await?;
    s.add("stop: graceful power-off + exit", t2.elapsed());
    sb.teardown(Some(pid)).await
}

/// One boot by hand: `ip tuntap add`, `ip netns exec ... qemu -netdev tap,ifname=`.
async fn by_hand_once(s: &mut Samples) -> Result<()> {
    let assets = GuestAssets::find();
    let ns = netdev::NetNs::create(&unique_name("bh"))?;
    let dir = tempfile::tempdir()?;
    let n = ns.name().to_string();
    let t = Instant::now();
    run(
        "ip",
        &["-n", &n, "tuntap", "add", "tap1", "mode", "tap", "vnet_hdr"],
    )?;
    run("ip", &["-n", &n, "link", "set", "tap1", "up"])?;
    s.add("host: TAP create + up (ip tuntap, ip link)", t.elapsed());
    run(
        "ip",
        &["-n", &n, "addr", "add", "10.1.0.1/24", "dev", "tap1"],
    )?;
    let agent_sock = dir.path().join("agent.sock");
    let t0 = Instant::now();
    let mut qemu = tokio::process::Command::new("ip")
        .args(["netns", "exec", &n, "qemu-system-x86_64"])
        .args([
            "-machine",
            "q35,accel=tcg",
            "-m",
            "256M",
            "-nodefaults",
            "-nographic",
        ])
        .args(["-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", dir.path().join("console.log").display()))
        .arg("-kernel")
        .arg(&assets.kernel)
        .arg("-initrd")
        .arg(&assets.initrd)
        .args(["-append", "console=ttyS0 reboot=t panic=-1"])
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
            "tap,id=n0,ifname=tap1,script=no,downscript=no,vhost=off",
        ])
        .args([
            "-device",
            "virtio-net-pci,netdev=n0,mac=02:00:00:00:01:02,bus=pcie.0,addr=0x2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // By hand there is nothing to wait on but the socket file appearing.
    while !agent_sock.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("QEMU never created its agent socket");
        }
    }
    let mut agent = AgentClient::connect_serial(&agent_sock).await?;
    agent.wait_ready(Duration::from_secs(60)).await?;
    s.add("boot: start -> agent ready", t0.elapsed());
    agent
        .configure_interface(
            guest_nic("02:00:00:00:01:02", "10.1.0.2"),
            Duration::from_secs(20),
        )
        .await?;
    ping_until(&n, "10.1.0.2", Duration::from_secs(30)).await?;
    s.add("boot: start -> first ping reply", t0.elapsed());
    qemu.kill().await.context("killing QEMU")?;
    run("ip", &["-n", &n, "link", "del", "tap1"]).ok();
    ns.delete()?;
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let kernel = run("uname", &["-r"]).unwrap_or_default();
    format!(
        "{} cores, {cpu}, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    require_root();
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let boots: usize = std::env::var("BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    println!("qemu_boot: cargo bench -p workspace-tests --bench qemu_boot (BOOTS={boots})");
    println!("machine: {}", machine());
    println!(
        "QEMU under TCG, q35, 1 vCPU, 256 MiB; guest: Debian cloud kernel + busybox initramfs"
    );

    let mut layer = Samples::default();
    let mut by_hand = Samples::default();
    // Interleaved, so drift in the machine's load hits both sides alike.
    for i in 0..boots {
        layer_once(&mut layer)
            .await
            .with_context(|| format!("layer boot {i}"))?;
        by_hand_once(&mut by_hand)
            .await
            .with_context(|| format!("by-hand boot {i}"))?;
    }

    println!();
    println!("| metric | this layer p50 (min-max) | by hand p50 (min-max) |");
    println!("| --- | --- | --- |");
    let mut names: Vec<&str> = layer
        .0
        .iter()
        .chain(by_hand.0.iter())
        .map(|s| s.0)
        .collect();
    names.dedup();
    let mut seen = Vec::new();
    for name in names {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let cell = |s: &Samples| match s.p50(name) {
            Some((p50, min, max, n)) => format!("{p50:.1} ({min:.1}-{max:.1}, n={n})"),
            None => "-".into(),
        };
        let unit = if name.contains("MiB") { "" } else { " ms" };
        println!("| {name}{unit} | {} | {} |", cell(&layer), cell(&by_hand));
    }
    Ok(())
}
