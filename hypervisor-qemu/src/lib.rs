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
//! State changes are compare-and-set, so an exit recorded meanwhile is never overwritten,
//! and a `start` whose future is dropped kills the QEMU it spawned and records its end.
//!
//! This crate must never depend on Dragonball's crates (`dbs-*`), not even for tests; the
//! workspace's boundary test enforces that.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use hypervisor::{device::NetworkConfig, Device, DeviceConfig, DeviceId, Hypervisor};
//! use hypervisor::{HypervisorConfig, SandboxSpec};
//! use hypervisor_qemu::{QemuHypervisor, QemuOptions};
//!
//! # async fn run() -> hypervisor::Result<()> {
//! let log = slog::Logger::root(slog::Discard, slog::o!());
//! let vm = Arc::new(QemuHypervisor::new(log, QemuOptions::default()));
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
//! let nic = NetworkConfig::tap("tap0", "02:00:00:00:00:01".parse()?);
//! vm.add_device(Device { id: DeviceId::new("net0")?, config: DeviceConfig::Network(nic) })
//!     .await?;
//! vm.start(Duration::from_secs(30)).await?;
//! println!("agent at {}", vm.agent_address().await?);
//! vm.cleanup().await
//! # }
//! ```

#![warn(missing_docs)]

pub mod cmdline;
mod confine;
pub mod host;
mod hotplug;
mod lifecycle;
pub mod process;
pub mod qmp;
mod reconcile;

pub use confine::{check_confinement, ConfinementCheck, ConfinementState};
pub use hotplug::IMAGE_DEVICE_ID;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hypervisor::{
    AgentAddress, Capabilities, Device, DeviceId, DeviceInfo, Error, ExitReason, Hypervisor,
    HypervisorConfig, Result, SandboxSpec, SavedState, VmExit, VmState, VmmPids,
};
use tokio::sync::watch;

use crate::cmdline::{Accel, Machine, PciPlace};
use crate::host::HostFeatures;
use crate::process::QemuProcess;
use crate::qmp::QmpClient;

/// The backend's name in errors and saved state.
pub const BACKEND: &str = "qemu";

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
        }
    }
}

/// Files of one sandbox under the run root.
#[derive(Debug, Clone)]
struct RunDir {
    dir: PathBuf,
    /// The configured console log, if any (it outlives the run directory).
    console_log: Option<PathBuf>,
}

