//! The x86-64 Linux boot protocol: kernel, initrd, command line, zero page, MP table and
//! identity page tables, ready for a vCPU entering in 64-bit mode with RSI at the zero page.
//!
//! Both kernel formats are accepted: an ELF `vmlinux` (entered at its ELF entry point) and
//! a bzImage (its protected-mode part is loaded at 1 MiB and entered at `startup_64`, 0x200
//! bytes in). No firmware runs: the VMM does what a boot loader would.
//!
//! # Guest kernel options
//!
//! Devices are not discoverable on this machine model (no PCI, no ACPI), so the guest learns
//! them from its command line, as with Firecracker and Dragonball. A Linux guest needs:
//!
//! - `CONFIG_SERIAL_8250=y`, `CONFIG_SERIAL_8250_CONSOLE=y` for `console=ttyS0`;
//! - `CONFIG_VIRTIO_MMIO=y` and `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y` for
//!   `virtio_mmio.device=SIZE@ADDR:IRQ` (Debian's kernels lack the second; the kernel `make
//!   guest-assets` builds has it);
//! - `CONFIG_X86_MPPARSE=y` to find the vCPUs and the IOAPIC in the MP table (Debian's
//!   cloud kernel lacks it too: it then boots on one CPU with the legacy PIC);
//! - `CONFIG_SERIO_I8042=y` (or `reboot=k` works without the driver) so that a reboot or
//!   power-off reaches the i8042 reset line, which ends the VM.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use dbs_boot::bootparam::boot_params;
use dbs_boot::layout::{
    BOOT_GDT_MAX, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, ZERO_PAGE_START,
};
use dbs_boot::BootParamsWrapper;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory};

use crate::error::{BootError, Error, Result};
use crate::memory::{e820_map, GuestMem};

/// Parameters the backend always gives a Linux guest, before devices and the user's own.
///
/// `reboot=k` makes a guest reboot or power-off go through the i8042 reset line, which the
/// VMM turns into a clean exit; `panic=1` turns a panic into such a reboot; `pci=off`
/// because there is no PCI bus; the `i8042.*` options skip probes of absent hardware.
pub const DEFAULT_KERNEL_PARAMS: [&str; 8] = [
    "console=ttyS0",
    "reboot=k",
    "panic=1",
    "pci=off",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
];

/// Offset of the 64-bit entry point (`startup_64`) in a bzImage's protected-mode kernel.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `type_of_loader` "undefined/other" (the boot protocol's 0xff).
const LOADER_TYPE_OTHER: u8 = 0xff;
/// `boot_flag` magic.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic ("HdrS").
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Alignment a relocatable kernel is told when there is no setup header (16 MiB).
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the setup header in the zero page (`boot_params.hdr`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;

/// A virtio-mmio window announced to the guest on its command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioWindow {
    /// Guest physical base.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
    /// Legacy interrupt line (GSI).
    pub irq: u32,
}

impl MmioWindow {
    /// The `virtio_mmio.device=SIZE@ADDR:IRQ` parameter for this window.
    pub fn cmdline_param(&self) -> String {
        format!(
            "virtio_mmio.device={}@{:#x}:{}",
            size_str(self.size),
            self.base,
            self.irq
        )
    }
}

/// `4096` -> `4K`, as Linux's `memparse` reads it.
fn size_str(size: u64) -> String {
    for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
        if size >= 1 << shift && size % (1 << shift) == 0 {
            return format!("{}{suffix}", size >> shift);
        }
    }
    size.to_string()
}

/// The guest kernel command line: the backend's defaults, then one entry per virtio-mmio
/// device, then the user's parameters (which can so override the defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    base: Vec<String>,
    devices: Vec<String>,
    user: Vec<String>,
}

impl KernelCmdline {
    /// A command line with [`DEFAULT_KERNEL_PARAMS`].
    pub fn new() -> Self {
        KernelCmdline {
            base: DEFAULT_KERNEL_PARAMS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ..Default::default()
        }
    }

    /// Announces a virtio-mmio device.
    pub fn add_virtio_mmio(&mut self, window: &MmioWindow) -> &mut Self {
        self.devices.push(window.cmdline_param());
        self
    }

    /// Appends user parameters.
    pub fn extend_user<I: IntoIterator<Item = S>, S: Into<String>>(
        &mut self,
        params: I,
    ) -> &mut Self {
        self.user.extend(params.into_iter().map(Into::into));
        self
    }

    /// The whole line, checked to fit the zero page's limit and to be loadable.
    pub fn build(&self) -> Result<String> {
        let line = self
            .base
            .iter()
            .chain(&self.devices)
            .chain(&self.user)
            .map(|s| s.trim())
            .collect::<Vec<_>>()
            .join(" ");
        if line.len() >= CMDLINE_MAX_SIZE {
            return Err(BootError::CmdlineTooLong {
                len: line.len(),
                max: CMDLINE_MAX_SIZE - 1,
            }
            .into());
        }
        if line.bytes().any(|b| b == 0 || !b.is_ascii()) {
            return Err(BootError::CmdlineNotAscii.into());
        }
        Ok(line)
    }
}

