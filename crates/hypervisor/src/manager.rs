//! The unified device model of one sandbox.
//!
//! A [`DeviceManager`] is the only way a sandbox adds devices. It
//!
//! - validates each request and gives it an id (`net0`, `blk0`, ...);
//! - decides cold or hot plug from the VM's state and refuses, with a typed error, what the
//!   backend's [`Capabilities`](crate::Capabilities) do not allow;
//! - rejects two network devices with one guest MAC;
//! - shares one block device between users of the same host path (read-only must agree) and
//!   detaches it when the last user releases it;
//! - rolls back: a batch of cold-plug devices that fails part-way detaches the ones already
//!   attached, and the registry only ever lists devices the backend really has.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::device::{Device, DeviceConfig, DeviceId, DeviceInfo, DeviceKind, MacAddress};
use crate::error::{ConfigError, Error, Result};
use crate::state::{Operation, PlugMode};
use crate::Hypervisor;

#[derive(Debug)]
struct Entry {
    info: DeviceInfo,
    users: usize,
    mac: Option<MacAddress>,
    block: Option<(PathBuf, bool)>,
}

#[derive(Debug, Default)]
struct Registry {
    entries: BTreeMap<DeviceId, Entry>,
    next_index: BTreeMap<DeviceKind, u32>,
}

impl Registry {
    fn next_id(&mut self, kind: DeviceKind) -> DeviceId {
        let prefix = match kind {
            DeviceKind::Network => "net",
            DeviceKind::Block => "blk",
            DeviceKind::Vsock => "vsock",
            DeviceKind::SharedFs => "fs",
        };
        loop {
            let n = self.next_index.entry(kind).or_insert(0);
            let id = DeviceId::new(format!("{prefix}{n}")).expect("generated ids are valid");
            *n += 1;
            if !self.entries.contains_key(&id) {
                return id;
            }
        }
    }

    fn shared_block(&self, path: &PathBuf) -> Option<(&DeviceId, &Entry)> {
        self.entries
            .iter()
            .find(|(_, e)| e.block.as_ref().is_some_and(|(p, _)| p == path))
    }
}

/// One sandbox's device registry over a [`Hypervisor`].
#[derive(Debug)]
pub struct DeviceManager {
    hypervisor: Arc<dyn Hypervisor>,
    registry: Mutex<Registry>,
}

impl DeviceManager {
    /// A manager with no devices.
    pub fn new(hypervisor: Arc<dyn Hypervisor>) -> Self {
        DeviceManager {
            hypervisor,
            registry: Mutex::default(),
        }
    }

    /// Attaches a device with a generated id and returns how the guest sees it.
    ///
    /// A block device whose host path is already attached is shared: the existing device is
    /// returned and its user count goes up; call [`remove`](Self::remove) once per `add`.
    pub async fn add(&self, config: DeviceConfig) -> Result<DeviceInfo> {
        config.validate()?;
        // Held across the backend call: device changes of one sandbox are serialized, so
        // ids, MAC checks and sharing decisions cannot race.
        let mut reg = self.registry.lock().await;

        let mac = match &config {
            DeviceConfig::Network(n) => Some(n.guest_mac),
            _ => None,
        };
        if let Some(mac) = mac {
            if let Some((id, _)) = reg.entries.iter().find(|(_, e)| e.mac == Some(mac)) {
                return Err(ConfigError::new(
                    "network.guest_mac",
                    format!("{mac} is already used by device {id}; give each NIC its own MAC"),
                )
                .into());
            }
        }
        let block = match &config {
            DeviceConfig::Block(b) => Some((b.path.clone(), b.read_only)),
            _ => None,
        };
        if let Some((path, read_only)) = &block {
            if let Some((id, e)) = reg.shared_block(path) {
                let existing_ro = e.block.as_ref().map(|(_, ro)| *ro);
                if existing_ro != Some(*read_only) {
                    return Err(ConfigError::new(
                        "block.read_only",
                        format!(
                            "{} is already attached as {id} with read_only={}; share it with the same mode",
                            path.display(),
                            !read_only
                        ),
                    )
                    .into());
                }
                let id = id.clone();
                let e = reg.entries.get_mut(&id).expect("found above");
                e.users += 1;
                return Ok(e.info.clone());
            }
        }

        let kind = config.kind();
        let mode = self
            .hypervisor
            .state()
            .await
            .plug_mode(Operation::AddDevice)?;
        if mode == PlugMode::Hot && !self.hypervisor.capabilities().await.can_plug(kind, mode) {
            return Err(Error::Unsupported {
                backend: self.hypervisor.name(),
                operation: format!("{kind} hotplug"),
                reason: "the backend or machine type cannot add this device to a running guest; add it before start".into(),
            });
        }

        let id = reg.next_id(kind);
        let info = self
            .hypervisor
            .add_device(
                Device {
                    id: id.clone(),
                    config,
                },
                mode,
            )
            .await?;
        reg.entries.insert(
            id,
            Entry {
                info: info.clone(),
                users: 1,
                mac,
                block,
            },
        );
        Ok(info)
    }

