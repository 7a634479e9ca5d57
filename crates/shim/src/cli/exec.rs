//! `sandbox exec`: a command run to its end in a container of a running sandbox.
//!
//! The client ([`run`]) makes a private directory with FIFOs for the container's stdout and
//! stderr (and stdin with `--interactive`), opens their read ends, and sends a
//! [`ControlRequest::Exec`] naming them on the sandbox's control socket. The `sandbox run`
//! serving it ([`begin`]) creates the container from a root filesystem directory (by default
//! the guest assets' `rootfs`, beside the configured kernel) with a minimal OCI spec made here
//! ([`minimal_spec`]), starts it, and copies its stdio to and from the FIFOs in a task of its
//! own, so that other requests (another exec, a signal, the facts) are served meanwhile; when
//! the container has exited, [`finish`] deletes it and answers with its exit. The client
//! prints what came through the FIFOs and exits with the container's status (the code, or
//! 128 plus the signal). A SIGINT or SIGTERM to the client is sent on to the container's init.
//! With `--join`, the command runs as one more process of another exec's running container
//! (which is left to that exec).

use std::fs::DirBuilder;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::sys::stat::Mode;
use oci_spec::runtime::{Process, Spec};
use slog::info;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use crate::facts::{ControlRequest, ControlResponse, ExecExit, ExecRequest};
use crate::sandbox::{copy_stdio, state_dir, Sandbox, StdioOptions, StdioPaths};

/// Terminal size of `--tty`.
const TTY_SIZE: (u16, u16) = (24, 80);

/// The container exited with a status other than 0: `sandbox exec` exits with it.
#[derive(Debug, thiserror::Error)]
#[error("the container exited with status {code}")]
pub struct ContainerExit {
    /// The status (1..=255).
    pub code: u8,
}

/// A running exec's end, handed back to the control loop.
#[derive(Debug)]
pub struct Finished {
    container_id: String,
    exec_id: Option<String>,
    reply: OwnedWriteHalf,
    outcome: Result<ExecExit>,
}

/// A minimal OCI spec running `args` (as root, the OCI defaults: PID, mount, UTS and IPC
/// namespaces, proc, sysfs, /dev, devpts, shm and mqueue mounts, default capabilities),
/// with hostname `hostname`.
pub fn minimal_spec(args: &[String], terminal: bool, hostname: &str) -> Result<String> {
    let mut process = Process::default();
    process.set_args(Some(args.to_vec()));
    process.set_terminal(Some(terminal));
    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_hostname(Some(hostname.to_string()));
    Ok(serde_json::to_string(&spec)?)
}

/// Serves an `Exec`: creates and starts the container (or runs the process in the existing
/// one), and runs the copy and the wait in a task of `running`. An error is the answer
/// (nothing is left of a container it created).
pub async fn begin(
    sb: &mut Sandbox,
    req: ExecRequest,
    reply: OwnedWriteHalf,
    running: &mut JoinSet<Finished>,
) -> Result<(), (OwnedWriteHalf, anyhow::Error)> {
    let stdio = StdioOptions {
        terminal: req.terminal.then_some(TTY_SIZE),
        stdin: req.stdin.is_some(),
    };
    let id = req.container_id.clone();
    let exec_id = req.exec_id.clone();
    let io = match &exec_id {
        Some(exec_id) => {
            let mut process = Process::default();
            process.set_args(Some(req.args.clone()));
            process.set_terminal(Some(req.terminal));
            match serde_json::to_value(&process) {
                Ok(process) => sb.exec_process(&id, exec_id, &process, stdio).await,
                Err(e) => Err(e.into()),
            }
        }
        None => create(sb, &req, stdio).await,
    };
    let io = match io {
        Ok(io) => io,
        Err(e) => return Err((reply, e)),
    };
    let copying = copy_stdio(
        io,
        StdioPaths {
            stdin: req.stdin.clone(),
            stdout: Some(req.stdout.clone()),
            stderr: req.stderr.clone(),
        },
    );
    let started = async {
        if exec_id.is_none() {
            let pid = sb.start_container(&id).await?;
            info!(sb.log(), "container started"; "container" => &id, "pid" => pid,
                "args" => req.args.join(" "));
        }
        sb.process(&id, exec_id.as_deref())
    }
    .await;
    let process = match started {
        Ok(process) => process,
        Err(e) => {
            copying.abort();
            if exec_id.is_none() {
                if let Err(undo) = sb.delete_container(&id).await {
                    return Err((reply, e.context(format!("{undo:#}"))));
                }
            }
            return Err((reply, e));
        }
    };
    running.spawn(async move {
        let outcome = async {
            let (stdout_bytes, stderr_bytes) = copying.await??;
            let exit = process.wait().await?;
            anyhow::Ok(ExecExit {
                container_id: id.clone(),
                exec_id: exec_id.clone(),
                exit_code: exit.exit_code,
                signal: exit.signal,
                stdout_bytes,
                stderr_bytes,
            })
        }
        .await;
        Finished {
            container_id: id,
            exec_id,
            reply,
            outcome,
        }
    });
    Ok(())
}