/// The kind of kernel image found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux` (or any ELF entered like one).
    Elf,
    /// A bzImage.
    BzImage,
}

/// What loading produced: where the vCPU starts and what the zero page needs.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The image format.
    pub format: KernelFormat,
    /// First byte after the loaded kernel.
    pub kernel_end: u64,
    /// Guest address of the zero page (goes in RSI).
    pub zero_page: u64,
}

/// Identifies the kernel format from the first bytes of the image.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

fn open(step: &'static str, path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::File {
        step,
        path: path.to_path_buf(),
        source,
    })
}

/// Loads kernel, initrd and command line into `mem` and writes the zero page, the MP table
/// for `vcpus` and the identity-mapped page tables.
pub fn load(
    mem: &GuestMem,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
) -> Result<BootInfo> {
    let mut file = open("Opening the kernel", kernel)?;
    let mut head = vec![0u8; 0x400];
    let n = file.read(&mut head).map_err(|source| Error::File {
        step: "Reading the kernel",
        path: kernel.to_path_buf(),
        source,
    })?;
    head.truncate(n);
    let format = detect_format(&head).ok_or_else(|| BootError::KernelFormat {
        path: kernel.to_path_buf(),
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let loaded = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, himem),
    }
    .map_err(|source| BootError::LoadKernel {
        path: kernel.to_path_buf(),
        source,
    })?;
    let entry = match format {
        KernelFormat::Elf => loaded.kernel_load.0,
        KernelFormat::BzImage => loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
    };

    let mut params = BootParamsWrapper(boot_params::default());
    if let Some(hdr) = loaded.setup_header {
        let bytes = hdr.as_slice();
        params.as_mut_slice()[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + bytes.len()]
            .copy_from_slice(bytes);
    } else {
        params.0.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.0.hdr.header = HDRS_MAGIC;
        params.0.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.0.hdr.type_of_loader = LOADER_TYPE_OTHER;

    // Command line.
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE);
    cl.insert_str(cmdline).map_err(BootError::BuildCmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(BootError::WriteCmdline)?;
    params.0.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.0.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
    params.0.hdr.cmdline_size = cmdline.len() as u32 + 1;

    // Initrd, at the top of low memory.
    if let Some(path) = initrd {
        let mut f = open("Opening the initrd", path)?;
        let size = f
            .metadata()
            .map_err(|source| Error::File {
                step: "Reading the size of the initrd",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let addr =
            dbs_boot::initrd_load_addr(mem, size).map_err(|source| BootError::PlaceInitrd {
                path: path.to_path_buf(),
                size,
                source,
            })?;
        if addr < loaded.kernel_end {
            return Err(BootError::InitrdOverlapsKernel {
                path: path.to_path_buf(),
            }
            .into());
        }
        mem.read_exact_from(GuestAddress(addr), &mut f, size as usize)
            .map_err(|source| BootError::LoadInitrd {
                path: path.to_path_buf(),
                source,
            })?;
        params.0.hdr.ramdisk_image = addr as u32;
        params.0.hdr.ramdisk_size = size as u32;
    }

    let mem_bytes: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
    for e in e820_map(mem_bytes) {
        dbs_boot::add_e820_entry(&mut params.0, e.addr, e.size, e.kind as u32)
            .map_err(BootError::E820)?;
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::ZeroPage)?;
    dbs_boot::mptable::setup_mptable(mem, vcpus, vcpus)
        .map_err(|source| BootError::MpTable { vcpus, source })?;
    Ok(BootInfo {
        entry,
        format,
        kernel_end: loaded.kernel_end,
        zero_page: ZERO_PAGE_START,
    })
}

/// Values of the page tables, GDT and IDT every vCPU starts with.
#[derive(Debug, Clone, Copy)]
pub struct Descriptors {
    /// Guest address of the PML4 (CR3).
    pub pml4: GuestAddress,
    /// Null, 64-bit code, data, TSS.
    pub gdt: [u64; BOOT_GDT_MAX],
    /// Guest address of the GDT.
    pub gdt_addr: u64,
    /// Guest address of the (empty) IDT.
    pub idt_addr: u64,
}

/// Writes the identity map of the first GiB (2 MiB pages) and returns the descriptors.
pub fn setup_descriptors(mem: &GuestMem) -> Result<Descriptors> {
    let pml4 = dbs_boot::setup_identity_mapping(mem).map_err(BootError::PageTables)?;
    let (gdt, gdt_addr, idt_addr) = dbs_boot::get_descriptor_config_info();
    Ok(Descriptors {
        pml4,
        gdt,
        gdt_addr,
        idt_addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbs_boot::layout::{PDE_START, PDPTE_START, PML4_START};

    #[test]
    fn the_default_cmdline_has_the_console_and_keyboard_reset() {
        let line = KernelCmdline::new().build().unwrap();
        assert!(
            line.starts_with("console=ttyS0 reboot=k panic=1 pci=off"),
            "{line}"
        );
    }

    #[test]
    fn virtio_mmio_devices_come_between_defaults_and_user_params() {
        let mut cl = KernelCmdline::new();
        cl.add_virtio_mmio(&MmioWindow {
            base: 0xc000_0000,
            size: 0x1000,
            irq: 5,
        })
        .add_virtio_mmio(&MmioWindow {
            base: 0xc000_1000,
            size: 0x1000,
            irq: 6,
        })
        .extend_user(["quiet", "testguest.action=poweroff"]);
        let line = cl.build().unwrap();
        assert!(
            line.ends_with(
                "i8042.dumbkbd virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6 quiet testguest.action=poweroff"
            ),
            "{line}"
        );
    }

    #[test]
    fn mmio_sizes_use_the_largest_exact_suffix() {
        assert_eq!(size_str(0x1000), "4K");
        assert_eq!(size_str(0x20_0000), "2M");
        assert_eq!(size_str(1 << 30), "1G");
        assert_eq!(size_str(0x1800), "6K");
        assert_eq!(size_str(100), "100");
    }

    #[test]
    fn an_oversized_cmdline_is_rejected() {
        let mut cl = KernelCmdline::new();
        cl.extend_user([format!("x={}", "y".repeat(CMDLINE_MAX_SIZE))]);
        assert!(matches!(
            cl.build(),
            Err(Error::Boot(BootError::CmdlineTooLong { .. }))
        ));
    }

    #[test]
    fn kernel_formats_are_told_apart_by_their_magic() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"#!/bin/sh"), None);
    }

    #[test]
    fn the_setup_header_sits_at_its_boot_protocol_offset() {
        assert_eq!(std::mem::offset_of!(boot_params, hdr), SETUP_HEADER_OFFSET);
        assert_eq!(std::mem::offset_of!(boot_params, e820_table), 0x2d0);
        // 0x0c0 and 0x0c4 are ext_ramdisk_image and ext_ramdisk_size.
        assert_eq!(std::mem::offset_of!(boot_params, ext_cmd_line_ptr), 0x0c8);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib_with_2mib_pages() {
        let mem = crate::memory::GuestRam::new(64 << 20).unwrap().mem;
        let d = setup_descriptors(&mem).unwrap();
        assert_eq!(d.pml4, GuestAddress(PML4_START));
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4e, PDPTE_START | 0x3, "present + writable, to the PDPT");
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 0x3);
        for i in [0u64, 1, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(PDE_START + i * 8)).unwrap();
            assert_eq!(
                pde,
                (i << 21) | 0x83,
                "PDE {i}: 2 MiB page, present, writable"
            );
        }
        // Null, 64-bit code (L bit), data, TSS.
        assert_eq!(d.gdt[0], 0);
        assert_eq!((d.gdt[1] >> 53) & 1, 1, "code segment is 64-bit");
    }

    #[test]
    fn the_zero_page_carries_cmdline_e820_and_loader_type() {
        let mem = crate::memory::GuestRam::new(64 << 20).unwrap().mem;
        let dir = tempfile::tempdir().unwrap();
        // A minimal ELF64 x86-64 executable: one PT_LOAD segment of 16 bytes at 2 MiB.
        let kernel = dir.path().join("k.elf");
        std::fs::write(&kernel, tiny_elf(0x20_0000)).unwrap();
        let info = load(&mem, &kernel, None, "console=ttyS0 a=b", 1).unwrap();
        assert_eq!(info.format, KernelFormat::Elf);
        assert_eq!(info.entry, 0x20_0000);
        let zp: BootParamsWrapper = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let p = zp.0;
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.type_of_loader }, LOADER_TYPE_OTHER);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!(p.e820_entries, 3);
        let mut line = [0u8; 17];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0 a=b");
    }

    /// An ELF64 image with one PT_LOAD segment of 16 `hlt`s at `addr`, entry at `addr`.
    fn tiny_elf(addr: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x100];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&addr.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        f[ph + 8..ph + 16].copy_from_slice(&0x80u64.to_le_bytes()); // p_offset
        f[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes()); // p_vaddr
        f[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes()); // p_paddr
        f[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        f[ph + 40..ph + 48].copy_from_slice(&16u64.to_le_bytes()); // p_memsz
        f[0x80..0x90].fill(0xf4);
        f
    }
}