    /// Attaches several devices; if one fails, the ones attached by this call are removed
    /// again and the first error is returned.
    pub async fn add_all(&self, configs: Vec<DeviceConfig>) -> Result<Vec<DeviceInfo>> {
        let mut done: Vec<DeviceInfo> = Vec::with_capacity(configs.len());
        for config in configs {
            match self.add(config).await {
                Ok(info) => done.push(info),
                Err(err) => {
                    for info in done.iter().rev() {
                        // Best effort: the original error is the one to report. A device
                        // that cannot be removed stays listed, so it is not forgotten.
                        let _ = self.remove(&info.id).await;
                    }
                    return Err(err);
                }
            }
        }
        Ok(done)
    }

    /// Releases one use of a device; the last release detaches it from the VM. If the
    /// backend fails to detach, the device stays registered and the error is returned.
    pub async fn remove(&self, id: &DeviceId) -> Result<()> {
        let mut reg = self.registry.lock().await;
        let entry = reg
            .entries
            .get_mut(id)
            .ok_or_else(|| Error::DeviceNotFound(id.clone()))?;
        if entry.users > 1 {
            entry.users -= 1;
            return Ok(());
        }
        let state = self.hypervisor.state().await;
        let mode = state.plug_mode(Operation::RemoveDevice)?;
        if mode == PlugMode::Hot
            && !self
                .hypervisor
                .capabilities()
                .await
                .can_plug(entry.info.kind, mode)
        {
            return Err(Error::Unsupported {
                backend: self.hypervisor.name(),
                operation: format!("{} hot-unplug", entry.info.kind),
                reason:
                    "the backend or machine type cannot remove this device from a running guest"
                        .into(),
            });
        }
        self.hypervisor.remove_device(id, mode).await?;
        reg.entries.remove(id);
        Ok(())
    }

    /// Every attached device, in id order.
    pub async fn list(&self) -> Vec<DeviceInfo> {
        let reg = self.registry.lock().await;
        reg.entries.values().map(|e| e.info.clone()).collect()
    }

    /// How many users hold a device, or `None` if it is not attached.
    pub async fn users(&self, id: &DeviceId) -> Option<usize> {
        self.registry.lock().await.entries.get(id).map(|e| e.users)
    }

