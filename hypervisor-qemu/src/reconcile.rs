//! Making the backend's record of hot-plugged devices agree with QEMU after a step whose
//! outcome is unknown: a QMP command that timed out, or a reply no command could claim.
//!
//! QMP runs a monitor's commands one at a time, in order. So once QEMU answers a query sent
//! after a timed-out `device_add`, that `device_add` has run, and the answer tells whether the
//! device exists: `qom-list /machine/peripheral` lists every device with an id,
//! `query-named-block-nodes` every block node. QEMU 7.2 has no query for netdevs, so a netdev
//! is removed with `netdev_del` and `DeviceNotFound` read as "already absent"; `getfd` names
//! likewise with `closefd`.
//!
//! A hotplug whose outcome is unknown is recorded as *unsettled*, with its root port reserved.
//! Settling it adopts the device when QEMU has it (recorded, port used) and otherwise removes
//! what is half there (netdev or block node, fd names) and frees the port. An unplug the guest
//! has not acknowledged is recorded as *unplug pending*: its port is freed only when
//! `DEVICE_DELETED` is seen or QEMU no longer lists the device. Every `add_device` and
//! `remove_device` first settles what it can.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hypervisor::{DeviceId, DeviceInfo, DeviceKind, Error, Result};
use serde_json::json;
use slog::info;

use crate::qmp::{QmpClient, QmpError};
use crate::{Qemu, QemuSandbox};

/// A hotplug that failed in a way that leaves its outcome unknown. Saved with the state, so a
/// runtime that re-attaches settles it too (its port stays reserved meanwhile).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Unsettled {
    /// What the device is, should QEMU have it.
    pub info: DeviceInfo,
    /// The root port reserved for it (an index into `Inner::ports`).
    pub port: usize,
    /// `getfd` names that QEMU may still hold.
    pub fd_names: Vec<String>,
    /// Whether the netdev or block node may exist: false once QEMU refused (or was never
    /// sent) its `netdev_add`/`blockdev-add`, so an id taken by someone else is left alone.
    pub backend_maybe_added: bool,
}

/// QEMU's id of the device for `id`.
pub(crate) fn qemu_device_id(id: &DeviceId) -> String {
    format!("dev-{id}")
}

/// The `opaque` tag of the fd set that passes the disk of `id`, so that a set left by a
/// hotplug without answer can be found (`query-fdsets`) and removed.
/// The chardev of shared filesystem `id`.
pub(crate) fn chardev_id(id: &DeviceId) -> String {
    format!("chr-{id}")
}

pub(crate) fn fdset_opaque(id: &DeviceId) -> String {
    format!("disk-{id}")
}

/// Removes the fd sets tagged for `id`; a set whose fd a block node uses closes with it.
async fn remove_fdsets(qmp: &QmpClient, id: &DeviceId, t: Duration) -> Result<()> {
    let sets = qmp
        .execute("query-fdsets", None, t)
        .await
        .map_err(|e| Error::backend("Listing QEMU's fd sets", e))?;
    let tag = fdset_opaque(id);
    for set in sets.as_array().into_iter().flatten() {
        let tagged = set["fds"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|fd| fd["opaque"].as_str() == Some(tag.as_str()));
        if let (true, Some(set_id)) = (tagged, set["fdset-id"].as_u64()) {
            match qmp
                .execute("remove-fd", Some(json!({ "fdset-id": set_id })), t)
                .await
            {
                Ok(_) | Err(QmpError::Command { .. }) => {}
                Err(e) => return Err(Error::device(id, "Removing the fd set of", e)),
            }
        }
    }
    Ok(())
}

/// Ids of the devices QEMU has (`qom-list /machine/peripheral`).
pub(crate) async fn devices_present(qmp: &QmpClient, t: Duration) -> Result<BTreeSet<String>> {
    let list = qmp
        .execute(
            "qom-list",
            Some(json!({ "path": "/machine/peripheral" })),
            t,
        )
        .await
        .map_err(|e| Error::backend("Listing QEMU's devices", e))?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect())
}

/// Whether QEMU has a block node named `node` (`query-named-block-nodes`).
async fn block_node_present(qmp: &QmpClient, node: &str, t: Duration) -> Result<bool> {
    let nodes = qmp
        .execute("query-named-block-nodes", Some(json!({ "flat": true })), t)
        .await
        .map_err(|e| Error::backend("Listing QEMU's block nodes", e))?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .any(|n| n["node-name"].as_str() == Some(node)))
}

