//! virtio devices on the virtio-mmio transport (virtio 1.x, "modern" register layout).
//!
//! - [`queue`]: the split virtqueue, read and written in guest memory.
//! - [`mmio`]: the register window (version 2) a vCPU's MMIO exits land in, feature and
//!   status negotiation, and the [`VirtioCore`](mmio::VirtioCore) the event thread drives.
//! - [`net`]: virtio-net on a TAP opened by name with `dbs-utils`.
//! - [`block`]: virtio-blk on a host file.
//! - [`vsock`]: virtio-vsock whose host side is a Unix socket speaking the hybrid-vsock
//!   `CONNECT <port>\n` handshake (as Firecracker and Dragonball do).
//!
//! # Events, not polling
//!
//! Every queue's `QueueNotify` write is a KVM ioeventfd (datamatch on the queue index), so a
//! guest kick wakes the `db-vmm` event thread's epoll without a vCPU exit to user space.
//! Interrupts go back through the device's legacy line, a `dbs-interrupt` source group of
//! the VM's [`KvmIrqManager`](dbs_interrupt::KvmIrqManager): a KVM irqfd on its IOAPIC pin. Host backends (the TAP fd,
//! the vsock listener and connections) are in the same epoll; nothing spins.
//!
//! Constants are the virtio 1.x specification's numbers, named as in Linux's
//! `include/uapi/linux/virtio_*.h` (the `virtio-bindings` crate lacks the mmio and vsock
//! headers, so they are written here once).

pub mod block;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;

use dbs_interrupt::{InterruptSourceGroup, InterruptStatusRegister32};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMem;
pub use queue::Queue;

/// `VIRTIO_F_VERSION_1`: the modern interface (required by transport version 2).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Device id of virtio-net.
pub const TYPE_NET: u32 = 1;
/// Device id of virtio-blk.
pub const TYPE_BLOCK: u32 = 2;
/// Device id of virtio-vsock.
pub const TYPE_VSOCK: u32 = 19;
/// `VIRTIO_MMIO_INT_VRING`: a used buffer was returned.
pub const INT_VRING: u32 = 1;
/// `VIRTIO_MMIO_INT_CONFIG`: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Bit `n` as a feature mask.
pub const fn bit(n: u32) -> u64 {
    1 << n
}

/// A device's interrupt: the `InterruptStatus` register and its legacy interrupt line, a
/// `dbs-interrupt` source group (in the VM, a [`KvmIrqManager`](dbs_interrupt::KvmIrqManager)
/// group whose trigger is a KVM irqfd on the device's IOAPIC pin).
pub struct Interrupt {
    status: InterruptStatusRegister32,
    line: Arc<Box<dyn InterruptSourceGroup>>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status.read())
            .field("line", &self.line.base())
            .finish()
    }
}

impl Interrupt {
    /// An interrupt raised on `line` (a one-source legacy group, enabled by the caller).
    pub fn new(line: Arc<Box<dyn InterruptSourceGroup>>) -> Interrupt {
        Interrupt {
            status: InterruptStatusRegister32::new(),
            line,
        }
    }

    /// Sets `why` (`INT_VRING`, `INT_CONFIG`) in `InterruptStatus` and raises the line.
    pub fn raise(&self, why: u32) {
        self.status.set_bits(why);
        // Writing the irqfd fails only if its counter is full (2^64 - 2 pending), which
        // cannot happen: KVM drains it.
        let _ = self.line.trigger(0);
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.read()
    }

    /// `InterruptACK`: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.clear_bits(bits);
    }

    /// The eventfd that raises the line (for tests that wait on it).
    pub fn irqfd(&self) -> Option<&EventFd> {
        self.line.notifier(0)
    }

    /// An interrupt whose line is a bare eventfd, not wired to any VM (unit tests).
    #[cfg(test)]
    pub(crate) fn unwired() -> Interrupt {
        Interrupt::new(Arc::new(Box::new(testing::EventFdLine(
            EventFd::new(0).expect("eventfd"),
        ))))
    }
}

