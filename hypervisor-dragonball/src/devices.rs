//! The VMM's devices and their I/O dispatch.
//!
//! Legacy devices come from `dbs-legacy-devices`: a 16550 UART on COM1 (port 0x3f8, IRQ 4)
//! whose output goes to the console log, and the i8042 controller, whose reset command
//! (`out 0x64, 0xfe`) ends the VM as a guest shutdown. Guest port and MMIO accesses are
//! routed by `dbs-device`'s [`IoManager`]; accesses nobody claims read as all-ones and
//! writes are dropped, as on a PC bus with nothing behind it.
//!
//! Interrupt lines are `dbs-interrupt` legacy source groups of one [`KvmIrqManager`], as in
//! Dragonball: the manager installs the PIC/IOAPIC GSI routing, and each line's group is a
//! KVM irqfd on its pin, enabled here. COM1's UART writes its group's eventfd.
//!
//! virtio-mmio devices get a window and an interrupt line from [`MmioAllocator`]; the
//! windows are announced to the guest on its command line (see [`crate::boot`]). Each one
//! is a [`VirtioSlot`]: its register window in the [`IoManager`], a legacy interrupt group
//! on its line, and one KVM ioeventfd per queue on its `QueueNotify` register (datamatch:
//! the queue index), which the event thread polls.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
use std::sync::{Arc, Mutex};

