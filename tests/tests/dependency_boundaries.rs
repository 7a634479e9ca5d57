//! The dependency rules of ARCHITECTURE.md, checked on the resolved graph and the source tree.
//!
//! Nothing of Dragonball (`dbs-*`, `dragonball*`) may be reachable from the contract crate,
//! from `netdev`, from the QEMU backend, or from a qemu-only shim, counting normal, build and
//! dev dependencies on every target. The Dragonball backend, and only it, brings `dbs-utils`
//! (rules 1 and 2). No source file outside `netdev/` names a TUN ioctl (rule 3). Library crates
//! have `default = []` (rule 4) and no normal or build dependency on `anyhow` (rule 5).
//!
//! Each check is a function over data (metadata JSON, source text) with a positive control
//! that feeds it a violation, and each also finds on the real tree what it must find there
//! (the shim's default feature and its `anyhow`, `netdev`'s ioctls), so none passes vacuously.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
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

/// The workspace members ARCHITECTURE.md's library rules (4 and 5) do not bind: the binary,
/// whose features choose the backends, and the test crate.
const NOT_LIBRARIES: [&str; 2] = ["containerd-shim-kata-v2", "workspace-tests"];

/// The library crates of the workspace: every member but [`NOT_LIBRARIES`].
const LIBRARIES: [&str; 6] = [
    "hypervisor",
    "netdev",
    "endpoint",
    "hypervisor-qemu",
    "hypervisor-dragonball",
    "guest-agent",
];

/// `cargo metadata` of the workspace, resolved with every feature of every member on, so an
/// optional dependency counts.
fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--all-features"])
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata --all-features failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// The workspace members' packages, by name.
fn members(meta: &serde_json::Value) -> BTreeMap<String, &serde_json::Value> {
    let ids: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .filter_map(|id| id.as_str())
        .collect();
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| ids.contains(id)))
        .map(|p| (p["name"].as_str().unwrap_or_default().to_string(), p))
        .collect()
}

/// Members whose manifest enables features by default, with those features.
fn members_with_default_features(meta: &serde_json::Value) -> BTreeMap<String, Vec<String>> {
    members(meta)
        .into_iter()
        .filter_map(|(name, pkg)| {
            let default: Vec<String> = pkg["features"]["default"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            (!default.is_empty()).then_some((name, default))
        })
        .collect()
}

/// Members whose resolved graph has `anyhow` as a direct normal or build dependency (any
/// target), under whatever name they import it.
fn members_depending_on_anyhow(meta: &serde_json::Value) -> BTreeSet<String> {
    let names_by_id: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let members: BTreeMap<&str, String> = members(meta)
        .into_iter()
        .filter_map(|(name, p)| Some((p["id"].as_str()?, name)))
        .collect();
    let mut found = BTreeSet::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve.nodes") {
        let Some(member) = node["id"].as_str().and_then(|id| members.get(id)) else {
            continue;
        };
        for dep in node["deps"].as_array().into_iter().flatten() {
            let is_anyhow = dep["pkg"]
                .as_str()
                .and_then(|id| names_by_id.get(id))
                .is_some_and(|n| *n == "anyhow");
            let not_dev_only = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].as_str() != Some("dev"));
            if is_anyhow && not_dev_only {
                found.insert(member.clone());
            }
        }
    }
    found
}

/// A violation of rule 4 or 5 for every library among `offenders`, naming crate and rule.
fn library_violations<'a>(
    offenders: impl IntoIterator<Item = (&'a String, String)>,
    rule: &str,
) -> Vec<String> {
    offenders
        .into_iter()
        .filter(|(name, _)| !NOT_LIBRARIES.contains(&name.as_str()))
        .map(|(name, what)| format!("{name}: {what}; {rule}"))
        .collect()
}

const RULE_4: &str = "library crates have `default = []`, features fan out from the binary only (ARCHITECTURE.md, dependency rule 4)";
const RULE_5: &str = "libraries return typed errors, anyhow lives in the binary and tests (ARCHITECTURE.md, dependency rule 5)";

fn default_feature_violations(meta: &serde_json::Value) -> Vec<String> {
    let found = members_with_default_features(meta);
    library_violations(
        found
            .iter()
            .map(|(name, f)| (name, format!("[features] default = {f:?}"))),
        RULE_4,
    )
}

fn anyhow_violations(meta: &serde_json::Value) -> Vec<String> {
    let found = members_depending_on_anyhow(meta);
    library_violations(
        found.iter().map(|name| {
            (
                name,
                "depends on anyhow (normal or build dependency)".into(),
            )
        }),
        RULE_5,
    )
}

