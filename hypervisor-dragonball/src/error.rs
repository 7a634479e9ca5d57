//! Typed errors of the Dragonball backend.
//!
//! Trait methods return [`hypervisor::Error`]; the backend-specific cause travels as its
//! `source`, so a caller can downcast to [`Error`] and match on it (for example to tell
//! "no `/dev/kvm`" from "KVM with the wrong API version").

use std::path::PathBuf;

/// Result alias of this crate's internals.
pub type Result<T> = std::result::Result<T, Error>;

/// What building or running the in-process VM can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/kvm` could not be opened: missing, no permission, or KVM not loaded.
    #[error("opening {path} (the Dragonball backend needs KVM; there is no software fallback)")]
    KvmUnavailable {
        /// The device path tried.
        path: PathBuf,
        /// The open error.
        #[source]
        source: std::io::Error,
    },

    /// `KVM_GET_API_VERSION` returned something other than 12.
    #[error("KVM reports API version {found}, this backend needs {expected}")]
    KvmApiVersion {
        /// What the kernel reported.
        found: i32,
        /// What this backend speaks.
        expected: i32,
    },

    /// A KVM capability this backend relies on is missing.
    #[error("KVM lacks the capability {0}")]
    KvmCapability(&'static str),

    /// A KVM ioctl failed.
    #[error("{step}")]
    Kvm {
        /// What was being done (`Creating the VM`).
        step: String,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },

    /// Guest memory could not be laid out, allocated or registered.
    #[error(transparent)]
    Memory(#[from] MemoryError),

    /// A file the VM needs could not be read.
    #[error("{step} {}", path.display())]
    File {
        /// What was being done (`Opening the kernel`).
        step: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },

    /// The kernel, initrd, command line or boot structures could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),

    /// A vCPU could not be configured.
    #[error("configuring vCPU {index}")]
    VcpuSetup {
        /// vCPU index.
        index: u8,
        /// The step that failed.
        #[source]
        source: VcpuError,
    },

    /// A device could not be created or registered.
    #[error(transparent)]
    Device(#[from] DeviceError),

    /// A host thread could not be created.
    #[error("spawning thread {name}")]
    Thread {
        /// The thread's name.
        name: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },

    /// The VMM's event thread could not enter the sandbox's network namespace.
    #[error("entering network namespace {}", path.display())]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What laying out, mapping or registering guest RAM can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// Too little memory for the boot layout.
    #[error("{bytes} bytes of guest memory leave no room for a kernel above 1 MiB")]
    TooSmall {
        /// The memory asked for.
        bytes: u64,
    },
    /// A RAM range lies beyond the host's physical address space.
    #[error("guest RAM {base:#x}+{size:#x} does not fit the host's physical address space (end {end:#x})")]
    BeyondAddressSpace {
        /// First guest address of the range.
        base: u64,
        /// Its size.
        size: u64,
        /// End of the address space.
        end: u64,
    },
    /// The host mapping of guest RAM failed.
    #[error("Mapping {bytes} bytes of guest RAM")]
    Map {
        /// The memory asked for.
        bytes: u64,
        /// The error.
        #[source]
        source: vm_memory::Error,
    },
    /// A mapped region has no host address to give KVM.
    #[error("Finding the host address of slot {slot}")]
    HostAddress {
        /// The KVM memory slot.
        slot: usize,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What loading the kernel, initrd and command line and writing the boot structures can
/// fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// The command line does not fit its page.
    #[error("the kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The longest that fits.
        max: usize,
    },
    /// The command line holds a NUL or a non-ASCII byte.
    #[error("the kernel command line must be ASCII without NUL bytes")]
    CmdlineNotAscii,
    /// The kernel file is neither format this loader knows.
    #[error("{} is neither an ELF vmlinux nor a bzImage", path.display())]
    KernelFormat {
        /// The kernel.
        path: PathBuf,
    },
    /// Loading the kernel image into guest memory failed.
    #[error("Loading the kernel {}", path.display())]
    LoadKernel {
        /// The kernel.
        path: PathBuf,
        /// The error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line was refused by the loader.
    #[error("Building the kernel command line")]
    BuildCmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written to guest memory.
    #[error("Writing the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// No place for the initrd in low memory.
    #[error("Placing the {size}-byte initrd {} (give the guest more memory)", path.display())]
    PlaceInitrd {
        /// The initrd.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The error.
        #[source]
        source: dbs_boot::Error,
    },
    /// The initrd would overlap the kernel.
    #[error("the initrd {} would overlap the kernel; give the guest more memory", path.display())]
    InitrdOverlapsKernel {
        /// The initrd.
        path: PathBuf,
    },
    /// Copying the initrd into guest memory failed.
    #[error("Loading the initrd {}", path.display())]
    LoadInitrd {
        /// The initrd.
        path: PathBuf,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// An e820 entry did not fit the zero page.
    #[error("Writing the e820 map")]
    E820(#[source] dbs_boot::Error),
    /// The zero page could not be written.
    #[error("Writing the zero page")]
    ZeroPage(#[source] vm_memory::GuestMemoryError),
    /// The MP table could not be written.
    #[error("Writing the MP table for {vcpus} vCPUs")]
    MpTable {
        /// vCPUs described.
        vcpus: u8,
        /// The error.
        #[source]
        source: dbs_boot::mptable::Error,
    },
    /// The identity-mapped page tables could not be written.
    #[error("Writing the identity page tables")]
    PageTables(#[source] dbs_boot::Error),
}

/// The step of configuring a vCPU that failed. `dbs-arch`'s errors implement only `Debug`,
/// so they are carried as values and printed with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VcpuError {
    /// The VM asks for more vCPUs than KVM runs.
    #[error("KVM on this host runs at most {max} vCPUs per VM")]
    TooMany {
        /// KVM's limit.
        max: usize,
    },
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("reading the supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// The CPU topology could not be described.
    #[error("describing the CPU topology: {0:?}")]
    Topology(dbs_arch::cpuid::Error),
    /// The CPUID leaves could not be filtered.
    #[error("filtering CPUID: {0:?}")]
    FilterCpuid(dbs_arch::cpuid::Error),
    /// `KVM_SET_CPUID2` failed.
    #[error("setting CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// The MSRs could not be set.
    #[error("setting MSRs: {0:?}")]
    Msrs(dbs_arch::regs::Error),
    /// The general registers could not be set.
    #[error("setting registers: {0:?}")]
    Regs(dbs_arch::regs::Error),
    /// The FPU could not be set.
    #[error("setting the FPU: {0:?}")]
    Fpu(dbs_arch::regs::Error),
    /// The segment registers and paging could not be set.
    #[error("setting segments and paging: {0:?}")]
    Sregs(dbs_arch::regs::Error),
    /// LAPIC LINT0/1 could not be set.
    #[error("setting LAPIC LINT0/1: {0:?}")]
    Lint(dbs_arch::interrupts::Error),
    /// The handler of the signal that kicks vCPUs out of `KVM_RUN` could not be installed.
    #[error("installing the vCPU kick handler for signal {signal}")]
    KickHandler {
        /// The signal.
        signal: i32,
        /// The error.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
}

/// What creating or registering a device (legacy or virtio) can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// Every interrupt line for virtio-mmio devices is taken.
    #[error(
        "no interrupt line is left for another virtio-mmio device (lines {first}-{last} are used)"
    )]
    NoIrqLine {
        /// First line for devices.
        first: u32,
        /// Last line for devices.
        last: u32,
    },
    /// An eventfd could not be created.
    #[error("Creating the {what} eventfd")]
    EventFd {
        /// Whose eventfd (`i8042 reset`).
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be duplicated.
    #[error("Duplicating {what} eventfd")]
    DupEventFd {
        /// Whose eventfd (`COM1's interrupt`).
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The KVM VM fd could not be duplicated for the interrupt manager.
    #[error("Duplicating the KVM VM fd")]
    DupVmFd(#[source] std::io::Error),
    /// The legacy interrupt routing could not be installed.
    #[error("Installing the legacy interrupt routing")]
    IrqRouting(#[source] std::io::Error),
    /// A legacy interrupt line could not be created.
    #[error("Creating interrupt line {irq} of {what}")]
    IrqLine {
        /// The line.
        irq: u32,
        /// The device it is for.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A legacy interrupt line could not be registered as a KVM irqfd.
    #[error("Registering interrupt line {irq} of {what} as a KVM irqfd")]
    IrqFd {
        /// The line.
        irq: u32,
        /// The device it is for.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An interrupt line came without the eventfd that raises it.
    #[error("{what}'s interrupt line has no eventfd")]
    NoIrqEventFd {
        /// The device.
        what: &'static str,
    },
    /// A device could not be placed on the I/O bus.
    #[error("Registering {what}")]
    Register {
        /// The device and its address range.
        what: String,
        /// The error.
        #[source]
        source: dbs_device::device_manager::Error,
    },
    /// The VMM's event thread ended before it answered.
    #[error("the VMM event thread ended during start-up")]
    EventThreadEnded,
    /// The vsock device's epoll failed.
    #[error("{step}")]
    VsockEpoll {
        /// What was being done.
        step: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The TAP a NIC is to use does not exist.
    #[error("TAP {tap:?} does not exist in {}: this backend opens an existing TAP and does not create one (create it first, e.g. with the netdev crate)", netns_name(.netns.as_deref()))]
    TapMissing {
        /// The TAP.
        tap: String,
        /// The namespace; `None` for the runtime's own.
        netns: Option<PathBuf>,
    },
    /// Opening or setting up the TAP a NIC uses failed.
    #[error("{step} TAP {tap:?} in {}", netns_name(.netns.as_deref()))]
    Tap {
        /// What was being done (`Bringing up`).
        step: String,
        /// The TAP.
        tap: String,
        /// The namespace; `None` for the runtime's own.
        netns: Option<PathBuf>,
        /// The error.
        #[source]
        source: dbs_utils::net::TapError,
    },
    /// Attaching or detaching the queues of the TAP a NIC uses failed.
    #[error("{step} TAP {tap:?} in {}", netns_name(.netns.as_deref()))]
    TapQueues {
        /// What was being done.
        step: &'static str,
        /// The TAP.
        tap: String,
        /// The namespace; `None` for the runtime's own.
        netns: Option<PathBuf>,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A namespace as the messages name it.
pub(crate) fn netns_name(netns: Option<&std::path::Path>) -> String {
    match netns {
        Some(ns) => format!("network namespace {}", ns.display()),
        None => "the runtime's network namespace".into(),
    }
}

impl Error {
    pub(crate) fn kvm(step: impl Into<String>, source: kvm_ioctls::Error) -> Self {
        Error::Kvm {
            step: step.into(),
            source,
        }
    }
}

/// An error and its sources on one line, as `{:#}` of anyhow prints them: for logs.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cause = e.source();
    while let Some(c) = cause {
        parts.push(c.to_string());
        cause = c.source();
    }
    parts.join(": ")
}

impl From<Error> for hypervisor::Error {
    fn from(e: Error) -> Self {
        hypervisor::Error::backend("Running the Dragonball VMM", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_causes_read_once_in_a_chain() {
        let e: Error = BootError::LoadInitrd {
            path: "/boot/initrd.img".into(),
            source: vm_memory::GuestMemoryError::InvalidGuestAddress(vm_memory::GuestAddress(0x10)),
        }
        .into();
        let printed = chain(&e);
        assert!(
            printed.starts_with("Loading the initrd /boot/initrd.img: "),
            "{printed}"
        );
        assert_eq!(
            printed.matches("invalid guest address").count(),
            1,
            "{printed}"
        );

        let e: Error = DeviceError::TapQueues {
            step: "Detaching the unused queues of",
            tap: "tap0".into(),
            netns: None,
            source: std::io::Error::from_raw_os_error(libc::EBADFD),
        }
        .into();
        let printed = chain(&e);
        assert!(
            printed.starts_with(
                "Detaching the unused queues of TAP \"tap0\" in the runtime's network namespace: "
            ),
            "{printed}"
        );
    }

    #[test]
    fn backend_errors_can_be_downcast_to_the_cause() {
        let e: hypervisor::Error = Error::KvmApiVersion {
            found: 11,
            expected: 12,
        }
        .into();
        let hypervisor::Error::Backend { source, .. } = &e else {
            panic!("expected a backend error, got {e:?}");
        };
        assert!(matches!(
            source.downcast_ref::<Error>(),
            Some(Error::KvmApiVersion { found: 11, .. })
        ));
    }
}
