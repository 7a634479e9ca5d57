//! Fault injection on `sandbox run` with real QEMU guests (TCG where KVM is not usable), in
//! namespaces the shim or the test creates, each under its own `--run-root`:
//!
//! - `kill -9` of the shim at each phase (right after QEMU is spawned, before the agent
//!   answers, during a NIC hotplug, during stop, on a pod network): `sandbox run` with the
//!   same id then names the dead shim and the cleanup command, and `sandbox cleanup`
//!   removes everything;
//! - `kill -9` of QEMU at the same phases under a live shim: the shim exits non-zero naming
//!   the VM's exit, and removes everything itself (during stop, where QEMU's end is what
//!   was asked for, it exits 0);
//! - SIGTERM during boot and during a hotplug: the teardown starts within 1 s; a second
//!   SIGTERM during a teardown stuck on a stopped QEMU forces it (exit status 3).
//!
//! Every case compares snapshots taken before and after (namespaces, QEMU processes of the
//! sandbox, files under the run root, the pod namespace's links and tc state) and starts
//! the same id again. Phases are found from the shim's JSON log lines on stderr. The cases
//! run one at a time: they measure latencies and share two cores with the guests.
//! They need root and the guest assets of `make guest-assets`; without them they fail with
//! the reason.
#![cfg(feature = "qemu")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use workspace_tests::cni::{tc_state, CniNetwork};
use workspace_tests::{require_root, run, unique_name};

mod common;

use common::{config, guest_dir, SHIM};

/// Boot plus agent under TCG on a loaded machine.
const PHASE_LIMIT: Duration = Duration::from_secs(240);
const EXIT_LIMIT: Duration = Duration::from_secs(60);
/// The spec's limit from a signal to the start of the teardown.
const TEARDOWN_START_LIMIT: Duration = Duration::from_secs(1);
/// `sandbox run`'s exit status when a second signal forced the teardown.
const EXIT_FORCED: i32 = 3;

/// One case at a time (see the module docs).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// What every case starts with: it needs root, waits for the other cases (the guard), and
/// gets a sandbox id `PREFIX-...`, a run root, and the snapshot from before the sandbox.
fn begin(prefix: &str) -> (MutexGuard<'static, ()>, String, tempfile::TempDir, Snapshot) {
    require_root();
    let one = serial();
    let id = unique_name(prefix);
    let root = tempfile::tempdir().unwrap();
    let before = snapshot(&id, root.path(), None);
    (one, id, root, before)
}

/// A log record of the shim: its message, its fields, and when the test read it.
#[derive(Debug, Clone)]
struct Line {
    at: Instant,
    msg: String,
    record: serde_json::Value,
}

