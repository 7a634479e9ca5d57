//! Backend-neutral VM configuration.
//!
//! Every field has a default that works for a small sandbox VM; [`HypervisorConfig::validate`]
//! checks the values once so backends can trust them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Largest vCPU count accepted.
pub const MAX_VCPUS: u32 = 288;
/// Smallest guest memory, in MiB, that a Linux guest boots in.
pub const MIN_MEMORY_MIB: u32 = 64;

/// The seccomp filter a VMM runs under unless configured otherwise: QEMU's `-sandbox` value
/// that Kata ships (`seccompsandbox`), denying obsolete system calls, privilege changes,
/// process creation and scheduler/affinity changes.
pub const DEFAULT_SECCOMP_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The user an unprivileged VMM runs as unless configured otherwise; `make deps` creates it.
pub const DEFAULT_ROOTLESS_USER: &str = "kata-qemu";

/// The sub-options of QEMU 7.2's `-sandbox` and the values each takes.
const SECCOMP_OPTIONS: &[(&str, &[&str])] = &[
    ("enable", &["on", "off"]),
    ("obsolete", &["allow", "deny"]),
    ("elevateprivileges", &["allow", "deny", "children"]),
    ("spawn", &["allow", "deny"]),
    ("resourcecontrol", &["allow", "deny"]),
];

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Accelerator {
    /// KVM when hardware virtualization is really there, otherwise software emulation.
    #[default]
    Auto,
    /// Hardware virtualization through /dev/kvm; an error if it is not usable.
    Kvm,
    /// Software emulation (QEMU's TCG).
    Tcg,
}

/// Which channel the guest agent is reached on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AgentChannelKind {
    /// vsock when the host has it (`/dev/vhost-vsock` or a hybrid vsock), else virtio-serial.
    #[default]
    Auto,
    /// virtio-vsock (vhost-vsock on QEMU, hybrid vsock on Dragonball).
    Vsock,
    /// A virtio-serial port backed by a Unix socket on the host.
    VirtioSerial,
}

/// Whether and how host directories are shared with the guest (Kata's `shared_fs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum SharedFsKind {
    /// No shared filesystem: shared-filesystem devices are refused.
    #[default]
    #[serde(rename = "none")]
    None,
    /// virtio-fs, served by a `virtiofsd` per shared directory. Guest memory is shareable
    /// (QEMU: `memory-backend-memfd,share=on`), as vhost-user needs.
    #[serde(rename = "virtio-fs")]
    VirtioFs,
}

impl SharedFsKind {
    /// Kata's name (`none`, `virtio-fs`).
    pub fn as_str(self) -> &'static str {
        match self {
            SharedFsKind::None => "none",
            SharedFsKind::VirtioFs => "virtio-fs",
        }
    }
}

/// How the VM comes to run: booted cold, booted as a template's source, or started from a
/// template ([`HypervisorConfig::boot`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Boot {
    /// A normal boot.
    #[default]
    Cold,
    /// Boot cold with guest RAM in `dir/memory` (a file mapped shared, e.g. on tmpfs) so that
    /// [`Hypervisor::save_template`](crate::Hypervisor::save_template) can save it as a
    /// template. `dir` must exist.
    TemplateSource {
        /// The template's directory.
        dir: PathBuf,
    },
    /// Start from the template in `dir`: RAM mapped copy-on-write (private) from
    /// `dir/memory`, device state restored from `dir/state`; running when `start` returns.
    /// The configuration must be the template's (the caller checks that), and so must the
    /// cold-plugged devices, added in the same order with the same properties; only their
    /// host side may differ (a NIC's TAP). What the guest holds comes from the template: a
    /// NIC keeps the template's MAC until the guest sets another. Devices beyond the
    /// template's are hot-plugged after start.
    FromTemplate {
        /// The template's directory.
        dir: PathBuf,
    },
}

impl Boot {
    /// The template directory of a template role; `None` for a cold boot.
    pub fn template_dir(&self) -> Option<&std::path::Path> {
        match self {
            Boot::Cold => None,
            Boot::TemplateSource { dir } | Boot::FromTemplate { dir } => Some(dir),
        }
    }
}

/// The files of a saved template ([`Hypervisor::save_template`](crate::Hypervisor::save_template)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateFiles {
    /// Guest RAM (`dir/memory`).
    pub memory: PathBuf,
    /// The saved device state (`dir/state`).
    pub state: PathBuf,
}

