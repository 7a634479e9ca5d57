//! The KVM device and the VM file descriptor.
//!
//! Dragonball has no accelerator but KVM: the device must open and speak API version 12,
//! otherwise [`open`] fails with [`Error::KvmUnavailable`] or [`Error::KvmApiVersion`].
//! Nothing here looks at `/proc/cpuinfo`: a nested KVM without `vmx`/`svm` flags still runs
//! guests, and it is the device, not the flags, that decides.

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::Path;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::error::{Error, Result, VcpuError};
use crate::memory::KVM_TSS_ADDRESS;

/// The only KVM API version there has ever been (`KVM_API_VERSION`).
pub const KVM_API_VERSION: i32 = 12;

/// Capabilities the VM is built on.
const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Opens the KVM device at `path` and checks its API version and the capabilities used.
pub fn open(path: &Path) -> Result<Kvm> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| Error::KvmUnavailable {
            path: path.to_path_buf(),
            source,
        })?;
    // SAFETY: the fd was just opened by us and is owned by nothing else; `Kvm` takes
    // ownership and closes it on drop.
    let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
    let found = kvm.get_api_version();
    if found != KVM_API_VERSION {
        return Err(Error::KvmApiVersion {
            found,
            expected: KVM_API_VERSION,
        });
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCapability(name));
        }
    }
    Ok(kvm)
}

/// Creates a VM with the in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT.
///
/// Must run before any vCPU is created: KVM gives vCPUs a LAPIC only if the irqchip exists.
pub fn create_vm(kvm: &Kvm, vcpus: u8) -> Result<VmFd> {
    let max = kvm.get_max_vcpus();
    if usize::from(vcpus) > max {
        return Err(Error::VcpuSetup {
            index: vcpus - 1,
            source: VcpuError::TooMany { max },
        });
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| Error::kvm("Creating the KVM VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|e| Error::kvm("Setting the TSS address", e))?;
    vm.create_irq_chip()
        .map_err(|e| Error::kvm("Creating the in-kernel irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| Error::kvm("Creating the in-kernel PIT", e))?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kvm_device_is_a_typed_error_naming_the_path() {
        let err = open(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(
            matches!(&err, Error::KvmUnavailable { path, .. } if path == Path::new("/nonexistent/kvm")),
            "{err:?}"
        );
        assert!(err.to_string().contains("/nonexistent/kvm"), "{err}");
    }

    #[test]
    fn a_device_that_is_not_kvm_is_rejected() {
        // /dev/null opens but answers KVM_GET_API_VERSION with an error, not 12.
        let err = open(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, Error::KvmApiVersion { .. }), "{err:?}");
    }
}
