//! The ttrpc task service (`containerd.task.v2.Task`) over one sandbox VM.
//!
//! The first container created boots the sandbox (a pod's sandbox container, or a plain
//! container with a VM of its own); the pod's other containers join it. Each container's root
//! filesystem is mounted on `<bundle>/rootfs` from containerd's mounts and bound into the
//! sandbox's share; the guest agent creates and runs the container there. Each process's
//! stdio is copied between containerd's FIFOs and the agent's streams; a waiter task per
//! process records its exit (once its output is drained) and publishes `TaskExit`.
//! `Shutdown` with no container left tears the sandbox down and ends the daemon.
//!
//! The state lock is held across agent calls (they are quick) and across the sandbox's boot
//! (requests meanwhile wait for it), never across a `Wait`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context};
use async_trait::async_trait;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ProcessInfo, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use slog::{error, info, warn};
use tokio::sync::{Mutex, Notify};

use super::bundle::{self, Kind};
use super::config;
use super::events::{timestamp, Event, Publisher};
use super::process::{Container, Exit, Io, Process, UNKNOWN_EXIT};
use crate::net::Subnet24;
use crate::sandbox::{
    self, copy_stdio, ProcessHandle, Sandbox, SandboxOptions, StdioOptions, GUEST_SHARE_DIR,
};

/// Terminal size until containerd sends the real one (ResizePty).
const TTY_SIZE: (u16, u16) = (24, 80);
/// How long a process's output may take to drain after it exited (a background child may
/// hold it open).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// Limits of the sandbox's boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);
/// First /24 of a plain container's own namespace.
const SUBNET: &str = "10.200.0.0/24";

/// An error as containerd reads it: the ttrpc code says what kind (containerd turns
/// NOT_FOUND into errdefs.ErrNotFound...), the message says what went wrong.
#[derive(Debug)]
enum TaskError {
    NotFound(String),
    AlreadyExists(String),
    Precondition(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for TaskError {
    fn from(e: anyhow::Error) -> Self {
        TaskError::Other(e)
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        let (code, msg) = match e {
            TaskError::NotFound(m) => (ttrpc::Code::NOT_FOUND, m),
            TaskError::AlreadyExists(m) => (ttrpc::Code::ALREADY_EXISTS, m),
            TaskError::Precondition(m) => (ttrpc::Code::FAILED_PRECONDITION, m),
            TaskError::Other(e) => (ttrpc::Code::UNKNOWN, format!("{e:#}")),
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
    }
}

type TaskResult<T> = std::result::Result<T, TaskError>;

/// The sandbox and its containers.
#[derive(Default)]
struct State {
    sandbox: Option<Sandbox>,
    containers: BTreeMap<String, Container>,
    /// The VM is paused.
    paused: bool,
}

impl State {
    fn container(&mut self, id: &str) -> TaskResult<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| TaskError::NotFound(format!("container {id} not found")))
    }

    fn process(&mut self, id: &str, exec_id: &str) -> TaskResult<&mut Process> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            return Ok(&mut c.init);
        }
        c.execs.get_mut(exec_id).ok_or_else(|| {
            TaskError::NotFound(format!("process {exec_id} of container {id} not found"))
        })
    }

    fn sandbox(&mut self) -> TaskResult<&mut Sandbox> {
        self.sandbox
            .as_mut()
            .ok_or_else(|| TaskError::Precondition("the sandbox is not running".to_string()))
    }
}

/// The task service of one shim daemon.
pub struct Service {
    log: slog::Logger,
    run_root: PathBuf,
    events: Publisher,
    state: Mutex<State>,
    done: Arc<Notify>,
}

impl Service {
    /// A service with no sandbox yet; `done` is notified once it has shut down.
    pub fn new(log: slog::Logger, run_root: PathBuf, events: Publisher, done: Arc<Notify>) -> Self {
        Service {
            log,
            run_root,
            events,
            state: Mutex::new(State::default()),
            done,
        }
    }

