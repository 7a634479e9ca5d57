//! Cold-plugging virtio-mmio devices: checks, host resources, the window and the
//! [`DeviceInfo`] the caller gets back.
//!
//! What can be checked before start is checked here, so a bad device fails `add_device`
//! and not the boot: the config (the contract's validation), a duplicate id or guest MAC,
//! a block image that is missing or not openable in the asked mode, a second vsock device,
//! a vsock socket that cannot be bound, more queue pairs than the device takes, pre-opened
//! TAP fds (not supported).
//! The TAP itself lives in the sandbox's network namespace and is opened by the `db-vmm`
//! thread at start (see [`crate::virtio::net`]); a missing TAP fails `start`.

use hypervisor::device::{BlockDriver, GuestLocation, NetworkBackend};
use hypervisor::{AgentAddress, ConfigError, Device, DeviceConfig, DeviceInfo, Error, Result};

use crate::virtio::block::BlockDevice;
use crate::virtio::net::{NetDevice, MAX_PAIRS};
use crate::virtio::vsock::VsockDevice;
use crate::virtio::VirtioDevice;
use crate::{DragonballHypervisor, Inner};

/// File name of the hybrid vsock socket in the sandbox's run directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";

impl DragonballHypervisor {
    /// Adds `device` while the VM is `Prepared`.
    pub(crate) fn cold_plug(&self, inner: &mut Inner, device: Device) -> Result<DeviceInfo> {
        device.config.validate()?;
        if inner.attached.iter().any(|d| d.id == device.id) {
            return Err(ConfigError::new(
                "id",
                format!("device {} is already attached; use another id", device.id),
            )
            .into());
        }
        let kind = device.config.kind();
        // Committed only when the device is added.
        let mut mmio = inner.mmio.clone();
        let window = mmio
            .allocate()
            .map_err(|e| Error::device(&device.id, "Cold-plugging", e))?;
        let mut agent = None;
        let what = format!("{kind} device {}", device.id);
        let mut info = DeviceInfo {
            id: device.id.clone(),
            kind,
            location: GuestLocation::Mmio {
                base: 0,
                size: 0,
                irq: None,
            },
            hotplugged: false,
            mac: None,
            queue_pairs: None,
            host: None,
        };
        let backend: Box<dyn VirtioDevice> = match &device.config {
            DeviceConfig::Network(net) => {
                if net.queue_pairs > MAX_PAIRS {
                    return Err(Self::unsupported(
                        format!("{what} with {} queue pairs", net.queue_pairs),
                        format!("the Dragonball backend's virtio-net takes at most {MAX_PAIRS} queue pairs"),
                    ));
                }
                if let NetworkBackend::TapFds { .. } = net.backend {
                    return Err(Self::unsupported(
                        format!("{what} on pre-opened TAP fds"),
                        "the Dragonball backend opens its TAP by name in the sandbox's network namespace; pass NetworkBackend::TapName",
                    ));
                }
                if let Some(other) = inner.attached.iter().find(|d| d.mac == Some(net.guest_mac)) {
                    return Err(ConfigError::new(
                        "network.guest_mac",
                        format!(
                            "{} is already the MAC of device {}; give each NIC its own",
                            net.guest_mac, other.id
                        ),
                    )
                    .into());
                }
                if let Some(other) = inner
                    .attached
                    .iter()
                    .find(|d| d.kind == kind && d.host.as_deref() == Some(net.backend.tap_name()))
                {
                    return Err(ConfigError::new(
                        "network.tap",
                        format!(
                            "TAP {:?} is already used by device {}",
                            net.backend.tap_name(),
                            other.id
                        ),
                    )
                    .into());
                }
                info.mac = Some(net.guest_mac);
                info.queue_pairs = Some(net.queue_pairs);
                info.host = Some(net.backend.tap_name().to_string());
                let netns = inner.spec.as_ref().and_then(|s| s.netns.clone());
                Box::new(NetDevice::new(
                    net.backend.tap_name(),
                    netns,
                    net.guest_mac,
                    net.mtu,
                    net.queue_size,
                    net.queue_pairs,
                    self.log.clone(),
                ))
            }
            DeviceConfig::Block(blk) => {
                if blk.driver == BlockDriver::VirtioBlkPci {
                    return Err(Self::unsupported(
                        format!("{what} as virtio-blk-pci"),
                        "the Dragonball backend has no PCI bus; use BlockDriver::VirtioBlkMmio",
                    ));
                }
                info.host = Some(blk.path.display().to_string());
                let dev = BlockDevice::open(
                    &blk.path,
                    blk.read_only,
                    device.id.as_str(),
                    self.log.clone(),
                )
                .map_err(|e| Error::device(&device.id, "Cold-plugging block", e))?;
                Box::new(dev)
            }
            DeviceConfig::Vsock(v) => {
                if inner.agent.is_some() {
                    return Err(ConfigError::new(
                        "vsock",
                        "the VM already has a vsock device; it takes one",
                    )
                    .into());
                }
                let run_dir = inner.run_dir.as_ref().expect("prepared VMs have a run dir");
                let path = run_dir.join(VSOCK_SOCKET);
                let dev = VsockDevice::new(v.guest_cid, &path, self.log.clone())
                    .map_err(|e| Error::device(&device.id, "Cold-plugging vsock", e))?;
                let port = inner.spec.as_ref().map_or(1024, |s| s.config.agent_port);
                agent = Some(AgentAddress::HybridVsock {
                    path: path.clone(),
                    port,
                });
                info.host = Some(path.display().to_string());
                Box::new(dev)
            }
        };
        info.location = GuestLocation::Mmio {
            base: window.base,
            size: window.size,
            irq: Some(window.irq),
        };
        inner.mmio = mmio;
        if agent.is_some() {
            inner.agent = agent;
        }
        inner.mmio_windows.push(window);
        inner.virtio.push((window, backend));
        inner.attached.push(info.clone());
        slog::info!(self.log, "device added"; "id" => %device.id, "kind" => %kind,
            "location" => %info.location);
        Ok(info)
    }
}
