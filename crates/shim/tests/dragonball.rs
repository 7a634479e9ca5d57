//! The shim with the Dragonball backend on this host: `sandbox check` reports the backend and
//! what KVM can do here, and `sandbox run` boots a guest in the shim's own process on a
//! persistent TAP it opens by name (the shim's own, or one connected to a pod's veth by tc
//! redirection), then removes everything it added on SIGTERM.
//!
//! `sandbox run` boots the freestanding test guest (`make test-guest`), which runs under a
//! nested KVM where Linux does not; it has no agent, so the run is stopped while it waits
//! for one. Needs root (namespaces, TAPs) and `/dev/kvm`.
#![cfg(feature = "dragonball")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::{config, guest_dir, SHIM};
use workspace_tests::{hardware_virtualization, require_root, test_guest};

const STEP_LIMIT: Duration = Duration::from_secs(60);

fn require_root_and_kvm() {
    require_root();
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the Dragonball backend runs guests on KVM only"
    );
}

#[test]
fn sandbox_check_reports_the_dragonball_backend_and_its_kvm_finding() {
    require_root_and_kvm();
    let guest = guest_dir();
    let out = Command::new(SHIM)
        .args(["sandbox", "check", "--config"])
        .arg(config("configuration-dragonball.toml"))
        .env("GUEST_DIR", &guest)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |name: &str| common::check_line(&stdout, name);
    assert!(
        line("config").contains("hypervisor dragonball"),
        "{}",
        line("config")
    );
    assert!(
        line("backend").starts_with("PASS")
            && line("backend").contains("dragonball: compiled in (in-process VMM)"),
        "{}",
        line("backend")
    );
    let kvm = line("kvm");
    assert!(
        kvm.contains("/dev/kvm opens, speaks API version 12"),
        "{kvm}"
    );
    if hardware_virtualization() {
        assert!(kvm.starts_with("PASS"), "{kvm}");
    } else {
        assert!(
            kvm.starts_with("WARN")
                && kvm.contains("no vmx/svm")
                && kvm.contains("a Linux guest does not boot on this host"),
            "{kvm}"
        );
        assert!(stdout.contains("warning(s) above"), "{stdout}");
    }
}

/// The persistent flag of a TAP, from `ip -d -j link`.
fn tap_is_persistent(netns: &str, tap: &str) -> Option<bool> {
    let out = Command::new("ip")
        .args(["-n", netns, "-d", "-j", "link", "show", "dev", tap])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v[0]["linkinfo"]["info_data"]["persist"].as_bool()
}

fn open_tun_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t == Path::new("/dev/net/tun"))
                .count()
        })
        .unwrap_or(0)
}

/// A namespace of the test's, deleted at the end.
struct TestNs(String);

