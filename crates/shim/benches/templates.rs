//! Sandboxes started from a VM template (`[factory] enable_template`) against cold-booted ones,
//! through `containerd-shim-kata-v2 sandbox run` (real QEMU, under TCG where KVM is not
//! usable; a TAP in a network namespace of its own per sandbox, bound to the template's NIC in
//! a clone).
//!
//! 1. Sandbox ready: the spawn of `sandbox run --ready-file F` to `F` written (its
//!    modification time), template and cold alternating, one sandbox at a time, each stopped
//!    with SIGTERM before the next; the shim's own `timings_ms` split beside it.
//! 2. Memory: each QEMU's `Pss` and `Private_Dirty` (`/proc/PID/smaps_rollup`, QEMU's pid from
//!    the facts' `vmm_pid`) for 10 clones running at once, against one cold-booted sandbox
//!    running alone.
//! 3. 20 sandboxes spawned at once from one template: the wall time until every ready file is
//!    written, each one's ready time, and the sum of the `Pss` of the QEMUs and the shims.
//!
//! The configurations are the shipped `configs/configuration-qemu.toml` with
//! `shared_fs = "none"` (templates refuse a shared directory), the template one with a
//! `[factory]` table; the template store, the run root and the ready files are in a temporary
//! directory on tmpfs (`/dev/shm`, as Kata's default `/run/vc/vm/template` is on a host whose
//! `/run` is tmpfs). The template is made once (`sandbox template create`) before the runs.
//! At the end nothing may be left: no QEMU of the benchmark's sandboxes, no `/run/netns/kata-ID`,
//! an empty run root; the template store is deleted.
//!
//! Run: `cargo bench -p containerd-shim-kata-v2 --all-features --bench templates` (as root,
//! after `make guest-assets`). `BENCH_QUICK=1`: 3 runs a side, 3 clones, 4 concurrent
//! sandboxes, to check that the benchmark runs (its numbers are not results).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use workspace_tests::bench::Samples;
use workspace_tests::{machine, require_root, unique_name, GuestAssets};

/// The binary under test.
const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-kata-v2");
/// How long one sandbox may take to be ready (20 at once on 2 cores under TCG included).
const READY_LIMIT: Duration = Duration::from_secs(300);
/// How long a shim may take to exit after SIGTERM.
const EXIT_LIMIT: Duration = Duration::from_secs(120);

const READY: &str = "ready: spawn -> ready file written";
const LAUNCH: &str = "  spawn -> the shim's clock starts (ready - total)";
const REST: &str = "  total - the timed steps (clock, hostname, facts)";
const STOP: &str = "stop: SIGTERM -> shim exited";
/// The shim's `timings_ms` keys, in the order its steps run.
const STEPS: [(&str, &str); 6] = [
    ("prepare", "  prepare"),
    ("template", "  template (find or make it)"),
    ("vmm_start", "  vmm_start (QEMU running / restored)"),
    ("agent_ready", "  agent_ready"),
    ("guest_network", "  guest_network"),
    ("total", "  total (the shim's own, from its start)"),
];

const MIB: f64 = 1024.0;
const RAM: &str = "  of which guest RAM of its own (Anonymous of the guest RAM mapping)";
const TCG: &str = "  of which TCG translation cache (the anonymous rwx mapping)";
const OTHER: &str = "  of which the rest (heap, thread stacks, device state)";

