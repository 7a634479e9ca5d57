//! QEMU backend of the [`hypervisor`] contract.
//!
//! QEMU runs as a child process, in the sandbox's network namespace, holding exactly the fds
//! this crate chose for it: TAP queues opened by [`netdev`], vhost-net fds when the host has
//! `/dev/vhost-net`, and the listening sockets of its QMP monitor and agent channel (created
//! here, so there is no window in which a socket path does not exist yet). QMP, spoken by
//! [`qmp::QmpClient`], controls it: pause and resume, power-down, NIC and block hotplug into
//! free `pcie-root-port`s on q35. The configuration's root filesystem `image`, when set, is
//! the first block device: read-only virtio-blk, device id [`IMAGE_DEVICE_ID`].
//!
//! Shared filesystems (`shared_fs = virtio-fs`) are `vhost-user-fs` devices, each served by
//! its own sandboxed `virtiofsd` that this crate starts and watches like QEMU, over guest RAM
//! from a shared memfd; see [`virtiofs`].
//!
//! VM templates ([`hypervisor::Boot`]): a template's source keeps its RAM in the template's
//! memory file, mapped shared; `save_template` saves its device state beside it; a clone maps
//! the file copy-on-write, restores the state at start and runs with a new `vmgenid`. See
//! the `template` module. Not with virtio-fs (vhost-user needs shared RAM) nor on microvm.
//!
//! QEMU dies with the process that started it (a parent-death signal, see [`process`]), and
//! runs as confined as the configuration asks: its seccomp filter (`seccomp_sandbox`, on by
//! default), an unprivileged user (`rootless`), a chroot (`chroot`); it opens no file of the
//! sandbox by path, so the run files stay root-owned, sockets and logs 0600 in 0700
//! directories. [`check_confinement`] says what a configuration gets on this host.
//!
//! QEMU is not trusted to answer in time. A hotplug whose QMP reply is late or lost is
//! settled with QEMU's own lists (`qom-list /machine/peripheral`, `query-named-block-nodes`)
//! before the next device operation: the device is adopted if QEMU has it, or what is half
//! there is removed. A root port is freed only once the guest released its device; an unplug
//! the guest has not acknowledged stays pending (its port reserved). `stop` waits for no
//! operation's QMP command or event: a boot, hotplug, unplug or pause in progress gives up at
//! its next wait (the operations are cancel-safe there). A QEMU that exits mid-operation fails
//! the operation at once with its exit. QEMU exits 0 on a guest power-off, a `quit` and
//! SIGTERM alike; the reason of its last `SHUTDOWN` event tells them apart
//! (`ExitReason::GuestShutdown`, or `ExitReason::HostRequest` naming the quit or the signal).
//! A `start` whose future is dropped kills the QEMU it spawned.
//!
//! The VM itself is [`hypervisor::Vm`], the lifecycle core (states, guarded transitions, the
//! exit record, stop preempting an operation, run directories), over [`Qemu`], this crate's
//! [`hypervisor::Backend`]: [`QemuHypervisor`] names the pair.
//!
//! This crate must never depend on Dragonball's crates (`dbs-*`), not even for tests; the
//! workspace's boundary test enforces that.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use hypervisor::{device::NetworkConfig, DeviceConfig, DeviceManager, Hypervisor};
//! use hypervisor::{HypervisorConfig, SandboxSpec, Vm};
//! use hypervisor_qemu::{Qemu, QemuOptions};
//!
//! # async fn run() -> hypervisor::Result<()> {
//! let log = slog::Logger::root(slog::Discard, slog::o!());
//! let vm = Arc::new(Vm::new(Qemu::new(log, QemuOptions::default())));
//! vm.prepare(&SandboxSpec {
//!     id: "demo".into(),
//!     netns: Some("/run/netns/demo".into()),
//!     config: HypervisorConfig {
//!         kernel: "/var/lib/guest/vmlinuz".into(),
//!         initrd: Some("/var/lib/guest/initramfs.img".into()),
//!         ..Default::default()
//!     },
//! })
//! .await?;
//! let devices = DeviceManager::new(vm.clone());
//! let nic = NetworkConfig::tap("tap0", "02:00:00:00:00:01".parse()?);
//! devices.add(DeviceConfig::Network(nic)).await?;
//! vm.start(Duration::from_secs(30)).await?;
//! println!("agent at {}", vm.agent_address().await?);
//! vm.cleanup().await
//! # }
//! ```

