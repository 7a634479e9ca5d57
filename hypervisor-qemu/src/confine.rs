//! How QEMU is confined: its seccomp filter, the unprivileged user it runs as, its chroot, and
//! the private files it is handed.
//!
//! - **Files.** The run root and each run directory are 0700 (the lifecycle core makes them), the QMP and agent sockets 0600,
//!   the console log and `qemu.log` 0600, all owned by the runtime (root). QEMU opens none of
//!   them by path: the sockets are inherited listening fds, the console log and every disk
//!   reach it in fd sets (`-add-fd`, `/dev/fdset/N`; hot-plugged disks through QMP `add-fd`).
//!   So nothing needs to be chowned to QEMU's user, and QEMU cannot reach another sandbox's
//!   files by path.
//! - **Seccomp.** `seccomp_sandbox` is QEMU's `-sandbox` value, applied by QEMU before it
//!   creates any device.
//! - **Unprivileged user.** With `rootless`, the child takes the user's uid, gid and groups
//!   before `exec` (see [`crate::process`] for why not QEMU's `-runas`). It needs no privilege
//!   for networking (TAP and vhost fds are passed in), but it opens the kernel and initrd
//!   itself: they are passed as fds (`/proc/self/fd/N`, so no directory on their path has to
//!   be searchable by the user) and must be readable by it, which prepare checks, as it checks
//!   `/dev/kvm` and `/dev/vhost-vsock` when they will be used.
//! - **Chroot.** With `chroot`, QEMU chroots (`-chroot`, once its devices exist) into an empty
//!   directory of the run directory, root-owned and mode 0111 (searchable, not listable, not
//!   writable). It is passed as an fd too. An unprivileged QEMU needs `CAP_SYS_CHROOT` for
//!   that: it keeps that one capability (ambient), and no other. The empty, unwritable root
//!   leaves it no directory to chroot into again.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hypervisor::config::RootlessUser;
use hypervisor::{ConfigError, DeviceId, Error, HypervisorConfig, Result};

use crate::cmdline::{fdset_path, Accel};
use crate::process::{self, RunAs};
use crate::{ColdDevice, RunDir};

/// Mode of the sockets, the console log and `qemu.log`.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the empty directory QEMU chroots into.
pub const CHROOT_MODE: u32 = 0o111;

/// fd set of the console log; disks take the following ones.
const CONSOLE_FDSET: u32 = 1;

/// Resolves the configured unprivileged user, if `rootless` is on.
pub fn run_as(config: &HypervisorConfig) -> std::result::Result<Option<RunAs>, ConfigError> {
    if !config.rootless {
        return Ok(None);
    }
    let bad = |problem: String| ConfigError::new("rootless_user", problem);
    let (uid, gid, groups) = match RootlessUser::parse(&config.rootless_user)? {
        RootlessUser::Ids { uid, gid } => (uid, gid, vec![gid]),
        RootlessUser::Name(name) => {
            let user = nix::unistd::User::from_name(&name)
                .map_err(|e| bad(format!("looking up user {name:?}: {e}")))?
                .ok_or_else(|| {
                    bad(format!(
                        "user {name:?} does not exist on this host; create it (`make deps` does: useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {name}) or give UID:GID"
                    ))
                })?;
            let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
            if uid == 0 || gid == 0 {
                return Err(bad(format!(
                    "user {name:?} has uid {uid} and gid {gid}: an unprivileged VMM needs ids other than 0"
                )));
            }
            let cname = CString::new(name.clone()).map_err(|e| bad(e.to_string()))?;
            let groups = nix::unistd::getgrouplist(&cname, user.gid)
                .map_err(|e| bad(format!("reading the groups of {name:?}: {e}")))?
                .into_iter()
                .map(|g| g.as_raw())
                .filter(|g| *g != 0)
                .collect();
            (uid, gid, groups)
        }
    };
    Ok(Some(RunAs {
        uid,
        gid,
        groups,
        chroot_capability: config.chroot,
    }))
}