/// A `sandbox run --log-format json` child whose stderr is read line by line; killed if
/// the test fails half-way.
struct Shim {
    child: Child,
    lines: Receiver<Line>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Shim {
    fn start(id: &str, run_root: &Path, extra: &[&str]) -> Shim {
        let mut child = Command::new(SHIM)
            .env("GUEST_DIR", guest_dir())
            .args([
                "--log-format",
                "json",
                "sandbox",
                "run",
                "--json",
                "--config",
            ])
            .arg(config("configuration-qemu.toml"))
            .args(["--id", id, "--run-root"])
            .arg(run_root)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the shim");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let all = seen.clone();
        std::thread::spawn(move || {
            for raw in BufReader::new(stderr).lines().map_while(Result::ok) {
                let at = Instant::now();
                all.lock().unwrap().push(raw.clone());
                let record: serde_json::Value =
                    serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
                let msg = record["msg"].as_str().unwrap_or_default().to_string();
                if tx.send(Line { at, msg, record }).is_err() {
                    break;
                }
            }
        });
        Shim { child, lines, seen }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.seen.lock().unwrap().join("\n")
    }

    /// Waits for the log record `msg` and returns it.
    fn wait_for(&mut self, msg: &str) -> Line {
        let deadline = Instant::now() + PHASE_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.msg == msg => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no {msg:?} from the shim within {PHASE_LIMIT:?} (exited: {:?}); its log:\n{}",
                    self.child.try_wait(),
                    self.log()
                ),
            }
        }
    }

    /// Waits for the shim to exit and returns its status and its error record, if any.
    fn wait_exit(&mut self) -> (ExitStatus, Option<String>) {
        let began = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                began.elapsed() < EXIT_LIMIT,
                "the shim did not exit within {EXIT_LIMIT:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader ends at EOF; give it the last lines.
        let began = Instant::now();
        let mut error = None;
        while began.elapsed() < Duration::from_secs(5) {
            match self.lines.recv_timeout(Duration::from_secs(5)) {
                Ok(line) if line.msg == "failed" => {
                    error = line.record["error"].as_str().map(String::from)
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        (status, error)
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal("TERM", self.pid());
            let began = Instant::now();
            while began.elapsed() < EXIT_LIMIT {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(name: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{name} {pid} failed");
}

/// The QEMU processes of sandbox `id` (QEMU is named `sandbox-ID`).
fn qemu_pids(id: &str) -> Vec<u32> {
    let name = format!("sandbox-{id}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
                args.windows(2)
                    .any(|w| w[0] == b"-name" && w[1] == name.as_bytes())
            })
        })
        .collect()
}

/// Files and directories under `root`, relative to it.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// What a sandbox may leave behind, observed from outside.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// Namespaces named after the sandbox.
    namespaces: Vec<String>,
    qemu: Vec<u32>,
    /// Files under the run root, except the two parents every run creates.
    files: Vec<PathBuf>,
    /// Links (`ip -j link`: name, kind) and tc state (`tc qdisc`) of a pod namespace.
    pod: Option<(Vec<String>, String)>,
}

fn snapshot(id: &str, run_root: &Path, pod: Option<&str>) -> Snapshot {
    let list = run("ip", &["netns", "list"]).unwrap();
    // Other tests make namespaces meanwhile: only those named after the sandbox count.
    let mut namespaces: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|n| n.contains(id))
        .collect();
    namespaces.sort();
    let files = tree(run_root)
        .into_iter()
        .filter(|p| p != Path::new("sandboxes") && p != Path::new("vm"))
        .collect();
    let pod = pod.map(|ns| {
        let out = run("ip", &["-n", ns, "-j", "-d", "link"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut links: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                format!(
                    "{} {}",
                    l["ifname"].as_str().unwrap_or_default(),
                    l["linkinfo"]["info_kind"].as_str().unwrap_or("-")
                )
            })
            .collect();
        links.sort();
        (links, run("tc", &["-n", ns, "qdisc", "show"]).unwrap())
    });
    Snapshot {
        namespaces,
        qemu: qemu_pids(id),
        files,
        pod,
    }
}

/// Asserts that nothing of sandbox `id` is left: the snapshot is the one before, and no
/// namespace named after the sandbox exists.
fn assert_nothing_left(before: &Snapshot, id: &str, run_root: &Path, pod: Option<&str>) {
    let after = snapshot(id, run_root, pod);
    assert_eq!(&after, before, "sandbox {id} left something behind");
    assert!(
        after.qemu.is_empty(),
        "QEMU of {id} is alive: {:?}",
        after.qemu
    );
    assert!(
        !after.namespaces.contains(&format!("kata-{id}")),
        "namespace kata-{id} is left"
    );
}

