//! Typed errors shared by every backend.
//!
//! Callers match on the variant to tell apart what went wrong: a request the backend
//! cannot serve ([`Error::Unsupported`]), a request that is wrong for the VM's current
//! state ([`Error::InvalidState`]), a bad value ([`Error::InvalidConfig`]), a device that
//! failed to attach or detach ([`Error::Device`]), or a VMM that went away
//! ([`Error::VmmExited`]).

use std::fmt;
use std::time::Duration;

use crate::device::DeviceId;
use crate::state::{Operation, VmState};
use crate::VmExit;

/// A boxed error from a backend or a library it uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of this crate and of every [`Hypervisor`](crate::Hypervisor) method.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything a [`Hypervisor`](crate::Hypervisor) call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend cannot do this at all (for example NIC hotplug on QEMU's microvm).
    #[error("{operation} is not supported by the {backend} backend: {reason}")]
    Unsupported {
        /// Backend name, such as `qemu`.
        backend: &'static str,
        /// What was asked, such as `network hotplug`.
        operation: String,
        /// Why, and what to use instead.
        reason: String,
    },

    /// The operation is valid in general but not in the VM's current state.
    #[error("cannot {operation} while the VM is {state}")]
    InvalidState {
        /// What was asked.
        operation: Operation,
        /// The state the VM was in.
        state: VmState,
    },

    /// A configuration or device value is wrong; the message names the field and the fix.
    #[error("invalid configuration")]
    InvalidConfig(#[from] ConfigError),

    /// A device could not be attached or detached.
    #[error("{step} device {id}")]
    Device {
        /// The device's id.
        id: DeviceId,
        /// What was being done, in sentence form (`Hot-plugging network`).
        step: String,
        /// The underlying cause.
        #[source]
        source: BoxError,
    },

    /// No device with this id is attached.
    #[error("device {0} is not attached")]
    DeviceNotFound(DeviceId),

    /// The VMM process or threads exited while the caller expected it to run.
    #[error("the VMM exited: {0}")]
    VmmExited(VmExit),

    /// Something did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
    },

    /// Any other backend failure, with the step that failed.
    #[error("{step}")]
    Backend {
        /// What the backend was doing, in sentence form.
        step: String,
        /// The underlying cause.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Builds an [`Error::Backend`] from a step description and any error.
    pub fn backend(step: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            step: step.into(),
            source: source.into(),
        }
    }

    /// Builds an [`Error::Device`].
    pub fn device(id: &DeviceId, step: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Device {
            id: id.clone(),
            step: step.into(),
            source: source.into(),
        }
    }

    /// True when the backend simply cannot do what was asked.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Error::Unsupported { .. })
    }
}

/// A configuration value that was rejected, with the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    /// Dotted path of the field, such as `network.queue_pairs`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

impl ConfigError {
    /// Creates an error for `field`.
    pub fn new(field: impl Into<String>, problem: impl fmt::Display) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.to_string(),
        }
    }

    /// Prefixes the field path with `parent.`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}
