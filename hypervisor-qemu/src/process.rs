//! The QEMU child process: spawn in the sandbox's network namespace with exactly the chosen
//! fds, as the chosen user, capture its output, and report how it exited. The share daemons
//! ([`crate::virtiofs`]) are spawned the same way, so they die with their owner too.
//!
//! # QEMU does not outlive its owner
//!
//! The child sets `PR_SET_PDEATHSIG(SIGKILL)` before `exec`, so the kernel kills QEMU when its
//! parent goes away, whatever way the owner dies (`kill -9` included). The kernel ties that
//! signal to the *thread* that forked, not to the process: a QEMU forked from a tokio
//! blocking-pool thread would be killed when that thread idles out, and one forked from a
//! runtime worker when that runtime shuts down. Every QEMU is therefore forked by one
//! launcher thread this crate starts on first use and never ends (its job queue lives in a
//! `static`), so the signal fires exactly when the owning process dies. The launcher enters
//! the caller's tokio runtime before spawning, so the child, its pipes and its reaping belong
//! to that runtime as before. After setting the signal the child checks `getppid()` against
//! the owner's pid: if the owner died between `fork` and `prctl`, the child gives up instead of
//! running orphaned.
//!
//! The kernel clears the parent-death signal whenever a process changes its user or group ids,
//! which is why QEMU's own `-runas` is not used (that, and `-sandbox elevateprivileges=deny`
//! kills QEMU with `SIGSYS` at its `setgid`): an unprivileged QEMU ([`RunAs`]) gets its ids in
//! the child before `exec`, after entering the namespace, and the signal is set after that.
//!
//! A supervisor watching a pidfd was the alternative: it needs a process of its own that
//! outlives the owner, which is exactly what must not exist.
//!
//! Re-attaching to a QEMU from saved state within the same process keeps working: the parent
//! stays alive. No option lets QEMU outlive its owner.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};
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
    #[error("creating the output log {}", path.display())]
    Log {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Passing fds to the child failed.
    #[error("passing fds to the child")]
    Fds(#[source] netdev::Error),
    /// The launcher thread could not be started or has gone.
    #[error("handing the start to the launcher thread")]
    Launcher(#[source] std::io::Error),
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

/// The unprivileged identity QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups (`kvm`, say); all others are dropped.
    pub groups: Vec<u32>,
    /// Keep `CAP_SYS_CHROOT` (and only it) across `exec`, for QEMU's `-chroot`, which runs
    /// after QEMU started and needs the capability.
    pub chroot_capability: bool,
}

type Job = Box<dyn FnOnce() + Send>;

/// The queue of the thread that forks every QEMU; see the module docs.
fn launcher() -> Result<&'static Mutex<mpsc::Sender<Job>>, SpawnError> {
    static LAUNCHER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    if let Some(l) = LAUNCHER.get() {
        return Ok(l);
    }
    let (tx, rx) = mpsc::channel::<Job>();
    let started = std::thread::Builder::new()
        .name("qemu-launcher".into())
        .spawn(move || {
            for job in rx {
                job();
            }
        });
    match started {
        // A racing caller may have won: its thread serves, ours ends with its dropped queue.
        Ok(_) => Ok(LAUNCHER.get_or_init(|| Mutex::new(tx))),
        Err(e) => Err(SpawnError::Launcher(e)),
    }
}

/// Spawns `binary args`, with `fds` placed at their numbers in the child (and no other fd
/// inherited), inside `netns` when given, as `run_as` when given; stdout and stderr go to
/// `log` (created 0600) and the tail. QEMU is killed when this process dies.
pub async fn spawn(
    binary: &Path,
    args: &[String],
    fds: netdev::ChildFds,
    netns: Option<&Path>,
    log: &Path,
    run_as: Option<RunAs>,
) -> Result<QemuProcess, SpawnError> {
    let netns_file = netns
        .map(|p| {
            File::open(p).map_err(|source| SpawnError::Netns {
                path: p.to_path_buf(),
                source,
            })
        })
        .transpose()?;
    let log_file = create_private(log).map_err(|source| SpawnError::Log {
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
        // SAFETY: the closure runs in the forked child before exec and only calls
        // `netdev::netns::enter`, a bare setns(2) that does not allocate (async-signal-safe);
        // `netns_file` stays open in the parent until spawn returns, and this hook runs
        // before any other touches the child's fd table, so the fd number still names the
        // namespace file in the child while it is borrowed.
        unsafe {
            cmd.pre_exec(move || netdev::netns::enter(BorrowedFd::borrow_raw(ns_fd)));
        }
    }
    fds.apply_tokio(&mut cmd).map_err(SpawnError::Fds)?;
    // Identity last (setns needs CAP_SYS_ADMIN), then the parent-death signal, which an id
    // change would clear.
    if let Some(who) = run_as {
        // SAFETY: the closure runs in the forked child before exec and makes only raw system
        // calls (prctl, setgroups, setresgid, setresuid, capset); it does not allocate (the
        // group list was built before the fork).
        unsafe {
            cmd.pre_exec(move || drop_privileges(&who));
        }
    }
    let owner = std::process::id();
    // SAFETY: as above: prctl(2) and getppid(2) only, no allocation.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            if nix::unistd::getppid().as_raw() as u32 != owner {
                // The owner died before the signal was armed: never run orphaned.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }

    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _entered = handle.enter();
        let spawned = cmd.spawn();
        drop(netns_file);
        // If the caller went away (its start was cancelled), before or after this send,
        // the child is dropped in transit and killed: nobody would own this QEMU.
        let _ = tx.send(spawned.map(|c| InTransit(Some(c))));
    });
    let gone = || SpawnError::Launcher(std::io::Error::other("the launcher thread has ended"));
    launcher()?
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| gone())?;
    let mut child = rx
        .await
        .map_err(|_| gone())?
        .map_err(|source| SpawnError::Exec {
            binary: binary.to_path_buf(),
            source,
        })?
        .0
        .take()
        .expect("sent with the child");
    let pending = watch_child(&mut child, log_file);
    Ok(pending.with_child(child))
}

