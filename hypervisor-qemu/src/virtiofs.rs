//! virtio-fs: one `virtiofsd` per shared directory, a child of this process like QEMU.
//!
//! The daemon is found at `prepare` (Kata's `virtio_fs_daemon`, or the first of
//! [`DEFAULT_DAEMONS`] that exists) and asked its version once, which tells the maintained
//! Rust daemon from the C daemon QEMU 7.2 ships; both take a listening socket as an fd
//! (`--fd`), so there is no window in which its path does not exist. The backend binds that
//! socket in the run directory (`virtiofsd-<id>.sock`, 0600), hands it to the daemon, then
//! connects to it itself and gives QEMU the connected end as an fd: on the command line
//! (`-chardev socket,fd=N`) for a cold share, through `getfd` and `chardev-add` for a hot one.
//! QEMU therefore never opens the socket by path, chrooted or not.
//!
//! The daemon runs in its own sandbox (`--sandbox namespace`: private mount, PID and network
//! namespaces with the shared directory as its root) with its seccomp filter on (the Rust
//! daemon's `--seccomp kill`; the C daemon's filter is always on). It is forked by the same
//! launcher thread as QEMU ([`crate::process`]), so it dies with the owner; its output goes to
//! `virtiofsd-<id>.log` (0600) in the run directory. It is stopped with the device's unplug and
//! with the VM. A daemon that exits while its VM runs is logged at once, and the next device
//! operation on the VM fails naming it (a [`DaemonExited`] error).

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use hypervisor::device::{SharedFsCache, SharedFsConfig};
use hypervisor::{ConfigError, DeviceId, Error, HypervisorConfig, Result, SharedFsKind};
use slog::{error, info};

use crate::process::{self, QemuProcess};
use crate::RunDir;

/// Where the daemon is looked for when `virtio_fs_daemon` is unset, in order: the Rust daemon
/// as `make deps` installs it, the Rust daemon as distributions package it, the C daemon of
/// QEMU 7.2 (Debian's qemu-system-common).
pub const DEFAULT_DAEMONS: &[&str] = &[
    "/usr/local/bin/virtiofsd",
    "/usr/libexec/virtiofsd",
    "/usr/lib/qemu/virtiofsd",
];

/// The fd number of the listening socket in the daemon.
const SOCKET_FD: i32 = 3;

/// Which virtiofsd a binary is: their command lines differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonFlavour {
    /// The maintained Rust daemon (`virtiofsd 1.x`).
    Rust,
    /// The C daemon shipped with QEMU up to 7.2 (`virtiofsd version 7.2...`): no read-only
    /// shares, no `metadata` cache mode.
    C,
}

impl DaemonFlavour {
    /// Tells the flavour from the first line of `--version`.
    pub fn from_version(text: &str) -> DaemonFlavour {
        if text.contains("virtiofsd version") || text.contains("FUSE") {
            DaemonFlavour::C
        } else {
            DaemonFlavour::Rust
        }
    }
}

/// The daemon a VM's shares are served by, resolved at `prepare`.
#[derive(Debug, Clone)]
pub(crate) struct Daemon {
    pub(crate) path: PathBuf,
    pub(crate) flavour: DaemonFlavour,
    pub(crate) extra_args: Vec<String>,
}

/// Resolves and probes the configured daemon; `None` when `shared_fs` is `none`. The error
/// names `virtio_fs_daemon`.
pub(crate) async fn resolve(config: &HypervisorConfig) -> Result<Option<Daemon>> {
    if config.shared_fs == SharedFsKind::None {
        return Ok(None);
    }
    let path = match &config.virtio_fs_daemon {
        Some(p) => p.clone(),
        None => DEFAULT_DAEMONS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                ConfigError::new(
                    "virtio_fs_daemon",
                    format!(
                        "is unset and no virtiofsd is installed at {}; run `make deps`, set the key, or set shared_fs = \"none\"",
                        DEFAULT_DAEMONS.join(", ")
                    ),
                )
            })?,
    };
    let out = tokio::process::Command::new(&path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            ConfigError::new(
                "virtio_fs_daemon",
                format!(
                    "{} cannot be run ({e}); give the path of virtiofsd",
                    path.display()
                ),
            )
        })?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !text.contains("virtiofsd") {
        return Err(ConfigError::new(
            "virtio_fs_daemon",
            format!(
                "{} does not answer --version as virtiofsd does; give the path of virtiofsd",
                path.display()
            ),
        )
        .into());
    }
    Ok(Some(Daemon {
        path,
        flavour: DaemonFlavour::from_version(&text),
        extra_args: config.virtio_fs_extra_args.clone(),
    }))
}

