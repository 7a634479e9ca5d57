//! An async QMP client on tokio.
//!
//! QMP is line-delimited JSON over a Unix socket. This client speaks it with `serde_json`
//! directly rather than through the `qapi` crates: the runtime needs four things they do not
//! give together on tokio, namely commands matched to replies by `id` with a per-command
//! timeout, events fanned out to any number of waiters, `SCM_RIGHTS` fds on the very write that
//! carries `getfd`, and an error that says which command failed with QEMU's own `desc`.
//!
//! Two tasks own the socket. The writer task owns the write half: [`QmpClient::execute`]
//! hands it one complete line (and, for `getfd`, duplicates of the fds, sent on the first
//! segment of that line) through a channel, in one synchronous step. Dropping an `execute`
//! future therefore either queued the whole command or nothing, and never leaves half a line
//! on the socket. The reader task owns the read half: replies go to the waiting command by
//! `id`, events to every subscriber's own unbounded queue, so a slow subscriber loses none.
//!
//! Nothing is dropped silently. A line that is not JSON, or an error reply without an `id`
//! (QEMU's answer to a command it could not parse), cannot be matched to a command, so it
//! fails every pending command at once with [`QmpError::Unmatched`] naming the line. When the
//! connection ends (EOF, a read or write error), every pending command and every event
//! subscriber fails at once with [`QmpError::Closed`] giving the cause, and so does anything
//! issued afterwards.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting or talking to the socket failed.
    #[error("QMP I/O on {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// No answer in time.
    #[error("QMP command {command} got no answer within {timeout:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The limit.
        timeout: Duration,
    },
    /// The connection ended (usually: QEMU exited).
    #[error("the QMP connection closed while waiting for {waiting_for}: {reason}")]
    Closed {
        /// The reply or event that was awaited.
        waiting_for: String,
        /// Why the connection ended (`QEMU closed the socket`, a read or write error).
        reason: String,
    },
    /// QEMU sent something that cannot be matched to the awaited command: a line that is not
    /// JSON, or an error reply without an `id`.
    #[error("QMP command {command} failed: QEMU sent a message no command can claim: {line}")]
    Unmatched {
        /// The command that was waiting.
        command: String,
        /// The line QEMU sent.
        line: String,
    },
    /// QEMU sent something that is not QMP.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
}

impl QmpError {
    /// True when the connection is gone (QEMU exited or closed the monitor): nothing more can
    /// be asked on it.
    pub fn is_closed(&self) -> bool {
        matches!(self, QmpError::Closed { .. })
    }

    /// True when QEMU did not answer in time: the command may still run (QMP handles commands
    /// in order, so a later command's answer proves the earlier one ran).
    pub fn is_timeout(&self) -> bool {
        matches!(self, QmpError::Timeout { .. })
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, QmpError>;

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, such as `DEVICE_DELETED`.
    pub name: String,
    /// The event's `data` object (`Null` when absent).
    pub data: Value,
}

/// The events of one subscriber, queued without bound from the moment it subscribed; see
/// [`QmpClient::subscribe`]. Dropping it unsubscribes.
#[derive(Debug)]
pub struct QmpEvents {
    rx: mpsc::UnboundedReceiver<QmpEvent>,
}

impl QmpEvents {
    /// The next queued event, if any, without waiting.
    pub fn try_next(&mut self) -> Option<QmpEvent> {
        self.rx.try_recv().ok()
    }

