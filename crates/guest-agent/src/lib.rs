//! Guest agent for test and demo guests: protocol types, and a host-side client.
//!
//! The agent (binary `guest-agent`, built static and placed at `/sbin/guest-agent`
//! in the initramfs by `scripts/guest-assets.sh`) serves newline-delimited JSON
//! on the virtio-serial port `agent.0` and, when the guest has a vsock device, on
//! AF_VSOCK port 1024 (`agent.port=` on the kernel command line changes it).
//! It reports health, lists and configures network interfaces, runs programs, mounts
//! virtio-fs shares and runs OCI containers whose stdio it streams (protocol 3: concurrent
//! requests, credit-limited byte streams); see `PROTOCOL.md` beside this crate's manifest.
//! When the guest cannot serve, its init says why on the console ([`console`]).
//!
//! This crate owns the wire format ([`protocol`]) and both ends of it: the agent's
//! serving side ([`server`], std threads, no async runtime) and, with the `client`
//! feature, [`client::AgentClient`] on tokio. The binary needs only std, serde, base64
//! and nix (and, with the `runtime` feature, the container runtime), so it stays small
//! and static. Nothing here may depend on the hypervisor crates: they depend on this one.
//!
//! ```
//! use guest_agent::protocol::{to_line, HealthInfo, HealthRequest, Request, RequestBody, Response};
//!
//! let line = to_line(&Request { id: 1, body: RequestBody::Health(HealthRequest::default()) });
//! assert_eq!(line, "{\"id\":1,\"type\":\"health\"}\n");
//!
//! let answer: Response = serde_json::from_str(
//!     r#"{"id":1,"result":{"version":"0.1.0","uptime_ms":2100,"agent_uptime_ms":40,"protocol":2}}"#,
//! ).unwrap();
//! let health: HealthInfo = answer.into_result().unwrap();
//! assert_eq!((health.version.as_str(), health.protocol), ("0.1.0", 2));
//! ```
#![warn(missing_docs)]

pub mod console;
pub mod protocol;
pub mod server;

#[cfg(feature = "client")]
pub mod client;

#[cfg(feature = "runtime")]
pub mod runtime;

pub use protocol::{
    ConfiguredInterface, ExecOutput, ExecRequest, HealthInfo, InterfaceConfig, InterfaceInfo,
    Outcome, Request, RequestBody, Response, RouteConfig,
};
