//! Containers in a running VM, against the same container under Debian's `runc` on the host.
//!
//! Layer side: one QEMU q35 guest under TCG (1 vCPU, 256 MiB) with the sandbox share on
//! virtio-fs, mounted by the agent at `/run/kata-containers/shared`; each run creates a
//! container whose root is a busybox directory of the share, starts it, and times
//! `create_container` + `start_container` until the first byte of its stdout reaches the host;
//! then a container writes `BYTES` of `/dev/zero` to stdout and the host reads it all
//! (throughput from the first byte to EOF, so the start is not counted; MB/s = 10^6 bytes/s). Anchor: `runc run` (its own state root in a temp dir)
//! on a bundle with the same busybox rootfs and a `runc spec` config.json without a terminal,
//! the same commands, the same spans (spawn of `runc run` to the first byte; first byte to EOF).
//!
//! Run: `cargo bench -p workspace-tests --bench containers` (as root, after
//! `make guest-assets` and `make deps`, which installs runc). `RUNS=N` sets the number of
//! start runs per side (default 10), `BYTES=N` the throughput volume (default 64 MiB);
//! `BENCH_QUICK=1` does 2 runs of 4 MiB, to check that the benchmark runs (its numbers are not
//! results).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use guest_agent::client::AgentClient;
use guest_agent::protocol::{CreateContainer, StdioRequest};
use hypervisor::SharedFsKind;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use workspace_tests::bench::Samples;
use workspace_tests::containers::{boot_with_share, busybox_rootfs, guest_rootfs, spec_json, CALL};
use workspace_tests::qemu::{Kept, Qemu};
use workspace_tests::{machine, require_root, run};

const FIRST_BYTE: &str = "create + start -> first stdout byte";
const THROUGHPUT: &str = "stdout throughput, first byte -> EOF, MB/s";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn zero_args(bytes: u64) -> Vec<String> {
    vec![
        "head".into(),
        "-c".into(),
        bytes.to_string(),
        "/dev/zero".into(),
    ]
}

async fn create(
    agent: &AgentClient,
    id: &str,
    spec: &Value,
) -> Result<guest_agent::client::ProcessStdio> {
    Ok(agent
        .create_container(
            CreateContainer {
                container_id: id.into(),
                rootfs: guest_rootfs(id),
                spec: spec.to_string(),
                stdio: StdioRequest::default(),
            },
            CALL,
        )
        .await?)
}

/// One container in the VM: `echo hi`, timed from create to the first stdout byte.
async fn layer_start(agent: &AgentClient, id: &str, s: &mut Samples) -> Result<()> {
    let spec = spec_json(&["echo", "hi"]);
    let began = Instant::now();
    let io = create(agent, id, &spec).await?;
    agent.start_container(id, CALL).await?;
    let mut stdout = io.stdout.context("no stdout")?;
    let mut byte = [0u8; 1];
    ensure!(stdout.read(&mut byte).await? == 1, "no output from {id}");
    s.add_value(FIRST_BYTE, ms(began.elapsed()));
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).await?;
    ensure!(
        byte[0] == b'h' && rest == b"i\n",
        "{id} printed something else"
    );
    let exit = agent
        .wait_process(id, None, Duration::from_secs(60))
        .await?;
    ensure!(exit.exit_code == Some(0), "{exit:?}");
    agent.delete_container(id, CALL).await?;
    Ok(())
}

/// `head -c BYTES /dev/zero` in the VM, read to the end on the host.
async fn layer_throughput(
    agent: &AgentClient,
    id: &str,
    bytes: u64,
    s: &mut Samples,
) -> Result<()> {
    let args = zero_args(bytes);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let io = create(agent, id, &spec_json(&args)).await?;
    agent.start_container(id, CALL).await?;
    let mut stdout = io.stdout.context("no stdout")?;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    let mut first = None;
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    let first = first.context("no output")?;
    ensure!(total == bytes, "read {total} of {bytes} bytes");
    s.add_value(THROUGHPUT, mbps(bytes, first.elapsed()));
    let exit = agent
        .wait_process(id, None, Duration::from_secs(60))
        .await?;
    ensure!(exit.exit_code == Some(0), "{exit:?}");
    agent.delete_container(id, CALL).await?;
    Ok(())
}