impl RunDir {
    fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    fn agent(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    fn console(&self) -> PathBuf {
        self.console_log
            .clone()
            .unwrap_or_else(|| self.dir.join("console.log"))
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
}

impl ColdDevice {
    fn info(&self) -> &DeviceInfo {
        match self {
            ColdDevice::Nic { info, .. } | ColdDevice::Block { info, .. } => info,
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

/// State shared with the task that watches QEMU exit.
#[derive(Debug)]
struct Shared {
    status: Mutex<Status>,
    exit: watch::Sender<Option<VmExit>>,
    stopping: AtomicBool,
    /// How many `stop` calls are under way, counted from before they wait for the operation
    /// lock: while it is not zero, an operation holding the lock gives up its QMP waits at
    /// once (see [`QemuHypervisor::unless_stopping`]), so stop is not delayed by a hotplug, an
    /// unplug waiting for the guest, a pause or a boot. A stop future that is dropped takes
    /// its count back ([`StopRequest`]).
    stop_requested: watch::Sender<u32>,
}

/// One `stop` under way, counted in [`Shared::stop_requested`] for as long as it lives.
struct StopRequest<'a>(&'a Shared);

impl<'a> StopRequest<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.stop_requested.send_modify(|n| *n += 1);
        StopRequest(shared)
    }
}

impl Drop for StopRequest<'_> {
    fn drop(&mut self) {
        self.0.stop_requested.send_modify(|n| *n -= 1);
    }
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

    /// Sets `state`, except that nothing leaves `Stopped`: the exit watcher may have set it
    /// while an operation was in flight, and it is final. Returns whether the state is now
    /// `state`.
    fn set_state(&self, state: VmState) -> bool {
        let mut st = self.status();
        if st.state == VmState::Stopped && state != VmState::Stopped {
            return false;
        }
        st.state = state;
        true
    }

    /// Compare-and-set: moves from `from` to `to` only if the state is still `from` (a VM
    /// that exited meanwhile stays `Stopped`). Returns whether it moved.
    fn transition(&self, from: VmState, to: VmState) -> bool {
        let mut st = self.status();
        if st.state != from {
            return false;
        }
        st.state = to;
        true
    }
}

/// Everything that changes under the operation lock.
#[derive(Debug, Default)]
struct Inner {
    spec: Option<SandboxSpec>,
    machine: Option<Machine>,
    accel: Option<Accel>,
    agent: Option<AgentAddress>,
    run: Option<RunDir>,
    cold: Vec<ColdDevice>,
    hot: BTreeMap<DeviceId, DeviceInfo>,
    /// Hotplugs in flight or of unknown outcome, their ports reserved (see `reconcile`).
    unsettled: BTreeMap<DeviceId, reconcile::Unsettled>,
    /// Hot-plugged devices whose unplug the guest has not acknowledged yet.
    unplugging: std::collections::BTreeSet<DeviceId>,
    ports: Vec<RootPort>,
    next_root_slot: u8,
    qmp: Option<Arc<QmpClient>>,
    process: Option<QemuProcess>,
}

/// A QEMU VM. See the crate docs.
#[derive(Debug)]
pub struct QemuHypervisor {
    log: slog::Logger,
    opts: QemuOptions,
    host: HostFeatures,
    shared: Arc<Shared>,
    inner: tokio::sync::Mutex<Inner>,
}

impl QemuHypervisor {
    /// A backend in state `Created`, probing the host once.
    pub fn new(log: slog::Logger, opts: QemuOptions) -> Self {
        Self::with_host(log, opts, HostFeatures::probe())
    }

    /// Like [`new`](Self::new) with given host features (to force a configuration).
    pub fn with_host(log: slog::Logger, opts: QemuOptions, host: HostFeatures) -> Self {
        QemuHypervisor {
            log: log.new(slog::o!("backend" => BACKEND)),
            opts,
            host,
            shared: Arc::new(Shared {
                status: Mutex::new(Status {
                    state: VmState::Created,
                    pids: None,
                }),
                exit: watch::channel(None).0,
                stopping: AtomicBool::new(false),
                stop_requested: watch::channel(0).0,
            }),
            inner: tokio::sync::Mutex::default(),
        }
    }

    /// Runs a raw QMP `command` on the running VM's monitor and returns its `return` value.
    /// For diagnostics and tests (`query-pci`, `qom-list`, `human-monitor-command`): devices
    /// changed this way are unknown to this backend, whose `add_device`/`remove_device` are
    /// the way to change the VM.
    pub async fn qmp_execute(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let qmp = self
            .inner
            .lock()
            .await
            .qmp
            .clone()
            .ok_or(Error::InvalidState {
                operation: hypervisor::Operation::Start,
                state: self.shared.state(),
            })?;
        qmp.execute(command, arguments, self.opts.qmp_timeout)
            .await
            .map_err(|e| Error::backend(format!("Running QMP command {command}"), e))
    }

    /// What to report for a failed QMP command: when the connection closed because QEMU
    /// exited, QEMU's exit (waiting briefly for the exit watcher to record it), else `e`.
    async fn qmp_cause(&self, e: qmp::QmpError) -> Box<dyn std::error::Error + Send + Sync> {
        if e.is_closed() {
            let mut rx = self.shared.exit.subscribe();
            let exited =
                tokio::time::timeout(Duration::from_secs(2), rx.wait_for(Option::is_some)).await;
            if let Ok(Ok(exit)) = exited {
                return Box::new(Error::VmmExited(exit.clone().expect("waited for Some")));
            }
        }
        Box::new(e)
    }

    /// A failed QMP step as a backend error whose cause is QEMU's exit when it exited.
    async fn qmp_failure(&self, step: String, e: qmp::QmpError) -> Error {
        Error::Backend {
            step,
            source: self.qmp_cause(e).await,
        }
    }

