//! An in-memory [`Hypervisor`] for hermetic tests of code built on the trait.
//!
//! Only compiled for this crate's tests and with the `test-utils` feature; never part of a
//! release build. It follows the real [`VmState`] machine, records every call, and can be
//! told to fail, so that callers' rollback paths can be exercised without a VMM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::device::{Device, DeviceConfig, DeviceId, DeviceInfo, GuestLocation};
use crate::error::{Error, Result};
use crate::state::{Operation, PlugMode};
use crate::{
    AgentAddress, Capabilities, ExitReason, Hypervisor, HypervisorConfig, SandboxSpec, SavedState,
    VmExit, VmState, VmmPids,
};

/// A call the fake received.
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
}

#[derive(Debug)]
struct Inner {
    state: VmState,
    spec: Option<SandboxSpec>,
    attached: BTreeMap<DeviceId, DeviceInfo>,
    calls: Vec<Call>,
    adds_before_failure: Option<usize>,
    fail_next_remove: bool,
    next_slot: u8,
}

/// The test double. See the module docs.
#[derive(Debug)]
pub struct FakeHypervisor {
    caps: Capabilities,
    inner: Mutex<Inner>,
    exit: watch::Sender<Option<VmExit>>,
}

impl FakeHypervisor {
    /// A fake in state `Created` with the given capabilities.
    pub fn new(caps: Capabilities) -> Self {
        FakeHypervisor {
            caps,
            inner: Mutex::new(Inner {
                state: VmState::Created,
                spec: None,
                attached: BTreeMap::new(),
                calls: Vec::new(),
                adds_before_failure: None,
                fail_next_remove: false,
                next_slot: 1,
            }),
            exit: watch::channel(None).0,
        }
    }

    /// Every call received so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Ids of the devices the "VM" has now.
    pub fn attached(&self) -> Vec<DeviceId> {
        self.lock().attached.keys().cloned().collect()
    }

    /// Lets `n` more `add_device` calls succeed, then fails every one after.
    pub fn fail_add_after(&self, n: usize) {
        self.lock().adds_before_failure = Some(n);
    }

    /// Makes the next `remove_device` fail.
    pub fn fail_next_remove(&self) {
        self.lock().fail_next_remove = true;
    }

    /// Simulates the VMM dying on its own.
    pub fn crash(&self, why: &str) {
        self.lock().state = VmState::Stopped;
        self.exit.send_replace(Some(VmExit {
            reason: ExitReason::Crashed(why.into()),
            code: None,
            signal: Some(9),
        }));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn transition(&self, op: Operation, call: Call) -> Result<()> {
        let mut inner = self.lock();
        inner.calls.push(call);
        inner.state = inner.state.next(op)?;
        Ok(())
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn prepare(&self, spec: &SandboxSpec) -> Result<()> {
        spec.validate()?;
        self.transition(Operation::Prepare, Call::Prepare(spec.id.clone()))?;
        self.lock().spec = Some(spec.clone());
        Ok(())
    }

    async fn start(&self, _timeout: Duration) -> Result<()> {
        self.transition(Operation::Start, Call::Start)
    }

    async fn stop(&self) -> Result<()> {
        let was_alive = self.lock().state.is_alive();
        self.transition(Operation::Stop, Call::Stop)?;
        if was_alive {
            self.exit.send_replace(Some(VmExit {
                reason: ExitReason::Stopped,
                code: Some(0),
                signal: None,
            }));
        }
        Ok(())
    }

    async fn wait_exit(&self) -> Result<VmExit> {
        let mut rx = self.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|e| Error::backend("Waiting for the fake VM to exit", e))?;
        Ok(exit.clone().expect("waited for Some"))
    }

    async fn pause(&self) -> Result<()> {
        self.transition(Operation::Pause, Call::Pause)
    }

    async fn resume(&self) -> Result<()> {
        self.transition(Operation::Resume, Call::Resume)
    }

    async fn add_device(&self, device: Device) -> Result<DeviceInfo> {
        device.config.validate()?;
        let mut inner = self.lock();
        inner.calls.push(Call::Add(device.id.clone()));
        let mode = inner.state.plug_mode(Operation::AddDevice)?;
        let kind = device.config.kind();
        if !self.caps.can_plug(kind, mode) {
            return Err(Error::Unsupported {
                backend: "fake",
                operation: format!("{kind} hotplug"),
                reason: "the fake was built without it".into(),
            });
        }
        if let Some(n) = inner.adds_before_failure.as_mut() {
            if *n == 0 {
                return Err(Error::device(
                    &device.id,
                    "Attaching",
                    "injected failure".to_string(),
                ));
            }
            *n -= 1;
        }
        let slot = inner.next_slot;
        inner.next_slot += 1;
        let (mac, queue_pairs, host) = match &device.config {
            DeviceConfig::Network(n) => (
                Some(n.guest_mac),
                Some(n.queue_pairs),
                Some(n.backend.tap_name().to_string()),
            ),
            DeviceConfig::Block(b) => (None, None, Some(b.path.display().to_string())),
            DeviceConfig::Vsock(_) => (None, None, None),
        };
        let info = DeviceInfo {
            id: device.id.clone(),
            kind,
            location: GuestLocation::Pci {
                path: format!("{slot:02x}/00"),
            },
            hotplugged: mode == PlugMode::Hot,
            mac,
            queue_pairs,
            host,
        };
        inner.attached.insert(device.id, info.clone());
        Ok(info)
    }

    async fn remove_device(&self, id: &DeviceId) -> Result<()> {
        let mut inner = self.lock();
        inner.calls.push(Call::Remove(id.clone()));
        inner.state.next(Operation::RemoveDevice)?;
        if std::mem::take(&mut inner.fail_next_remove) {
            return Err(Error::device(
                id,
                "Detaching",
                "injected failure".to_string(),
            ));
        }
        inner
            .attached
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| Error::DeviceNotFound(id.clone()))
    }

