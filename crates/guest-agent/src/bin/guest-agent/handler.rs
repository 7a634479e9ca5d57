//! Turns one request line into one response line.

use std::path::PathBuf;
use std::time::Instant;

use guest_agent::protocol::{to_line, HealthInfo, Request, RequestBody, Response, UNKNOWN_ID};

use crate::{exec, interfaces, netconf};

/// Executes requests. Shared by all transports; holds no mutable state.
#[derive(Debug)]
pub struct Handler {
    started: Instant,
    /// Where sysfs is mounted (`/sys`).
    sys_root: PathBuf,
}

impl Handler {
    pub fn new(started: Instant, sys_root: PathBuf) -> Self {
        Handler { started, sys_root }
    }

    /// Answers one request line (without or with its trailing newline) with one
    /// response line. Never fails: problems become error responses.
    pub fn handle_line(&self, line: &[u8]) -> String {
        let response = match serde_json::from_slice::<Request>(line) {
            Ok(request) => self.handle(request),
            Err(e) => match resynchronize(line) {
                Some(request) => self.handle(request),
                None => Response::error(id_of(line), format!("Invalid request: {e}")),
            },
        };
        to_line(&response)
    }

    fn handle(&self, request: Request) -> Response {
        let id = request.id;
        match request.body {
            RequestBody::Health => Response::ok(id, &self.health()),
            RequestBody::ListInterfaces => match interfaces::list(&self.sys_root) {
                Ok(list) => Response::ok(id, &list),
                Err(e) => Response::error(id, e),
            },
            RequestBody::ConfigureInterface(config) => {
                match netconf::configure(&self.sys_root, &config) {
                    Ok(done) => Response::ok(id, &done),
                    Err(e) => Response::error(id, e),
                }
            }
            RequestBody::Exec(request) => match exec::run(&request) {
                Ok(output) => Response::ok(id, &output),
                Err(e) => Response::error(id, e),
            },
        }
    }

    fn health(&self) -> HealthInfo {
        HealthInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ms: system_uptime_ms().unwrap_or(0),
            agent_uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// A valid request at the end of an invalid line. Virtio-serial keeps no
/// connection boundaries: the start of a line from a host that disconnected
/// mid-request can be glued to the next host's first request.
fn resynchronize(line: &[u8]) -> Option<Request> {
    line.iter()
        .enumerate()
        .skip(1)
        .filter(|(_, &byte)| byte == b'{')
        .find_map(|(start, _)| serde_json::from_slice::<Request>(&line[start..]).ok())
}

/// The `id` of a line that is JSON but not a valid request, so the client can
/// still match the error; [`UNKNOWN_ID`] otherwise.
fn id_of(line: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|value| value.get("id")?.as_u64())
        .unwrap_or(UNKNOWN_ID)
}

fn system_uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    Some((seconds * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_agent::protocol::{HealthInfo, Outcome};

    fn handler() -> Handler {
        Handler::new(Instant::now(), "/nonexistent-sys".into())
    }

    fn answer(line: &str) -> Response {
        serde_json::from_str(&handler().handle_line(line.as_bytes())).unwrap()
    }

    #[test]
    fn health_answers_with_the_request_id_and_version() {
        let response = answer("{\"id\":42,\"type\":\"health\"}\n");
        assert_eq!(response.id, 42);
        let health: HealthInfo = response.into_result().unwrap();
        assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
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
    fn request_glued_to_a_stale_partial_line_is_still_answered() {
        let response = answer("{\"id\":901,\"type\":\"hea{\"id\":1,\"type\":\"health\"}\n");
        assert_eq!(response.id, 1);
        assert!(matches!(response.outcome, Outcome::Result(_)));
    }

    #[test]
    fn garbage_is_an_error_with_the_unknown_id() {
        let response = answer("\u{0}\u{1}not json");
        assert_eq!(response.id, UNKNOWN_ID);
        assert!(matches!(response.outcome, Outcome::Error(_)));
    }

    #[test]
    fn missing_sysfs_is_an_error_response_not_a_crash() {
        let response = answer(r#"{"id":6,"type":"list_interfaces"}"#);
        assert!(matches!(response.outcome, Outcome::Error(_)));
        let response = answer(r#"{"id":7,"type":"configure_interface","mac":"02:00:00:00:00:10"}"#);
        assert!(matches!(response.outcome, Outcome::Error(_)));
    }
}
