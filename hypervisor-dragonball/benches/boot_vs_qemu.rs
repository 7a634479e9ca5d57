//! Boot of the test guest (`guest/testguest`): this in-process VMM on KVM against QEMU under
//! TCG, side by side in one run, booting the same ELF (QEMU through its PVH note).
//!
//! Measured per boot: the time from `start` (for QEMU: from spawning it) to the guest's first
//! serial line, and the resident memory of the VMM while the guest runs. For the in-process
//! VMM that is this bench process (it holds nothing else but a small async runtime), given
//! whole and as its growth over the RSS before `prepare`; for QEMU it is the QEMU process.
//!
//! Run: `make test-guest`, then `cargo bench -p hypervisor-dragonball --bench boot_vs_qemu`.
//! `BOOTS=N` sets the boots per side (default 10); `BENCH_QUICK=1` does 2. `TESTGUEST_ELF`
//! and `QEMU` override the guest and the QEMU binary.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hypervisor::{Hypervisor, HypervisorConfig, SandboxSpec};
use hypervisor_dragonball::{Dragonball, DragonballOptions};

const MEMORY_MIB: u32 = 64;
const ACTION: &str = "testguest.action=hlt_forever";
const FIRST_LINE_LIMIT: Duration = Duration::from_secs(30);

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn test_guest() -> Result<PathBuf> {
    let path = std::env::var_os("TESTGUEST_ELF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/testguest/testguest.elf")
        });
    if !path.exists() {
        return Err(format!(
            "the test guest {} is missing: run `make test-guest`",
            path.display()
        )
        .into());
    }
    Ok(path.canonicalize()?)
}

/// `VmRSS` of `pid` in MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmRSS")?;
    Ok(kib / 1024.0)
}

#[derive(Default)]
struct Samples {
    first_line_ms: Vec<f64>,
    rss_mib: Vec<f64>,
    rss_growth_mib: Vec<f64>,
}

fn p50(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    format!(
        "{:.1} ({:.1}-{:.1}, n={})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1],
        v.len()
    )
}

/// One boot in this process: prepare, then time `start` to the first console line.
async fn dragonball_once(guest: &Path, s: &mut Samples) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let vm = hypervisor::Vm::new(Dragonball::new(
        log,
        DragonballOptions {
            run_root: dir.path().to_path_buf(),
            ..Default::default()
        },
    ));
    let before = rss_mib(std::process::id())?;
    vm.prepare(&SandboxSpec {
        id: format!("bench{}", std::process::id()),
        netns: None,
        config: HypervisorConfig {
            kernel: guest.to_path_buf(),
            kernel_params: vec![ACTION.into()],
            memory_mib: MEMORY_MIB,
            ..Default::default()
        },
    })
    .await?;
    let console = vm.console_log().await.ok_or("no console log")?;
    let t0 = Instant::now();
    vm.start(FIRST_LINE_LIMIT).await?;
    loop {
        let text = std::fs::read(&console).unwrap_or_default();
        if text.contains(&b'\n') {
            break;
        }
        if t0.elapsed() > FIRST_LINE_LIMIT {
            return Err("no serial line from the test guest".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    s.first_line_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    let rss = rss_mib(std::process::id())?;
    s.rss_mib.push(rss);
    s.rss_growth_mib.push(rss - before);
    vm.stop().await?;
    vm.cleanup().await?;
    Ok(())
}

fn qemu_binary() -> PathBuf {
    std::env::var_os("QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into())
}

fn qemu_args(machine: &str, guest: &Path) -> Vec<String> {
    [
        "-M",
        machine,
        "-accel",
        "tcg",
        "-m",
        &MEMORY_MIB.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        &guest.display().to_string(),
        "-append",
        &format!("console=ttyS0 {ACTION}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One QEMU boot: time from spawn to the first line on its serial port (its stdout).
fn qemu_once(machine: &str, guest: &Path, s: &mut Samples) -> Result<()> {
    let t0 = Instant::now();
    let mut child = Command::new(qemu_binary())
        .args(qemu_args(machine, guest))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    let n = out.read_line(&mut line)?;
    let elapsed = t0.elapsed();
    let rss = rss_mib(child.id());
    child.kill()?;
    child.wait()?;
    if n == 0 || !line.starts_with("testguest:") {
        return Err(
            format!("QEMU {machine}: no serial line from the test guest ({line:?})").into(),
        );
    }
    s.first_line_ms.push(elapsed.as_secs_f64() * 1e3);
    s.rss_mib.push(rss?);
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
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let qemu = Command::new(qemu_binary())
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_else(|_| "QEMU missing".into());
    format!(
        "{} cores, {cpu}, kernel {kernel}; {qemu}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    )
}

fn main() -> Result<()> {
    let boots: usize = if std::env::var_os("BENCH_QUICK").is_some() {
        2
    } else {
        std::env::var("BOOTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10)
    };
    let guest = test_guest()?;
    if !qemu_binary().exists() {
        return Err(format!(
            "{} is missing: install qemu-system-x86 (make deps) or set QEMU",
            qemu_binary().display()
        )
        .into());
    }
    println!(
        "boot_vs_qemu: cargo bench -p hypervisor-dragonball --bench boot_vs_qemu (BOOTS={boots})"
    );
    println!("machine: {}", machine());
    println!(
        "guest: {} ({ACTION}), 1 vCPU, {MEMORY_MIB} MiB",
        guest.display()
    );
    println!(
        "Dragonball: in-process, KVM ({})",
        DragonballOptions::default().kvm_path.display()
    );
    let machines = ["microvm", "q35"];
    for m in machines {
        println!(
            "QEMU {m}: {} {}",
            qemu_binary().display(),
            qemu_args(m, &guest).join(" ")
        );
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut dragonball = Samples::default();
    let mut qemu: Vec<Samples> = machines.iter().map(|_| Samples::default()).collect();
    // Interleaved, so drift in the machine's load hits every side alike.
    for i in 0..boots {
        rt.block_on(dragonball_once(&guest, &mut dragonball))
            .map_err(|e| format!("Dragonball boot {i}: {e}"))?;
        for (m, s) in machines.iter().zip(qemu.iter_mut()) {
            qemu_once(m, &guest, s).map_err(|e| format!("QEMU {m} boot {i}: {e}"))?;
        }
    }

    println!();
    println!("| metric, p50 (min-max) | Dragonball (KVM) | QEMU microvm (TCG) | QEMU q35 (TCG) |");
    println!("| --- | --- | --- | --- |");
    let row = |name: &str, f: &dyn Fn(&Samples) -> &Vec<f64>| {
        println!(
            "| {name} | {} | {} | {} |",
            p50(f(&dragonball)),
            p50(f(&qemu[0])),
            p50(f(&qemu[1]))
        );
    };
    row("start -> first serial line, ms", &|s| &s.first_line_ms);
    row("VMM RSS, MiB", &|s| &s.rss_mib);
    row(
        "in-process VMM: RSS growth over before prepare, MiB",
        &|s| &s.rss_growth_mib,
    );
    Ok(())
}
