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
pub(crate) mod tests;