#![warn(missing_docs)]

pub mod cmdline;
mod confine;
mod exit;
pub mod host;
mod hotplug;
mod lifecycle;
pub mod process;
pub mod qmp;
mod reconcile;
mod restore;
mod share;
mod template;
mod unplug;
pub mod virtiofs;

pub use confine::{check_confinement, ConfinementCheck, ConfinementState};
pub use hotplug::IMAGE_DEVICE_ID;
pub use restore::restore;
pub use template::MigrationFailed;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hypervisor::{
    AgentAddress, AgentChannelSource, Capabilities, DeviceId, DeviceInfo, Error, Lifecycle, Result,
    Vm,
};

use crate::cmdline::{Accel, Machine, PciPlace};
use crate::host::HostFeatures;
use crate::process::QemuProcess;
use crate::qmp::QmpClient;

/// The backend's name in errors and saved state.
pub const BACKEND: &str = "qemu";

/// A QEMU VM: the lifecycle core over the [`Qemu`] backend.
pub type QemuHypervisor = Vm<Qemu>;

/// The TCG translation buffer's default size, MiB: a boot of the `make guest-assets` guest
/// fills about 48 MiB of QEMU's 1 GiB default; with 32 it used 14 MiB less and its boot took
/// no measurably longer.
pub const DEFAULT_TB_SIZE_MIB: u32 = 32;

/// Options of this backend that are not part of the VM's configuration.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// QEMU binary used when the configuration's `path` is unset.
    pub default_binary: PathBuf,
    /// Parent of the per-sandbox run directories (QMP and agent sockets, logs).
    pub run_root: PathBuf,
    /// Free `pcie-root-port`s created at start for hotplug (q35).
    pub hotplug_ports: u8,
    /// How long `stop` waits for the guest to power off before asking QEMU to quit.
    pub stop_grace: Duration,
    /// Time limit of a QMP command.
    pub qmp_timeout: Duration,
    /// How long an unplug waits for the guest to release the device.
    pub unplug_timeout: Duration,
    /// Kernel parameters put after the backend's own (serial console, reboot, panic) and
    /// before the configuration's `kernel_params`; [`cmdline::LEAN_KERNEL_PARAMS`] by
    /// default. Empty: the guest gets the backend's own only.
    pub boot_params: String,
    /// Firmware of q35 guests (`-bios`): [`cmdline::QBOOT`] by default; `None` leaves
    /// QEMU's own (SeaBIOS). microvm guests always get QEMU's (its qboot build).
    pub q35_firmware: Option<PathBuf>,
    /// Under TCG, the translation buffer's size in MiB: [`DEFAULT_TB_SIZE_MIB`] by default.
    /// QEMU's own default reserves 1 GiB, and every page of it the guest's code ever filled
    /// stays resident; `None` leaves QEMU's.
    pub tcg_tb_size_mib: Option<u32>,
}

impl Default for QemuOptions {
    fn default() -> Self {
        QemuOptions {
            default_binary: "/usr/bin/qemu-system-x86_64".into(),
            run_root: "/run/kata-hypervisor/qemu".into(),
            hotplug_ports: 4,
            stop_grace: Duration::from_secs(1),
            qmp_timeout: Duration::from_secs(10),
            unplug_timeout: Duration::from_secs(30),
            boot_params: cmdline::LEAN_KERNEL_PARAMS.to_string(),
            q35_firmware: Some(cmdline::QBOOT.into()),
            tcg_tb_size_mib: Some(DEFAULT_TB_SIZE_MIB),
        }
    }
}

/// Files of one sandbox in its run directory.
#[derive(Debug, Clone)]
struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    fn agent(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
}

