//! The spec's mounts and the standard device nodes, as prepared child [`Op`]s.
//!
//! Mounts are made inside the container's new mount namespace before `pivot_root`, so sources
//! resolve in the agent's view and nothing is ever mounted in the agent's own namespace: when
//! the container's last process exits, its mounts go with the namespace.

use std::ffi::CString;
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use nix::sys::stat::{makedev, Mode, SFlag};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{Linux, LinuxDevice, LinuxDeviceType};

use super::child::Op;
use super::Error;

/// The device nodes every container gets on a `/dev` tmpfs (runc's defaults).
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// `/dev` links every container gets.
const DEV_LINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
];

pub(crate) fn cstring(id: &str, what: &str, value: impl Into<Vec<u8>>) -> Result<CString, Error> {
    CString::new(value).map_err(|_| Error::InvalidSpec {
        id: id.to_string(),
        reason: format!("{what} contains a NUL byte"),
    })
}

fn path_cstring(id: &str, what: &str, path: &Path) -> Result<CString, Error> {
    cstring(id, what, path.as_os_str().as_encoded_bytes())
}

/// Joins a container path under the root, refusing `..` (a spec must not climb out of it).
pub(crate) fn under_root(id: &str, root: &Path, dest: &Path) -> Result<PathBuf, Error> {
    let mut path = root.to_path_buf();
    for component in dest.components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::InvalidSpec {
                    id: id.to_string(),
                    reason: format!("mount destination {} contains \"..\"", dest.display()),
                })
            }
        }
    }
    Ok(path)
}

/// `mkdir -p` of `path` below `root`, one op per level.
fn mkdirs(id: &str, root: &Path, path: &Path, ops: &mut Vec<(Op, String)>) -> Result<(), Error> {
    let mut levels: Vec<&Path> = path
        .ancestors()
        .take_while(|p| p.starts_with(root) && *p != root)
        .collect();
    levels.reverse();
    for level in levels {
        ops.push((
            Op::Mkdir(path_cstring(id, "mount destination", level)?),
            format!("Creating directory {}", level.display()),
        ));
    }
    Ok(())
}

/// Mount flags and the remaining data of an OCI option list (runc's table).
fn parse_options(options: &[String]) -> (MsFlags, MsFlags, Vec<String>) {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "private" => {
                propagation |= MsFlags::MS_PRIVATE;
                continue;
            }
            "rprivate" => {
                propagation |= MsFlags::MS_PRIVATE | MsFlags::MS_REC;
                continue;
            }
            "slave" => {
                propagation |= MsFlags::MS_SLAVE;
                continue;
            }
            "rslave" => {
                propagation |= MsFlags::MS_SLAVE | MsFlags::MS_REC;
                continue;
            }
            "unbindable" => {
                propagation |= MsFlags::MS_UNBINDABLE;
                continue;
            }
            "runbindable" => {
                propagation |= MsFlags::MS_UNBINDABLE | MsFlags::MS_REC;
                continue;
            }
            // Shared propagation would leak container mounts back into the agent's namespace.
            "shared" | "rshared" => continue,
            _ => {
                data.push(option.clone());
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags, propagation, data)
}

/// The ops that mount the spec's mounts under `root`, then the default devices if `/dev` is a
/// tmpfs of the spec. Cgroup mounts are skipped: the guest runtime does not manage cgroups.
pub(crate) fn mount_ops(
    id: &str,
    root: &Path,
    mounts: &[oci_spec::runtime::Mount],
) -> Result<Vec<(Op, String)>, Error> {
    let mut ops = Vec::new();
    let mut dev_tmpfs = false;
    for m in mounts {
        let typ = m.typ().as_deref().unwrap_or("");
        if typ == "cgroup" || typ == "cgroup2" {
            continue;
        }
        let dest = m.destination();
        if !dest.is_absolute() {
            return Err(Error::InvalidSpec {
                id: id.to_string(),
                reason: format!("mount destination {} is not absolute", dest.display()),
            });
        }
        let target = under_root(id, root, dest)?;
        let (mut flags, propagation, data) = parse_options(m.options().as_deref().unwrap_or(&[]));
        if typ == "bind" {
            flags |= MsFlags::MS_BIND;
        }
        let bind = flags.contains(MsFlags::MS_BIND);
        let source = m.source().as_deref();
        let name = format!(
            "Mounting {} ({}) on {}",
            source
                .map(|s| s.display().to_string())
                .unwrap_or_else(|| typ.to_string()),
            if bind { "bind" } else { typ },
            dest.display()
        );
        // A bind mount of a file needs a file to mount over.
        let file = bind && source.is_some_and(|s| s.metadata().is_ok_and(|md| !md.is_dir()));
        match (file, target.parent()) {
            (true, Some(parent)) => {
                mkdirs(id, root, parent, &mut ops)?;
                ops.push((
                    Op::Touch(path_cstring(id, "mount destination", &target)?),
                    format!("Creating file {}", target.display()),
                ));
            }
            _ => mkdirs(id, root, &target, &mut ops)?,
        }
        let target_c = path_cstring(id, "mount destination", &target)?;
        let source_c = match source {
            Some(s) => Some(path_cstring(id, "mount source", s)?),
            None => Some(cstring(id, "mount type", typ)?),
        };
        let fstype = if bind {
            None
        } else {
            Some(cstring(id, "mount type", typ)?)
        };
        let data_c = if data.is_empty() {
            None
        } else {
            Some(cstring(id, "mount options", data.join(","))?)
        };
        // A bind mount ignores most flags: bind first, then remount with them.
        let first = if bind {
            flags & (MsFlags::MS_BIND | MsFlags::MS_REC)
        } else {
            flags
        };
        ops.push((
            Op::Mount {
                source: source_c,
                target: target_c.clone(),
                fstype,
                flags: first,
                data: data_c,
            },
            name.clone(),
        ));
        let rest = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if bind && !rest.is_empty() {
            ops.push((
                Op::Mount {
                    source: None,
                    target: target_c.clone(),
                    fstype: None,
                    flags: MsFlags::MS_BIND | MsFlags::MS_REMOUNT | rest,
                    data: None,
                },
                format!("Remounting {} with its options", dest.display()),
            ));
        }
        if !propagation.is_empty() {
            ops.push((
                Op::Mount {
                    source: None,
                    target: target_c,
                    fstype: None,
                    flags: propagation,
                    data: None,
                },
                format!("Setting the propagation of {}", dest.display()),
            ));
        }
        if dest == Path::new("/dev") && typ == "tmpfs" {
            dev_tmpfs = true;
        }
    }
    if dev_tmpfs {
        device_ops(id, root, &mut ops)?;
    }
    Ok(ops)
}

