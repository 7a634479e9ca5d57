//! The dependency rules of ARCHITECTURE.md, checked on the resolved graph.
//!
//! Nothing of Dragonball (`dbs-*`, `dragonball*`) may be reachable from the contract crate,
//! from `netdev`, from the QEMU backend, or from a qemu-only shim, counting normal, build and
//! dev dependencies on every target. The Dragonball backend, and only it, brings `dbs-utils`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// Packages (`name vX.Y.Z`) reachable from one `cargo tree` root.
fn graph(args: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["tree", "--target", "all", "-e", "normal,build,dev"])
        .args(["--prefix", "none", "--format", "{p}"])
        .args(args)
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        // "name v1.2.3 (/path)" or "name v1.2.3 (*)": keep "name v1.2.3".
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

fn dragonball_crates(g: &BTreeSet<String>) -> Vec<&String> {
    g.iter()
        .filter(|p| p.starts_with("dbs-") || p.starts_with("dragonball"))
        .collect()
}

fn assert_free_of_dragonball(what: &str, args: &[&str]) {
    let g = graph(args);
    println!("{what}: {} crates", g.len());
    let root = what.split(' ').next().unwrap_or(what);
    assert!(
        g.iter().any(|p| p.split(' ').next() == Some(root)),
        "the graph of {what} does not contain {root} itself: cargo tree printed {g:?}"
    );
    let bad = dragonball_crates(&g);
    assert!(
        bad.is_empty(),
        "{what} reaches Dragonball crates {bad:?}; only hypervisor-dragonball may depend on them (see ARCHITECTURE.md)"
    );
}

#[test]
fn contract_crate_reaches_no_dragonball_crate() {
    assert_free_of_dragonball("hypervisor", &["-p", "hypervisor", "--all-features"]);
}

#[test]
fn netdev_reaches_no_dragonball_crate() {
    assert_free_of_dragonball("netdev", &["-p", "netdev", "--all-features"]);
}

#[test]
fn endpoint_crate_reaches_no_dragonball_crate() {
    assert_free_of_dragonball("endpoint", &["-p", "endpoint", "--all-features"]);
}

#[test]
fn qemu_backend_reaches_no_dragonball_crate() {
    assert_free_of_dragonball(
        "hypervisor-qemu",
        &["-p", "hypervisor-qemu", "--all-features"],
    );
}

#[test]
fn qemu_only_shim_reaches_no_dragonball_crate() {
    assert_free_of_dragonball(
        "containerd-shim-kata-v2 (qemu)",
        &[
            "-p",
            "containerd-shim-kata-v2",
            "--no-default-features",
            "--features",
            "qemu",
        ],
    );
}

#[test]
fn dragonball_shim_brings_dbs_utils() {
    let g = graph(&[
        "-p",
        "containerd-shim-kata-v2",
        "--no-default-features",
        "--features",
        "dragonball",
    ]);
    println!("containerd-shim-kata-v2 (dragonball): {} crates", g.len());
    assert!(
        g.iter().any(|p| p.starts_with("dbs-utils ")),
        "the dragonball shim build should contain dbs-utils; got {:?}",
        dragonball_crates(&g)
    );
}

#[test]
fn dragonball_backend_has_one_version_of_each_rust_vmm_crate() {
    let g = graph(&["-p", "hypervisor-dragonball", "--all-features"]);
    println!("hypervisor-dragonball: {} crates", g.len());
    for krate in [
        "kvm-bindings",
        "kvm-ioctls",
        "vm-memory",
        "vmm-sys-util",
        "linux-loader",
        "vm-fdt",
        "vm-superio",
        "event-manager",
        "virtio-bindings",
        "virtio-queue",
    ] {
        let versions: Vec<&String> = g
            .iter()
            .filter(|p| p.split(' ').next() == Some(krate))
            .collect();
        assert!(
            versions.len() <= 1,
            "hypervisor-dragonball's graph holds {krate} more than once: {versions:?}; pin one version in [workspace.dependencies]"
        );
    }
    assert!(
        g.iter().any(|p| p.starts_with("kvm-ioctls ")),
        "hypervisor-dragonball should be built on kvm-ioctls"
    );
}

#[test]
fn only_the_dragonball_backend_depends_on_dragonball_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .expect("running cargo metadata");
    assert!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let members = meta["packages"].as_array().expect("packages");
    let names: Vec<&str> = members.iter().filter_map(|p| p["name"].as_str()).collect();
    for expected in [
        "hypervisor",
        "netdev",
        "hypervisor-qemu",
        "hypervisor-dragonball",
        "containerd-shim-kata-v2",
        "endpoint",
        "guest-agent",
        "workspace-tests",
    ] {
        assert!(
            names.contains(&expected),
            "workspace member {expected} is missing"
        );
    }
    for pkg in members {
        let name = pkg["name"].as_str().unwrap_or_default();
        for dep in pkg["dependencies"].as_array().into_iter().flatten() {
            let dep_name = dep["name"].as_str().unwrap_or_default();
            let is_dragonball = dep_name.starts_with("dbs-") || dep_name.starts_with("dragonball");
            assert!(
                !is_dragonball || name == "hypervisor-dragonball",
                "{name} depends on {dep_name}; only hypervisor-dragonball may"
            );
        }
    }
}
