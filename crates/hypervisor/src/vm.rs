//! The lifecycle core: one [`Hypervisor`] implementation, [`Vm`], over any [`Backend`].
//!
//! [`Vm`] owns what every backend shares: the state machine and its guarded transitions (a
//! [`Lifecycle`]), the operation lock that serializes a sandbox's requests, `stop` preempting
//! the operation in flight, the exit record and [`Hypervisor::wait_exit`], the checks of
//! `prepare` (the spec, the network namespace), the sandbox's run directory (created 0700,
//! refused if it exists, removed by `cleanup`), a cancelled `start` recorded as an exit,
//! saved state, and cleanup. A backend supplies only the steps that differ between VMMs: the
//! [`Backend`] trait. Whether a device is cold- or hot-plugged is decided by the
//! [`DeviceManager`](crate::DeviceManager) and handed down; the backend is told which.
//!
//! ```text
//!  DeviceManager --add_device(dev, mode)--> Vm<B> --cold_plug / hot_plug--> B (QEMU, Dragonball, ...)
//!                                             |
//!                                             +-- Arc<Lifecycle> <-- B's exit watcher
//! ```

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;

use crate::device::{Device, DeviceId, DeviceInfo};
use crate::error::{ConfigError, Error, Result};
use crate::lifecycle::{Lifecycle, STOPPING};
use crate::state::{Operation, PlugMode, VmState};
use crate::{
    AgentAddress, Boot, Capabilities, ExitReason, Hypervisor, HypervisorConfig, SandboxSpec,
    SavedState, TemplateFiles, VmExit, VmmPids,
};

mod backend;
#[cfg(test)]
mod template_tests;

pub use backend::{unsupported, Backend, Context};

/// Mode of run directories and of the run root.
const DIR_MODE: u32 = 0o700;

/// How long `stop` waits for the backend's watcher to record the end of a VMM that stopped.
const EXIT_RECORD_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Prepared {
    spec: SandboxSpec,
    run_dir: PathBuf,
}

#[derive(Debug)]
struct Inner<S> {
    prepared: Option<Prepared>,
    sandbox: S,
}

impl<S> Inner<S> {
    /// The backend's state and the context its steps are given; `None` before `prepare`.
    fn steps<'a>(&'a mut self, life: &'a Arc<Lifecycle>) -> Option<(&'a mut S, Context<'a>)> {
        let p = self.prepared.as_ref()?;
        let ctx = Context {
            spec: &p.spec,
            run_dir: &p.run_dir,
            lifecycle: life,
        };
        Some((&mut self.sandbox, ctx))
    }
}

/// A VM of backend `B`: the one [`Hypervisor`] implementation. See the module docs.
#[derive(Debug)]
pub struct Vm<B: Backend> {
    backend: B,
    life: Arc<Lifecycle>,
    inner: Mutex<Inner<B::Sandbox>>,
}

impl<B: Backend> Vm<B> {
    /// A VM in state `Created`.
    pub fn new(backend: B) -> Self {
        Vm {
            backend,
            life: Arc::new(Lifecycle::default()),
            inner: Mutex::new(Inner {
                prepared: None,
                sandbox: B::Sandbox::default(),
            }),
        }
    }