    /// The next event, waiting for it; `None` once the connection ended and every event
    /// read before that was taken.
    pub async fn next(&mut self) -> Option<QmpEvent> {
        self.rx.recv().await
    }
}

/// What a pending command receives: its `return` value, or why it failed.
enum Reply {
    Return(Value),
    Error { class: String, desc: String },
    Unmatched(String),
}

/// State shared by the client, the reader and the writer, under one lock so that a command
/// or subscriber registered after the close is refused rather than forgotten.
#[derive(Default)]
struct Conn {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    subscribers: Vec<mpsc::UnboundedSender<QmpEvent>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

type Shared = Arc<Mutex<Conn>>;

fn lock(conn: &Shared) -> MutexGuard<'_, Conn> {
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks the connection closed with `reason`; dropping the pending senders and the
/// subscribers' queues wakes every waiter.
fn close(conn: &Shared, reason: String) {
    let mut c = lock(conn);
    if c.closed.is_none() {
        c.closed = Some(reason);
    }
    c.pending.clear();
    c.subscribers.clear();
}

/// One complete command line for the writer task, with the fds that travel on it.
struct Outgoing {
    line: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Removes a command's registration when its `execute` future ends or is dropped.
struct PendingGuard<'a> {
    conn: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(self.conn).pending.remove(&self.id);
    }
}

/// A connected, capability-negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    outgoing: mpsc::UnboundedSender<Outgoing>,
    conn: Shared,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// QEMU's version from the greeting, `major.minor.micro`.
    pub version: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("pending", &self.pending.len())
            .field("subscribers", &self.subscribers.len())
            .field("closed", &self.closed)
            .finish()
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl QmpClient {
    /// Connects to `path`, reads the greeting and enters command mode, all within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<QmpClient> {
        let what = format!("{}", path.display());
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Io {
                what: format!("connecting to {what}"),
                source,
            })?;
        tokio::time::timeout(timeout, Self::handshake(stream))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "qmp_capabilities".into(),
                timeout,
            })?
    }

    async fn handshake(stream: UnixStream) -> Result<QmpClient> {
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let mut greeting = String::new();
        let n = lines
            .read_line(&mut greeting)
            .await
            .map_err(|source| QmpError::Io {
                what: "reading the QMP greeting".into(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed {
                waiting_for: "the QMP greeting".into(),
                reason: "QEMU closed the socket".into(),
            });
        }
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|_| QmpError::Protocol(greeting.trim().to_string()))?;
        let v = &greeting["QMP"]["version"]["qemu"];
        if v.is_null() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        let version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);

        let conn: Shared = Arc::default();
        let (outgoing, queue) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(lines, conn.clone()));
        let writer = tokio::spawn(write_loop(write, queue, conn.clone()));
        let client = QmpClient {
            outgoing,
            conn,
            next_id: AtomicU64::new(1),
            reader,
            writer,
            version,
        };
        client
            .execute("qmp_capabilities", None, Duration::from_secs(5))
            .await?;
        Ok(client)
    }

    /// True once the connection ended (QEMU exited, or another client took over).
    pub fn is_closed(&self) -> bool {
        lock(&self.conn).closed.is_some()
    }

    /// Why the connection ended, once it has.
    pub fn closed_reason(&self) -> Option<String> {
        lock(&self.conn).closed.clone()
    }

    /// Subscribes to events: every event read from now on is queued for this subscriber until
    /// it takes it or drops the [`QmpEvents`]. Subscribe *before* issuing the command whose
    /// event you await.
    pub fn subscribe(&self) -> QmpEvents {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut c = lock(&self.conn);
        // After the close the sender is dropped here, so the subscriber sees the end at once.
        if c.closed.is_none() {
            // Subscribers that dropped their queue go now, not only when an event comes: a
            // quiet VM with many short-lived waiters (an unplug refused at once, a pause)
            // would otherwise keep every one.
            c.subscribers.retain(|s| !s.is_closed());
            c.subscribers.push(tx);
        }
        QmpEvents { rx }
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.execute_with_fds(command, arguments, &[], timeout)
            .await
    }

    /// Runs `command`, sending `fds` with `SCM_RIGHTS` on the same write (for `getfd` and
    /// `add-fd`).
    ///
    /// Cancellation-safe: the command is queued whole for the writer task before the first
    /// await, so dropping the future leaves the stream in sync; a late reply is discarded.
    pub async fn execute_with_fds(
        &self,
        command: &str,
        arguments: Option<Value>,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(command.into()));
        if let Some(args) = arguments {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), json!(id));
        let mut line = serde_json::to_vec(&Value::Object(msg)).expect("JSON values serialize");
        line.push(b'\n');
        // The writer sends after this call returns, so it needs fds of its own.
        let fds = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|source| QmpError::Io {
                what: format!("duplicating the fds passed with {command}"),
                source,
            })?;

        let (tx, rx) = oneshot::channel();
        {
            let mut c = lock(&self.conn);
            if let Some(reason) = &c.closed {
                return Err(QmpError::Closed {
                    waiting_for: format!("the reply to {command}"),
                    reason: reason.clone(),
                });
            }
            c.pending.insert(id, tx);
        }
        let _registered = PendingGuard {
            conn: &self.conn,
            id,
        };
        if self.outgoing.send(Outgoing { line, fds }).is_err() {
            return Err(self.closed_error(command));
        }
        let reply = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(self.closed_error(command)),
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: command.into(),
                    timeout,
                })
            }
        };
        match reply {
            Reply::Return(v) => Ok(v),
            Reply::Error { class, desc } => Err(QmpError::Command {
                command: command.into(),
                class,
                desc,
            }),
            Reply::Unmatched(line) => Err(QmpError::Unmatched {
                command: command.into(),
                line,
            }),
        }
    }

    fn closed_error(&self, waiting_for: &str) -> QmpError {
        QmpError::Closed {
            waiting_for: format!("the reply to {waiting_for}"),
            reason: self
                .closed_reason()
                .unwrap_or_else(|| "the QMP tasks ended".into()),
        }
    }

    /// Waits for an event named `name` whose data satisfies `matches`, on a subscription taken
    /// with [`subscribe`](Self::subscribe) before the triggering command. Events that arrived
    /// before the connection closed are still delivered; after them, the close is an error.
    pub async fn wait_event(
        &self,
        events: &mut QmpEvents,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent> {
        let wait = async {
            while let Some(ev) = events.rx.recv().await {
                if ev.name == name && matches(&ev.data) {
                    return Ok(ev);
                }
            }
            Err(QmpError::Closed {
                waiting_for: format!("event {name}"),
                reason: self
                    .closed_reason()
                    .unwrap_or_else(|| "the QMP tasks ended".into()),
            })
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QmpError::Timeout {
                command: format!("event {name}"),
                timeout,
            })?
    }
}