fn main() -> Result<()> {
    require_root();
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let (runs, clones, concurrent) = if quick { (3, 3, 4) } else { (10, 10, 20) };
    let guest = GuestAssets::find();
    let guest_dir = guest.kernel.parent().context("the kernel's directory")?;
    let dir = tempfile::Builder::new()
        .prefix("templates-bench")
        .tempdir_in("/dev/shm")
        .context("a temporary directory on /dev/shm")?;
    let cold_cfg = write_config(dir.path(), guest_dir, false)?;
    let tpl_cfg = write_config(dir.path(), guest_dir, true)?;
    let run_root = dir.path().join("run");

    println!(
        "templates: cargo bench -p containerd-shim-kata-v2 --all-features --bench templates \
         (runs={runs} a side, clones={clones}, concurrent={concurrent})"
    );
    if quick {
        println!("BENCH_QUICK=1: a smoke run; these numbers are not results");
    }
    println!("machine: {}", machine());
    println!(
        "{}; configs/configuration-qemu.toml with shared_fs = \"none\" (q35, 1 vCPU, 256 MiB, \
         a clone's first NIC the template's, bound to its TAP); store on tmpfs; load average before: {}",
        workspace_tests::run("qemu-system-x86_64", &["--version"])?
            .lines()
            .next()
            .unwrap_or("?"),
        load_average()
    );

    let mut bench = Bench {
        run_root: run_root.clone(),
        dir: dir.path().to_path_buf(),
        ids: Vec::new(),
        memory_mib: default_memory(&cold_cfg)?,
    };
    let outcome = bench.run_all(&cold_cfg, &tpl_cfg, runs, clones, concurrent);
    let load = load_average();
    // Whatever happened, every sandbox was stopped (`Sandbox` drops send SIGTERM): check
    // that nothing is left, then remove the store.
    let left = bench.leftovers();
    let deleted = shim()
        .args(["sandbox", "template", "delete", "--all", "--config"])
        .arg(&tpl_cfg)
        .output()
        .context("sandbox template delete")?;
    let report = outcome?;
    ensure!(
        deleted.status.success(),
        "sandbox template delete --all: {}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let store = dir.path().join("templates");
    ensure!(
        std::fs::read_dir(&store).map_or(true, |d| d.count() == 0),
        "templates left in {} after delete --all",
        store.display()
    );
    dir.close().context("removing the temporary directory")?;
    left?;
    println!("load average after: {load}");
    println!("left behind: nothing (no QEMU of the benchmark's ids, no kata-ID netns, run root empty, store deleted)");
    report.print(clones, concurrent);
    Ok(())
}

/// The shipped configuration with `shared_fs = "none"`, and with `template` a `[factory]`
/// table whose store is `dir/templates`.
fn write_config(dir: &Path, guest: &Path, template: bool) -> Result<PathBuf> {
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/configuration-qemu.toml");
    let text = std::fs::read_to_string(&shipped)
        .with_context(|| format!("reading {}", shipped.display()))?
        .replace("${GUEST_DIR}", &guest.display().to_string())
        .replace("shared_fs = \"virtio-fs\"", "shared_fs = \"none\"");
    ensure!(
        text.contains("shared_fs = \"none\""),
        "{} no longer sets shared_fs = \"virtio-fs\"",
        shipped.display()
    );
    let (name, text) = if template {
        let store = dir.join("templates");
        (
            "template.toml",
            format!(
                "{text}\n[factory]\nenable_template = true\ntemplate_path = \"{}\"\n",
                store.display()
            ),
        )
    } else {
        ("cold.toml", text)
    };
    let file = dir.join(name);
    std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

/// The space the files under `dir` take (their allocated blocks), in KiB.
fn allocated_kib(dir: &Path) -> Result<f64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut kib = 0.0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let m = e.metadata()?;
        kib += if m.is_dir() {
            allocated_kib(&e.path())?
        } else {
            (m.blocks() * 512) as f64 / 1024.0
        };
    }
    Ok(kib)
}

/// `default_memory` (MiB) of a configuration file.
fn default_memory(cfg: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(cfg)?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("default_memory"))
        .with_context(|| format!("no default_memory in {}", cfg.display()))?;
    line.split('=')
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("the value of {line:?}"))
}