    /// Forgets every device without asking the backend: for after the VM has stopped, when
    /// the backend's `cleanup` has released them.
    pub async fn clear(&self) {
        self.registry.lock().await.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::device::{BlockConfig, BlockDriver, NetworkConfig};
    use crate::testing::{Call, FakeHypervisor};
    use crate::{Capabilities, HypervisorConfig, SandboxSpec, VmState};

    fn nic(last: u8) -> DeviceConfig {
        DeviceConfig::Network(NetworkConfig::tap(
            format!("tap{last}"),
            MacAddress([2, 0, 0, 0, 0, last]),
        ))
    }

    fn disk(path: &str, read_only: bool) -> DeviceConfig {
        DeviceConfig::Block(BlockConfig {
            path: path.into(),
            read_only,
            driver: BlockDriver::VirtioBlkPci,
        })
    }

    async fn prepared(caps: Capabilities) -> (Arc<FakeHypervisor>, DeviceManager) {
        let fake = Arc::new(FakeHypervisor::fake(caps));
        fake.prepare(&SandboxSpec {
            id: "s1".into(),
            netns: None,
            config: HypervisorConfig {
                kernel: "/k".into(),
                ..Default::default()
            },
        })
        .await
        .unwrap();
        let manager = DeviceManager::new(fake.clone());
        (fake, manager)
    }

    fn all_caps() -> Capabilities {
        Capabilities {
            network_hotplug: true,
            block_hotplug: true,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn devices_before_start_are_cold_plugged_and_after_are_hot() {
        let (fake, m) = prepared(all_caps()).await;
        let cold = m.add(nic(1)).await.unwrap();
        fake.start(Duration::from_secs(1)).await.unwrap();
        let hot = m.add(nic(2)).await.unwrap();
        assert!(!cold.hotplugged);
        assert!(hot.hotplugged);
        assert_eq!(cold.id.as_str(), "net0");
        assert_eq!(hot.id.as_str(), "net1");
    }

    #[tokio::test]
    async fn hotplug_without_the_capability_is_unsupported_and_reaches_no_backend() {
        let (fake, m) = prepared(Capabilities::default()).await;
        fake.start(Duration::from_secs(1)).await.unwrap();
        let err = m.add(nic(1)).await.unwrap_err();
        assert!(err.is_unsupported(), "{err}");
        assert!(!fake.calls().iter().any(|c| matches!(c, Call::Add(_))));
        assert!(m.list().await.is_empty());
    }

    #[tokio::test]
    async fn adding_after_stop_is_an_invalid_state() {
        let (fake, m) = prepared(all_caps()).await;
        fake.stop().await.unwrap();
        let err = m.add(nic(1)).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidState {
                    state: VmState::Stopped,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn duplicate_guest_mac_is_rejected() {
        let (_fake, m) = prepared(all_caps()).await;
        m.add(nic(1)).await.unwrap();
        let err = m.add(nic(1)).await.unwrap_err();
        let Error::InvalidConfig(c) = err else {
            panic!("wrong error: {err}")
        };
        assert!(c.problem.contains("net0"), "{c}");
    }

    #[tokio::test]
    async fn invalid_device_is_rejected_before_the_backend_sees_it() {
        let (fake, m) = prepared(all_caps()).await;
        let err = m.add(disk("relative.img", false)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)));
        assert!(fake.calls().iter().all(|c| !matches!(c, Call::Add(_))));
    }

    #[tokio::test]
    async fn shared_block_devices_are_reference_counted() {
        let (fake, m) = prepared(all_caps()).await;
        let a = m.add(disk("/img/a", true)).await.unwrap();
        let b = m.add(disk("/img/a", true)).await.unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(m.users(&a.id).await, Some(2));
        assert_eq!(fake.attached().len(), 1);

        m.remove(&a.id).await.unwrap();
        assert_eq!(fake.attached().len(), 1, "still in use by one user");
        m.remove(&a.id).await.unwrap();
        assert!(fake.attached().is_empty());
        assert!(matches!(
            m.remove(&a.id).await.unwrap_err(),
            Error::DeviceNotFound(_)
        ));
    }

    #[tokio::test]
    async fn sharing_a_block_device_with_another_mode_is_rejected() {
        let (_fake, m) = prepared(all_caps()).await;
        m.add(disk("/img/a", true)).await.unwrap();
        let err = m.add(disk("/img/a", false)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    }

    #[tokio::test]
    async fn a_failed_batch_rolls_back_what_it_attached() {
        let (fake, m) = prepared(all_caps()).await;
        fake.fail_add_after(2);
        let err = m
            .add_all(vec![nic(1), disk("/img/a", false), nic(3)])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Device { .. }), "{err}");
        assert!(fake.attached().is_empty(), "left: {:?}", fake.attached());
        assert!(m.list().await.is_empty());
    }

    #[tokio::test]
    async fn a_failed_backend_remove_keeps_the_device_registered() {
        let (fake, m) = prepared(all_caps()).await;
        let a = m.add(nic(1)).await.unwrap();
        fake.fail_next_remove();
        assert!(m.remove(&a.id).await.is_err());
        assert_eq!(m.list().await.len(), 1);
        m.remove(&a.id).await.unwrap();
        assert!(m.list().await.is_empty());
    }

    #[tokio::test]
    async fn ids_are_not_reused_while_attached() {
        let (_fake, m) = prepared(all_caps()).await;
        let a = m.add(nic(1)).await.unwrap();
        let b = m.add(nic(2)).await.unwrap();
        m.remove(&a.id).await.unwrap();
        let c = m.add(nic(3)).await.unwrap();
        assert_ne!(c.id, b.id);
    }
}