    /// A VM whose VMM an earlier runtime process started, re-attached by the backend: the
    /// sandbox `spec` with its `run_dir`, in `state` (`Running` or `Paused`), with `pids` and
    /// the backend's rebuilt `sandbox` state. The backend watches the VMM for exit through
    /// [`lifecycle`](Self::lifecycle).
    pub fn restored(
        backend: B,
        spec: SandboxSpec,
        run_dir: PathBuf,
        state: VmState,
        pids: VmmPids,
        sandbox: B::Sandbox,
    ) -> Self {
        let life = Lifecycle::new(state);
        life.set_pids(pids);
        Vm {
            backend,
            life: Arc::new(life),
            inner: Mutex::new(Inner {
                prepared: Some(Prepared { spec, run_dir }),
                sandbox,
            }),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The lifecycle record.
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.life
    }

    /// Runs `f` on the backend's sandbox state under the operation lock.
    pub async fn with_sandbox<R>(&self, f: impl FnOnce(&B::Sandbox) -> R) -> R {
        f(&self.inner.lock().await.sandbox)
    }

    fn not_prepared(&self, operation: Operation) -> Error {
        Error::InvalidState {
            operation,
            state: self.life.state(),
        }
    }

    fn stopping(&self, step: String) -> impl FnOnce() -> Error {
        move || Error::backend(step, STOPPING)
    }

    /// The checks and run directory of `prepare`, then the backend's step.
    async fn prepare_locked(
        &self,
        inner: &mut Inner<B::Sandbox>,
        spec: &SandboxSpec,
    ) -> Result<()> {
        self.life.check(Operation::Prepare)?;
        spec.validate()?;
        if let Some(ns) = &spec.netns {
            if !ns.exists() {
                return Err(ConfigError::new(
                    "netns",
                    format!(
                        "network namespace {} does not exist; create it (ip netns add) or pass an existing one",
                        ns.display()
                    ),
                )
                .into());
            }
        }
        let root = self.backend.run_root();
        // The directories this prepare creates, removed again (when still empty) if it fails.
        let created: Vec<PathBuf> = root
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        let undo_root = || {
            for dir in &created {
                let _ = std::fs::remove_dir(dir);
            }
        };
        create_run_root(root).map_err(|e| {
            undo_root();
            Error::backend(format!("Creating the run root {}", root.display()), e)
        })?;
        let run_dir = root.join(&spec.id);
        std::fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&run_dir)
            .map_err(|e| {
                undo_root();
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    ConfigError::new(
                        "id",
                        format!(
                            "run directory {} already exists: a sandbox with this id is running or was not cleaned up",
                            run_dir.display()
                        ),
                    )
                    .into()
                } else {
                    Error::backend(format!("Creating run directory {}", run_dir.display()), e)
                }
            })?;
        let ctx = Context {
            spec,
            run_dir: &run_dir,
            lifecycle: &self.life,
        };
        if let Err(e) = self.backend.prepare(&mut inner.sandbox, ctx).await {
            inner.sandbox = B::Sandbox::default();
            let _ = std::fs::remove_dir_all(&run_dir);
            undo_root();
            return Err(e);
        }
        inner.prepared = Some(Prepared {
            spec: spec.clone(),
            run_dir,
        });
        self.life.transition(VmState::Created, VmState::Prepared);
        Ok(())
    }

    async fn start_locked(&self, inner: &mut Inner<B::Sandbox>, timeout: Duration) -> Result<()> {
        let (sandbox, ctx) = inner.steps(&self.life).expect("checked: prepared");
        // A start that does not return (dropped by its caller, or by a stop) ends the VM;
        // the backend's own guards kill what it spawned.
        let mut ended = StartGuard {
            life: &self.life,
            armed: true,
        };
        let pids = match self.backend.start(sandbox, ctx, timeout).await {
            Ok(pids) => pids,
            Err(e) => {
                ended.armed = false;
                // First exit wins: a backend that recorded how its VMM ended keeps that.
                self.life.finish(match &e {
                    Error::VmmExited(exit) => exit.clone(),
                    other => VmExit {
                        reason: ExitReason::Crashed(format!(
                            "the VM did not start: {}",
                            error_chain(other)
                        )),
                        code: None,
                        signal: None,
                    },
                });
                return Err(e);
            }
        };
        ended.armed = false;
        self.life.set_pids(pids);
        // Compare-and-set: a VM whose VMM already ended keeps its `Stopped`.
        self.life.transition(VmState::Prepared, VmState::Running);
        Ok(())
    }
}

/// Records a `start` that never returned as a stop.
struct StartGuard<'a> {
    life: &'a Lifecycle,
    armed: bool,
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.life.finish(VmExit {
                reason: ExitReason::Stopped,
                code: None,
                signal: None,
            });
        }
    }
}

/// Creates the run root 0700 (and its parents).
fn create_run_root(root: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(root)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(DIR_MODE))
}

