//! Transports: the virtio-serial port and AF_VSOCK.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use guest_agent::server::{serve, Connection, EofMeans, Service};

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use crate::log;

/// Pause before reopening the serial port after an error.
const REOPEN_DELAY: Duration = Duration::from_secs(1);

/// The `/dev` node of the virtio-serial port named `name`, found through
/// `SYS_ROOT/class/virtio-ports/vportNpM/name`, if both exist.
pub fn find_serial_port(sys_root: &Path, dev_root: &Path, name: &str) -> Option<PathBuf> {
    let ports = fs::read_dir(sys_root.join("class/virtio-ports")).ok()?;
    ports.filter_map(Result::ok).find_map(|entry| {
        let port_name = fs::read_to_string(entry.path().join("name")).ok()?;
        let dev = dev_root.join(entry.file_name());
        (port_name.trim() == name && dev.exists()).then_some(dev)
    })
}

/// Serves the serial port forever. The port outlives host connections: a read
/// of 0 bytes means no host is connected, so the agent waits and reads again,
/// dropping any partial line and the streams of the previous connection.
pub fn serve_serial(dev: &Path, service: &Arc<dyn Service>) {
    loop {
        match OpenOptions::new().read(true).write(true).open(dev) {
            Ok(port) => {
                let error = match port.try_clone() {
                    Ok(mut reader) => {
                        let conn = Connection::new(Box::new(port));
                        serve(&mut reader, &conn, service, EofMeans::HostAbsent).unwrap_err()
                    }
                    Err(e) => e,
                };
                log!("serial port {} failed, reopening: {error}", dev.display());
            }
            Err(e) => log!("opening serial port {} failed: {e}", dev.display()),
        }
        thread::sleep(REOPEN_DELAY);
    }
}

/// A listening AF_VSOCK stream socket.
#[derive(Debug)]
pub struct VsockListener {
    socket: OwnedFd,
}

impl VsockListener {
    /// Listens on `port` for any peer.
    pub fn bind(port: u32) -> io::Result<Self> {
        let socket = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(
            socket.as_raw_fd(),
            &VsockAddr::new(libc::VMADDR_CID_ANY, port),
        )?;
        listen(&socket, Backlog::new(16)?)?;
        Ok(VsockListener { socket })
    }

    /// Accepts connections forever, one thread per connection.
    pub fn serve(self, service: &Arc<dyn Service>) {
        loop {
            match accept4(self.socket.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(raw) => {
                    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                    let connection = unsafe { OwnedFd::from_raw_fd(raw) };
                    let service = Arc::clone(service);
                    thread::spawn(move || {
                        let stream = File::from(connection);
                        let result = stream.try_clone().and_then(|mut reader| {
                            let conn = Connection::new(Box::new(stream));
                            serve(&mut reader, &conn, &service, EofMeans::Closed)
                        });
                        if let Err(e) = result {
                            log!("vsock connection failed: {e}");
                        }
                    });
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    log!("accepting a vsock connection failed: {e}");
                    thread::sleep(REOPEN_DELAY);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_port_is_found_by_name_in_a_fake_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let (sys, dev) = (root.path().join("sys"), root.path().join("dev"));
        for (port, name) in [("vport1p1", "other.0"), ("vport1p2", "agent.0")] {
            fs::create_dir_all(sys.join("class/virtio-ports").join(port)).unwrap();
            fs::write(
                sys.join("class/virtio-ports").join(port).join("name"),
                format!("{name}\n"),
            )
            .unwrap();
        }
        assert_eq!(
            find_serial_port(&sys, &dev, "agent.0"),
            None,
            "no /dev node yet"
        );
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("vport1p2"), "").unwrap();
        assert_eq!(
            find_serial_port(&sys, &dev, "agent.0"),
            Some(dev.join("vport1p2"))
        );
        assert_eq!(find_serial_port(&sys, &dev, "agent.1"), None);
    }
}