fn shim_cmd(args: &[&str], run_root: &Path) -> Output {
    Command::new(SHIM)
        .env("GUEST_DIR", guest_dir())
        .args(args)
        .arg("--run-root")
        .arg(run_root)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// After a shim died: `run` with its id refuses naming it, `cleanup` removes what it left
/// and a second `cleanup` finds nothing.
fn clean_up_after_dead_shim(id: &str, dead: u32, run_root: &Path) {
    let again = run_again(id, run_root);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(
        err.contains(&format!("left by a shim that died (pid {dead})"))
            && err.contains(&format!(
                "containerd-shim-kata-v2 sandbox cleanup --id {id} --run-root {}",
                run_root.display()
            )),
        "run with a dead sandbox's id: {}",
        text(&again)
    );

    let out = shim_cmd(&["sandbox", "cleanup", "--id", id], run_root);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cleanup failed: {}", text(&out));
    assert!(
        said.contains(&format!(
            "removed run directory {}",
            run_root.join("sandboxes").join(id).display()
        )) && said.contains(&format!("sandbox {id}: cleaned up")),
        "cleanup did not say what it removed: {}",
        text(&out)
    );
    let out = shim_cmd(&["sandbox", "cleanup", "--id", id], run_root);
    assert!(
        out.status.success(),
        "second cleanup failed: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to clean up"),
        "second cleanup: {}",
        text(&out)
    );
}

/// The same id boots again and stops cleanly.
fn starts_again(id: &str, run_root: &Path, extra: &[&str]) {
    let mut shim = Shim::start(id, run_root, extra);
    shim.wait_for("sandbox ready");
    signal("TERM", shim.pid());
    let (status, error) = shim.wait_exit();
    assert!(
        status.success(),
        "the restarted sandbox {id} exited with {status}: {error:?}\n{}",
        shim.log()
    );
}

/// Asserts that nothing of sandbox `id` is left (see [`assert_nothing_left`]), that the same
/// id boots again (with `extra`) and stops cleanly, and that it left nothing either.
fn nothing_left_and_starts_again(
    before: &Snapshot,
    id: &str,
    run_root: &Path,
    pod: Option<&str>,
    extra: &[&str],
) {
    assert_nothing_left(before, id, run_root, pod);
    starts_again(id, run_root, extra);
    assert_nothing_left(before, id, run_root, pod);
}

/// `sandbox run` of the shipped QEMU configuration with id `id`, run to its end.
fn run_again(id: &str, run_root: &Path) -> Output {
    shim_cmd(
        &[
            "sandbox",
            "run",
            "--config",
            config("configuration-qemu.toml").to_str().unwrap(),
            "--id",
            id,
        ],
        run_root,
    )
}

/// Starts a `sandbox hotplug-nic` client.
fn hotplug(id: &str, run_root: &Path) -> Child {
    Command::new(SHIM)
        .args(["sandbox", "hotplug-nic", "--id", id, "--run-root"])
        .arg(run_root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Where a fault is injected.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// QEMU spawned, not yet answering QMP.
    Spawn,
    /// The guest agent is awaited.
    Agent,
    /// A NIC hotplug is being served (QEMU is stopped meanwhile, see [`reach`]).
    Hotplug,
    /// The teardown after SIGTERM is running.
    Stop,
}

/// Starts sandbox `id` and brings it to `phase`; returns the shim, the QEMU pid and the
/// hotplug client when there is one.
fn reach(phase: Phase, id: &str, run_root: &Path, extra: &[&str]) -> (Shim, u32, Option<Child>) {
    let mut shim = Shim::start(id, run_root, extra);
    let recorded = shim.wait_for("VMM process recorded");
    let qemu = recorded.record["pid"].as_u64().unwrap() as u32;
    let mut client = None;
    match phase {
        Phase::Spawn => {}
        Phase::Agent => {
            shim.wait_for("waiting for the guest agent");
        }
        Phase::Hotplug => {
            shim.wait_for("sandbox ready");
            // A stopped QEMU answers no QMP: the hotplug waits inside the backend, so the
            // fault surely lands during it (a TCG hotplug can otherwise end in ~100 ms).
            signal("STOP", qemu);
            client = Some(hotplug(id, run_root));
            shim.wait_for("hot-plugging a NIC");
        }
        Phase::Stop => {
            shim.wait_for("sandbox ready");
            signal("TERM", shim.pid());
            shim.wait_for("tearing down");
        }
    }
    (shim, qemu, client)
}

fn kill_shim_at(phase: Phase, prefix: &str) {
    let (_one, id, root, before) = begin(prefix);
    // The ready file is in the run root: the snapshots see it if cleanup leaves it.
    let ready = root.path().join("ready.json");
    let ready = ["--ready-file", ready.to_str().unwrap()];
    let (mut shim, _qemu, client) = reach(phase, &id, root.path(), &ready);
    let dead = shim.pid();
    signal("KILL", dead);
    let (status, _) = shim.wait_exit();
    assert_eq!(status.code(), None, "the shim was not killed: {status}");
    if let Some(c) = client {
        let out = c.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "the hotplug of a killed shim succeeded"
        );
    }
    assert!(
        root.path()
            .join("sandboxes")
            .join(&id)
            .join("record.json")
            .exists(),
        "no record left at {phase:?}: nothing to test"
    );
    clean_up_after_dead_shim(&id, dead, root.path());
    nothing_left_and_starts_again(&before, &id, root.path(), None, &[]);
}