/// Removes the backend of `id` (its netdev, or its block node), if QEMU still has it.
pub(crate) async fn remove_backend(
    qmp: &QmpClient,
    id: &DeviceId,
    kind: DeviceKind,
    t: Duration,
) -> Result<()> {
    match kind {
        DeviceKind::Network => {
            match qmp
                .execute("netdev_del", Some(json!({ "id": id.as_str() })), t)
                .await
            {
                Ok(_) => Ok(()),
                Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => Ok(()),
                Err(e) => Err(Error::device(id, "Removing the netdev of", e)),
            }
        }
        DeviceKind::SharedFs => {
            match qmp
                .execute("chardev-remove", Some(json!({ "id": chardev_id(id) })), t)
                .await
            {
                Ok(_) => Ok(()),
                Err(QmpError::Command { desc, .. }) if desc.contains("not found") => Ok(()),
                Err(e) => Err(Error::device(id, "Removing the chardev of", e)),
            }
        }
        _ => {
            if !block_node_present(qmp, id.as_str(), t).await? {
                return Ok(());
            }
            qmp.execute("blockdev-del", Some(json!({ "node-name": id.as_str() })), t)
                .await
                .map(drop)
                .map_err(|e| Error::device(id, "Removing the block node of", e))
        }
    }
}

/// Closes `getfd` names QEMU may hold; a name it does not hold (consumed, or never received)
/// is fine.
pub(crate) async fn close_fd_names(qmp: &QmpClient, names: &[String], t: Duration) -> Result<()> {
    for name in names {
        match qmp
            .execute("closefd", Some(json!({ "fdname": name })), t)
            .await
        {
            Ok(_) | Err(QmpError::Command { .. }) => {}
            Err(e) => return Err(Error::backend(format!("Closing QEMU's fd {name}"), e)),
        }
    }
    Ok(())
}

impl Qemu {
    /// Settles every unsettled hotplug and every pending unplug that QEMU's state decides.
    /// A failure (QEMU still not answering) leaves the records, and their ports reserved.
    pub(crate) async fn reconcile(&self, inner: &mut QemuSandbox) -> Result<()> {
        if inner.unsettled.is_empty() && inner.unplugging.is_empty() {
            return Ok(());
        }
        let qmp = inner.qmp.clone().expect("running VMs have QMP");
        let t = self.opts.qmp_timeout;
        let present = devices_present(&qmp, t).await?;
        let unsettled: Vec<DeviceId> = inner.unsettled.keys().cloned().collect();
        for id in unsettled {
            self.settle(inner, &qmp, &id, &present).await?;
        }
        let gone: Vec<DeviceId> = inner
            .unplugging
            .iter()
            .filter(|id| !present.contains(&qemu_device_id(id)))
            .cloned()
            .collect();
        for id in gone {
            self.finish_unplug(inner, &qmp, &id).await?;
        }
        Ok(())
    }

    /// Adopts the unsettled device `id` if QEMU has it, or removes what is half there.
    async fn settle(
        &self,
        inner: &mut QemuSandbox,
        qmp: &Arc<QmpClient>,
        id: &DeviceId,
        present: &BTreeSet<String>,
    ) -> Result<()> {
        let t = self.opts.qmp_timeout;
        let u = inner.unsettled.get(id).cloned().expect("listed");
        // Names a netdev consumed are gone; the others are closed either way. Likewise a
        // disk's fd set, which a block node keeps open while it uses it.
        close_fd_names(qmp, &u.fd_names, t).await?;
        if u.info.kind == DeviceKind::Block {
            remove_fdsets(qmp, id, t).await?;
        }
        if present.contains(&qemu_device_id(id)) {
            info!(self.log, "adopted a device QEMU added after a timeout"; "id" => id.as_str());
            inner.ports[u.port].used_by = Some(id.clone());
            inner.hot.insert(id.clone(), u.info);
        } else {
            if u.backend_maybe_added {
                remove_backend(qmp, id, u.info.kind, t).await?;
            }
            if let Some(d) = inner.virtiofsd.remove(id) {
                d.stop().await;
            }
            info!(self.log, "removed a half-added device after a timeout"; "id" => id.as_str());
            inner.ports[u.port].used_by = None;
        }
        inner.unsettled.remove(id);
        Ok(())
    }

