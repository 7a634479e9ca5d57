//! The backend-neutral hypervisor contract of a VM container runtime.
//!
//! This crate owns what every backend shares and nothing a backend owns:
//!
//! - the async [`Hypervisor`] trait a sandbox drives a VM through;
//! - the device model ([`device`]): network, block and vsock devices, validated once;
//! - the VM configuration ([`HypervisorConfig`]) and [`Capabilities`];
//! - the lifecycle state machine ([`VmState`]) and typed [`Error`]s;
//! - the lifecycle core ([`vm`]): [`Vm`], the one [`Hypervisor`] implementation, over a
//!   [`Backend`] that supplies only a VMM's own steps;
//! - the [`DeviceManager`], one per sandbox, deciding cold or hot plug, rolling back half-done
//!   attachments and reference-counting shared block devices.
//!
//! It depends on no backend: `hypervisor-qemu` and `hypervisor-dragonball` depend on it, never
//! the other way round, and nothing here may pull a VMM's crates.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use hypervisor::device::{DeviceConfig, NetworkConfig};
//! use hypervisor::{DeviceManager, Hypervisor, HypervisorConfig, SandboxSpec};
//!
//! async fn boot(vm: Arc<dyn Hypervisor>) -> hypervisor::Result<()> {
//!     let spec = SandboxSpec {
//!         id: "sandbox-1".into(),
//!         netns: Some("/run/netns/pod1".into()),
//!         config: HypervisorConfig {
//!             kernel: "/var/lib/guest/vmlinuz".into(),
//!             ..Default::default()
//!         },
//!     };
//!     vm.prepare(&spec).await?;
//!     let devices = DeviceManager::new(vm.clone());
//!     // Before start: cold plug. After start: hot plug, if the backend can.
//!     let mac = "02:00:00:00:00:01".parse()?;
//!     let nic = devices
//!         .add(DeviceConfig::Network(NetworkConfig::tap("tap0", mac)))
//!         .await?;
//!     vm.start(Duration::from_secs(30)).await?;
//!     println!("{} is at {}", nic.id, nic.location);
//!     vm.stop().await?;
//!     vm.cleanup().await
//! }
//! ```

#![warn(missing_docs)]

pub mod config;
pub mod device;
pub mod error;
pub mod host;
pub mod lifecycle;
pub mod manager;
pub mod state;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod vm;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use config::{
    Accelerator, AgentChannelKind, Boot, HypervisorConfig, SharedFsKind, TemplateFiles,
};
pub use device::{
    Device, DeviceConfig, DeviceId, DeviceInfo, DeviceKind, MacAddress, SharedFsCache,
    SharedFsConfig,
};
pub use error::{ConfigError, Error, Result};
pub use lifecycle::Lifecycle;
pub use manager::DeviceManager;
pub use state::{Operation, PlugMode, VmState};
pub use vm::{Backend, Vm};

/// What a sandbox asks a backend to prepare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The sandbox id; names run directories, sockets and logs.
    pub id: String,
    /// Network namespace the VMM runs its network devices in (`/run/netns/NAME` or
    /// `/proc/PID/ns/net`). `None` uses the caller's namespace.
    pub netns: Option<PathBuf>,
    /// The VM's configuration.
    pub config: HypervisorConfig,
}

impl SandboxSpec {
    /// Checks the id and the configuration.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            && !self.id.starts_with('.');
        if !id_ok {
            return Err(ConfigError::new(
                "id",
                format!(
                    "{:?} is not a valid sandbox id: use 1 to 64 ASCII letters, digits, '-', '_' or '.', not starting with '.'",
                    self.id
                ),
            ));
        }
        self.config.validate()
    }
}