impl TemplateFiles {
    /// The files of the template in `dir`.
    pub fn in_dir(dir: &std::path::Path) -> TemplateFiles {
        TemplateFiles {
            memory: dir.join("memory"),
            state: dir.join("state"),
        }
    }
}

/// The VM's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    /// VMM binary, for backends that run one (QEMU). Ignored by in-process backends.
    pub path: Option<PathBuf>,
    /// Guest kernel (bzImage or vmlinux).
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Root filesystem image, attached read-only as the first block device.
    pub image: Option<PathBuf>,
    /// Extra kernel command-line parameters, appended after the backend's own.
    pub kernel_params: Vec<String>,
    /// Machine type, backend-specific (`q35`, `microvm`). `None` picks the backend default.
    pub machine_type: Option<String>,
    /// Boot vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Accelerator choice.
    pub accelerator: Accelerator,
    /// Do not use vhost-net even when /dev/vhost-net exists.
    pub disable_vhost_net: bool,
    /// Queue pairs for network devices created by the runtime.
    pub network_queues: u16,
    /// Agent channel choice.
    pub agent_channel: AgentChannelKind,
    /// vsock port the agent listens on.
    pub agent_port: u32,
    /// File the guest's serial console is written to (created or truncated at start, kept by
    /// cleanup). `None`: `console.log` in the VM's run directory, removed by cleanup.
    pub console_log: Option<PathBuf>,
    /// The VMM's seccomp filter, as QEMU's `-sandbox` value (Kata's `seccompsandbox`); `None`
    /// runs it without one. Backends that run no VMM process ignore it.
    pub seccomp_sandbox: Option<String>,
    /// Run the VMM as the unprivileged [`rootless_user`](Self::rootless_user) instead of root.
    /// Backends that run no VMM process ignore it.
    pub rootless: bool,
    /// With [`rootless`](Self::rootless): a user name, whose uid, primary group and groups the
    /// VMM takes, or `UID:GID`. Neither may be 0.
    pub rootless_user: String,
    /// Confine the VMM to an empty directory (QEMU's `-chroot`) once it has started.
    pub chroot: bool,
    /// Shared filesystems (Kata's `shared_fs`): [`SharedFsKind::VirtioFs`] lets devices of
    /// kind [`crate::device::SharedFsConfig`] be added.
    pub shared_fs: SharedFsKind,
    /// The virtio-fs daemon (Kata's `virtio_fs_daemon`). `None`: the first of the backend's
    /// known places that exists (QEMU: `/usr/local/bin/virtiofsd`, `/usr/libexec/virtiofsd`,
    /// `/usr/lib/qemu/virtiofsd`).
    pub virtio_fs_daemon: Option<PathBuf>,
    /// Extra arguments for every virtio-fs daemon (Kata's `virtio_fs_extra_args`), after the
    /// backend's own.
    pub virtio_fs_extra_args: Vec<String>,
    /// The cache mode of the shares the runtime creates (Kata's `virtio_fs_cache`); each
    /// device carries its own ([`crate::device::SharedFsConfig::cache`]).
    pub virtio_fs_cache: crate::device::SharedFsCache,
    /// Give the host back the memory the guest frees (Kata's `reclaim_guest_freed_memory`):
    /// a virtio-balloon device with free page reporting, through which the guest reports
    /// free blocks whose pages the host then drops. Backends without one ignore it.
    pub reclaim_guest_freed_memory: bool,
    /// How the VM comes to run ([`Boot`]); a cold boot unless set.
    pub boot: Boot,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            path: None,
            kernel: PathBuf::new(),
            initrd: None,
            image: None,
            kernel_params: Vec::new(),
            machine_type: None,
            vcpus: 1,
            memory_mib: 256,
            accelerator: Accelerator::Auto,
            disable_vhost_net: false,
            network_queues: 1,
            agent_channel: AgentChannelKind::Auto,
            agent_port: 1024,
            console_log: None,
            seccomp_sandbox: Some(DEFAULT_SECCOMP_SANDBOX.to_string()),
            rootless: false,
            rootless_user: DEFAULT_ROOTLESS_USER.to_string(),
            chroot: false,
            shared_fs: SharedFsKind::None,
            virtio_fs_daemon: None,
            virtio_fs_extra_args: Vec::new(),
            virtio_fs_cache: crate::device::SharedFsCache::default(),
            reclaim_guest_freed_memory: false,
            boot: Boot::Cold,
        }
    }
}