fn kill_qemu_at(phase: Phase, prefix: &str, expect: &[&str]) {
    let (_one, id, root, before) = begin(prefix);
    let (mut shim, qemu, client) = reach(phase, &id, root.path(), &[]);
    signal("KILL", qemu);
    let (status, error) = shim.wait_exit();
    let error = error.unwrap_or_default();
    eprintln!("QEMU killed at {phase:?}: the shim exited with {status}: {error}");
    if let Some(c) = client {
        let out = c.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "the hotplug into a killed VM succeeded"
        );
    }
    match phase {
        // The stop wanted QEMU gone: the backend counts any exit during it as stopped (it
        // escalates to SIGKILL itself), and the shim removes the rest and succeeds.
        Phase::Stop => assert!(
            status.success(),
            "the shim exited with {status}: {error}\n{}",
            shim.log()
        ),
        _ => {
            assert_eq!(status.code(), Some(1), "{error}\n{}", shim.log());
            for e in expect {
                assert!(error.contains(e), "the error does not say {e:?}: {error}");
            }
        }
    }
    nothing_left_and_starts_again(&before, &id, root.path(), None, &[]);
}

#[test]
fn shim_killed_right_after_spawning_qemu_is_removed_by_sandbox_cleanup() {
    kill_shim_at(Phase::Spawn, "fks");
}

#[test]
fn shim_killed_before_the_agent_answers_is_removed_by_sandbox_cleanup() {
    kill_shim_at(Phase::Agent, "fka");
}

#[test]
fn shim_killed_during_a_nic_hotplug_is_removed_by_sandbox_cleanup() {
    kill_shim_at(Phase::Hotplug, "fkh");
}

#[test]
fn shim_killed_during_stop_is_removed_by_sandbox_cleanup() {
    kill_shim_at(Phase::Stop, "fkt");
}

#[test]
fn qemu_killed_during_spawn_fails_the_run_naming_the_exit() {
    kill_qemu_at(Phase::Spawn, "fqs", &["signal 9"]);
}

#[test]
fn qemu_killed_before_the_agent_answers_fails_the_run_naming_the_exit() {
    kill_qemu_at(
        Phase::Agent,
        "fqa",
        &[
            "the VM exited before the guest agent answered",
            "killed (signal 9)",
        ],
    );
}

#[test]
fn qemu_killed_during_a_nic_hotplug_fails_the_run_naming_the_exit() {
    kill_qemu_at(
        Phase::Hotplug,
        "fqh",
        &["while a NIC was being hot-plugged", "killed (signal 9)"],
    );
}

#[test]
fn qemu_killed_during_stop_leaves_nothing() {
    kill_qemu_at(Phase::Stop, "fqt", &[]);
}