/// Writes each queued line whole, its fds on the first segment. A write error ends the
/// connection for everyone.
async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
    conn: Shared,
) {
    while let Some(Outgoing { line, fds }) = queue.recv().await {
        if let Err(e) = send(&mut writer, &line, &fds).await {
            close(&conn, format!("writing a command failed: {e}"));
            return;
        }
    }
}

async fn send(writer: &mut OwnedWriteHalf, line: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    if fds.is_empty() {
        return writer.write_all(line).await;
    }
    // The fds ride on the first segment; QEMU takes them with the command it parses.
    let stream: &UnixStream = writer.as_ref();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(std::os::fd::AsFd::as_fd).collect();
    let mut written = netdev::send_with_fds_async(stream, line, &borrowed).await?;
    while written < line.len() {
        written += netdev::send_with_fds_async(stream, &line[written..], &[]).await?;
    }
    Ok(())
}

async fn read_loop(mut lines: BufReader<OwnedReadHalf>, conn: Shared) {
    let mut line = String::new();
    let reason = loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) => break "QEMU closed the socket".to_string(),
            Err(e) => break format!("reading failed: {e}"),
            Ok(_) => {}
        }
        dispatch(&conn, line.trim_end());
    };
    close(&conn, reason);
}

/// Routes one line: an event to every subscriber, a reply to its command; anything that no
/// command can claim fails every pending command with the line.
fn dispatch(conn: &Shared, line: &str) {
    let mut c = lock(conn);
    let Ok(msg) = serde_json::from_str::<Value>(line) else {
        fail_pending(&mut c, line);
        return;
    };
    if let Some(name) = msg["event"].as_str() {
        let ev = QmpEvent {
            name: name.to_string(),
            data: msg["data"].clone(),
        };
        // A failed send means the subscriber dropped its queue: prune it.
        c.subscribers.retain(|s| s.send(ev.clone()).is_ok());
        return;
    }
    let Some(id) = msg["id"].as_u64() else {
        // Every command of this client carries an id: a reply without one is QEMU's answer to
        // a command it could not parse (an error), and it belongs to one of the pending.
        fail_pending(&mut c, line);
        return;
    };
    // A reply whose command timed out or was dropped: nobody waits for it.
    let Some(waiter) = c.pending.remove(&id) else {
        return;
    };
    let reply = if let Some(err) = msg.get("error") {
        Reply::Error {
            class: err["class"].as_str().unwrap_or("Unknown").to_string(),
            desc: err["desc"].as_str().unwrap_or_default().to_string(),
        }
    } else {
        Reply::Return(msg.get("return").cloned().unwrap_or(Value::Null))
    };
    let _ = waiter.send(reply);
}