use dbs_device::device_manager::IoManager;
use dbs_device::resources::Resource;
use dbs_device::DeviceIo;
use dbs_interrupt::{
    InterruptManager, InterruptSourceConfig, InterruptSourceGroup, InterruptSourceType,
    KvmIrqManager, LegacyIrqSourceConfig,
};
use dbs_legacy_devices::{
    ConsoleHandler, EventFdTrigger, I8042Device, I8042DeviceMetrics, SerialDevice,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::MmioWindow;
use crate::error::{DeviceError, Error, Result};
use crate::memory::{GuestMem, MMIO_HOLE_START};
use crate::virtio::mmio::{reg, MmioTransport, VirtioCore};
use crate::virtio::{Interrupt, VirtioDevice};

/// COM1's I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// The i8042 controller's ports, 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT: u16 = 0x60;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// First interrupt line for virtio-mmio devices (below are the PIT, keyboard, serial ports).
pub const FIRST_DEVICE_IRQ: u32 = dbs_boot::layout::IRQ_BASE;
/// Last interrupt line the IOAPIC routes for legacy devices.
pub const LAST_DEVICE_IRQ: u32 = dbs_boot::layout::IRQ_MAX;

/// Hands out virtio-mmio windows from the start of the 32-bit MMIO hole, one IRQ each.
#[derive(Debug, Clone)]
pub struct MmioAllocator {
    next_base: u64,
    next_irq: u32,
}

impl Default for MmioAllocator {
    fn default() -> Self {
        MmioAllocator {
            next_base: MMIO_HOLE_START,
            next_irq: FIRST_DEVICE_IRQ,
        }
    }
}

impl MmioAllocator {
    /// The next free window, or an error when the interrupt lines are used up.
    pub fn allocate(&mut self) -> Result<MmioWindow> {
        if self.next_irq > LAST_DEVICE_IRQ {
            return Err(DeviceError::NoIrqLine {
                first: FIRST_DEVICE_IRQ,
                last: LAST_DEVICE_IRQ,
            }
            .into());
        }
        let w = MmioWindow {
            base: self.next_base,
            size: VIRTIO_MMIO_WINDOW,
            irq: self.next_irq,
        };
        self.next_base += VIRTIO_MMIO_WINDOW;
        self.next_irq += 1;
        Ok(w)
    }
}

/// A virtio device as the VMM holds it: the transport state and the queue eventfds.
#[derive(Debug)]
pub struct VirtioSlot {
    /// Where the guest finds it.
    pub window: MmioWindow,
    /// The transport and device, shared with the vCPUs' MMIO exits.
    pub core: Arc<Mutex<VirtioCore>>,
    /// One ioeventfd per queue, signalled by KVM on `QueueNotify`.
    pub notify: Vec<EventFd>,
}

impl VirtioSlot {
    /// Locks the device.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, VirtioCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The devices of a running VM.
pub struct Devices {
    /// Port and MMIO dispatch, shared read-only with the vCPU threads.
    pub io: Arc<IoManager>,
    /// Written by the i8042 when the guest asks for a reset.
    pub reset: EventFd,
    /// COM1, kept to detach its output on teardown.
    serial: Arc<Mutex<SerialDevice>>,
    /// Owns the GSI routing and every line's irqfd (on its own duplicate of the VM fd).
    _irqs: Arc<KvmIrqManager>,
    /// COM1's interrupt line.
    _serial_irq: Arc<Box<dyn InterruptSourceGroup>>,
    /// The virtio-mmio devices.
    pub virtio: Vec<VirtioSlot>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices").finish_non_exhaustive()
    }
}

fn eventfd(what: &'static str) -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what, source }.into())
}

/// The VM's interrupt manager, on a duplicate of `vm`'s fd (the manager wants to share
/// ownership of its VM fd; the caller keeps its own), with the legacy GSI routing installed.
fn irq_manager(kvm: &Kvm, vm: &VmFd) -> Result<Arc<KvmIrqManager>> {
    // SAFETY: `vm` owns this fd and outlives the borrow, which only duplicates it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
    let dup = borrowed
        .try_clone_to_owned()
        .map_err(DeviceError::DupVmFd)?;
    // SAFETY: `dup` is a fresh fd of the same KVM VM, owned by nothing else; the VmFd
    // takes ownership of it.
    let vm = unsafe { kvm.create_vmfd_from_rawfd(dup.into_raw_fd()) }
        .map_err(|e| Error::kvm("Wrapping the duplicate KVM VM fd", e))?;
    let irqs = Arc::new(KvmIrqManager::new(Arc::new(vm)));
    irqs.initialize().map_err(DeviceError::IrqRouting)?;
    Ok(irqs)
}

/// Line `irq` as an enabled legacy source group (its irqfd registered with KVM).
fn legacy_line(
    irqs: &KvmIrqManager,
    irq: u32,
    what: &str,
) -> Result<Arc<Box<dyn InterruptSourceGroup>>> {
    let group = irqs
        .create_group(InterruptSourceType::LegacyIrq, irq, 1)
        .map_err(|source| DeviceError::IrqLine {
            irq,
            what: what.to_string(),
            source,
        })?;
    group
        .enable(&[InterruptSourceConfig::LegacyIrq(LegacyIrqSourceConfig {})])
        .map_err(|source| DeviceError::IrqFd {
            irq,
            what: what.to_string(),
            source,
        })?;
    Ok(group)
}

impl Devices {
    /// Creates COM1 (writing to `console`), the i8042 and the virtio-mmio `virtio` devices,
    /// wired to `vm`'s interrupt lines; virtio queues live in `mem`.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        console: File,
        mem: &Arc<GuestMem>,
        virtio: Vec<(MmioWindow, Box<dyn VirtioDevice>)>,
        log: &slog::Logger,
    ) -> Result<Devices> {
        let mut io = IoManager::new();
        let irqs = irq_manager(kvm, vm)?;

        let serial_irq = legacy_line(&irqs, COM1_IRQ, "COM1")?;
        let irq_for_serial = serial_irq
            .notifier(0)
            .ok_or(DeviceError::NoIrqEventFd { what: "COM1" })?
            .try_clone()
            .map_err(|source| DeviceError::DupEventFd {
                what: "COM1's interrupt",
                source,
            })?;
        let mut serial = SerialDevice::new(irq_for_serial);
        serial.set_output_stream(Some(Box::new(console)));
        let serial = Arc::new(Mutex::new(serial));
        register(&mut io, "COM1", serial.clone(), COM1_PORT, 8)?;

        let reset = eventfd("i8042 reset")?;
        let reset_for_i8042 = reset
            .try_clone()
            .map_err(|source| DeviceError::DupEventFd {
                what: "the i8042 reset",
                source,
            })?;
        let i8042 = I8042Device::new(
            EventFdTrigger::new(reset_for_i8042),
            Arc::new(I8042DeviceMetrics::default()),
        );
        register(&mut io, "i8042", Arc::new(Mutex::new(i8042)), I8042_PORT, 5)?;

        let mut slots = Vec::new();
        for (window, device) in virtio {
            slots.push(virtio_slot(vm, &irqs, &mut io, mem, window, device, log)?);
        }

        Ok(Devices {
            io: Arc::new(io),
            reset,
            serial,
            _irqs: irqs,
            _serial_irq: serial_irq,
            virtio: slots,
        })
    }

    /// Stops console output (closing the log file).
    pub fn close_console(&self) {
        if let Ok(mut s) = self.serial.lock() {
            s.set_output_stream(None);
        }
    }
}

