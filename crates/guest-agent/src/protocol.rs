//! Wire types of the agent protocol: newline-delimited JSON. A line is a request
//! (host to agent), a response matched to its request by `id` (agent to host), or a
//! stream frame ([`StreamFrame`], both ways). See `PROTOCOL.md`.

use std::net::IpAddr;

mod containers;
mod stream;

pub use containers::{
    ContainerId, ContainerStarted, CreateContainer, Done, ExecProcess, MountShare, ProcessCreated,
    ProcessEntry, ProcessExit, ProcessId, ResizePty, SignalProcess, StdioRequest, StreamIds,
    DEFAULT_TERMINAL_SIZE,
};
pub use stream::{FrameKind, StreamFrame, STREAM_CHUNK, STREAM_WINDOW};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port the agent serves (`-device virtserialport,name=agent.0`).
pub const SERIAL_PORT_NAME: &str = "agent.0";

/// Version of the protocol this crate speaks; `health` reports the agent's.
pub const PROTOCOL_VERSION: u32 = 3;

/// Vsock port the agent listens on unless `agent.port=` is on the kernel command line.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;

/// Most bytes of stdout, and separately of stderr, that an `exec` response carries.
pub const EXEC_OUTPUT_LIMIT: usize = 64 * 1024;

/// How long an `exec` may run when the request gives no `timeout_ms`.
pub const EXEC_DEFAULT_TIMEOUT_MS: u64 = 60_000;

/// Id the agent answers with when a request line is so malformed that it has no id.
pub const UNKNOWN_ID: u64 = 0;

/// One request line: an id chosen by the client and the operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in the response; clients use ids from 1 up ([`UNKNOWN_ID`] is reserved).
    pub id: u64,
    /// The operation and its arguments, flattened next to `id` with a `type` tag.
    #[serde(flatten)]
    pub body: RequestBody,
}

/// Operations the agent performs. Serialized with a `"type"` tag in snake case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RequestBody {
    /// Liveness check and version; answered with [`HealthInfo`].
    Health(HealthRequest),
    /// Lists the guest's network interfaces; answered with `Vec<`[`InterfaceInfo`]`>`.
    ListInterfaces,
    /// Configures the interface with a given MAC; answered with [`ConfiguredInterface`].
    ConfigureInterface(InterfaceConfig),
    /// Runs a program to completion; answered with [`ExecOutput`].
    Exec(ExecRequest),
    /// Mounts a virtio-fs share; answered with [`Done`].
    MountShare(MountShare),
    /// Sets the guest's wall clock (a VM restored from a template wakes with the
    /// template's); answered with [`Done`].
    SetClock(SetClock),
    /// Sets the guest's hostname; answered with [`Done`].
    SetHostname(SetHostname),
    /// Mixes host randomness into the guest's RNG and reseeds it (a VM restored from a
    /// template wakes with the template's RNG state); answered with [`Done`].
    SeedRandom(SeedRandom),
    /// Creates a container whose init waits for `start_container`; answered with
    /// [`ProcessCreated`].
    CreateContainer(CreateContainer),
    /// Starts a created container's init; answered with [`ContainerStarted`].
    StartContainer(ContainerId),
    /// Runs another process in a running container; answered with [`ProcessCreated`].
    ExecProcess(ExecProcess),
    /// Sends a signal; answered with [`Done`].
    SignalProcess(SignalProcess),
    /// Waits for a process to exit; answered with [`ProcessExit`].
    WaitProcess(ProcessId),
    /// Lists a container's processes; answered with `Vec<`[`ProcessEntry`]`>`.
    ListProcesses(ContainerId),
    /// Resizes a process's terminal; answered with [`Done`].
    ResizePty(ResizePty),
    /// Closes a process's stdin once the data already sent is written; answered with [`Done`].
    CloseStdin(ProcessId),
    /// Kills what is left of a container and removes it; answered with [`Done`].
    DeleteContainer(ContainerId),
}

/// Arguments of `health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HealthRequest {
    /// The protocol version the host speaks; an agent that speaks another answers with an
    /// error naming both. Absent: the host accepts any version and checks the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
}

