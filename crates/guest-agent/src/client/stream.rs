//! Host ends of process stdio streams: [`OutputStream`] (`AsyncRead`) and
//! [`InputStream`] (`AsyncWrite`), with the protocol's credit-based flow control.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::conn::{lock, Conn};
use crate::protocol::{StreamFrame, STREAM_CHUNK, STREAM_WINDOW};

/// Consumed bytes worth a new credit frame: a quarter of the window, so the agent
/// rarely runs dry while a reader keeps up.
const CREDIT_BATCH: u64 = STREAM_WINDOW / 4;

#[derive(Default)]
struct Inner {
    /// Received and not yet read (agent to host).
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the first chunk already read.
    offset: usize,
    buffered: usize,
    eof: bool,
    read_waker: Option<Waker>,
    /// Bytes the agent accepts (host to agent).
    credit: u64,
    write_waker: Option<Waker>,
    /// The connection is gone.
    broken: bool,
}

/// One stream's state, fed by the connection's reader task.
#[derive(Default)]
pub(crate) struct StreamState {
    inner: Mutex<Inner>,
}

impl StreamState {
    pub(crate) fn push(&self, bytes: Vec<u8>) {
        let mut inner = lock(&self.inner);
        inner.buffered += bytes.len();
        inner.chunks.push_back(bytes);
        if let Some(waker) = inner.read_waker.take() {
            waker.wake();
        }
    }

    pub(crate) fn end(&self) {
        let mut inner = lock(&self.inner);
        inner.eof = true;
        if let Some(waker) = inner.read_waker.take() {
            waker.wake();
        }
    }

    pub(crate) fn add_credit(&self, bytes: u64) {
        let mut inner = lock(&self.inner);
        inner.credit = inner.credit.saturating_add(bytes);
        if let Some(waker) = inner.write_waker.take() {
            waker.wake();
        }
    }

    pub(crate) fn break_off(&self) {
        let mut inner = lock(&self.inner);
        inner.broken = true;
        for waker in [inner.read_waker.take(), inner.write_waker.take()]
            .into_iter()
            .flatten()
        {
            waker.wake();
        }
    }
}

fn connection_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "agent connection closed")
}

/// Output of a process (stdout, stderr, or a terminal), read from the agent.
///
/// Reading grants the agent credit for more; while nothing reads, at most
/// [`STREAM_WINDOW`] bytes wait here and the process blocks on its full pipe.
/// Dropping the handle before the end tells the agent to stop reading (the process then
/// sees a closed pipe).
pub struct OutputStream {
    id: u64,
    state: Arc<StreamState>,
    conn: Arc<Conn>,
    /// Bytes read since the last credit frame.
    unacked: u64,
    ended: bool,
}

impl fmt::Debug for OutputStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputStream")
            .field("id", &self.id)
            .field("buffered", &self.buffered())
            .finish()
    }
}

impl OutputStream {
    /// Takes stream `id` and grants the agent its first window of credit.
    pub(crate) fn open(conn: &Arc<Conn>, id: u64) -> Self {
        let state = conn.shared.stream(id);
        conn.shared
            .send_frame(&StreamFrame::credit(id, STREAM_WINDOW));
        OutputStream {
            id,
            state,
            conn: Arc::clone(conn),
            unacked: 0,
            ended: false,
        }
    }

    /// The stream's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes received from the agent and not read yet (at most [`STREAM_WINDOW`]).
    pub fn buffered(&self) -> usize {
        lock(&self.state.inner).buffered
    }

    /// Copies the rest of the stream into the file or FIFO at `path` (opened for
    /// writing, created if missing); returns the bytes copied.
    pub async fn copy_to_path(mut self, path: impl AsRef<Path>) -> io::Result<u64> {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path.as_ref())
            .await?;
        let copied = tokio::io::copy(&mut self, &mut file).await?;
        file.flush().await?;
        Ok(copied)
    }
}

impl AsyncRead for OutputStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut inner = lock(&this.state.inner);
        let mut copied = 0;
        while buf.remaining() > 0 {
            let offset = inner.offset;
            let Some(front) = inner.chunks.front() else {
                break;
            };
            let n = (front.len() - offset).min(buf.remaining());
            buf.put_slice(&front[offset..offset + n]);
            copied += n;
            if offset + n == front.len() {
                inner.chunks.pop_front();
                inner.offset = 0;
            } else {
                inner.offset += n;
            }
        }
        if copied > 0 {
            inner.buffered -= copied;
            drop(inner);
            this.unacked += copied as u64;
            if this.unacked >= CREDIT_BATCH {
                this.conn
                    .shared
                    .send_frame(&StreamFrame::credit(this.id, this.unacked));
                this.unacked = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if inner.eof {
            this.ended = true;
            return Poll::Ready(Ok(()));
        }
        if inner.broken {
            return Poll::Ready(Err(connection_closed()));
        }
        inner.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        if !self.ended && !lock(&self.state.inner).eof {
            self.conn.shared.send_frame(&StreamFrame::eof(self.id));
        }
        self.conn.shared.retire(self.id);
    }
}

/// Input of a process (stdin, or a terminal's input), written to the agent.
///
/// A write sends at most the credit the agent granted, and waits for more when there is
/// none, so a process that does not read holds the writer back. Shutting the writer down
/// (or dropping it) ends the stream: the agent closes the process's stdin once what was
/// sent is written.
pub struct InputStream {
    id: u64,
    state: Arc<StreamState>,
    conn: Arc<Conn>,
    shut: bool,
}

impl fmt::Debug for InputStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InputStream").field("id", &self.id).finish()
    }
}

impl InputStream {
    pub(crate) fn open(conn: &Arc<Conn>, id: u64) -> Self {
        InputStream {
            id,
            state: conn.shared.stream(id),
            conn: Arc::clone(conn),
            shut: false,
        }
    }

    /// The stream's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Copies the file or FIFO at `path` into the stream until its end, then ends the
    /// stream; returns the bytes copied.
    pub async fn copy_from_path(mut self, path: impl AsRef<Path>) -> io::Result<u64> {
        let mut file = tokio::fs::File::open(path.as_ref()).await?;
        let copied = tokio::io::copy(&mut file, &mut self).await?;
        self.shutdown().await?;
        Ok(copied)
    }

    fn send_eof(&mut self) {
        if !self.shut {
            self.shut = true;
            self.conn.shared.send_frame(&StreamFrame::eof(self.id));
        }
    }
}

impl AsyncWrite for InputStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stream already shut down",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut inner = lock(&this.state.inner);
        if inner.broken {
            return Poll::Ready(Err(connection_closed()));
        }
        if inner.credit == 0 {
            inner.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf
            .len()
            .min(STREAM_CHUNK)
            .min(usize::try_from(inner.credit).unwrap_or(usize::MAX));
        inner.credit -= n as u64;
        drop(inner);
        if !this
            .conn
            .shared
            .send_frame(&StreamFrame::data(this.id, &buf[..n]))
        {
            return Poll::Ready(Err(connection_closed()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are queued whole for the connection's writer task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().send_eof();
        Poll::Ready(Ok(()))
    }
}

impl Drop for InputStream {
    fn drop(&mut self) {
        self.send_eof();
        self.conn.shared.retire(self.id);
    }
}