/// A spawned child on its way to `spawn`'s caller: killed if dropped before it arrives (the
/// caller's future was dropped meanwhile).
struct InTransit(Option<tokio::process::Child>);

impl Drop for InTransit {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.start_kill();
        }
    }
}

/// Creates (or truncates) `path` readable and writable by its owner only.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode through open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Linux capability number of `CAP_SYS_CHROOT`.
const CAP_SYS_CHROOT: u32 = 18;

/// Runs in the forked child: takes `who`'s ids and groups and, when
/// asked, keeps `CAP_SYS_CHROOT` alone as an ambient capability so it survives `exec`.
fn drop_privileges(who: &RunAs) -> std::io::Result<()> {
    use nix::unistd::{setresgid, setresuid, Gid, Uid};
    if who.chroot_capability {
        nix::sys::prctl::set_keepcaps(true)?;
    }
    // SAFETY: setgroups(2) reads `groups.len()` gids from a live slice (gid_t is u32).
    if unsafe { libc::setgroups(who.groups.len(), who.groups.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let gid = Gid::from_raw(who.gid);
    setresgid(gid, gid, gid)?;
    let uid = Uid::from_raw(who.uid);
    setresuid(uid, uid, uid)?;
    if who.chroot_capability {
        keep_only_chroot_capability()?;
    }
    Ok(())
}

/// Runs in the forked child, so it must not allocate: `capset(2)` is called directly on two
/// stack words. The `caps` crate would build `HashSet`s, and neither nix nor libc wraps
/// `capset`.
fn keep_only_chroot_capability() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let bit = 1u32 << CAP_SYS_CHROOT;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [
        Data {
            effective: bit,
            permitted: bit,
            inheritable: bit,
        },
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) reads a version-3 header and two data words that live on this stack
    // frame for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: prctl(2) with integer arguments only.
    let raised = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            libc::c_ulong::from(CAP_SYS_CHROOT),
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if raised != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
