//! The error type of the crate.

use std::io;
use std::path::PathBuf;

/// A specialized [`Result`](std::result::Result) for TAP operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, with the step and the object it concerned.
///
/// `step` fields read like `Creating TAP "tap0" in netns /run/netns/x`. Messages say
/// what to do about the failure; the underlying OS error, when there is one, is
/// available through [`std::error::Error::source`] and is not repeated in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The interface name or template is not acceptable to the kernel.
    #[error("Invalid TAP name {name:?}: {reason}; use 1 to 15 bytes without '/', ':', whitespace or NUL, and at most one %d")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// The builder was given settings that cannot work together.
    #[error("Invalid TAP settings for {name:?}: {reason}")]
    InvalidConfig {
        /// The name or template of the TAP.
        name: String,
        /// Which settings conflict, and how to fix them.
        reason: String,
    },

    /// `/dev/net/tun` is missing or is not the TUN/TAP driver.
    #[error("{step}: /dev/net/tun is missing; load the tun module (modprobe tun) or create the node (mknod /dev/net/tun c 10 200)")]
    NoTunDevice {
        /// The step that failed.
        step: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The caller lacks `CAP_NET_ADMIN` (or the device's owner/group does not match).
    #[error("{step}: not permitted; run with CAP_NET_ADMIN over the network namespace, or create the TAP with an owner or group matching this process")]
    PermissionDenied {
        /// The step that failed.
        step: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The name is taken by a device that cannot be opened with the requested settings.
    #[error("{step}: {detail}; pick another name or delete the existing device")]
    NameBusy {
        /// The step that failed.
        step: String,
        /// What the existing device is or does.
        detail: &'static str,
        /// The OS error, if the kernel reported one.
        #[source]
        source: Option<io::Error>,
    },

    /// [`TapBuilder::must_create`](crate::TapBuilder::must_create) was set and the name exists.
    #[error("{step}: a device with this name already exists; pick another name, delete it, or allow opening an existing TAP")]
    AlreadyExists {
        /// The step that failed.
        step: String,
    },

    /// No device of this name exists.
    #[error("{step}: no device of this name exists; check the name and the network namespace")]
    TapNotFound {
        /// The step that failed.
        step: String,
    },

    /// The TAP exists with the other queue mode (single-queue versus multi-queue).
    #[error("{step}: the device exists as a {} TAP but a {} one was requested; request the same queue mode or delete the device", queue_mode(*.existing_multi_queue), queue_mode(!*.existing_multi_queue))]
    QueueModeMismatch {
        /// The step that failed.
        step: String,
        /// Whether the existing device is multi-queue.
        existing_multi_queue: bool,
    },

    /// The file descriptor is not an attached TAP queue.
    #[error(
        "{step}: the file descriptor is not a TAP queue; pass a /dev/net/tun fd attached to a TAP"
    )]
    NotATap {
        /// The step that failed.
        step: String,
        /// The OS error, if the kernel reported one.
        #[source]
        source: Option<io::Error>,
    },

    /// The network namespace path does not exist.
    #[error("{step}: network namespace {} not found; create it first (NetNs::create or ip netns add) or check the path", netns.display())]
    NetnsNotFound {
        /// The step that failed.
        step: String,
        /// The namespace path.
        netns: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The path exists but is not a network namespace.
    #[error("{step}: {} is not a network namespace; pass /run/netns/NAME or /proc/PID/ns/net", netns.display())]
    NotANetns {
        /// The step that failed.
        step: String,
        /// The namespace path.
        netns: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A named network namespace already exists.
    #[error("{step}: network namespace {} already exists; pick another name or delete it", netns.display())]
    NetnsExists {
        /// The step that failed.
        step: String,
        /// The namespace path.
        netns: PathBuf,
    },

    /// The running kernel lacks a TUN/TAP feature.
    #[error(
        "{step}: the kernel does not support {feature}; use a kernel with it or do not request it"
    )]
    FeatureMissing {
        /// The step that failed.
        step: String,
        /// The missing feature.
        feature: &'static str,
    },

    /// Any other OS error.
    #[error("{step} failed")]
    Io {
        /// The step that failed.
        step: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn queue_mode(multi: bool) -> &'static str {
    if multi {
        "multi-queue"
    } else {
        "single-queue"
    }
}

impl Error {
    /// The OS error behind this error, if any.
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            Error::NoTunDevice { source, .. }
            | Error::PermissionDenied { source, .. }
            | Error::NetnsNotFound { source, .. }
            | Error::NotANetns { source, .. }
            | Error::Io { source, .. } => Some(source),
            Error::NameBusy { source, .. } | Error::NotATap { source, .. } => source.as_ref(),
            _ => None,
        }
    }

    /// The [`io::ErrorKind`] that best describes this error.
    ///
    /// `WouldBlock` from a non-blocking socket stays `WouldBlock`, so readiness loops
    /// (for example tokio's `try_io`) work on converted errors.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::InvalidName { .. } | Error::InvalidConfig { .. } => io::ErrorKind::InvalidInput,
            Error::PermissionDenied { .. } => io::ErrorKind::PermissionDenied,
            Error::NoTunDevice { .. } | Error::NetnsNotFound { .. } | Error::TapNotFound { .. } => {
                io::ErrorKind::NotFound
            }
            Error::AlreadyExists { .. } | Error::NetnsExists { .. } => io::ErrorKind::AlreadyExists,
            Error::FeatureMissing { .. } => io::ErrorKind::Unsupported,
            other => other
                .os_error()
                .map(io::Error::kind)
                .unwrap_or(io::ErrorKind::Other),
        }
    }

    /// Whether this is a `WouldBlock` from a non-blocking operation.
    pub fn is_would_block(&self) -> bool {
        self.kind() == io::ErrorKind::WouldBlock
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        io::Error::new(err.kind(), err)
    }
}