/// A runc bundle in `dir`: the busybox rootfs and `runc spec`'s config.json without a
/// terminal, running `args`.
fn runc_bundle(dir: &Path, args: &[String]) -> Result<()> {
    let bundle = dir.to_str().context("a UTF-8 path")?;
    if !dir.join("config.json").exists() {
        run("runc", &["spec", "--bundle", bundle])?;
    }
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["process"]["terminal"] = Value::Bool(false);
    config["process"]["args"] = serde_json::to_value(args)?;
    std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
    Ok(())
}

/// `runc run` of the bundle; the time to the first stdout byte and to EOF, and the bytes.
async fn runc_run(root: &Path, bundle: &Path, id: &str) -> Result<(Duration, Duration, u64)> {
    let began = Instant::now();
    let mut child = tokio::process::Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning runc")?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let mut buf = vec![0u8; 256 << 10];
    let mut first = None;
    let mut total = 0u64;
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| began.elapsed());
        total += n as u64;
    }
    let end = began.elapsed();
    let out = child.wait_with_output().await?;
    ensure!(
        out.status.success(),
        "runc run {id}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((first.context("runc printed nothing")?, end, total))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    require_root();
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let runs = env("RUNS", if quick { 2 } else { 10 }) as usize;
    let bytes = env("BYTES", if quick { 4 << 20 } else { 64 << 20 });
    let runc_version = run("runc", &["--version"])
        .context("runc is missing: run `make deps` (Debian package runc)")?;
    println!(
        "containers: cargo bench -p workspace-tests --bench containers (RUNS={runs}, BYTES={bytes})"
    );
    if quick {
        println!("BENCH_QUICK=1: a smoke run; these numbers are not results");
    }
    println!("machine: {}", machine());
    println!(
        "VM: QEMU q35 under TCG, 1 vCPU, 256 MiB, virtio-serial agent, rootfs on virtio-fs; host: {}",
        runc_version.lines().next().unwrap_or("runc")
    );

    // Root filesystems first, so copying busybox is not timed.
    let share = tempfile::tempdir()?;
    for i in 0..runs {
        busybox_rootfs(share.path(), &format!("start{i}"))?;
    }
    busybox_rootfs(share.path(), "throughput")?;
    let host = tempfile::tempdir()?;
    let runc_root = host.path().join("state");
    let bundle = host.path().join("bundle");
    busybox_rootfs(host.path(), "bundle")?;

    let backend = Kept::new(Qemu::Q35)
        .logger(|| slog::Logger::root(slog::Discard, slog::o!()))
        .adjust(|c| c.shared_fs = SharedFsKind::VirtioFs);
    let mut sb = boot_with_share(&backend, share.path(), vec![]).await?;
    let agent = sb.agent().clone();

    let mut layer = Samples::default();
    let mut anchor = Samples::default();
    let echo = vec!["echo".to_string(), "hi".to_string()];
    // Interleaved, so drift in the machine's load hits both sides alike.
    for i in 0..runs {
        layer_start(&agent, &format!("start{i}"), &mut layer)
            .await
            .with_context(|| format!("container start {i}"))?;
        runc_bundle(&bundle, &echo)?;
        let (first, _, _) = runc_run(&runc_root, &bundle, &format!("bench-start{i}")).await?;
        anchor.add_value(FIRST_BYTE, ms(first));
    }
    layer_throughput(&agent, "throughput", bytes, &mut layer).await?;
    runc_bundle(&bundle, &zero_args(bytes))?;
    let (first, end, total) = runc_run(&runc_root, &bundle, "bench-throughput").await?;
    ensure!(total == bytes, "runc: read {total} of {bytes} bytes");
    anchor.add_value(THROUGHPUT, mbps(bytes, end - first));

    let pid = sb.hv.pids().await?.vmm;
    sb.teardown(Some(pid)).await?;

    println!();
    println!("| metric | in the VM p50 (min-max) | runc on the host p50 (min-max) |");
    println!("| --- | --- | --- |");
    for name in [FIRST_BYTE, THROUGHPUT] {
        let cell = |s: &Samples| match s.p50(name) {
            Some((p50, min, max, n)) => format!("{p50:.1} ({min:.1}-{max:.1}, n={n})"),
            None => "-".into(),
        };
        let unit = if name == FIRST_BYTE { " ms" } else { "" };
        println!("| {name}{unit} | {} | {} |", cell(&layer), cell(&anchor));
    }
    Ok(())
}
