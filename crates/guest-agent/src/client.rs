//! Host-side async client (feature `client`).
//!
//! [`AgentClient`] speaks the line protocol over one of three transports: the
//! Unix socket behind a QEMU virtio-serial port, AF_VSOCK, or a hybrid vsock
//! Unix socket (Firecracker/Cloud Hypervisor `CONNECT <port>` handshake).
//!
//! Virtio-serial gives no connection semantics to the guest: requests sent
//! before the agent opened its port wait in the socket, and data in flight
//! when the host reconnects may be lost. So every call has a timeout, every
//! request a fresh id, responses with other ids are skipped, and
//! [`AgentClient::wait_ready`] resends `health` until the agent answers.
//!
//! ```no_run
//! # async fn demo() -> Result<(), guest_agent::client::ClientError> {
//! use std::time::Duration;
//! use guest_agent::client::AgentClient;
//!
//! let mut agent = AgentClient::connect_serial("/run/vm/agent.sock").await?;
//! let health = agent.wait_ready(Duration::from_secs(30)).await?;
//! let nics = agent.list_interfaces(Duration::from_secs(5)).await?;
//! println!("agent {} sees {} interfaces", health.version, nics.len());
//! # Ok(()) }
//! ```

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::{timeout, Instant};

use crate::protocol::{
    to_line, ConfiguredInterface, ExecOutput, ExecRequest, HealthInfo, InterfaceConfig,
    InterfaceInfo, Request, RequestBody, Response,
};