    /// Deletes every container and tears the sandbox down (SIGTERM, or the last Shutdown).
    pub async fn teardown(&self) {
        let mut state = self.state.lock().await;
        let bundles: Vec<(PathBuf, bool)> = state
            .containers
            .values()
            .map(|c| (c.bundle.clone(), c.rootfs_mounted))
            .collect();
        state.containers.clear();
        if let Some(mut sb) = state.sandbox.take() {
            if let Err(e) = sb.teardown().await {
                error!(self.log, "tearing the sandbox down"; "error" => format!("{e:#}"));
            }
        }
        for (bundle, mounted) in bundles {
            if mounted {
                if let Err(e) = bundle::unmount_rootfs(&bundle) {
                    warn!(self.log, "unmounting a root filesystem"; "error" => format!("{e:#}"));
                }
            }
        }
    }

    /// The sandbox for the first container: booted, with the guest ready.
    async fn boot(
        &self,
        req: &CreateTaskRequest,
        spec: &serde_json::Value,
    ) -> anyhow::Result<Sandbox> {
        let began = Instant::now();
        let file = config::find(req.options.as_ref())?;
        let cfg = crate::config::load(&file)
            .with_context(|| format!("Loading the configuration {}", file.display()))?;
        for w in &cfg.warnings {
            warn!(self.log, "configuration key ignored"; "file" => w.file.display().to_string(),
                "line" => w.line, "key" => &w.key, "reason" => &w.reason);
        }
        sandbox::refuse_existing(&self.run_root, &req.id)?;
        let mut sb = Sandbox::new(
            &self.log,
            &cfg,
            SandboxOptions {
                id: req.id.clone(),
                netns: bundle::netns_path(spec),
                subnet: Subnet24::parse(SUBNET)?,
                run_root: self.run_root.clone(),
                boot_timeout: BOOT_TIMEOUT,
                agent_timeout: AGENT_TIMEOUT,
                began,
            },
        )?;
        let up = async {
            sb.prepare().await?;
            sb.boot().await?;
            let watch = sb.exit_watch();
            watch.guard(sb.wait_ready()).await
        }
        .await;
        if let Err(e) = up {
            if let Err(t) = sb.teardown().await {
                warn!(self.log, "tearing down a sandbox that failed to start"; "error" => format!("{t:#}"));
            }
            return Err(e);
        }
        info!(self.log, "sandbox ready"; "sandbox" => &req.id, "ms" => began.elapsed().as_millis() as u64);
        Ok(sb)
    }