/// SIGTERM at `phase`: the teardown starts within 1 s and the shim exits 0.
fn sigterm_at(phase: Phase, prefix: &str) {
    let (_one, id, root, before) = begin(prefix);
    let (mut shim, qemu, client) = reach(phase, &id, root.path(), &[]);
    let sent = Instant::now();
    signal("TERM", shim.pid());
    let tearing = shim.wait_for("tearing down");
    if let Phase::Hotplug = phase {
        signal("CONT", qemu);
    }
    let latency = tearing.at.saturating_duration_since(sent);
    assert!(
        latency < TEARDOWN_START_LIMIT,
        "the teardown started {latency:?} after SIGTERM at {phase:?}"
    );
    let (status, error) = shim.wait_exit();
    assert!(status.success(), "exit {status}: {error:?}\n{}", shim.log());
    if let Some(c) = client {
        let out = c.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "the hotplug of a stopped sandbox succeeded"
        );
    }
    eprintln!("SIGTERM at {phase:?}: teardown started after {latency:?}");
    nothing_left_and_starts_again(&before, &id, root.path(), None, &[]);
}

#[test]
fn sigterm_during_boot_starts_the_teardown_within_a_second() {
    sigterm_at(Phase::Spawn, "fts");
}

#[test]
fn sigterm_before_the_agent_answers_starts_the_teardown_within_a_second() {
    sigterm_at(Phase::Agent, "fta");
}

#[test]
fn sigterm_during_a_nic_hotplug_starts_the_teardown_within_a_second() {
    sigterm_at(Phase::Hotplug, "fth");
}

#[test]
fn a_second_sigterm_forces_a_stuck_teardown_with_exit_status_3() {
    let (_one, id, root, before) = begin("ftf");
    let mut shim = Shim::start(&id, root.path(), &[]);
    let qemu = shim.wait_for("VMM process recorded").record["pid"]
        .as_u64()
        .unwrap() as u32;
    shim.wait_for("sandbox ready");
    // A stopped QEMU answers nothing: the orderly stop waits for QMP.
    signal("STOP", qemu);
    signal("TERM", shim.pid());
    shim.wait_for("tearing down");
    let stuck = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        shim.child.try_wait().unwrap().is_none(),
        "the teardown was not stuck: nothing to force"
    );
    signal("TERM", shim.pid());
    let forced = shim.wait_for("second signal: forcing the teardown");
    // The backend never answered: QEMU goes by its record (pid and start time).
    let killed = format!("VMM process {qemu} (killed)");
    loop {
        let line = shim.wait_for("removed");
        if line.record["what"] == killed.as_str() {
            break;
        }
    }
    let (status, error) = shim.wait_exit();
    let error = error.unwrap_or_default();
    assert_eq!(status.code(), Some(EXIT_FORCED), "{error}\n{}", shim.log());
    assert!(
        error.contains("teardown forced by a second SIGTERM"),
        "{error}"
    );
    eprintln!(
        "forced {:?} after the stuck teardown began",
        forced.at.duration_since(stuck)
    );
    nothing_left_and_starts_again(&before, &id, root.path(), None, &[]);
}

#[test]
fn shim_killed_on_a_pod_network_leaves_tc_state_that_sandbox_cleanup_removes() {
    require_root();
    let _one = serial();
    let net = CniNetwork::bridge("10.94.0.0/24").unwrap();
    let pod = netdev::NetNs::create(&unique_name("fpod")).unwrap();
    let container = pod.name().to_string();
    net.add(&container, pod.path()).unwrap();
    let tc_before = tc_state(pod.name(), "eth0").unwrap();
    let id = unique_name("fkp");
    let root = tempfile::tempdir().unwrap();
    let netns = pod.path().to_str().unwrap().to_string();
    let before = snapshot(&id, root.path(), Some(pod.name()));

    let mut shim = Shim::start(&id, root.path(), &["--netns", &netns]);
    shim.wait_for("sandbox ready");
    let filters = run(
        "tc",
        &["-n", pod.name(), "filter", "show", "dev", "eth0", "ingress"],
    )
    .unwrap();
    assert!(filters.contains("mirred"), "no redirect on eth0: {filters}");
    let dead = shim.pid();
    signal("KILL", dead);
    shim.wait_exit();
    // The shim's redirect is still on eth0: only the record knows it is there.
    assert_ne!(
        tc_state(pod.name(), "eth0").unwrap(),
        tc_before,
        "the tc state went with the shim: nothing to clean up"
    );
    clean_up_after_dead_shim(&id, dead, root.path());
    assert_eq!(tc_state(pod.name(), "eth0").unwrap(), tc_before);
    nothing_left_and_starts_again(
        &before,
        &id,
        root.path(),
        Some(pod.name()),
        &["--netns", &netns],
    );
    net.del(&container, pod.path())
        .expect("CNI DEL after the sandbox");
    pod.delete().unwrap();
}

