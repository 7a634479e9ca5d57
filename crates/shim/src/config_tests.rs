//! Hermetic tests of the configuration reader: no files outside a temp dir, no environment.

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "GUEST_DIR" => Some("/var/lib/guest".into()),
        _ => None,
    }
}

fn parse_str(text: &str) -> Result<ShimConfig, ConfigFileError> {
    parse(Path::new("/etc/kata/configuration.toml"), text, &env)
}

const QEMU: &str = r#"
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "${GUEST_DIR}/vmlinuz"
initrd = "${GUEST_DIR}/initramfs.img"
kernel_params = "  quiet   agent.port=1024 "
machine_type = "microvm"
default_vcpus = 2
default_memory = 512
disable_vhost_net = true
network_queues = 2
accelerator = "tcg"
agent_channel = "virtio_serial"
reclaim_guest_freed_memory = true
"#;

#[test]
fn a_full_qemu_table_maps_onto_the_hypervisor_config() {
    let c = parse_str(QEMU).unwrap();
    assert_eq!(c.backend, BackendKind::Qemu);
    let h = &c.hypervisor;
    assert_eq!(
        h.path.as_deref(),
        Some(Path::new("/usr/bin/qemu-system-x86_64"))
    );
    assert_eq!(h.kernel, Path::new("/var/lib/guest/vmlinuz"));
    assert_eq!(
        h.initrd.as_deref(),
        Some(Path::new("/var/lib/guest/initramfs.img"))
    );
    assert_eq!(h.kernel_params, ["quiet", "agent.port=1024"]);
    assert_eq!(h.machine_type.as_deref(), Some("microvm"));
    assert_eq!((h.vcpus, h.memory_mib, h.network_queues), (2, 512, 2));
    assert!(h.disable_vhost_net);
    assert!(h.reclaim_guest_freed_memory);
    assert_eq!(h.accelerator, Accelerator::Tcg);
    assert_eq!(h.agent_channel, AgentChannelKind::VirtioSerial);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn defaults_fill_what_the_file_leaves_out() {
    let c = parse_str("[hypervisor.qemu]\nkernel = \"/k\"\n").unwrap();
    let d = HypervisorConfig::default();
    assert_eq!(c.hypervisor.vcpus, d.vcpus);
    assert_eq!(c.hypervisor.memory_mib, d.memory_mib);
    assert_eq!(c.hypervisor.accelerator, Accelerator::Auto);
}

#[test]
fn unknown_keys_are_warned_with_file_and_line() {
    let text = "[hypervisor.qemu]\nkernel = \"/k\"\nenable_iommu = true\n\n[agent.kata]\ndial_timeout = 30\n[runtime]\nenable_debug = true\n";
    let c = parse_str(text).unwrap();
    let got: Vec<(String, usize)> = c.warnings.iter().map(|w| (w.key.clone(), w.line)).collect();
    assert_eq!(
        got,
        [
            ("agent".to_string(), 5),
            ("runtime.enable_debug".to_string(), 8),
            ("hypervisor.qemu.enable_iommu".to_string(), 3),
        ]
    );
    let shown = c.warnings[2].to_string();
    assert!(
        shown.starts_with("/etc/kata/configuration.toml:3: hypervisor.qemu.enable_iommu"),
        "{shown}"
    );
}

#[test]
fn a_bad_value_names_the_key_the_file_and_the_line() {
    let text = "[hypervisor.qemu]\nkernel = \"/k\"\n\ndefault_memory = \"lots\"\n";
    let err = parse_str(text).unwrap_err();
    match &err {
        ConfigFileError::Invalid {
            line, key, file, ..
        } => {
            assert_eq!((*line, key.as_str()), (4, "hypervisor.qemu.default_memory"));
            assert_eq!(file, Path::new("/etc/kata/configuration.toml"));
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "/etc/kata/configuration.toml:4: hypervisor.qemu.default_memory: must be an integer"
        ),
        "{msg}"
    );
}

#[test]
fn out_of_range_and_wrong_words_are_errors_on_their_line() {
    let cases = [
        (
            "default_vcpus = 0",
            "hypervisor.qemu.default_vcpus",
            "out of range",
        ),
        (
            "default_memory = 16",
            "hypervisor.qemu.default_memory",
            "out of range",
        ),
        (
            "network_queues = 300",
            "hypervisor.qemu.network_queues",
            "out of range",
        ),
        (
            "accelerator = \"hvf\"",
            "hypervisor.qemu.accelerator",
            "not an accelerator",
        ),
        (
            "agent_channel = \"tcp\"",
            "hypervisor.qemu.agent_channel",
            "not an agent channel",
        ),
        (
            "disable_vhost_net = 1",
            "hypervisor.qemu.disable_vhost_net",
            "true or false",
        ),
        (
            "kernel_params = [\"a\"]",
            "hypervisor.qemu.kernel_params",
            "must be a string",
        ),
        (
            "seccompsandbox = \"on,networking=deny\"",
            "hypervisor.qemu.seccompsandbox",
            "\"networking\" is not a sub-option of QEMU's -sandbox",
        ),
        (
            "seccompsandbox = \"on,spawn=never\"",
            "hypervisor.qemu.seccompsandbox",
            "spawn takes allow or deny",
        ),
        (
            "rootless = \"yes\"",
            "hypervisor.qemu.rootless",
            "true or false",
        ),
        (
            "rootless_user = \"0:0\"",
            "hypervisor.qemu.rootless_user",
            "is root",
        ),
        ("chroot = 1", "hypervisor.qemu.chroot", "true or false"),
    ];
    for (entry, key, problem) in cases {
        let text = format!("[hypervisor.qemu]\nkernel = \"/k\"\n{entry}\n");
        let msg = parse_str(&text).unwrap_err().to_string();
        let want = format!("/etc/kata/configuration.toml:3: {key}: ");
        assert!(
            msg.starts_with(&want) && msg.contains(problem),
            "{entry}: {msg}"
        );
    }
}

#[test]
fn syntax_errors_carry_the_line() {
    let err = parse_str("[hypervisor.qemu]\nkernel = \"/k\"\ndefault_vcpus = = 2\n").unwrap_err();
    assert!(
        matches!(err, ConfigFileError::Syntax { line: 3, .. }),
        "{err:?}"
    );
}

#[test]
fn a_missing_kernel_is_an_error_at_the_table() {
    let msg = parse_str("\n[hypervisor.qemu]\npath = \"/q\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("/etc/kata/configuration.toml:2: hypervisor.qemu.kernel: is missing"),
        "{msg}"
    );
}

#[test]
fn the_runtime_chooses_among_several_hypervisors() {
    let both = "[runtime]\nhypervisor_name = \"dragonball\"\n[hypervisor.qemu]\nkernel = \"/k\"\n[hypervisor.dragonball]\nkernel = \"/k2\"\n";
    let c = parse_str(both).unwrap();
    assert_eq!(c.backend, BackendKind::Dragonball);
    assert_eq!(c.hypervisor.kernel, Path::new("/k2"));
    assert_eq!(c.warnings.len(), 1, "the other table is listed as ignored");
    assert_eq!(c.warnings[0].key, "hypervisor.qemu");
}

#[test]
fn a_single_hypervisor_table_is_chosen_without_runtime() {
    let c = parse_str("[hypervisor.dragonball]\nkernel = \"/k\"\n").unwrap();
    assert_eq!(c.backend, BackendKind::Dragonball);
}

#[test]
fn hypervisor_choice_errors_are_clear() {
    let none = parse_str("[runtime]\n").unwrap_err().to_string();
    assert!(none.contains("no [hypervisor.NAME] table"), "{none}");
    let two =
        parse_str("[hypervisor.qemu]\nkernel = \"/k\"\n[hypervisor.dragonball]\nkernel = \"/k\"\n")
            .unwrap_err()
            .to_string();
    assert!(two.contains("hypervisor_name"), "{two}");
    let missing = parse_str(
        "[runtime]\nhypervisor_name = \"qemu\"\n[hypervisor.dragonball]\nkernel = \"/k\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        missing.starts_with("/etc/kata/configuration.toml:2: runtime.hypervisor_name"),
        "{missing}"
    );
    let unknown = parse_str("[hypervisor.firecracker]\nkernel = \"/k\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        unknown.contains("\"firecracker\" is not a hypervisor this shim knows"),
        "{unknown}"
    );
}

