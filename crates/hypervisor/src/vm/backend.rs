//! What a backend supplies to the lifecycle core: the [`Backend`] trait and the [`Context`]
//! its steps are given.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::device::{Device, DeviceId, DeviceInfo};
use crate::error::{Error, Result};
use crate::lifecycle::Lifecycle;
use crate::state::PlugMode;
use crate::{AgentAddress, Capabilities, HypervisorConfig, SandboxSpec, TemplateFiles, VmmPids};

/// What a backend's steps are given: the sandbox and its lifecycle.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The prepared sandbox.
    pub spec: &'a SandboxSpec,
    /// Its run directory (exists, 0700, owned by the runtime).
    pub run_dir: &'a Path,
    /// The VM's lifecycle record, to hand to an exit watcher or to report an exit with.
    pub lifecycle: &'a Arc<Lifecycle>,
}

/// The VMM-specific steps of a backend: everything [`Vm`](crate::Vm) does not do itself.
///
/// Each step runs under the VM's operation lock with the backend's per-sandbox state
/// (`Self::Sandbox`). Steps that wait are dropped at an await when a `stop` comes, so they
/// must be cancel-safe there. A backend does not check states or plug modes, create run
/// directories or record exits of failed starts: [`Vm`](crate::Vm) does.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// The backend's per-sandbox state; `Default` is "nothing prepared".
    type Sandbox: Send + Sync + fmt::Debug + Default;

    /// The backend's name (`qemu`, `dragonball`), in errors, logs and saved state.
    fn name(&self) -> &'static str;

    /// Parent of the per-sandbox run directories.
    fn run_root(&self) -> &Path;

    /// Checks the spec against this backend and host and fills the sandbox state. Called
    /// after the spec and its namespace were checked and the run directory created; on
    /// error, the run directory is removed and the state reset.
    async fn prepare(&self, vm: &mut Self::Sandbox, ctx: Context<'_>) -> Result<()>;

    /// Boots the VM with its cold-plugged devices, within `timeout`, and returns the VMM's
    /// pids. The backend arranges for the VMM's exit to be recorded ([`Lifecycle::finish`]).
    /// On error, or when the future is dropped, nothing may be left running: a start that
    /// failed is recorded as an exit by [`Vm`](crate::Vm) unless the backend recorded one itself.
    async fn start(
        &self,
        vm: &mut Self::Sandbox,
        ctx: Context<'_>,
        timeout: Duration,
    ) -> Result<VmmPids>;

    /// Stops a VM that was started (gracefully, then by force) and waits for its VMM to end.
    async fn stop(&self, vm: &mut Self::Sandbox, ctx: Context<'_>) -> Result<()>;

    /// Pauses the vCPUs.
    async fn pause(&self, vm: &mut Self::Sandbox, ctx: Context<'_>) -> Result<()> {
        let _ = (vm, ctx);
        Err(unsupported(
            self.name(),
            "pause",
            "the backend cannot pause a VM",
        ))
    }

    /// Resumes the vCPUs.
    async fn resume(&self, vm: &mut Self::Sandbox, ctx: Context<'_>) -> Result<()> {
        let _ = (vm, ctx);
        Err(unsupported(
            self.name(),
            "resume",
            "the backend cannot pause a VM",
        ))
    }

    /// Saves the running VM, booted with [`Boot::TemplateSource`](crate::Boot::TemplateSource),
    /// as a template in its directory, and leaves its vCPUs stopped. Called only in state
    /// `Running` with that boot; the core moves the VM to `Paused` when it succeeds.
    async fn save_template(
        &self,
        vm: &mut Self::Sandbox,
        ctx: Context<'_>,
    ) -> Result<TemplateFiles> {
        let _ = (vm, ctx);
        Err(unsupported(
            self.name(),
            "saving a template",
            "the backend has no VM templates; boot cold",
        ))
    }

    /// Adds a device to the VM's start-up configuration (state `Prepared`).
    async fn cold_plug(
        &self,
        vm: &mut Self::Sandbox,
        ctx: Context<'_>,
        device: Device,
    ) -> Result<DeviceInfo>;

    /// Adds a device to the running guest. Called only when [`capabilities`](Self::capabilities)
    /// allow it.
    async fn hot_plug(
        &self,
        vm: &mut Self::Sandbox,
        ctx: Context<'_>,
        device: Device,
    ) -> Result<DeviceInfo> {
        let _ = (vm, ctx);
        Err(unsupported(
            self.name(),
            format!("{} hotplug", device.config.kind()),
            "the backend has no hotplug; add the device before start",
        ))
    }

    /// Removes a device: from the start-up configuration (`Cold`, state `Prepared`) or from
    /// the running guest (`Hot`).
    async fn remove(
        &self,
        vm: &mut Self::Sandbox,
        ctx: Context<'_>,
        id: &DeviceId,
        mode: PlugMode,
    ) -> Result<()>;

    /// What the backend can do with this sandbox on this host.
    fn capabilities(&self, vm: &Self::Sandbox) -> Capabilities;

    /// Where the guest agent listens (the sandbox is prepared).
    fn agent_address(&self, vm: &Self::Sandbox) -> Result<AgentAddress>;

    /// Fills in the defaults the backend chose (binary, machine type, accelerator).
    fn effective_config(&self, vm: &Self::Sandbox, config: &mut HypervisorConfig) {
        let _ = (vm, config);
    }

    /// The attached devices and the backend's own data, for [`SavedState`](crate::SavedState). The run
    /// directory is added to the data as `run_dir`.
    fn saved(&self, vm: &Self::Sandbox) -> (Vec<DeviceInfo>, serde_json::Value);

    /// Releases what the sandbox holds on the host besides the run directory (devices that
    /// never reached the VMM, for instance), after the VM stopped.
    async fn release(&self, vm: &mut Self::Sandbox) -> Result<()> {
        *vm = Self::Sandbox::default();
        Ok(())
    }
}

/// An [`Error::Unsupported`] of backend `backend`.
pub fn unsupported(
    backend: &'static str,
    operation: impl Into<String>,
    reason: impl Into<String>,
) -> Error {
    Error::Unsupported {
        backend,
        operation: operation.into(),
        reason: reason.into(),
    }
}