/// A cold-plugged device waiting for start, holding what QEMU will need.
#[derive(Debug)]
enum ColdDevice {
    Nic {
        info: DeviceInfo,
        taps: Vec<OwnedFd>,
        vhost: Vec<OwnedFd>,
        queue_size: Option<u16>,
        mtu: Option<u32>,
        place: Option<PciPlace>,
    },
    Block {
        info: DeviceInfo,
        path: PathBuf,
        read_only: bool,
        place: Option<PciPlace>,
    },
    SharedFs {
        info: DeviceInfo,
        share: hypervisor::SharedFsConfig,
        place: Option<PciPlace>,
    },
}

impl ColdDevice {
    fn info(&self) -> &DeviceInfo {
        match self {
            ColdDevice::Nic { info, .. }
            | ColdDevice::Block { info, .. }
            | ColdDevice::SharedFs { info, .. } => info,
        }
    }
}

/// A free or used hotplug root port.
#[derive(Debug, Clone)]
struct RootPort {
    id: String,
    slot: u8,
    used_by: Option<DeviceId>,
}

/// What the QEMU backend keeps for one sandbox, under the VM's operation lock.
#[derive(Debug, Default)]
pub struct QemuSandbox {
    machine: Option<Machine>,
    accel: Option<Accel>,
    agent: Option<AgentAddress>,
    run: Option<RunDir>,
    cold: Vec<ColdDevice>,
    hot: BTreeMap<DeviceId, DeviceInfo>,
    /// Hotplugs in flight or of unknown outcome, their ports reserved (see `reconcile`).
    unsettled: BTreeMap<DeviceId, reconcile::Unsettled>,
    /// Hot-plugged devices whose unplug the guest has not acknowledged yet.
    unplugging: BTreeSet<DeviceId>,
    ports: Vec<RootPort>,
    next_root_slot: u8,
    qmp: Option<Arc<QmpClient>>,
    process: Option<QemuProcess>,
    /// The virtio-fs daemon, when `shared_fs` is `virtio-fs`.
    daemon: Option<virtiofs::Daemon>,
    /// The running virtiofsd of each share.
    virtiofsd: BTreeMap<DeviceId, virtiofs::Virtiofsd>,
}

/// The QEMU backend: QEMU's own steps of the lifecycle. See the crate docs.
#[derive(Debug)]
pub struct Qemu {
    log: slog::Logger,
    opts: QemuOptions,
    host: HostFeatures,
}

impl Qemu {
    /// The backend, probing the host once.
    pub fn new(log: slog::Logger, opts: QemuOptions) -> Self {
        Self::with_host(log, opts, HostFeatures::probe())
    }

    /// Like [`new`](Self::new) with given host features (to force a configuration).
    pub fn with_host(log: slog::Logger, opts: QemuOptions, host: HostFeatures) -> Self {
        Qemu {
            log: log.new(slog::o!("backend" => BACKEND)),
            opts,
            host,
        }
    }

    /// The host features this backend decides with.
    pub fn host(&self) -> HostFeatures {
        self.host
    }

    /// What to report for a failed QMP command: when the connection closed because QEMU
    /// exited, QEMU's exit (waiting briefly for the exit watcher to record it), else `e`.
    async fn qmp_cause(
        &self,
        life: &Lifecycle,
        e: qmp::QmpError,
    ) -> Box<dyn std::error::Error + Send + Sync> {
        if e.is_closed() {
            if let Some(exit) = life.exit_within(Duration::from_secs(2)).await {
                return Box::new(Error::VmmExited(exit));
            }
        }
        Box::new(e)
    }

    /// A failed QMP step as a backend error whose cause is QEMU's exit when it exited.
    async fn qmp_failure(&self, life: &Lifecycle, step: String, e: qmp::QmpError) -> Error {
        Error::Backend {
            step,
            source: self.qmp_cause(life, e).await,
        }
    }

    fn capabilities_for(&self, machine: Option<Machine>, shared_fs: bool) -> Capabilities {
        let pci = machine.unwrap_or(Machine::Q35) == Machine::Q35;
        Capabilities {
            network_hotplug: pci,
            block_hotplug: pci,
            multi_queue: true,
            tap_fds: true,
            pause: true,
            vsock: self.host.vhost_vsock,
            in_process: false,
            agent_channel: AgentChannelSource::Builtin,
            shared_fs,
            shared_fs_hotplug: shared_fs && pci,
            // vhost-user needs guest RAM shared; a template's clones map it private.
            templates: !shared_fs,
        }
    }