#[test]
fn a_live_sandbox_is_neither_started_twice_nor_cleaned_up() {
    let (_one, id, root, before) = begin("flv");
    let mut shim = Shim::start(&id, root.path(), &[]);
    shim.wait_for("sandbox ready");
    let owner = shim.pid();

    let twice = run_again(&id, root.path());
    assert_eq!(twice.status.code(), Some(1), "{}", text(&twice));
    assert!(
        String::from_utf8_lossy(&twice.stderr)
            .contains(&format!("a sandbox with id {id} is running (pid {owner})")),
        "{}",
        text(&twice)
    );
    let cleanup = shim_cmd(&["sandbox", "cleanup", "--id", &id], root.path());
    assert_eq!(cleanup.status.code(), Some(1), "{}", text(&cleanup));
    assert!(
        String::from_utf8_lossy(&cleanup.stderr).contains(&format!(
            "owned by a running shim (pid {owner}): stop it with SIGTERM"
        )),
        "{}",
        text(&cleanup)
    );
    // Neither touched the running sandbox: it still answers its control socket.
    let facts = shim_cmd(&["sandbox", "facts", "--json", "--id", &id], root.path());
    assert!(facts.status.success(), "{}", text(&facts));

    signal("TERM", owner);
    let (status, error) = shim.wait_exit();
    assert!(status.success(), "exit {status}: {error:?}\n{}", shim.log());
    assert_nothing_left(&before, &id, root.path(), None);
}

/// A copy of the guest in `dir` whose agent exits with status 3 as soon as it starts.
fn guest_with_a_broken_agent(dir: &Path) {
    let guest = guest_dir();
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let sh = |script: String, cwd: &Path| {
        let out = Command::new("sh")
            .args(["-c", &script])
            .current_dir(cwd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {}", text(&out));
    };
    sh(
        format!(
            "f='{}'; if gzip -t \"$f\" 2>/dev/null; then gzip -dc \"$f\"; else cat \"$f\"; fi | cpio -id --quiet",
            guest.join("initramfs.img").display()
        ),
        &root,
    );
    let agent = root.join("sbin/guest-agent");
    assert!(agent.exists(), "the guest has no agent to break");
    std::fs::remove_file(&agent).unwrap();
    std::fs::write(
        &agent,
        b"#!/bin/sh\necho 'guest-agent: broken on purpose'\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    sh(
        format!(
            "find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 > '{}'",
            dir.join("initramfs.img").display()
        ),
        &root,
    );
    std::os::unix::fs::symlink(guest.join("vmlinuz"), dir.join("vmlinuz")).unwrap();
}

#[test]
fn a_guest_init_failure_fails_the_run_at_once_naming_it() {
    let (_one, id, root, before) = begin("fgi");
    let guest = tempfile::tempdir().unwrap();
    guest_with_a_broken_agent(guest.path());
    let mut child = Command::new(SHIM)
        .env("GUEST_DIR", guest.path())
        .args(["sandbox", "run", "--config"])
        .arg(config("configuration-qemu.toml"))
        .args(["--id", &id, "--run-root"])
        .arg(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let began = Instant::now();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let status = child.wait().unwrap();
    let took = began.elapsed();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("containerd-shim-kata-v2: error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        error.contains("the VM exited before the guest agent answered")
            && error.contains("the guest init failed: guest-agent exited with status 3"),
        "{error}"
    );
    assert!(
        took < Duration::from_secs(30),
        "the init's failure took {took:?} to end the run (the agent timeout is 120 s)"
    );
    eprintln!("failed after {took:?}: {error}");
    assert_nothing_left(&before, &id, root.path(), None);
}

#[test]
fn a_namespace_of_the_sandbox_name_made_by_someone_else_is_refused_and_kept() {
    require_root();
    let _one = serial();
    let id = unique_name("fns");
    let root = tempfile::tempdir().unwrap();
    let theirs = netdev::NetNs::create(&format!("kata-{id}")).unwrap();
    let out = shim_cmd(
        &[
            "sandbox",
            "run",
            "--config",
            config("configuration-qemu.toml").to_str().unwrap(),
            "--id",
            &id,
        ],
        root.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "network namespace kata-{id} exists already and is not this sandbox's"
        )),
        "{}",
        text(&out)
    );
    assert!(
        theirs.path().exists(),
        "the run deleted a namespace not its own"
    );
    assert_eq!(tree(&root.path().join("sandboxes")), Vec::<PathBuf>::new());
    theirs.delete().unwrap();
}

