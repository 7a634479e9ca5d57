//! Adding and removing devices: cold (kept for the command line) and hot (through QMP).
//!
//! NIC hotplug is `getfd` for every queue fd, `netdev_add` naming them joined with `:`, then
//! `device_add` into a free root port; block hotplug is `blockdev-add` then `device_add`. The
//! hotplug is recorded (port reserved) before its first command, so that a failure, a timeout
//! or a dropped future is always settled with QEMU ([`crate::reconcile`]): a refused step is
//! undone (`closefd` for the names, `netdev_del` or `blockdev-del`), a step without an answer
//! is decided by what QEMU has (the device adopted, or what is half there removed), and a
//! connection that closed fails the call at once naming QEMU's exit.
//!
//! Removal is `device_del`, then waiting for the guest to release the device
//! (`DEVICE_DELETED`), then `netdev_del` or `blockdev-del`. The port is freed only then. An
//! unplug that times out stays *pending*: the device keeps its port, and a later
//! `remove_device` (or any hotplug) checks QEMU again. `stop` ends that wait, and any other
//! QMP wait of a hotplug, at once (the lifecycle core's `unless_stopping`).
//!
//! Shared filesystems take the same path with their own steps (the `share` module).
//!
//! Whether a device is cold- or hot-plugged, and whether the machine can hot-plug it, the
//! `DeviceManager` and the lifecycle core decided before these steps run.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use hypervisor::device::{BlockConfig, BlockDriver, GuestLocation, NetworkBackend, NetworkConfig};
use hypervisor::vm::Context;
use hypervisor::{
    ConfigError, Device, DeviceConfig, DeviceId, DeviceInfo, DeviceKind, Error, Lifecycle,
    PlugMode, Result, SandboxSpec,
};
use serde_json::{json, Value};
use slog::{info, warn};

use crate::cmdline::{nic_props, Machine, PciPlace};
use crate::qmp::QmpError;
use crate::reconcile::{fdset_opaque, qemu_device_id, Unsettled};
use crate::{ColdDevice, Qemu, QemuSandbox};

/// Device id of the configuration's root filesystem `image`; no other device may use it.
pub const IMAGE_DEVICE_ID: &str = "image";

/// Base of QEMU microvm's virtio-mmio transports, and the size of each.
const MICROVM_MMIO_BASE: u64 = 0xfeb0_0000;
const MICROVM_MMIO_SIZE: u64 = 0x200;
/// Transports QEMU's microvm creates.
const MICROVM_TRANSPORTS: usize = 8;

impl Qemu {
    /// Adds `device` `mode`-plugged.
    pub(crate) async fn plug(
        &self,
        inner: &mut QemuSandbox,
        ctx: Context<'_>,
        device: Device,
        mode: PlugMode,
    ) -> Result<DeviceInfo> {
        if inner.hot.contains_key(&device.id) || inner.cold.iter().any(|c| c.info().id == device.id)
        {
            return Err(ConfigError::new(
                "id",
                format!("device {} is already attached; use another id", device.id),
            )
            .into());
        }
        if mode == PlugMode::Hot {
            // Ports of earlier hotplugs of unknown outcome, or of finished unplugs, are
            // decided before one is chosen.
            if let Err(e) = self.reconcile(inner).await {
                warn!(self.log, "could not reconcile with QEMU"; "error" => crate::error_chain(&e));
            }
            if inner.unsettled.contains_key(&device.id) {
                return Err(ConfigError::new(
                    "id",
                    format!(
                        "an earlier hotplug of {} has not been settled with QEMU yet; retry later",
                        device.id
                    ),
                )
                .into());
            }
        }
        // A share whose daemon died fails every later device operation, naming it.
        self.check_virtiofsd(inner, None)?;
        if let DeviceConfig::SharedFs(f) = &device.config {
            self.check_share(inner, f)?;
        }
        let life = ctx.lifecycle;
        let info = match (device.config, mode) {
            (DeviceConfig::Network(n), PlugMode::Cold) => {
                self.cold_nic(inner, ctx.spec, device.id, n)?
            }
            (DeviceConfig::Network(n), PlugMode::Hot) => {
                self.hot_nic(inner, life, ctx.spec, device.id, n).await?
            }
            (DeviceConfig::Block(b), PlugMode::Cold) => self.cold_block(inner, device.id, b)?,
            (DeviceConfig::Block(b), PlugMode::Hot) => {
                self.hot_block(inner, life, device.id, b).await?
            }
            (DeviceConfig::SharedFs(f), PlugMode::Cold) => self.cold_share(inner, device.id, f)?,
            (DeviceConfig::SharedFs(f), PlugMode::Hot) => {
                self.hot_share(inner, life, device.id, f).await?
            }
            (DeviceConfig::Vsock(_), _) => {
                return Err(Self::unsupported(
                    "a vsock device",
                    "the QEMU backend adds vhost-vsock itself when the agent channel is vsock",
                ))
            }
        };
        info!(self.log, "device added"; "id" => info.id.as_str(), "kind" => info.kind.to_string(),
            "at" => info.location.to_string(), "hot" => info.hotplugged);
        Ok(info)
    }

