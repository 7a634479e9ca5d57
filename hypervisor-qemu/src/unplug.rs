//! Removing devices: a cold one from the start-up configuration, a hot-plugged one from the
//! running guest (`device_del`, waiting for the guest to release it, then its backend). See
//! the `hotplug` module for the whole protocol.

use hypervisor::vm::Context;
use hypervisor::{DeviceId, Error, PlugMode, Result};
use serde_json::json;
use slog::warn;

use crate::qmp::QmpError;
use crate::reconcile::qemu_device_id;
use crate::{Qemu, QemuSandbox};

impl Qemu {
    /// Removes `id`: a cold device from the start-up configuration, a hot-plugged one from
    /// the running guest.
    pub(crate) async fn unplug(
        &self,
        inner: &mut QemuSandbox,
        ctx: Context<'_>,
        id: &DeviceId,
        mode: PlugMode,
    ) -> Result<()> {
        let life = ctx.lifecycle;
        if let Some(pos) = inner.cold.iter().position(|c| c.info().id == *id) {
            // Never reached QEMU: dropping it closes its fds.
            inner.cold.remove(pos);
            return Ok(());
        }
        // A dead virtiofsd fails the operation, unless this removes its own share.
        self.check_virtiofsd(inner, Some(id))?;
        let was_pending = inner.unplugging.contains(id);
        if mode == PlugMode::Hot {
            // A retried unplug, or an earlier hotplug of unknown outcome, is decided first.
            if let Err(e) = self.reconcile(inner).await {
                warn!(self.log, "could not reconcile with QEMU"; "error" => crate::error_chain(&e));
            }
            if inner.unsettled.contains_key(id) {
                return Err(Error::device(
                    id,
                    "Unplugging",
                    "QEMU has not yet answered whether its hotplug completed; retry later",
                ));
            }
            if was_pending && !inner.hot.contains_key(id) {
                // The guest released it meanwhile; reconcile finished the removal.
                return Ok(());
            }
        }
        let info = inner
            .hot
            .get(id)
            .cloned()
            .ok_or_else(|| Error::DeviceNotFound(id.clone()))?;
        let port = inner
            .ports
            .iter()
            .position(|p| p.used_by.as_ref() == Some(id));
        if mode == PlugMode::Hot && (!info.hotplugged && port.is_none()) {
            return Err(Self::unsupported(
                format!("unplugging cold-plugged {} device {id}", info.kind),
                "devices on pcie.0 cannot be unplugged; only hot-plugged devices can",
            ));
        }
        let qmp = inner.qmp.clone().expect("running VMs have QMP");
        let dev_id = qemu_device_id(id);
        // Subscribed before device_del: the event cannot be missed.
        let mut events = qmp.subscribe();
        match qmp
            .execute(
                "device_del",
                Some(json!({ "id": dev_id })),
                self.opts.qmp_timeout,
            )
            .await
        {
            Ok(_) => {}
            // Already gone from QEMU: only the backend is left to remove.
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {
                return self.finish_unplug(inner, &qmp, id).await;
            }
            // A repeated request for an unplug in progress (QEMU 7.2: "Device ... is already
            // in the process of unplug"); keep waiting for the guest.
            Err(QmpError::Command { desc, .. })
                if was_pending || desc.contains("already in the process of unplug") => {}
            Err(e) => {
                if e.is_timeout() {
                    // QEMU may have sent the request to the guest: the port stays reserved.
                    inner.unplugging.insert(id.clone());
                }
                return Err(Error::device(
                    id,
                    "Unplugging",
                    self.qmp_cause(life, e).await,
                ));
            }
        }
        inner.unplugging.insert(id.clone());
        let released = qmp
            .wait_event(
                &mut events,
                "DEVICE_DELETED",
                |d| d["device"].as_str() == Some(dev_id.as_str()),
                self.opts.unplug_timeout,
            )
            .await;
        match released {
            Ok(_) => self.finish_unplug(inner, &qmp, id).await,
            // The unplug stays pending: a later remove_device checks again; the port is not
            // reused until the device is gone.
            Err(e) => Err(Error::device(
                id,
                "Waiting for the guest to release",
                self.qmp_cause(life, e).await,
            )),
        }
    }
}
