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
//!   cold-plugged only (added, or removed again, in `Prepared`); hotplug is a typed
//!   "unsupported".
//! - [`vmm`]: the `db-vmm` event thread, which enters the sandbox's network namespace, owns
//!   the VM, and turns a guest reset, a vCPU failure or a stop request into the
//!   [`VmExit`](hypervisor::VmExit) it records in the VM's [`Lifecycle`](hypervisor::Lifecycle),
//!   which [`Hypervisor::wait_exit`](hypervisor::Hypervisor::wait_exit) returns.
//!
//! [`DragonballHypervisor`] is the workspace's lifecycle core ([`hypervisor::Vm`]) over
//! [`Dragonball`], which supplies only this VMM's steps ([`hypervisor::Backend`]): the state
//! machine, `wait_exit`, the run directory and the checks every backend shares live there.
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
//! use hypervisor_dragonball::{Dragonball, DragonballOptions};
//!
//! # async fn run() -> hypervisor::Result<()> {
//! let log = slog::Logger::root(slog::Discard, slog::o!());
//! let vm = Arc::new(hypervisor::Vm::new(Dragonball::new(log, DragonballOptions::default())));
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
use std::time::Duration;

use hypervisor::{AgentAddress, DeviceInfo};

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

/// The Dragonball backend: the steps of an in-process VMM, for [`hypervisor::Vm`]. See the
/// crate docs.
#[derive(Debug)]
pub struct Dragonball {
    log: slog::Logger,
    opts: DragonballOptions,
}

impl Dragonball {
    /// The backend with `opts`; run it with `hypervisor::Vm::new(Dragonball::new(log, opts))`.
    pub fn new(log: slog::Logger, opts: DragonballOptions) -> Self {
        Dragonball {
            log: log.new(slog::o!("backend" => BACKEND)),
            opts,
        }
    }
}

/// A Dragonball VM running in this process: the lifecycle core over [`Dragonball`].
pub type DragonballHypervisor = hypervisor::Vm<Dragonball>;

/// A device added before start.
#[derive(Debug)]
struct ColdDevice {
    /// What `add_device` returned.
    info: DeviceInfo,
    /// Its virtio-mmio window, announced on the command line at start.
    window: MmioWindow,
    /// The device itself, until it moves into the VM at start (in a mutex only so that the
    /// sandbox state is `Sync`; it is reached through `&mut`).
    device: Option<std::sync::Mutex<Box<dyn virtio::VirtioDevice>>>,
}

/// One sandbox's Dragonball state, beside what the lifecycle core keeps (spec, run
/// directory, state, exit).
#[derive(Debug, Default)]
pub struct DragonballSandbox {
    /// The cold-plugged devices, in the order they were added.
    devices: Vec<ColdDevice>,
    /// The hybrid vsock address, once a vsock device is added.
    agent: Option<AgentAddress>,
    /// The VM's threads, once started.
    running: Option<RunningVm>,
}