fn fail_pending(c: &mut Conn, line: &str) {
    for (_, waiter) in c.pending.drain() {
        let _ = waiter.send(Reply::Unmatched(line.to_string()));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Hermetic tests against a scripted QEMU side on a socket pair.

    use std::io::{Seek, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;
    const LONG: Duration = Duration::from_secs(10);

    /// The QEMU end of a QMP connection, driven by the test: reads commands with any fds sent
    /// along (`recvmsg`), writes replies and events.
    pub(crate) struct FakeQemu {
        pub(crate) stream: UnixStream,
        buf: Vec<u8>,
        fds: Vec<OwnedFd>,
    }

    impl FakeQemu {
        pub(crate) async fn send(&mut self, msg: Value) {
            let mut line = msg.to_string().into_bytes();
            line.push(b'\n');
            self.stream
                .write_all(&line)
                .await
                .expect("writing to the client");
        }

        /// The next command, with the fds that arrived since the previous one.
        pub(crate) async fn recv(&mut self) -> (Value, Vec<OwnedFd>) {
            loop {
                if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=end).collect();
                    let msg = serde_json::from_slice(&line).expect("the client sends JSON");
                    return (msg, std::mem::take(&mut self.fds));
                }
                self.stream.readable().await.expect("readable");
                let mut chunk = [0u8; 4096];
                let fd = self.stream.as_raw_fd();
                match self.stream.try_io(tokio::io::Interest::READABLE, || {
                    recv_with_fds(fd, &mut chunk)
                }) {
                    Ok((0, _)) => panic!("the client closed the connection"),
                    Ok((n, fds)) => {
                        self.buf.extend_from_slice(&chunk[..n]);
                        self.fds.extend(fds);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("reading from the client: {e}"),
                }
            }
        }

        /// Reads the next command, checks its name, and returns its id.
        pub(crate) async fn expect(&mut self, command: &str) -> Value {
            let (msg, _) = self.recv().await;
            assert_eq!(msg["execute"], command, "{msg}");
            msg["id"].clone()
        }
    }

    /// `recvmsg` keeping any `SCM_RIGHTS` fds.
    fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
        // Room for 16 fds, aligned for `cmsghdr`.
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `msghdr` is plain data for which all-zeroes is a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `msg` points at `iov` and `control`, both alive and of the sizes given, for
        // the duration of the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        // SAFETY: the CMSG_* helpers walk the control buffer the kernel just filled and
        // `msg_controllen` bounds; every SCM_RIGHTS payload holds descriptors that were
        // installed in this process for us and that nothing else owns.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((n as usize, fds))
    }

    /// A client that went through the greeting and `qmp_capabilities` with a fake QEMU.
    pub(crate) async fn connected() -> (QmpClient, FakeQemu) {
        let (client, peer) = UnixStream::pair().expect("socketpair");
        let mut fake = FakeQemu {
            stream: peer,
            buf: Vec::new(),
            fds: Vec::new(),
        };
        let script = async {
            fake.stream
                .write_all(format!("{GREETING}\n").as_bytes())
                .await
                .expect("greeting");
            let (msg, fds) = fake.recv().await;
            assert_eq!(msg, json!({"execute": "qmp_capabilities", "id": 1}));
            assert!(fds.is_empty());
            fake.send(json!({"return": {}, "id": 1})).await;
        };
        let (client, ()) = tokio::join!(QmpClient::handshake(client), script);
        (client.expect("handshake"), fake)
    }

    #[tokio::test]
    async fn handshake_reads_the_greeting_and_negotiates_capabilities() {
        let (client, _fake) = connected().await;
        assert_eq!(client.version, "7.2.1");
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn a_greeting_that_is_not_qmp_is_a_protocol_error() {
        let (client, mut peer) = UnixStream::pair().unwrap();
        peer.write_all(b"{\"hello\": 1}\n").await.unwrap();
        let err = QmpClient::handshake(client).await.unwrap_err();
        assert!(matches!(err, QmpError::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn replies_are_matched_by_id_with_an_event_in_between() {
        let (client, mut fake) = connected().await;
        let mut events = client.subscribe();
        let script = async {
            let first = fake.expect("query-status").await;
            let second = fake.expect("query-name").await;
            fake.send(json!({"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}))
                .await;
            // Answered out of order.
            fake.send(json!({"return": {"name": "sb"}, "id": second}))
                .await;
            fake.send(json!({"return": {"running": true}, "id": first}))
                .await;
        };
        let first = client.execute("query-status", None, LONG);
        let second = async {
            // Issued once the first is on the wire, so the fake sees them in order.
            tokio::task::yield_now().await;
            client.execute("query-name", None, LONG).await
        };
        let (first, second, ()) = tokio::join!(first, second, script);
        assert_eq!(first.unwrap(), json!({"running": true}));
        assert_eq!(second.unwrap(), json!({"name": "sb"}));
        let ev = events.try_next().expect("the event was delivered");
        assert_eq!(ev.name, "RESUME");
    }

    #[tokio::test]
    async fn an_error_reply_names_the_command_and_qemus_message() {
        let (client, mut fake) = connected().await;
        let script = async {
            let id = fake.expect("device_add").await;
            fake.send(json!({"error": {"class": "GenericError", "desc": "Duplicate device ID 'dev-net1'"}, "id": id}))
                .await;
        };
        let (reply, ()) = tokio::join!(
            client.execute("device_add", Some(json!({"id": "dev-net1"})), LONG),
            script
        );
        match reply.unwrap_err() {
            QmpError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "device_add");
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "Duplicate device ID 'dev-net1'");
            }
            other => panic!("expected a command error, got {other}"),
        }
    }

    #[tokio::test]
    async fn a_command_without_answer_times_out_and_a_late_reply_is_dropped() {
        let (client, mut fake) = connected().await;
        let limit = Duration::from_millis(100);
        let (reply, stale) = tokio::join!(
            client.execute("query-status", None, limit),
            fake.expect("query-status")
        );
        match reply.unwrap_err() {
            QmpError::Timeout { command, timeout } => {
                assert_eq!(command, "query-status");
                assert_eq!(timeout, limit);
            }
            other => panic!("expected a timeout, got {other}"),
        }
        // The late reply must not be taken for the next command's.
        let script = async {
            fake.send(json!({"return": {"stale": true}, "id": stale}))
                .await;
            let id = fake.expect("query-name").await;
            fake.send(json!({"return": {"fresh": true}, "id": id}))
                .await;
        };
        let (reply, ()) = tokio::join!(client.execute("query-name", None, LONG), script);
        assert_eq!(reply.unwrap(), json!({"fresh": true}));
    }

    #[tokio::test]
    async fn an_event_reaches_every_waiter() {
        let (client, mut fake) = connected().await;
        let mut a = client.subscribe();
        let mut b = client.subscribe();
        let deleted = |d: &Value| d["device"] == "dev-net1";
        let script = async {
            fake.send(
                json!({"event": "DEVICE_DELETED", "data": {"device": "dev-other", "path": "/x"}}),
            )
            .await;
            fake.send(
                json!({"event": "DEVICE_DELETED", "data": {"device": "dev-net1", "path": "/y"}}),
            )
            .await;
        };
        let (ea, eb, ()) = tokio::join!(
            client.wait_event(&mut a, "DEVICE_DELETED", deleted, LONG),
            client.wait_event(&mut b, "DEVICE_DELETED", deleted, LONG),
            script
        );
        for ev in [ea.unwrap(), eb.unwrap()] {
            assert_eq!(ev.data["path"], "/y");
        }
    }

    #[tokio::test]
    async fn the_peer_closing_fails_pending_commands_and_waiters_with_closed() {
        let (client, mut fake) = connected().await;
        let mut events = client.subscribe();
        let script = async {
            fake.expect("system_powerdown").await;
            drop(fake);
        };
        let (reply, ev, ()) = tokio::join!(
            client.execute("system_powerdown", None, LONG),
            client.wait_event(&mut events, "SHUTDOWN", |_| true, LONG),
            script
        );
        assert!(matches!(reply, Err(QmpError::Closed { .. })), "{reply:?}");
        assert!(matches!(ev, Err(QmpError::Closed { .. })), "{ev:?}");
        assert!(client.is_closed());
        // A command after the close fails at once, not after its timeout.
        let late = tokio::time::timeout(
            Duration::from_secs(5),
            client.execute("query-status", None, Duration::from_secs(3600)),
        )
        .await
        .expect("a command on a closed connection returns at once");
        assert!(
            matches!(late, Err(QmpError::Closed { .. } | QmpError::Io { .. })),
            "{late:?}"
        );
    }

    #[tokio::test]
    async fn getfd_carries_the_fd_with_scm_rights() {
        let (client, mut fake) = connected().await;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"queue").unwrap();
        file.rewind().unwrap();
        let sent = file.metadata().unwrap();
        let script = async {
            let (msg, fds) = fake.recv().await;
            assert_eq!(msg["execute"], "getfd");
            assert_eq!(msg["arguments"], json!({"fdname": "fd-net1-0"}));
            fake.send(json!({"return": {}, "id": msg["id"]})).await;
            fds
        };
        let passed = [std::os::fd::AsFd::as_fd(&file)];
        let (reply, fds) = tokio::join!(
            client.execute_with_fds("getfd", Some(json!({"fdname": "fd-net1-0"})), &passed, LONG),
            script
        );
        reply.unwrap();
        assert_eq!(fds.len(), 1, "one fd arrives with getfd");
        let got = std::fs::File::from(fds.into_iter().next().unwrap())
            .metadata()
            .unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((got.dev(), got.ino()), (sent.dev(), sent.ino()));
        assert_eq!(got.len(), 5);
    }

    #[tokio::test]
    async fn a_dropped_execute_leaves_the_stream_in_sync_for_the_next_command() {
        let (client, mut fake) = connected().await;
        // Polled once (the command is queued), then dropped before any reply.
        let dropped = tokio::time::timeout(
            Duration::ZERO,
            client.execute("device_add", Some(json!({"id": "dev-net1"})), LONG),
        )
        .await;
        assert!(
            dropped.is_err(),
            "the command cannot have been answered yet"
        );
        let script = async {
            let (first, _) = fake.recv().await;
            assert_eq!(
                first["execute"], "device_add",
                "the dropped command went out whole"
            );
            assert_eq!(first["arguments"], json!({"id": "dev-net1"}));
            let next = fake.expect("query-status").await;
            // The dropped command's late reply comes first and must not be taken for the next.
            fake.send(json!({"return": {"late": true}, "id": first["id"]}))
                .await;
            fake.send(json!({"return": {"running": true}, "id": next}))
                .await;
        };
        let (reply, ()) = tokio::join!(client.execute("query-status", None, LONG), script);
        assert_eq!(reply.unwrap(), json!({"running": true}));
        assert_eq!(
            lock(&client.conn).pending.len(),
            0,
            "no registration outlives its command"
        );
    }

    /// Runs `command` while the fake answers with `line`, and returns the error and how long
    /// the command took.
    async fn failed_by(line: &str) -> (QmpError, Duration) {
        let (client, mut fake) = connected().await;
        let script = async {
            fake.expect("device_add").await;
            fake.stream
                .write_all(format!("{line}\n").as_bytes())
                .await
                .unwrap();
        };
        let began = std::time::Instant::now();
        let (reply, ()) = tokio::join!(client.execute("device_add", None, LONG), script);
        let took = began.elapsed();
        // The connection stays usable after such a line.
        let script = async {
            let id = fake.expect("query-status").await;
            fake.send(json!({"return": {}, "id": id})).await;
        };
        let (after, ()) = tokio::join!(client.execute("query-status", None, LONG), script);
        after.expect("the next command works");
        (reply.unwrap_err(), took)
    }

    #[tokio::test]
    async fn an_error_reply_without_id_fails_the_pending_command_at_once() {
        let line = r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'x'"}}"#;
        let (err, took) = failed_by(line).await;
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(matches!(err, QmpError::Unmatched { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("device_add"), "{text}");
        assert!(text.contains("JSON parse error, invalid keyword"), "{text}");
    }

    #[tokio::test]
    async fn a_line_that_is_not_json_fails_the_pending_command_at_once() {
        let (err, took) = failed_by("garbage {{ not qmp").await;
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(matches!(err, QmpError::Unmatched { .. }), "{err}");
        assert!(err.to_string().contains("garbage {{ not qmp"), "{err}");
    }

    #[tokio::test]
    async fn a_close_fails_every_command_and_subscriber_at_once_with_the_reason() {
        let (client, mut fake) = connected().await;
        let mut a = client.subscribe();
        let mut b = client.subscribe();
        let script = async {
            fake.expect("device_del").await;
            fake.expect("query-pci").await;
            drop(fake);
        };
        let began = std::time::Instant::now();
        let (r1, r2, e1, e2, ()) = tokio::join!(
            client.execute("device_del", None, LONG),
            async {
                tokio::task::yield_now().await;
                client.execute("query-pci", None, LONG).await
            },
            client.wait_event(&mut a, "DEVICE_DELETED", |_| true, LONG),
            client.wait_event(&mut b, "SHUTDOWN", |_| true, LONG),
            script
        );
        assert!(began.elapsed() < Duration::from_secs(2));
        for err in [
            r1.unwrap_err(),
            r2.unwrap_err(),
            e1.unwrap_err(),
            e2.unwrap_err(),
        ] {
            assert!(err.is_closed(), "{err}");
            assert!(err.to_string().contains("QEMU closed the socket"), "{err}");
        }
        // A subscriber that comes after the close learns it at once too.
        let mut late = client.subscribe();
        let err = client
            .wait_event(&mut late, "DEVICE_DELETED", |_| true, LONG)
            .await
            .unwrap_err();
        assert!(err.is_closed(), "{err}");
        assert_eq!(
            client.closed_reason().as_deref(),
            Some("QEMU closed the socket")
        );
    }

    #[tokio::test]
    async fn dropped_subscribers_are_pruned_without_any_event() {
        let (client, _fake) = connected().await;
        let kept = client.subscribe();
        for _ in 0..1000 {
            drop(client.subscribe());
        }
        assert_eq!(
            lock(&client.conn).subscribers.len(),
            2,
            "kept, and the last"
        );
        drop(kept);
    }

    #[tokio::test]
    async fn ten_thousand_events_reach_a_slow_subscriber_and_dropped_ones_are_pruned() {
        let (client, mut fake) = connected().await;
        let mut slow = client.subscribe();
        let gone = client.subscribe();
        drop(gone);
        const N: usize = 10_000;
        let script = async {
            let mut burst = String::new();
            for i in 0..N {
                burst.push_str(
                    &json!({"event": "DEVICE_DELETED", "data": {"device": format!("dev-{i}")}})
                        .to_string(),
                );
                burst.push('\n');
            }
            fake.stream.write_all(burst.as_bytes()).await.unwrap();
            // Replies are read after the events before them: this one proves all arrived.
            let id = fake.expect("query-status").await;
            fake.send(json!({"return": {}, "id": id})).await;
        };
        let (reply, ()) = tokio::join!(client.execute("query-status", None, LONG), script);
        reply.unwrap();
        assert_eq!(
            lock(&client.conn).subscribers.len(),
            1,
            "the dropped one is pruned"
        );
        // The last one is found by waiting; every one before it is still queued in order.
        let mut seen = 0;
        while let Some(ev) = slow.try_next() {
            assert_eq!(ev.data["device"], format!("dev-{seen}"));
            seen += 1;
        }
        assert_eq!(seen, N);
    }
}
