//! The split virtqueue (virtio 1.x, section 2.7): descriptor table, available ring and used
//! ring in guest memory, read and written through `vm-memory`.
//!
//! This is our own small implementation because no `virtio-queue` release fits the graph:
//! 0.6.x is built on vm-memory 0.9 but pulls vmm-sys-util 0.10 (a second copy next to the
//! 0.11 the `dbs-*` crates use), and 0.7 moves to vm-memory 0.10. Only what the devices
//! here negotiate is supported: no indirect descriptors, no event index, no packed rings.
//!
//! Everything the guest wrote is untrusted: ring indices are taken modulo the queue size,
//! descriptor indices are checked, a chain longer than the queue (a loop) is an error, and
//! every guest address goes through `GuestMemory`'s bounds checks.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::memory::GuestMem;

/// `VIRTQ_DESC_F_NEXT`: the chain continues in `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT` (not negotiated here, so refused).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: the driver does not want used-buffer interrupts.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// What a malformed queue or chain looks like.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    /// A descriptor index at or beyond the queue size.
    #[error("descriptor index {index} is outside a queue of {size}")]
    BadIndex {
        /// The index the guest gave.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// A chain with more descriptors than the queue has (a loop).
    #[error("descriptor chain is longer than the queue (a loop?)")]
    ChainTooLong,
    /// An indirect descriptor, which this device did not offer.
    #[error("indirect descriptor without VIRTIO_F_INDIRECT_DESC")]
    Indirect,
    /// Guest memory that is not RAM.
    #[error("guest address {0:#x} is not in guest RAM")]
    Memory(u64),
    /// The driver made more buffers available than the queue holds.
    #[error("the driver made {0} buffers available in a queue of {1}")]
    TooManyAvailable(u16, u16),
}

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// `VIRTQ_DESC_F_*`.
    pub flags: u16,
}

impl Descriptor {
    /// True when the device may write this buffer.
    pub fn is_write_only(&self) -> bool {
        self.flags & VIRTQ_DESC_F_WRITE != 0
    }
}

/// A chain the driver made available: its head index and its descriptors, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorChain {
    /// Head index, returned in the used ring.
    pub head: u16,
    /// The descriptors.
    pub descriptors: Vec<Descriptor>,
}

impl DescriptorChain {
    /// Copies `src` into the chain's device-writable buffers, in order; returns the bytes
    /// written (less than `src.len()` when the buffers are too small).
    pub fn write_all(&self, mem: &GuestMem, mut src: &[u8]) -> Result<usize, QueueError> {
        let mut done = 0;
        for d in self.descriptors.iter().filter(|d| d.is_write_only()) {
            if src.is_empty() {
                break;
            }
            let n = src.len().min(d.len as usize);
            mem.write_slice(&src[..n], GuestAddress(d.addr))
                .map_err(|_| QueueError::Memory(d.addr))?;
            src = &src[n..];
            done += n;
        }
        Ok(done)
    }

    /// The concatenated contents of the chain's device-readable buffers.
    pub fn read_all(&self, mem: &GuestMem, limit: usize) -> Result<Vec<u8>, QueueError> {
        let mut out = Vec::new();
        for d in self.descriptors.iter().filter(|d| !d.is_write_only()) {
            let n = (d.len as usize).min(limit.saturating_sub(out.len()));
            let start = out.len();
            out.resize(start + n, 0);
            mem.read_slice(&mut out[start..], GuestAddress(d.addr))
                .map_err(|_| QueueError::Memory(d.addr))?;
        }
        Ok(out)
    }

    /// Total length of the device-writable buffers.
    pub fn writable_len(&self) -> usize {
        self.descriptors
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| d.len as usize)
            .sum()
    }
}

/// One split virtqueue as the driver configured it through the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// The largest size this device accepts (`QueueNumMax`).
    pub max_size: u16,
    /// The size the driver chose (`QueueNum`).
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address (`QueueDriver`).
    pub avail_ring: u64,
    /// Used ring address (`QueueDevice`).
    pub used_ring: u64,
    next_avail: u16,
    next_used: u16,
}

