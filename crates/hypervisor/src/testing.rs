//! An in-memory [`Backend`] for hermetic tests of code built on the trait, and of the
//! lifecycle core itself.
//!
//! Only compiled for this crate's tests and with the `test-utils` feature; never part of a
//! release build. [`FakeHypervisor`] is the core's [`Vm`] over a backend that runs no VMM: it
//! follows the real [`VmState`](crate::VmState) machine (the core's), records every call that reaches the
//! backend, and can be told to fail, so that callers' rollback paths can be exercised
//! without a VMM. Its run directories live under a private directory in the system's temp
//! directory, removed when the fake is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use crate::device::{Device, DeviceConfig, DeviceId, DeviceInfo, GuestLocation};
use crate::error::{Error, Result};
use crate::state::PlugMode;
use crate::vm::{Backend, Context, Vm};
use crate::{AgentAddress, Capabilities, ExitReason, TemplateFiles, VmExit, VmmPids};

/// A call the fake backend received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `prepare(id)`.
    Prepare(String),
    /// `start`.
    Start,
    /// `stop`.
    Stop,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `add_device(id)`.
    Add(DeviceId),
    /// `remove_device(id)`.
    Remove(DeviceId),
    /// `cleanup`.
    Cleanup,
    /// `save_template`.
    SaveTemplate,
}

#[derive(Debug, Default)]
struct Record {
    attached: BTreeMap<DeviceId, DeviceInfo>,
    calls: Vec<Call>,
    adds_before_failure: Option<usize>,
    fail_next_remove: bool,
    hang_start: bool,
    fail_prepare: bool,
    next_slot: u8,
}

/// The fake backend. See the module docs.
#[derive(Debug)]
pub struct Fake {
    caps: Capabilities,
    run_root: PathBuf,
    record: Mutex<Record>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run_root);
    }
}

impl Fake {
    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn call(&self, call: Call) {
        self.lock().calls.push(call);
    }

    fn attach(&self, device: Device, mode: PlugMode) -> Result<DeviceInfo> {
        let mut rec = self.lock();
        rec.calls.push(Call::Add(device.id.clone()));
        if let Some(n) = rec.adds_before_failure.as_mut() {
            if *n == 0 {
                return Err(Error::device(
                    &device.id,
                    "Attaching",
                    "injected failure".to_string(),
                ));
            }
            *n -= 1;
        }
        rec.next_slot += 1;
        let slot = rec.next_slot;
        let (mac, queue_pairs, host) = match &device.config {
            DeviceConfig::Network(n) => (
                Some(n.guest_mac),
                Some(n.queue_pairs),
                Some(n.backend.tap_name().to_string()),
            ),
            DeviceConfig::Block(b) => (None, None, Some(b.path.display().to_string())),
            DeviceConfig::Vsock(_) => (None, None, None),
            DeviceConfig::SharedFs(f) => (None, None, Some(f.host_dir.display().to_string())),
        };
        let info = DeviceInfo {
            id: device.id.clone(),
            kind: device.config.kind(),
            location: GuestLocation::Pci {
                path: format!("{slot:02x}/00"),
            },
            hotplugged: mode == PlugMode::Hot,
            mac,
            queue_pairs,
            host,
        };
        rec.attached.insert(device.id, info.clone());
        Ok(info)
    }
}

#[async_trait]
impl Backend for Fake {
    type Sandbox = ();