/// Whether `who` may access a file with `meta` for `want` (`0o4` read, `0o2` write, as for
/// "other").
pub(crate) fn may_access(meta: &std::fs::Metadata, who: &RunAs, want: u32) -> bool {
    let mode = meta.mode();
    let bits = if meta.uid() == who.uid {
        mode >> 6
    } else if meta.gid() == who.gid || who.groups.contains(&meta.gid()) {
        mode >> 3
    } else {
        mode
    };
    bits & want == want
}

/// Checks, before anything is created, that an unprivileged QEMU can open what it opens
/// itself: the kernel and initrd (read), `/dev/kvm` under KVM and `/dev/vhost-vsock` for a
/// vsock agent (read-write). The error names the key.
pub fn check_access(config: &HypervisorConfig, accel: Accel, vsock: bool) -> Result<()> {
    let Some(who) = run_as(config)? else {
        return Ok(());
    };
    let mut wanted: Vec<(&str, PathBuf, u32)> = vec![("kernel", config.kernel.clone(), 0o4)];
    wanted.extend(config.initrd.clone().map(|p| ("initrd", p, 0o4)));
    if accel == Accel::Kvm {
        wanted.push(("accelerator", "/dev/kvm".into(), 0o6));
    }
    if vsock {
        wanted.push(("agent_channel", "/dev/vhost-vsock".into(), 0o6));
    }
    for (key, path, want) in wanted {
        let meta = std::fs::metadata(&path).map_err(|e| {
            ConfigError::new(key, format!("{} cannot be read ({e})", path.display()))
        })?;
        if !may_access(&meta, &who, want) {
            return Err(ConfigError::new(
                key,
                format!(
                    "{} (owner {}, group {}, mode {:o}) cannot be {} by QEMU's user {}:{} (rootless_user {:?}); give that user access, or turn rootless off",
                    path.display(),
                    meta.uid(),
                    meta.gid(),
                    meta.mode() & 0o7777,
                    if want == 0o4 { "read" } else { "opened read-write" },
                    who.uid,
                    who.gid,
                    config.rootless_user
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// Makes a freshly bound socket 0600.
pub fn make_private(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
}

/// What `start` hands QEMU besides its devices: files as fds, and its confinement.
#[derive(Debug)]
pub struct StartFiles {
    /// The console's path for `-serial file:`.
    pub console: PathBuf,
    /// fd sets: `(set, fd number in QEMU)`.
    pub fdsets: Vec<(u32, i32)>,
    /// Disk paths for `file.filename=`, by device id.
    pub disks: HashMap<DeviceId, PathBuf>,
    /// `-kernel` and `-initrd`.
    pub kernel: PathBuf,
    /// See `kernel`.
    pub initrd: Option<PathBuf>,
    /// `-chroot`.
    pub chroot: Option<PathBuf>,
    /// `-sandbox`.
    pub seccomp: Option<String>,
    /// The unprivileged identity.
    pub run_as: Option<RunAs>,
}

impl StartFiles {
    /// Opens the console log (created 0600), the cold disks, and with `rootless` the kernel
    /// and initrd, and creates the chroot directory; every fd goes into `fds`.
    pub fn open(
        config: &HypervisorConfig,
        run: &RunDir,
        console: &Path,
        cold: &[ColdDevice],
        fds: &mut netdev::ChildFds,
    ) -> Result<StartFiles> {
        let run_as = run_as(config)?;
        let console = process::create_private(console).map_err(|e| {
            Error::backend(format!("Creating the console log {}", console.display()), e)
        })?;
        let mut fdsets = vec![(CONSOLE_FDSET, fds.push(OwnedFd::from(console)))];
        let mut disks = HashMap::new();
        for dev in cold {
            if let ColdDevice::Block {
                info,
                path,
                read_only,
                ..
            } = dev
            {
                let file = open_disk(path, *read_only)
                    .map_err(|e| Error::device(&info.id, "Opening the disk of", e))?;
                let set = CONSOLE_FDSET + fdsets.len() as u32;
                fdsets.push((set, fds.push(OwnedFd::from(file))));
                disks.insert(info.id.clone(), fdset_path(set));
            }
        }
        let by_fd = |fds: &mut netdev::ChildFds, key: &str, path: &Path| -> Result<PathBuf> {
            let f = File::open(path).map_err(|e| {
                Error::from(ConfigError::new(
                    key,
                    format!("{} cannot be opened ({e})", path.display()),
                ))
            })?;
            Ok(PathBuf::from(format!(
                "/proc/self/fd/{}",
                fds.push(OwnedFd::from(f))
            )))
        };
        let (kernel, initrd) = if run_as.is_some() {
            (
                by_fd(fds, "kernel", &config.kernel)?,
                config
                    .initrd
                    .as_deref()
                    .map(|p| by_fd(fds, "initrd", p))
                    .transpose()?,
            )
        } else {
            (config.kernel.clone(), config.initrd.clone())
        };
        let chroot = if config.chroot {
            let dir = run.dir.join("chroot");
            DirBuilder::new()
                .mode(CHROOT_MODE)
                .create(&dir)
                .and_then(|()| {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(CHROOT_MODE))
                })
                .and_then(|()| {
                    OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECTORY)
                        .open(&dir)
                })
                .map(|d| PathBuf::from(format!("/proc/self/fd/{}", fds.push(OwnedFd::from(d)))))
                .map_err(|e| {
                    Error::backend(
                        format!("Creating the chroot directory {}", dir.display()),
                        e,
                    )
                })?
                .into()
        } else {
            None
        };
        Ok(StartFiles {
            console: fdset_path(CONSOLE_FDSET),
            fdsets,
            disks,
            kernel,
            initrd,
            chroot,
            seccomp: config.seccomp_sandbox.clone(),
            run_as,
        })
    }
}

/// How a confinement of a configuration fares on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfinementState {
    /// Configured, and it can work here.
    Active,
    /// Not configured.
    Off,
    /// Configured, and it cannot work here (the detail says why).
    Broken,
}

/// One confinement of a configuration, as `sandbox check` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfinementCheck {
    /// `seccomp`, `rootless` or `chroot`.
    pub name: &'static str,
    /// How it fares.
    pub state: ConfinementState,
    /// What is configured, and what was found.
    pub detail: String,
}

/// Whether `binary` accepts `args` before `-version` (QEMU parses and checks option values,
/// `-sandbox`'s sub-options included, before it acts on `-version`). `Err` has its message.
fn qemu_accepts(binary: &Path, args: &[&str]) -> std::result::Result<(), String> {
    let out = std::process::Command::new(binary)
        .args(args)
        .arg("-version")
        .output()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// What confinement `config` gives QEMU (`binary`) on this host: the seccomp filter, the
/// unprivileged user, the chroot.
pub fn check_confinement(config: &HypervisorConfig, binary: &Path) -> Vec<ConfinementCheck> {
    use ConfinementState::{Active, Broken, Off};
    let line = |name, state, detail: String| ConfinementCheck {
        name,
        state,
        detail,
    };
    let mut out = Vec::new();
    out.push(match config.seccomp_sandbox.as_deref() {
        Some(v) if config.seccomp_enabled() => match qemu_accepts(binary, &["-sandbox", v]) {
            Ok(()) => line("seccomp", Active, format!("on: -sandbox {v}")),
            Err(e) => line(
                "seccomp",
                Broken,
                format!("seccompsandbox {v:?}: this QEMU refuses it ({e}); QEMU must be built with libseccomp"),
            ),
        },
        _ => line(
            "seccomp",
            Off,
            "off: QEMU runs without a system-call filter (set seccompsandbox)".into(),
        ),
    });
    out.push(if !config.rootless {
        line(
            "rootless",
            Off,
            "off: QEMU runs as root (set rootless = true)".into(),
        )
    } else {
        let host = crate::host::HostFeatures::probe();
        let accel = host
            .choose_accel(config.accelerator)
            .map(|(a, _)| a)
            .unwrap_or(Accel::Tcg);
        let vsock =
            host.vhost_vsock && config.agent_channel != hypervisor::AgentChannelKind::VirtioSerial;
        match run_as(config).map_err(Error::from).and_then(|who| {
            check_access(config, accel, vsock)?;
            Ok(who)
        }) {
            Ok(Some(who)) => line(
                "rootless",
                Active,
                format!(
                    "QEMU runs as uid {} gid {} groups {:?} (rootless_user {:?})",
                    who.uid, who.gid, who.groups, config.rootless_user
                ),
            ),
            Ok(None) => line("rootless", Off, "off".into()),
            Err(e) => line("rootless", Broken, crate::error_chain(&e)),
        }
    });
    out.push(if !config.chroot {
        line(
            "chroot",
            Off,
            "off: QEMU sees the host's file system (set chroot = true)".into(),
        )
    } else {
        match qemu_accepts(binary, &["-chroot", "/"]) {
            Ok(()) => line(
                "chroot",
                Active,
                format!(
                    "QEMU chroots into an empty directory of its run directory once started{}",
                    if config.rootless {
                        ", keeping CAP_SYS_CHROOT alone"
                    } else {
                        ""
                    }
                ),
            ),
            Err(e) => line(
                "chroot",
                Broken,
                format!("this QEMU has no -chroot ({e}); QEMU 9.0 removed it"),
            ),
        }
    });
    out
}

/// Opens a disk for QEMU: read-only, or read-write.
pub fn open_disk(path: &Path, read_only: bool) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(!read_only).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> RunAs {
        RunAs {
            uid: 4000,
            gid: 4000,
            groups: vec![4000, 4001],
            chroot_capability: false,
        }
    }

    #[test]
    fn access_follows_owner_group_and_other_bits() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let meta = |mode: u32| {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::metadata(&f).unwrap()
        };
        // Owned by root (the test runs as root or as its own user, not 4000).
        assert!(may_access(&meta(0o644), &who(), 0o4));
        assert!(!may_access(&meta(0o640), &who(), 0o4));
        assert!(!may_access(&meta(0o600), &who(), 0o4));
        assert!(!may_access(&meta(0o644), &who(), 0o6));
        assert!(may_access(&meta(0o666), &who(), 0o6));
    }

    #[test]
    fn the_report_names_each_confinement_and_what_this_qemu_accepts() {
        let qemu = crate::QemuOptions::default().default_binary;
        let mut c = HypervisorConfig {
            kernel: "/k".into(),
            ..Default::default()
        };
        c.seccomp_sandbox = None;
        let names =
            |r: &[ConfinementCheck]| r.iter().map(|l| (l.name, l.state)).collect::<Vec<_>>();
        use ConfinementState::*;
        assert_eq!(
            names(&check_confinement(&c, &qemu)),
            [("seccomp", Off), ("rootless", Off), ("chroot", Off)]
        );
        c.rootless = true;
        c.rootless_user = "no-such-user-kq".into();
        let r = check_confinement(&c, &qemu);
        assert_eq!(r[1].state, Broken);
        assert!(r[1].detail.contains("does not exist"), "{r:?}");
        // A missing binary cannot accept a filter.
        c.seccomp_sandbox = Some("on".into());
        let r = check_confinement(&c, Path::new("/nonexistent/qemu"));
        assert_eq!(r[0].state, Broken, "{r:?}");
    }

    #[test]
    fn rootless_off_resolves_nobody() {
        let c = HypervisorConfig {
            kernel: "/k".into(),
            ..Default::default()
        };
        assert_eq!(run_as(&c).unwrap(), None);
    }

    #[test]
    fn numeric_users_are_taken_as_given_and_missing_names_are_named() {
        let mut c = HypervisorConfig {
            kernel: "/k".into(),
            rootless: true,
            rootless_user: "64000:64001".into(),
            chroot: true,
            ..Default::default()
        };
        assert_eq!(
            run_as(&c).unwrap(),
            Some(RunAs {
                uid: 64000,
                gid: 64001,
                groups: vec![64001],
                chroot_capability: true,
            })
        );
        c.rootless_user = "no-such-user-kq".into();
        let e = run_as(&c).unwrap_err();
        assert_eq!(e.field, "rootless_user");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