/// What a backend can do. Callers and the [`DeviceManager`] consult this before asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// Network devices can be added to and removed from a running guest.
    pub network_hotplug: bool,
    /// Block devices can be added to and removed from a running guest.
    pub block_hotplug: bool,
    /// Network devices may have more than one queue pair.
    pub multi_queue: bool,
    /// Network devices can be given pre-opened TAP fds ([`device::NetworkBackend::TapFds`]).
    pub tap_fds: bool,
    /// The VM can be paused and resumed.
    pub pause: bool,
    /// The agent can be reached over vsock (vhost-vsock or hybrid vsock).
    pub vsock: bool,
    /// The VM runs inside the caller's process: its vCPUs are the caller's threads, and it
    /// ends with the caller.
    pub in_process: bool,
    /// How the guest agent's channel comes to exist.
    pub agent_channel: AgentChannelSource,
    /// Host directories can be shared with the guest ([`device::SharedFsConfig`]). Absent
    /// in records written before it existed: false.
    #[serde(default)]
    pub shared_fs: bool,
    /// Shared filesystems can be added to and removed from a running guest.
    #[serde(default)]
    pub shared_fs_hotplug: bool,
    /// VM templates: a VM booted with [`Boot::TemplateSource`] can be saved
    /// ([`Hypervisor::save_template`]) and new VMs started from it ([`Boot::FromTemplate`]).
    #[serde(default)]
    pub templates: bool,
}

/// How a backend provides the guest agent's channel ([`Capabilities::agent_channel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentChannelSource {
    /// The backend creates the channel itself at `prepare` (a virtio-serial port or a
    /// vhost-vsock device); [`Hypervisor::agent_address`] names it.
    #[default]
    Builtin,
    /// The channel is a vsock device the caller adds before start, with this guest CID
    /// (a hybrid vsock: [`Hypervisor::agent_address`] names it once the device is added).
    VsockDevice {
        /// The guest CID to give the device.
        guest_cid: u32,
    },
}

impl Capabilities {
    /// Whether `kind` can be plugged in `mode`.
    pub fn can_plug(&self, kind: DeviceKind, mode: PlugMode) -> bool {
        match (mode, kind) {
            (PlugMode::Cold, _) => true,
            (PlugMode::Hot, DeviceKind::Network) => self.network_hotplug,
            (PlugMode::Hot, DeviceKind::Block) => self.block_hotplug,
            (PlugMode::Hot, DeviceKind::Vsock) => false,
            (PlugMode::Hot, DeviceKind::SharedFs) => self.shared_fs_hotplug,
        }
    }
}

/// Where the runtime reaches the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentAddress {
    /// Kernel vsock: connect to `cid:port` with an `AF_VSOCK` socket.
    Vsock {
        /// Guest CID.
        cid: u32,
        /// Agent port.
        port: u32,
    },
    /// Hybrid vsock: connect to the Unix socket, send `CONNECT <port>\n`, read `OK ...`.
    HybridVsock {
        /// Host Unix socket.
        path: PathBuf,
        /// Agent port.
        port: u32,
    },
    /// A virtio-serial port: connect to the Unix socket; it is the guest port's byte stream.
    VirtioSerial {
        /// Host Unix socket.
        path: PathBuf,
    },
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentAddress::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            AgentAddress::HybridVsock { path, port } => {
                write!(f, "hvsock://{}:{port}", path.display())
            }
            AgentAddress::VirtioSerial { path } => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The runtime asked for it ([`Hypervisor::stop`]).
    Stopped,
    /// The guest powered off or rebooted.
    GuestShutdown,
    /// The VMM shut down cleanly on a host-side request that did not come from
    /// [`Hypervisor::stop`]: a `quit` from another monitor client, a termination signal. The
    /// text says which.
    HostRequest(String),
    /// The VMM was killed by a signal it did not expect.
    Killed,
    /// The VMM failed; the text says how.
    Crashed(String),
    /// A vCPU met an exit its VMM could not handle (an in-process VMM reports this instead of
    /// a crash text).
    VcpuFault(VcpuFault),
}

/// A vCPU exit that ended the VM: which vCPU, what kind of exit, and where the guest was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuFault {
    /// vCPU index.
    pub vcpu: u32,
    /// The kind of exit.
    pub kind: VcpuFaultKind,
    /// The exit as the accelerator names it, with its details (e.g.
    /// `KVM_EXIT_INTERNAL_ERROR (emulation failure, suberror 1, data [0x2])`).
    pub detail: String,
    /// The guest instruction pointer when it happened; `None` when it could not be read.
    pub rip: Option<u64>,
}

