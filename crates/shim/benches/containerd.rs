//! `ctr run --rm IMG ID echo hi` through a private containerd (Debian's 1.6.20), with
//! `--runtime io.containerd.kata.v2` (this crate's binary, first on containerd's `PATH`,
//! with the repository's `configs/configuration-qemu.toml`) against `io.containerd.runc.v2`
//! on the same offline busybox image, runs alternating between the two.
//!
//! The wall time (spawn of `ctr` to its exit) is split with two clocks of the same host:
//! - the task events containerd publishes, read by a `ctr events` started beside the runs
//!   (each line carries the envelope's timestamp, set by the shim that forwards it):
//!   `/tasks/create`, `/tasks/start`, `/tasks/exit`, `/tasks/delete`, for both runtimes;
//! - the kata shim's own lines in containerd's log (containerd copies its shims' log FIFO
//!   there; logfmt with `time="RFC 3339"`): `serving` (the daemon answers on its socket) and
//!   `sandbox ready` (the guest agent answered; its `ms` counts from the Create request).
//!
//! Memory per pod: with one `ctr run -d ... sleep` task running, the PSS
//! (`/proc/PID/smaps_rollup`) of its shim and every process under it (kata: QEMU and
//! virtiofsd, also found by the task id in their command line; runc: the container's
//! `sleep`), by process name.
//!
//! Run: `cargo bench -p containerd-shim-kata-v2 --bench containerd` (as root, after
//! `make guest-assets` and `make deps`, which installs containerd). `RUNS=N` sets the runs
//! per runtime (default 10); `BENCH_QUICK=1` does 2 runs and one pod each, to check that the
//! benchmark runs (its numbers are not results).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use workspace_tests::bench::Samples;
use workspace_tests::containerd::{
    processes, Containerd, Image, Options, KATA_RUNTIME, RUNC_RUNTIME,
};
use workspace_tests::{machine, require_root, unique_name, GuestAssets};

/// The binary under test.
const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-kata-v2");
/// How long one `ctr` command that boots or stops a VM may take.
const CALL: Duration = Duration::from_secs(180);
/// How long an event may take to reach `ctr events` after `ctr` returned.
const EVENT_LAG: Duration = Duration::from_secs(10);

const WALL: &str = "wall: ctr invoked -> ctr returns";
const SHIM_START: &str = "shim start: ctr invoked -> shim `serving` (log)";
const VM_READY: &str = "VM ready: `serving` -> `sandbox ready` (log)";
const VM_READY_MS: &str = "  `sandbox ready` ms (from the Create request)";
const TO_BOOTING: &str = "  `serving` -> `booting` (log)";
const TO_VMM: &str = "  `booting` -> `VMM running` (log)";
const TO_AGENT: &str = "  `VMM running` -> `guest agent ready` (log)";
const GUEST_UPTIME: &str = "    guest uptime at `guest agent ready` (the guest's clock)";
const TO_READY: &str = "  `guest agent ready` -> `sandbox ready` (log)";
const READY_CREATE: &str = "container create: `sandbox ready` -> /tasks/create";
const TO_CREATE: &str = "ctr invoked -> /tasks/create";
const CONTAINER_START: &str = "container start: /tasks/create -> /tasks/start";
const RUNS_ECHO: &str = "echo runs: /tasks/start -> /tasks/exit";
const EXIT_DELETE: &str = "exit to delete: /tasks/exit -> /tasks/delete";
const DELETE_RETURN: &str = "  /tasks/delete -> ctr returns";
const EXIT_RETURN: &str = "  /tasks/exit -> ctr returns";
const SPANS: [&str; 16] = [
    WALL,
    SHIM_START,
    VM_READY,
    VM_READY_MS,
    TO_BOOTING,
    TO_VMM,
    TO_AGENT,
    GUEST_UPTIME,
    TO_READY,
    READY_CREATE,
    TO_CREATE,
    CONTAINER_START,
    RUNS_ECHO,
    EXIT_DELETE,
    DELETE_RETURN,
    EXIT_RETURN,
];

/// The processes of a pod reported apart; any other is counted in "other processes".
const PARTS: [&str; 5] = [
    "containerd-shim-kata-v2",
    "qemu-system-x86_64",
    "virtiofsd",
    "containerd-shim-runc-v2",
    "sleep",
];