    /// Cold-plugs the configuration's root filesystem `image` as the VM's first block device:
    /// read-only virtio-blk (`virtio-blk-pci` on q35, `virtio-blk-device` on microvm), with
    /// the device id [`IMAGE_DEVICE_ID`]. Called by `prepare` before any other device, so the
    /// guest enumerates it first.
    pub(crate) fn attach_image(&self, inner: &mut QemuSandbox, path: &Path) -> Result<DeviceInfo> {
        let driver = match inner.machine.expect("prepared") {
            Machine::Q35 => BlockDriver::VirtioBlkPci,
            Machine::Microvm => BlockDriver::VirtioBlkMmio,
        };
        let id = DeviceId::new(IMAGE_DEVICE_ID).expect("a valid id");
        self.cold_block(
            inner,
            id,
            BlockConfig {
                path: path.to_path_buf(),
                read_only: true,
                driver,
            },
        )
    }

    pub(crate) fn cold_place(
        &self,
        inner: &mut QemuSandbox,
    ) -> Result<(Option<PciPlace>, GuestLocation)> {
        match inner.machine.expect("prepared") {
            Machine::Q35 => {
                let slot = self.take_root_slot(inner)?;
                let place = PciPlace::Root(slot);
                let path = place.pci_path();
                Ok((Some(place), GuestLocation::Pci { path }))
            }
            Machine::Microvm => {
                let index = inner.cold.len();
                if index >= MICROVM_TRANSPORTS {
                    return Err(Self::unsupported(
                        "more devices",
                        format!("microvm has {MICROVM_TRANSPORTS} virtio-mmio transports"),
                    ));
                }
                Ok((
                    None,
                    GuestLocation::Mmio {
                        base: MICROVM_MMIO_BASE + MICROVM_MMIO_SIZE * index as u64,
                        size: MICROVM_MMIO_SIZE,
                        irq: None,
                    },
                ))
            }
        }
    }

    fn cold_nic(
        &self,
        inner: &mut QemuSandbox,
        spec: &SandboxSpec,
        id: DeviceId,
        n: NetworkConfig,
    ) -> Result<DeviceInfo> {
        let (taps, vhost) = self.nic_fds(spec, &id, &n)?;
        let (place, location) = self.cold_place(inner)?;
        let info = nic_info(id, &n, location, false);
        inner.cold.push(ColdDevice::Nic {
            info: info.clone(),
            taps,
            vhost,
            queue_size: n.queue_size,
            mtu: n.mtu,
            place,
        });
        Ok(info)
    }

    fn cold_block(
        &self,
        inner: &mut QemuSandbox,
        id: DeviceId,
        b: BlockConfig,
    ) -> Result<DeviceInfo> {
        check_block_file(&id, &b)?;
        if b.driver == BlockDriver::VirtioBlkMmio && inner.machine == Some(Machine::Q35) {
            return Err(Self::unsupported(
                "virtio-blk on MMIO with q35",
                "use driver virtio-blk-pci, or machine type microvm",
            ));
        }
        let (place, location) = self.cold_place(inner)?;
        let info = block_info(id, &b, location, false);
        inner.cold.push(ColdDevice::Block {
            info: info.clone(),
            path: b.path,
            read_only: b.read_only,
            place,
        });
        Ok(info)
    }