/// A metadata document of three members: a library with a default feature and a normal
/// `anyhow` dependency, a library with `anyhow` only for its tests, and the binary with both.
fn fake_metadata() -> serde_json::Value {
    let anyhow = "registry+index#anyhow@1.0.0";
    let member = |name: &str, default: &[&str]| {
        serde_json::json!({
            "name": name,
            "id": format!("path+file:///ws/{name}#0.1.0"),
            "features": { "default": default },
        })
    };
    let node = |name: &str, kind: Option<&str>| {
        serde_json::json!({
            "id": format!("path+file:///ws/{name}#0.1.0"),
            // Imported under another name: the check goes by package, not by import name.
            "deps": [{ "name": "errs", "pkg": anyhow, "dep_kinds": [{ "kind": kind, "target": null }] }],
        })
    };
    serde_json::json!({
        "workspace_members": [
            "path+file:///ws/lib-bad#0.1.0",
            "path+file:///ws/lib-good#0.1.0",
            "path+file:///ws/containerd-shim-kata-v2#0.1.0",
        ],
        "packages": [
            member("lib-bad", &["extra"]),
            member("lib-good", &[]),
            member("containerd-shim-kata-v2", &["qemu"]),
            { "name": "anyhow", "id": anyhow, "features": {} },
        ],
        "resolve": { "nodes": [
            node("lib-bad", Some("build")),
            node("lib-good", Some("dev")),
            node("containerd-shim-kata-v2", None),
        ] },
    })
}

#[test]
fn library_rule_checks_catch_a_violation() {
    let meta = fake_metadata();
    let defaults = default_feature_violations(&meta);
    assert_eq!(defaults.len(), 1, "{defaults:?}");
    assert!(
        defaults[0].starts_with("lib-bad: [features] default = [\"extra\"]")
            && defaults[0].contains("rule 4"),
        "{defaults:?}"
    );
    let anyhow = anyhow_violations(&meta);
    assert_eq!(anyhow.len(), 1, "{anyhow:?}");
    assert!(
        anyhow[0].starts_with("lib-bad: depends on anyhow") && anyhow[0].contains("rule 5"),
        "{anyhow:?}"
    );
}

#[test]
fn library_crates_have_no_default_features() {
    let meta = metadata();
    let names: BTreeSet<String> = members(&meta).into_keys().collect();
    let expected: BTreeSet<String> = LIBRARIES
        .iter()
        .chain(NOT_LIBRARIES.iter())
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        names, expected,
        "the workspace members changed: sort each new one into LIBRARIES or NOT_LIBRARIES"
    );
    // On the real graph the check sees the binary's default (`qemu`), so it reads features.
    let found = members_with_default_features(&meta);
    assert!(
        found.contains_key("containerd-shim-kata-v2"),
        "the shim's default features are not seen: {found:?}"
    );
    let bad = default_feature_violations(&meta);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn library_crates_do_not_depend_on_anyhow() {
    let meta = metadata();
    // On the real graph the check sees the binary's and the test crate's anyhow.
    let found = members_depending_on_anyhow(&meta);
    for user in NOT_LIBRARIES {
        assert!(
            found.contains(user),
            "{user}'s anyhow is not seen: {found:?}"
        );
    }
    let bad = anyhow_violations(&meta);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The source text with its comments blanked out (newlines kept, so line numbers hold):
/// a comment may explain an ioctl, only code issues one. Knows `//`, nested `/* */`, string
/// literals (plain and raw) and char literals, enough for Rust and C.
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let next = b.get(i + 1).copied();
        match b[i] {
            '/' if next == Some('/') => {
                while i < b.len() && b[i] != '\n' {
                    out.push(' ');
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                        depth += 1;
                        out.push_str("  ");
                        i += 2;
                    } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        out.push_str("  ");
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        out.push(blank(b[i]));
                        i += 1;
                    }
                }
            }
            'r' if (next == Some('"') || next == Some('#'))
                && !b[..i]
                    .last()
                    .is_some_and(|c| c.is_alphanumeric() || *c == '_') =>
            {
                // Raw string r"..." or r#"..."#: copied through to its closing quote.
                let hashes = b[i + 1..].iter().take_while(|c| **c == '#').count();
                if b.get(i + 1 + hashes) != Some(&'"') {
                    out.push(b[i]);
                    i += 1;
                    continue;
                }
                let close: Vec<char> = std::iter::once('"')
                    .chain(std::iter::repeat('#').take(hashes))
                    .collect();
                let start = i;
                i += 2 + hashes;
                while i < b.len() && !b[i..].starts_with(&close) {
                    i += 1;
                }
                i = (i + close.len()).min(b.len());
                out.extend(&b[start..i]);
            }
            '"' => {
                out.push('"');
                i += 1;
                while i < b.len() && b[i] != '"' {
                    if b[i] == '\\' && i + 1 < b.len() {
                        out.push(b[i]);
                        i += 1;
                    }
                    out.push(b[i]);
                    i += 1;
                }
                if i < b.len() {
                    out.push('"');
                    i += 1;
                }
            }
            // A char literal ('"', '\'', 'x'); a lifetime ('a) is left as code.
            '\'' if next == Some('\\') || b.get(i + 2) == Some(&'\'') => {
                let end = if next == Some('\\') {
                    (i + 3..b.len())
                        .find(|&j| b[j] == '\'')
                        .unwrap_or(b.len() - 1)
                } else {
                    i + 2
                };
                out.extend(&b[i..=end]);
                i = end + 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// The TUN ioctls named or encoded in `src` outside comments, as (line, what): a request name
/// (`TUNSETIFF`, `TUNGETFEATURES`, `TUNATTACHFILTER`, also spelled `tun_set_iff` as ioctl
/// macros name their wrappers), an ioctl macro or request code on TUN's type `b'T'` with a
/// TUN number (200 and up), or a request number such as `0x400454ca` (`_IOW('T', 202, int)`).
fn tun_ioctls(src: &str) -> Vec<(usize, String)> {
    const PREFIXES: [&str; 4] = ["TUNSET", "TUNGET", "TUNATTACH", "TUNDETACH"];
    let code = code_only(src);
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        for token in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            let squashed = token.replace('_', "").to_ascii_uppercase();
            let is_name = PREFIXES
                .iter()
                .any(|p| squashed.starts_with(p) && squashed.len() > p.len());
            let is_number = squashed
                .strip_prefix("0X")
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .is_some_and(|v| v >> 30 != 0 && (v >> 8) & 0xff == 0x54 && v & 0xff >= 200);
            if is_name || is_number {
                found.push((n + 1, token.to_string()));
            }
        }
        let mut rest = line;
        while let Some(at) = rest.find("b'T'") {
            rest = &rest[at + 4..];
            let number: String = rest
                .trim_start()
                .strip_prefix(',')
                .unwrap_or("")
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if number.parse::<u32>().is_ok_and(|nr| nr >= 200) {
                found.push((n + 1, format!("b'T', {number}")));
            }
        }
    }
    found
}

