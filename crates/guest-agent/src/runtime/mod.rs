//! Guest-side container runtime: OCI runtime specs run as containers in namespaces.
//!
//! Synchronous (threads, no async runtime), Linux only, run as root. One [`Runtime`] per agent
//! owns its containers and a reaper thread.
//!
//! ```text
//! Runtime::new() -> Result<Runtime>
//! create(id, rootfs: &Path, spec: &Spec, stdio: Stdio) -> Result<ProcessIo>   // blocked until start
//! start(id) -> Result<u32>                                  // host pid of the init
//! exec(id, exec_id, process: &Process, stdio: Stdio) -> Result<ProcessIo>     // started at once
//! signal(id, exec_id: Option<&str>, signal: i32, all: bool) -> Result<()>
//! wait(id, exec_id: Option<&str>) -> Result<ExitStatus>     // several waiters; after exit too
//! ps(id) -> Result<Vec<ProcessInfo>>
//! resize(id, exec_id: Option<&str>, rows, cols) -> Result<()>
//! delete(id) -> Result<()>                                  // kills, reaps, forgets
//! list() -> Vec<String>
//! ```
//! `exec_id` `None` is the container's init. Closing a process's stdin is dropping
//! [`ProcessIo::stdin`].
//!
//! # How a container is made
//! `create` clones the init with new mount, PID, UTS and IPC namespaces (`CLONE_PIDFD` gives
//! the runtime a pidfd at once). The child makes its mounts private, bind-mounts the rootfs onto
//! itself, mounts the spec's mounts under it (cgroup mounts skipped; on a `/dev` tmpfs the
//! standard devices null, zero, full, random, urandom, tty, made with `mknod` or bind-mounted
//! from the agent's `/dev`, and the fd, stdio and ptmx links), creates `linux.devices`,
//! `pivot_root`s into it and detaches the old root (an initramfs root cannot be pivoted: the new
//! root is moved onto `/` and chrooted instead), writes `linux.sysctl`, applies
//! `linux.readonlyPaths` and `linux.maskedPaths`, sets the hostname, and with a terminal opens
//! the container's `/dev/ptmx` (a pty of the container's own devpts instance, so `tty` names one
//! of its `/dev/pts/N`), sizes and unlocks it, opens the slave (`TIOCGPTPEER`) as stdio and
//! controlling terminal, and sends the master to the runtime over a socketpair made before the
//! clone (`SCM_RIGHTS`, as runc's console socket). It sets the rlimits, working directory,
//! no_new_privileges, capabilities, groups, gid and uid, and finds the executable on `PATH`. It
//! then writes "ready" to a close-on-exec status pipe and blocks reading the start pipe; `start`
//! writes a byte and reads the status pipe to end-of-file, which means `execve` succeeded.
//! A failing step writes its index and errno instead and exits; [`Error::Setup`] names the step
//! and [`Error::ExecutableNotFound`] the missing program. Everything before `execve` is prepared
//! by the parent, so the child (of a multi-threaded agent) only makes async-signal-safe calls,
//! and credentials, rlimits and capabilities are set with raw system calls (libc wrappers would
//! try to synchronise with the parent's threads, which the child does not have).
//!
//! The rootfs argument is the root; the spec's `root.path` is not read. The [`Stdio`] argument,
//! not `process.terminal`, chooses pipes or a terminal. Not applied: cgroups (`linux.resources`),
//! seccomp, AppArmor and SELinux labels, user and network namespaces (containers share the
//! guest's network, as in a Kata pod), hooks, `oomScoreAdj`, I/O priority and scheduler.
//!
//! `exec` clones a child that joins the init's namespaces through its pidfd
//! (`setns(pidfd, NEWNS|NEWPID|NEWUTS|NEWIPC)`) and forks with `CLONE_PARENT`, so the process in
//! the container's PID namespace is the agent's own child; the intermediate reports its pid and
//! exits. A terminal is allocated as the init's is, in the joined mount namespace. Each process is held by a pidfd, so signals (`pidfd_send_signal`) never reach a
//! recycled pid.
//!
//! # Reaping
//! See the reaper module: one thread waits on the pidfds of the runtime's processes only, and
//! reaps each with `waitid(P_PIDFD)`. It never waits for other children, so the agent's
//! `std::process::Command` users keep working; no subreaper is set (container orphans stay in
//! their PID namespace). The agent must not be the global init (PID 1): `CLONE_PARENT` is
//! refused there. Nor may it set `SIGCHLD` to `SIG_IGN`, which would let the kernel reap the
//! runtime's processes before their status is read.
//!
//! Nothing is mounted in the agent's mount namespace: all mounts live in the container's, and go
//! with its last process. A failed `create` or `exec` kills and reaps what it cloned.

