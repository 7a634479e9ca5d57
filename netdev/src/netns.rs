//! Network namespaces: resolving a namespace argument, entering one, running work inside
//! one without moving the caller, and owning named namespaces the way `ip netns add` does.
//!
//! This is the one place the runtime's crates enter a network namespace:
//! [`resolve`] turns a name or path into the namespace file, [`enter`] is the bare
//! `setns(2)` on an open namespace fd (usable in a forked child before `exec`), and
//! [`run_in`] runs work on a thread inside a namespace.

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::Mode;

use crate::{Error, Result};

/// Where named network namespaces live (`ip netns` uses the same directory).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Resolves a namespace argument: a path is used as is, a bare name (one component, not
/// absolute) means `/run/netns/NAME`.
pub fn resolve(netns: &Path) -> PathBuf {
    if netns.components().count() == 1 && !netns.has_root() {
        Path::new(NETNS_RUN_DIR).join(netns)
    } else {
        netns.to_path_buf()
    }
}

/// Opens a namespace file, mapping errors to the crate's variants.
pub(crate) fn open_netns(path: &Path, step: &str) -> Result<OwnedFd> {
    open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(|errno| {
        let source = io::Error::from(errno);
        match errno {
            nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR => Error::NetnsNotFound {
                step: step.to_owned(),
                netns: path.to_path_buf(),
                source,
            },
            nix::errno::Errno::EACCES | nix::errno::Errno::EPERM => Error::PermissionDenied {
                step: step.to_owned(),
                source,
            },
            _ => Error::Io {
                step: step.to_owned(),
                source,
            },
        }
    })
}

/// Moves the calling thread into the network namespace open at `ns` (`setns(2)` with
/// `CLONE_NEWNET`).
///
/// This is only the system call: it does not allocate, lock or touch anything but
/// `errno`, so it is async-signal-safe and may run in a forked child before `exec`
/// (a `pre_exec` hook). Errors are the raw OS error: `EINVAL` when `ns` is not a
/// network namespace, `EPERM` without `CAP_SYS_ADMIN`. Prefer [`run_in`] when the work
/// can run on a dedicated thread: that leaves the caller where it is.
pub fn enter(ns: BorrowedFd<'_>) -> io::Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// [`enter`], with errors naming the step and the namespace.
fn enter_at(ns: &OwnedFd, path: &Path, step: &str) -> Result<()> {
    enter(ns.as_fd()).map_err(|source| match source.raw_os_error() {
        Some(libc::EPERM) => Error::PermissionDenied {
            step: step.to_owned(),
            source,
        },
        Some(libc::EINVAL) => Error::NotANetns {
            step: step.to_owned(),
            netns: path.to_path_buf(),
            source,
        },
        _ => Error::Io {
            step: step.to_owned(),
            source,
        },
    })
}

/// Runs `f` on a short-lived dedicated thread inside the network namespace `netns`
/// and returns its result.
///
/// `netns` is a namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`) or a bare name
/// for `/run/netns/NAME`. The calling thread (and so any async runtime worker) never
/// changes namespace; the dedicated thread exits when `f` returns. File descriptors
/// that `f` opens (sockets, TAP queues) keep their namespace after that. A panic in
/// `f` is resumed on the caller.
pub fn run_in<T, F>(netns: impl AsRef<Path>, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = resolve(netns.as_ref());
    let step = format!("Entering network namespace {}", path.display());
    run_in_with_step(&path, &step, move || Ok(f()))
}

/// [`run_in`] for fallible work, with the step used in error messages.
pub(crate) fn run_in_with_step<T, F>(path: &Path, step: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let ns = open_netns(path, step)?;
    thread::scope(|scope| {
        let worker = thread::Builder::new()
            .name("netdev-netns".into())
            .spawn_scoped(scope, move || {
                enter_at(&ns, path, step)?;
                drop(ns);
                f()
            })
            .map_err(|source| Error::Io {
                step: format!("{step}: starting a thread"),
                source,
            })?;
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A named network namespace under `/run/netns`, created like `ip netns add`.
///
/// The namespace lives as long as its bind mount (and anything inside it, such as a
/// process or an open socket). [`NetNs::delete`] or dropping the value removes the
/// name; [`NetNs::into_path`] keeps it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    owned: bool,
}

static RUN_DIR_SETUP: Mutex<()> = Mutex::new(());

fn io_err(step: &str) -> impl FnOnce(nix::errno::Errno) -> Error + '_ {
    move |errno| {
        let source = io::Error::from(errno);
        if matches!(errno, nix::errno::Errno::EPERM | nix::errno::Errno::EACCES) {
            Error::PermissionDenied {
                step: step.to_owned(),
                source,
            }
        } else {
            Error::Io {
                step: step.to_owned(),
                source,
            }
        }
    }
}

/// Makes `/run/netns` a shared mount point, as `ip netns add` does, so that
/// namespace mounts propagate to mount namespaces created later.
fn prepare_run_dir(step: &str) -> Result<()> {
    let _serial = RUN_DIR_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    fs::create_dir_all(NETNS_RUN_DIR).map_err(|source| Error::Io {
        step: format!("{step}: creating {NETNS_RUN_DIR}"),
        source,
    })?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            // Not a mount point yet: bind it onto itself, then share it.
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(io_err(step))?;
            shared().map_err(io_err(step))
        }
        Err(errno) => Err(io_err(step)(errno)),
    }
}