/// Every Rust and C source file under `dir`, leaving out build outputs and hidden folders.
fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {dir:?}: {e}"));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                source_files(&path, out);
            }
        } else if [".rs", ".c", ".h"].iter().any(|e| name.ends_with(e)) {
            out.push(path);
        }
    }
}

#[test]
fn tun_ioctl_scan_catches_a_use() {
    let code = concat!(
        "fn f(fd: RawFd) {\n",
        "    unsafe { libc::ioctl(fd, libc::TUN",
        "SETIFF, &mut req) };\n",
        "}\n",
        "nix::ioctl_write_int!(tun_set_",
        "persist, b'T', 203);\n",
        "let q = 0x4004_54",
        "d9;\n",
    );
    let found = tun_ioctls(code);
    let lines: Vec<usize> = found.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, [2, 4, 4, 5], "{found:?}");
    // Words in comments, strings that only look alike, offload flags and other ioctl types
    // are not uses.
    let clean = concat!(
        "// A missing name would make TUN",
        "SETIFF create a TAP.\n",
        "/* TUN",
        "SETQUEUE /* nested */ TUN",
        "GETIFF */\n",
        "let flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4;\n",
        "let tty = 0x5401; let s = \"http://x\"; // TUN",
        "SETOFFLOAD\n",
        "let c = '\"'; let q = r#\"a \" b\"#; // TUN",
        "SETPERSIST\n",
        "nix::ioctl_read!(tcgets, b'T', 1, u8);\n",
    );
    assert_eq!(tun_ioctls(clean), [], "{clean}");
}

#[test]
fn no_tun_ioctls_outside_netdev() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the workspace root");
    let netdev = root.join("netdev");
    // This file names the requests to look for them.
    let this_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dependency_boundaries.rs");
    let mut files = Vec::new();
    source_files(&root, &mut files);
    let (mut in_netdev, mut outside) = (0, Vec::new());
    for file in files {
        if file.canonicalize().ok() == this_file.canonicalize().ok() {
            continue;
        }
        let src =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {file:?}: {e}"));
        let found = tun_ioctls(&src);
        if file.starts_with(&netdev) {
            in_netdev += found.len();
        } else {
            let shown = file
                .strip_prefix(&root)
                .unwrap_or(&file)
                .display()
                .to_string();
            outside.extend(
                found
                    .into_iter()
                    .map(|(l, what)| format!("{shown}:{l}: {what}")),
            );
        }
    }
    // The scanner finds the ioctls netdev does issue, so it reads the tree it is given.
    assert!(
        in_netdev > 0,
        "no TUN ioctl found in netdev/, which issues them"
    );
    assert!(
        outside.is_empty(),
        "TUN ioctls outside netdev/:\n{}\nnetdev is the only owner of TAP code; hypervisor-dragonball opens its TAPs through dbs-utils (ARCHITECTURE.md, dependency rule 3)",
        outside.join("\n")
    );
}
