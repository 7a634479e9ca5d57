//! `sandbox run` end to end with real QEMU guests (TCG where KVM is not usable), and
//! `sandbox check` on this host. These need root and the guest assets of
//! `make guest-assets`; without them they fail with the reason.
#![cfg(feature = "qemu")]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{config, guest_dir, ping, shim, stop, Running, SHIM};
use workspace_tests::require_root;

/// Starts `sandbox run --json` with the repository's QEMU configuration.
fn start(id: &str, run_root: &Path, extra: &[&str]) -> Running {
    common::start(&config("configuration-qemu.toml"), id, run_root, extra)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id())
}

fn taps_in(netns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "link", "show", "type", "tun"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text }).unwrap();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(String::from))
        .collect()
}

#[test]
fn sandbox_run_boots_pings_hotplugs_unplugs_and_leaves_nothing_behind_on_sigterm() {
    require_root();
    let id = unique("own");
    let run_root = tempfile::tempdir().unwrap();
    let ready = run_root.path().join("ready.json");
    let r = start(
        &id,
        run_root.path(),
        &["--ready-file", ready.to_str().unwrap()],
    );
    let f = r.facts.clone();
    assert!(ready.exists(), "no ready file");
    let ns = f["netns_name"]
        .as_str()
        .expect("a named namespace")
        .to_string();
    assert_eq!(ns, format!("kata-{id}"));
    assert_eq!(f["netns_owned"], true);
    let vmm = f["vmm_pid"].as_u64().unwrap();
    assert!(Path::new(&format!("/proc/{vmm}")).exists());
    let guest = f["nics"][0]["guest_ip"].as_str().unwrap().to_string();
    assert!(
        ping(&ns, &guest),
        "the guest did not answer ping at {guest}"
    );
    assert_eq!(taps_in(&ns), [f["nics"][0]["tap"].as_str().unwrap()]);

    let out = shim()
        .args([
            "sandbox",
            "hotplug-nic",
            "--json",
            "--id",
            &id,
            "--run-root",
        ])
        .arg(run_root.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nic: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nic["hotplugged"], true);
    let second = nic["guest_ip"].as_str().unwrap();
    assert_ne!(second, guest);
    assert!(
        ping(&ns, second),
        "the hot-plugged NIC did not answer ping at {second}"
    );
    assert_eq!(taps_in(&ns).len(), 2);

    // Unplugged again: QEMU lets go of the TAP's fds, so the TAP goes; the guest no longer
    // answers there, and the facts list the first NIC only.
    let (second_id, second_tap) = (nic["id"].as_str().unwrap(), nic["tap"].as_str().unwrap());
    let out = shim()
        .args(["sandbox", "unplug-nic", "--id", &id, "--nic", second_id])
        .arg("--run-root")
        .arg(run_root.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{second_id} unplugged\n")
    );
    let began = Instant::now();
    while taps_in(&ns).iter().any(|t| t == second_tap) {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "TAP {second_tap} of the unplugged NIC is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(taps_in(&ns), [f["nics"][0]["tap"].as_str().unwrap()]);
    let answered = Command::new("ip")
        .args(["netns", "exec", &ns, "ping", "-c", "1", "-W", "1", second])
        .output()
        .unwrap();
    assert!(
        !answered.status.success(),
        "{second} still answers after its NIC was unplugged"
    );
    let out = shim()
        .args(["sandbox", "facts", "--json", "--id", &id, "--run-root"])
        .arg(run_root.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(now["nics"].as_array().map(Vec::len), Some(1), "{now}");
    assert!(
        ping(&ns, &guest),
        "the first NIC stopped answering at {guest}"
    );

    stop(r);
    assert!(
        !Path::new(&format!("/proc/{vmm}")).exists(),
        "QEMU {vmm} is still alive"
    );
    assert!(
        !Path::new("/run/netns").join(&ns).exists(),
        "namespace {ns} is left"
    );
    assert!(
        !run_root.path().join("sandboxes").join(&id).exists(),
        "the shim's run dir is left"
    );
    assert!(
        !run_root.path().join("vm").join(&id).exists(),
        "the VM's run dir is left"
    );
    assert!(!ready.exists(), "the ready file is left");
}

#[test]
fn sandbox_run_in_a_given_namespace_keeps_it_and_removes_its_taps() {
    require_root();
    let ns = unique("given");
    let status = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(status.success());
    struct DeleteNs(String);
    impl Drop for DeleteNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _cleanup = DeleteNs(ns.clone());
    // An address already in 10.200.0.0/24 makes the shim pick the next /24. It sits on
    // `lo`: any other interface would make the namespace a pod network, which the shim
    // connects to the guest instead (tests/pod_network.rs).
    let ok = Command::new("ip")
        .args(["-n", &ns, "addr", "add", "10.200.0.1/24", "dev", "lo"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "setting up the namespace");

    let id = unique("given");
    let run_root = tempfile::tempdir().unwrap();
    let r = start(&id, run_root.path(), &["--netns", &ns]);
    let f = r.facts.clone();
    assert_eq!(f["netns_owned"], false);
    let guest = f["nics"][0]["guest_ip"].as_str().unwrap().to_string();
    assert_eq!(guest, "10.200.1.2", "the used /24 was not skipped");
    assert!(
        ping(&ns, &guest),
        "the guest did not answer ping at {guest}"
    );
    let vmm = f["vmm_pid"].as_u64().unwrap();

    stop(r);
    assert!(
        !Path::new(&format!("/proc/{vmm}")).exists(),
        "QEMU {vmm} is still alive"
    );
    assert!(
        Path::new("/run/netns").join(&ns).exists(),
        "the given namespace was deleted"
    );
    assert_eq!(taps_in(&ns), Vec::<String>::new(), "TAPs left in {ns}");
    assert!(!run_root.path().join("sandboxes").join(&id).exists());
    assert!(!run_root.path().join("vm").join(&id).exists());
}

#[test]
fn sandbox_check_reports_each_host_fact_on_its_own_line() {
    require_root();
    guest_dir();
    let out = shim()
        .args(["sandbox", "check", "--config"])
        .arg(config("configuration-qemu.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |name: &str| common::check_line(&stdout, name);
    // The shipped configuration confines QEMU: seccomp, the kata-qemu user (`make deps`
    // creates it), chroot.
    for name in [
        "root", "tun", "config", "backend", "vmm", "seccomp", "rootless", "chroot", "kernel",
        "initrd",
    ] {
        assert!(line(name).starts_with("PASS"), "{}", line(name));
    }
    let kvm = line("kvm");
    assert!(
        kvm.starts_with("PASS  kvm          usable")
            || (kvm.starts_with("WARN") && kvm.contains("tcg instead")),
        "{kvm}"
    );
    assert!(
        line("vmm").contains("QEMU emulator version"),
        "{}",
        line("vmm")
    );
    assert!(stdout.contains("ok: this host can run a sandbox"));
}

#[test]
fn sandbox_check_fails_on_missing_guest_assets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[hypervisor.qemu]\nkernel = \"${CONFIG_DIR}/no-such-vmlinuz\"\n",
    )
    .unwrap();
    let out = Command::new(SHIM)
        .args(["sandbox", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL  kernel") && l.contains("make guest-assets")),
        "{stdout}"
    );
}