    /// The guest released `id` (or QEMU no longer has it): removes its backend and frees its
    /// port.
    pub(crate) async fn finish_unplug(
        &self,
        inner: &mut QemuSandbox,
        qmp: &QmpClient,
        id: &DeviceId,
    ) -> Result<()> {
        let kind = inner
            .hot
            .get(id)
            .map(|i| i.kind)
            .ok_or_else(|| Error::DeviceNotFound(id.clone()))?;
        remove_backend(qmp, id, kind, self.opts.qmp_timeout).await?;
        if let Some(d) = inner.virtiofsd.remove(id) {
            d.stop().await;
        }
        for p in inner.ports.iter_mut() {
            if p.used_by.as_ref() == Some(id) {
                p.used_by = None;
            }
        }
        inner.hot.remove(id);
        inner.unplugging.remove(id);
        info!(self.log, "device removed"; "id" => id.as_str());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Settling against a scripted QEMU on a socket pair.

    use hypervisor::device::GuestLocation;
    use serde_json::Value;

    use super::*;
    use crate::qmp::tests::FakeQemu;
    use crate::RootPort;

    /// A backend with one unsettled NIC hotplug `net1` on root port `rp0`, and the fake QEMU.
    async fn unsettled_nic(backend_maybe_added: bool) -> (Qemu, QemuSandbox, FakeQemu) {
        let (hv, mut inner, fake) = crate::tests::on_fake_qmp(crate::QemuOptions::default()).await;
        let id = DeviceId::new("net1").unwrap();
        {
            inner.ports = vec![RootPort {
                id: "rp0".into(),
                slot: 4,
                used_by: Some(id.clone()),
            }];
            let info = DeviceInfo {
                id: id.clone(),
                kind: DeviceKind::Network,
                location: GuestLocation::Pci {
                    path: "04/00".into(),
                },
                hotplugged: true,
                mac: None,
                queue_pairs: Some(1),
                host: Some("tap1".into()),
            };
            inner.unsettled.insert(
                id,
                Unsettled {
                    info,
                    port: 0,
                    fd_names: vec!["fd-net1-0".into()],
                    backend_maybe_added,
                },
            );
        }
        (hv, inner, fake)
    }

    /// Answers the commands of a settle in order, listing `devices`; returns the commands.
    async fn answer(fake: &mut FakeQemu, devices: &[&str]) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let (msg, _) = fake.recv().await;
            let command = msg["execute"].as_str().unwrap().to_string();
            let reply = match command.as_str() {
                "qom-list" => {
                    let list: Vec<Value> = devices
                        .iter()
                        .map(|d| json!({"name": d, "type": "child<virtio-net-pci>"}))
                        .chain([json!({"name": "type", "type": "string"})])
                        .collect();
                    json!({"return": list, "id": msg["id"]})
                }
                "closefd" => json!({"error": {"class": "GenericError",
                    "desc": "File descriptor named 'fd-net1-0' not found"}, "id": msg["id"]}),
                _ => json!({"return": {}, "id": msg["id"]}),
            };
            fake.send(reply).await;
            seen.push(command.clone());
            if command == "query-status" {
                return seen;
            }
        }
    }

    async fn settle(
        hv: &Qemu,
        inner: &mut QemuSandbox,
        fake: &mut FakeQemu,
        devices: &[&str],
    ) -> Vec<String> {
        let run = async {
            hv.reconcile(inner).await.unwrap();
            // Marks the end of the settle's commands for the fake.
            let qmp = inner.qmp.clone().unwrap();
            qmp.execute("query-status", None, Duration::from_secs(5))
                .await
                .unwrap();
        };
        let ((), seen) = tokio::join!(run, answer(fake, devices));
        seen
    }

    #[tokio::test]
    async fn a_device_qemu_has_is_adopted_with_its_port() {
        let (hv, mut inner, mut fake) = unsettled_nic(true).await;
        let seen = settle(&hv, &mut inner, &mut fake, &["rp0", "dev-net1"]).await;
        assert_eq!(seen, ["qom-list", "closefd", "query-status"]);
        assert!(inner.unsettled.is_empty());
        assert!(inner.hot.contains_key(&DeviceId::new("net1").unwrap()));
        assert_eq!(inner.ports[0].used_by.as_ref().unwrap().as_str(), "net1");
    }

    #[tokio::test]
    async fn a_device_qemu_lacks_is_removed_with_its_netdev_and_frees_its_port() {
        let (hv, mut inner, mut fake) = unsettled_nic(true).await;
        let seen = settle(&hv, &mut inner, &mut fake, &["rp0"]).await;
        assert_eq!(seen, ["qom-list", "closefd", "netdev_del", "query-status"]);
        assert!(inner.unsettled.is_empty());
        assert!(inner.hot.is_empty());
        assert!(inner.ports[0].used_by.is_none());
    }

    #[tokio::test]
    async fn a_netdev_whose_add_was_refused_is_left_alone() {
        // Its id may belong to someone else: netdev_add failed because it was taken.
        let (hv, mut inner, mut fake) = unsettled_nic(false).await;
        let seen = settle(&hv, &mut inner, &mut fake, &["rp0"]).await;
        assert_eq!(seen, ["qom-list", "closefd", "query-status"]);
        assert!(inner.ports[0].used_by.is_none());
    }

    #[tokio::test]
    async fn a_settle_without_answer_keeps_the_record_and_the_port() {
        let (hv, mut inner, mut fake) = unsettled_nic(true).await;
        let quick = Qemu::with_host(
            hv.log.clone(),
            crate::QemuOptions {
                qmp_timeout: Duration::from_millis(100),
                ..crate::QemuOptions::default()
            },
            hv.host,
        );
        // The fake reads the query and never answers it.
        let (settled, _) = tokio::join!(quick.reconcile(&mut inner), fake.expect("qom-list"));
        let err = settled.unwrap_err();
        assert!(crate::error_chain(&err).contains("no answer"), "{err}");
        assert_eq!(inner.unsettled.len(), 1);
        assert_eq!(inner.ports[0].used_by.as_ref().unwrap().as_str(), "net1");
        assert!(inner.hot.is_empty());
    }
}