/// Errors of [`AgentClient`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Opening the transport failed.
    #[error("Connecting to the agent at {endpoint}")]
    Connect {
        /// The endpoint, e.g. `serial:/run/vm/agent.sock`.
        endpoint: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The hybrid vsock multiplexer did not answer `OK` to `CONNECT`.
    #[error("Hybrid vsock {path:?} refused CONNECT {port}: {reply:?}")]
    HandshakeRefused {
        /// The Unix socket.
        path: PathBuf,
        /// The guest vsock port.
        port: u32,
        /// What the multiplexer answered.
        reply: String,
    },
    /// Reading or writing the transport failed.
    #[error("Talking to the agent")]
    Io(#[from] io::Error),
    /// The transport was closed by the other side.
    #[error("Agent connection closed")]
    Closed,
    /// No matching response arrived in time.
    #[error("Agent request {request} (id {id}) got no response within {after:?}")]
    Timeout {
        /// Request type.
        request: &'static str,
        /// Request id.
        id: u64,
        /// The timeout that passed.
        after: Duration,
    },
    /// The agent answered with an error.
    #[error("Agent request {request} failed: {message}")]
    Agent {
        /// Request type.
        request: &'static str,
        /// The agent's message.
        message: String,
    },
}

/// Result alias of the client.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Where the agent is reached; kept so the client can reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Unix socket of a QEMU `-chardev socket` backing the `agent.0` virtserialport.
    Serial(PathBuf),
    /// AF_VSOCK context id and port.
    Vsock {
        /// Guest context id.
        cid: u32,
        /// Guest port.
        port: u32,
    },
    /// Hybrid vsock Unix socket and guest port.
    HybridVsock {
        /// The multiplexer's Unix socket.
        path: PathBuf,
        /// Guest port to `CONNECT` to.
        port: u32,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Serial(path) => write!(f, "serial:{}", path.display()),
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::HybridVsock { path, port } => write!(f, "hvsock:{}:{port}", path.display()),
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How long one vsock `connect` may take.
const VSOCK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest wait for a `health` answer in [`AgentClient::wait_ready`].
const READY_FIRST_ATTEMPT: Duration = Duration::from_millis(50);
const READY_MAX_ATTEMPT: Duration = Duration::from_millis(100);

/// Async client of the guest agent. Calls take `&mut self`: one request at a time.
pub struct AgentClient {
    endpoint: Endpoint,
    stream: Option<BufReader<Box<dyn Stream>>>,
    /// Bytes of a response line read so far; kept across cancelled reads.
    pending: Vec<u8>,
    /// Set while a request line is being written; a cancelled write leaves a
    /// partial line behind, so the connection is then dropped.
    writing: bool,
    next_id: u64,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("endpoint", &self.endpoint)
            .field("connected", &self.stream.is_some())
            .field("next_id", &self.next_id)
            .finish()
    }
}

impl AgentClient {
    /// Connects to the Unix socket of a QEMU virtio-serial chardev
    /// (`-chardev socket,server=on,wait=off`). Succeeds before the guest is up.
    pub async fn connect_serial(path: impl AsRef<Path>) -> Result<Self> {
        Self::connect(Endpoint::Serial(path.as_ref().to_owned())).await
    }

    /// Connects to the agent over AF_VSOCK.
    pub async fn connect_vsock(cid: u32, port: u32) -> Result<Self> {
        Self::connect(Endpoint::Vsock { cid, port }).await
    }

    /// Connects through a hybrid vsock Unix socket: sends `CONNECT <port>\n` and
    /// expects `OK <host port>\n`.
    pub async fn connect_hybrid_vsock(path: impl AsRef<Path>, port: u32) -> Result<Self> {
        Self::connect(Endpoint::HybridVsock {
            path: path.as_ref().to_owned(),
            port,
        })
        .await
    }

    /// Connects to `endpoint`.
    pub async fn connect(endpoint: Endpoint) -> Result<Self> {
        let mut client = AgentClient {
            endpoint,
            stream: None,
            pending: Vec::new(),
            writing: false,
            next_id: 1,
        };
        client.reconnect().await?;
        Ok(client)
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Drops the current connection, if any, and opens a new one.
    pub async fn reconnect(&mut self) -> Result<()> {
        self.stream = None;
        self.pending.clear();
        self.writing = false;
        let mut stream = open(&self.endpoint).await?;
        // Ends any partial line a previous host connection left in the agent's
        // buffer; the agent answers that garbage with an error under id 0,
        // which `call` skips.
        stream.write_all(b"\n").await?;
        self.stream = Some(BufReader::new(stream));
        Ok(())
    }

    /// Sends `health` until the agent answers or `timeout` passes, reconnecting
    /// when the transport fails. Each attempt uses a new id; late answers to
    /// earlier attempts are skipped by later calls.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<HealthInfo> {
        let deadline = Instant::now() + timeout;
        let mut attempt = READY_FIRST_ATTEMPT;
        let mut last_error = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(last_error.unwrap_or(ClientError::Timeout {
                    request: "health",
                    id: 0,
                    after: timeout,
                }));
            }
            let wait = attempt.min(deadline - now);
            if self.stream.is_none() {
                if let Err(e) = self.reconnect().await {
                    last_error = Some(e);
                    tokio::time::sleep(wait).await;
                    attempt = (attempt * 2).min(READY_MAX_ATTEMPT);
                    continue;
                }
            }
            match self.call::<HealthInfo>(RequestBody::Health, wait).await {
                Ok(health) => return Ok(health),
                Err(e @ ClientError::Timeout { .. }) => last_error = Some(e),
                Err(e @ (ClientError::Io(_) | ClientError::Closed)) => {
                    self.stream = None;
                    last_error = Some(e);
                    tokio::time::sleep(wait.min(Duration::from_millis(100))).await;
                }
                Err(e) => return Err(e),
            }
            attempt = (attempt * 2).min(READY_MAX_ATTEMPT);
        }
    }

    /// `health`: agent version and uptimes.
    pub async fn health(&mut self, timeout: Duration) -> Result<HealthInfo> {
        self.call(RequestBody::Health, timeout).await
    }

    /// `list_interfaces`: the guest's network interfaces.
    pub async fn list_interfaces(&mut self, timeout: Duration) -> Result<Vec<InterfaceInfo>> {
        self.call(RequestBody::ListInterfaces, timeout).await
    }

    /// `configure_interface`: addresses, MTU and routes of the NIC with `config.mac`.
    pub async fn configure_interface(
        &mut self,
        config: InterfaceConfig,
        timeout: Duration,
    ) -> Result<ConfiguredInterface> {
        self.call(RequestBody::ConfigureInterface(config), timeout)
            .await
    }

    /// `exec`: runs a program in the guest. Give `timeout` some slack over
    /// `request.timeout_ms`, which bounds the program itself.
    pub async fn exec(&mut self, request: ExecRequest, timeout: Duration) -> Result<ExecOutput> {
        self.call(RequestBody::Exec(request), timeout).await
    }

    /// Sends one request and waits up to `timeout` for the response with its id,
    /// skipping lines that are not that response.
    pub async fn call<T: DeserializeOwned>(
        &mut self,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<T> {
        let id = self.next_id;
        self.next_id += 1;
        let request_name = body.name();
        let line = to_line(&Request { id, body });
        let response =
            match tokio::time::timeout(timeout, self.round_trip(id, line.as_bytes())).await {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => {
                    self.stream = None;
                    return Err(e);
                }
                Err(_) => {
                    if self.writing {
                        self.stream = None;
                        self.writing = false;
                    }
                    return Err(ClientError::Timeout {
                        request: request_name,
                        id,
                        after: timeout,
                    });
                }
            };
        response
            .into_result()
            .map_err(|message| ClientError::Agent {
                request: request_name,
                message,
            })
    }

    async fn round_trip(&mut self, id: u64, line: &[u8]) -> Result<Response> {
        let stream = self.stream.as_mut().ok_or(ClientError::Closed)?;
        self.writing = true;
        write_all(stream, line).await?;
        self.writing = false;
        loop {
            let stream = self.stream.as_mut().ok_or(ClientError::Closed)?;
            // `read_until` is cancel-safe: bytes read so far stay in `pending`.
            let n = stream.read_until(b'\n', &mut self.pending).await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            if self.pending.last() != Some(&b'\n') {
                continue;
            }
            let parsed = serde_json::from_slice::<Response>(&self.pending);
            self.pending.clear();
            match parsed {
                Ok(response) if response.id == id => return Ok(response),
                // A stale answer to an earlier attempt, or noise after a reconnect.
                _ => continue,
            }
        }
    }
}

