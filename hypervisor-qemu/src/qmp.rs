//! An async QMP client on tokio.
//!
//! QMP is line-delimited JSON over a Unix socket. This client speaks it with `serde_json`
//! directly rather than through the `qapi` crates: the runtime needs four things they do not
//! give together on tokio, namely commands matched to replies by `id` with a per-command
//! timeout, events fanned out to any number of waiters, `SCM_RIGHTS` fds on the very write that
//! carries `getfd`, and an error that says which command failed with QEMU's own `desc`.
//!
//! One reader task owns the read half: replies go to the waiting command by `id`, events to a
//! broadcast channel. Writes are serialized by a mutex so an fd always travels with its own
//! command.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};
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
    /// The connection closed (usually: QEMU exited).
    #[error("the QMP connection closed while waiting for {0}")]
    Closed(String),
    /// QEMU sent something that is not QMP.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
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

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value>>>>>;

/// A connected, capability-negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    closed: watch::Receiver<bool>,
    reader: JoinHandle<()>,
    /// QEMU's version from the greeting, `major.minor.micro`.
    pub version: String,
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
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
            return Err(QmpError::Closed("the QMP greeting".into()));
        }
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|_| QmpError::Protocol(greeting.trim().to_string()))?;
        let v = &greeting["QMP"]["version"]["qemu"];
        if v.is_null() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        let version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);

        let (events, _) = broadcast::channel(256);
        let pending: Pending = Arc::default();
        let (closed_tx, closed) = watch::channel(false);
        let reader = tokio::spawn(read_loop(lines, pending.clone(), events.clone(), closed_tx));
        let client = QmpClient {
            writer: tokio::sync::Mutex::new(write),
            pending,
            events,
            next_id: AtomicU64::new(1),
            closed,
            reader,
            version,
        };
        client
            .execute("qmp_capabilities", None, Duration::from_secs(5))
            .await?;
        Ok(client)
    }

    /// True once QEMU closed the connection (it exited, or another client took over).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Subscribes to events. Subscribe *before* issuing the command whose event you await.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
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

        let (tx, rx) = oneshot::channel();
        self.lock_pending().insert(id, tx);
        // The reader marks the connection closed before it drops the pending senders, so a
        // command registered after that is answered here rather than by its timeout.
        if self.is_closed() {
            self.lock_pending().remove(&id);
            return Err(QmpError::Closed(format!("the reply to {command}")));
        }
        let sent = self.send(&line, fds).await;
        if let Err(e) = sent {
            self.lock_pending().remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply.map_err(|e| match e {
                QmpError::Command { class, desc, .. } => QmpError::Command {
                    command: command.into(),
                    class,
                    desc,
                },
                other => other,
            }),
            Ok(Err(_)) => Err(QmpError::Closed(format!("the reply to {command}"))),
            Err(_) => {
                self.lock_pending().remove(&id);
                Err(QmpError::Timeout {
                    command: command.into(),
                    timeout,
                })
            }
        }
    }

    /// Waits for an event named `name` whose data satisfies `matches`, on a receiver taken
    /// with [`subscribe`](Self::subscribe) before the triggering command.
    pub async fn wait_event(
        &self,
        rx: &mut broadcast::Receiver<QmpEvent>,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent> {
        let mut closed = self.closed.clone();
        let wait = async {
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Ok(ev) if ev.name == name && matches(&ev.data) => return Ok(ev),
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => {
                            return Err(QmpError::Closed(format!("event {name}")))
                        }
                    },
                    _ = closed.wait_for(|c| *c) => {
                        // Deliver what arrived before the close (QEMU's last events).
                        while let Ok(ev) = rx.try_recv() {
                            if ev.name == name && matches(&ev.data) {
                                return Ok(ev);
                            }
                        }
                        return Err(QmpError::Closed(format!("event {name}")));
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QmpError::Timeout {
                command: format!("event {name}"),
                timeout,
            })?
    }

    async fn send(&self, line: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let mut writer = self.writer.lock().await;
        let io_err = |source| QmpError::Io {
            what: "writing a QMP command".into(),
            source,
        };
        if fds.is_empty() {
            return writer.write_all(line).await.map_err(io_err);
        }
        // The fds ride on the first segment; QEMU takes them with the command it parses.
        let stream: &UnixStream = (*writer).as_ref();
        let mut written = netdev::send_with_fds_async(stream, line, fds)
            .await
            .map_err(|e| io_err(e.into()))?;
        while written < line.len() {
            written += netdev::send_with_fds_async(stream, &line[written..], &[])
                .await
                .map_err(|e| io_err(e.into()))?;
        }
        Ok(())
    }

    fn lock_pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Result<Value>>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn read_loop(
    mut lines: BufReader<OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(name) = msg["event"].as_str() {
            let _ = events.send(QmpEvent {
                name: name.to_string(),
                data: msg["data"].clone(),
            });
            continue;
        }
        let Some(id) = msg["id"].as_u64() else {
            continue;
        };
        let Some(waiter) = pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
        else {
            continue;
        };
        let reply = if let Some(err) = msg.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: err["class"].as_str().unwrap_or("Unknown").to_string(),
                desc: err["desc"].as_str().unwrap_or_default().to_string(),
            })
        } else {
            Ok(msg.get("return").cloned().unwrap_or(Value::Null))
        };
        let _ = waiter.send(reply);
    }
    // Closed first (see `execute_with_fds`), then dropping the senders wakes every waiter
    // with `Closed`.
    closed.send_replace(true);
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

#[cfg(test)]
mod tests {
    //! Hermetic tests against a scripted QEMU side on a socket pair.

    use std::io::{Seek, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;
    const LONG: Duration = Duration::from_secs(10);

    /// The QEMU end of a QMP connection, driven by the test: reads commands with any fds sent
    /// along (`recvmsg`), writes replies and events.
    struct FakeQemu {
        stream: UnixStream,
        buf: Vec<u8>,
        fds: Vec<OwnedFd>,
    }

    impl FakeQemu {
        async fn send(&mut self, msg: Value) {
            let mut line = msg.to_string().into_bytes();
            line.push(b'\n');
            self.stream
                .write_all(&line)
                .await
                .expect("writing to the client");
        }

        /// The next command, with the fds that arrived since the previous one.
        async fn recv(&mut self) -> (Value, Vec<OwnedFd>) {
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
        async fn expect(&mut self, command: &str) -> Value {
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
    async fn connected() -> (QmpClient, FakeQemu) {
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
        let ev = events.try_recv().expect("the event was delivered");
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
        assert!(matches!(reply, Err(QmpError::Closed(_))), "{reply:?}");
        assert!(matches!(ev, Err(QmpError::Closed(_))), "{ev:?}");
        assert!(client.is_closed());
        // A command after the close fails at once, not after its timeout.
        let late = tokio::time::timeout(
            Duration::from_secs(5),
            client.execute("query-status", None, Duration::from_secs(3600)),
        )
        .await
        .expect("a command on a closed connection returns at once");
        assert!(
            matches!(late, Err(QmpError::Closed(_) | QmpError::Io { .. })),
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
}