    /// Opens (creating if needed) the TAP queues and, when usable, one vhost-net fd per queue.
    fn nic_fds(
        &self,
        spec: &SandboxSpec,
        id: &DeviceId,
        n: &NetworkConfig,
    ) -> Result<(Vec<OwnedFd>, Vec<OwnedFd>)> {
        let taps = match &n.backend {
            NetworkBackend::TapFds { queues, .. } => queues
                .iter()
                .map(|fd| fd.try_clone())
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| Error::device(id, "Duplicating the TAP fds of", e))?,
            NetworkBackend::TapName(name) => {
                open_tap_queues(name, n.queue_pairs, spec.netns.as_deref())
                    .map_err(|e| Error::device(id, "Opening the TAP of", e))?
            }
        };
        let mut vhost = Vec::new();
        if self.host.vhost_net && !spec.config.disable_vhost_net {
            for _ in 0..taps.len() {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/vhost-net")
                    .map_err(|e| Error::device(id, "Opening /dev/vhost-net for", e))?;
                vhost.push(OwnedFd::from(f));
            }
        }
        Ok((taps, vhost))
    }

    pub(crate) fn free_port(&self, inner: &QemuSandbox, id: &DeviceId) -> Result<usize> {
        inner
            .ports
            .iter()
            .position(|p| p.used_by.is_none())
            .ok_or_else(|| {
                Self::unsupported(
                    format!("hot-plugging {id}"),
                    format!(
                        "all {} hotplug root ports are in use; remove a device or raise hotplug_ports",
                        inner.ports.len()
                    ),
                )
            })
    }

    async fn hot_nic(
        &self,
        inner: &mut QemuSandbox,
        life: &Lifecycle,
        spec: &SandboxSpec,
        id: DeviceId,
        n: NetworkConfig,
    ) -> Result<DeviceInfo> {
        let port = self.free_port(inner, &id)?;
        let (taps, vhost) = self.nic_fds(spec, &id, &n)?;
        let qmp = inner.qmp.clone().expect("running VMs have QMP");
        let t = self.opts.qmp_timeout;
        let rp = inner.ports[port].clone();
        let place = PciPlace::Port {
            port: rp.id.clone(),
            port_slot: rp.slot,
        };
        let info = nic_info(
            id.clone(),
            &n,
            GuestLocation::Pci {
                path: place.pci_path(),
            },
            true,
        );
        // getfd, one name per fd; names must not start with a digit and are per connection.
        let names: Vec<String> = (0..taps.len() + vhost.len())
            .map(|i| format!("fd-{id}-{i}"))
            .collect();
        // Recorded before the first command, so that whatever happens next (a timeout, a
        // refusal, this future being dropped) is settled with QEMU and never forgotten.
        self.begin_hotplug(inner, &info, port, names.clone());

        let (tap_names, vhost_names) = names.split_at(taps.len());
        let mut netdev = json!({
            "type": "tap",
            "id": id.as_str(),
            "fds": tap_names.join(":"),
        });
        if vhost_names.is_empty() {
            netdev["vhost"] = Value::Bool(false);
        } else {
            netdev["vhost"] = Value::Bool(true);
            netdev["vhostfds"] = Value::String(vhost_names.join(":"));
        }
        let mut dev = json!({
            "driver": "virtio-net-pci",
            "id": qemu_device_id(&id),
            "netdev": id.as_str(),
            "mac": n.guest_mac.to_string(),
            "bus": rp.id,
            "addr": "0x0",
        });
        apply_props(
            &mut dev,
            &nic_props(
                Machine::Q35,
                usize::from(n.queue_pairs),
                n.queue_size,
                n.mtu,
            ),
        );
        let steps = async {
            for (name, fd) in names.iter().zip(taps.iter().chain(vhost.iter())) {
                qmp.execute_with_fds("getfd", Some(json!({ "fdname": name })), &[fd.as_fd()], t)
                    .await
                    .map_err(|e| ("Passing a TAP fd of", e))?;
            }
            qmp.execute("netdev_add", Some(netdev), t)
                .await
                .map_err(|e| ("Adding the netdev of", e))?;
            qmp.execute("device_add", Some(dev), t)
                .await
                .map_err(|e| ("Hot-plugging network", e))
        };
        let result = steps.await;
        // QEMU holds its own copies of the fds it received.
        drop(taps);
        drop(vhost);
        self.end_hotplug(inner, life, info, result).await
    }

    async fn hot_block(
        &self,
        inner: &mut QemuSandbox,
        life: &Lifecycle,
        id: DeviceId,
        b: BlockConfig,
    ) -> Result<DeviceInfo> {
        check_block_file(&id, &b)?;
        if b.driver != BlockDriver::VirtioBlkPci {
            return Err(Self::unsupported(
                "hot-plugging virtio-blk on MMIO",
                "use driver virtio-blk-pci",
            ));
        }
        let port = self.free_port(inner, &id)?;
        // QEMU may run unprivileged or chrooted: it gets the disk as an fd, never a path.
        let disk = crate::confine::open_disk(&b.path, b.read_only)
            .map_err(|e| Error::device(&id, "Opening the disk of", e))?;
        let qmp = inner.qmp.clone().expect("running VMs have QMP");
        let t = self.opts.qmp_timeout;
        let rp = inner.ports[port].clone();
        let place = PciPlace::Port {
            port: rp.id.clone(),
            port_slot: rp.slot,
        };
        let info = block_info(
            id.clone(),
            &b,
            GuestLocation::Pci {
                path: place.pci_path(),
            },
            true,
        );
        self.begin_hotplug(inner, &info, port, Vec::new());
        let mut node = json!({
            "driver": "raw",
            "node-name": id.as_str(),
            "read-only": b.read_only,
            "file": {
                "driver": "file",
                "read-only": b.read_only,
            },
        });
        let dev = json!({
            "driver": "virtio-blk-pci",
            "id": qemu_device_id(&id),
            "drive": id.as_str(),
            "bus": rp.id,
            "addr": "0x0",
        });
        let steps = async {
            let set = qmp
                .execute_with_fds(
                    "add-fd",
                    Some(json!({ "opaque": fdset_opaque(&id) })),
                    &[disk.as_fd()],
                    t,
                )
                .await
                .map_err(|e| ("Passing the disk of", e))?;
            let set = set["fdset-id"].as_u64().unwrap_or_default();
            node["file"]["filename"] = Value::String(format!("/dev/fdset/{set}"));
            let plugged = async {
                qmp.execute("blockdev-add", Some(node), t)
                    .await
                    .map_err(|e| ("Opening the image of", e))?;
                qmp.execute("device_add", Some(dev), t)
                    .await
                    .map_err(|e| ("Hot-plugging block", e))
            }
            .await;
            // The block node holds its own duplicate: the set's fd closes now, and the set
            // goes away with the node.
            let _ = qmp
                .execute("remove-fd", Some(json!({ "fdset-id": set })), t)
                .await;
            plugged
        };
        let result = steps.await;
        self.end_hotplug(inner, life, info, result).await
    }

    /// Reserves `port` for the hotplug of `info` and records it as unsettled until
    /// [`end_hotplug`](Self::end_hotplug).
    pub(crate) fn begin_hotplug(
        &self,
        inner: &mut QemuSandbox,
        info: &DeviceInfo,
        port: usize,
        names: Vec<String>,
    ) {
        inner.ports[port].used_by = Some(info.id.clone());
        inner.unsettled.insert(
            info.id.clone(),
            Unsettled {
                info: info.clone(),
                port,
                fd_names: names,
                backend_maybe_added: true,
            },
        );
    }

    /// Records a finished hotplug, or settles a failed one with QEMU: a refused step is
    /// undone, a step without an answer is decided by what QEMU has (adopted or removed), and
    /// a connection that closed reports QEMU's exit.
    pub(crate) async fn end_hotplug(
        &self,
        inner: &mut QemuSandbox,
        life: &Lifecycle,
        info: DeviceInfo,
        result: std::result::Result<Value, (&'static str, QmpError)>,
    ) -> Result<DeviceInfo> {
        let id = info.id.clone();
        let (step, e) = match result {
            Ok(_) => {
                inner.unsettled.remove(&id);
                inner.hot.insert(id, info.clone());
                return Ok(info);
            }
            Err(failed) => failed,
        };
        if e.is_closed() {
            // QEMU is gone, and with it everything the hotplug gave it.
            if let Some(u) = inner.unsettled.remove(&id) {
                inner.ports[u.port].used_by = None;
            }
            return Err(Error::device(&id, step, self.qmp_cause(life, e).await));
        }
        // The netdev or block node exists only if its command was sent and not refused.
        let before_backend = matches!(
            step,
            "Passing a TAP fd of" | "Passing the disk of" | "Passing the virtiofsd socket of"
        );
        let backend_refused = matches!(
            step,
            "Adding the netdev of" | "Opening the image of" | "Adding the chardev of"
        ) && matches!(e, QmpError::Command { .. });
        if let Some(u) = inner.unsettled.get_mut(&id) {
            u.backend_maybe_added = !(before_backend || backend_refused);
        }
        if let Err(settling) = self.reconcile(inner).await {
            warn!(self.log, "could not reconcile with QEMU yet; the device's port stays reserved";
                "id" => id.as_str(), "error" => crate::error_chain(&settling));
        }
        if inner.hot.contains_key(&id) && !e.is_timeout() {
            // Refused, yet QEMU has the device: cannot happen for device_add, but the record
            // follows QEMU.
            warn!(self.log, "QEMU has a device whose hotplug it refused"; "id" => id.as_str());
        }
        if e.is_timeout() {
            if let Some(adopted) = inner.hot.get(&id) {
                warn!(self.log, "hotplug answered late; QEMU has the device, adopted"; "id" => id.as_str());
                return Ok(adopted.clone());
            }
        }
        Err(Error::device(&id, step, e))
    }
}

