//! Answers requests: the agent's [`Service`].

use std::path::PathBuf;
use std::time::Instant;

use guest_agent::protocol::{
    HealthInfo, HealthRequest, Request, RequestBody, Response, PROTOCOL_VERSION,
};
use guest_agent::server::{RequestContext, Service};

use crate::identity;

use crate::{exec, interfaces, netconf, share};

/// Executes requests. Shared by all transports and request threads.
pub struct Handler {
    started: Instant,
    /// Where sysfs is mounted (`/sys`).
    sys_root: PathBuf,
    #[cfg(feature = "runtime")]
    containers: Option<crate::containers::Containers>,
}

impl Handler {
    pub fn new(started: Instant, sys_root: PathBuf) -> Self {
        Handler {
            started,
            sys_root,
            #[cfg(feature = "runtime")]
            containers: crate::containers::Containers::new()
                .map_err(|e| crate::log!("containers are not available: {e}"))
                .ok(),
        }
    }

    fn health(&self, request: HealthRequest) -> Result<HealthInfo, String> {
        match request.protocol {
            Some(host) if host != PROTOCOL_VERSION => Err(format!(
                "The host speaks agent protocol {host}; this agent speaks protocol {PROTOCOL_VERSION}"
            )),
            _ => Ok(HealthInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                uptime_ms: system_uptime_ms().unwrap_or(0),
                agent_uptime_ms: u64::try_from(self.started.elapsed().as_millis())
                    .unwrap_or(u64::MAX),
                protocol: PROTOCOL_VERSION,
            }),
        }
    }

    #[cfg(feature = "runtime")]
    fn containers(
        &self,
        body: RequestBody,
        ctx: &RequestContext,
    ) -> Result<serde_json::Value, String> {
        match &self.containers {
            Some(containers) => containers.handle(body, ctx),
            None => Err(format!(
                "Request {} needs the container runtime, which did not start (see the console)",
                body.name()
            )),
        }
    }

    #[cfg(not(feature = "runtime"))]
    fn containers(
        &self,
        body: RequestBody,
        _ctx: &RequestContext,
    ) -> Result<serde_json::Value, String> {
        Err(format!(
            "Request {} needs the container runtime; this agent was built without it",
            body.name()
        ))
    }
}

fn reply<T: serde::Serialize>(id: u64, result: Result<T, String>) -> Response {
    match result {
        Ok(value) => Response::ok(id, &value),
        Err(e) => Response::error(id, e),
    }
}

impl Service for Handler {
    fn handle(&self, request: Request, ctx: &RequestContext) -> Response {
        let id = request.id;
        match request.body {
            RequestBody::Health(health) => reply(id, self.health(health)),
            RequestBody::ListInterfaces => reply(id, interfaces::list(&self.sys_root)),
            RequestBody::ConfigureInterface(config) => {
                reply(id, netconf::configure(&self.sys_root, &config))
            }
            RequestBody::Exec(request) => reply(id, exec::run(&request)),
            RequestBody::MountShare(mount) => reply(id, share::mount(&mount)),
            RequestBody::SetClock(clock) => reply(id, identity::set_clock(&clock)),
            RequestBody::SetHostname(name) => reply(id, identity::set_hostname(&name)),
            RequestBody::SeedRandom(seed) => reply(id, identity::seed_random(&seed)),
            body => reply(id, self.containers(body, ctx)),
        }
    }
}

fn system_uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    Some((seconds * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_agent::protocol::Outcome;
    use guest_agent::server::{parse_request, Connection};

    fn answer(line: &str) -> Response {
        let handler = Handler::new(Instant::now(), "/nonexistent-sys".into());
        let ctx = RequestContext::new(Connection::new(Box::new(std::io::sink())));
        match parse_request(line.as_bytes()) {
            Ok(request) => handler.handle(request, &ctx),
            Err(response) => response,
        }
    }

    #[test]
    fn health_answers_with_the_request_id_version_and_protocol() {
        let response = answer("{\"id\":42,\"type\":\"health\"}\n");
        assert_eq!(response.id, 42);
        let health: HealthInfo = response.into_result().unwrap();
        assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(health.protocol, PROTOCOL_VERSION);
    }

    #[test]
    fn a_host_of_another_protocol_gets_an_error_naming_both() {
        let response = answer(r#"{"id":1,"type":"health","protocol":99}"#);
        let message = response.into_result::<HealthInfo>().unwrap_err();
        assert_eq!(
            message,
            "The host speaks agent protocol 99; this agent speaks protocol 3"
        );
    }

    #[test]
    fn unknown_type_is_an_error_with_the_request_id() {
        let response = answer(r#"{"id":5,"type":"reboot"}"#);
        assert_eq!(response.id, 5);
        assert!(
            matches!(response.outcome, Outcome::Error(ref m) if m.starts_with("Invalid request"))
        );
    }

    #[test]
    fn missing_sysfs_is_an_error_response_not_a_crash() {
        let response = answer(r#"{"id":6,"type":"list_interfaces"}"#);
        assert!(matches!(response.outcome, Outcome::Error(_)));
        let response = answer(r#"{"id":7,"type":"configure_interface","mac":"02:00:00:00:00:10"}"#);
        assert!(matches!(response.outcome, Outcome::Error(_)));
    }
}