/// Creates the container of `req`, from its root filesystem or the sandbox's default.
async fn create(
    sb: &mut Sandbox,
    req: &ExecRequest,
    stdio: StdioOptions,
) -> Result<guest_agent::client::ProcessStdio> {
    let Some(rootfs) = req.rootfs.clone().or_else(|| sb.default_rootfs()) else {
        bail!("no root filesystem given and the configuration has no kernel");
    };
    let spec = minimal_spec(&req.args, req.terminal, &req.container_id)?;
    sb.create_container(&req.container_id, &rootfs, &[], &spec, stdio)
        .await
}

/// Deletes the container of a finished exec (not the one a process joined) and answers its
/// client.
pub async fn finish(sb: &mut Sandbox, done: Finished) -> Result<()> {
    let Finished {
        container_id,
        exec_id,
        mut reply,
        outcome,
    } = done;
    // A process run in another exec's container leaves it to that exec.
    let deleted = match exec_id {
        Some(_) => Ok(()),
        None => sb.delete_container(&container_id).await,
    };
    let response = match (outcome, deleted) {
        (Ok(exit), Ok(())) => {
            info!(sb.log(), "container exited"; "container" => &container_id,
                "exit_code" => exit.exit_code, "signal" => exit.signal);
            ControlResponse::Exited(exit)
        }
        (Err(e), _) | (Ok(_), Err(e)) => ControlResponse::Error(format!("{e:#}")),
    };
    let mut line = serde_json::to_string(&response)?;
    line.push('\n');
    // The client may be gone (interrupted): its container is deleted all the same.
    let _ = reply.write_all(line.as_bytes()).await;
    Ok(())
}

/// Options of `sandbox exec`.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Parent of the run directories.
    pub run_root: PathBuf,
    /// Sandbox id.
    pub id: String,
    /// Container id; `None`: `exec-PID`.
    pub container_id: Option<String>,
    /// Root filesystem directory; `None`: the sandbox's default.
    pub rootfs: Option<PathBuf>,
    /// Run in the running container `container_id` (another exec's) instead of a new one.
    pub join: bool,
    /// Give the process a terminal.
    pub tty: bool,
    /// Copy our stdin into the process.
    pub interactive: bool,
    /// The command.
    pub args: Vec<String>,
}

/// Removes the FIFO directory when dropped.
struct FifoDir(PathBuf);