    fn name(&self) -> &'static str {
        "fake"
    }

    fn run_root(&self) -> &Path {
        &self.run_root
    }

    async fn prepare(&self, _vm: &mut (), ctx: Context<'_>) -> Result<()> {
        self.call(Call::Prepare(ctx.spec.id.clone()));
        if self.lock().fail_prepare {
            return Err(Error::backend("Preparing", "injected failure".to_string()));
        }
        Ok(())
    }

    async fn start(&self, _vm: &mut (), _ctx: Context<'_>, _timeout: Duration) -> Result<VmmPids> {
        self.call(Call::Start);
        if self.lock().hang_start {
            std::future::pending::<()>().await;
        }
        Ok(VmmPids {
            vmm: std::process::id(),
            main_thread: std::process::id(),
            vcpus: Vec::new(),
        })
    }

    async fn stop(&self, _vm: &mut (), ctx: Context<'_>) -> Result<()> {
        self.call(Call::Stop);
        ctx.lifecycle.finish(VmExit {
            reason: ExitReason::Stopped,
            code: Some(0),
            signal: None,
        });
        Ok(())
    }

    async fn pause(&self, _vm: &mut (), _ctx: Context<'_>) -> Result<()> {
        self.call(Call::Pause);
        Ok(())
    }

    async fn resume(&self, _vm: &mut (), _ctx: Context<'_>) -> Result<()> {
        self.call(Call::Resume);
        Ok(())
    }

    /// With [`Capabilities::templates`], writes empty template files (the core checked the
    /// state and the boot); otherwise the default's "unsupported".
    async fn save_template(&self, _vm: &mut (), ctx: Context<'_>) -> Result<TemplateFiles> {
        self.call(Call::SaveTemplate);
        let dir = ctx
            .spec
            .config
            .boot
            .template_dir()
            .expect("checked: a template source");
        if !self.caps.templates {
            return Err(crate::vm::unsupported(
                "fake",
                "saving a template",
                "templates are off in this fake's capabilities",
            ));
        }
        let files = TemplateFiles::in_dir(dir);
        for f in [&files.memory, &files.state] {
            std::fs::write(f, b"")
                .map_err(|e| Error::backend(format!("Writing {}", f.display()), e))?;
        }
        Ok(files)
    }

    async fn cold_plug(
        &self,
        _vm: &mut (),
        _ctx: Context<'_>,
        device: Device,
    ) -> Result<DeviceInfo> {
        self.attach(device, PlugMode::Cold)
    }

    async fn hot_plug(
        &self,
        _vm: &mut (),
        _ctx: Context<'_>,
        device: Device,
    ) -> Result<DeviceInfo> {
        self.attach(device, PlugMode::Hot)
    }

    async fn remove(
        &self,
        _vm: &mut (),
        _ctx: Context<'_>,
        id: &DeviceId,
        _mode: PlugMode,
    ) -> Result<()> {
        let mut rec = self.lock();
        rec.calls.push(Call::Remove(id.clone()));
        if std::mem::take(&mut rec.fail_next_remove) {
            return Err(Error::device(
                id,
                "Detaching",
                "injected failure".to_string(),
            ));
        }
        rec.attached
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| Error::DeviceNotFound(id.clone()))
    }

    fn capabilities(&self, _vm: &()) -> Capabilities {
        self.caps
    }

    fn agent_address(&self, _vm: &()) -> Result<AgentAddress> {
        Ok(AgentAddress::Vsock { cid: 3, port: 1024 })
    }

    fn saved(&self, _vm: &()) -> (Vec<DeviceInfo>, serde_json::Value) {
        (
            self.lock().attached.values().cloned().collect(),
            serde_json::Value::Null,
        )
    }

    async fn release(&self, _vm: &mut ()) -> Result<()> {
        let mut rec = self.lock();
        rec.calls.push(Call::Cleanup);
        rec.attached.clear();
        Ok(())
    }
}

/// The test double: the lifecycle core over [`Fake`]. See the module docs.
pub type FakeHypervisor = Vm<Fake>;

