//! Arguments and results of the shared-filesystem and container requests (protocol 2).
//!
//! A container is named by `container_id` on the wire: `id` is the request's own id.

use serde::{Deserialize, Serialize};

/// Terminal size used when a request asks for a terminal without giving one.
pub const DEFAULT_TERMINAL_SIZE: (u16, u16) = (24, 80);

/// Arguments of `mount_share`: `mount -t virtiofs TAG TARGET`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountShare {
    /// The virtio-fs tag of the share.
    pub tag: String,
    /// Absolute directory in the guest; created if missing.
    pub target: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// How a process's stdio is set up; flattened into `create_container` and `exec_process`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StdioRequest {
    /// Give the process a terminal (pty): one `stdout` stream carries its output and
    /// `stdin` its input; there is no `stderr` stream.
    #[serde(default)]
    pub terminal: bool,
    /// Terminal rows (default 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    /// Terminal columns (default 80).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    /// Open a `stdin` stream; without it (and without a terminal) stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
}

/// Arguments of `create_container`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateContainer {
    /// Container id, unique in the guest.
    pub container_id: String,
    /// Root filesystem directory in the guest.
    pub rootfs: String,
    /// The OCI runtime spec, the text of `config.json`. Unknown fields are an error.
    pub spec: String,
    /// Stdio of the init process.
    #[serde(flatten)]
    pub stdio: StdioRequest,
}

/// Arguments of `exec_process`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecProcess {
    /// Container id.
    pub container_id: String,
    /// Id of the new process, unique in its container.
    pub exec_id: String,
    /// An OCI `process` object (`args`, `env`, `cwd`, `user`...). Unknown fields are an error.
    pub process: serde_json::Value,
    /// Stdio of the process.
    #[serde(flatten)]
    pub stdio: StdioRequest,
}

/// Stream ids of a process's stdio; absent streams are not connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StreamIds {
    /// Host to process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<u64>,
    /// Process to host (with a terminal: the terminal's output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<u64>,
    /// Process to host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<u64>,
}

/// Result of `create_container` and `exec_process`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessCreated {
    /// Pid of the process in the guest's (the agent's) PID namespace.
    pub pid: u32,
    /// Its stdio streams.
    pub streams: StreamIds,
}

/// Arguments naming a container: `start_container`, `list_processes`, `delete_container`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerId {
    /// Container id.
    pub container_id: String,
}

/// Result of `start_container`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStarted {
    /// Guest pid of the container's init process.
    pub pid: u32,
}

/// Arguments naming a process: `wait_process`, `close_stdin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// Container id.
    pub container_id: String,
    /// Exec id; absent for the container's init process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_id: Option<String>,
}

/// Arguments of `signal_process`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalProcess {
    /// Container id.
    pub container_id: String,
    /// Exec id; absent for the init process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_id: Option<String>,
    /// Signal number (15 = SIGTERM, 9 = SIGKILL).
    pub signal: i32,
    /// Signal every process of the container.
    #[serde(default)]
    pub all: bool,
}

/// Arguments of `resize_pty`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizePty {
    /// Container id.
    pub container_id: String,
    /// Exec id; absent for the init process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_id: Option<String>,
    /// New rows.
    pub rows: u16,
    /// New columns.
    pub cols: u16,
}

/// Result of `wait_process`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessExit {
    /// Exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// Signal that killed the process, if one did.
    pub signal: Option<i32>,
    /// When it ended, in milliseconds since the Unix epoch (guest clock).
    pub exited_at_ms: u64,
}

/// One entry of the `list_processes` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEntry {
    /// Pid inside the container's PID namespace.
    pub pid: u32,
    /// Pid in the guest's (the agent's) PID namespace.
    pub host_pid: u32,
    /// Command line.
    pub cmd: String,
}

/// Result of requests that return nothing: `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Done {}