impl Queue {
    /// A queue not yet configured, of at most `max_size` entries.
    pub fn new(max_size: u16) -> Queue {
        Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            next_avail: 0,
            next_used: 0,
        }
    }

    /// Back to the reset state.
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// Whether the driver's settings are usable: ready, a power-of-two size within the
    /// maximum, aligned rings (16, 2 and 4 bytes) that lie in guest RAM.
    pub fn is_valid(&self, mem: &GuestMem) -> bool {
        let size = u64::from(self.size);
        let in_ram = |addr: u64, len: u64| {
            mem.check_range(GuestAddress(addr), len as usize) && addr.checked_add(len).is_some()
        };
        self.ready
            && self.size > 0
            && self.size <= self.max_size
            && self.size.is_power_of_two()
            && self.desc_table % 16 == 0
            && self.avail_ring % 2 == 0
            && self.used_ring % 4 == 0
            && in_ram(self.desc_table, 16 * size)
            && in_ram(self.avail_ring, 6 + 2 * size)
            && in_ram(self.used_ring, 6 + 8 * size)
    }

    fn read_u16(mem: &GuestMem, addr: u64) -> Result<u16, QueueError> {
        mem.read_obj::<u16>(GuestAddress(addr))
            .map(u16::from_le)
            .map_err(|_| QueueError::Memory(addr))
    }

    /// The driver's `avail->idx`.
    fn avail_idx(&self, mem: &GuestMem) -> Result<u16, QueueError> {
        Self::read_u16(mem, self.avail_ring + 2)
    }

    /// Takes the next available chain, or `None` when the driver has made none.
    pub fn pop(&mut self, mem: &GuestMem) -> Result<Option<DescriptorChain>, QueueError> {
        let avail = self.avail_idx(mem)?;
        let pending = avail.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::TooManyAvailable(pending, self.size));
        }
        // Read the ring entry only after seeing the index that published it.
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail % self.size);
        let head = Self::read_u16(mem, self.avail_ring + 4 + 2 * slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        let descriptors = self.walk(mem, head)?;
        Ok(Some(DescriptorChain { head, descriptors }))
    }

    fn walk(&self, mem: &GuestMem, head: u16) -> Result<Vec<Descriptor>, QueueError> {
        let mut out = Vec::new();
        let mut index = head;
        loop {
            if index >= self.size {
                return Err(QueueError::BadIndex {
                    index,
                    size: self.size,
                });
            }
            if out.len() >= usize::from(self.size) {
                return Err(QueueError::ChainTooLong);
            }
            let at = self.desc_table + 16 * u64::from(index);
            let addr = mem
                .read_obj::<u64>(GuestAddress(at))
                .map(u64::from_le)
                .map_err(|_| QueueError::Memory(at))?;
            let len = mem
                .read_obj::<u32>(GuestAddress(at + 8))
                .map(u32::from_le)
                .map_err(|_| QueueError::Memory(at))?;
            let flags = Self::read_u16(mem, at + 12)?;
            let next = Self::read_u16(mem, at + 14)?;
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect);
            }
            out.push(Descriptor { addr, len, flags });
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(out);
            }
            index = next;
        }
    }

    /// Puts `head` back in the used ring with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMem, head: u16, len: u32) -> Result<(), QueueError> {
        let slot = u64::from(self.next_used % self.size);
        let at = self.used_ring + 4 + 8 * slot;
        mem.write_obj(u32::from(head).to_le(), GuestAddress(at))
            .and_then(|_| mem.write_obj(len.to_le(), GuestAddress(at + 4)))
            .map_err(|_| QueueError::Memory(at))?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        mem.write_obj(self.next_used.to_le(), GuestAddress(self.used_ring + 2))
            .map_err(|_| QueueError::Memory(self.used_ring + 2))
    }

    /// Gives back the last chain taken by [`pop`](Self::pop) without using it, so the next
    /// `pop` returns it again (a device with nothing to put in it yet).
    pub fn undo_pop(&mut self) {
        self.next_avail = self.next_avail.wrapping_sub(1);
    }

    /// Whether the driver asked not to be interrupted (`VIRTQ_AVAIL_F_NO_INTERRUPT`).
    pub fn interrupts_suppressed(&self, mem: &GuestMem) -> bool {
        fence(Ordering::SeqCst);
        Self::read_u16(mem, self.avail_ring)
            .map(|f| f & VIRTQ_AVAIL_F_NO_INTERRUPT != 0)
            .unwrap_or(false)
    }
}