impl TestNs {
    fn new(prefix: &str) -> TestNs {
        let name = format!("{prefix}{}", std::process::id());
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success());
        TestNs(name)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tc_ingress(netns: &str, ifname: &str) -> (String, String) {
    let run = |args: &[&str]| {
        let out = Command::new("tc").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "tc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    (
        run(&["-n", netns, "qdisc", "show"]),
        run(&["-n", netns, "filter", "show", "dev", ifname, "ingress"]),
    )
}

/// `sandbox run` of the test guest on the Dragonball backend, up to its VMM running.
struct DbSandbox {
    child: std::process::Child,
    rx: mpsc::Receiver<String>,
    log: Vec<String>,
    run_root: PathBuf,
    id: String,
    _dir: tempfile::TempDir,
}

impl DbSandbox {
    fn start(netns: &str) -> DbSandbox {
        let elf = test_guest();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("db.toml");
        std::fs::write(
            &config,
            format!(
                "[hypervisor.dragonball]\nkernel = \"{}\"\nkernel_params = \"testguest.action=hlt_forever\"\ndefault_memory = 64\n",
                elf.display()
            ),
        )
        .unwrap();
        let id = format!("{netns}sb");
        let run_root = dir.path().join("run");
        let mut child = Command::new(SHIM)
            .args(["sandbox", "run", "--agent-timeout", "600", "--config"])
            .arg(&config)
            .args(["--id", &id, "--netns", netns, "--run-root"])
            .arg(&run_root)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let _ = tx.send(line);
            }
        });
        let mut sb = DbSandbox {
            child,
            rx,
            log: Vec::new(),
            run_root,
            id,
            _dir: dir,
        };
        let began = Instant::now();
        while !sb.log.iter().any(|l| l.contains("VMM running")) {
            let left = STEP_LIMIT.saturating_sub(began.elapsed());
            match sb.rx.recv_timeout(left) {
                Ok(l) => sb.log.push(l),
                Err(_) => panic!(
                    "the VM did not start within {STEP_LIMIT:?}:\n{}",
                    sb.log.join("\n")
                ),
            }
        }
        assert!(
            sb.log.iter().any(|l| l.contains("backend: dragonball")),
            "{}",
            sb.log.join("\n")
        );
        sb
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_console(&self, needle: &str) {
        let console = self.run_root.join("vm").join(&self.id).join("console.log");
        let began = Instant::now();
        while !std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains(needle)
        {
            assert!(
                began.elapsed() < STEP_LIMIT,
                "the guest did not print {needle:?} to {}",
                console.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM while the shim waits for an agent the test guest does not have: the teardown,
    /// then exit status 0 (stopped on request). Returns the log.
    fn stop(mut self) -> String {
        assert!(Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success());
        let began = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                began.elapsed() < STEP_LIMIT,
                "the shim did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        while let Ok(l) = self.rx.recv_timeout(Duration::from_secs(5)) {
            self.log.push(l);
        }
        let log = self.log.join("\n");
        // A stop on request, in whatever phase, is a clean exit.
        assert!(status.success(), "{status}: {log}");
        assert!(
            log.contains("signal received, stopping") && log.contains("SIGTERM"),
            "{log}"
        );
        assert!(log.contains("sandbox removed"), "{log}");
        assert!(!self.run_root.join("sandboxes").join(&self.id).exists());
        assert!(!self.run_root.join("vm").join(&self.id).exists());
        log
    }
}

impl Drop for DbSandbox {
    /// Kills the shim (and the VM in it) if the test fails before it exits.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn taps_in(netns: &str) -> String {
    ip(&["-n", netns, "-o", "link", "show", "type", "tun"])
}

#[test]
fn sandbox_run_boots_in_process_on_a_named_persistent_tap_and_removes_it_on_sigterm() {
    require_root_and_kvm();
    // A namespace of the test's with only lo: the shim makes its own TAP, must delete it,
    // and must leave the namespace.
    let ns = TestNs::new("dbns");
    let sb = DbSandbox::start(&ns.0);
    // The VMM runs in the shim: it holds the TAP it opened by name in the sandbox's
    // namespace, and the TAP is persistent (the shim kept no fd of it).
    assert_eq!(
        tap_is_persistent(&ns.0, "tap0"),
        Some(true),
        "no persistent tap0 in {}",
        ns.0
    );
    assert_eq!(
        open_tun_fds(sb.pid()),
        1,
        "the in-process VMM should hold one TAP fd"
    );
    sb.wait_console("testguest: hello from the test guest");
    sb.stop();
    assert!(
        Path::new("/run/netns").join(&ns.0).exists(),
        "the given namespace {} was deleted",
        ns.0
    );
    assert_eq!(tap_is_persistent(&ns.0, "tap0"), None, "tap0 is left");
    let taps = taps_in(&ns.0);
    assert!(taps.is_empty(), "TAPs left: {taps}");
}

#[test]
fn sandbox_run_connects_a_pod_veth_to_a_named_tap_and_leaves_the_pod_as_it_was() {
    require_root_and_kvm();
    // A pod namespace with a veth whose peer is elsewhere, as CNI's ptp plugin leaves it.
    let pod = TestNs::new("dbpod");
    let peer = TestNs::new("dbpeer");
    ip(&[
        "-n", &pod.0, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns",
        &peer.0,
    ]);
    ip(&["-n", &pod.0, "addr", "add", "10.94.0.2/24", "dev", "eth0"]);
    ip(&["-n", &pod.0, "link", "set", "eth0", "up"]);
    let tc_before = tc_ingress(&pod.0, "eth0");
    let eth0_before = ip(&["-n", &pod.0, "-j", "addr", "show", "dev", "eth0"]);

    let sb = DbSandbox::start(&pod.0);
    let log = sb.log.join("\n");
    assert!(
        log.contains("pod interface connected") && log.contains("interface: eth0"),
        "{log}"
    );
    assert_eq!(
        tap_is_persistent(&pod.0, "tap0_kata"),
        Some(true),
        "no persistent tap0_kata in {}",
        pod.0
    );
    assert_eq!(
        open_tun_fds(sb.pid()),
        1,
        "the in-process VMM should hold the TAP"
    );
    let (_, filters) = tc_ingress(&pod.0, "eth0");
    assert!(
        filters.contains("mirred") && filters.contains("tap0_kata"),
        "no redirect from eth0 to tap0_kata: {filters}"
    );
    sb.stop();

    assert_eq!(tc_ingress(&pod.0, "eth0"), tc_before);
    assert_eq!(
        ip(&["-n", &pod.0, "-j", "addr", "show", "dev", "eth0"]),
        eth0_before
    );
    let taps = taps_in(&pod.0);
    assert!(taps.is_empty(), "TAPs left: {taps}");
}