impl fmt::Display for VcpuFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU {}: {}", self.vcpu, self.detail)?;
        match self.rip {
            Some(rip) => write!(f, " at RIP {rip:#x}"),
            None => f.write_str(" (RIP unreadable)"),
        }
    }
}

/// Kinds of vCPU exits a VMM cannot handle, named independently of the accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VcpuFaultKind {
    /// The accelerator could not emulate a guest instruction (KVM: `KVM_EXIT_INTERNAL_ERROR`
    /// with suberror `KVM_INTERNAL_ERROR_EMULATION`).
    EmulationFailure,
    /// Any other internal error of the accelerator (KVM: `KVM_EXIT_INTERNAL_ERROR`).
    InternalError,
    /// The guest triple-faulted (KVM: `KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// The hardware refused to enter the guest (KVM: `KVM_EXIT_FAIL_ENTRY`).
    EntryFailure,
    /// The guest reported a crash (KVM: `KVM_EXIT_SYSTEM_EVENT` of type crash).
    GuestCrash,
    /// An exit the VMM does not handle.
    UnhandledExit,
    /// Running the vCPU failed (KVM: the `KVM_RUN` ioctl returned an error).
    RunFailed,
    /// The VMM's vCPU thread failed by itself (a bug, not the guest).
    VmmFailure,
}

/// How a VM ended: what [`Hypervisor::wait_exit`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmExit {
    /// Why.
    pub reason: ExitReason,
    /// The VMM's exit code, when it exited normally.
    pub code: Option<i32>,
    /// The signal that ended the VMM, when one did.
    pub signal: Option<i32>,
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            ExitReason::Stopped => f.write_str("stopped by the runtime")?,
            ExitReason::GuestShutdown => f.write_str("the guest shut down")?,
            ExitReason::HostRequest(why) => write!(f, "shut down on a host request: {why}")?,
            ExitReason::Killed => f.write_str("killed")?,
            ExitReason::Crashed(why) => write!(f, "crashed: {why}")?,
            ExitReason::VcpuFault(fault) => write!(f, "crashed: {fault}")?,
        }
        if let Some(c) = self.code {
            write!(f, " (exit code {c})")?;
        }
        if let Some(s) = self.signal {
            write!(f, " (signal {s})")?;
        }
        Ok(())
    }
}

/// Host processes and threads of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VmmPids {
    /// The VMM process (the runtime's own pid for in-process backends).
    pub vmm: u32,
    /// The VMM's main thread id.
    pub main_thread: u32,
    /// One thread id per vCPU, when known.
    pub vcpus: Vec<u32>,
}

/// What a restarted runtime needs to re-attach to a running VM.
///
/// Backends put their own details (sockets, run directory) in `backend_data`, and offer a
/// constructor that rebuilds a handle from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    /// The backend's name (`qemu`, `dragonball`).
    pub backend: String,
    /// The sandbox it was prepared for.
    pub sandbox: SandboxSpec,
    /// State when saved.
    pub state: VmState,
    /// VMM pids when saved.
    pub pids: VmmPids,
    /// Attached devices.
    pub devices: Vec<DeviceInfo>,
    /// Backend-specific data.
    pub backend_data: serde_json::Value,
}

