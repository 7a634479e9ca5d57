//! Cold-plugging virtio-mmio devices: checks, host resources, the window and the
//! [`DeviceInfo`] the caller gets back; and cold removal, which drops a device that has not
//! started and frees its window.
//!
//! What can be checked before start is checked here, so a bad device fails `add_device`
//! and not the boot: the config (the contract's validation), a duplicate id or guest MAC,
//! a block image that is missing or not openable in the asked mode, a second vsock device,
//! a vsock socket that cannot be bound, more queue pairs than the device takes, pre-opened
//! TAP fds (not supported).
//! The TAP itself lives in the sandbox's network namespace and is opened by the `db-vmm`
//! thread at start (see [`crate::virtio::net`]); a missing TAP fails `start`.

use hypervisor::device::{BlockDriver, GuestLocation, NetworkBackend};
use hypervisor::vm::{unsupported, Context};
use hypervisor::{
    AgentAddress, ConfigError, Device, DeviceConfig, DeviceId, DeviceInfo, DeviceKind, Error,
    PlugMode, Result,
};

use crate::boot::MmioWindow;
use crate::devices::MmioAllocator;
use crate::virtio::block::BlockDevice;
use crate::virtio::net::{NetDevice, MAX_PAIRS};
use crate::virtio::vsock::VsockDevice;
use crate::virtio::VirtioDevice;
use crate::{ColdDevice, Dragonball, DragonballSandbox, BACKEND};

/// File name of the hybrid vsock socket in the sandbox's run directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";

/// The lowest window no device in `used` has (a removed device's window is handed out again).
fn free_window(used: &[ColdDevice]) -> crate::error::Result<MmioWindow> {
    let mut all = MmioAllocator::default();
    loop {
        let window = all.allocate()?;
        if !used.iter().any(|d| d.window == window) {
            return Ok(window);
        }
    }
}

impl Dragonball {
    /// Adds `device` while the VM is `Prepared` (the lifecycle core validated its config).
    pub(crate) fn add_cold(
        &self,
        inner: &mut DragonballSandbox,
        ctx: Context<'_>,
        device: Device,
    ) -> Result<DeviceInfo> {
        if inner.devices.iter().any(|d| d.info.id == device.id) {
            return Err(ConfigError::new(
                "id",
                format!("device {} is already attached; use another id", device.id),
            )
            .into());
        }
        let kind = device.config.kind();
        let window = free_window(&inner.devices)
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
                    return Err(unsupported(
                        BACKEND,
                        format!("{what} with {} queue pairs", net.queue_pairs),
                        format!("the Dragonball backend's virtio-net takes at most {MAX_PAIRS} queue pairs"),
                    ));
                }
                if let NetworkBackend::TapFds { .. } = net.backend {
                    return Err(unsupported(
                        BACKEND,
                        format!("{what} on pre-opened TAP fds"),
                        "the Dragonball backend opens its TAP by name in the sandbox's network namespace; pass NetworkBackend::TapName",
                    ));
                }
                if let Some(other) = inner
                    .devices
                    .iter()
                    .map(|d| &d.info)
                    .find(|d| d.mac == Some(net.guest_mac))
                {
                    return Err(ConfigError::new(
                        "network.guest_mac",
                        format!(
                            "{} is already the MAC of device {}; give each NIC its own",
                            net.guest_mac, other.id
                        ),
                    )
                    .into());
                }
                if let Some(other) =
                    inner.devices.iter().map(|d| &d.info).find(|d| {
                        d.kind == kind && d.host.as_deref() == Some(net.backend.tap_name())
                    })
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
                let netns = ctx.spec.netns.clone();
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
                    return Err(unsupported(
                        BACKEND,
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
            DeviceConfig::SharedFs(_) => {
                return Err(unsupported(
                    BACKEND,
                    format!("{what}, a shared filesystem"),
                    "the Dragonball backend has no virtio-fs device (none of its published crates builds one here)",
                ))
            }
            DeviceConfig::Vsock(v) => {
                if inner.agent.is_some() {
                    return Err(ConfigError::new(
                        "vsock",
                        "the VM already has a vsock device; it takes one",
                    )
                    .into());
                }
                let path = ctx.run_dir.join(VSOCK_SOCKET);
                let dev = VsockDevice::new(v.guest_cid, &path, self.log.clone())
                    .map_err(|e| Error::device(&device.id, "Cold-plugging vsock", e))?;
                agent = Some(AgentAddress::HybridVsock {
                    path: path.clone(),
                    port: ctx.spec.config.agent_port,
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
        if agent.is_some() {
            inner.agent = agent;
        }
        inner.devices.push(ColdDevice {
            info: info.clone(),
            window,
            device: Some(std::sync::Mutex::new(backend)),
        });
        slog::info!(self.log, "device added"; "id" => %device.id, "kind" => %kind,
            "location" => %info.location);
        Ok(info)
    }

    /// Removes device `id`: from the start-up list while the VM is `Prepared` (its host
    /// resources close, its window is free again); a running guest's devices stay.
    pub(crate) fn remove_cold(
        &self,
        inner: &mut DragonballSandbox,
        id: &DeviceId,
        mode: PlugMode,
    ) -> Result<()> {
        let Some(at) = inner.devices.iter().position(|d| &d.info.id == id) else {
            return Err(Error::DeviceNotFound(id.clone()));
        };
        if mode == PlugMode::Hot {
            let kind = inner.devices[at].info.kind;
            return Err(unsupported(
                BACKEND,
                format!("{kind} hot-unplug"),
                "the Dragonball backend has no hotplug; a running guest keeps its devices",
            ));
        }
        let gone = inner.devices.remove(at);
        if gone.info.kind == DeviceKind::Vsock {
            inner.agent = None;
        }
        // Dropping the device closes its block image, or its vsock socket (and removes it).
        drop(gone.device);
        slog::info!(self.log, "device removed"; "id" => %id, "kind" => %gone.info.kind);
        Ok(())
    }
}
