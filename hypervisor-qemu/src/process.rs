//! The QEMU child process: spawn in the sandbox's network namespace with exactly the chosen
//! fds, capture its output, and report how it exited.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How many of QEMU's last output lines are kept for error messages.
const TAIL_LINES: usize = 20;

/// Errors spawning QEMU.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The namespace file could not be opened.
    #[error("opening network namespace {}", path.display())]
    Netns {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The output log could not be created.
    #[error("creating QEMU's output log {}", path.display())]
    Log {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Passing fds to the child failed.
    #[error("passing fds to QEMU")]
    Fds(#[source] netdev::Error),
    /// `exec` failed (no such binary, not executable).
    #[error("starting {}", binary.display())]
    Exec {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The last lines QEMU printed.
#[derive(Debug, Default, Clone)]
pub struct OutputTail(Arc<Mutex<VecDeque<String>>>);

impl OutputTail {
    fn push(&self, line: String) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == TAIL_LINES {
            q.pop_front();
        }
        q.push_back(line);
    }

    /// The kept lines, joined; QEMU's own message when start-up fails.
    pub fn text(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }
}

/// A running QEMU.
#[derive(Debug)]
pub struct QemuProcess {
    /// Its pid.
    pub pid: u32,
    /// Whether `exited` carries QEMU's real status: false for a QEMU this process did not
    /// spawn (re-attached after a runtime restart), whose status only its parent can read.
    pub status_known: bool,
    /// Set once it exited, with the status, after its output was fully read.
    pub exited: watch::Receiver<Option<ExitStatus>>,
    /// Its last output lines.
    pub output: OutputTail,
    _reaper: JoinHandle<()>,
}

/// Spawns `binary args`, with `fds` placed at their numbers in the child (and no other fd
/// inherited), inside `netns` when given; stdout and stderr go to `log` and the tail.
pub fn spawn(
    binary: &Path,
    args: &[String],
    fds: netdev::ChildFds,
    netns: Option<&Path>,
    log: &Path,
) -> Result<QemuProcess, SpawnError> {
    let netns_file = netns
        .map(|p| {
            File::open(p).map_err(|source| SpawnError::Netns {
                path: p.to_path_buf(),
                source,
            })
        })
        .transpose()?;
    let log_file = File::create(log).map_err(|source| SpawnError::Log {
        path: log.to_path_buf(),
        source,
    })?;

    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    // Enter the namespace before the fds are moved to their numbers: pre_exec hooks run in
    // the order they are added, and moving the fds could put another file at the number the
    // namespace fd has in the parent (setns then fails with EINVAL).
    if let Some(ns) = &netns_file {
        let ns_fd = ns.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2),
        // which is async-signal-safe; `netns_file` stays open in the parent until spawn
        // returns, and this hook runs before any other touches the child's fd table, so the
        // fd number still names the namespace file in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    fds.apply_tokio(&mut cmd).map_err(SpawnError::Fds)?;
    let mut child = spawn_child(&mut cmd, binary)?;
    drop(netns_file);
    let pending = watch_child(&mut child, log_file);
    Ok(pending.with_child(child))
}

fn spawn_child(cmd: &mut Command, binary: &Path) -> Result<tokio::process::Child, SpawnError> {
    cmd.spawn().map_err(|source| SpawnError::Exec {
        binary: binary.to_path_buf(),
        source,
    })
}

struct Pending {
    pid: u32,
    output: OutputTail,
    readers: Vec<JoinHandle<()>>,
}

impl Pending {
    fn with_child(self, mut child: tokio::process::Child) -> QemuProcess {
        let (tx, exited) = watch::channel(None);
        let readers = self.readers;
        let reaper = tokio::spawn(async move {
            let status = child.wait().await;
            for r in readers {
                let _ = r.await;
            }
            // A wait error means the child is gone and unreapable; report it as killed.
            let status = status.unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
            tx.send_replace(Some(status));
        });
        QemuProcess {
            pid: self.pid,
            status_known: true,
            exited,
            output: self.output,
            _reaper: reaper,
        }
    }
}

fn watch_child(child: &mut tokio::process::Child, log: File) -> Pending {
    let pid = child.id().unwrap_or_default();
    let output = OutputTail::default();
    let log = Arc::new(Mutex::new(log));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(copy_lines(out, log.clone(), output.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(copy_lines(err, log, output.clone())));
    }
    Pending {
        pid,
        output,
        readers,
    }
}

async fn copy_lines(stream: impl AsyncRead + Unpin, log: Arc<Mutex<File>>, tail: OutputTail) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        {
            let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{line}");
        }
        tail.push(line);
    }
}

/// Watches a QEMU this process did not spawn (re-attached after a runtime restart) through a
/// pidfd, which becomes readable when the process exits.
pub fn watch_pid(pid: u32) -> std::io::Result<QemuProcess> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1; no
    // memory is shared with the kernel.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor the kernel just created for us and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // SAFETY: the AsyncFd owns `fd`, so the descriptor stays open while it is registered.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(std::io::Error::from)?;
    let (tx, exited) = watch::channel(None);
    let reaper = tokio::spawn(async move {
        let _ = fd.readable().await;
        tx.send_replace(Some(ExitStatus::from_raw(0)));
    });
    Ok(QemuProcess {
        pid,
        status_known: false,
        exited,
        output: OutputTail::default(),
        _reaper: reaper,
    })
}