impl RequestBody {
    /// The operation's wire name, as in the `type` field.
    pub fn name(&self) -> &'static str {
        match self {
            RequestBody::Health(_) => "health",
            RequestBody::ListInterfaces => "list_interfaces",
            RequestBody::ConfigureInterface(_) => "configure_interface",
            RequestBody::Exec(_) => "exec",
            RequestBody::MountShare(_) => "mount_share",
            RequestBody::SetClock(_) => "set_clock",
            RequestBody::SetHostname(_) => "set_hostname",
            RequestBody::SeedRandom(_) => "seed_random",
            RequestBody::CreateContainer(_) => "create_container",
            RequestBody::StartContainer(_) => "start_container",
            RequestBody::ExecProcess(_) => "exec_process",
            RequestBody::SignalProcess(_) => "signal_process",
            RequestBody::WaitProcess(_) => "wait_process",
            RequestBody::ListProcesses(_) => "list_processes",
            RequestBody::ResizePty(_) => "resize_pty",
            RequestBody::CloseStdin(_) => "close_stdin",
            RequestBody::DeleteContainer(_) => "delete_container",
        }
    }
}

/// Arguments of `set_clock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetClock {
    /// The time to set, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// Arguments of `set_hostname`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetHostname {
    /// The hostname (1 to 64 bytes, no NUL).
    pub hostname: String,
}

/// Arguments of `seed_random`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedRandom {
    /// Random bytes from the host, base64 (standard alphabet, padded); 16 to 512 bytes.
    pub data: String,
}

/// Arguments of `configure_interface`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceConfig {
    /// MAC address that selects the interface (case-insensitive), e.g. `02:00:00:00:00:10`.
    pub mac: String,
    /// A MAC address to give the interface first (a VM restored from a template wakes with
    /// the template's NIC and its MAC). Since protocol 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_mac: Option<String>,
    /// Addresses in CIDR notation (`10.0.0.2/24`, `fd00::2/64`); they replace existing ones.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// MTU to set, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Routes to add through the interface after it is up.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// One route of [`InterfaceConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    /// `"default"` or a destination in CIDR notation.
    pub dest: String,
    /// Next hop; without it the destination is on-link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// Arguments of `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; no shell is involved. `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Kill the program (and its process group) after this long;
    /// default [`EXEC_DEFAULT_TIMEOUT_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// One response line: the request's id and either a result or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The id of the request this answers, or [`UNKNOWN_ID`].
    pub id: u64,
    /// `"result": ...` or `"error": "..."`, flattened next to `id`.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The body of a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The operation succeeded; the value's shape depends on the request type.
    Result(serde_json::Value),
    /// The operation failed; a human-readable message.
    Error(String),
}

impl Response {
    /// A success response carrying `value`.
    pub fn ok<T: Serialize>(id: u64, value: &T) -> Self {
        match serde_json::to_value(value) {
            Ok(value) => Response {
                id,
                outcome: Outcome::Result(value),
            },
            Err(e) => Response::error(id, format!("Encoding the result: {e}")),
        }
    }

    /// An error response.
    pub fn error(id: u64, message: impl Into<String>) -> Self {
        Response {
            id,
            outcome: Outcome::Error(message.into()),
        }
    }

    /// Decodes the result into `T`; an error response becomes `Err(message)`.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, String> {
        match self.outcome {
            Outcome::Result(value) => {
                serde_json::from_value(value).map_err(|e| format!("Decoding the result: {e}"))
            }
            Outcome::Error(message) => Err(message),
        }
    }
}

/// Result of `health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthInfo {
    /// The agent's crate version.
    pub version: String,
    /// Guest uptime (`/proc/uptime`) in milliseconds.
    pub uptime_ms: u64,
    /// Time since the agent started, in milliseconds.
    pub agent_uptime_ms: u64,
    /// The protocol version the agent speaks ([`PROTOCOL_VERSION`]); 1 when absent
    /// (agents before version 2 did not report it).
    #[serde(default = "protocol_v1")]
    pub protocol: u32,
}

fn protocol_v1() -> u32 {
    1
}

