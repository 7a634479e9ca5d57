//! The built binary's command line: version, backend selection, configuration errors,
//! containerd entry points. Hermetic: no root, no VM.

use std::path::Path;
use std::process::{Command, Output};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-kata-v2");

fn shim(args: &[&str]) -> Output {
    Command::new(SHIM)
        .args(args)
        .env_remove("GUEST_DIR")
        .output()
        .expect("running the shim")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn write_config(dir: &Path, name: &str, body: &str) -> String {
    let file = dir.join(name);
    std::fs::write(&file, body).unwrap();
    file.to_string_lossy().into_owned()
}

/// The backends of the feature set cargo built this test, and so the shim beside it, with:
/// (name, compiled in), in the order the shim lists them.
fn feature_set() -> [(&'static str, bool); 2] {
    [
        ("qemu", cfg!(feature = "qemu")),
        ("dragonball", cfg!(feature = "dragonball")),
    ]
}

#[test]
fn version_lists_exactly_the_backends_of_the_feature_set() {
    let out = shim(&["--version"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("backends: "))
        .unwrap_or_else(|| panic!("no backends line in {stdout:?}"));
    let built: Vec<&str> = feature_set()
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
    let want = if built.is_empty() {
        "backends: none (built with --no-default-features)".to_string()
    } else {
        format!("backends: {}", built.join(", "))
    };
    assert_eq!(line, want, "--version printed:\n{stdout}");
}

#[test]
fn sandbox_check_accepts_exactly_the_backends_of_the_feature_set() {
    // Without a configuration, one backend line per compiled-in backend.
    let out = shim(&["sandbox", "check"]);
    let (stdout, stderr) = text(&out);
    let listed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("backend"))
        .map(|l| {
            l.split_whitespace()
                .nth(2)
                .unwrap_or("")
                .trim_end_matches(':')
        })
        .collect();
    let built: Vec<&str> = feature_set()
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
    assert_eq!(listed, built, "sandbox check printed:\n{stdout}\n{stderr}");

    // With a configuration for each backend: compiled in, or refused naming the feature.
    let dir = tempfile::tempdir().unwrap();
    for (name, on) in feature_set() {
        let config = write_config(
            dir.path(),
            &format!("{name}.toml"),
            &format!("[hypervisor.{name}]\nkernel = \"/k\"\n"),
        );
        let out = shim(&["sandbox", "check", "--config", &config]);
        let (stdout, stderr) = text(&out);
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("backend"))
            .unwrap_or_else(|| panic!("no backend line for {name} in:\n{stdout}\n{stderr}"));
        if on {
            assert!(
                line.starts_with("PASS") && line.contains(&format!("{name}: compiled in")),
                "{line}"
            );
        } else {
            let refusal = format!(
                "the \"{name}\" hypervisor is not compiled into this shim; rebuild with --features {name}"
            );
            assert!(
                line.starts_with("FAIL") && line.contains(&refusal),
                "{line}"
            );
            assert!(!out.status.success(), "{stdout}");
        }
    }
}

#[cfg(not(feature = "dragonball"))]
#[test]
fn a_shim_without_dragonball_refuses_it_naming_the_feature_and_make_knob() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "configuration-dragonball.toml",
        "[hypervisor.dragonball]\nkernel = \"${CONFIG_DIR}/vmlinuz\"\nenable_iommu = true\n",
    );
    let run_root = dir.path().join("run");
    let id = format!("nodb{}", std::process::id());
    let out = shim(&[
        "sandbox",
        "run",
        "--config",
        &config,
        "--id",
        &id,
        "--run-root",
        run_root.to_str().unwrap(),
    ]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "the \"dragonball\" hypervisor is not compiled into this shim; rebuild with --features dragonball (make build HYPERVISOR=dragonball or all)"
        ),
        "{stderr}"
    );
    // Unknown keys are warned about with the file and line, before the refusal.
    assert!(
        stderr.contains("configuration key ignored")
            && stderr.contains("hypervisor.dragonball.enable_iommu")
            && stderr.contains("line: 3"),
        "{stderr}"
    );
    // Refused before creating anything.
    assert!(!run_root.exists(), "{} was created", run_root.display());
    assert!(!Path::new(&format!("/run/netns/kata-{id}")).exists());
}

#[cfg(feature = "dragonball")]
#[test]
fn a_shim_with_dragonball_checks_the_host_for_it_and_refuses_tcg() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "c.toml",
        "[hypervisor.dragonball]\nkernel = \"${CONFIG_DIR}/vmlinuz\"\naccelerator = \"tcg\"\n",
    );
    let out = shim(&["sandbox", "check", "--config", &config]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{stdout}\n{stderr}"))
            .to_string()
    };
    assert!(
        line("backend").starts_with("PASS")
            && line("backend").contains("dragonball: compiled in (in-process VMM)"),
        "{}",
        line("backend")
    );
    let kvm = line("kvm");
    assert!(
        kvm.starts_with("FAIL") && kvm.contains("runs only on KVM"),
        "{kvm}"
    );
    // In-process: no VMM binary to run.
    assert!(!stdout.contains("vmm binary"), "{stdout}");
}

#[cfg(not(feature = "qemu"))]
#[test]
fn a_shim_without_qemu_refuses_it_naming_the_feature_and_make_knob() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "c.toml", "[hypervisor.qemu]\nkernel = \"/k\"\n");
    let out = shim(&["sandbox", "run", "--config", &config]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("rebuild with --features qemu (make build HYPERVISOR=qemu or all)"),
        "{stderr}"
    );
}

#[test]
fn a_bad_value_is_reported_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "bad.toml",
        "[hypervisor.qemu]\nkernel = \"/k\"\ndefault_vcpus = \"two\"\n",
    );
    let out = shim(&["sandbox", "run", "--config", &config]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    let want = format!("{config}:3: hypervisor.qemu.default_vcpus: must be an integer");
    assert!(stderr.contains(&want), "{stderr}");
}

#[test]
fn an_unset_guest_dir_is_named_with_its_line() {
    let config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/configuration-qemu.toml");
    let out = shim(&["sandbox", "run", "--config", config.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("hypervisor.qemu.kernel")
            && stderr.contains("${GUEST_DIR}")
            && stderr.contains("not set"),
        "{stderr}"
    );
}

#[test]
fn containerd_entry_points_say_they_are_not_implemented() {
    for args in [
        &[
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd.sock",
            "-id",
            "x",
            "start",
        ][..],
        &["delete"][..],
    ] {
        let out = shim(args);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.contains("not implemented in this build") && stderr.contains("sandbox run"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "warn.toml",
        "[hypervisor.qemu]\nkernel = \"/k\"\nenable_iommu = true\ndefault_vcpus = 0\n",
    );
    let out = shim(&[
        "--log-format",
        "json",
        "sandbox",
        "run",
        "--config",
        &config,
    ]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    let records: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let last = records.last().expect("an error record");
    assert_eq!(last["level"], "ERRO");
    assert!(last["error"]
        .as_str()
        .unwrap()
        .contains(":4: hypervisor.qemu.default_vcpus"));
}
