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
    // Dropping the senders wakes every waiter with `Closed`.
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
    closed.send_replace(true);
}