    /// The error for `op` refused by the state: QEMU's exit when it exited.
    fn exited_or_state(&self, op: hypervisor::Operation) -> Error {
        let state = self.shared.state();
        match self.shared.exit.borrow().clone() {
            // A stop the runtime asked for is a state, not a surprise.
            Some(exit) if state == VmState::Stopped && exit.reason != ExitReason::Stopped => {
                Error::VmmExited(exit)
            }
            _ => Error::InvalidState {
                operation: op,
                state,
            },
        }
    }

    /// Checks that `op` is allowed now, and reports QEMU's exit when it is not because QEMU
    /// exited.
    fn check_op(&self, op: hypervisor::Operation) -> Result<VmState> {
        self.shared
            .state()
            .next(op)
            .map_err(|_| self.exited_or_state(op))
    }

    /// Runs `op`, an operation under the operation lock, unless a `stop` is under way: then
    /// `op` is dropped at its next await and the call fails with `stopping()`. Every operation
    /// is cancel-safe at its awaits (a hotplug is recorded before its first command and
    /// settled later, a dropped start kills its QEMU), and the VM is about to stop anyway.
    async fn unless_stopping<T>(
        &self,
        op: impl std::future::Future<Output = Result<T>>,
        stopping: impl FnOnce() -> Error,
    ) -> Result<T> {
        let mut stop = self.shared.stop_requested.subscribe();
        tokio::select! {
            biased;
            _ = stop.wait_for(|n| *n > 0) => Err(stopping()),
            r = op => r,
        }
    }

    /// The host features this backend decided with.
    pub fn host(&self) -> HostFeatures {
        self.host
    }

    fn capabilities_for(&self, machine: Option<Machine>) -> Capabilities {
        let pci = machine.unwrap_or(Machine::Q35) == Machine::Q35;
        Capabilities {
            network_hotplug: pci,
            block_hotplug: pci,
            multi_queue: true,
            tap_fds: true,
            pause: true,
            vsock: self.host.vhost_vsock,
            in_process: false,
            agent_channel: hypervisor::AgentChannelSource::Builtin,
        }
    }

    fn unsupported(operation: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Unsupported {
            backend: BACKEND,
            operation: operation.into(),
            reason: reason.into(),
        }
    }
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
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
            .map_err(|e| Error::backend("Waiting for QEMU to exit", e))?;
        Ok(exit.clone().expect("waited for Some"))
    }

    async fn pause(&self) -> Result<()> {
        self.do_pause_resume(true).await
    }

    async fn resume(&self) -> Result<()> {
        self.do_pause_resume(false).await
    }

    async fn add_device(&self, device: Device) -> Result<DeviceInfo> {
        self.do_add_device(device).await
    }

    async fn remove_device(&self, id: &DeviceId) -> Result<()> {
        self.do_remove_device(id).await
    }

    async fn state(&self) -> VmState {
        self.shared.state()
    }

    async fn capabilities(&self) -> Capabilities {
        let machine = self.inner.lock().await.machine;
        self.capabilities_for(machine)
    }

    async fn pids(&self) -> Result<VmmPids> {
        let st = self.shared.status();
        st.pids.clone().ok_or(Error::InvalidState {
            operation: hypervisor::Operation::Start,
            state: st.state,
        })
    }

    async fn agent_address(&self) -> Result<AgentAddress> {
        self.inner
            .lock()
            .await
            .agent
            .clone()
            .ok_or(Error::InvalidState {
                operation: hypervisor::Operation::Prepare,
                state: self.shared.state(),
            })
    }

    async fn console_log(&self) -> Option<PathBuf> {
        self.inner.lock().await.run.as_ref().map(RunDir::console)
    }

    async fn netns(&self) -> Option<PathBuf> {
        let inner = self.inner.lock().await;
        inner.spec.as_ref().and_then(|s| s.netns.clone())
    }