fn validate_ns_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
    {
        return Err(Error::InvalidConfig {
            name: name.to_owned(),
            reason: "a network namespace name must be 1 to 255 bytes without '/' or NUL".into(),
        });
    }
    Ok(())
}

impl NetNs {
    /// Creates the network namespace `/run/netns/NAME`.
    ///
    /// A dedicated thread unshares a new network namespace and bind-mounts its
    /// `/proc/thread-self/ns/net` onto the name; the calling thread stays where it is.
    pub fn create(name: &str) -> Result<NetNs> {
        validate_ns_name(name)?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        let step = format!("Creating network namespace {}", path.display());
        prepare_run_dir(&step)?;
        match open(
            &path,
            OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => drop(fd),
            Err(nix::errno::Errno::EEXIST) => return Err(Error::NetnsExists { step, netns: path }),
            Err(errno) => return Err(io_err(&step)(errno)),
        }
        let bind = thread::scope(|scope| {
            let worker = thread::Builder::new()
                .name("netdev-netns".into())
                .spawn_scoped(scope, || -> Result<()> {
                    unshare(CloneFlags::CLONE_NEWNET).map_err(io_err(&step))?;
                    mount(
                        Some("/proc/thread-self/ns/net"),
                        &path,
                        Some("none"),
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(io_err(&step))
                })
                .map_err(|source| Error::Io {
                    step: format!("{step}: starting a thread"),
                    source,
                })?;
            match worker.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        });
        if let Err(err) = bind {
            let _ = fs::remove_file(&path);
            return Err(err);
        }
        Ok(NetNs {
            name: name.to_owned(),
            path,
            owned: true,
        })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, `/run/netns/NAME`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the namespace and returns its path; it is no longer deleted on drop.
    pub fn into_path(mut self) -> PathBuf {
        self.owned = false;
        std::mem::take(&mut self.path)
    }

    /// Runs `f` inside this namespace; see [`run_in`].
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        run_in(&self.path, f)
    }

    /// Removes the name (unmount and unlink), like `ip netns del`.
    ///
    /// The namespace itself goes away once nothing else holds it (processes, open
    /// namespace files, sockets or TAP fds opened inside it).
    pub fn delete(mut self) -> Result<()> {
        self.owned = false;
        delete_path(&self.path)
    }
}

/// Removes a named namespace by path (unmount and unlink).
pub fn delete_path(path: &Path) -> Result<()> {
    let step = format!("Deleting network namespace {}", path.display());
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(nix::errno::Errno::ENOENT) => {
            return Err(Error::NetnsNotFound {
                step,
                netns: path.to_path_buf(),
                source: io::Error::from_raw_os_error(libc::ENOENT),
            })
        }
        Err(errno) => return Err(io_err(&step)(errno)),
    }
    fs::remove_file(path).map_err(|source| Error::Io { step, source })
}

impl AsRef<Path> for NetNs {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.owned {
            let _ = delete_path(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_resolve_under_run_netns() {
        assert_eq!(resolve(Path::new("x")), Path::new("/run/netns/x"));
        assert_eq!(
            resolve(Path::new("/proc/1/ns/net")),
            Path::new("/proc/1/ns/net")
        );
        assert_eq!(resolve(Path::new("./x")), Path::new("./x"));
    }

    #[test]
    fn bad_namespace_names_are_rejected() {
        for name in ["", ".", "..", "a/b", "a\0"] {
            assert!(matches!(
                validate_ns_name(name),
                Err(Error::InvalidConfig { .. })
            ));
        }
    }
}
