//! Dragonball backend of the [`hypervisor`] contract: an in-process VMM assembled from
//! Dragonball's published component crates (`dbs-*`) and the rust-vmm crates they build on.
//!
//! The VM runs inside the runtime's own process, on KVM (`/dev/kvm` must open and speak API
//! version 12; there is no software fallback):
//!
//! - [`memory`]: guest RAM laid out with `dbs-address-space`, mapped with `vm-memory`,
//!   registered as KVM slots; the e820 map.
//! - [`boot`]: the x86-64 Linux boot protocol (ELF `vmlinux` or bzImage, initrd, command
//!   line with `virtio_mmio.device=` entries, zero page, MP table, identity page tables and
//!   GDT) with `linux-loader`, `dbs-boot` and `dbs-arch`.
//! - [`devices`]: COM1 to the console log and the i8042 whose reset ends the VM
//!   (`dbs-legacy-devices`), I/O dispatch (`dbs-device`), interrupt lines (`dbs-interrupt`),
//!   virtio-mmio window allocation.
//! - [`vcpu`]: one `db-vcpuN` thread per vCPU on `KVM_RUN`, kicked by a real-time signal
//!   for pause and stop.
//! - [`virtio`]: virtio-mmio (version 2) transport, our split virtqueue, and the devices:
//!   virtio-net on an existing TAP opened by name with `dbs-utils` (multi-queue up to 16
//!   pairs with a control queue; TAP offloads follow the guest's features), virtio-blk on a host
//!   file, virtio-vsock with a hybrid-vsock Unix socket (the agent's channel). Queue kicks
//!   are KVM ioeventfds; interrupts are legacy lines of `dbs-interrupt`'s KVM manager
//!   (irqfds on IOAPIC pins); the event thread serves them. Devices are
//!   cold-plugged only (`add_device` in `Prepared`); hotplug is a typed "unsupported".
//! - [`vmm`]: the `db-vmm` event thread, which enters the sandbox's network namespace, owns
//!   the VM, and turns a guest reset, a vCPU failure or a stop request into the [`VmExit`]
//!   that [`Hypervisor::wait_exit`] returns.
//!
//! This crate is the only place in the workspace where `dbs-*` crates may appear, dev- and
//! build-dependencies included; the workspace's boundary test enforces it. It depends on the
//! contract crate, never the other way round.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use hypervisor::{ExitReason, Hypervisor, HypervisorConfig, SandboxSpec};
//! use hypervisor_dragonball::{DragonballHypervisor, DragonballOptions};
//!
//! # async fn run() -> hypervisor::Result<()> {
//! let log = slog::Logger::root(slog::Discard, slog::o!());
//! let vm = Arc::new(DragonballHypervisor::new(log, DragonballOptions::default()));
//! vm.prepare(&SandboxSpec {
//!     id: "demo".into(),
//!     netns: None,
//!     config: HypervisorConfig {
//!         kernel: "/var/lib/guest/vmlinux".into(),
//!         kernel_params: vec!["quiet".into()],
//!         ..Default::default()
//!     },
//! })
//! .await?;
//! vm.start(Duration::from_secs(10)).await?;
//! println!("console in {:?}", vm.console_log().await);
//! let exit = vm.wait_exit().await?;
//! assert_eq!(exit.reason, ExitReason::GuestShutdown);
//! vm.cleanup().await
//! # }
//! ```

#![warn(missing_docs)]

mod attach;
pub mod boot;
pub mod devices;
pub mod error;
pub mod kvm;
mod lifecycle;
pub mod memory;
pub mod vcpu;
pub mod virtio;
pub mod vmm;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use hypervisor::{
    AgentAddress, AgentChannelSource, Capabilities, Device, DeviceId, DeviceInfo, Error,
    Hypervisor, HypervisorConfig, Operation, Result, SandboxSpec, SavedState, VmExit, VmState,
    VmmPids,
};
use tokio::sync::watch;

use crate::boot::MmioWindow;
pub use crate::error::Error as DragonballError;
use crate::vmm::RunningVm;

/// The backend's name in errors and saved state.
pub const BACKEND: &str = "dragonball";

/// Options of this backend that are not part of the VM's configuration.
#[derive(Debug, Clone)]
pub struct DragonballOptions {
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// Parent of the per-sandbox run directories (console log).
    pub run_root: PathBuf,
    /// How long `stop` waits for the vCPU threads to leave and be joined.
    pub stop_timeout: Duration,
    /// How long `pause` waits for every vCPU to park.
    pub pause_timeout: Duration,
}

impl Default for DragonballOptions {
    fn default() -> Self {
        DragonballOptions {
            kvm_path: "/dev/kvm".into(),
            run_root: "/run/kata-hypervisor/dragonball".into(),
            stop_timeout: Duration::from_secs(10),
            pause_timeout: Duration::from_secs(5),
        }
    }
}

/// State shared with the VMM's threads.
#[derive(Debug)]
pub struct Shared {
    status: Mutex<Status>,
    exit: watch::Sender<Option<VmExit>>,
}

#[derive(Debug)]
struct Status {
    state: VmState,
    pids: Option<VmmPids>,
}

impl Shared {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> VmState {
        self.status().state
    }

    fn set_state(&self, state: VmState) {
        self.status().state = state;
    }

    /// Records how the VM ended: state `Stopped`, and the exit for [`Hypervisor::wait_exit`].
    pub(crate) fn finish(&self, exit: VmExit) {
        self.set_state(VmState::Stopped);
        self.exit.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(exit);
                true
            } else {
                false
            }
        });
    }
}