impl HypervisorConfig {
    /// Checks the values; the error names the field and how to fix it.
    ///
    /// Paths are checked for form only: whether the files exist is the backend's concern at
    /// start, where the error can name the file the VMM failed on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "kernel",
                "no guest kernel is set; give the path of a bzImage or vmlinux",
            ));
        }
        for (field, p) in [
            ("kernel", Some(&self.kernel)),
            ("initrd", self.initrd.as_ref()),
            ("image", self.image.as_ref()),
            ("path", self.path.as_ref()),
            ("console_log", self.console_log.as_ref()),
            ("virtio_fs_daemon", self.virtio_fs_daemon.as_ref()),
        ] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(ConfigError::new(
                        field,
                        format!("{} is not an absolute path", p.display()),
                    ));
                }
            }
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::new(
                "vcpus",
                format!("{} is out of range: use 1 to {MAX_VCPUS}", self.vcpus),
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::new(
                "memory_mib",
                format!(
                    "{} MiB is too small to boot Linux: use at least {MIN_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        if self.network_queues == 0 || self.network_queues > crate::device::MAX_QUEUE_PAIRS {
            return Err(ConfigError::new(
                "network_queues",
                format!(
                    "{} is out of range: use 1 to {}",
                    self.network_queues,
                    crate::device::MAX_QUEUE_PAIRS
                ),
            ));
        }
        if let Some(p) = self.kernel_params.iter().find(|p| p.trim().is_empty()) {
            return Err(ConfigError::new(
                "kernel_params",
                format!("{p:?} is empty; remove it"),
            ));
        }
        if self.agent_port == 0 || self.agent_port == u32::MAX {
            return Err(ConfigError::new(
                "agent_port",
                format!("{} is not a usable vsock port", self.agent_port),
            ));
        }
        if let Some(value) = &self.seccomp_sandbox {
            check_seccomp_sandbox(value)?;
        }
        if let Some(a) = self
            .virtio_fs_extra_args
            .iter()
            .find(|a| a.trim().is_empty())
        {
            return Err(ConfigError::new(
                "virtio_fs_extra_args",
                format!("{a:?} is empty; remove it"),
            ));
        }
        if self.rootless {
            RootlessUser::parse(&self.rootless_user)?;
        }
        self.validate_boot()
    }

    /// The template role's checks: an absolute directory; a template to start from has its
    /// files; no virtio-fs (vhost-user needs guest RAM shared, clones map it private).
    fn validate_boot(&self) -> Result<(), ConfigError> {
        let Some(dir) = self.boot.template_dir() else {
            return Ok(());
        };
        if !dir.is_absolute() {
            return Err(ConfigError::new(
                "boot.dir",
                format!("{} is not an absolute path", dir.display()),
            ));
        }
        if self.shared_fs == SharedFsKind::VirtioFs {
            return Err(ConfigError::new(
                "boot",
                "a VM template cannot be made or used with shared_fs = \"virtio-fs\" (vhost-user needs guest RAM shared, a template's clones map it private); set shared_fs = \"none\" or boot cold",
            ));
        }
        if let Boot::FromTemplate { .. } = self.boot {
            let files = TemplateFiles::in_dir(dir);
            for (what, p) in [("memory", &files.memory), ("state", &files.state)] {
                if !p.is_file() {
                    return Err(ConfigError::new(
                        "boot.dir",
                        format!(
                            "{} has no template {what} file ({} is missing); make the template first",
                            dir.display(),
                            p.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the seccomp filter is on: a value is set and does not say `off`.
    pub fn seccomp_enabled(&self) -> bool {
        self.seccomp_sandbox
            .as_deref()
            .is_some_and(value_enables_seccomp)
    }
}

/// Whether a valid `-sandbox` value turns the filter on.
fn value_enables_seccomp(value: &str) -> bool {
    value.split(',').all(|item| {
        let (k, v) = item.split_once('=').unwrap_or(("enable", item));
        k != "enable" || v == "on"
    })
}

/// Checks a QEMU `-sandbox` value: `on` or `off` first, then `key=value` sub-options that
/// QEMU 7.2 knows, each once.
pub fn check_seccomp_sandbox(value: &str) -> Result<(), ConfigError> {
    let bad = |problem: String| ConfigError::new("seccomp_sandbox", problem);
    let known = || {
        SECCOMP_OPTIONS
            .iter()
            .skip(1)
            .map(|(k, vs)| format!("{k}={}", vs.join("|")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut seen: Vec<&str> = Vec::new();
    for (i, item) in value.split(',').enumerate() {
        let (key, v) = match item.split_once('=') {
            Some(kv) => kv,
            None if i == 0 => ("enable", item),
            None => {
                return Err(bad(format!(
                    "{value:?}: {item:?} is not key=value; the sub-options are {}",
                    known()
                )))
            }
        };
        let Some((_, values)) = SECCOMP_OPTIONS.iter().find(|(k, _)| *k == key) else {
            return Err(bad(format!(
                "{value:?}: {key:?} is not a sub-option of QEMU's -sandbox; use {}",
                known()
            )));
        };
        if !values.contains(&v) {
            return Err(bad(format!(
                "{value:?}: {key}={v} is not valid; {key} takes {}",
                values.join(" or ")
            )));
        }
        if seen.contains(&key) {
            return Err(bad(format!("{value:?}: {key} is given twice")));
        }
        seen.push(key);
    }
    if !seen.contains(&"enable") {
        return Err(bad(format!(
            "{value:?} does not start with \"on\" or \"off\" (e.g. {DEFAULT_SECCOMP_SANDBOX:?})"
        )));
    }
    Ok(())
}

/// A parsed [`HypervisorConfig::rootless_user`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootlessUser {
    /// A user name, resolved on the host.
    Name(String),
    /// Numeric ids, used as given.
    Ids {
        /// User id.
        uid: u32,
        /// Group id.
        gid: u32,
    },
}

impl RootlessUser {
    /// Parses `NAME` or `UID:GID`; root (0) is refused.
    pub fn parse(value: &str) -> Result<RootlessUser, ConfigError> {
        let bad = |problem: String| ConfigError::new("rootless_user", problem);
        if let Some((u, g)) = value.split_once(':') {
            let id = |s: &str| {
                s.parse::<u32>().map_err(|_| {
                    bad(format!(
                        "{value:?}: {s:?} is not a numeric id; use UID:GID or a user name"
                    ))
                })
            };
            let (uid, gid) = (id(u)?, id(g)?);
            if uid == 0 || gid == 0 {
                return Err(bad(format!(
                    "{value:?} is root: an unprivileged VMM needs a uid and gid other than 0"
                )));
            }
            return Ok(RootlessUser::Ids { uid, gid });
        }
        let ok = !value.is_empty()
            && value.len() <= 32
            && !value.starts_with('-')
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            return Err(bad(format!(
                "{value:?} is not a user name (letters, digits, '_', '-', '.') nor UID:GID"
            )));
        }
        if value == "root" {
            return Err(bad("\"root\" is not an unprivileged user".into()));
        }
        Ok(RootlessUser::Name(value.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> HypervisorConfig {
        HypervisorConfig {
            kernel: "/var/lib/guest/vmlinuz".into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_with_a_kernel_are_valid() {
        good().validate().unwrap();
    }

    #[test]
    fn missing_kernel_is_named() {
        let err = HypervisorConfig::default().validate().unwrap_err();
        assert_eq!(err.field, "kernel");
    }

    #[test]
    fn bad_values_name_their_field() {
        type Mutation = fn(&mut HypervisorConfig);
        let cases: [(&str, Mutation); 12] = [
            ("virtio_fs_daemon", |c| {
                c.virtio_fs_daemon = Some("virtiofsd".into())
            }),
            ("virtio_fs_extra_args", |c| {
                c.virtio_fs_extra_args = vec![String::new()]
            }),
            ("seccomp_sandbox", |c| {
                c.seccomp_sandbox = Some("on,spawn=maybe".into())
            }),
            ("seccomp_sandbox", |c| {
                c.seccomp_sandbox = Some("on,networking=deny".into())
            }),
            ("rootless_user", |c| {
                c.rootless = true;
                c.rootless_user = "0:1000".into();
            }),
            ("rootless_user", |c| {
                c.rootless = true;
                c.rootless_user = "bad user".into();
            }),
            ("vcpus", |c| c.vcpus = 0),
            ("console_log", |c| {
                c.console_log = Some("console.log".into())
            }),
            ("memory_mib", |c| c.memory_mib = 8),
            ("initrd", |c| c.initrd = Some("initrd.img".into())),
            ("network_queues", |c| c.network_queues = 0),
            ("kernel_params", |c| c.kernel_params = vec![" ".into()]),
        ];
        for (field, mutate) in cases {
            let mut c = good();
            mutate(&mut c);
            assert_eq!(c.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn seccomp_values_follow_qemu_7_2() {
        for good in [
            DEFAULT_SECCOMP_SANDBOX,
            "on",
            "off",
            "enable=on,elevateprivileges=children",
        ] {
            check_seccomp_sandbox(good).unwrap();
        }
        let unknown = check_seccomp_sandbox("on,networking=deny").unwrap_err();
        assert_eq!(unknown.field, "seccomp_sandbox");
        let unknown = unknown.problem;
        assert!(
            unknown.contains("\"networking\" is not a sub-option"),
            "{unknown}"
        );
        assert!(
            unknown.contains("elevateprivileges=allow|deny|children"),
            "{unknown}"
        );
        assert!(check_seccomp_sandbox("obsolete=deny").is_err());
        assert!(check_seccomp_sandbox("on,spawn=deny,spawn=allow").is_err());
        assert!(check_seccomp_sandbox("on,deny").is_err());
        assert!(check_seccomp_sandbox("").is_err());
    }

    #[test]
    fn seccomp_is_on_by_default_and_off_when_said() {
        assert!(good().seccomp_enabled());
        let mut c = good();
        c.seccomp_sandbox = Some("off".into());
        assert!(!c.seccomp_enabled());
        c.seccomp_sandbox = None;
        assert!(!c.seccomp_enabled());
    }

    #[test]
    fn rootless_users_are_names_or_nonzero_ids() {
        assert_eq!(
            RootlessUser::parse("kata-qemu").unwrap(),
            RootlessUser::Name("kata-qemu".into())
        );
        assert_eq!(
            RootlessUser::parse("64000:64000").unwrap(),
            RootlessUser::Ids {
                uid: 64000,
                gid: 64000
            }
        );
        for bad in ["root", "0:0", "1000:0", "x:1", "", "-u", "a/b"] {
            assert!(RootlessUser::parse(bad).is_err(), "{bad}");
        }
        // Unused unless rootless is on.
        let mut c = good();
        c.rootless_user = "0:0".into();
        c.validate().unwrap();
    }

    #[test]
    fn template_roles_need_an_absolute_dir_its_files_and_no_virtio_fs() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = good();
        c.boot = Boot::TemplateSource {
            dir: "template".into(),
        };
        assert_eq!(c.validate().unwrap_err().field, "boot.dir");
        c.boot = Boot::TemplateSource {
            dir: dir.path().into(),
        };
        c.validate().unwrap();
        c.shared_fs = SharedFsKind::VirtioFs;
        let err = c.validate().unwrap_err();
        assert_eq!(err.field, "boot");
        assert!(err.problem.contains("shared_fs"), "{err}");
        c.shared_fs = SharedFsKind::None;
        c.boot = Boot::FromTemplate {
            dir: dir.path().into(),
        };
        let err = c.validate().unwrap_err();
        assert_eq!(err.field, "boot.dir");
        assert!(err.problem.contains("memory"), "{err}");
        std::fs::write(dir.path().join("memory"), b"").unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.problem.contains("state"), "{err}");
        std::fs::write(dir.path().join("state"), b"").unwrap();
        c.validate().unwrap();
        c.shared_fs = SharedFsKind::VirtioFs;
        assert_eq!(c.validate().unwrap_err().field, "boot");
    }

    #[test]
    fn boot_defaults_to_cold_and_reads_as_a_tagged_table() {
        let c: HypervisorConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(c.boot, Boot::Cold);
        let c: HypervisorConfig = serde_json::from_str(
            r#"{"kernel": "/k", "boot": {"kind": "from_template", "dir": "/t"}}"#,
        )
        .unwrap();
        assert_eq!(c.boot, Boot::FromTemplate { dir: "/t".into() });
    }

    #[test]
    fn unknown_fields_are_rejected_when_deserializing() {
        let err = serde_json::from_str::<HypervisorConfig>(r#"{"kernal": "/k"}"#).unwrap_err();
        assert!(err.to_string().contains("kernal"), "{err}");
    }
}