/// The daemon's arguments for one share. The error names the field of the share the flavour
/// cannot serve.
pub fn daemon_args(
    flavour: DaemonFlavour,
    share: &SharedFsConfig,
    extra: &[String],
) -> std::result::Result<Vec<String>, ConfigError> {
    let dir = share.host_dir.display().to_string();
    let mut a: Vec<String> = match flavour {
        DaemonFlavour::Rust => {
            let mut a = vec![
                format!("--fd={SOCKET_FD}"),
                format!("--shared-dir={dir}"),
                "--sandbox=namespace".into(),
                "--seccomp=kill".into(),
                format!("--cache={}", share.cache.as_str()),
            ];
            if share.read_only {
                a.push("--readonly".into());
            }
            a
        }
        DaemonFlavour::C => {
            if share.read_only {
                return Err(ConfigError::new(
                    "shared_fs.read_only",
                    "the C virtiofsd cannot share a directory read-only; install the Rust virtiofsd (make deps) or share it read-write",
                ));
            }
            let cache = match share.cache {
                SharedFsCache::Never => "none",
                SharedFsCache::Auto => "auto",
                SharedFsCache::Always => "always",
                SharedFsCache::Metadata => {
                    return Err(ConfigError::new(
                        "shared_fs.cache",
                        "the C virtiofsd has no metadata cache mode; use never, auto or always, or the Rust virtiofsd",
                    ))
                }
            };
            // The C daemon parses -o values at commas: a directory with one cannot be named.
            if dir.contains(',') {
                return Err(ConfigError::new(
                    "shared_fs.host_dir",
                    format!("{dir} has a comma, which the C virtiofsd cannot take"),
                ));
            }
            vec![
                format!("--fd={SOCKET_FD}"),
                "-o".into(),
                format!("source={dir}"),
                "-o".into(),
                format!("cache={cache}"),
                "-o".into(),
                "sandbox=namespace".into(),
            ]
        }
    };
    a.extend(extra.iter().cloned());
    Ok(a)
}

/// The socket and log of share `id` in the run directory.
fn paths(run: &RunDir, id: &DeviceId) -> (PathBuf, PathBuf) {
    (
        run.dir.join(format!("virtiofsd-{id}.sock")),
        run.dir.join(format!("virtiofsd-{id}.log")),
    )
}

/// A running virtiofsd serving one share.
#[derive(Debug)]
pub(crate) struct Virtiofsd {
    id: DeviceId,
    /// The tag the guest mounts the share by.
    pub(crate) tag: String,
    socket: PathBuf,
    process: QemuProcess,
    /// Set once the backend itself stops it, so its exit is not reported as a failure.
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Virtiofsd {
    /// Starts the daemon for share `id` and returns it with the connected end of its socket,
    /// for QEMU. On error nothing is left: no process, no socket file.
    pub(crate) async fn start(
        daemon: &Daemon,
        run: &RunDir,
        id: &DeviceId,
        share: &SharedFsConfig,
        log: &slog::Logger,
    ) -> Result<(Virtiofsd, OwnedFd)> {
        let args = daemon_args(daemon.flavour, share, &daemon.extra_args)?;
        let (socket, log_path) = paths(run, id);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .and_then(|l| crate::confine::make_private(&socket).map(|()| l))
            .map_err(|e| {
                Error::device(
                    id,
                    format!("Binding {} for the virtiofsd of", socket.display()),
                    e,
                )
            })?;
        let remove_socket = |e: Error| {
            let _ = std::fs::remove_file(&socket);
            e
        };
        let mut fds = netdev::ChildFds::starting_at(SOCKET_FD);
        fds.push(OwnedFd::from(listener));
        info!(log, "starting virtiofsd"; "id" => id.as_str(),
            "binary" => daemon.path.display().to_string(), "args" => args.join(" "));
        let process = process::spawn(&daemon.path, &args, fds, None, &log_path, None)
            .await
            .map_err(|e| remove_socket(Error::device(id, "Starting the virtiofsd of", e)))?;
        // The daemon listens on the socket it got: the connection queues until it accepts.
        let conn = match UnixStream::connect(&socket) {
            Ok(c) => c,
            Err(e) => {
                crate::exit::kill_and_reap(&process).await;
                return Err(remove_socket(Error::device(
                    id,
                    "Connecting to the virtiofsd of",
                    e,
                )));
            }
        };
        let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        watch(log.clone(), id.clone(), &process, stopping.clone());
        Ok((
            Virtiofsd {
                id: id.clone(),
                tag: share.tag.clone(),
                socket,
                process,
                stopping,
            },
            OwnedFd::from(conn),
        ))
    }

    /// The daemon's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid
    }