impl Drop for FifoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sandbox exec`: see the module docs. Returns [`ContainerExit`] for a status other than 0.
pub async fn run(opts: ExecOptions) -> Result<()> {
    if opts.args.is_empty() {
        bail!("sandbox exec needs a command after --");
    }
    let container_id = match (&opts.container_id, opts.join) {
        (Some(c), _) => c.clone(),
        (None, false) => format!("exec-{}", std::process::id()),
        (None, true) => bail!("--join needs --container"),
    };
    let exec_id = opts.join.then(|| format!("exec-{}", std::process::id()));
    let rootfs = match &opts.rootfs {
        Some(r) => Some(
            std::fs::canonicalize(r).with_context(|| format!("Root filesystem {}", r.display()))?,
        ),
        None => None,
    };
    let dir = FifoDir(std::env::temp_dir().join(format!(
        "containerd-shim-kata-v2-exec-{}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&dir.0);
    DirBuilder::new()
        .mode(0o700)
        .create(&dir.0)
        .with_context(|| format!("Creating {}", dir.0.display()))?;
    let fifo = |name: &str| -> Result<PathBuf> {
        let p = dir.0.join(name);
        nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o600))
            .with_context(|| format!("Creating FIFO {}", p.display()))?;
        Ok(p)
    };
    let stdout = fifo("stdout")?;
    let stderr = (!opts.tty).then(|| fifo("stderr")).transpose()?;
    let stdin = opts.interactive.then(|| fifo("stdin")).transpose()?;

    // Blocking opens (each returns once the sandbox opens the other end), on threads.
    let out_copy = copy_out(stdout.clone(), false);
    let err_copy = stderr.clone().map(|p| copy_out(p, true));
    let in_copy = stdin.clone().map(|p| {
        std::thread::spawn(move || {
            if let Ok(mut w) = std::fs::OpenOptions::new().write(true).open(&p) {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut w);
            }
        })
    });

    let req = ExecRequest {
        container_id: container_id.clone(),
        exec_id,
        rootfs,
        args: opts.args.clone(),
        terminal: opts.tty,
        stdin: stdin.clone(),
        stdout: stdout.clone(),
        stderr: stderr.clone(),
    };
    let answer = exchange(&opts, ControlRequest::Exec(Box::new(req)), &container_id).await;
    // Whatever happened, the FIFOs' readers must end: a writer opened and closed here
    // unblocks one the sandbox never opened (again, until the reader has opened it).
    let mut readers = vec![(stdout.clone(), out_copy)];
    readers.extend(stderr.clone().zip(err_copy));
    for (path, reader) in readers {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !reader.is_finished() && std::time::Instant::now() < deadline {
            drop(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path),
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = reader.join();
    }
    // A stdin copy blocked on our terminal is left to the process's exit.
    drop(in_copy);
    let exit = match answer? {
        ControlResponse::Exited(exit) => exit,
        other => bail!("unexpected answer: {other:?}"),
    };
    match u8::try_from(exit.status()) {
        Ok(0) => Ok(()),
        Ok(code) => Err(ContainerExit { code }.into()),
        Err(_) => Err(ContainerExit { code: 255 }.into()),
    }
}

/// Copies the FIFO at `path` to our stdout (or stderr) on a thread, until its writer closes.
fn copy_out(path: PathBuf, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut r) = std::fs::File::open(&path) else {
            return;
        };
        let _ = if to_stderr {
            let mut e = std::io::stderr().lock();
            std::io::copy(&mut r, &mut e).and_then(|_| e.flush())
        } else {
            let mut o = std::io::stdout().lock();
            std::io::copy(&mut r, &mut o).and_then(|_| o.flush())
        };
    })
}

/// Sends `req` and waits (without limit: the container runs until it ends) for the answer;
/// SIGINT and SIGTERM meanwhile are sent on to the container.
async fn exchange(
    opts: &ExecOptions,
    req: ControlRequest,
    container_id: &str,
) -> Result<ControlResponse> {
    let path = control_path(&opts.run_root, &opts.id);
    let stream = connect(&path, &opts.id).await?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(&req)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    let mut term = signal(SignalKind::terminate()).context("Handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("Handling SIGINT")?;
    let mut reader = BufReader::new(r);
    let mut answer = String::new();
    let read = reader.read_line(&mut answer);
    tokio::pin!(read);
    loop {
        let sig = tokio::select! {
            done = &mut read => { done.context("Reading the sandbox's answer")?; break; }
            _ = term.recv() => libc_signal::TERM,
            _ = int.recv() => libc_signal::INT,
        };
        let forward = ControlRequest::Signal {
            container_id: container_id.to_string(),
            signal: sig,
        };
        if let Err(e) = super::control::request(&opts.run_root, &opts.id, forward).await {
            eprintln!(
                "containerd-shim-kata-v2: sending signal {sig} to container {container_id}: {e:#}"
            );
        }
    }
    if answer.is_empty() {
        bail!("the sandbox closed the connection without answering (it is stopping or died)");
    }
    match serde_json::from_str(&answer).context("Reading the sandbox's answer")? {
        ControlResponse::Error(e) => bail!("the sandbox refused: {e}"),
        ok => Ok(ok),
    }
}

/// Signal numbers forwarded to the container.
mod libc_signal {
    pub const INT: i32 = nix::sys::signal::Signal::SIGINT as i32;
    pub const TERM: i32 = nix::sys::signal::Signal::SIGTERM as i32;
}

/// The control socket of sandbox `id`.
fn control_path(run_root: &Path, id: &str) -> PathBuf {
    state_dir(run_root, id).join("control.sock")
}

async fn connect(path: &Path, id: &str) -> Result<UnixStream> {
    UnixStream::connect(path).await.with_context(|| {
        format!(
            "Connecting to {} (is `sandbox run --id {id}` running with the same --run-root?)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec is what the agent's strict parser takes: it round-trips through oci-spec
    /// and carries the command, the terminal flag and the hostname.
    #[test]
    fn the_minimal_spec_runs_the_command() {
        let args = vec!["sh".to_string(), "-c".to_string(), "echo hi".to_string()];
        let text = minimal_spec(&args, true, "c1").unwrap();
        let spec: Spec = serde_json::from_str(&text).unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_ref().unwrap(), &args);
        assert_eq!(process.terminal(), Some(true));
        assert_eq!(spec.hostname().as_deref(), Some("c1"));
        let namespaces: Vec<String> = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| format!("{:?}", n.typ()))
            .collect();
        for ns in ["Pid", "Mount", "Uts", "Ipc"] {
            assert!(namespaces.iter().any(|n| n == ns), "{ns} in {namespaces:?}");
        }
    }
}
