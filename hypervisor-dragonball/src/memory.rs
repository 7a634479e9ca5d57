//! Guest memory: the physical layout, the e820 map the guest is told, and the mappings
//! registered with KVM.
//!
//! ```text
//! 0            0x9fc00 (EBDA, MP table)   1 MiB (kernel)          3 GiB      4 GiB
//! |  RAM: zero page, GDT, page tables, cmdline  |  RAM ...  | MMIO hole | RAM (rest) ...
//! ```
//!
//! Memory beyond 3 GiB continues above 4 GiB, leaving the 32-bit MMIO hole for devices
//! (virtio-mmio windows, the IOAPIC and LAPIC pages). The regions are described with
//! Dragonball's [`AddressSpace`] and backed by anonymous shared mappings (`vm-memory`).

use std::sync::Arc;

use dbs_address_space::{
    AddressSpace, AddressSpaceLayout, AddressSpaceRegion, AddressSpaceRegionType,
};
use dbs_boot::layout;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, MemoryError, Result};

/// Guest memory as every part of this VMM sees it.
pub type GuestMem = GuestMemoryMmap<()>;

/// Where KVM keeps the real-mode TSS (three pages below the BIOS area).
pub const KVM_TSS_ADDRESS: u64 = layout::KVM_TSS_ADDRESS;
/// Start of the 32-bit MMIO hole; RAM stops here and resumes at 4 GiB.
pub const MMIO_HOLE_START: u64 = layout::MMIO_LOW_START;
/// First address above 32 bits.
pub const FOUR_GIB: u64 = 1 << 32;

/// Type of an e820 entry, as the boot protocol numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM (`E820_RAM`, 1).
    Ram = 1,
    /// Reserved (`E820_RESERVED`, 2).
    Reserved = 2,
}

/// One entry of the e820 map written into the zero page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Kind.
    pub kind: E820Kind,
}

/// The RAM ranges (start, length) of a guest with `mem_bytes` of memory.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if mem_bytes > MMIO_HOLE_START {
        ranges.push((FOUR_GIB, mem_bytes - MMIO_HOLE_START));
    }
    ranges
}

/// The e820 map for `mem_bytes` of RAM laid out by [`ram_ranges`].
///
/// The first 640 KiB (up to the EBDA, where the MP table lives) are RAM; the legacy
/// VGA/BIOS area up to 1 MiB is left out, as on a PC; RAM resumes at 1 MiB up to the MMIO
/// hole, and above 4 GiB for the rest.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let ram = |addr, size| E820Entry {
        addr,
        size,
        kind: E820Kind::Ram,
    };
    let low_end = mem_bytes.min(MMIO_HOLE_START);
    let mut map = vec![ram(0, layout::EBDA_START)];
    map.push(E820Entry {
        addr: layout::EBDA_START,
        size: layout::HIMEM_START - layout::EBDA_START,
        kind: E820Kind::Reserved,
    });
    if low_end > layout::HIMEM_START {
        map.push(ram(layout::HIMEM_START, low_end - layout::HIMEM_START));
    }
    if mem_bytes > MMIO_HOLE_START {
        map.push(ram(FOUR_GIB, mem_bytes - MMIO_HOLE_START));
    }
    map
}

/// The guest's RAM: Dragonball's description of it and the host mappings backing it.
pub struct GuestRam {
    /// The regions, as Dragonball's address space manager describes them.
    pub address_space: AddressSpace,
    /// The host mappings, shared by the loader, the devices and (later) virtio queues.
    pub mem: Arc<GuestMem>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("last_addr", &self.mem.last_addr())
            .finish_non_exhaustive()
    }
}

impl GuestRam {
    /// Lays out and maps `mem_bytes` of guest RAM.
    pub fn new(mem_bytes: u64) -> Result<GuestRam> {
        if mem_bytes < 2 * layout::HIMEM_START {
            return Err(MemoryError::TooSmall { bytes: mem_bytes }.into());
        }
        let ranges = ram_ranges(mem_bytes);
        let as_layout = AddressSpaceLayout::new(
            *layout::GUEST_PHYS_END,
            layout::GUEST_MEM_START,
            *layout::GUEST_MEM_END,
        );
        let mut regions = Vec::new();
        for &(base, size) in &ranges {
            let region = AddressSpaceRegion::new(
                AddressSpaceRegionType::DefaultMemory,
                GuestAddress(base),
                size,
            );
            if !as_layout.is_region_valid(&region) {
                return Err(MemoryError::BeyondAddressSpace {
                    base,
                    size,
                    end: as_layout.mem_end,
                }
                .into());
            }
            regions.push(Arc::new(region));
        }
        let address_space = AddressSpace::from_regions(regions, as_layout);
        let mmap_ranges: Vec<(GuestAddress, usize)> = ranges
            .iter()
            .map(|&(b, s)| (GuestAddress(b), s as usize))
            .collect();
        let mem = GuestMem::from_ranges(&mmap_ranges).map_err(|source| MemoryError::Map {
            bytes: mem_bytes,
            source,
        })?;
        Ok(GuestRam {
            address_space,
            mem: Arc::new(mem),
        })
    }

    /// Registers every region with KVM as a user memory slot, numbered from 0.
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|source| MemoryError::HostAddress { slot, source })?;
            let kvm_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by
            // `self.mem`, which the VMM keeps until after the VM fd (and so the slot) is
            // dropped; slots are not reused, so no other mapping is replaced.
            unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|e| {
                Error::kvm(
                    format!(
                        "Registering guest RAM {:#x}+{:#x} as KVM slot {slot}",
                        region.start_addr().0,
                        region.len()
                    ),
                    e,
                )
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_guests_have_one_ram_range_and_low_e820_entries() {
        assert_eq!(ram_ranges(256 * MIB), vec![(0, 256 * MIB)]);
        let map = e820_map(256 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: 0x100000,
                    size: 255 * MIB,
                    kind: E820Kind::Ram
                },
            ]
        );
    }

    #[test]
    fn memory_beyond_three_gib_continues_above_four_gib() {
        assert_eq!(ram_ranges(4 * GIB), vec![(0, 3 * GIB), (4 * GIB, GIB)]);
        let map = e820_map(4 * GIB);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, 3 * GIB);
        assert_eq!(
            (map[3].addr, map[3].size, map[3].kind),
            (4 * GIB, GIB, E820Kind::Ram)
        );
    }

    #[test]
    fn e820_ram_adds_up_to_the_memory_size_minus_the_legacy_hole() {
        for mib in [64, 256, 3072, 5000] {
            let ram: u64 = e820_map(mib * MIB)
                .iter()
                .filter(|e| e.kind == E820Kind::Ram)
                .map(|e| e.size)
                .sum();
            assert_eq!(ram, mib * MIB - (0x100000 - 0x9fc00), "{mib} MiB");
        }
    }

    #[test]
    fn tiny_memory_is_rejected() {
        assert!(matches!(
            GuestRam::new(MIB),
            Err(Error::Memory(MemoryError::TooSmall { .. }))
        ));
    }

    #[test]
    fn guest_ram_is_mapped_at_the_layout_addresses() {
        let ram = GuestRam::new(64 * MIB).unwrap();
        assert_eq!(ram.mem.num_regions(), 1);
        assert_eq!(ram.mem.last_addr(), GuestAddress(64 * MIB - 1));
        assert_eq!(ram.address_space.last_addr(), GuestAddress(64 * MIB - 1));
    }
}
