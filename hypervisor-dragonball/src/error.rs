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
    #[error("{0}")]
    Memory(String),

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
    #[error("{0}")]
    Boot(String),

    /// A vCPU could not be configured.
    #[error("configuring vCPU {index}: {what}")]
    VcpuSetup {
        /// vCPU index.
        index: u8,
        /// What failed, with the cause.
        what: String,
    },

    /// A device could not be created or registered.
    #[error("{0}")]
    Device(String),

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

impl Error {
    pub(crate) fn kvm(step: impl Into<String>, source: kvm_ioctls::Error) -> Self {
        Error::Kvm {
            step: step.into(),
            source,
        }
    }
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
