//! What `sandbox run` tells the operator: the sandbox's facts, printed for people or as
//! JSON, and the control socket's small line protocol.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Keys of [`SandboxFacts::timings_ms`], in the order the steps run.
pub const TIMING_ORDER: [&str; 5] = [
    "prepare",
    "vmm_start",
    "agent_ready",
    "guest_network",
    "total",
];

/// One guest NIC and its host side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NicFacts {
    /// Device id in the sandbox (`net0`).
    pub id: String,
    /// Host TAP name.
    pub tap: String,
    /// The CNI interface in the pod namespace the TAP is connected to by tc redirection,
    /// when the NIC comes from one.
    #[serde(default)]
    pub pod_interface: Option<String>,
    /// Host address on the TAP, with prefix; none when the TAP is redirected to a pod
    /// interface (the guest then holds that interface's address).
    pub host_address: Option<String>,
    /// Guest address, with prefix.
    pub guest_address: String,
    /// Every guest address, with prefix.
    #[serde(default)]
    pub guest_addresses: Vec<String>,
    /// Routes given to the guest through this NIC (`default via 10.88.0.1`).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Guest address alone, to ping.
    pub guest_ip: String,
    /// Guest MAC.
    pub mac: String,
    /// Interface name in the guest, as the agent reported it.
    pub guest_interface: String,
    /// Where the guest finds the device.
    pub location: String,
    /// Whether it was hot-plugged.
    pub hotplugged: bool,
    /// Milliseconds from asking to the guest having its address.
    pub setup_ms: u64,
}

/// A running sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxFacts {
    /// Sandbox id.
    pub id: String,
    /// Backend name.
    pub backend: String,
    /// Machine type in effect.
    pub machine_type: Option<String>,
    /// Accelerator in use (`kvm`, `tcg`), when the backend says.
    pub accelerator: Option<String>,
    /// The shim's pid (send SIGTERM here to stop the sandbox).
    pub shim_pid: u32,
    /// The VMM's pid.
    pub vmm_pid: u32,
    /// vCPU thread ids.
    pub vcpu_threads: Vec<u32>,
    /// Network namespace path.
    pub netns: PathBuf,
    /// Its name under `/run/netns`, when it has one (for `ip netns exec`).
    pub netns_name: Option<String>,
    /// Whether the shim created it (and deletes it at exit).
    pub netns_owned: bool,
    /// NICs, in the order they were added.
    pub nics: Vec<NicFacts>,
    /// Where the agent listens.
    pub agent: String,
    /// Guest console log.
    pub console_log: Option<PathBuf>,
    /// The control socket (`sandbox hotplug-nic`).
    pub control_socket: PathBuf,
    /// Step durations in milliseconds.
    pub timings_ms: BTreeMap<String, u64>,
}

impl SandboxFacts {
    /// The facts for people, several lines.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "sandbox {} is running (backend {}, machine {}, accelerator {})",
            self.id,
            self.backend,
            self.machine_type.as_deref().unwrap_or("default"),
            self.accelerator.as_deref().unwrap_or("unknown"),
        );
        let _ = writeln!(
            s,
            "  vmm pid       {} (vcpu threads: {})",
            self.vmm_pid,
            join(&self.vcpu_threads)
        );
        let _ = writeln!(
            s,
            "  netns         {} ({})",
            self.netns.display(),
            if self.netns_owned {
                "created by the shim, deleted at exit"
            } else {
                "given, kept at exit"
            }
        );
        for n in &self.nics {
            let _ = writeln!(s, "  {:<13} {}", n.id, n.human());
        }
        let _ = writeln!(s, "  agent         {}", self.agent);
        if let Some(c) = &self.console_log {
            let _ = writeln!(s, "  console log   {}", c.display());
        }
        let _ = writeln!(s, "  control       {}", self.control_socket.display());
        let timings: Vec<String> = TIMING_ORDER
            .iter()
            .filter_map(|k| self.timings_ms.get(*k).map(|v| format!("{k} {v} ms")))
            .collect();
        let _ = writeln!(s, "  timings       {}", timings.join(", "));
        match (&self.netns_name, self.nics.first()) {
            (Some(ns), Some(nic)) if nic.pod_interface.is_none() => {
                let _ = writeln!(
                    s,
                    "  try           ip netns exec {ns} ping -c 3 {}",
                    nic.guest_ip
                );
            }
            (_, Some(nic)) if nic.pod_interface.is_some() => {
                let _ = writeln!(
                    s,
                    "  try           ping {} from the pod network (where CNI connected {})",
                    nic.guest_ip,
                    nic.pod_interface.as_deref().unwrap_or_default()
                );
            }
            _ => {}
        }
        let _ = writeln!(
            s,
            "  hotplug       containerd-shim-kata-v2 sandbox hotplug-nic --id {}",
            self.id
        );
        let _ = write!(s, "stop it with Ctrl-C or `kill -TERM {}`", self.shim_pid);
        s
    }
}