#[test]
fn paths_expand_environment_and_config_dir() {
    let dir = Path::new("/etc/kata");
    assert_eq!(
        expand("${GUEST_DIR}/vmlinuz", dir, &env).unwrap(),
        "/var/lib/guest/vmlinuz"
    );
    assert_eq!(
        expand("${CONFIG_DIR}/../guest/k", dir, &env).unwrap(),
        "/etc/kata/../guest/k"
    );
    assert_eq!(expand("/plain/$HOME", dir, &env).unwrap(), "/plain/$HOME");
    assert!(expand("${NOPE}/k", dir, &env)
        .unwrap_err()
        .contains("not set"));
    assert!(expand("${GUEST_DIR/k", dir, &env)
        .unwrap_err()
        .contains("unclosed"));
    assert!(expand("${A-B}/k", dir, &env)
        .unwrap_err()
        .contains("not a variable name"));
}

#[test]
fn config_dir_is_the_files_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("configuration.toml");
    std::fs::write(
        &file,
        "[hypervisor.qemu]\nkernel = \"${CONFIG_DIR}/vmlinuz\"\n",
    )
    .unwrap();
    let c = load(&file).unwrap();
    assert_eq!(
        c.hypervisor.kernel,
        dir.path().canonicalize().unwrap().join("vmlinuz")
    );
}