fn shim() -> Command {
    Command::new(SHIM)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The results, printed as tables once everything is cleaned up.
#[derive(Default)]
struct Report {
    create_ms: f64,
    create_line: String,
    /// What the template store holds on tmpfs (the saved RAM and device state).
    store_mib: f64,
    template: Samples,
    cold: Samples,
    cold_mem: Samples,
    clone_mem: Samples,
    concurrent_ready: Samples,
    concurrent_wall_ms: f64,
    concurrent_mem: BTreeMap<&'static str, f64>,
    concurrent_load: String,
}

/// The benchmark's state: where sandboxes run and the ids it started.
struct Bench {
    run_root: PathBuf,
    dir: PathBuf,
    ids: Vec<String>,
    /// `default_memory` of the configurations.
    memory_mib: u64,
}

impl Bench {
    fn run_all(
        &mut self,
        cold_cfg: &Path,
        tpl_cfg: &Path,
        runs: usize,
        clones: usize,
        concurrent: usize,
    ) -> Result<Report> {
        let mut r = Report::default();
        let t = Instant::now();
        let out = shim()
            .args(["sandbox", "template", "create", "--config"])
            .arg(tpl_cfg)
            .output()
            .context("sandbox template create")?;
        ensure!(
            out.status.success(),
            "sandbox template create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        r.create_ms = t.elapsed().as_secs_f64() * 1e3;
        r.create_line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        r.store_mib = allocated_kib(&self.dir.join("templates"))? / MIB;

        // 1. One at a time, alternating; the side that goes first alternates too.
        for i in 0..runs {
            let mut sides = [
                (tpl_cfg, &mut r.template, true),
                (cold_cfg, &mut r.cold, false),
            ];
            if i % 2 == 1 {
                sides.reverse();
            }
            for (cfg, samples, from_template) in sides {
                let sb = self
                    .spawn(cfg, "tr")
                    .and_then(|mut sb| sb.wait_ready().map(|_| sb))
                    .with_context(|| format!("run {i}, from_template {from_template}"))?;
                ensure!(
                    sb.facts["timings_ms"]["template"].is_u64() == from_template,
                    "sandbox {}: template timing {} (from a template: {from_template})",
                    sb.id,
                    sb.facts["timings_ms"]
                );
                sb.add_timings(samples)?;
                samples.add(STOP, sb.stop()?);
            }
        }

        // 2. One cold sandbox alone, then `clones` clones at once.
        let mut cold = self.spawn(cold_cfg, "tm")?;
        cold.wait_ready()?;
        cold.add_memory(&mut r.cold_mem)?;
        cold.stop()?;
        let mut running = Vec::new();
        for _ in 0..clones {
            let mut sb = self.spawn(tpl_cfg, "tm")?;
            sb.wait_ready()?;
            running.push(sb);
        }
        for sb in &running {
            sb.add_memory(&mut r.clone_mem)?;
        }
        stop_all(running)?;

        // 3. `concurrent` clones spawned at once.
        let mut running = Vec::new();
        let began = Instant::now();
        for _ in 0..concurrent {
            running.push(self.spawn(tpl_cfg, "tc")?);
        }
        for sb in &mut running {
            sb.wait_ready()?;
        }
        r.concurrent_wall_ms = running
            .iter()
            .map(|sb| sb.ready_at.expect("ready") - began)
            .max()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3;
        r.concurrent_load = load_average();
        for sb in &running {
            r.concurrent_ready.add(READY, sb.ready()?);
            for (name, pid) in [
                ("QEMU", sb.vmm_pid()?),
                ("shim", sb.child.as_ref().expect("running").id()),
            ] {
                let m = smaps_rollup(pid)?;
                for (key, v) in [("Pss", m.pss), ("Private_Dirty", m.private_dirty)] {
                    let label = match (name, key) {
                        ("QEMU", "Pss") => "QEMU Pss",
                        ("QEMU", _) => "QEMU Private_Dirty",
                        (_, "Pss") => "shim Pss",
                        _ => "shim Private_Dirty",
                    };
                    *r.concurrent_mem.entry(label).or_default() += v;
                }
            }
        }
        stop_all(running)?;
        Ok(r)
    }

    /// Spawns `sandbox run --json --ready-file` for a new id starting with `prefix`.
    fn spawn(&mut self, cfg: &Path, prefix: &str) -> Result<Sandbox> {
        let id = unique_name(prefix);
        let ready_file = self.dir.join(format!("ready-{id}"));
        let spawned = SystemTime::now();
        let mut child = shim()
            .args(["sandbox", "run", "--json", "--config"])
            .arg(cfg)
            .args(["--id", &id, "--run-root"])
            .arg(&self.run_root)
            .arg("--ready-file")
            .arg(&ready_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning sandbox run")?;
        let stdout = child.stdout.take().context("the shim's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send((line, Instant::now()));
        });
        self.ids.push(id.clone());
        Ok(Sandbox {
            id,
            child: Some(child),
            spawned,
            line: rx,
            ready_file,
            ready_at: None,
            ready_mtime: None,
            facts: serde_json::Value::Null,
            memory_kib: self.memory_mib * 1024,
        })
    }

    /// Fails naming what the benchmark's sandboxes left behind.
    fn leftovers(&self) -> Result<()> {
        let mut left = Vec::new();
        let qemus = Command::new("pgrep")
            .args(["-a", "qemu-system"])
            .output()
            .context("pgrep")?;
        for line in String::from_utf8_lossy(&qemus.stdout).lines() {
            if self
                .ids
                .iter()
                .any(|id| line.contains(&format!("sandbox-{id} ")))
            {
                left.push(format!("QEMU: {line}"));
            }
        }
        for id in &self.ids {
            let ns = Path::new("/run/netns").join(format!("kata-{id}"));
            if ns.exists() {
                left.push(ns.display().to_string());
            }
        }
        for sub in ["sandboxes", "vm"] {
            let d = self.run_root.join(sub);
            if let Ok(entries) = std::fs::read_dir(&d) {
                for e in entries.flatten() {
                    left.push(e.path().display().to_string());
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("ready-") {
                    left.push(e.path().display().to_string());
                }
            }
        }
        if left.is_empty() {
            Ok(())
        } else {
            bail!("left behind: {}", left.join(", "))
        }
    }
}

/// One `sandbox run` child, stopped with SIGTERM when dropped still running.
struct Sandbox {
    id: String,
    child: Option<Child>,
    spawned: SystemTime,
    line: mpsc::Receiver<(String, Instant)>,
    ready_file: PathBuf,
    ready_at: Option<Instant>,
    ready_mtime: Option<SystemTime>,
    facts: serde_json::Value,
    /// The guest's memory size, in KiB.
    memory_kib: u64,
}

impl Sandbox {
    /// Waits for the facts line (printed once the ready file is in place) and reads the ready
    /// file's modification time.
    fn wait_ready(&mut self) -> Result<()> {
        let (line, at) = self.line.recv_timeout(READY_LIMIT).map_err(|_| {
            anyhow::anyhow!(
                "sandbox {} printed no facts within {READY_LIMIT:?} (it failed or hung; \
                 run it by hand to see its log)",
                self.id
            )
        })?;
        self.facts = serde_json::from_str(&line)
            .with_context(|| format!("sandbox {}: the facts line {line:?}", self.id))?;
        let mtime = std::fs::metadata(&self.ready_file)
            .and_then(|m| m.modified())
            .with_context(|| format!("the ready file {}", self.ready_file.display()))?;
        self.ready_at = Some(at);
        self.ready_mtime = Some(mtime);
        Ok(())
    }

    /// Spawn to the ready file written.
    fn ready(&self) -> Result<Duration> {
        let mtime = self.ready_mtime.context("not ready")?;
        mtime
            .duration_since(self.spawned)
            .with_context(|| format!("sandbox {}: ready file older than its spawn", self.id))
    }

    fn vmm_pid(&self) -> Result<u32> {
        let pid = self.facts["vmm_pid"].as_u64().context("vmm_pid")?;
        Ok(u32::try_from(pid)?)
    }

    /// The ready time and the shim's step times.
    fn add_timings(&self, s: &mut Samples) -> Result<()> {
        let ready = self.ready()?;
        s.add(READY, ready);
        let t = &self.facts["timings_ms"];
        let get = |k: &str| t[k].as_u64();
        let total = get("total").context("timings_ms.total")?;
        s.add(LAUNCH, ready.saturating_sub(Duration::from_millis(total)));
        for (key, name) in STEPS {
            if let Some(v) = get(key) {
                s.add(name, Duration::from_millis(v));
            }
        }
        let timed: u64 = STEPS
            .iter()
            .filter(|(k, _)| *k != "total")
            .filter_map(|(k, _)| get(k))
            .sum();
        s.add(REST, Duration::from_millis(total.saturating_sub(timed)));
        Ok(())
    }

    /// QEMU's and the shim's memory, in MiB.
    fn add_memory(&self, s: &mut Samples) -> Result<()> {
        let qemu = smaps_rollup(self.vmm_pid()?)?;
        let shim = smaps_rollup(self.child.as_ref().context("running")?.id())?;
        s.add_value("QEMU Rss", qemu.rss / MIB);
        s.add_value("QEMU Pss", qemu.pss / MIB);
        s.add_value("QEMU Private_Dirty", qemu.private_dirty / MIB);
        let split = private_dirty_split(self.vmm_pid()?, self.memory_kib)?;
        s.add_value(RAM, split.ram / MIB);
        s.add_value(TCG, split.tcg / MIB);
        s.add_value(
            OTHER,
            (qemu.private_dirty - split.ram - split.tcg).max(0.0) / MIB,
        );
        s.add_value("shim Pss", shim.pss / MIB);
        Ok(())
    }

    /// Sends SIGTERM.
    fn terminate(&self) -> Result<()> {
        let pid = self.child.as_ref().context("running")?.id();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("SIGTERM to the shim of {}", self.id))
    }

    /// Waits for the shim's exit after `terminate`, which must be a success; past
    /// [`EXIT_LIMIT`] the shim is killed and that is the error.
    fn wait_exit(&mut self) -> Result<()> {
        let mut child = self.child.take().context("running")?;
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(EXIT_LIMIT) {
            Ok(status) => {
                let status =
                    status.with_context(|| format!("waiting for the shim of {}", self.id))?;
                ensure!(
                    status.success(),
                    "the shim of {} exited with {status} after SIGTERM",
                    self.id
                );
                Ok(())
            }
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                bail!(
                    "the shim of {} did not exit within {EXIT_LIMIT:?} of SIGTERM",
                    self.id
                )
            }
        }
    }

    /// SIGTERM, then the time until the shim exited.
    fn stop(mut self) -> Result<Duration> {
        let t = Instant::now();
        self.terminate()?;
        self.wait_exit()?;
        Ok(t.elapsed())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let _ = child.wait();
            }
        }
    }
}