/// Everything that changes under the operation lock.
#[derive(Debug, Default)]
struct Inner {
    spec: Option<SandboxSpec>,
    run_dir: Option<PathBuf>,
    /// Hands out the windows of cold-plugged devices.
    mmio: devices::MmioAllocator,
    /// virtio-mmio windows of cold-plugged devices (from a [`devices::MmioAllocator`]),
    /// announced on the command line at start.
    mmio_windows: Vec<MmioWindow>,
    /// The cold-plugged devices, moved into the VM at start.
    virtio: Vec<(MmioWindow, Box<dyn virtio::VirtioDevice>)>,
    /// What `add_device` returned, per device.
    attached: Vec<DeviceInfo>,
    /// The hybrid vsock address, once a vsock device is added.
    agent: Option<AgentAddress>,
    running: Option<RunningVm>,
}

/// A Dragonball VM running in this process. See the crate docs.
#[derive(Debug)]
pub struct DragonballHypervisor {
    log: slog::Logger,
    opts: DragonballOptions,
    shared: std::sync::Arc<Shared>,
    inner: tokio::sync::Mutex<Inner>,
}

impl DragonballHypervisor {
    /// A backend in state `Created`.
    pub fn new(log: slog::Logger, opts: DragonballOptions) -> Self {
        DragonballHypervisor {
            log: log.new(slog::o!("backend" => BACKEND)),
            opts,
            shared: std::sync::Arc::new(Shared {
                status: Mutex::new(Status {
                    state: VmState::Created,
                    pids: None,
                }),
                exit: watch::channel(None).0,
            }),
            inner: tokio::sync::Mutex::default(),
        }
    }

    fn unsupported(operation: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Unsupported {
            backend: BACKEND,
            operation: operation.into(),
            reason: reason.into(),
        }
    }

    fn capabilities_now() -> Capabilities {
        Capabilities {
            network_hotplug: false,
            block_hotplug: false,
            multi_queue: true,
            tap_fds: false,
            pause: true,
            vsock: true,
            in_process: true,
            // The first CID a guest may have (0 to 2 are reserved); each VM has its own
            // hybrid-vsock socket, so one CID serves every sandbox.
            agent_channel: AgentChannelSource::VsockDevice { guest_cid: 3 },
        }
    }

    fn not_prepared(&self, operation: Operation) -> Error {
        Error::InvalidState {
            operation,
            state: self.shared.state(),
        }
    }
}

#[async_trait]
impl Hypervisor for DragonballHypervisor {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn prepare(&self, spec: &SandboxSpec) -> Result<()> {
        self.do_prepare(spec).await
    }

    async fn start(&self, timeout: Duration) -> Result<()> {
        self.do_start(timeout).await
    }

    async fn stop(&self) -> Result<()> {
        self.do_stop().await
    }

    async fn wait_exit(&self) -> Result<VmExit> {
        let mut rx = self.shared.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|e| Error::backend("Waiting for the Dragonball VM to exit", e))?;
        Ok(exit.clone().expect("waited for Some"))
    }

    async fn pause(&self) -> Result<()> {
        self.do_pause().await
    }

    async fn resume(&self) -> Result<()> {
        self.do_resume().await
    }

    async fn add_device(&self, device: Device) -> Result<DeviceInfo> {
        let mut inner = self.inner.lock().await;
        match self.shared.state().plug_mode(Operation::AddDevice)? {
            hypervisor::PlugMode::Hot => Err(Self::unsupported(
                format!("hot-plugging {} device {}", device.config.kind(), device.id),
                "the Dragonball backend has no hotplug; add devices before start",
            )),
            hypervisor::PlugMode::Cold => self.cold_plug(&mut inner, device),
        }
    }

    async fn remove_device(&self, id: &DeviceId) -> Result<()> {
        let _inner = self.inner.lock().await;
        self.shared.state().next(Operation::RemoveDevice)?;
        Err(Error::DeviceNotFound(id.clone()))
    }

    async fn state(&self) -> VmState {
        self.shared.state()
    }

    async fn capabilities(&self) -> Capabilities {
        Self::capabilities_now()
    }

    async fn pids(&self) -> Result<VmmPids> {
        let st = self.shared.status();
        st.pids.clone().ok_or(Error::InvalidState {
            operation: Operation::Start,
            state: st.state,
        })
    }

    async fn agent_address(&self) -> Result<AgentAddress> {
        let inner = self.inner.lock().await;
        inner.agent.clone().ok_or_else(|| {
            Self::unsupported(
                "an agent channel without a vsock device",
                "add a DeviceConfig::Vsock before start; the agent is reached over hybrid vsock",
            )
        })
    }

    async fn console_log(&self) -> Option<PathBuf> {
        let inner = self.inner.lock().await;
        let configured = inner
            .spec
            .as_ref()
            .and_then(|s| s.config.console_log.clone());
        configured.or_else(|| inner.run_dir.as_ref().map(|d| d.join("console.log")))
    }

    async fn netns(&self) -> Option<PathBuf> {
        let inner = self.inner.lock().await;
        inner.spec.as_ref().and_then(|s| s.netns.clone())
    }

    async fn config(&self) -> Result<HypervisorConfig> {
        let inner = self.inner.lock().await;
        let spec = inner
            .spec
            .as_ref()
            .ok_or_else(|| self.not_prepared(Operation::Prepare))?;
        let mut config = spec.config.clone();
        config.accelerator = hypervisor::Accelerator::Kvm;
        config.path = None;
        Ok(config)
    }

    async fn save_state(&self) -> Result<SavedState> {
        self.do_save_state().await
    }

    async fn cleanup(&self) -> Result<()> {
        self.do_cleanup().await
    }
}