#[test]
fn run_files_are_private_0700_directories_0600_files_and_socket() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    require_root();
    let _one = serial();
    let id = unique_name("fpm");
    let tmp = tempfile::tempdir().unwrap();
    // A run root that does not exist yet: the shim creates it.
    let root = tmp.path().join("run");
    let ready = tmp.path().join("ready.json");
    let mut shim = Shim::start(&id, &root, &["--ready-file", ready.to_str().unwrap()]);
    shim.wait_for("sandbox ready");
    let dir = root.join("sandboxes").join(&id);
    let mode = |p: &Path| {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        (m.mode() & 0o7777, m.file_type())
    };
    for d in [
        root.clone(),
        root.join("sandboxes"),
        dir.clone(),
        root.join("vm"),
        root.join("vm").join(&id),
    ] {
        assert_eq!(mode(&d).0, 0o700, "directory {}", d.display());
    }
    for f in [
        dir.join("record.json"),
        dir.join("facts.json"),
        ready.clone(),
    ] {
        assert_eq!(mode(&f).0, 0o600, "file {}", f.display());
    }
    let (bits, kind) = mode(&dir.join("control.sock"));
    assert!(kind.is_socket());
    assert_eq!(bits, 0o600, "control socket");
    signal("TERM", shim.pid());
    let (status, error) = shim.wait_exit();
    assert!(status.success(), "exit {status}: {error:?}\n{}", shim.log());
    let left: Vec<PathBuf> = tree(&root)
        .into_iter()
        .filter(|p| p != Path::new("sandboxes") && p != Path::new("vm"))
        .collect();
    assert_eq!(left, Vec::<PathBuf>::new(), "run files left");
    assert!(!ready.exists(), "the ready file is left");
}

#[test]
fn the_signal_log_line_names_what_was_in_progress() {
    require_root();
    let _one = serial();
    let id = unique_name("fsd");
    let root = tempfile::tempdir().unwrap();
    let before = snapshot(&id, root.path(), None);
    let (mut shim, qemu, client) = reach(Phase::Hotplug, &id, root.path(), &[]);
    signal("TERM", shim.pid());
    let line = shim.wait_for("signal received, stopping");
    signal("CONT", qemu);
    assert_eq!(line.record["signal"], "SIGTERM", "{:?}", line.record);
    assert_eq!(
        line.record["during"], "hot-plugging a NIC",
        "{:?}",
        line.record
    );
    let (status, error) = shim.wait_exit();
    assert!(status.success(), "exit {status}: {error:?}\n{}", shim.log());
    let out = client.unwrap().wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the hotplug of a stopped sandbox succeeded"
    );
    assert_nothing_left(&before, &id, root.path(), None);
}
