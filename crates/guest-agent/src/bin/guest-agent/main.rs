//! The guest agent: serves the line protocol on the virtio-serial port
//! `agent.0` and on AF_VSOCK, for as long as the guest runs.
//!
//! Started by the initramfs `/init`; logs go to stderr (the console).
//! Transports are picked up as they appear: one thread serves the serial
//! port, one accepts vsock connections (a thread per connection). Each request
//! runs on a thread of its own (`guest_agent::server`).

#[cfg(feature = "runtime")]
mod containers;
mod exec;
mod handler;
mod identity;
mod interfaces;
mod netconf;
mod share;
#[cfg(feature = "runtime")]
mod spec;
mod transport;

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use guest_agent::protocol::{DEFAULT_VSOCK_PORT, SERIAL_PORT_NAME};
use guest_agent::server::Service;

use crate::handler::Handler;

/// How often to look for transports that are not served yet.
const TRANSPORT_SCAN_INTERVAL: Duration = Duration::from_millis(200);

macro_rules! log {
    ($($arg:tt)*) => { eprintln!("guest-agent: {}", format_args!($($arg)*)) };
}
pub(crate) use log;

fn main() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let vsock_port = vsock_port_from_cmdline(&cmdline);
    let handler: Arc<dyn Service> = Arc::new(Handler::new(Instant::now(), "/sys".into()));
    log!("version {} starting", env!("CARGO_PKG_VERSION"));

    let mut serial_served = false;
    let mut vsock_served = false;
    loop {
        if !serial_served {
            if let Some(dev) =
                transport::find_serial_port(Path::new("/sys"), Path::new("/dev"), SERIAL_PORT_NAME)
            {
                log!("serving {} on {}", SERIAL_PORT_NAME, dev.display());
                let handler = Arc::clone(&handler);
                thread::spawn(move || transport::serve_serial(&dev, &handler));
                serial_served = true;
            }
        }
        if !vsock_served && Path::new("/dev/vsock").exists() {
            match transport::VsockListener::bind(vsock_port) {
                Ok(listener) => {
                    log!("serving vsock port {vsock_port}");
                    let handler = Arc::clone(&handler);
                    thread::spawn(move || listener.serve(&handler));
                    vsock_served = true;
                }
                Err(e) => log!("listening on vsock port {vsock_port} failed: {e}"),
            }
        }
        thread::sleep(if serial_served || vsock_served {
            TRANSPORT_SCAN_INTERVAL * 5
        } else {
            TRANSPORT_SCAN_INTERVAL
        });
    }
}

/// `agent.port=N` from the kernel command line, or the default.
fn vsock_port_from_cmdline(cmdline: &str) -> u32 {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .filter_map(|arg| arg.strip_prefix("agent.port="))
        .find_map(|port| port.parse().ok())
        .unwrap_or(DEFAULT_VSOCK_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_port_comes_from_cmdline_or_defaults() {
        assert_eq!(
            vsock_port_from_cmdline("console=ttyS0 agent.port=2048 panic=-1\n"),
            2048
        );
        assert_eq!(vsock_port_from_cmdline("console=ttyS0"), DEFAULT_VSOCK_PORT);
        assert_eq!(
            vsock_port_from_cmdline("agent.port=nope"),
            DEFAULT_VSOCK_PORT
        );
    }
}