    fn unsupported(operation: impl Into<String>, reason: impl Into<String>) -> Error {
        hypervisor::vm::unsupported(BACKEND, operation, reason)
    }
}

/// What a QEMU VM offers beyond the [`hypervisor::Hypervisor`] trait.
#[async_trait]
pub trait QemuVm {
    /// Runs a raw QMP `command` on the running VM's monitor and returns its `return` value.
    /// For diagnostics and tests (`query-pci`, `qom-list`, `human-monitor-command`): devices
    /// changed this way are unknown to the backend, whose device operations are the way to
    /// change the VM.
    async fn qmp_execute(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value>;
}

#[async_trait]
impl QemuVm for Vm<Qemu> {
    async fn qmp_execute(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let qmp = self
            .with_sandbox(|s| s.qmp.clone())
            .await
            .ok_or(Error::InvalidState {
                operation: hypervisor::Operation::Start,
                state: self.lifecycle().state(),
            })?;
        qmp.execute(command, arguments, self.backend().opts.qmp_timeout)
            .await
            .map_err(|e| Error::backend(format!("Running QMP command {command}"), e))
    }
}

/// An error and its sources on one line, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    hypervisor::vm::error_chain(e)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hypervisor::{Hypervisor, HypervisorConfig, SandboxSpec, VmState, VmmPids};

    /// A prepared-nothing backend whose QMP connection is a scripted fake QEMU, on a host
    /// with no KVM and no vhost.
    pub(crate) async fn on_fake_qmp(
        opts: QemuOptions,
    ) -> (Qemu, QemuSandbox, crate::qmp::tests::FakeQemu) {
        let (client, fake) = crate::qmp::tests::connected().await;
        let host = HostFeatures {
            hw_virt: false,
            kvm_device: false,
            vhost_net: false,
            vhost_vsock: false,
        };
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let sandbox = QemuSandbox {
            qmp: Some(Arc::new(client)),
            ..QemuSandbox::default()
        };
        (Qemu::with_host(log, opts, host), sandbox, fake)
    }

    /// A running VM on a fake QEMU, with a long QMP timeout, so that only a preemption can
    /// end a wait quickly.
    async fn running_on_fake(
        run_root: &std::path::Path,
    ) -> (QemuHypervisor, crate::qmp::tests::FakeQemu) {
        let (qemu, sandbox, fake) = on_fake_qmp(QemuOptions {
            qmp_timeout: Duration::from_secs(60),
            run_root: run_root.to_path_buf(),
            ..QemuOptions::default()
        })
        .await;
        let spec = SandboxSpec {
            id: "fake".into(),
            netns: None,
            config: HypervisorConfig::default(),
        };
        let hv = Vm::restored(
            qemu,
            spec,
            run_root.join("fake"),
            VmState::Running,
            VmmPids::default(),
            sandbox,
        );
        (hv, fake)
    }

    #[tokio::test]
    async fn stop_preempts_a_qmp_command_that_qemu_does_not_answer() {
        let run_root = tempfile::tempdir().unwrap();
        let (hv, mut fake) = running_on_fake(run_root.path()).await;
        let began = std::time::Instant::now();
        let pause = async {
            let r = hv.pause().await;
            (r, began.elapsed())
        };
        let stop = async {
            // QEMU has the pause's command and sits on it.
            fake.expect("stop").await;
            hv.stop().await
        };
        let ((paused, took), stopped) = tokio::join!(pause, stop);
        stopped.expect("stop succeeds");
        let err = paused.expect_err("the pause was preempted");
        assert!(error_chain(&err).contains("the VM is stopping"), "{err}");
        assert!(
            took < Duration::from_secs(5),
            "pause held stop for {took:?}"
        );
        assert_eq!(hv.state().await, VmState::Stopped);
        // The stop took its count back: a later operation is refused by the state only.
        assert!(matches!(
            hv.resume().await.unwrap_err(),
            Error::InvalidState { .. }
        ));
    }
}