/// Interrupt lines without KVM, for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use dbs_interrupt::{InterruptSourceConfig, InterruptSourceGroup, InterruptSourceType};
    use vmm_sys_util::eventfd::EventFd;

    /// A legacy line whose trigger writes an eventfd nobody routes.
    pub struct EventFdLine(pub EventFd);

    impl InterruptSourceGroup for EventFdLine {
        fn interrupt_type(&self) -> InterruptSourceType {
            InterruptSourceType::LegacyIrq
        }
        fn len(&self) -> u32 {
            1
        }
        fn base(&self) -> u32 {
            0
        }
        fn enable(&self, _: &[InterruptSourceConfig]) -> std::io::Result<()> {
            Ok(())
        }
        fn disable(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn update(&self, _: u32, _: &InterruptSourceConfig) -> std::io::Result<()> {
            Ok(())
        }
        fn notifier(&self, index: u32) -> Option<&EventFd> {
            (index == 0).then_some(&self.0)
        }
        fn trigger(&self, _: u32) -> std::io::Result<()> {
            self.0.write(1)
        }
    }
}

/// What a device's queue handlers work on.
#[derive(Debug)]
pub struct QueueCtx<'a> {
    /// Guest memory.
    pub mem: &'a GuestMem,
    /// The device's queues, as the driver configured them.
    pub queues: &'a mut [Queue],
    /// The device's interrupt.
    pub interrupt: &'a Interrupt,
}

impl QueueCtx<'_> {
    /// Raises a used-buffer interrupt unless the driver suppressed it on `queue`.
    pub fn notify_used(&self, queue: usize) {
        if !self.queues[queue].interrupts_suppressed(self.mem) {
            self.interrupt.raise(INT_VRING);
        }
    }
}

/// Why a device cannot start when the driver sets `DRIVER_OK`; the transport then sets
/// `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivateError {
    /// The driver set `DRIVER_OK` without `FEATURES_OK`.
    #[error("DRIVER_OK before FEATURES_OK")]
    FeaturesNotOk,
    /// A queue the driver made ready does not fit guest memory or its size limit.
    #[error(
        "queue {index} is not valid: size {size} (max {max}), rings {desc:#x}/{avail:#x}/{used:#x}"
    )]
    InvalidQueue {
        /// The queue.
        index: usize,
        /// Its size.
        size: u16,
        /// The device's maximum.
        max: u16,
        /// Descriptor table address.
        desc: u64,
        /// Available ring address.
        avail: u64,
        /// Used ring address.
        used: u64,
    },
    /// The driver acknowledged a feature without one it depends on.
    #[error("{feature} acknowledged without {needs}")]
    MissingFeature {
        /// The feature acknowledged.
        feature: &'static str,
        /// The one it needs.
        needs: &'static str,
    },
    /// The host backend of the device is not open.
    #[error("the {0} is not open")]
    BackendClosed(&'static str),
    /// The TAP's offloads could not be set to what the driver acknowledged.
    #[error("setting TAP offloads {flags:#x}")]
    TapOffloads {
        /// The offload flags.
        flags: u32,
        /// The error.
        #[source]
        source: dbs_utils::net::TapError,
    },
}

/// A virtio device behind the transport in [`mmio`].
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device id (`TYPE_NET`...).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; their number is the device's queue count.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Opens host resources. Called on the `db-vmm` thread, in the sandbox's network
    /// namespace, before any vCPU runs.
    fn open_backend(&mut self) -> crate::error::Result<()> {
        Ok(())
    }
    /// The driver set `DRIVER_OK` having acknowledged `acked`; the queues are valid.
    fn activate(&mut self, acked: u64) -> Result<(), ActivateError>;
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Host fds the event thread polls for this device, with their events.
    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// The driver notified `queue`.
    fn queue_event(&mut self, queue: usize, ctx: &mut QueueCtx<'_>);
    /// Backend fd number `index` (of [`backend_fds`](Self::backend_fds)) is ready. Called
    /// also before activation: the device must then not touch the queues.
    fn backend_event(&mut self, _index: usize, _ctx: &mut QueueCtx<'_>) {}
}

/// Copies the bytes of `config` at `offset` into `data`, zero beyond its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
