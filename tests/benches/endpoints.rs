//! Attach and detach of veth endpoints (TAP + ingress qdiscs + redirect filters), through
//! `endpoint` and, side by side, through the `ip` and `tc` commands a user would type.
//!
//! Run: `cargo bench -p workspace-tests --bench endpoints` (as root). `RUNS=N` sets the
//! number of rounds (default 30).

use std::time::{Duration, Instant};

use anyhow::Result;
use workspace_tests::{require_root, run, unique_name};

fn p(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// A pod namespace holding `n` veths whose peers sit in a node namespace.
fn pod_with_veths(n: usize) -> Result<(netdev::NetNs, netdev::NetNs)> {
    let pod = netdev::NetNs::create(&unique_name("bpod"))?;
    let node = netdev::NetNs::create(&unique_name("bnode"))?;
    for i in 0..n {
        run(
            "ip",
            &[
                "-n",
                pod.name(),
                "link",
                "add",
                &format!("eth{i}"),
                "type",
                "veth",
                "peer",
                "name",
                &format!("h{i}"),
                "netns",
                node.name(),
            ],
        )?;
        run(
            "ip",
            &["-n", pod.name(), "link", "set", &format!("eth{i}"), "up"],
        )?;
    }
    Ok((pod, node))
}

fn by_hand_attach(ns: &str, n: usize) -> Result<()> {
    for i in 0..n {
        let (veth, tap) = (format!("eth{i}"), format!("tap{i}_kata"));
        run(
            "ip",
            &["-n", ns, "tuntap", "add", &tap, "mode", "tap", "vnet_hdr"],
        )?;
        run("ip", &["-n", ns, "link", "set", &tap, "up"])?;
        for (from, to) in [(&veth, &tap), (&tap, &veth)] {
            run("tc", &["-n", ns, "qdisc", "add", "dev", from, "ingress"])?;
            run(
                "tc",
                &[
                    "-n", ns, "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all",
                    "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect",
                    "dev", to,
                ],
            )?;
        }
    }
    Ok(())
}

fn by_hand_detach(ns: &str, n: usize) -> Result<()> {
    for i in 0..n {
        run(
            "tc",
            &[
                "-n",
                ns,
                "qdisc",
                "del",
                "dev",
                &format!("eth{i}"),
                "ingress",
            ],
        )?;
        run("ip", &["-n", ns, "link", "del", &format!("tap{i}_kata")])?;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    require_root();
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    println!("endpoints: cargo bench -p workspace-tests --bench endpoints (RUNS={runs})");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    println!(
        "machine: {} cores, {cpu}, kernel {}",
        std::thread::available_parallelism()?.get(),
        run("uname", &["-r"])?.trim()
    );
    println!();
    println!("| veths | step | endpoint p50 / p99 ms | ip + tc commands p50 / p99 ms |");
    println!("| --- | --- | --- | --- |");
    for n in [1usize, 4] {
        let (pod, _node) = pod_with_veths(n)?;
        let ns = endpoint::NetnsHandle::connect(pod.path()).await?;
        let reaper = netdev::Reaper::new()?;
        let (mut attach, mut detach, mut deferred) = (Vec::new(), Vec::new(), Vec::new());
        let (mut h_attach, mut h_detach) = (Vec::new(), Vec::new());
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        for round in 0..runs {
            let t = Instant::now();
            let eps = endpoint::attach_all(&ns, &endpoint::AttachOptions::default()).await?;
            attach.push(ms(t.elapsed()));
            let t = Instant::now();
            if round % 2 == 0 {
                for ep in eps {
                    ep.detach(&ns).await?;
                }
                detach.push(ms(t.elapsed()));
            } else {
                for ep in eps {
                    ep.detach_with(&ns, Some(&reaper)).await?;
                }
                deferred.push(ms(t.elapsed()));
                reaper.flush();
            }

            let t = Instant::now();
            by_hand_attach(pod.name(), n)?;
            h_attach.push(ms(t.elapsed()));
            let t = Instant::now();
            by_hand_detach(pod.name(), n)?;
            h_detach.push(ms(t.elapsed()));
        }
        let cell = |v: &mut Vec<f64>| format!("{:.2} / {:.2}", p(v, 0.5), p(v, 0.99));
        println!(
            "| {n} | attach | {} | {} |",
            cell(&mut attach),
            cell(&mut h_attach)
        );
        println!(
            "| {n} | detach (TAP closed inline) | {} | {} |",
            cell(&mut detach),
            cell(&mut h_detach)
        );
        println!(
            "| {n} | detach (TAP closed by a netdev::Reaper) | {} | - |",
            cell(&mut deferred)
        );
    }
    Ok(())
}