fn main() -> Result<()> {
    require_root();
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2 } else { 10 });
    let pods = if quick { 1 } else { 3 };
    let config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/configuration-qemu.toml");
    let guest = GuestAssets::find();
    let guest_dir = guest.kernel.parent().context("the kernel's directory")?;

    println!(
        "containerd: cargo bench -p containerd-shim-kata-v2 --bench containerd (RUNS={runs}, pods={pods})"
    );
    if quick {
        println!("BENCH_QUICK=1: a smoke run; these numbers are not results");
    }
    println!("machine: {}", machine());
    println!(
        "{}; kata: {} (QEMU q35 under TCG, 1 vCPU, 256 MiB, virtio-fs); load average before: {}",
        workspace_tests::run("/usr/bin/ctr", &["--version"])?.trim(),
        config.display(),
        load_average()
    );

    let ctrd = Containerd::start(
        Options::default()
            .shim(SHIM)
            .env("KATA_CONF_FILE", &config)
            .env("GUEST_DIR", guest_dir),
    )?;
    let image = Image::busybox("bench");
    ctrd.import(&image)?;
    let events = Events::start(&ctrd, &image)?;

    let mut kata = Samples::default();
    let mut runc = Samples::default();
    let mut ids = Vec::new();
    // Alternating, so drift in the machine's load hits both runtimes alike.
    for i in 0..runs {
        for (runtime, samples) in [(KATA_RUNTIME, &mut kata), (RUNC_RUNTIME, &mut runc)] {
            let id = unique_name(if runtime == KATA_RUNTIME { "bk" } else { "br" });
            run_rm(&ctrd, &events, &image, runtime, &id, samples)
                .with_context(|| format!("run {i} under {runtime}"))?;
            ids.push(id);
        }
    }

    let mut mem_kata = Samples::default();
    let mut mem_runc = Samples::default();
    for i in 0..pods {
        for (runtime, samples) in [(KATA_RUNTIME, &mut mem_kata), (RUNC_RUNTIME, &mut mem_runc)] {
            let id = unique_name(if runtime == KATA_RUNTIME { "mk" } else { "mr" });
            pod_memory(&ctrd, &image, runtime, &id, samples)
                .with_context(|| format!("pod {i} under {runtime}"))?;
            ids.push(id);
        }
    }
    events.stop();
    let load = load_average();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    ctrd.finish(&ids)?;

    println!("load average after: {load}");
    println!();
    println!(
        "Spans: event times from `ctr events` (envelope timestamps), shim times from its log \
         lines in containerd's log; `-`: not applicable."
    );
    println!();
    println!("| `ctr run --rm IMG ID echo hi`, ms | kata p50 (min-max) | runc p50 (min-max) |");
    println!("| --- | --- | --- |");
    for name in SPANS {
        println!("| {name} | {} | {} |", cell(&kata, name), cell(&runc, name));
    }
    println!();
    println!("| PSS per pod (`ctr run -d ... sleep`), MiB | p50 (min-max) |");
    println!("| --- | --- |");
    for (label, s) in [("kata", &mem_kata), ("runc", &mem_runc)] {
        let mut names: Vec<&str> = Vec::new();
        for name in s.names() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        for name in names {
            println!("| {label}: {name} | {} |", cell(s, name));
        }
    }
    Ok(())
}