impl Vm<Fake> {
    /// A fake in state `Created` with the given capabilities.
    pub fn fake(caps: Capabilities) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let run_root = std::env::temp_dir().join(format!(
            "hypervisor-fake-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Vm::new(Fake {
            caps,
            run_root,
            record: Mutex::default(),
        })
    }

    /// Every call the backend received so far.
    pub fn calls(&self) -> Vec<Call> {
        self.backend().lock().calls.clone()
    }

    /// Ids of the devices the "VM" has now.
    pub fn attached(&self) -> Vec<DeviceId> {
        self.backend().lock().attached.keys().cloned().collect()
    }

    /// Lets `n` more device additions succeed, then fails every one after.
    pub fn fail_add_after(&self, n: usize) {
        self.backend().lock().adds_before_failure = Some(n);
    }

    /// Makes the next device removal fail.
    pub fn fail_next_remove(&self) {
        self.backend().lock().fail_next_remove = true;
    }

    /// Makes the backend's `prepare` step fail.
    pub fn fail_prepare(&self) {
        self.backend().lock().fail_prepare = true;
    }

    /// Makes `start` wait forever (a VMM that never becomes controllable).
    pub fn hang_start(&self) {
        self.backend().lock().hang_start = true;
    }

    /// Simulates the VMM dying on its own.
    pub fn crash(&self, why: &str) {
        self.lifecycle().finish(VmExit {
            reason: ExitReason::Crashed(why.into()),
            code: None,
            signal: Some(9),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::device::NetworkConfig;
    use crate::{
        Hypervisor, HypervisorConfig, MacAddress, Operation, SandboxSpec, SavedState, VmState,
    };

    fn spec() -> SandboxSpec {
        SandboxSpec {
            id: "s1".into(),
            netns: Some("/proc/self/ns/net".into()),
            config: HypervisorConfig {
                kernel: "/k".into(),
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn wait_exit_reports_a_crash() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        fake.prepare(&spec()).await.unwrap();
        fake.start(Duration::from_secs(1)).await.unwrap();
        fake.crash("vCPU 0: emulation failure");
        let exit = fake.wait_exit().await.unwrap();
        assert!(matches!(exit.reason, ExitReason::Crashed(_)));
        // Refused naming the crash, not just the state.
        assert!(matches!(
            fake.pause().await.unwrap_err(),
            Error::VmmExited(VmExit {
                reason: ExitReason::Crashed(_),
                ..
            })
        ));
    }

    #[tokio::test]
    async fn saved_state_round_trips_through_json() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        fake.prepare(&spec()).await.unwrap();
        let saved = fake.save_state().await.unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SavedState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        assert_eq!(back.sandbox.netns, Some("/proc/self/ns/net".into()));
    }

    #[tokio::test]
    async fn an_invalid_sandbox_id_is_rejected_at_prepare() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        let mut s = spec();
        s.id = "../etc".into();
        let err = fake.prepare(&s).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig(ref c) if c.field == "id"),
            "{err}"
        );
        assert_eq!(fake.state().await, VmState::Created);
    }

    fn nic() -> Device {
        Device {
            id: DeviceId::new("net0").unwrap(),
            config: DeviceConfig::Network(NetworkConfig::tap(
                "tap0",
                MacAddress([2, 0, 0, 0, 0, 1]),
            )),
        }
    }

    #[tokio::test]
    async fn prepare_creates_a_private_run_directory_and_cleanup_removes_it() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        fake.prepare(&spec_without_netns()).await.unwrap();
        let dir = fake.backend().run_root().join("s1");
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
        assert_eq!(fake.console_log().await, Some(dir.join("console.log")));
        fake.cleanup().await.unwrap();
        assert!(!dir.exists());
        assert_eq!(fake.state().await, VmState::Stopped);
    }

    fn spec_without_netns() -> SandboxSpec {
        SandboxSpec {
            netns: None,
            ..spec()
        }
    }

    #[tokio::test]
    async fn a_missing_namespace_fails_prepare_naming_it_with_nothing_created() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        let missing = SandboxSpec {
            netns: Some("/run/netns/x".into()),
            ..spec()
        };
        let err = fake.prepare(&missing).await.unwrap_err();
        assert!(
            err.to_string().contains("invalid configuration")
                && matches!(&err, Error::InvalidConfig(c) if c.field == "netns"
                    && c.problem.contains("/run/netns/x does not exist")),
            "{err:?}"
        );
        assert!(
            !fake.backend().run_root().exists(),
            "the run root it made is gone"
        );
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }

    #[tokio::test]
    async fn a_prepare_the_backend_refuses_leaves_no_directory() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        fake.fail_prepare();
        fake.prepare(&spec_without_netns()).await.unwrap_err();
        assert!(!fake.backend().run_root().exists());
        assert_eq!(fake.state().await, VmState::Created);
    }

    #[tokio::test]
    async fn a_run_directory_left_behind_refuses_the_id() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        std::fs::create_dir_all(fake.backend().run_root().join("s1")).unwrap();
        let err = fake.prepare(&spec_without_netns()).await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(c) if c.field == "id" && c.problem.contains("already exists")),
            "{err:?}"
        );
        assert_eq!(fake.state().await, VmState::Created);
    }

    #[tokio::test]
    async fn a_plug_mode_that_does_not_match_the_state_is_refused_before_the_backend() {
        let fake = FakeHypervisor::fake(Capabilities {
            network_hotplug: true,
            ..Default::default()
        });
        fake.prepare(&spec_without_netns()).await.unwrap();
        let err = fake.add_device(nic(), PlugMode::Hot).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidState {
                    operation: Operation::AddDevice,
                    state: VmState::Prepared
                }
            ),
            "{err:?}"
        );
        assert!(!fake.calls().iter().any(|c| matches!(c, Call::Add(_))));
        assert!(
            !fake
                .add_device(nic(), PlugMode::Cold)
                .await
                .unwrap()
                .hotplugged
        );
        fake.cleanup().await.unwrap();
    }

    #[tokio::test]
    async fn hotplug_the_backend_cannot_do_is_unsupported_before_the_backend() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        fake.prepare(&spec_without_netns()).await.unwrap();
        fake.start(Duration::from_secs(1)).await.unwrap();
        let err = fake.add_device(nic(), PlugMode::Hot).await.unwrap_err();
        assert!(err.is_unsupported(), "{err:?}");
        assert!(!fake.calls().iter().any(|c| matches!(c, Call::Add(_))));
        fake.cleanup().await.unwrap();
    }

    #[tokio::test]
    async fn stopping_a_vm_that_never_ran_ends_wait_exit_as_stopped() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        fake.prepare(&spec_without_netns()).await.unwrap();
        fake.stop().await.unwrap();
        let exit = fake.wait_exit().await.unwrap();
        assert_eq!(exit.reason, ExitReason::Stopped);
        assert!(!fake.calls().contains(&Call::Stop), "no VMM to stop");
        fake.cleanup().await.unwrap();
    }

    #[tokio::test]
    async fn a_dropped_start_leaves_the_vm_stopped_with_an_exit() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        fake.prepare(&spec_without_netns()).await.unwrap();
        fake.hang_start();
        let started = tokio::time::timeout(Duration::from_millis(20), fake.start(Duration::MAX));
        assert!(started.await.is_err(), "the fake's start never returns");
        assert_eq!(fake.state().await, VmState::Stopped);
        assert_eq!(fake.wait_exit().await.unwrap().reason, ExitReason::Stopped);
        fake.cleanup().await.unwrap();
    }

    #[tokio::test]
    async fn stop_ends_a_start_in_progress() {
        let fake = std::sync::Arc::new(FakeHypervisor::fake(Capabilities::default()));
        fake.prepare(&spec_without_netns()).await.unwrap();
        fake.hang_start();
        let (started, stopped) = tokio::join!(fake.start(Duration::MAX), async {
            tokio::task::yield_now().await;
            fake.stop().await
        });
        assert_eq!(started.unwrap_err().to_string(), "Starting the fake VM");
        stopped.unwrap();
        assert_eq!(fake.state().await, VmState::Stopped);
        fake.cleanup().await.unwrap();
    }

    #[tokio::test]
    async fn an_exit_during_an_operation_wins_over_its_transition() {
        let fake = FakeHypervisor::fake(Capabilities::default());
        fake.prepare(&spec_without_netns()).await.unwrap();
        fake.start(Duration::from_secs(1)).await.unwrap();
        fake.crash("gone");
        let err = fake.resume().await.unwrap_err();
        assert!(matches!(err, Error::VmmExited(_)), "{err:?}");
        assert_eq!(fake.state().await, VmState::Stopped);
        fake.cleanup().await.unwrap();
    }
}