/// SIGTERM to every sandbox at once, then each one's exit.
fn stop_all(mut running: Vec<Sandbox>) -> Result<()> {
    for sb in &running {
        sb.terminate()?;
    }
    for sb in &mut running {
        sb.wait_exit()?;
    }
    Ok(())
}

/// Fields of `/proc/PID/smaps_rollup`, in KiB.
struct Rollup {
    rss: f64,
    pss: f64,
    private_dirty: f64,
}

/// What a QEMU's guest RAM mapping holds of its own (`Anonymous`: touched pages on a cold
/// boot, copies on write on a clone, whose other pages are the template's file, shared) and
/// the `Private_Dirty` of its TCG translation cache, in KiB.
struct Split {
    ram: f64,
    tcg: f64,
}

/// From `/proc/PID/smaps`: the guest RAM is the one mapping of exactly `memory_kib` (an
/// anonymous one on a cold boot, the template's memory file mapped private on a clone); the
/// translation cache is TCG's anonymous mapping that is writable and executable.
fn private_dirty_split(pid: u32, memory_kib: u64) -> Result<Split> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (mut ram, mut tcg, mut rams) = (0.0, 0.0, 0);
    let mut header: Vec<&str> = Vec::new();
    let mut size = 0;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            header = line.split_whitespace().collect();
        } else if first == "Size:" {
            size = words.next().unwrap_or_default().parse().unwrap_or(0);
        } else if first == "Anonymous:" && size == memory_kib {
            ram += words.next().unwrap_or_default().parse().unwrap_or(0.0);
            rams += 1;
        } else if first == "Private_Dirty:" && header.len() < 6 && header.get(1) == Some(&"rwxp") {
            tcg += words.next().unwrap_or_default().parse().unwrap_or(0.0);
        }
    }
    ensure!(
        rams == 1,
        "{rams} mappings of {memory_kib} KiB (the guest RAM) in {path}"
    );
    Ok(Split { ram, tcg })
}