fn cell(s: &Samples, name: &str) -> String {
    match s.p50(name) {
        Some((p50, min, max, n)) => format!("{p50:.1} ({min:.1}-{max:.1}, n={n})"),
        None => "-".into(),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One `ctr run --rm` of `echo hi` under `runtime`, its spans added to `s`.
fn run_rm(
    ctrd: &Containerd,
    events: &Events,
    image: &Image,
    runtime: &str,
    id: &str,
    s: &mut Samples,
) -> Result<()> {
    let log_from = ctrd.log().len();
    let invoked = SystemTime::now();
    let out = ctrd.ctr_output(
        &[
            "run",
            "--rm",
            "--runtime",
            runtime,
            &image.name,
            id,
            "echo",
            "hi",
        ],
        None,
        CALL,
    )?;
    let returned = SystemTime::now();
    ensure!(
        out.code() == Some(0) && out.stdout == "hi\n",
        "unexpected: {out}"
    );
    let at = events.wait(ctrd.namespace(), id)?;
    let span = |a: SystemTime, b: SystemTime| {
        b.duration_since(a)
            .with_context(|| format!("{a:?} after {b:?} for {id}"))
    };
    s.add(WALL, span(invoked, returned)?);
    s.add(TO_CREATE, span(invoked, at.create)?);
    s.add(CONTAINER_START, span(at.create, at.start)?);
    s.add(RUNS_ECHO, span(at.start, at.exit)?);
    s.add(EXIT_DELETE, span(at.exit, at.delete)?);
    s.add(DELETE_RETURN, span(at.delete, returned)?);
    s.add(EXIT_RETURN, span(at.exit, returned)?);
    if runtime == KATA_RUNTIME {
        let log = ctrd.log();
        let log = log.get(log_from..).unwrap_or(&log);
        let shim = ShimLog::parse(log, id)?;
        s.add(SHIM_START, span(invoked, shim.serving)?);
        s.add(VM_READY, span(shim.serving, shim.ready)?);
        s.add_value(VM_READY_MS, shim.ready_ms);
        s.add(READY_CREATE, span(shim.ready, at.create)?);
        // The steps between, when the shim logged them all.
        if let [Some(booting), Some(vmm), Some(agent)] = shim.steps {
            s.add(TO_BOOTING, span(shim.serving, booting)?);
            s.add(TO_VMM, span(booting, vmm)?);
            s.add(TO_AGENT, span(vmm, agent)?);
            s.add(TO_READY, span(agent, shim.ready)?);
        }
        if let Some(uptime) = shim.guest_uptime_ms {
            s.add_value(GUEST_UPTIME, uptime);
        }
    }
    Ok(())
}

/// `ctr run -d` of `sleep`, the PSS of its shim and what runs under it, then kill and delete.
fn pod_memory(
    ctrd: &Containerd,
    image: &Image,
    runtime: &str,
    id: &str,
    s: &mut Samples,
) -> Result<()> {
    ctrd.ctr_output(
        &[
            "run",
            "-d",
            "--runtime",
            runtime,
            &image.name,
            id,
            "sleep",
            "3600",
        ],
        None,
        CALL,
    )?
    .ok()?;
    let measured = (|| {
        ctrd.wait_task_status(id, "RUNNING", Duration::from_secs(60))?;
        let procs = processes();
        let shim = ctrd
            .shim_processes()
            .into_iter()
            .find(|(_, cmdline)| cmdline.split(' ').any(|a| a == id))
            .with_context(|| format!("no shim process for {id}"))?
            .0;
        let mut pids = descendants(&procs, shim);
        pids.insert(shim);
        // A VMM the shim did not start as its descendant still names the sandbox.
        for (pid, argv) in &procs {
            let name = process_name(argv);
            if (name.starts_with("qemu-system") || name.ends_with("virtiofsd"))
                && argv.iter().any(|a| a.contains(id))
            {
                pids.insert(*pid);
            }
        }
        let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
        let mut total = 0.0;
        for pid in pids {
            let Some((_, argv)) = procs.iter().find(|(p, _)| *p == pid) else {
                continue;
            };
            let mib = pss_kib(pid)? / 1024.0;
            *by_name.entry(process_name(argv)).or_default() += mib;
            total += mib;
        }
        if runtime == KATA_RUNTIME {
            for part in ["containerd-shim-kata-v2", "qemu-system-x86_64", "virtiofsd"] {
                ensure!(
                    by_name.contains_key(part),
                    "no {part} among the pod's processes: {by_name:?}"
                );
            }
        }
        Ok::<_, anyhow::Error>((by_name, total))
    })();
    let stopped = stop_task(ctrd, id);
    let (by_name, total) = measured?;
    stopped?;
    let mut other = 0.0;
    for (name, mib) in by_name {
        match PARTS.iter().find(|p| **p == name) {
            Some(part) => s.add_value(part, mib),
            None => other += mib,
        }
    }
    if other > 0.0 {
        s.add_value("other processes", other);
    }
    s.add_value("total", total);
    Ok(())
}

/// SIGKILL, wait until stopped, delete the task and the container.
fn stop_task(ctrd: &Containerd, id: &str) -> Result<()> {
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGKILL", id])?;
    ctrd.wait_task_status(id, "STOPPED", Duration::from_secs(60))?;
    let deleted = ctrd.ctr_output(&["task", "delete", id], None, CALL)?;
    ensure!(deleted.code() == Some(0), "{deleted}");
    ctrd.ctr_ok(&["container", "rm", id])?;
    Ok(())
}

fn process_name(argv: &[String]) -> String {
    let a = argv.first().map(String::as_str).unwrap_or("?");
    a.rsplit('/').next().unwrap_or(a).to_string()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The pids of every process under `root` (children, their children, ...).
fn descendants(procs: &[(u32, Vec<String>)], root: u32) -> BTreeSet<u32> {
    let parents: Vec<(u32, u32)> = procs
        .iter()
        .filter_map(|(pid, _)| parent(*pid).map(|pp| (*pid, pp)))
        .collect();
    let mut found = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, pp) in &parents {
            if *pp == p && found.insert(*pid) {
                frontier.push(*pid);
            }
        }
    }
    found
}

/// The `Pss:` of `/proc/PID/smaps_rollup`, in KiB.
fn pss_kib(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .with_context(|| format!("no Pss line in {path}"))?;
    line.split_whitespace()
        .nth(1)
        .context("a Pss value")?
        .parse()
        .with_context(|| format!("the Pss in {line:?}"))
}

/// The times of one task's events.
#[derive(Debug)]
struct TaskTimes {
    create: SystemTime,
    start: SystemTime,
    exit: SystemTime,
    delete: SystemTime,
}

/// The lines `ctr events` printed so far, and a signal for each new one.
type Lines = Arc<(Mutex<Vec<String>>, Condvar)>;

/// `ctr events` running beside the benchmark, its lines kept.
struct Events {
    child: Child,
    lines: Lines,
}

impl Events {
    /// Starts `ctr events` and waits until it sees an event (a container created and removed
    /// for the purpose), so none of the runs' events is missed.
    fn start(ctrd: &Containerd, image: &Image) -> Result<Events> {
        let mut child = ctrd
            .ctr(&["events"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ctr events")?;
        let stdout = child.stdout.take().context("ctr events' stdout")?;
        let lines: Lines = Arc::default();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                kept.0.lock().expect("not poisoned").push(line);
                kept.1.notify_all();
            }
        });
        let events = Events { child, lines };
        // `ctr events` subscribes a moment after its start: probe until an event shows.
        let began = Instant::now();
        loop {
            let probe = unique_name("probe");
            ctrd.ctr_ok(&["container", "create", &image.name, &probe])?;
            ctrd.ctr_ok(&["container", "rm", &probe])?;
            let seen = events.wait_for(Duration::from_secs(1), |lines| {
                lines
                    .iter()
                    .any(|l| l.contains("/containers/delete") && l.contains(&probe))
                    .then_some(())
            });
            if seen.is_some() {
                return Ok(events);
            }
            ensure!(
                began.elapsed() < EVENT_LAG,
                "`ctr events` saw no probe container's deletion within {EVENT_LAG:?}"
            );
        }
    }

    /// Waits at most `limit` until `found` finds something in the lines.
    fn wait_for<T>(&self, limit: Duration, found: impl Fn(&[String]) -> Option<T>) -> Option<T> {
        let (lock, cond) = &*self.lines;
        let began = Instant::now();
        let mut lines = lock.lock().expect("not poisoned");
        loop {
            if let Some(t) = found(&lines) {
                return Some(t);
            }
            let left = limit.checked_sub(began.elapsed())?;
            lines = cond.wait_timeout(lines, left).expect("not poisoned").0;
        }
    }

    /// Waits (at most [`EVENT_LAG`]) for task `id`'s create, start, exit and delete events
    /// in namespace `ns`.
    fn wait(&self, ns: &str, id: &str) -> Result<TaskTimes> {
        let find = |lines: &[String], topic: &str| {
            lines
                .iter()
                .find_map(|l| event_time(l, ns, topic, id).transpose())
        };
        let times = self.wait_for(EVENT_LAG, |lines| {
            let all = (
                find(lines, "/tasks/create")?,
                find(lines, "/tasks/start")?,
                find(lines, "/tasks/exit")?,
                find(lines, "/tasks/delete")?,
            );
            Some(all)
        });
        let Some((create, start, exit, delete)) = times else {
            let lines = self.lines.0.lock().expect("not poisoned");
            let mine: Vec<&String> = lines.iter().filter(|l| l.contains(id)).collect();
            bail!("task {id}'s events incomplete after {EVENT_LAG:?}: {mine:#?}");
        };
        Ok(TaskTimes {
            create: create?,
            start: start?,
            exit: exit?,
            delete: delete?,
        })
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The time of a `ctr events` line (`2006-01-02 15:04:05.999999999 -0700 MST NS TOPIC JSON`)
/// when it is `topic` of container `id`'s init in `ns`.
fn event_time(line: &str, ns: &str, topic: &str, id: &str) -> Result<Option<SystemTime>> {
    let f: Vec<&str> = line.splitn(7, ' ').collect();
    if f.len() < 6 || f[4] != ns || f[5] != topic {
        return Ok(None);
    }
    let json = f.get(6).copied().unwrap_or("{}");
    let v: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("the event in {line:?}"))?;
    if v["container_id"] != id {
        return Ok(None);
    }
    // An exec's exit names its exec id; the init's, its container id or none.
    if topic == "/tasks/exit" && v["id"].as_str().is_some_and(|e| e != id) {
        return Ok(None);
    }
    let offset = f[2];
    ensure!(
        offset.len() == 5 && offset.is_ascii(),
        "no -0700 offset in {line:?}"
    );
    let stamp = format!("{}T{}{}:{}", f[0], f[1], &offset[..3], &offset[3..]);
    parse_rfc3339(&stamp)
        .map(Some)
        .with_context(|| format!("the time of {line:?}"))
}

/// The kata shim's lines of one run in containerd's log.
#[derive(Debug)]
struct ShimLog {
    serving: SystemTime,
    ready: SystemTime,
    ready_ms: f64,
    /// `booting`, `VMM running`, `guest agent ready`, if logged.
    steps: [Option<SystemTime>; 3],
    /// The `guest_uptime_ms` of `guest agent ready`, if logged.
    guest_uptime_ms: Option<f64>,
}

impl ShimLog {
    /// From the part of containerd's log written during the run of `id` (one shim ran).
    fn parse(log: &str, id: &str) -> Result<ShimLog> {
        let shim = |l: &&str| l.contains("source=containerd-shim-kata-v2");
        let time = |line: &str| -> Result<SystemTime> {
            let v = logfmt_value(line, "time").with_context(|| format!("no time in {line:?}"))?;
            parse_rfc3339(&v).with_context(|| format!("the time of {line:?}"))
        };
        let msg = |l: &&str, m: &str| logfmt_value(l, "msg").as_deref() == Some(m);
        let serving = log
            .lines()
            .filter(shim)
            .find(|l| msg(l, "serving"))
            .with_context(|| format!("no `serving` line of the shim of {id} in:\n{log}"))?;
        let ready = log
            .lines()
            .filter(shim)
            .find(|l| msg(l, "sandbox ready") && logfmt_value(l, "sandbox").as_deref() == Some(id))
            .with_context(|| format!("no `sandbox ready` line for {id} in:\n{log}"))?;
        let ready_ms = logfmt_value(ready, "ms")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no ms in {ready:?}"))?;
        let step = |m: &str| {
            log.lines()
                .filter(shim)
                .find(|l| msg(l, m))
                .and_then(|l| time(l).ok())
        };
        Ok(ShimLog {
            serving: time(serving)?,
            ready: time(ready)?,
            ready_ms,
            guest_uptime_ms: log
                .lines()
                .filter(shim)
                .find(|l| msg(l, "guest agent ready"))
                .and_then(|l| logfmt_value(l, "guest_uptime_ms"))
                .and_then(|v| v.parse().ok()),
            steps: [
                step("booting"),
                step("VMM running"),
                step("guest agent ready"),
            ],
        })
    }
}

/// The value of `key` in a logfmt line (`key=value` or `key="quoted value"`).
fn logfmt_value(line: &str, key: &str) -> Option<String> {
    let mut rest = line;
    loop {
        let i = rest.find(&format!("{key}="))?;
        let at_start = i == 0 || rest.as_bytes()[i - 1] == b' ';
        let value = &rest[i + key.len() + 1..];
        if !at_start {
            rest = value;
            continue;
        }
        if let Some(quoted) = value.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                match c {
                    '"' => return Some(out),
                    '\\' => out.push(chars.next()?),
                    c => out.push(c),
                }
            }
            return None;
        }
        return Some(value.split(' ').next().unwrap_or("").to_string());
    }
}

/// An RFC 3339 time (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`).
fn parse_rfc3339(s: &str) -> Result<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("not an RFC 3339 time: {s:?}"))?;
    Ok(t.into())
}