fn nic_info(id: DeviceId, n: &NetworkConfig, location: GuestLocation, hot: bool) -> DeviceInfo {
    DeviceInfo {
        id,
        kind: DeviceKind::Network,
        location,
        hotplugged: hot,
        mac: Some(n.guest_mac),
        queue_pairs: Some(n.queue_pairs),
        host: Some(n.backend.tap_name().to_string()),
    }
}

fn block_info(id: DeviceId, b: &BlockConfig, location: GuestLocation, hot: bool) -> DeviceInfo {
    DeviceInfo {
        id,
        kind: DeviceKind::Block,
        location,
        hotplugged: hot,
        mac: None,
        queue_pairs: None,
        host: Some(b.path.display().to_string()),
    }
}

/// The image must exist and open in the requested mode, or QEMU fails later with less
/// context.
fn check_block_file(id: &DeviceId, b: &BlockConfig) -> Result<()> {
    OpenOptions::new()
        .read(true)
        .write(!b.read_only)
        .open(&b.path)
        .map(drop)
        .map_err(|e| {
            Error::device(
                id,
                format!(
                    "Opening {} {} for block",
                    b.path.display(),
                    if b.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    }
                ),
                e,
            )
        })
}

/// Turns `,mq=on,vectors=6` into JSON properties of a `device_add`.
fn apply_props(dev: &mut Value, props: &str) {
    for kv in props.split(',').filter(|s| !s.is_empty()) {
        if let Some((k, v)) = kv.split_once('=') {
            let value = match v {
                "on" => Value::Bool(true),
                "off" => Value::Bool(false),
                _ => v
                    .parse::<u64>()
                    .map(Value::from)
                    .unwrap_or_else(|_| Value::String(v.into())),
            };
            dev[k] = value;
        }
    }
}

/// Opens `queues` queues of the TAP `name` in `netns` (creating it if it does not exist),
/// with a virtio-net header, as QEMU expects.
fn open_tap_queues(name: &str, queues: u16, netns: Option<&Path>) -> netdev::Result<Vec<OwnedFd>> {
    let mut b = netdev::TapBuilder::new(name)
        .queues(usize::from(queues))
        .multi_queue(queues > 1);
    if let Some(ns) = netns {
        b = b.netns(ns);
    }
    Ok(b.create()?.into_queues())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_properties_become_typed_json() {
        let mut dev = json!({});
        apply_props(&mut dev, ",mq=on,vectors=6,host_mtu=1400");
        assert_eq!(dev, json!({"mq": true, "vectors": 6, "host_mtu": 1400}));
    }
}