#[test]
fn relative_or_unset_paths_are_errors_on_their_line() {
    let rel = parse_str("[hypervisor.qemu]\nkernel = \"vmlinuz\"\n")
        .unwrap_err()
        .to_string();
    assert!(rel.starts_with("/etc/kata/configuration.toml:2: hypervisor.qemu.kernel: \"vmlinuz\" is not an absolute path"), "{rel}");
    let unset = parse_str("[hypervisor.qemu]\nkernel = \"/k\"\ninitrd = \"${ASSETS}/i\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        unset.starts_with("/etc/kata/configuration.toml:3: hypervisor.qemu.initrd:")
            && unset.contains("${ASSETS}"),
        "{unset}"
    );
}

#[test]
fn line_numbers_count_from_one() {
    assert_eq!(line_of("a\nb\nc", 0), 1);
    assert_eq!(line_of("a\nb\nc", 2), 2);
    assert_eq!(line_of("a\nb\nc", 99), 3);
}

#[test]
fn confinement_keys_map_and_default_to_a_seccomp_filter_only() {
    let d = parse_str("[hypervisor.qemu]\nkernel = \"/k\"\n").unwrap();
    assert_eq!(
        d.hypervisor.seccomp_sandbox.as_deref(),
        Some(hypervisor::config::DEFAULT_SECCOMP_SANDBOX)
    );
    assert!(!d.hypervisor.rootless && !d.hypervisor.chroot);

    let text = "[hypervisor.qemu]\nkernel = \"/k\"\nseccompsandbox = \"on,spawn=deny\"\nrootless = true\nrootless_user = \"qemu-vm\"\nchroot = true\n";
    let h = parse_str(text).unwrap().hypervisor;
    assert_eq!(h.seccomp_sandbox.as_deref(), Some("on,spawn=deny"));
    assert!(h.rootless && h.chroot);
    assert_eq!(h.rootless_user, "qemu-vm");

    // Kata: an empty value turns the filter off.
    let off = parse_str("[hypervisor.qemu]\nkernel = \"/k\"\nseccompsandbox = \"\"\n").unwrap();
    assert_eq!(off.hypervisor.seccomp_sandbox, None);
}