mod caps;
mod child;
mod error;
mod io;
mod mounts;
mod plan;
mod procfs;
mod reaper;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::unistd::pipe2;
use oci_spec::runtime::{Process, Spec};

pub use error::Error;

use child::{ExecArrays, Plan, FORKED, READY};
use io::StdioPair;
use reaper::{lock, pidfd_open, Proc, Reaper};

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a process's stdio is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// Three pipes; without `stdin` the process reads an empty, closed pipe.
    Pipes {
        /// Whether the caller gets a write end for the process's stdin.
        stdin: bool,
    },
    /// A new pty of this size, allocated inside the container (its `/dev/ptmx`, so the slave is
    /// one of the container's `/dev/pts/N`); the process gets the slave as stdin, stdout, stderr
    /// and controlling terminal.
    Terminal {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
}

/// The agent's ends of a process's stdio.
///
/// With a terminal, `stdout` is the pty master (read and write), `stdin` a dup of it, `stderr`
/// `None`. With pipes, `stdin` is `None` unless asked for; dropping it closes the process's stdin.
#[derive(Debug)]
pub struct ProcessIo {
    /// Write end of the process's stdin.
    pub stdin: Option<OwnedFd>,
    /// Read end of its stdout (the pty master with a terminal).
    pub stdout: Option<OwnedFd>,
    /// Read end of its stderr.
    pub stderr: Option<OwnedFd>,
    /// Host pid of the process.
    pub pid: u32,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// When the runtime reaped it, in milliseconds since the Unix epoch.
    pub exited_at_ms: u64,
}

/// One process of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its pid in the container's PID namespace.
    pub pid: u32,
    /// Its pid in the agent's PID namespace.
    pub host_pid: u32,
    /// Its command line, arguments joined by spaces.
    pub cmd: String,
}

/// Handles of a created container until `start`.
#[derive(Debug)]
struct Pending {
    start: OwnedFd,
    status: OwnedFd,
    names: Vec<String>,
    arg0: String,
}

