//! VM templates end to end (`[factory] enable_template`): `sandbox template create|list|
//! delete` and sandboxes restored from a template, with real QEMU guests (TCG where KVM is
//! not usable). Needs root and the guest assets of `make guest-assets`.
#![cfg(feature = "qemu")]

use std::path::Path;
use std::process::Command;

mod common;

use common::{guest, guest_dir, ping, shim, start, stop, template_config, Running};
use workspace_tests::require_root;

fn template(config: &Path, args: &[&str]) -> String {
    let out = shim()
        .args(["sandbox", "template"])
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "template {args:?}: {stdout}\n{stderr}"
    );
    stdout
}

/// Making a template sweeps the namespaces of dead template creators, and one test here
/// makes a dead creator's namespace: one test's sweep must not meet it half made (the file
/// created, the namespace not yet bound to it). The tests that make templates run one at a
/// time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn netns(r: &Running) -> String {
    r.facts["netns_name"].as_str().unwrap().to_string()
}

fn guest_ip(r: &Running) -> String {
    r.facts["nics"][0]["guest_ip"].as_str().unwrap().to_string()
}

#[test]
fn clones_are_distinct_machines_and_outlive_their_template() {
    require_root();
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let cfg = template_config(dir.path(), &guest_dir());
    let run_root = dir.path().join("run");

    let made = template(&cfg, &["create"]);
    assert!(made.starts_with("template "), "{made}");
    let listed = template(&cfg, &["list"]);
    assert!(listed.contains("current"), "{listed}");

    let (a_id, b_id) = (
        format!("tpla{}", std::process::id()),
        format!("tplb{}", std::process::id()),
    );
    let a = start(&cfg, &a_id, &run_root, &[]);
    let b = start(&cfg, &b_id, &run_root, &[]);
    for r in [&a, &b] {
        let timings = &r.facts["timings_ms"];
        assert!(
            timings["template"].is_u64(),
            "not restored from the template: {timings}"
        );
        assert!(
            ping(&netns(r), &guest_ip(r)),
            "the clone does not answer ping"
        );
    }
    // Distinct machines: hostnames, MACs, the kernel's random state (vmgenid reseeds it),
    // and a clock set to the host's.
    assert_eq!(guest(&run_root, &a_id, &["hostname"]).trim(), a_id);
    assert_eq!(guest(&run_root, &b_id, &["hostname"]).trim(), b_id);
    assert_ne!(a.facts["nics"][0]["mac"], b.facts["nics"][0]["mac"]);
    // Each clone's first NIC is the template's (not hot-plugged), with the clone's MAC
    // in the guest.
    for (r, id) in [(&a, &a_id), (&b, &b_id)] {
        let nic = &r.facts["nics"][0];
        assert_eq!(nic["hotplugged"], false, "{nic}");
        let name = nic["guest_interface"].as_str().unwrap();
        let seen = guest(
            &run_root,
            id,
            &["cat", &format!("/sys/class/net/{name}/address")],
        );
        assert_eq!(seen.trim(), nic["mac"].as_str().unwrap());
    }
    let uuid = ["cat", "/proc/sys/kernel/random/uuid"];
    let (ua, ub) = (
        guest(&run_root, &a_id, &uuid),
        guest(&run_root, &b_id, &uuid),
    );
    assert_ne!(ua, ub, "two clones drew the same random uuid");
    let rand = ["head", "-c", "16", "/dev/urandom"];
    assert_ne!(
        guest(&run_root, &a_id, &rand),
        guest(&run_root, &b_id, &rand),
        "two clones read the same random bytes"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let guest_now: i64 = guest(&run_root, &a_id, &["date", "+%s"])
        .trim()
        .parse()
        .unwrap();
    assert!(
        (guest_now - now).abs() <= 5,
        "guest clock {guest_now}, host {now}"
    );

    // A NIC hot-plugged into a clone answers too.
    let nic = shim()
        .args([
            "sandbox",
            "hotplug-nic",
            "--json",
            "--id",
            &a_id,
            "--run-root",
        ])
        .arg(&run_root)
        .output()
        .unwrap();
    assert!(
        nic.status.success(),
        "{}",
        String::from_utf8_lossy(&nic.stderr)
    );
    let nic: serde_json::Value = serde_json::from_slice(&nic.stdout).unwrap();
    assert!(ping(&netns(&a), nic["guest_ip"].as_str().unwrap()));

    // Deleting the template does not break the clones: they map its memory.
    let deleted = template(&cfg, &["delete", "--all"]);
    assert!(deleted.contains("removed"), "{deleted}");
    assert!(ping(&netns(&b), &guest_ip(&b)));
    assert_eq!(guest(&run_root, &b_id, &["hostname"]).trim(), b_id);

    let nets = [netns(&a), netns(&b)];
    stop(a);
    stop(b);
    for ns in nets {
        assert!(!Path::new("/run/netns").join(&ns).exists(), "{ns} left");
    }
    let left = std::fs::read_dir(run_root.join("sandboxes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "run directories left");
    assert!(
        Command::new("pgrep")
            .args(["-f", &format!("sandbox-tpl[ab]{}", std::process::id())])
            .output()
            .unwrap()
            .stdout
            .is_empty(),
        "a QEMU is left"
    );
}

#[test]
fn a_template_of_another_kernel_is_rebuilt_not_restored() {
    require_root();
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    // A guest of our own: the kernel is changed after the template is made.
    let guest = dir.path().join("guest");
    std::fs::create_dir(&guest).unwrap();
    for f in ["vmlinuz", "initramfs.img"] {
        std::fs::copy(guest_dir().join(f), guest.join(f)).unwrap();
    }
    let cfg = template_config(dir.path(), &guest);
    // The namespace a creator that died left (no process has a pid above pid_max) goes
    // when the next template is made.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stale = netdev::NetNs::create(&format!("kata-template-{}", pid_max + 1))
        .unwrap()
        .into_path();
    // One a live process is named for stays.
    let live = netdev::NetNs::create(&format!("kata-template-{}", std::process::id())).unwrap();
    let first = template(&cfg, &["create"]);
    assert!(!stale.exists(), "{} was not swept", stale.display());
    assert!(
        live.path().exists(),
        "the namespace of a live process was swept"
    );
    live.delete().unwrap();
    let digest = first.split_whitespace().nth(1).unwrap().to_string();

    // Same kernel, one byte appended (it still boots): another template.
    let mut kernel = std::fs::read(guest.join("vmlinuz")).unwrap();
    kernel.push(0);
    std::fs::write(guest.join("vmlinuz"), kernel).unwrap();
    let listed = template(&cfg, &["list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&digest) && l.contains("stale")),
        "{listed}"
    );
    let run_root = dir.path().join("run");
    let id = format!("tplk{}", std::process::id());
    let r = start(&cfg, &id, &run_root, &[]);
    assert!(ping(&netns(&r), &guest_ip(&r)));
    stop(r);
    let listed = template(&cfg, &["list"]);
    let current: Vec<&str> = listed.lines().filter(|l| l.contains("current")).collect();
    assert_eq!(current.len(), 1, "{listed}");
    assert!(
        !current[0].starts_with(&digest),
        "the stale template was reused: {listed}"
    );
    template(&cfg, &["delete", "--all"]);
}

#[test]
fn templates_refuse_a_shared_directory_naming_the_keys() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = template_config(dir.path(), &guest_dir());
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("shared_fs = \"none\"", "shared_fs = \"virtio-fs\"");
    std::fs::write(&cfg, text).unwrap();
    let run_root = dir.path().join("run");
    let out = shim()
        .args(["sandbox", "run", "--config"])
        .arg(&cfg)
        .args(["--id", &format!("tplr{}", std::process::id()), "--run-root"])
        .arg(&run_root)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("enable_template") && stderr.contains("shared_fs"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("templates").exists(),
        "a template was made"
    );
    let left = std::fs::read_dir(run_root.join("sandboxes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0);
}