    async fn config(&self) -> Result<HypervisorConfig> {
        let inner = self.inner.lock().await;
        let spec = inner.spec.as_ref().ok_or(Error::InvalidState {
            operation: hypervisor::Operation::Prepare,
            state: self.shared.state(),
        })?;
        let mut config = spec.config.clone();
        config.path = Some(self.binary(&config));
        config.machine_type = inner.machine.map(|m| m.as_str().to_string());
        Ok(config)
    }

    async fn save_state(&self) -> Result<SavedState> {
        self.do_save_state().await
    }

    async fn cleanup(&self) -> Result<()> {
        self.do_cleanup().await
    }
}

/// An error and its sources on one line, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn shared(state: VmState) -> Shared {
        Shared {
            status: Mutex::new(Status { state, pids: None }),
            exit: watch::channel(None).0,
            stopping: AtomicBool::new(false),
            stop_requested: watch::channel(0).0,
        }
    }

    #[test]
    fn a_transition_from_a_state_the_vm_left_does_nothing() {
        // pause finished its QMP command after the exit watcher recorded the exit.
        let s = shared(VmState::Stopped);
        assert!(!s.transition(VmState::Running, VmState::Paused));
        assert_eq!(s.state(), VmState::Stopped);
        let s = shared(VmState::Running);
        assert!(s.transition(VmState::Running, VmState::Paused));
        assert_eq!(s.state(), VmState::Paused);
    }

    /// A prepared-nothing backend whose QMP connection is a scripted fake QEMU, on a host
    /// with no KVM and no vhost.
    pub(crate) async fn on_fake_qmp(
        opts: QemuOptions,
    ) -> (QemuHypervisor, crate::qmp::tests::FakeQemu) {
        let (client, fake) = crate::qmp::tests::connected().await;
        let host = HostFeatures {
            hw_virt: false,
            kvm_device: false,
            vhost_net: false,
            vhost_vsock: false,
        };
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let hv = QemuHypervisor::with_host(log, opts, host);
        hv.inner.lock().await.qmp = Some(Arc::new(client));
        (hv, fake)
    }

    /// A running backend on a fake QEMU, with a long QMP timeout, so that only a
    /// preemption can end a wait quickly.
    async fn running_on_fake() -> (QemuHypervisor, crate::qmp::tests::FakeQemu) {
        let (hv, fake) = on_fake_qmp(QemuOptions {
            qmp_timeout: Duration::from_secs(60),
            ..QemuOptions::default()
        })
        .await;
        hv.shared.status().state = VmState::Running;
        (hv, fake)
    }

    #[tokio::test]
    async fn stop_preempts_a_qmp_command_that_qemu_does_not_answer() {
        let (hv, mut fake) = running_on_fake().await;
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
        assert_eq!(hv.shared.state(), VmState::Stopped);
        assert_eq!(
            *hv.shared.stop_requested.borrow(),
            0,
            "stop took its count back"
        );
    }

    #[tokio::test]
    async fn a_dropped_stop_does_not_leave_later_operations_preempted() {
        let (hv, mut fake) = running_on_fake().await;
        {
            // stop waits for the operation lock held here, and is dropped waiting.
            let _held = hv.inner.lock().await;
            let dropped = tokio::time::timeout(Duration::from_millis(50), hv.stop()).await;
            assert!(
                dropped.is_err(),
                "stop cannot finish while the lock is held"
            );
        }
        assert_eq!(*hv.shared.stop_requested.borrow(), 0);
        let script = async {
            let id = fake.expect("stop").await;
            fake.send(serde_json::json!({"return": {}, "id": id})).await;
            fake.send(serde_json::json!({"event": "STOP", "data": {}}))
                .await;
        };
        let (paused, ()) = tokio::join!(hv.pause(), script);
        paused.expect("a later pause is not preempted");
        assert_eq!(hv.shared.state(), VmState::Paused);
    }

    #[test]
    fn nothing_leaves_stopped() {
        let s = shared(VmState::Stopped);
        for state in [VmState::Prepared, VmState::Running, VmState::Paused] {
            assert!(!s.set_state(state));
            assert_eq!(s.state(), VmState::Stopped);
        }
        assert!(s.set_state(VmState::Stopped));
    }
}
