//! Soak: many TAP create/delete cycles and many sandbox start/stop cycles in one process,
//! with the process's own fd count, thread count and RSS printed first vs last, and nothing
//! left on the host. `make soak` runs it (root, the guest of `make guest-assets`); it is not
//! part of `make test`.
//!
//! ```text
//! cargo run --profile bench -p workspace-tests --example soak -- [TAP_CYCLES] [SANDBOX_CYCLES]
//! ```
//!
//! Defaults: 1000 TAP cycles, 200 sandbox cycles. Exits non-zero when the fd count grew,
//! when a TAP, namespace, QEMU process or run file is left, or when a cycle failed.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use workspace_tests::qemu::Qemu;
use workspace_tests::{require_root, unique_name, Backend, GuestAssets, Sandbox};

/// The process's own resources at one moment.
#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

impl Usage {
    fn now() -> Result<Usage> {
        let fds = std::fs::read_dir("/proc/self/fd")?.count();
        let threads = std::fs::read_dir("/proc/self/task")?.count();
        let status = std::fs::read_to_string("/proc/self/status")?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS in /proc/self/status")?;
        Ok(Usage {
            fds,
            threads,
            rss_kib,
        })
    }
}

/// Prints first vs last and fails when fds grew or threads grew beyond the runtime's pool.
fn report(what: &str, cycles: usize, first: Usage, last: Usage, took: Duration) -> Result<()> {
    println!(
        "{what}: {cycles} cycles in {:.1} s ({:.1} ms/cycle)",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e3 / cycles as f64
    );
    println!("  {:<8} {:>10} {:>10}", "", "first", "last");
    println!("  {:<8} {:>10} {:>10}", "fds", first.fds, last.fds);
    println!(
        "  {:<8} {:>10} {:>10}",
        "threads", first.threads, last.threads
    );
    println!(
        "  {:<8} {:>10} {:>10}",
        "RSS KiB", first.rss_kib, last.rss_kib
    );
    ensure!(
        last.fds <= first.fds,
        "{what}: the fd count grew from {} to {}",
        first.fds,
        last.fds
    );
    // tokio's blocking pool starts and ends threads on demand; a leak grows without bound.
    ensure!(
        last.threads <= first.threads + 4,
        "{what}: the thread count grew from {} to {}",
        first.threads,
        last.threads
    );
    Ok(())
}

fn taps_in(ns: &netdev::NetNs) -> Result<usize> {
    let out = workspace_tests::run(
        "ip",
        &["-n", ns.name(), "-o", "link", "show", "type", "tun"],
    )?;
    Ok(out.lines().count())
}

/// Creates and deletes a two-queue TAP `cycles` times in a namespace of its own.
fn tap_cycles(cycles: usize) -> Result<()> {
    let ns = netdev::NetNs::create(&unique_name("soak"))?;
    let mut first = None;
    let began = Instant::now();
    for i in 0..cycles {
        let tap = netdev::TapBuilder::new("soak0")
            .queues(2)
            .multi_queue(true)
            .netns(ns.path())
            .up(true)
            .create()
            .with_context(|| format!("TAP cycle {i}"))?;
        drop(tap);
        if i == 0 {
            first = Some(Usage::now()?);
        }
    }
    let last = Usage::now()?;
    let took = began.elapsed();
    // The last close unregisters the device after an RCU grace period.
    let deadline = Instant::now() + Duration::from_secs(5);
    while taps_in(&ns)? > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = taps_in(&ns)?;
    ns.delete()?;
    report(
        "netdev TAP create/delete",
        cycles,
        first.expect("at least one cycle"),
        last,
        took,
    )?;
    ensure!(left == 0, "{left} TAP(s) left after the cycles");
    Ok(())
}

/// One sandbox: namespace, TAP, boot, agent, guest NIC configured, one ping, stop, cleanup,
/// checked empty by the test library's teardown.
async fn sandbox_cycle(assets: &GuestAssets) -> Result<()> {
    let mut sb = Sandbox::prepare(&Qemu::Q35, Qemu::Q35.config(assets)).await?;
    let mut nic = sb.tap(1, 1)?;
    sb.devices.add(nic.network()).await?;
    sb.start().await?;
    sb.configure(&nic).await?;
    sb.wait_ping(&nic.guest_ip, Duration::from_secs(20)).await?;
    let pid = sb.hv.pids().await?.vmm;
    sb.teardown(Some(pid)).await
}

async fn sandbox_cycles(cycles: usize) -> Result<()> {
    let assets = GuestAssets::find();
    Qemu::Q35.can_boot().map_err(anyhow::Error::msg)?;
    let mut first = None;
    let began = Instant::now();
    for i in 0..cycles {
        sandbox_cycle(&assets)
            .await
            .with_context(|| format!("sandbox cycle {i}"))?;
        if i == 0 {
            first = Some(Usage::now()?);
        }
        if (i + 1) % 20 == 0 {
            let u = Usage::now()?;
            println!(
                "  after {:>3}: fds {} threads {} RSS {} KiB",
                i + 1,
                u.fds,
                u.threads,
                u.rss_kib
            );
        }
    }
    let last = Usage::now()?;
    report(
        "sandbox start/stop (QEMU, TCG)",
        cycles,
        first.expect("at least one cycle"),
        last,
        began.elapsed(),
    )
}

/// QEMU processes and namespaces this soak may have left (its names start with `sb`/`soak`
/// and the process id).
fn leftovers() -> Result<()> {
    let tag = (std::process::id() % 100_000).to_string();
    let ns = workspace_tests::run("ip", &["netns", "list"])?;
    let ours: Vec<&str> = ns
        .lines()
        .filter(|l| l.starts_with(&format!("sb{tag}-")) || l.starts_with(&format!("soak{tag}-")))
        .collect();
    ensure!(ours.is_empty(), "namespaces left: {ours:?}");
    let qemus = std::process::Command::new("pgrep")
        .args(["-f", &format!("sandbox-sb{tag}-")])
        .output()?;
    ensure!(
        qemus.stdout.is_empty(),
        "QEMU processes left: {}",
        String::from_utf8_lossy(&qemus.stdout)
    );
    Ok(())
}

fn main() -> Result<()> {
    require_root();
    let mut args = std::env::args().skip(1);
    let tap_n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let sandbox_n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    println!(
        "soak on {} ({} cores): {tap_n} TAP cycles, {sandbox_n} sandbox cycles",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if tap_n > 0 {
        tap_cycles(tap_n)?;
    }
    if sandbox_n > 0 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(sandbox_cycles(sandbox_n))?;
    }
    leftovers()?;
    println!("soak: nothing left behind");
    Ok(())
}