/// One entry of the `list_interfaces` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceInfo {
    /// Kernel name, e.g. `eth0`.
    pub name: String,
    /// Hardware address in lower case, if the interface has one.
    pub mac: Option<String>,
    /// Addresses in CIDR notation.
    pub addresses: Vec<String>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// `/sys/class/net/IF/operstate`: `up`, `down`, `unknown`...
    pub operstate: String,
    /// Current MTU.
    pub mtu: u32,
    /// Receive queues (`/sys/class/net/IF/queues/rx-*`).
    pub rx_queues: u32,
    /// Transmit queues (`/sys/class/net/IF/queues/tx-*`).
    pub tx_queues: u32,
}

/// Result of `configure_interface`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfiguredInterface {
    /// Name of the interface that carries the requested MAC.
    pub name: String,
}

/// Result of `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Exit code, when the program exited normally.
    pub exit_code: Option<i32>,
    /// Signal that ended the program, if any (9 after a timeout).
    pub signal: Option<i32>,
    /// The program was killed because it ran past its timeout.
    pub timed_out: bool,
    /// Standard output, lossily decoded as UTF-8, at most [`EXEC_OUTPUT_LIMIT`] bytes.
    pub stdout: String,
    /// Standard error, lossily decoded as UTF-8, at most [`EXEC_OUTPUT_LIMIT`] bytes.
    pub stderr: String,
    /// Some output was dropped because of [`EXEC_OUTPUT_LIMIT`].
    pub truncated: bool,
}

/// Encodes `value` as one protocol line (JSON followed by `\n`).
pub fn to_line<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs to a String cannot fail.
    let mut line = serde_json::to_string(value).unwrap_or_default();
    line.push('\n');
    line
}

