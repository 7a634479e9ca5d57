//! Host-side async client (feature `client`).
//!
//! [`AgentClient`] speaks the protocol over one of three transports: the Unix
//! socket behind a QEMU virtio-serial port, AF_VSOCK, or a hybrid vsock Unix
//! socket (Firecracker/Cloud Hypervisor `CONNECT <port>` handshake).
//!
//! Calls take `&self` and may run concurrently on one connection: a reader task
//! hands each response to its caller by id and each stream frame to its stream
//! ([`OutputStream`], [`InputStream`]), and a writer task writes whole lines.
//! Clones share the connection.
//!
//! Virtio-serial gives no connection semantics to the guest: requests sent
//! before the agent opened its port wait in the socket, and data in flight
//! when the host reconnects may be lost. So every call has a timeout, every
//! request a fresh id, responses with other ids are skipped, and
//! [`AgentClient::wait_ready`] resends `health` until the agent answers (and
//! checks that it speaks [`PROTOCOL_VERSION`]).
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

mod conn;
mod containers;
mod stream;

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::{timeout, Instant};

use crate::protocol::{
    to_line, ConfiguredInterface, ExecOutput, ExecRequest, HealthInfo, HealthRequest,
    InterfaceConfig, InterfaceInfo, Request, RequestBody, PROTOCOL_VERSION,
};
use conn::Conn;
pub use containers::ProcessStdio;
pub use stream::{InputStream, OutputStream};

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
    /// The agent speaks another protocol version.
    #[error("The agent speaks protocol {agent}; this client speaks protocol {client}")]
    ProtocolMismatch {
        /// The agent's version (1 for agents that do not report one).
        agent: u32,
        /// [`PROTOCOL_VERSION`].
        client: u32,
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

/// Async client of the guest agent. Calls take `&self` and may run concurrently;
/// clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    endpoint: Endpoint,
    conn: Option<Arc<Conn>>,
    next_id: Arc<AtomicU64>,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("endpoint", &self.endpoint)
            .field("connected", &self.is_connected())
            .field("next_id", &self.next_id.load(Ordering::Relaxed))
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
            conn: None,
            next_id: Arc::new(AtomicU64::new(1)),
        };
        client.reconnect().await?;
        Ok(client)
    }

    /// A client over an already connected byte stream (a socketpair in tests, say);
    /// [`AgentClient::reconnect`] on it fails. Must be called inside a tokio runtime.
    pub fn over<S>(stream: S) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        AgentClient {
            endpoint: Endpoint::Serial(PathBuf::new()),
            conn: Some(Conn::start(stream)),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.shared.is_closed())
    }

    /// Closes this client's connection and waits until its socket is closed, when no clone
    /// of the client shares it (a clone keeps it open until the clone is dropped).
    pub async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            if let Ok(conn) = Arc::try_unwrap(conn) {
                conn.shut().await;
            }
        }
    }

    /// Drops this client's connection, if any, and opens a new one. Streams of the old
    /// connection end with an error once nothing else holds it.
    pub async fn reconnect(&mut self) -> Result<()> {
        self.conn = None;
        let mut stream = open(&self.endpoint).await?;
        // Ends any partial line a previous host connection left in the agent's
        // buffer; the agent answers that garbage with an error under id 0,
        // which nobody waits for.
        stream.write_all(b"\n").await?;
        self.conn = Some(Conn::start(stream));
        Ok(())
    }

    /// Sends `health` until the agent answers or `timeout` passes, reconnecting
    /// when the transport fails. Each attempt uses a new id; late answers to
    /// earlier attempts are dropped. An agent of another protocol version is
    /// [`ClientError::ProtocolMismatch`].
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
            if !self.is_connected() {
                if let Err(e) = self.reconnect().await {
                    last_error = Some(e);
                    tokio::time::sleep(wait).await;
                    attempt = (attempt * 2).min(READY_MAX_ATTEMPT);
                    continue;
                }
            }
            match self.health(wait).await {
                Ok(health) => return Ok(health),
                Err(e @ ClientError::Timeout { .. }) => last_error = Some(e),
                Err(e @ (ClientError::Io(_) | ClientError::Closed)) => {
                    self.conn = None;
                    last_error = Some(e);
                    tokio::time::sleep(wait.min(Duration::from_millis(100))).await;
                }
                Err(e) => return Err(e),
            }
            attempt = (attempt * 2).min(READY_MAX_ATTEMPT);
        }
    }

    /// `health`: agent version, uptimes and protocol version; an agent of another
    /// protocol version is [`ClientError::ProtocolMismatch`].
    pub async fn health(&self, timeout: Duration) -> Result<HealthInfo> {
        let request = HealthRequest {
            protocol: Some(PROTOCOL_VERSION),
        };
        let health: HealthInfo = self.call(RequestBody::Health(request), timeout).await?;
        if health.protocol != PROTOCOL_VERSION {
            return Err(ClientError::ProtocolMismatch {
                agent: health.protocol,
                client: PROTOCOL_VERSION,
            });
        }
        Ok(health)
    }

    /// `list_interfaces`: the guest's network interfaces.
    pub async fn list_interfaces(&self, timeout: Duration) -> Result<Vec<InterfaceInfo>> {
        self.call(RequestBody::ListInterfaces, timeout).await
    }

    /// `set_clock`: sets the guest's wall clock to the host's now.
    pub async fn sync_clock(&self, timeout: Duration) -> Result<()> {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let _: crate::protocol::Done = self
            .call(
                RequestBody::SetClock(crate::protocol::SetClock { unix_ms }),
                timeout,
            )
            .await?;
        Ok(())
    }

    /// `seed_random`: mixes 64 bytes of the host's randomness into the guest's RNG, credited,
    /// and reseeds it.
    pub async fn seed_random(&self, timeout: Duration) -> Result<()> {
        use base64::Engine as _;
        let mut bytes = [0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .map_err(|e| {
                ClientError::Io(std::io::Error::new(
                    e.kind(),
                    format!("Reading /dev/urandom: {e}"),
                ))
            })?;
        let request = crate::protocol::SeedRandom {
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        };
        let _: crate::protocol::Done = self.call(RequestBody::SeedRandom(request), timeout).await?;
        Ok(())
    }

    /// `set_hostname`: sets the guest's hostname.
    pub async fn set_hostname(&self, hostname: &str, timeout: Duration) -> Result<()> {
        let request = crate::protocol::SetHostname {
            hostname: hostname.to_string(),
        };
        let _: crate::protocol::Done = self
            .call(RequestBody::SetHostname(request), timeout)
            .await?;
        Ok(())
    }

    /// `configure_interface`: addresses, MTU and routes of the NIC with `config.mac`.
    pub async fn configure_interface(
        &self,
        config: InterfaceConfig,
        timeout: Duration,
    ) -> Result<ConfiguredInterface> {
        self.call(RequestBody::ConfigureInterface(config), timeout)
            .await
    }

    /// `exec`: runs a program in the guest. Give `timeout` some slack over
    /// `request.timeout_ms`, which bounds the program itself.
    pub async fn exec(&self, request: ExecRequest, timeout: Duration) -> Result<ExecOutput> {
        self.call(RequestBody::Exec(request), timeout).await
    }

    fn conn(&self) -> Result<&Arc<Conn>> {
        self.conn
            .as_ref()
            .filter(|c| !c.shared.is_closed())
            .ok_or(ClientError::Closed)
    }

    /// Sends one request and waits up to `timeout` for the response with its id.
    /// Other calls may be in flight meanwhile.
    pub async fn call<T: DeserializeOwned>(
        &self,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<T> {
        let conn = self.conn()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request_name = body.name();
        let answer = conn.shared.expect(id);
        // Forgets the caller if this future is dropped or times out.
        let _pending = Pending { conn, id };
        if !conn.shared.send_line(to_line(&Request { id, body })) {
            return Err(ClientError::Closed);
        }
        let response = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(response)) => response,
            Ok(Err(_)) => return Err(ClientError::Closed),
            Err(_) => {
                return Err(ClientError::Timeout {
                    request: request_name,
                    id,
                    after: timeout,
                })
            }
        };
        response
            .into_result()
            .map_err(|message| ClientError::Agent {
                request: request_name,
                message,
            })
    }
}

struct Pending<'a> {
    conn: &'a Arc<Conn>,
    id: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.conn.shared.forget(self.id);
    }
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
