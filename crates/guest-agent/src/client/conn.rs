//! One agent connection: a writer task that writes whole lines, and a reader task that
//! hands responses to their callers by id and stream frames to their streams.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::stream::StreamState;
use crate::protocol::{FrameKind, Response, StreamFrame};

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the tasks and the handles share.
pub(crate) struct Shared {
    lines: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    streams: Mutex<Streams>,
    closed: AtomicBool,
}

#[derive(Default)]
struct Streams {
    open: HashMap<u64, Arc<StreamState>>,
    /// Streams whose host handle is gone: late frames for them are dropped.
    retired: HashSet<u64>,
}

impl Shared {
    /// Queues one line (JSON and `\n`) for the writer task; `false` once the connection is closed.
    pub(crate) fn send_line(&self, line: String) -> bool {
        !self.is_closed() && self.lines.send(line.into_bytes()).is_ok()
    }

    pub(crate) fn send_frame(&self, frame: &StreamFrame) -> bool {
        self.send_line(crate::protocol::to_line(frame))
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The state of stream `id`, created on first use (frames may arrive before the
    /// handle that reads them exists).
    pub(crate) fn stream(&self, id: u64) -> Arc<StreamState> {
        let mut streams = lock(&self.streams);
        let state = Arc::clone(streams.open.entry(id).or_default());
        if self.is_closed() {
            state.break_off();
        }
        state
    }

    pub(crate) fn retire(&self, id: u64) {
        let mut streams = lock(&self.streams);
        streams.open.remove(&id);
        streams.retired.insert(id);
    }

    /// Registers a caller for the response with `id`.
    pub(crate) fn expect(&self, id: u64) -> oneshot::Receiver<Response> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if self.is_closed() {
            lock(&self.pending).clear();
        }
        rx
    }

    pub(crate) fn forget(&self, id: u64) {
        lock(&self.pending).remove(&id);
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.pending).clear();
        for state in lock(&self.streams).open.values() {
            state.break_off();
        }
    }

    fn on_line(&self, line: &[u8]) {
        if let Some(frame) = StreamFrame::parse(line) {
            let id = frame.stream;
            let Ok(kind) = frame.kind() else { return };
            let state = {
                let mut streams = lock(&self.streams);
                if streams.retired.contains(&id) {
                    return;
                }
                Arc::clone(streams.open.entry(id).or_default())
            };
            match kind {
                FrameKind::Data(bytes) => state.push(bytes),
                FrameKind::Eof => state.end(),
                FrameKind::Credit(n) => state.add_credit(n),
            }
            return;
        }
        // Anything else that is not a response (noise after a reconnect) is skipped,
        // as are responses nobody waits for (late answers to timed-out calls).
        if let Ok(response) = serde_json::from_slice::<Response>(line) {
            if let Some(tx) = lock(&self.pending).remove(&response.id) {
                let _ = tx.send(response);
            }
        }
    }
}

/// A live connection; dropping the last reference stops its tasks.
pub(crate) struct Conn {
    pub(crate) shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for task in [self.reader.take(), self.writer.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        self.shared.close();
    }
}

impl Conn {
    /// Stops the tasks and waits until they are gone, and with them the connection's socket
    /// (dropping a `Conn` only asks them to stop).
    pub(crate) async fn shut(mut self) {
        for task in [self.reader.take(), self.writer.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
            let _ = task.await;
        }
    }

    /// Starts the tasks on `stream`. Must run inside a tokio runtime.
    pub(crate) fn start<S>(stream: S) -> Arc<Conn>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            lines: tx,
            pending: Mutex::default(),
            streams: Mutex::default(),
            closed: AtomicBool::new(false),
        });
        let reader = tokio::spawn(read_lines(BufReader::new(read), Arc::clone(&shared)));
        let writer = tokio::spawn(write_lines(write, rx, Arc::clone(&shared)));
        Arc::new(Conn {
            shared,
            reader: Some(reader),
            writer: Some(writer),
        })
    }
}

async fn read_lines<R: AsyncRead + Unpin>(mut read: BufReader<R>, shared: Arc<Shared>) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => shared.on_line(&line),
        }
    }
    shared.close();
}

async fn write_lines<W: AsyncWrite + Unpin>(
    write: W,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    let mut write = BufWriter::new(write);
    while let Some(line) = lines.recv().await {
        let mut result = write.write_all(&line).await;
        // Flush only when nothing else is queued, so bursts go out in few writes.
        while result.is_ok() {
            match lines.try_recv() {
                Ok(line) => result = write.write_all(&line).await,
                Err(_) => break,
            }
        }
        if result.is_err() || write.flush().await.is_err() {
            break;
        }
    }
    shared.close();
}
