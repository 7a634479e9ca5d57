//! NICs added to and removed from a running sandbox.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use hypervisor::{DeviceConfig, DeviceId};
use slog::{info, warn};

use super::{Phase, Sandbox};
use crate::facts::NicFacts;
use crate::net;

impl Sandbox {
    /// Hot-plugs one more NIC: a TAP in the next free /24 (recorded), the device through
    /// the device manager, and the guest's address on it. A failed plug removes the TAP.
    /// Race it against the VM's exit ([`Sandbox::exit_watch`]): when the VM exits under
    /// it, the exit's error names the hotplug.
    pub async fn add_nic(&mut self) -> Result<NicFacts> {
        let before = self.phase();
        self.set_phase(Phase::Hotplug);
        let plugged = self.hotplug_nic().await;
        // A hotplug failed by the VM's exit (QMP closes first) still names the hotplug
        // when the exit ends the sandbox, right after.
        if plugged.is_ok() || !self.exits_soon().await {
            self.set_phase(before);
        }
        plugged
    }

    async fn hotplug_nic(&mut self) -> Result<NicFacts> {
        let t = Instant::now();
        if !self.hv.capabilities().await.network_hotplug {
            bail!(
                "the {} backend cannot hot-plug NICs (machine {}); nothing was created",
                self.hv.name(),
                self.facts
                    .as_ref()
                    .and_then(|f| f.machine_type.clone())
                    .unwrap_or_else(|| "default".into())
            );
        }
        info!(self.log, "hot-plugging a NIC");
        let nic = self.new_host_nic().await?;
        let tap = nic.tap.clone();
        let plan = nic.plan();
        let added = self.devices.add(DeviceConfig::Network(nic.config)).await;
        let info = match added {
            Ok(info) => info,
            Err(e) => {
                self.forget_tap(&tap).await;
                return Err(
                    anyhow::Error::from(e).context(format!("Hot-plugging a NIC on TAP {tap}"))
                );
            }
        };
        self.save_state().await?;
        let facts = self.configure_guest(&info, &plan, t).await?;
        info!(self.log, "NIC hot-plugged"; "nic" => facts.human());
        self.nics.push(facts.clone());
        Ok(facts)
    }

    /// Unplugs the NIC `id` (as [`NicFacts::id`] names it) through the device manager. The
    /// sandbox's own TAP goes with it: a persistent one is deleted, one handed over as fds
    /// goes with the VMM's last fd. A pod interface's TAP stays connected until the
    /// teardown. The record keeps listing the TAP until then (removing a TAP that is gone
    /// is a no-op), and the NIC's /24 is free for the next one.
    pub async fn remove_nic(&mut self, id: &str) -> Result<()> {
        let Some(i) = self.nics.iter().position(|n| n.id == id) else {
            bail!("sandbox {} has no NIC {id}", self.id);
        };
        let device = DeviceId::new(id).with_context(|| format!("NIC id {id:?}"))?;
        let tap = self.nics[i].tap.clone();
        self.devices
            .remove(&device)
            .await
            .with_context(|| format!("Unplugging NIC {id} (TAP {tap})"))?;
        self.nics.remove(i);
        self.save_state().await?;
        if let Some(p) = self.persistent_taps.iter().position(|t| *t == tap) {
            self.persistent_taps.remove(p);
            match net::delete_tap(&tap, self.netns_path()).await {
                Ok(()) | Err(netdev::Error::TapNotFound { .. }) => {}
                Err(e) => warn!(self.log, "deleting an unplugged NIC's TAP"; "tap" => &tap,
                    "error" => e.to_string()),
            }
        }
        info!(self.log, "NIC unplugged"; "nic" => id, "tap" => &tap);
        Ok(())
    }
}