impl NicFacts {
    /// One line for people.
    pub fn human(&self) -> String {
        let host = match (&self.pod_interface, &self.host_address) {
            (Some(pod), _) => format!("{} <-tc redirect-> {pod}", self.tap),
            (None, Some(addr)) => format!("{} {addr}", self.tap),
            (None, None) => self.tap.clone(),
        };
        let routes = if self.routes.is_empty() {
            String::new()
        } else {
            format!(", routes: {}", self.routes.join("; "))
        };
        format!(
            "{host} -> guest {} {} (mac {}, {}{}{routes}, {} ms)",
            self.guest_interface,
            self.guest_addresses.join(" "),
            self.mac,
            self.location,
            if self.hotplugged { ", hot-plugged" } else { "" },
            self.setup_ms
        )
    }
}

fn join(v: &[u32]) -> String {
    if v.is_empty() {
        return "unknown".into();
    }
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// A request on the control socket: one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The sandbox's facts.
    Facts,
    /// Create a TAP, hot-plug a NIC on it and give the guest an address.
    HotplugNic,
    /// Unplug a NIC (by its device id, `net1`) and remove its TAP.
    UnplugNic {
        /// The NIC's device id.
        nic: String,
    },
    /// Create a container, run it to its end with its stdio copied to the given files or
    /// FIFOs, delete it, and answer with its exit ([`ControlResponse::Exited`]).
    Exec(Box<ExecRequest>),
    /// Send a signal to a container's init (the one `Exec` runs).
    Signal {
        /// The container.
        container_id: String,
        /// Signal number.
        signal: i32,
    },
    /// The processes of a container.
    Ps {
        /// The container.
        container_id: String,
    },
    /// Run a program in the guest itself (outside any container) to its end, through the
    /// agent: for inspection and debugging.
    Guest {
        /// Program and arguments.
        argv: Vec<String>,
    },
}

/// What `sandbox exec` asks for: a container run to its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Container id (unique in the sandbox).
    pub container_id: String,
    /// Run the command as process `exec_id` in the running container `container_id`
    /// (another exec's) instead of creating one; `rootfs` is then not read.
    #[serde(default)]
    pub exec_id: Option<String>,
    /// Host root filesystem directory (absolute); `None`: the guest assets' `rootfs`, beside
    /// the configured kernel.
    pub rootfs: Option<PathBuf>,
    /// The command and its arguments.
    pub args: Vec<String>,
    /// Give the process a terminal (its output comes on `stdout`).
    pub terminal: bool,
    /// File or FIFO read into the process's stdin; `None`: `/dev/null`.
    pub stdin: Option<PathBuf>,
    /// File or FIFO the process's stdout is written to.
    pub stdout: PathBuf,
    /// File or FIFO its stderr is written to.
    pub stderr: Option<PathBuf>,
}

/// How a container (or process) of [`ControlRequest::Exec`] ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// The container.
    pub container_id: String,
    /// The process, when it was one run in an existing container.
    #[serde(default)]
    pub exec_id: Option<String>,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Bytes of stdout copied.
    pub stdout_bytes: u64,
    /// Bytes of stderr copied.
    pub stderr_bytes: u64,
}

impl ExecExit {
    /// The exit status a shell would give: the code, or 128 + the signal.
    pub fn status(&self) -> i32 {
        self.exit_code
            .unwrap_or_else(|| 128 + self.signal.unwrap_or(0))
    }
}

/// The answer to a [`ControlRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlResponse {
    /// Facts.
    Facts(Box<SandboxFacts>),
    /// The new NIC.
    Nic(Box<NicFacts>),
    /// The NIC (device id) that was unplugged.
    Unplugged(String),
    /// The container of an `Exec` ended and was deleted.
    Exited(ExecExit),
    /// The signal was sent.
    Signalled,
    /// A container's processes: pid in the container, pid in the guest, command line.
    Processes(Vec<(u32, u32, String)>),
    /// A `Guest` program ended: its exit code (`None`: killed by a signal), stdout, stderr.
    GuestOutput {
        /// Exit code.
        exit_code: Option<i32>,
        /// Its stdout (at most 64 KiB).
        stdout: String,
        /// Its stderr (at most 64 KiB).
        stderr: String,
    },
    /// The request failed; the text says why.
    Error(String),
}