fn smaps_rollup(pid: u32) -> Result<Rollup> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<f64> {
        let line = text
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .with_context(|| format!("no {name} line in {path}"))?;
        line.split_whitespace()
            .nth(1)
            .context("a value")?
            .parse()
            .with_context(|| format!("the value in {line:?}"))
    };
    Ok(Rollup {
        rss: field("Rss")?,
        pss: field("Pss")?,
        private_dirty: field("Private_Dirty")?,
    })
}

fn cell(s: &Samples, name: &str) -> String {
    match s.p50(name) {
        Some((p50, min, max, n)) => format!("{p50:.0} ({min:.0}-{max:.0}, n={n})"),
        None => "-".into(),
    }
}

fn cell_mib(s: &Samples, name: &str) -> String {
    match s.p50(name) {
        Some((p50, min, max, n)) => format!("{p50:.1} ({min:.1}-{max:.1}, n={n})"),
        None => "-".into(),
    }
}

impl Report {
    fn print(&self, clones: usize, concurrent: usize) {
        println!();
        println!(
            "template made once before the runs in {:.0} ms: {}; the store holds {:.0} MiB on \
             tmpfs (shared by every clone, counted in nobody's Pss but for the pages they map)",
            self.create_ms, self.create_line, self.store_mib
        );
        println!();
        println!("| `sandbox run` one at a time, ms | template p50 (min-max) | cold boot p50 (min-max) |");
        println!("| --- | --- | --- |");
        let mut names = vec![READY, LAUNCH];
        names.extend(STEPS.iter().map(|s| s.1));
        names.extend([REST, STOP]);
        for name in names {
            println!(
                "| {name} | {} | {} |",
                cell(&self.template, name),
                cell(&self.cold, name)
            );
        }
        println!();
        println!(
            "| memory per sandbox, MiB | each of {clones} clones running at once, p50 (min-max) | one cold boot alone |"
        );
        println!("| --- | --- | --- |");
        let mut names: Vec<&str> = Vec::new();
        for name in self.clone_mem.names() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        for name in names {
            println!(
                "| {name} | {} | {} |",
                cell_mib(&self.clone_mem, name),
                cell_mib(&self.cold_mem, name)
            );
        }
        println!();
        println!("| {concurrent} sandboxes spawned at once from one template | |");
        println!("| --- | --- |");
        println!(
            "| wall: first spawn -> last ready file written | {:.0} ms |",
            self.concurrent_wall_ms
        );
        println!(
            "| each: spawn -> ready file written, ms | {} |",
            cell(&self.concurrent_ready, READY)
        );
        for (name, kib) in &self.concurrent_mem {
            println!("| sum of {name} | {:.0} MiB |", kib / MIB);
        }
        let pss: f64 = self
            .concurrent_mem
            .iter()
            .filter(|(k, _)| k.ends_with("Pss"))
            .map(|(_, v)| v)
            .sum();
        println!(
            "| total Pss (QEMUs and shims) | {:.0} MiB ({:.1} MiB a sandbox) |",
            pss / MIB,
            pss / MIB / concurrent as f64
        );
        println!(
            "| load average when all were ready | {} |",
            self.concurrent_load
        );
    }
}