#[test]
fn shipped_example_configs_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let c = parse(&path, &text, &env).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            c.warnings.is_empty(),
            "{}: {:?}",
            path.display(),
            c.warnings
        );
        assert_eq!(c.hypervisor.kernel, Path::new("/var/lib/guest/vmlinuz"));
        seen += 1;
    }
    assert!(
        seen >= 3,
        "expected the qemu, qemu-microvm and dragonball examples in {}",
        dir.display()
    );
}

#[test]
fn shared_fs_keys_map_as_kata_names_them_and_default_to_none() {
    let d = parse_str("[hypervisor.qemu]\nkernel = \"/k\"\n").unwrap();
    assert_eq!(d.hypervisor.shared_fs, SharedFsKind::None);
    assert_eq!(d.hypervisor.virtio_fs_daemon, None);
    let text = "[hypervisor.qemu]\nkernel = \"/k\"\nshared_fs = \"virtio-fs\"\nvirtio_fs_daemon = \"/usr/local/bin/virtiofsd\"\nvirtio_fs_extra_args = [\"--thread-pool-size=1\"]\nvirtio_fs_cache = \"never\"\n";
    let h = parse_str(text).unwrap().hypervisor;
    assert_eq!(h.shared_fs, SharedFsKind::VirtioFs);
    assert_eq!(
        h.virtio_fs_daemon.as_deref(),
        Some(Path::new("/usr/local/bin/virtiofsd"))
    );
    assert_eq!(h.virtio_fs_extra_args, ["--thread-pool-size=1"]);
    assert_eq!(h.virtio_fs_cache, SharedFsCache::Never);
    for (line, key) in [
        ("shared_fs = \"virtio-9p\"", "hypervisor.qemu.shared_fs"),
        (
            "virtio_fs_cache = \"sometimes\"",
            "hypervisor.qemu.virtio_fs_cache",
        ),
        (
            "virtio_fs_extra_args = \"-x\"",
            "hypervisor.qemu.virtio_fs_extra_args",
        ),
        (
            "virtio_fs_daemon = \"virtiofsd\"",
            "hypervisor.qemu.virtio_fs_daemon",
        ),
    ] {
        let err = parse_str(&format!("[hypervisor.qemu]\nkernel = \"/k\"\n{line}\n")).unwrap_err();
        assert!(err.to_string().contains(key), "{line}: {err}");
    }
}

#[test]
fn the_factory_table_sets_templates() {
    let c = parse_str("[hypervisor.qemu]\nkernel = \"/k\"\n").unwrap();
    assert_eq!(c.factory, Factory::default());
    assert_eq!(c.factory.template_path, Path::new("/run/vc/vm/template"));
    let c = parse_str(
        "[hypervisor.qemu]\nkernel = \"/k\"\n[factory]\nenable_template = true\ntemplate_path = \"/run/t\"\nvm_cache_number = 3\n",
    )
    .unwrap();
    assert!(c.factory.enable_template);
    assert_eq!(c.factory.template_path, Path::new("/run/t"));
    let w: Vec<_> = c
        .warnings
        .iter()
        .map(|w| (w.key.as_str(), w.line))
        .collect();
    assert_eq!(w, [("factory.vm_cache_number", 6)]);
    let err =
        parse_str("[hypervisor.qemu]\nkernel = \"/k\"\n[factory]\nenable_template = \"yes\"\n")
            .unwrap_err()
            .to_string();
    assert!(err.contains(":4: factory.enable_template"), "{err}");
    let err = parse_str("[hypervisor.qemu]\nkernel = \"/k\"\n[factory]\ntemplate_path = \"t\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("factory.template_path"), "{err}");
}
