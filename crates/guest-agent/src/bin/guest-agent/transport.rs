//! Transports: the virtio-serial port and AF_VSOCK.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use crate::handler::Handler;
use crate::log;

/// Pause after a read of 0 bytes on the serial port: the host side is not connected.
const HOST_ABSENT_POLL: Duration = Duration::from_millis(20);
/// Pause before reopening the serial port after an error.
const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// Longest request line; a longer one is answered with an error and dropped.
const MAX_LINE: usize = 1 << 20;

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
/// dropping any partial line of the previous connection.
pub fn serve_serial(dev: &Path, handler: &Handler) {
    loop {
        match OpenOptions::new().read(true).write(true).open(dev) {
            Ok(mut port) => {
                let error = serve_lines(&mut port, handler, EofMeans::HostAbsent).unwrap_err();
                log!("serial port {} failed, reopening: {error}", dev.display());
            }
            Err(e) => log!("opening serial port {} failed: {e}", dev.display()),
        }
        thread::sleep(REOPEN_DELAY);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EofMeans {
    /// Virtio-serial: wait for the host to (re)connect.
    HostAbsent,
    /// A socket connection: it is over.
    Closed,
}

/// Reads request lines and writes one response line each. Returns `Ok` when a
/// socket connection ends, `Err` on a read or write error.
fn serve_lines<S: Read + Write>(
    stream: &mut S,
    handler: &Handler,
    eof: EofMeans,
) -> io::Result<()> {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) if eof == EofMeans::Closed => return Ok(()),
            Ok(0) => {
                pending.clear();
                thread::sleep(HOST_ABSENT_POLL);
                continue;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                thread::sleep(HOST_ABSENT_POLL);
                continue;
            }
            Err(e) => return Err(e),
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            stream.write_all(handler.handle_line(&line).as_bytes())?;
        }
        if pending.len() > MAX_LINE {
            pending.clear();
            stream.write_all(handler.handle_line(b"request line too long").as_bytes())?;
        }
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
    pub fn serve(self, handler: &'static Handler) {
        loop {
            match accept4(self.socket.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(raw) => {
                    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                    let connection = unsafe { OwnedFd::from_raw_fd(raw) };
                    thread::spawn(move || {
                        let mut stream = File::from(connection);
                        if let Err(e) = serve_lines(&mut stream, handler, EofMeans::Closed) {
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
    use std::io::Cursor;
    use std::time::Instant;

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

    /// A stream whose reads come from a script and whose writes are kept.
    struct Scripted {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // Two bytes at a time, to split lines across reads.
            let len = buf.len().min(2);
            self.input.read(&mut buf[..len])
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_request_line_gets_one_response_line_in_order() {
        let handler = Handler::new(Instant::now(), "/nonexistent-sys".into());
        let input = b"{\"id\":1,\"type\":\"health\"}\n\n{\"id\":2,\"type\":\"nope\"}\n{\"id\":3,\"type\":\"health\"}\n";
        let mut stream = Scripted {
            input: Cursor::new(input.to_vec()),
            output: Vec::new(),
        };

        serve_lines(&mut stream, &handler, EofMeans::Closed).unwrap();

        let output = String::from_utf8(stream.output).unwrap();
        let ids: Vec<u64> = output
            .lines()
            .map(|line| {
                serde_json::from_str::<guest_agent::Response>(line)
                    .unwrap()
                    .id
            })
            .collect();
        assert_eq!(ids, [1, 2, 3]);
    }
}
