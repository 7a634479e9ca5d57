//! The virtio-mmio transport, version 2 (virtio 1.x section 4.2.2): the 4 KiB register
//! window of one device.
//!
//! vCPU threads read and write the registers ([`MmioTransport`] is a `dbs-device`
//! [`DeviceIo`]); the `db-vmm` event thread runs the device's queues. Both go through the
//! [`VirtioCore`] behind one mutex. `QueueNotify` normally never reaches this code: KVM
//! signals the queue's ioeventfd instead; a write that does arrive is handled the same way.
//!
//! Negotiation follows the spec: `FEATURES_OK` sticks only if the driver acknowledged a
//! subset of the offered features that includes `VIRTIO_F_VERSION_1`; `DRIVER_OK` activates
//! the device only if every ready queue is valid in guest memory, otherwise the device sets
//! `DEVICE_NEEDS_RESET`. Writing 0 to `Status` resets it.

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard};

use dbs_device::{DeviceIo, IoAddress};

use super::{bit, ActivateError, Interrupt, Queue, QueueCtx, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::error::chain;
use crate::memory::GuestMem;

/// "virt", little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern transport.
pub const VERSION: u32 = 2;
/// Our vendor id ("DBVM"; the spec leaves it free).
pub const VENDOR_ID: u32 = 0x4d56_4244;

/// Register offsets.
pub mod reg {
    /// `MagicValue`.
    pub const MAGIC: u64 = 0x000;
    /// `Version`.
    pub const VERSION: u64 = 0x004;
    /// `DeviceID`.
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID`.
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DeviceFeatures`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DeviceFeaturesSel`.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DriverFeaturesSel`.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QueueSel`.
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax`.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum`.
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QueueReady`.
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify`.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// `InterruptStatus`.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `InterruptACK`.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status`.
    pub const STATUS: u64 = 0x070;
    /// `QueueDescLow`.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QueueDescHigh`.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QueueDriverLow`.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QueueDriverHigh`.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// `QueueDeviceLow`.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QueueDeviceHigh`.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// `ConfigGeneration`.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.x section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// One device's transport state and the device itself.
#[derive(Debug)]
pub struct VirtioCore {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMem>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
    log: slog::Logger,
}

impl VirtioCore {
    /// Wraps `device`, whose queues live in `mem` and whose interrupt is `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMem>,
        interrupt: Arc<Interrupt>,
        log: slog::Logger,
    ) -> VirtioCore {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(Queue::new)
            .collect();
        VirtioCore {
            device,
            mem,
            interrupt,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
            log,
        }
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device, mutably (to open its backend).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Whether the driver set `DRIVER_OK` and the device accepted it.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The `Status` register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Number of queues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    fn ctx_parts(&mut self) -> (&mut dyn VirtioDevice, QueueCtx<'_>) {
        (
            self.device.as_mut(),
            QueueCtx {
                mem: &self.mem,
                queues: &mut self.queues,
                interrupt: &self.interrupt,
            },
        )
    }

    /// The driver notified queue `index` (its ioeventfd fired, or a `QueueNotify` write).
    pub fn queue_event(&mut self, index: usize) {
        if !self.active || index >= self.queues.len() || !self.queues[index].ready {
            return;
        }
        let (dev, mut ctx) = self.ctx_parts();
        dev.queue_event(index, &mut ctx);
    }

    /// Backend fd `index` of the device is ready. The device is told even while inactive
    /// (it must consume level-triggered readiness), and must then leave its queues alone.
    pub fn backend_event(&mut self, index: usize) {
        let (dev, mut ctx) = self.ctx_parts();
        dev.backend_event(index, &mut ctx);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A 32-bit register read.
    pub fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    /// A 32-bit register write.
    pub fn write_reg(&mut self, offset: u64, value: u32) {
        // Queue layout may change only before the driver is done (spec 4.2.2.3).
        let queue_setup = self.status & status::DRIVER_OK == 0;
        let set_low = |a: &mut u64, v: u32| *a = (*a & !0xffff_ffff) | u64::from(v);
        let set_high = |a: &mut u64, v: u32| *a = (*a & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, value),
                    1 => set_high(&mut self.driver_features, value),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.size = value as u16;
                }
            }
            reg::QUEUE_READY if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.ready = value == 1;
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    let f = if offset == reg::QUEUE_DESC_LOW {
                        set_low
                    } else {
                        set_high
                    };
                    f(&mut q.desc_table, value);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    let f = if offset == reg::QUEUE_DRIVER_LOW {
                        set_low
                    } else {
                        set_high
                    };
                    f(&mut q.avail_ring, value);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    let f = if offset == reg::QUEUE_DEVICE_LOW {
                        set_low
                    } else {
                        set_high
                    };
                    f(&mut q.used_ring, value);
                }
            }
            reg::QUEUE_NOTIFY => self.queue_event(value as usize),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ => slog::debug!(self.log, "ignored virtio-mmio register write";
                "offset" => format!("{offset:#x}"), "value" => format!("{value:#x}")),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let new = value & !self.status;
        let mut value = value;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let acked = self.driver_features;
            if acked & !offered != 0 || acked & bit(VIRTIO_F_VERSION_1) == 0 {
                slog::warn!(self.log, "the driver's features are refused";
                    "offered" => format!("{offered:#x}"), "acked" => format!("{acked:#x}"));
                value &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && !self.active {
            if let Err(why) = self.activate() {
                slog::warn!(self.log, "the device cannot start"; "why" => chain(&why));
                value |= status::DEVICE_NEEDS_RESET;
                self.interrupt.raise(super::INT_CONFIG);
            }
        }
        self.status = value;
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        if self.status & status::FEATURES_OK == 0 {
            return Err(ActivateError::FeaturesNotOk);
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready && !q.is_valid(&self.mem) {
                return Err(ActivateError::InvalidQueue {
                    index: i,
                    size: q.size,
                    max: q.max_size,
                    desc: q.desc_table,
                    avail: q.avail_ring,
                    used: q.used_ring,
                });
            }
        }
        self.device.activate(self.driver_features)?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }
}