/// The spec's own devices (`linux.devices`), created under `root` before `pivot_root`.
pub(crate) fn spec_device_ops(
    id: &str,
    root: &Path,
    devices: &[LinuxDevice],
) -> Result<Vec<(Op, String)>, Error> {
    let mut ops = Vec::new();
    ops.push((Op::Umask(Mode::empty()), "Clearing the umask".to_string()));
    for device in devices {
        let dest = device.path();
        let kind = match device.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => {
                return Err(Error::InvalidSpec {
                    id: id.to_string(),
                    reason: format!("device {} has type \"a\"", dest.display()),
                })
            }
        };
        let path = under_root(id, root, dest)?;
        if let Some(parent) = path.parent() {
            mkdirs(id, root, parent, &mut ops)?;
        }
        let path_c = path_cstring(id, "device", &path)?;
        ops.push((
            Op::Mknod {
                path: path_c.clone(),
                mode: Mode::from_bits_truncate(device.file_mode().unwrap_or(0o666)),
                kind,
                dev: makedev(device.major() as u64, device.minor() as u64),
                fallback: path_cstring(id, "device", dest)?,
            },
            format!("Creating device {}", dest.display()),
        ));
        if device.uid().is_some() || device.gid().is_some() {
            ops.push((
                Op::Chown {
                    path: path_c,
                    uid: Uid::from_raw(device.uid().unwrap_or(0)),
                    gid: Gid::from_raw(device.gid().unwrap_or(0)),
                },
                format!("Changing the owner of device {}", dest.display()),
            ));
        }
    }
    ops.push((
        Op::Umask(Mode::from_bits_truncate(0o022)),
        "Setting the umask".to_string(),
    ));
    Ok(ops)
}

/// Masked and read-only paths and sysctls, applied inside the new root.
pub(crate) fn linux_ops(id: &str, linux: &Linux) -> Result<Vec<(Op, String)>, Error> {
    let mut ops = Vec::new();
    for (key, value) in linux.sysctl().iter().flatten() {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        ops.push((
            Op::Write {
                path: cstring(id, "sysctl", path)?,
                value: cstring(id, "sysctl", value.as_str())?,
            },
            format!("Setting sysctl {key} to \"{value}\""),
        ));
    }
    for path in linux.readonly_paths().iter().flatten() {
        ops.push((
            Op::ReadOnly(cstring(id, "read-only path", path.as_str())?),
            format!("Making {path} read-only"),
        ));
    }
    for path in linux.masked_paths().iter().flatten() {
        ops.push((
            Op::Mask(cstring(id, "masked path", path.as_str())?),
            format!("Masking {path}"),
        ));
    }
    Ok(ops)
}

fn device_ops(id: &str, root: &Path, ops: &mut Vec<(Op, String)>) -> Result<(), Error> {
    let dev = root.join("dev");
    ops.push((Op::Umask(Mode::empty()), "Clearing the umask".to_string()));
    for (name, major, minor) in DEVICES {
        let path = dev.join(name);
        ops.push((
            Op::Mknod {
                path: path_cstring(id, "device", &path)?,
                mode: Mode::from_bits_truncate(0o666),
                kind: SFlag::S_IFCHR,
                dev: makedev(*major, *minor),
                fallback: cstring(id, "device", format!("/dev/{name}"))?,
            },
            format!("Creating device /dev/{name}"),
        ));
    }
    for (target, link) in DEV_LINKS {
        let path = dev.join(link);
        ops.push((
            Op::Symlink {
                target: cstring(id, "link", *target)?,
                link: path_cstring(id, "link", &path)?,
            },
            format!("Linking /dev/{link} to {target}"),
        ));
    }
    ops.push((
        Op::Umask(Mode::from_bits_truncate(0o022)),
        "Setting the umask".to_string(),
    ));
    Ok(())
}
