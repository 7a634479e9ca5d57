//! The runtime's error type.

use std::path::PathBuf;

use nix::errno::Errno;

/// What went wrong, naming the container and the step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The id is taken.
    #[error("Container \"{0}\" already exists")]
    ContainerExists(String),
    /// No container has this id.
    #[error("No container \"{0}\"")]
    UnknownContainer(String),
    /// The container has no process with this exec id.
    #[error("No process \"{exec_id}\" in container \"{id}\"")]
    UnknownProcess {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// The exec id is taken.
    #[error("Process \"{exec_id}\" already exists in container \"{id}\"")]
    ProcessExists {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// The root filesystem is missing or not a directory.
    #[error("Root filesystem {} of container \"{id}\" is missing", path.display())]
    RootfsMissing {
        /// Container id.
        id: String,
        /// The rootfs path given.
        path: PathBuf,
        /// Why it cannot be used.
        #[source]
        source: std::io::Error,
    },
    /// The process's executable is not in the container.
    #[error("Executable \"{name}\" not found in container \"{id}\"")]
    ExecutableNotFound {
        /// Container id.
        id: String,
        /// `args[0]`.
        name: String,
    },
    /// The spec cannot be run as given.
    #[error("Invalid spec for container \"{id}\": {reason}")]
    InvalidSpec {
        /// Container id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A step of the new process failed (a mount, the uid, the working directory...).
    #[error("{step} in container \"{id}\"")]
    Setup {
        /// Container id.
        id: String,
        /// The step, naming its object (`Setting uid 4294967295`).
        step: String,
        /// The errno of the failed call.
        #[source]
        source: Errno,
    },
    /// A system call of the runtime itself failed.
    #[error("{step} for container \"{id}\"")]
    Sys {
        /// Container id.
        id: String,
        /// The step.
        step: &'static str,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// The new process died before reporting.
    #[error("The process of container \"{id}\" died during {phase}")]
    ProcessDied {
        /// Container id.
        id: String,
        /// `setup` or `start`.
        phase: &'static str,
    },
    /// The operation does not fit the container's state.
    #[error("Container \"{id}\" {state}: cannot {action}")]
    InvalidState {
        /// Container id.
        id: String,
        /// `is not started`, `is already started`, `has exited`.
        state: &'static str,
        /// What was asked.
        action: &'static str,
    },
    /// Resize of a process without a terminal.
    #[error("Process {process} of container \"{id}\" has no terminal")]
    NoTerminal {
        /// Container id.
        id: String,
        /// `init` or the exec id.
        process: String,
    },
    /// Reading `/proc` failed.
    #[error("Listing the processes of container \"{id}\"")]
    Proc {
        /// Container id.
        id: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The reaper thread could not start.
    #[error("Starting the reaper thread")]
    Reaper(#[source] std::io::Error),
}