    async fn create_task(&self, req: CreateTaskRequest) -> TaskResult<CreateTaskResponse> {
        let id = req.id.clone();
        let bundle_dir = PathBuf::from(&req.bundle);
        let spec = bundle::read_spec(&bundle_dir)?;
        let mut state = self.state.lock().await;
        if state.containers.contains_key(&id) {
            return Err(TaskError::AlreadyExists(format!("container {id} exists")));
        }
        let booted_here = state.sandbox.is_none();
        if booted_here {
            if let Kind::Member { sandbox_id } = bundle::kind(&spec) {
                return Err(TaskError::Precondition(format!(
                    "container {id} belongs to pod sandbox {sandbox_id}, which this shim does not run"
                )));
            }
            let sb = self.boot(&req, &spec).await?;
            state.sandbox = Some(sb);
        }
        let io = Io {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let made = self
            .create_container(state.sandbox()?, &req, &bundle_dir, &spec, &io)
            .await;
        let (container, pid) = match made {
            Ok(c) => c,
            Err(e) => {
                if booted_here && state.containers.is_empty() {
                    if let Some(mut sb) = state.sandbox.take() {
                        if let Err(t) = sb.teardown().await {
                            warn!(self.log, "tearing down after a failed create"; "error" => format!("{t:#}"));
                        }
                    }
                }
                return Err(e.into());
            }
        };
        state.containers.insert(id.clone(), container);
        self.events.publish(Event::Create(TaskCreate {
            container_id: id,
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: io.stdin,
                stdout: io.stdout,
                stderr: io.stderr,
                terminal: io.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        }));
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn create_container(
        &self,
        sb: &mut Sandbox,
        req: &CreateTaskRequest,
        bundle_dir: &Path,
        spec: &serde_json::Value,
        io: &Io,
    ) -> anyhow::Result<(Container, u32)> {
        let (rootfs, mounted) = bundle::mount_rootfs(bundle_dir, spec, &req.rootfs)?;
        let made = async {
            let guest_dir = format!("{GUEST_SHARE_DIR}/{}", req.id);
            let (spec_json, extra) = bundle::guest_spec(spec, &guest_dir)?;
            let stdio = StdioOptions {
                terminal: io.terminal.then_some(TTY_SIZE),
                stdin: !io.stdin.is_empty(),
            };
            sb.create_container(&req.id, &rootfs, &extra, &spec_json, stdio)
                .await
        }
        .await;
        let streams = match made {
            Ok(s) => s,
            Err(e) => {
                if mounted {
                    if let Err(u) = bundle::unmount_rootfs(bundle_dir) {
                        warn!(self.log, "unmounting a failed container's root filesystem"; "error" => format!("{u:#}"));
                    }
                }
                return Err(e);
            }
        };
        let pid = sb.vmm_pid().unwrap_or_else(std::process::id);
        let mut init = Process::new(None, pid, io.clone());
        init.copy = Some(copy_stdio(streams, io.paths()));
        Ok((
            Container {
                bundle: bundle_dir.to_path_buf(),
                rootfs_mounted: mounted,
                init,
                execs: BTreeMap::new(),
            },
            pid,
        ))
    }

    /// Waits for a started process in a task of its own: records its exit once its output
    /// is drained, and publishes `TaskExit`.
    fn watch_exit(&self, handle: ProcessHandle, p: &mut Process, container_id: &str) {
        let exit = p.exit.clone();
        let copy = p.copy.take();
        let events = self.events.clone();
        let log = self.log.clone();
        let (container_id, pid) = (container_id.to_string(), p.pid);
        let exec_id = p.exec_id.clone();
        tokio::spawn(async move {
            let ended = match handle.wait().await {
                Ok(e) => Exit::from_agent(&e),
                Err(e) => {
                    warn!(log, "the process's end is unknown"; "container" => &container_id,
                        "error" => format!("{e:#}"));
                    Exit {
                        status: UNKNOWN_EXIT,
                        at: SystemTime::now(),
                    }
                }
            };
            if let Some(copy) = copy {
                match tokio::time::timeout(DRAIN_LIMIT, copy).await {
                    Ok(Ok(Err(e))) => warn!(log, "copying stdio"; "container" => &container_id,
                        "error" => format!("{e:#}")),
                    Err(_) => {
                        warn!(log, "the output was still open after the process exited; not waiting"; "container" => &container_id)
                    }
                    _ => {}
                }
            }
            info!(log, "process exited"; "container" => &container_id,
                "exec" => exec_id.as_deref().unwrap_or(""), "status" => ended.status);
            exit.send_replace(Some(ended));
            events.publish(Event::Exit(TaskExit {
                id: exec_id.unwrap_or_else(|| container_id.clone()),
                container_id,
                pid,
                exit_status: ended.status,
                exited_at: timestamp(ended.at),
                ..Default::default()
            }));
        });
    }

    async fn start_task(&self, req: StartRequest) -> TaskResult<StartResponse> {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        let sb = state
            .sandbox
            .as_ref()
            .ok_or_else(|| TaskError::Precondition("the sandbox is not running".to_string()))?;
        let c = state
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| TaskError::NotFound(format!("container {} not found", req.id)))?;
        if req.exec_id.is_empty() {
            if c.init.started {
                return Err(TaskError::Precondition(format!(
                    "container {} was started already",
                    req.id
                )));
            }
            sb.start_container(&req.id).await?;
            c.init.started = true;
            let handle = sb.process(&req.id, None)?;
            let pid = c.init.pid;
            self.watch_exit(handle, &mut c.init, &req.id);
            self.events.publish(Event::Start(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            }));
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        }
        let p = c.execs.get_mut(&req.exec_id).ok_or_else(|| {
            TaskError::NotFound(format!(
                "process {} of container {} not found",
                req.exec_id, req.id
            ))
        })?;
        if p.started {
            return Err(TaskError::Precondition(format!(
                "process {} was started already",
                req.exec_id
            )));
        }
        let spec = p
            .spec
            .take()
            .ok_or_else(|| anyhow!("process {} has no spec", req.exec_id))?;
        let stdio = StdioOptions {
            terminal: p.io.terminal.then_some(TTY_SIZE),
            stdin: !p.io.stdin.is_empty(),
        };
        let streams = sb.exec_process(&req.id, &req.exec_id, &spec, stdio).await?;
        p.copy = Some(copy_stdio(streams, p.io.paths()));
        p.started = true;
        let handle = sb.process(&req.id, Some(&req.exec_id))?;
        let pid = p.pid;
        self.watch_exit(handle, p, &req.id);
        self.events.publish(Event::ExecStarted(TaskExecStarted {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            pid,
            ..Default::default()
        }));
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete_task(&self, req: DeleteRequest) -> TaskResult<DeleteResponse> {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        let c = state.container(&req.id)?;
        if !req.exec_id.is_empty() {
            let p = c.execs.get(&req.exec_id).ok_or_else(|| {
                TaskError::NotFound(format!(
                    "process {} of container {} not found",
                    req.exec_id, req.id
                ))
            })?;
            if p.started && p.exited().is_none() {
                return Err(TaskError::Precondition(format!(
                    "process {} is running: kill it first",
                    req.exec_id
                )));
            }
            let p = c.execs.remove(&req.exec_id).expect("found above");
            let exit = p.exited();
            return Ok(DeleteResponse {
                pid: p.pid,
                exit_status: exit.map_or(0, |e| e.status),
                exited_at: timestamp(exit.map_or_else(SystemTime::now, |e| e.at)),
                ..Default::default()
            });
        }
        if c.init.started && c.init.exited().is_none() {
            return Err(TaskError::Precondition(format!(
                "container {} is running: kill it first",
                req.id
            )));
        }
        let c = state.containers.remove(&req.id).expect("found above");
        if let Some(sb) = state.sandbox.as_mut() {
            if let Err(e) = sb.delete_container(&req.id).await {
                // The teardown removes what is left of it.
                warn!(self.log, "deleting a container"; "container" => &req.id, "error" => format!("{e:#}"));
            }
        }
        if c.rootfs_mounted {
            bundle::unmount_rootfs(&c.bundle)?;
        }
        // A container that never ran is killed by the delete.
        let exit = c.init.exited().unwrap_or(Exit {
            status: 128 + 9,
            at: SystemTime::now(),
        });
        self.events.publish(Event::Delete(TaskDelete {
            container_id: req.id.clone(),
            id: req.id.clone(),
            pid: c.init.pid,
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        }));
        Ok(DeleteResponse {
            pid: c.init.pid,
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        })
    }

    async fn kill_task(&self, req: KillRequest) -> TaskResult<()> {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        let p = state.process(&req.id, &req.exec_id)?;
        // Killing what has exited succeeds: CRI sends SIGKILL with `all` after the exit.
        if p.exited().is_some() {
            return Ok(());
        }
        let exec = (!req.exec_id.is_empty()).then_some(req.exec_id.as_str());
        let sb = state.sandbox()?;
        let sent = sb
            .signal_process(&req.id, exec, req.signal as i32, req.all)
            .await;
        match sent {
            Ok(()) => Ok(()),
            Err(_) if state.process(&req.id, &req.exec_id)?.exited().is_some() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        info!(self.log, "create"; "container" => &req.id, "bundle" => &req.bundle);
        self.create_task(req)
            .await
            .map_err(|e| self.failed("create", e))
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        info!(self.log, "start"; "container" => &req.id, "exec" => &req.exec_id);
        self.start_task(req)
            .await
            .map_err(|e| self.failed("start", e))
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let mut state = self.state.lock().await;
        let paused = state.paused;
        let state = &mut *state;
        let bundle = state.container(&req.id)?.bundle.display().to_string();
        let p = state.process(&req.id, &req.exec_id)?;
        Ok(p.state(&req.id, &bundle, paused))
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let mut rx = {
            let mut state = self.state.lock().await;
            state.process(&req.id, &req.exec_id)?.exit.subscribe()
        };
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(e) => e.expect("waited for"),
            Err(_) => {
                return Err(TaskError::NotFound(format!(
                    "container {} was deleted before it exited",
                    req.id
                ))
                .into())
            }
        };
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        info!(self.log, "kill"; "container" => &req.id, "exec" => &req.exec_id,
            "signal" => req.signal, "all" => req.all);
        self.kill_task(req)
            .await
            .map(|()| Empty::new())
            .map_err(|e| self.failed("kill", e))
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        info!(self.log, "delete"; "container" => &req.id, "exec" => &req.exec_id);
        self.delete_task(req)
            .await
            .map_err(|e| self.failed("delete", e))
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        info!(self.log, "exec"; "container" => &req.id, "exec" => &req.exec_id,
            "stdin" => !req.stdin.is_empty(), "terminal" => req.terminal);
        let mut state = self.state.lock().await;
        let c = state.container(&req.id)?;
        if c.execs.contains_key(&req.exec_id) {
            return Err(TaskError::AlreadyExists(format!(
                "process {} of container {} exists",
                req.exec_id, req.id
            ))
            .into());
        }
        let spec: serde_json::Value = serde_json::from_slice(&req.spec.value).map_err(|e| {
            TaskError::Other(anyhow!(
                "Reading the process spec of exec {}: {e}",
                req.exec_id
            ))
        })?;
        let io = Io {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut p = Process::new(Some(req.exec_id.clone()), c.init.pid, io);
        p.spec = Some(spec);
        c.execs.insert(req.exec_id.clone(), p);
        self.events.publish(Event::ExecAdded(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        }));
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let mut state = self.state.lock().await;
        state.process(&req.id, &req.exec_id)?;
        let exec = (!req.exec_id.is_empty()).then_some(req.exec_id.as_str());
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        state
            .sandbox()?
            .resize_pty(&req.id, exec, rows, cols)
            .await
            .map_err(|e| self.failed("resize", e.into()))?;
        Ok(Empty::new())
    }

    /// Nothing to do: a process's stdin is copied from containerd's FIFO until the FIFO's
    /// end, which containerd's client makes (closing its end) before it sends CloseIO; the
    /// copy then closes the stdin in the guest once everything read is written. Closing it
    /// at once here would race with input still in the FIFO.
    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        self.state.lock().await.process(&req.id, &req.exec_id)?;
        Ok(Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let mut state = self.state.lock().await;
        state.container(&req.id)?;
        let listed = state
            .sandbox()?
            .list_processes(&req.id)
            .await
            .map_err(|e| self.failed("pids", e.into()))?;
        Ok(PidsResponse {
            processes: listed
                .into_iter()
                .map(|p| ProcessInfo {
                    pid: p.pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        let mut state = self.state.lock().await;
        state.container(&req.id)?;
        if state.containers.len() > 1 {
            return Err(TaskError::Precondition(
                "pausing one container of a pod is not supported: the whole VM would pause".into(),
            )
            .into());
        }
        state
            .sandbox()?
            .pause()
            .await
            .map_err(|e| self.failed("pause", e.into()))?;
        state.paused = true;
        self.events.publish(Event::Paused(TaskPaused {
            container_id: req.id,
            ..Default::default()
        }));
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        let mut state = self.state.lock().await;
        state.container(&req.id)?;
        state
            .sandbox()?
            .resume()
            .await
            .map_err(|e| self.failed("resume", e.into()))?;
        state.paused = false;
        self.events.publish(Event::Resumed(TaskResumed {
            container_id: req.id,
            ..Default::default()
        }));
        Ok(Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let mut state = self.state.lock().await;
        let task_pid = state.container(&req.id)?.init.pid;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if !self.state.lock().await.containers.is_empty() {
            // Other containers of the pod still run here.
            return Ok(Empty::new());
        }
        info!(
            self.log,
            "shutdown: no container left, tearing the sandbox down"
        );
        self.teardown().await;
        self.done.notify_one();
        Ok(Empty::new())
    }
}

impl Service {
    fn failed(&self, what: &str, e: TaskError) -> ttrpc::Error {
        let e: ttrpc::Error = e.into();
        warn!(self.log, "request failed"; "request" => what, "error" => format!("{e:?}"));
        e
    }
}