/// The register window as `dbs-device` dispatches MMIO to it.
#[derive(Debug, Clone)]
pub struct MmioTransport {
    core: Arc<Mutex<VirtioCore>>,
}

impl MmioTransport {
    /// The window of `core`.
    pub fn new(core: Arc<Mutex<VirtioCore>>) -> MmioTransport {
        MmioTransport { core }
    }

    fn core(&self) -> MutexGuard<'_, VirtioCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DeviceIo for MmioTransport {
    fn read(&self, _base: IoAddress, offset: IoAddress, data: &mut [u8]) {
        let offset = offset.raw_value();
        let core = self.core();
        if offset >= reg::CONFIG {
            core.device.read_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&core.read_reg(offset).to_le_bytes());
        } else {
            // Registers are 32-bit only (spec 4.2.2.2).
            data.fill(0);
        }
    }

    fn write(&self, _base: IoAddress, offset: IoAddress, data: &[u8]) {
        let offset = offset.raw_value();
        if offset < reg::CONFIG && data.len() == 4 && offset % 4 == 0 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.core().write_reg(offset, v);
        }
        // Config space writes: no device here has writable configuration.
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::testing;

    #[derive(Debug, Default)]
    struct Dummy {
        events: Vec<usize>,
        activated: Option<u64>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            bit(VIRTIO_F_VERSION_1) | bit(5)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(b"abcdef", offset, data);
        }
        fn activate(&mut self, acked: u64) -> Result<(), ActivateError> {
            self.activated = Some(acked);
            Ok(())
        }
        fn queue_event(&mut self, queue: usize, _ctx: &mut QueueCtx<'_>) {
            self.events.push(queue);
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<VirtioCore>>) {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let irq = Arc::new(Interrupt::unwired());
        let core = Arc::new(Mutex::new(VirtioCore::new(
            Box::<Dummy>::default(),
            Arc::new(testing::mem()),
            irq,
            log,
        )));
        (MmioTransport::new(core.clone()), core)
    }

    fn rd(t: &MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(IoAddress(0), IoAddress(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &MmioTransport, off: u64, v: u32) {
        t.write(IoAddress(0), IoAddress(off), &v.to_le_bytes());
    }

    fn negotiate(t: &MmioTransport, low: u32, high: u32) -> u32 {
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, low);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, high);
        wr(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        rd(t, reg::STATUS)
    }

    fn setup_queue(t: &MmioTransport, q: u32) {
        wr(t, reg::QUEUE_SEL, q);
        wr(t, reg::QUEUE_NUM, 8);
        wr(t, reg::QUEUE_DESC_LOW, testing::DESC as u32);
        wr(t, reg::QUEUE_DRIVER_LOW, testing::AVAIL as u32);
        wr(t, reg::QUEUE_DEVICE_LOW, testing::USED as u32);
        wr(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn the_identity_registers_read_as_a_version_2_device() {
        let (t, _) = transport();
        assert_eq!(rd(&t, reg::MAGIC), 0x7472_6976);
        assert_eq!(rd(&t, reg::VERSION), 2);
        assert_eq!(rd(&t, reg::DEVICE_ID), 42);
        wr(&t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&t, reg::DEVICE_FEATURES), 1 << 5);
        wr(&t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&t, reg::DEVICE_FEATURES), 1);
        wr(&t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&t, reg::QUEUE_NUM_MAX), 16);
        wr(&t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&t, reg::QUEUE_NUM_MAX), 0);
        let mut cfg = [0u8; 2];
        t.read(IoAddress(0), IoAddress(0x102), &mut cfg);
        assert_eq!(&cfg, b"cd");
    }

    #[test]
    fn features_without_version_1_or_not_offered_are_refused() {
        let (t, _) = transport();
        assert_eq!(negotiate(&t, 1 << 5, 0) & status::FEATURES_OK, 0);
        wr(&t, reg::STATUS, 0);
        assert_eq!(negotiate(&t, 1 << 6, 1) & status::FEATURES_OK, 0);
        wr(&t, reg::STATUS, 0);
        assert_ne!(negotiate(&t, 1 << 5, 1) & status::FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_activates_with_the_acked_features_and_notifies_reach_the_device() {
        let (t, core) = transport();
        negotiate(&t, 1 << 5, 1);
        setup_queue(&t, 0);
        wr(&t, reg::QUEUE_NOTIFY, 0);
        assert!(!core.lock().unwrap().is_active(), "notify before DRIVER_OK");
        let s = rd(&t, reg::STATUS);
        wr(&t, reg::STATUS, s | status::DRIVER_OK);
        assert_eq!(rd(&t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        wr(&t, reg::QUEUE_NOTIFY, 0);
        wr(&t, reg::QUEUE_NOTIFY, 1); // not ready: ignored
        let c = core.lock().unwrap();
        assert!(c.is_active());
        let dev = format!("{:?}", c.device());
        assert!(dev.contains("events: [0]"), "{dev}");
        assert!(dev.contains("activated: Some(4294967328)"), "{dev}");
    }

    #[test]
    fn a_queue_outside_guest_ram_makes_the_device_need_a_reset_and_zero_resets_it() {
        let (t, core) = transport();
        negotiate(&t, 0, 1);
        setup_queue(&t, 0);
        wr(&t, reg::QUEUE_SEL, 0);
        // QueueReady was set: the layout is frozen only after DRIVER_OK, so this applies.
        wr(&t, reg::QUEUE_DEVICE_HIGH, 1);
        let s = rd(&t, reg::STATUS);
        wr(&t, reg::STATUS, s | status::DRIVER_OK);
        assert_ne!(rd(&t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!core.lock().unwrap().is_active());
        wr(&t, reg::STATUS, 0);
        assert_eq!(rd(&t, reg::STATUS), 0);
        assert_eq!(rd(&t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn interrupt_ack_clears_the_status_bits() {
        let (t, core) = transport();
        core.lock()
            .unwrap()
            .interrupt
            .raise(super::super::INT_VRING);
        assert_eq!(rd(&t, reg::INTERRUPT_STATUS), 1);
        wr(&t, reg::INTERRUPT_ACK, 1);
        assert_eq!(rd(&t, reg::INTERRUPT_STATUS), 0);
    }
}