async fn write_all(stream: &mut BufReader<Box<dyn Stream>>, bytes: &[u8]) -> Result<()> {
    let inner = stream.get_mut();
    inner.write_all(bytes).await?;
    inner.flush().await?;
    Ok(())
}

async fn open(endpoint: &Endpoint) -> Result<Box<dyn Stream>> {
    let connect_error = |source| ClientError::Connect {
        endpoint: endpoint.to_string(),
        source,
    };
    match endpoint {
        Endpoint::Serial(path) => Ok(Box::new(
            UnixStream::connect(path).await.map_err(connect_error)?,
        )),
        Endpoint::Vsock { cid, port } => {
            let (cid, port) = (*cid, *port);
            let connecting = tokio::task::spawn_blocking(move || connect_vsock_blocking(cid, port));
            let fd = match timeout(VSOCK_CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(result)) => result.map_err(connect_error)?,
                Ok(Err(join)) => return Err(connect_error(io::Error::other(join))),
                Err(_) => return Err(connect_error(io::ErrorKind::TimedOut.into())),
            };
            // A connected stream socket; tokio's UnixStream only issues
            // read/write/shutdown on it, which work for any stream socket.
            let std_stream = std::os::unix::net::UnixStream::from(fd);
            std_stream.set_nonblocking(true).map_err(connect_error)?;
            Ok(Box::new(
                UnixStream::from_std(std_stream).map_err(connect_error)?,
            ))
        }
        Endpoint::HybridVsock { path, port } => {
            let stream = UnixStream::connect(path).await.map_err(connect_error)?;
            let mut stream = BufReader::new(stream);
            stream
                .get_mut()
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(connect_error)?;
            let mut reply = String::new();
            match timeout(VSOCK_CONNECT_TIMEOUT, stream.read_line(&mut reply)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(connect_error(e)),
                Err(_) => return Err(connect_error(io::ErrorKind::TimedOut.into())),
            }
            if !reply.starts_with("OK ") {
                return Err(ClientError::HandshakeRefused {
                    path: path.clone(),
                    port: *port,
                    reply: reply.trim_end().to_owned(),
                });
            }
            // The handshake reads only up to its newline; nothing else is buffered
            // because the agent speaks only when asked.
            Ok(Box::new(stream.into_inner()))
        }
    }
}

fn connect_vsock_blocking(cid: u32, port: u32) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(cid, port),
    )?;
    Ok(fd)
}
