//! Shared filesystems' device steps: the checks before a share is added, cold plug (kept for
//! the command line, its daemon started with QEMU), hot plug (its daemon, then `getfd`,
//! `chardev-add` and `device_add` into a free root port), and the check that every share's
//! daemon still runs. Removal is the common unplug (`device_del`, the guest's release), then
//! `chardev-remove` and the daemon's stop (`reconcile::finish_unplug`).

use std::os::fd::AsFd;

use hypervisor::device::{GuestLocation, SharedFsConfig};
use hypervisor::{ConfigError, DeviceId, DeviceInfo, DeviceKind, Lifecycle, Result};
use serde_json::json;

use crate::cmdline::PciPlace;
use crate::reconcile::{chardev_id, qemu_device_id};
use crate::virtiofs::Virtiofsd;
use crate::{ColdDevice, Qemu, QemuSandbox};

impl Qemu {
    /// Refuses a share this VM cannot take: `shared_fs` is `none`, the daemon cannot serve
    /// it, or another share has its tag.
    pub(crate) fn check_share(&self, inner: &QemuSandbox, f: &SharedFsConfig) -> Result<()> {
        let Some(daemon) = &inner.daemon else {
            return Err(ConfigError::new(
                "shared_fs",
                format!(
                    "is \"none\", so {} cannot be shared; set shared_fs = \"virtio-fs\"",
                    f.host_dir.display()
                ),
            )
            .into());
        };
        // What this daemon cannot serve is refused before anything starts.
        crate::virtiofs::daemon_args(daemon.flavour, f, &daemon.extra_args)?;
        let cold_tags = inner.cold.iter().filter_map(|c| match c {
            ColdDevice::SharedFs { info, share, .. } => Some((&info.id, &share.tag)),
            _ => None,
        });
        let running = inner.virtiofsd.iter().map(|(id, d)| (id, &d.tag));
        if let Some((other, _)) = cold_tags.chain(running).find(|(_, t)| **t == f.tag) {
            return Err(ConfigError::new(
                "shared_fs.tag",
                format!(
                    "{:?} is already the tag of share {other}; give each share its own",
                    f.tag
                ),
            )
            .into());
        }
        Ok(())
    }

    /// Keeps a share for the command line; its daemon starts with QEMU.
    pub(crate) fn cold_share(
        &self,
        inner: &mut QemuSandbox,
        id: DeviceId,
        f: SharedFsConfig,
    ) -> Result<DeviceInfo> {
        let (place, location) = self.cold_place(inner)?;
        let info = share_info(id, &f, location, false);
        inner.cold.push(ColdDevice::SharedFs {
            info: info.clone(),
            share: f,
            place,
        });
        Ok(info)
    }

    /// Fails naming the first share (other than `except`) whose virtiofsd has exited.
    pub(crate) fn check_virtiofsd(
        &self,
        inner: &QemuSandbox,
        except: Option<&DeviceId>,
    ) -> Result<()> {
        for (id, d) in &inner.virtiofsd {
            if Some(id) != except {
                d.check()?;
            }
        }
        Ok(())
    }

    /// Starts the share's virtiofsd, then `getfd` (the connected socket), `chardev-add` and
    /// `device_add` into a free root port. A failed hotplug stops the daemon again, unless
    /// its outcome is unknown (then it stays until the VM stops).
    pub(crate) async fn hot_share(
        &self,
        inner: &mut QemuSandbox,
        life: &Lifecycle,
        id: DeviceId,
        f: SharedFsConfig,
    ) -> Result<DeviceInfo> {
        let port = self.free_port(inner, &id)?;
        let daemon = inner.daemon.clone().expect("checked by plug");
        let run = inner.run.clone().expect("prepared");
        let (virtiofsd, conn) = Virtiofsd::start(&daemon, &run, &id, &f, &self.log).await?;
        let qmp = inner.qmp.clone().expect("running VMs have QMP");
        let t = self.opts.qmp_timeout;
        let rp = inner.ports[port].clone();
        let place = PciPlace::Port {
            port: rp.id.clone(),
            port_slot: rp.slot,
        };
        let info = share_info(
            id.clone(),
            &f,
            GuestLocation::Pci {
                path: place.pci_path(),
            },
            true,
        );
        let name = format!("fd-{id}-0");
        self.begin_hotplug(inner, &info, port, vec![name.clone()]);
        let chardev = json!({
            "id": chardev_id(&id),
            "backend": {
                "type": "socket",
                "data": {
                    "addr": { "type": "fd", "data": { "str": name } },
                    "server": false,
                },
            },
        });
        let dev = json!({
            "driver": "vhost-user-fs-pci",
            "id": qemu_device_id(&id),
            "chardev": chardev_id(&id),
            "tag": f.tag,
            "bus": rp.id,
            "addr": "0x0",
        });
        let steps = async {
            qmp.execute_with_fds("getfd", Some(json!({ "fdname": name })), &[conn.as_fd()], t)
                .await
                .map_err(|e| ("Passing the virtiofsd socket of", e))?;
            qmp.execute("chardev-add", Some(chardev), t)
                .await
                .map_err(|e| ("Adding the chardev of", e))?;
            qmp.execute("device_add", Some(dev), t)
                .await
                .map_err(|e| ("Hot-plugging shared filesystem", e))
        };
        let result = steps.await;
        drop(conn);
        match self.end_hotplug(inner, life, info, result).await {
            Ok(info) => {
                inner.virtiofsd.insert(id, virtiofsd);
                Ok(info)
            }
            Err(e) => {
                if inner.unsettled.contains_key(&id) || inner.hot.contains_key(&id) {
                    inner.virtiofsd.insert(id, virtiofsd);
                } else {
                    virtiofsd.stop().await;
                }
                Err(e)
            }
        }
    }
}

fn share_info(id: DeviceId, f: &SharedFsConfig, location: GuestLocation, hot: bool) -> DeviceInfo {
    DeviceInfo {
        id,
        kind: DeviceKind::SharedFs,
        location,
        hotplugged: hot,
        mac: None,
        queue_pairs: None,
        host: Some(f.host_dir.display().to_string()),
    }
}