    async fn state(&self) -> VmState {
        self.lock().state
    }

    async fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn pids(&self) -> Result<VmmPids> {
        let state = self.lock().state;
        if !state.is_alive() {
            return Err(Error::InvalidState {
                operation: Operation::Start,
                state,
            });
        }
        Ok(VmmPids {
            vmm: std::process::id(),
            main_thread: std::process::id(),
            vcpus: Vec::new(),
        })
    }

    async fn agent_address(&self) -> Result<AgentAddress> {
        Ok(AgentAddress::Vsock { cid: 3, port: 1024 })
    }

    async fn console_log(&self) -> Option<PathBuf> {
        None
    }

    async fn netns(&self) -> Option<PathBuf> {
        self.lock().spec.as_ref().and_then(|s| s.netns.clone())
    }

    async fn config(&self) -> Result<HypervisorConfig> {
        let inner = self.lock();
        inner
            .spec
            .as_ref()
            .map(|s| s.config.clone())
            .ok_or(Error::InvalidState {
                operation: Operation::Start,
                state: inner.state,
            })
    }

    async fn save_state(&self) -> Result<SavedState> {
        let inner = self.lock();
        let sandbox = inner.spec.clone().ok_or(Error::InvalidState {
            operation: Operation::Start,
            state: inner.state,
        })?;
        Ok(SavedState {
            backend: "fake".into(),
            sandbox,
            state: inner.state,
            pids: VmmPids::default(),
            devices: inner.attached.values().cloned().collect(),
            backend_data: serde_json::Value::Null,
        })
    }

    async fn cleanup(&self) -> Result<()> {
        self.stop().await?;
        let mut inner = self.lock();
        inner.calls.push(Call::Cleanup);
        inner.attached.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            id: "s1".into(),
            netns: Some("/run/netns/x".into()),
            config: HypervisorConfig {
                kernel: "/k".into(),
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn wait_exit_reports_a_crash() {
        let fake = FakeHypervisor::new(Capabilities::default());
        fake.prepare(&spec()).await.unwrap();
        fake.start(Duration::from_secs(1)).await.unwrap();
        fake.crash("vCPU 0: emulation failure");
        let exit = fake.wait_exit().await.unwrap();
        assert!(matches!(exit.reason, ExitReason::Crashed(_)));
        assert!(matches!(
            fake.pause().await.unwrap_err(),
            Error::InvalidState { .. }
        ));
    }

    #[tokio::test]
    async fn saved_state_round_trips_through_json() {
        let fake = FakeHypervisor::new(Capabilities::default());
        fake.prepare(&spec()).await.unwrap();
        let saved = fake.save_state().await.unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SavedState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        assert_eq!(back.sandbox.netns, Some("/run/netns/x".into()));
    }

    #[tokio::test]
    async fn an_invalid_sandbox_id_is_rejected_at_prepare() {
        let fake = FakeHypervisor::new(Capabilities::default());
        let mut s = spec();
        s.id = "../etc".into();
        let err = fake.prepare(&s).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig(ref c) if c.field == "id"),
            "{err}"
        );
        assert_eq!(fake.state().await, VmState::Created);
    }
}