/// An error and its sources on one line, for logs and exit reasons.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[async_trait]
impl<B: Backend> Hypervisor for Vm<B> {
    fn name(&self) -> &'static str {
        self.backend.name()
    }

    async fn prepare(&self, spec: &SandboxSpec) -> Result<()> {
        let mut inner = self.inner.lock().await;
        self.prepare_locked(&mut inner, spec).await
    }

    async fn start(&self, timeout: Duration) -> Result<()> {
        let mut inner = self.inner.lock().await;
        self.life.check(Operation::Start)?;
        let step = format!("Starting the {} VM", self.backend.name());
        self.life
            .unless_stopping(self.start_locked(&mut inner, timeout), self.stopping(step))
            .await
    }

    async fn stop(&self) -> Result<()> {
        // Counted before the lock: the operation holding it gives up at its next await.
        let _request = self.life.stop_requested();
        let mut inner = self.inner.lock().await;
        self.life.check(Operation::Stop)?;
        self.life.mark_stopping();
        let ran = self.life.pids().is_some();
        if let (Some((sandbox, ctx)), true) = (inner.steps(&self.life), ran) {
            self.backend.stop(sandbox, ctx).await?;
            // The backend's watcher records the VMM's end (with its status) as it sees it.
            let _ = self.life.exit_within(EXIT_RECORD_WAIT).await;
        }
        // A VM that never ran, or whose watcher has not recorded the end yet: stopped by
        // the runtime.
        self.life.finish(VmExit {
            reason: ExitReason::Stopped,
            code: None,
            signal: None,
        });
        Ok(())
    }

    async fn wait_exit(&self) -> Result<VmExit> {
        Ok(self.life.wait_exit().await)
    }

    async fn pause(&self) -> Result<()> {
        self.pause_resume(Operation::Pause).await
    }

    async fn resume(&self) -> Result<()> {
        self.pause_resume(Operation::Resume).await
    }

    async fn add_device(&self, device: Device, mode: PlugMode) -> Result<DeviceInfo> {
        device.config.validate()?;
        let mut inner = self.inner.lock().await;
        let now = self
            .life
            .state()
            .plug_mode(Operation::AddDevice)
            .map_err(|_| self.life.exited_or_state(Operation::AddDevice))?;
        check_mode(Operation::AddDevice, mode, now, self.life.state())?;
        let kind = device.config.kind();
        if !self
            .backend
            .capabilities(&inner.sandbox)
            .can_plug(kind, mode)
        {
            return Err(unsupported(
                self.backend.name(),
                format!("{kind} hotplug"),
                "the backend or machine type cannot add this device to a running guest; add it before start",
            ));
        }
        let (sandbox, ctx) = inner.steps(&self.life).expect("checked: prepared");
        let id = device.id.clone();
        let op = async {
            match mode {
                PlugMode::Cold => self.backend.cold_plug(sandbox, ctx, device).await,
                PlugMode::Hot => self.backend.hot_plug(sandbox, ctx, device).await,
            }
        };
        self.life
            .unless_stopping(op, || Error::device(&id, "Adding", STOPPING))
            .await
    }

    async fn remove_device(&self, id: &DeviceId, mode: PlugMode) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let now = self
            .life
            .state()
            .plug_mode(Operation::RemoveDevice)
            .map_err(|_| self.life.exited_or_state(Operation::RemoveDevice))?;
        check_mode(Operation::RemoveDevice, mode, now, self.life.state())?;
        let (sandbox, ctx) = inner.steps(&self.life).expect("checked: prepared");
        self.life
            .unless_stopping(self.backend.remove(sandbox, ctx, id, mode), || {
                Error::device(id, "Unplugging", STOPPING)
            })
            .await
    }

    async fn state(&self) -> VmState {
        self.life.state()
    }

    async fn capabilities(&self) -> Capabilities {
        self.backend.capabilities(&self.inner.lock().await.sandbox)
    }

    async fn pids(&self) -> Result<VmmPids> {
        self.life.pids().ok_or(Error::InvalidState {
            operation: Operation::Start,
            state: self.life.state(),
        })
    }

    async fn agent_address(&self) -> Result<AgentAddress> {
        let inner = self.inner.lock().await;
        if inner.prepared.is_none() {
            return Err(self.not_prepared(Operation::Prepare));
        }
        self.backend.agent_address(&inner.sandbox)
    }

    async fn console_log(&self) -> Option<PathBuf> {
        let inner = self.inner.lock().await;
        let p = inner.prepared.as_ref()?;
        Some(
            p.spec
                .config
                .console_log
                .clone()
                .unwrap_or_else(|| p.run_dir.join("console.log")),
        )
    }

    async fn netns(&self) -> Option<PathBuf> {
        let inner = self.inner.lock().await;
        inner.prepared.as_ref().and_then(|p| p.spec.netns.clone())
    }

    async fn config(&self) -> Result<HypervisorConfig> {
        let inner = self.inner.lock().await;
        let p = inner
            .prepared
            .as_ref()
            .ok_or_else(|| self.not_prepared(Operation::Prepare))?;
        let mut config = p.spec.config.clone();
        self.backend.effective_config(&inner.sandbox, &mut config);
        Ok(config)
    }

    async fn save_state(&self) -> Result<SavedState> {
        let inner = self.inner.lock().await;
        let p = inner
            .prepared
            .as_ref()
            .ok_or_else(|| self.not_prepared(Operation::Prepare))?;
        let (devices, mut data) = self.backend.saved(&inner.sandbox);
        if data.is_null() {
            data = serde_json::json!({});
        }
        if let Some(map) = data.as_object_mut() {
            map.insert("run_dir".into(), serde_json::json!(p.run_dir));
        }
        Ok(SavedState {
            backend: self.backend.name().into(),
            sandbox: p.spec.clone(),
            state: self.life.state(),
            pids: self.life.pids().unwrap_or_default(),
            devices,
            backend_data: data,
        })
    }

    async fn save_template(&self) -> Result<TemplateFiles> {
        let mut inner = self.inner.lock().await;
        let from = self.life.state();
        let next = self.life.check(Operation::SaveTemplate)?;
        let booted = inner.prepared.as_ref().map(|p| &p.spec.config.boot);
        if !matches!(booted, Some(Boot::TemplateSource { .. })) {
            return Err(ConfigError::new(
                "boot",
                "only a VM booted as a template source (boot = template_source) can be saved as a template",
            )
            .into());
        }
        let (sandbox, ctx) = inner.steps(&self.life).expect("checked: running");
        let step = format!("Saving the {} VM as a template", self.backend.name());
        let files = self
            .life
            .unless_stopping(
                self.backend.save_template(sandbox, ctx),
                self.stopping(step),
            )
            .await?;
        // Compare-and-set: a VM that exited meanwhile stays Stopped.
        if !self.life.transition(from, next) {
            return Err(self.life.exited_or_state(Operation::SaveTemplate));
        }
        Ok(files)
    }

    async fn cleanup(&self) -> Result<()> {
        if self.life.state() != VmState::Created {
            self.stop().await?;
        }
        let mut inner = self.inner.lock().await;
        self.backend.release(&mut inner.sandbox).await?;
        if let Some(p) = &inner.prepared {
            match std::fs::remove_dir_all(&p.run_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::backend(
                        format!("Removing run directory {}", p.run_dir.display()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }
}

impl<B: Backend> Vm<B> {
    async fn pause_resume(&self, op: Operation) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let from = self.life.state();
        let next = self.life.check(op)?;
        let (sandbox, ctx) = inner.steps(&self.life).expect("checked: running");
        let step = format!("Asking the {} VM to {op}", self.backend.name());
        let asked = async {
            match op {
                Operation::Pause => self.backend.pause(sandbox, ctx).await,
                _ => self.backend.resume(sandbox, ctx).await,
            }
        };
        self.life
            .unless_stopping(asked, self.stopping(step))
            .await?;
        // Compare-and-set: a VM that exited meanwhile stays Stopped.
        if !self.life.transition(from, next) {
            return Err(self.life.exited_or_state(op));
        }
        Ok(())
    }
}

/// A device request whose plug mode does not match the VM's state.
fn check_mode(op: Operation, asked: PlugMode, now: PlugMode, state: VmState) -> Result<()> {
    if asked == now {
        Ok(())
    } else {
        Err(Error::InvalidState {
            operation: op,
            state,
        })
    }
}