/// Parses CIDR notation (`10.0.0.2/24`, `fd00::2/64`) into an address and prefix length.
pub fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((addr, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip(request: Request) -> serde_json::Value {
        let line = to_line(&request);
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let back: Request = serde_json::from_str(&line).unwrap();
        assert_eq!(back, request);
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn health_request_is_id_and_type() {
        let wire = round_trip(Request {
            id: 7,
            body: RequestBody::Health(HealthRequest::default()),
        });
        assert_eq!(wire, json!({"id": 7, "type": "health"}));
        let wire = round_trip(Request {
            id: 8,
            body: RequestBody::Health(HealthRequest { protocol: Some(2) }),
        });
        assert_eq!(wire, json!({"id": 8, "type": "health", "protocol": 2}));
    }

    #[test]
    fn configure_interface_request_round_trips_with_flat_fields() {
        let body = RequestBody::ConfigureInterface(InterfaceConfig {
            mac: "02:00:00:00:00:10".into(),
            set_mac: None,
            addresses: vec!["10.0.0.2/24".into()],
            mtu: Some(1400),
            routes: vec![RouteConfig {
                dest: "default".into(),
                gateway: Some("10.0.0.1".into()),
            }],
        });
        let wire = round_trip(Request { id: 2, body });
        assert_eq!(
            wire,
            json!({"id": 2, "type": "configure_interface", "mac": "02:00:00:00:00:10",
                   "addresses": ["10.0.0.2/24"], "mtu": 1400,
                   "routes": [{"dest": "default", "gateway": "10.0.0.1"}]})
        );
    }

    #[test]
    fn optional_request_fields_may_be_omitted() {
        let request: Request = serde_json::from_str(
            r#"{"id":3,"type":"configure_interface","mac":"02:00:00:00:00:10"}"#,
        )
        .unwrap();
        let RequestBody::ConfigureInterface(config) = request.body else {
            panic!("wrong type")
        };
        assert!(config.addresses.is_empty() && config.routes.is_empty() && config.mtu.is_none());
        assert!(config.set_mac.is_none());

        let request: Request =
            serde_json::from_str(r#"{"id":4,"type":"exec","argv":["true"]}"#).unwrap();
        assert_eq!(
            request.body,
            RequestBody::Exec(ExecRequest {
                argv: vec!["true".into()],
                timeout_ms: None
            })
        );
    }

    #[test]
    fn exec_and_list_requests_round_trip() {
        round_trip(Request {
            id: 5,
            body: RequestBody::ListInterfaces,
        });
        round_trip(Request {
            id: 6,
            body: RequestBody::Exec(ExecRequest {
                argv: vec!["ip".into(), "-o".into(), "addr".into()],
                timeout_ms: Some(500),
            }),
        });
    }

    #[test]
    fn a_v1_health_answer_is_protocol_1() {
        let health: HealthInfo =
            serde_json::from_str(r#"{"version":"0.1.0","uptime_ms":1,"agent_uptime_ms":1}"#)
                .unwrap();
        assert_eq!(health.protocol, 1);
    }

    #[test]
    fn container_requests_have_flat_fields_and_optional_stdio() {
        let request: Request = serde_json::from_str(
            r#"{"id":3,"type":"create_container","container_id":"c1","rootfs":"/r","spec":"{}"}"#,
        )
        .unwrap();
        let RequestBody::CreateContainer(create) = request.body else {
            panic!("wrong type")
        };
        assert_eq!(create.container_id, "c1");
        assert_eq!(create.stdio, StdioRequest::default());
        let wire = round_trip(Request {
            id: 4,
            body: RequestBody::SignalProcess(SignalProcess {
                container_id: "c1".into(),
                exec_id: Some("e1".into()),
                signal: 15,
                all: false,
            }),
        });
        assert_eq!(
            wire,
            json!({"id": 4, "type": "signal_process", "container_id": "c1", "exec_id": "e1",
                   "signal": 15, "all": false})
        );
        let wire = round_trip(Request {
            id: 5,
            body: RequestBody::ExecProcess(ExecProcess {
                container_id: "c1".into(),
                exec_id: "e2".into(),
                process: json!({"args": ["ps"], "cwd": "/"}),
                stdio: StdioRequest {
                    terminal: true,
                    rows: Some(30),
                    cols: None,
                    stdin: true,
                },
            }),
        });
        assert_eq!(wire["terminal"], json!(true));
        assert_eq!(wire["rows"], json!(30));
    }

    #[test]
    fn unknown_request_type_is_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"id":1,"type":"reboot"}"#).is_err());
    }

    #[test]
    fn responses_are_result_or_error_next_to_id() {
        let health = HealthInfo {
            version: "0.1.0".into(),
            uptime_ms: 2000,
            agent_uptime_ms: 10,
            protocol: 2,
        };
        let ok = Response::ok(9, &health);
        let wire: serde_json::Value = serde_json::from_str(&to_line(&ok)).unwrap();
        assert_eq!(
            wire,
            json!({"id": 9, "result": {"version": "0.1.0", "uptime_ms": 2000, "agent_uptime_ms": 10, "protocol": 2}})
        );
        let back: Response = serde_json::from_value(wire).unwrap();
        assert_eq!(back.into_result::<HealthInfo>().unwrap(), health);

        let err = Response::error(10, "No interface has MAC 02:00:00:00:00:99");
        let wire: serde_json::Value = serde_json::from_str(&to_line(&err)).unwrap();
        assert_eq!(
            wire,
            json!({"id": 10, "error": "No interface has MAC 02:00:00:00:00:99"})
        );
        let back: Response = serde_json::from_value(wire).unwrap();
        assert_eq!(
            back.into_result::<HealthInfo>().unwrap_err(),
            "No interface has MAC 02:00:00:00:00:99"
        );
    }

    #[test]
    fn interface_list_and_exec_results_round_trip() {
        let list = vec![InterfaceInfo {
            name: "eth0".into(),
            mac: Some("02:00:00:00:00:10".into()),
            addresses: vec!["10.0.0.2/24".into(), "fe80::ff:fe00:10/64".into()],
            up: true,
            operstate: "up".into(),
            mtu: 1500,
            rx_queues: 2,
            tx_queues: 2,
        }];
        let back: Vec<InterfaceInfo> = Response::ok(1, &list).into_result().unwrap();
        assert_eq!(back, list);

        let out = ExecOutput {
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            stdout: "hi\n".into(),
            stderr: String::new(),
            truncated: false,
        };
        let back: ExecOutput = Response::ok(2, &out).into_result().unwrap();
        assert_eq!(back, out);
    }

    #[test]
    fn cidr_parsing_checks_prefix_length_per_family() {
        assert_eq!(
            parse_cidr("10.0.0.2/24"),
            Some(("10.0.0.2".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_cidr("fd00::2/64"),
            Some(("fd00::2".parse().unwrap(), 64))
        );
        assert_eq!(parse_cidr("10.0.0.2/33"), None);
        assert_eq!(parse_cidr("10.0.0.2"), None);
        assert_eq!(parse_cidr("eth0/24"), None);
    }
}