/// A VM, driven by a sandbox. Every method takes `&self`: implementations synchronize inside,
/// so one handle can be shared (`Arc<dyn Hypervisor>`) between the sandbox, its device
/// manager and a task waiting for exit.
///
/// Calls that are wrong for the current state return [`Error::InvalidState`]; calls the
/// backend can never serve return [`Error::Unsupported`].
#[async_trait]
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// The backend's name (`qemu`, `dragonball`), used in errors and logs.
    fn name(&self) -> &'static str;

    /// Fixes the sandbox id, network namespace and configuration. `Created` -> `Prepared`.
    async fn prepare(&self, spec: &SandboxSpec) -> Result<()>;

    /// Boots the VM with the cold-plugged devices and waits until the VMM is controllable,
    /// at most `timeout`. `Prepared` -> `Running`. On failure nothing is left running.
    async fn start(&self, timeout: Duration) -> Result<()>;

    /// Stops the VM (gracefully, then by force) and waits for it to exit. Idempotent.
    async fn stop(&self) -> Result<()>;

    /// Waits until the VM exits for any reason and tells how.
    async fn wait_exit(&self) -> Result<VmExit>;

    /// Pauses all vCPUs. `Running` -> `Paused`.
    async fn pause(&self) -> Result<()>;

    /// Resumes the vCPUs. `Paused` -> `Running`.
    async fn resume(&self) -> Result<()>;

    /// Attaches a device `mode`-plugged: cold in `Prepared`, hot while `Running` (if
    /// [`Capabilities`] allow). The [`DeviceManager`] decides the mode; a mode that does not
    /// match the state is [`Error::InvalidState`]. Returns the device as the guest will see
    /// it. On failure nothing of it is left.
    async fn add_device(&self, device: Device, mode: PlugMode) -> Result<DeviceInfo>;

    /// Detaches a device added with [`add_device`](Self::add_device): from the start-up
    /// configuration (`Cold`) or from the running guest (`Hot`).
    async fn remove_device(&self, id: &DeviceId, mode: PlugMode) -> Result<()>;

    /// The current lifecycle state.
    async fn state(&self) -> VmState;

    /// What this backend can do on this host with this configuration.
    async fn capabilities(&self) -> Capabilities;

    /// VMM process and thread ids. An error before start.
    async fn pids(&self) -> Result<VmmPids>;

    /// Where the guest agent listens. Known after `prepare`.
    async fn agent_address(&self) -> Result<AgentAddress>;

    /// The file the guest console is written to, once known.
    async fn console_log(&self) -> Option<PathBuf>;

    /// The network namespace given at `prepare`.
    async fn netns(&self) -> Option<PathBuf>;

    /// The configuration in effect (after the backend filled in defaults).
    async fn config(&self) -> Result<HypervisorConfig>;

    /// A serializable snapshot to re-attach from after a runtime restart.
    async fn save_state(&self) -> Result<SavedState>;

    /// Saves a running VM booted with [`Boot::TemplateSource`] as a template: pauses it and
    /// saves its device state beside its RAM file in the template directory. The VM is left
    /// `Paused`; the caller then stops it. Another state or boot is
    /// [`Error::InvalidState`]; a backend without templates ([`Capabilities::templates`])
    /// returns [`Error::Unsupported`].
    async fn save_template(&self) -> Result<TemplateFiles>;

    /// Releases everything the backend created on the host: stops the VM if needed, then
    /// removes sockets, run directories and devices it owns. Idempotent.
    async fn cleanup(&self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(rip: Option<u64>) -> VmExit {
        VmExit {
            reason: ExitReason::VcpuFault(VcpuFault {
                vcpu: 1,
                kind: VcpuFaultKind::EmulationFailure,
                detail: "KVM_EXIT_INTERNAL_ERROR (emulation failure)".into(),
                rip,
            }),
            code: None,
            signal: None,
        }
    }

    #[test]
    fn a_vcpu_fault_names_the_vcpu_the_exit_and_the_rip() {
        assert_eq!(
            fault(Some(0x20_0010)).to_string(),
            "crashed: vCPU 1: KVM_EXIT_INTERNAL_ERROR (emulation failure) at RIP 0x200010"
        );
        assert!(fault(None).to_string().ends_with("(RIP unreadable)"));
    }

    #[test]
    fn a_vcpu_fault_survives_a_json_round_trip() {
        let exit = fault(Some(0xffff_ffff_8100_0000));
        let json = serde_json::to_value(&exit).unwrap();
        assert_eq!(json["reason"]["vcpu_fault"]["kind"], "emulation_failure");
        assert_eq!(serde_json::from_value::<VmExit>(json).unwrap(), exit);
    }
}
