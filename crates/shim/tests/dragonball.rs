//! The shim with the Dragonball backend on this host: `sandbox check` reports the backend and
//! what KVM can do here, and `sandbox run` boots a guest in the shim's own process on a
//! persistent TAP it opens by name, then removes everything on SIGTERM.
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

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-kata-v2");
const STEP_LIMIT: Duration = Duration::from_secs(60);

fn require_root_and_kvm() {
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    assert_eq!(
        uid.ok(),
        Some(0),
        "this test needs root: it creates network namespaces and TAP devices (run `sudo make test`)"
    );
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the Dragonball backend runs guests on KVM only"
    );
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cpu_has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[test]
fn sandbox_check_reports_the_dragonball_backend_and_its_kvm_finding() {
    require_root_and_kvm();
    let guest = repo().join(".cache/guest");
    assert!(
        guest.join("vmlinuz").exists(),
        "guest assets are missing in {}: run `make guest-assets` first",
        guest.display()
    );
    let out = Command::new(SHIM)
        .args(["sandbox", "check", "--config"])
        .arg(repo().join("configs/configuration-dragonball.toml"))
        .env("GUEST_DIR", &guest)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{stdout}"))
            .to_string()
    };
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
    if cpu_has_hardware_virtualization() {
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

#[test]
fn sandbox_run_boots_in_process_on_a_named_persistent_tap_and_removes_it_on_sigterm() {
    require_root_and_kvm();
    let elf = repo().join(".cache/testguest/testguest.elf");
    assert!(
        elf.exists(),
        "the test guest {} is missing: run `make test-guest` first",
        elf.display()
    );
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
    let id = format!("db{}", std::process::id());
    // A namespace of the test's: the shim must delete its TAP in it and leave it.
    let ns = format!("dbns{}", std::process::id());
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    struct DeleteNs(String);
    impl Drop for DeleteNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _ns = DeleteNs(ns.clone());
    let run_root = dir.path().join("run");
    let mut child = Command::new(SHIM)
        .args(["sandbox", "run", "--agent-timeout", "600", "--config"])
        .arg(&config)
        .args(["--id", &id, "--netns", &ns, "--run-root"])
        .arg(&run_root)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    /// Kills the shim if the test fails before it exits.
    struct Kill(Option<u32>);
    impl Drop for Kill {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
    let mut kill = Kill(Some(pid));
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let began = Instant::now();
    while !log.iter().any(|l: &String| l.contains("VMM running")) {
        let left = STEP_LIMIT.saturating_sub(began.elapsed());
        match rx.recv_timeout(left) {
            Ok(l) => log.push(l),
            Err(_) => panic!(
                "the VM did not start within {STEP_LIMIT:?}:\n{}",
                log.join("\n")
            ),
        }
    }
    // The VMM runs in the shim: it holds the TAP it opened by name in the sandbox's
    // namespace, and the TAP is persistent (the shim kept no fd of it).
    assert!(
        log.iter().any(|l| l.contains("backend: dragonball")),
        "{}",
        log.join("\n")
    );
    assert_eq!(
        tap_is_persistent(&ns, "tap0"),
        Some(true),
        "no persistent tap0 in {ns}"
    );
    assert_eq!(
        open_tun_fds(pid),
        1,
        "the in-process VMM should hold one TAP fd"
    );
    let console = run_root.join("vm").join(&id).join("console.log");
    let began = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("testguest: hello from the test guest")
    {
        assert!(
            began.elapsed() < STEP_LIMIT,
            "the guest printed nothing to {}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let began = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            kill.0 = None;
            break s;
        }
        assert!(
            began.elapsed() < STEP_LIMIT,
            "the shim did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        log.push(l);
    }
    let log = log.join("\n");
    // Stopped while waiting for the agent: an error exit that names why, after the teardown.
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("SIGTERM received while waiting for the guest agent"),
        "{log}"
    );
    assert!(log.contains("sandbox removed"), "{log}");
    assert!(
        Path::new("/run/netns").join(&ns).exists(),
        "the given namespace {ns} was deleted"
    );
    assert_eq!(tap_is_persistent(&ns, "tap0"), None, "tap0 is left in {ns}");
    let taps = Command::new("ip")
        .args(["-n", &ns, "-o", "link", "show", "type", "tun"])
        .output()
        .unwrap();
    assert!(
        taps.stdout.is_empty(),
        "TAPs left: {}",
        String::from_utf8_lossy(&taps.stdout)
    );
    assert!(!run_root.join("sandboxes").join(&id).exists());
    assert!(!run_root.join("vm").join(&id).exists());
}