    /// An error naming the daemon if it has exited. A daemon that died and is not reaped yet
    /// (a zombie: its pid is still this process's child, so it names no other process) counts
    /// as exited.
    pub(crate) fn check(&self) -> Result<()> {
        let status = *self.process.exited.borrow();
        let (code, signal) = match status {
            Some(status) => (status.code(), status.signal()),
            None if is_zombie(self.process.pid) => (None, None),
            None => return Ok(()),
        };
        Err(Error::device(
            &self.id,
            format!("Checking the virtiofsd (pid {}) of", self.process.pid),
            DaemonExited {
                code,
                signal,
                output: self.process.output.text(),
            },
        ))
    }

    /// Says that the daemon is about to end with its VM (QEMU is being stopped, and the
    /// daemon exits when its vhost-user peer goes): its exit is then no failure.
    pub(crate) fn expect_exit(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops the daemon (SIGKILL: it holds no state worth a graceful end; QEMU is gone or
    /// has let go of the device) and removes its socket.
    pub(crate) async fn stop(self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        crate::exit::kill_and_reap(&self.process).await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        // Dropped without `stop` (a sandbox released in a hurry): the daemon must not stay.
        if self.process.exited.borrow().is_none() {
            self.stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.process.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Whether `pid` has exited and awaits its reaping (state `Z` in `/proc/PID/stat`).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(true)
}

/// A virtiofsd that exited while its VM ran.
#[derive(Debug, thiserror::Error)]
#[error("virtiofsd exited (code {code:?}, signal {signal:?}){}", tail(output))]
pub struct DaemonExited {
    /// Its exit code.
    pub code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// Its last output lines.
    pub output: String,
}

fn tail(output: &str) -> String {
    match output.lines().last() {
        Some(l) => format!(": {l}"),
        None => String::new(),
    }
}

/// Logs the daemon's exit unless the backend stopped it.
fn watch(
    log: slog::Logger,
    id: DeviceId,
    process: &QemuProcess,
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut exited = process.exited.clone();
    let pid = process.pid;
    let output = process.output.clone();
    tokio::spawn(async move {
        let Ok(status) = exited.wait_for(Option::is_some).await.map(|s| *s) else {
            return;
        };
        if !stopping.load(std::sync::atomic::Ordering::SeqCst) {
            error!(log, "virtiofsd exited while its VM runs; the share is gone";
                "id" => id.as_str(), "pid" => pid, "status" => format!("{status:?}"),
                "output" => output.text());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(read_only: bool, cache: SharedFsCache) -> SharedFsConfig {
        SharedFsConfig {
            tag: "kataShared".into(),
            host_dir: "/srv/share".into(),
            read_only,
            cache,
            dax: false,
        }
    }

    #[test]
    fn the_rust_daemon_is_sandboxed_with_seccomp_and_takes_read_only_and_cache() {
        let a = daemon_args(
            DaemonFlavour::Rust,
            &share(true, SharedFsCache::Metadata),
            &["--xattr".into()],
        )
        .unwrap();
        assert_eq!(
            a,
            [
                "--fd=3",
                "--shared-dir=/srv/share",
                "--sandbox=namespace",
                "--seccomp=kill",
                "--cache=metadata",
                "--readonly",
                "--xattr"
            ]
        );
    }

    #[test]
    fn the_c_daemon_gets_its_option_syntax_and_refuses_what_it_cannot_do() {
        let a = daemon_args(DaemonFlavour::C, &share(false, SharedFsCache::Never), &[]).unwrap();
        assert_eq!(
            a,
            [
                "--fd=3",
                "-o",
                "source=/srv/share",
                "-o",
                "cache=none",
                "-o",
                "sandbox=namespace"
            ]
        );
        let ro = daemon_args(DaemonFlavour::C, &share(true, SharedFsCache::Auto), &[]);
        assert_eq!(ro.unwrap_err().field, "shared_fs.read_only");
        let md = daemon_args(
            DaemonFlavour::C,
            &share(false, SharedFsCache::Metadata),
            &[],
        );
        assert_eq!(md.unwrap_err().field, "shared_fs.cache");
    }

    #[test]
    fn the_flavour_is_told_by_the_version_line() {
        assert_eq!(
            DaemonFlavour::from_version("virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7)"),
            DaemonFlavour::C
        );
        assert_eq!(
            DaemonFlavour::from_version("virtiofsd 1.14.0"),
            DaemonFlavour::Rust
        );
    }
}
