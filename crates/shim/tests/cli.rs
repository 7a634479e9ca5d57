//! The built binary's command line: version, backend selection, configuration errors,
//! containerd's entry points with bad input. Hermetic: no root, no VM.

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

/// containerd's command line, run in `bundle`.
fn containerd_shim(bundle: &Path, args: &[&str]) -> Output {
    Command::new(SHIM)
        .args(args)
        .current_dir(bundle)
        .env_remove("GUEST_DIR")
        .output()
        .expect("running the shim")
}

#[test]
fn start_without_a_bundle_spec_names_it_and_starts_nothing() {
    let bundle = tempfile::tempdir().unwrap();
    let id = format!("nospec{}", std::process::id());
    let out = containerd_shim(
        bundle.path(),
        &[
            "-namespace",
            "t",
            "-address",
            "/nonexistent/c.sock",
            "-id",
            &id,
            "start",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("Reading the OCI spec") && stderr.contains("config.json"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "an address was printed: {stdout}");
    let left: Vec<_> = std::fs::read_dir(bundle.path()).unwrap().collect();
    assert!(left.is_empty(), "start left {left:?} in the bundle");
}

#[test]
fn delete_of_a_task_with_nothing_left_answers_and_can_repeat() {
    let bundle = tempfile::tempdir().unwrap();
    let id = format!("gone{}", std::process::id());
    for _ in 0..2 {
        let out = containerd_shim(
            bundle.path(),
            &[
                "-namespace",
                "t",
                "-address",
                "/nonexistent/c.sock",
                "-id",
                &id,
                "delete",
            ],
        );
        let (_, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        // DeleteResponse { exit_status: 137, exited_at: now }: field 2 = varint 137.
        assert!(
            out.stdout.windows(3).any(|w| w == [0x10, 0x89, 0x01]),
            "no exit status 137 in {:?}",
            out.stdout
        );
    }
}

#[test]
fn containerd_flags_with_mistakes_are_refused() {
    let bundle = tempfile::tempdir().unwrap();
    let out = containerd_shim(bundle.path(), &["-namespace", "t", "-frobnicate", "start"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("frobnicate"), "{stderr}");
    let out = containerd_shim(bundle.path(), &["-namespace", "t", "-id", "x", "restart"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("unknown action \"restart\""), "{stderr}");
}

#[test]
fn a_run_root_too_long_for_socket_paths_is_refused_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    // A backend this shim has: the check comes after the configuration is taken.
    let backend = if cfg!(feature = "qemu") {
        "qemu"
    } else {
        "dragonball"
    };
    let config = write_config(
        dir.path(),
        "c.toml",
        &format!(
            "[hypervisor.{backend}]\nkernel = \"${{CONFIG_DIR}}/vmlinuz\"\ninitrd = \"${{CONFIG_DIR}}/initrd\"\n"
        ),
    );
    let run_root = dir.path().join("r".repeat(60));
    let id = "a".repeat(64);
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
    assert!(!out.status.success());
    assert!(
        stderr.contains("longer than a Unix socket path may be") && stderr.contains("--run-root"),
        "{stderr}"
    );
    assert!(!run_root.exists(), "{} was created", run_root.display());
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