fn virtio_slot(
    vm: &VmFd,
    irqs: &KvmIrqManager,
    io: &mut IoManager,
    mem: &Arc<GuestMem>,
    window: MmioWindow,
    device: Box<dyn VirtioDevice>,
    log: &slog::Logger,
) -> Result<VirtioSlot> {
    let at = format!(
        "virtio-mmio device at {:#x} (IRQ {})",
        window.base, window.irq
    );
    let line = legacy_line(irqs, window.irq, &format!("the {at}"))?;
    let queues = device.queue_max_sizes().len();
    let core = Arc::new(Mutex::new(VirtioCore::new(
        device,
        mem.clone(),
        Arc::new(Interrupt::new(line)),
        log.new(slog::o!("mmio" => format!("{:#x}", window.base))),
    )));
    let mut notify = Vec::new();
    for q in 0..queues {
        let fd = eventfd("virtio queue notification")?;
        vm.register_ioevent(
            &fd,
            &IoEventAddress::Mmio(window.base + reg::QUEUE_NOTIFY),
            q as u32,
        )
        .map_err(|e| Error::kvm(format!("Registering queue {q}'s ioeventfd of the {at}"), e))?;
        notify.push(fd);
    }
    io.register_device_io(
        Arc::new(MmioTransport::new(core.clone())),
        &[Resource::MmioAddressRange {
            base: window.base,
            size: window.size,
        }],
    )
    .map_err(|source| DeviceError::Register {
        what: format!("the {at}"),
        source,
    })?;
    Ok(VirtioSlot {
        window,
        core,
        notify,
    })
}

fn register(
    io: &mut IoManager,
    name: &str,
    dev: Arc<dyn DeviceIo>,
    base: u16,
    size: u16,
) -> Result<()> {
    io.register_device_io(dev, &[Resource::PioAddressRange { base, size }])
        .map_err(|source| {
            DeviceError::Register {
                what: format!("{name} at ports {base:#x}+{size}"),
                source,
            }
            .into()
        })
}

/// Handles a guest port read: the device's answer, or all-ones when nothing is there.
pub fn pio_read(io: &IoManager, port: u16, data: &mut [u8]) {
    if io.pio_read(port, data).is_err() {
        data.fill(0xff);
    }
}

/// Handles a guest port write; writes to unclaimed ports (such as POST code port 0x80) are
/// dropped.
pub fn pio_write(io: &IoManager, port: u16, data: &[u8]) {
    let _ = io.pio_write(port, data);
}

/// Handles a guest MMIO read; unclaimed addresses read as all-ones.
pub fn mmio_read(io: &IoManager, addr: u64, data: &mut [u8]) {
    if io.mmio_read(addr, data).is_err() {
        data.fill(0xff);
    }
}

/// Handles a guest MMIO write; writes to unclaimed addresses are dropped.
pub fn mmio_write(io: &IoManager, addr: u64, data: &[u8]) {
    let _ = io.mmio_write(addr, data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_windows_are_consecutive_pages_with_their_own_irq() {
        let mut a = MmioAllocator::default();
        let w0 = a.allocate().unwrap();
        let w1 = a.allocate().unwrap();
        assert_eq!((w0.base, w0.size, w0.irq), (0xc000_0000, 0x1000, 5));
        assert_eq!((w1.base, w1.irq), (0xc000_1000, 6));
    }

    #[test]
    fn mmio_allocation_fails_when_irq_lines_run_out() {
        let mut a = MmioAllocator::default();
        for _ in FIRST_DEVICE_IRQ..=LAST_DEVICE_IRQ {
            a.allocate().unwrap();
        }
        assert!(matches!(
            a.allocate(),
            Err(Error::Device(DeviceError::NoIrqLine { .. }))
        ));
    }

    #[test]
    fn unclaimed_ports_read_as_all_ones() {
        let io = IoManager::new();
        let mut b = [0u8; 2];
        pio_read(&io, 0x2f8, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        mmio_read(&io, 0xd000_0000, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