#[derive(Debug)]
struct Container {
    init: Arc<Proc>,
    pid_ns: procfs::NsId,
    pending: Mutex<Option<Pending>>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

#[derive(Debug, Default)]
struct Table {
    containers: HashMap<String, Arc<Container>>,
    /// Ids being created, so two creates of one id cannot race.
    reserved: HashSet<String>,
}

/// The container runtime of one agent.
#[derive(Debug)]
pub struct Runtime {
    table: Mutex<Table>,
    reaper: Reaper,
}

const NAMESPACES: libc::c_int =
    libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;

/// Reads one status record, or `None` at end-of-file.
fn read_record(fd: &OwnedFd) -> std::result::Result<Option<(u32, i32)>, Errno> {
    let mut record = [0u8; 8];
    let mut filled = 0;
    while filled < record.len() {
        match nix::unistd::read(fd, &mut record[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => filled += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(child::decode(record)))
}

/// The error for a failed step `code` of a plan.
fn step_error(id: &str, names: &[String], arg0: &str, code: u32, errno: i32) -> Error {
    let errno = Errno::from_raw(errno);
    let step = names.get(code as usize).cloned().unwrap_or_default();
    let exec_step = code as usize + 1 == names.len();
    if errno == Errno::ENOENT && (exec_step || step.starts_with("Finding the executable")) {
        return Error::ExecutableNotFound {
            id: id.to_string(),
            name: arg0.to_string(),
        };
    }
    Error::Setup {
        id: id.to_string(),
        step,
        source: errno,
    }
}

fn arg0(process: &Process) -> String {
    process
        .args()
        .as_deref()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_default()
}

fn sys<'a>(id: &'a str, step: &'static str) -> impl FnOnce(Errno) -> Error + 'a {
    move |source| Error::Sys {
        id: id.to_string(),
        step,
        source,
    }
}

/// Kills and reaps a process whose setup failed, returning `error`.
fn kill_and_fail<T>(proc: &Proc, error: Error) -> Result<T> {
    let _ = proc.signal(Signal::SIGKILL as i32);
    proc.reap_now();
    Err(error)
}

/// Clones a child that runs `plan`, returning its pid and pidfd. The child gets `status` (write
/// end) and `start` (read end, or -1).
fn spawn(
    id: &str,
    plan: &Plan,
    flags: libc::c_int,
    status: &OwnedFd,
    start: Option<&OwnedFd>,
) -> Result<(u32, OwnedFd)> {
    let arrays = ExecArrays::new(plan);
    let start = start.map_or(-1, |fd| fd.as_raw_fd());
    let mut pidfd: libc::c_int = -1;
    // SAFETY: the child only runs `child::run`, which makes async-signal-safe calls on data
    // prepared here (`plan`, `arrays`) and ends in execve or _exit.
    let pid = unsafe { child::clone(flags as u64, Some(&mut pidfd)) }
        .map_err(sys(id, "Cloning a process"))?;
    if pid == 0 {
        // SAFETY: this is the child just cloned; `status` and `start` are its inherited fds.
        unsafe { child::run(plan, &arrays, status.as_raw_fd(), start) }
    }
    // SAFETY: CLONE_PIDFD stored a new fd that nothing else owns.
    Ok((pid as u32, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

impl Runtime {
    /// Starts the reaper thread.
    pub fn new() -> Result<Runtime> {
        Ok(Runtime {
            table: Mutex::new(Table::default()),
            reaper: Reaper::start().map_err(Error::Reaper)?,
        })
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.table)
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownContainer(id.to_string()))
    }

    fn process(&self, id: &str, exec_id: Option<&str>) -> Result<Arc<Proc>> {
        let container = self.container(id)?;
        match exec_id {
            None => Ok(container.init.clone()),
            Some(exec_id) => {
                lock(&container.execs)
                    .get(exec_id)
                    .cloned()
                    .ok_or_else(|| Error::UnknownProcess {
                        id: id.to_string(),
                        exec_id: exec_id.to_string(),
                    })
            }
        }
    }

    /// Creates container `id` with root `rootfs`; its init is blocked until [`Runtime::start`].
    pub fn create(&self, id: &str, rootfs: &Path, spec: &Spec, stdio: Stdio) -> Result<ProcessIo> {
        {
            let mut table = lock(&self.table);
            if table.containers.contains_key(id) || !table.reserved.insert(id.to_string()) {
                return Err(Error::ContainerExists(id.to_string()));
            }
        }
        let result = self.create_reserved(id, rootfs, spec, stdio);
        let mut table = lock(&self.table);
        table.reserved.remove(id);
        let (container, io) = result?;
        table.containers.insert(id.to_string(), container);
        Ok(io)
    }

    fn create_reserved(
        &self,
        id: &str,
        rootfs: &Path,
        spec: &Spec,
        stdio: Stdio,
    ) -> Result<(Arc<Container>, ProcessIo)> {
        if id.is_empty() || id.contains('/') {
            return Err(Error::InvalidSpec {
                id: id.to_string(),
                reason: "the id is empty or contains '/'".to_string(),
            });
        }
        let missing = |source| Error::RootfsMissing {
            id: id.to_string(),
            path: rootfs.to_path_buf(),
            source,
        };
        let root = rootfs.canonicalize().map_err(missing)?;
        if !root.is_dir() {
            return Err(missing(std::io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let mut pair = StdioPair::new(id, &stdio)?;
        let plan = plan::init_plan(id, &root, spec, pair.child())?;
        let (status_r, status_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys(id, "Creating a pipe"))?;
        let (start_r, start_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys(id, "Creating a pipe"))?;
        let (pid, pidfd) = spawn(id, &plan, NAMESPACES, &status_w, Some(&start_r))?;
        drop((status_w, start_r));
        pair.close_child_ends();
        let mut init = Proc::new(pid, pidfd, None);
        let arg0 = spec.process().as_ref().map(arg0).unwrap_or_default();
        match read_record(&status_r) {
            Ok(Some((READY, _))) => {}
            Ok(Some((code, errno))) => {
                return kill_and_fail(&init, step_error(id, &plan.names, &arg0, code, errno))
            }
            Ok(None) => {
                return kill_and_fail(
                    &init,
                    Error::ProcessDied {
                        id: id.to_string(),
                        phase: "setup",
                    },
                )
            }
            Err(e) => return kill_and_fail(&init, sys(id, "Reading the init's status")(e)),
        }
        match pair.receive_terminal(id) {
            Ok(tty) => init.tty = tty,
            Err(e) => return kill_and_fail(&init, e),
        }
        let pid_ns = match procfs::pid_ns(pid) {
            Ok(ns) => ns,
            Err(e) => {
                return kill_and_fail(
                    &init,
                    Error::Proc {
                        id: id.to_string(),
                        source: e,
                    },
                )
            }
        };
        let init = Arc::new(init);
        self.reaper.watch(init.clone());
        let container = Arc::new(Container {
            init,
            pid_ns,
            pending: Mutex::new(Some(Pending {
                start: start_w,
                status: status_r,
                names: plan.names,
                arg0,
            })),
            execs: Mutex::new(HashMap::new()),
        });
        pair.io.pid = pid;
        Ok((container, pair.io))
    }

    /// Lets the init of a created container run its program. Returns the init's host pid.
    pub fn start(&self, id: &str) -> Result<u32> {
        let container = self.container(id)?;
        let Some(pending) = lock(&container.pending).take() else {
            return Err(Error::InvalidState {
                id: id.to_string(),
                state: "is already started",
                action: "start",
            });
        };
        let died = || Error::ProcessDied {
            id: id.to_string(),
            phase: "start",
        };
        match nix::unistd::write(&pending.start, &[1]) {
            Ok(1) => {}
            Ok(_) | Err(Errno::EPIPE) => return Err(died()),
            Err(e) => return Err(sys(id, "Starting the init")(e)),
        }
        drop(pending.start);
        match read_record(&pending.status) {
            Ok(None) => Ok(container.init.pid),
            // The init exits after reporting; the reaper collects it.
            Ok(Some((code, errno))) => {
                Err(step_error(id, &pending.names, &pending.arg0, code, errno))
            }
            Err(e) => Err(sys(id, "Reading the init's status")(e)),
        }
    }

    /// Runs `process` in the running container `id` as `exec_id`, started at once.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &Process,
        stdio: Stdio,
    ) -> Result<ProcessIo> {
        let container = self.container(id)?;
        if lock(&container.pending).is_some() {
            return Err(Error::InvalidState {
                id: id.to_string(),
                state: "is not started",
                action: "exec",
            });
        }
        if container.init.exit_status().is_some() {
            return Err(Error::InvalidState {
                id: id.to_string(),
                state: "has exited",
                action: "exec",
            });
        }
        // Held throughout, so two execs of one id cannot race.
        let mut execs = lock(&container.execs);
        if execs.contains_key(exec_id) {
            return Err(Error::ProcessExists {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            });
        }
        let mut pair = StdioPair::new(id, &stdio)?;
        let plan = plan::exec_plan(
            id,
            container.init.pidfd().as_raw_fd(),
            process,
            pair.child(),
        )?;
        let arg0 = arg0(process);
        let (status_r, status_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys(id, "Creating a pipe"))?;
        let (pid, pidfd) = spawn(id, &plan, 0, &status_w, None)?;
        drop(status_w);
        pair.close_child_ends();
        let intermediate = Proc::new(pid, pidfd, None);
        let first = read_record(&status_r);
        intermediate.reap_now();
        let pid = match first {
            Ok(Some((FORKED, pid))) => pid as u32,
            Ok(Some((code, errno))) => return Err(step_error(id, &plan.names, &arg0, code, errno)),
            Ok(None) => {
                return Err(Error::ProcessDied {
                    id: id.to_string(),
                    phase: "setup",
                })
            }
            Err(e) => return Err(sys(id, "Reading the process's status")(e)),
        };
        // The process is our child (CLONE_PARENT) and only we reap it: the pid is still its.
        let pidfd = match pidfd_open(pid) {
            Ok(pidfd) => pidfd,
            Err(e) => {
                let target = nix::unistd::Pid::from_raw(pid as i32);
                let _ = nix::sys::signal::kill(target, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(target, None);
                return Err(sys(id, "Opening a pidfd")(e));
            }
        };
        let mut proc = Proc::new(pid, pidfd, None);
        match read_record(&status_r) {
            Ok(None) => {}
            Ok(Some((code, errno))) => {
                return kill_and_fail(&proc, step_error(id, &plan.names, &arg0, code, errno))
            }
            Err(e) => return kill_and_fail(&proc, sys(id, "Reading the process's status")(e)),
        }
        match pair.receive_terminal(id) {
            Ok(tty) => proc.tty = tty,
            Err(e) => return kill_and_fail(&proc, e),
        }
        let proc = Arc::new(proc);
        self.reaper.watch(proc.clone());
        execs.insert(exec_id.to_string(), proc);
        pair.io.pid = pid;
        Ok(pair.io)
    }

    /// Sends `signal` to the init (`exec_id` `None`), an exec'd process, or with `all` to every
    /// process of the container. A process that already exited is not an error.
    pub fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32, all: bool) -> Result<()> {
        if all {
            let container = self.container(id)?;
            let pids = procfs::pids_in(container.pid_ns).map_err(|source| Error::Proc {
                id: id.to_string(),
                source,
            })?;
            for pid in pids {
                // SAFETY: kill with a pid and a signal number touches no memory.
                if unsafe { libc::kill(pid as libc::pid_t, signal) } < 0 {
                    match Errno::last() {
                        Errno::ESRCH => {}
                        e => return Err(sys(id, "Signalling a process")(e)),
                    }
                }
            }
            return Ok(());
        }
        self.process(id, exec_id)?
            .signal(signal)
            .map_err(sys(id, "Signalling a process"))
    }

    /// Blocks until the process exits; returns at once if it has.
    pub fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitStatus> {
        Ok(self.process(id, exec_id)?.wait())
    }

    /// The container's processes (none once its init has exited).
    pub fn ps(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        let container = self.container(id)?;
        procfs::processes_in(container.pid_ns).map_err(|source| Error::Proc {
            id: id.to_string(),
            source,
        })
    }

    /// Sets the terminal size of a process that has a terminal.
    pub fn resize(&self, id: &str, exec_id: Option<&str>, rows: u16, cols: u16) -> Result<()> {
        let proc = self.process(id, exec_id)?;
        let Some(tty) = proc.tty.as_ref() else {
            return Err(Error::NoTerminal {
                id: id.to_string(),
                process: exec_id.map_or("init".to_string(), |e| format!("\"{e}\"")),
            });
        };
        io::set_winsize(tty, rows, cols).map_err(sys(id, "Resizing the terminal"))
    }

    /// Kills what is left of the container, reaps it and forgets it.
    pub fn delete(&self, id: &str) -> Result<()> {
        let container = self.container(id)?;
        // Before start, closing the start pipe ends the init too.
        drop(lock(&container.pending).take());
        // SIGKILL of a PID namespace's init kills every process in it, exec'd ones included.
        container
            .init
            .signal(Signal::SIGKILL as i32)
            .map_err(sys(id, "Killing the init"))?;
        container.init.wait();
        let execs: Vec<Arc<Proc>> = lock(&container.execs).values().cloned().collect();
        for proc in execs {
            proc.wait();
        }
        lock(&self.table).containers.remove(id);
        Ok(())
    }

    /// Ids of the containers.
    pub fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.table).containers.keys().cloned().collect();
        ids.sort();
        ids
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for id in self.list() {
            let _ = self.delete(&id);
        }
    }
}