/// A driver's side of a queue in guest memory, for tests of the device side.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;

    pub fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    pub fn queue(size: u16) -> Queue {
        queue_at(DESC, size)
    }

    /// A queue whose descriptor table is at `base` and rings in the two pages after it.
    pub fn queue_at(base: u64, size: u16) -> Queue {
        let mut q = Queue::new(size);
        q.desc_table = base;
        q.avail_ring = base + 0x1000;
        q.used_ring = base + 0x2000;
        q.ready = true;
        q
    }

    pub fn set_desc(mem: &GuestMem, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        set_desc_at(mem, DESC, i, addr, len, flags, next)
    }

    pub fn set_desc_at(
        mem: &GuestMem,
        base: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = base + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes `heads` available, in order, after what is already there.
    pub fn publish(mem: &GuestMem, size: u16, heads: &[u16]) {
        publish_at(mem, DESC, size, heads)
    }

    pub fn publish_at(mem: &GuestMem, base: u64, size: u16, heads: &[u16]) {
        let avail = base + 0x1000;
        let mut idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
        for h in heads {
            mem.write_obj(*h, GuestAddress(avail + 4 + 2 * u64::from(idx % size)))
                .unwrap();
            idx = idx.wrapping_add(1);
        }
        mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    pub fn used(mem: &GuestMem, n: u16) -> (u16, u32, u32) {
        used_at(mem, DESC, n)
    }

    /// The used index and used element `n` (id, len) of the queue at `base`.
    pub fn used_at(mem: &GuestMem, base: u64, n: u16) -> (u16, u32, u32) {
        let used = base + 0x2000;
        let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
        let at = used + 4 + 8 * u64::from(n);
        (
            idx,
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn a_two_descriptor_chain_is_read_and_returned_through_the_used_ring() {
        let mem = mem();
        let mut q = queue(8);
        assert!(q.is_valid(&mem));
        mem.write_slice(b"hello", GuestAddress(0x8000)).unwrap();
        set_desc(&mem, 3, 0x8000, 5, VIRTQ_DESC_F_NEXT, 5);
        set_desc(&mem, 5, 0x9000, 16, VIRTQ_DESC_F_WRITE, 0);
        publish(&mem, 8, &[3]);

        let chain = q.pop(&mem).unwrap().expect("one chain");
        assert_eq!(chain.head, 3);
        assert_eq!(chain.read_all(&mem, 100).unwrap(), b"hello");
        assert_eq!(chain.writable_len(), 16);
        assert_eq!(chain.write_all(&mem, b"world").unwrap(), 5);
        q.add_used(&mem, chain.head, 5).unwrap();
        assert_eq!(used(&mem, 0), (1, 3, 5));
        let mut back = [0u8; 5];
        mem.read_slice(&mut back, GuestAddress(0x9000)).unwrap();
        assert_eq!(&back, b"world");
        assert!(q.pop(&mem).unwrap().is_none());
    }

    #[test]
    fn ring_indices_wrap_around_the_queue_size_and_u16() {
        let mem = mem();
        let mut q = queue(4);
        set_desc(&mem, 0, 0x8000, 1, 0, 0);
        for round in 0..70_000u32 {
            publish(&mem, 4, &[0]);
            let c = q.pop(&mem).unwrap().unwrap();
            q.add_used(&mem, c.head, round).unwrap();
        }
        let (idx, _, _) = used(&mem, 0);
        assert_eq!(idx, (70_000u32 % 65_536) as u16);
    }

    #[test]
    fn a_descriptor_loop_is_an_error_not_a_hang() {
        let mem = mem();
        let mut q = queue(4);
        set_desc(&mem, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1);
        set_desc(&mem, 1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0);
        publish(&mem, 4, &[0]);
        assert_eq!(q.pop(&mem), Err(QueueError::ChainTooLong));
    }

    #[test]
    fn out_of_range_indices_and_indirect_descriptors_are_refused() {
        let mem = mem();
        let mut q = queue(4);
        publish(&mem, 4, &[9]);
        assert_eq!(q.pop(&mem), Err(QueueError::BadIndex { index: 9, size: 4 }));
        set_desc(&mem, 1, 0x8000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        publish(&mem, 4, &[1]);
        assert_eq!(q.pop(&mem), Err(QueueError::Indirect));
    }

    #[test]
    fn a_buffer_outside_guest_ram_is_an_error() {
        let mem = mem();
        let mut q = queue(4);
        set_desc(&mem, 0, 0x4000_0000, 8, VIRTQ_DESC_F_WRITE, 0);
        publish(&mem, 4, &[0]);
        let chain = q.pop(&mem).unwrap().unwrap();
        assert_eq!(
            chain.write_all(&mem, b"x"),
            Err(QueueError::Memory(0x4000_0000))
        );
    }

    #[test]
    fn queue_settings_outside_ram_or_misaligned_are_invalid() {
        let mem = mem();
        let mut q = queue(8);
        q.used_ring = 0x3002;
        assert!(!q.is_valid(&mem));
        let mut q = queue(8);
        q.desc_table = 0x10_0000 - 16;
        assert!(!q.is_valid(&mem));
        let mut q = queue(8);
        q.size = 6;
        assert!(!q.is_valid(&mem));
    }

    #[test]
    fn undo_pop_gives_the_same_chain_again() {
        let mem = mem();
        let mut q = queue(4);
        set_desc(&mem, 2, 0x8000, 4, VIRTQ_DESC_F_WRITE, 0);
        publish(&mem, 4, &[2]);
        let a = q.pop(&mem).unwrap().unwrap();
        q.undo_pop();
        assert_eq!(q.pop(&mem).unwrap().unwrap(), a);
    }
}
