//! The agent's serving side of the protocol: reads lines from a transport, runs each
//! request on its own thread through a [`Service`], writes responses and stream frames
//! through one writer, and moves process stdio over credit-limited streams.
//!
//! Synchronous (std threads), so the static agent needs no async runtime. The binary
//! `guest-agent` supplies the [`Service`] and the transports; tests drive [`serve`] over
//! a socketpair.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use serde::Serialize;

use crate::protocol::{to_line, FrameKind, Request, Response, StreamFrame, UNKNOWN_ID};

mod streams;

pub use streams::InputHandle;
use streams::{InputShared, OutputShared};

/// Longest line the agent reads; a longer one is answered with an error and dropped.
pub const MAX_LINE: usize = 1 << 20;

/// Pause after a read of 0 bytes on virtio-serial: no host is connected.
const HOST_ABSENT_POLL: Duration = Duration::from_millis(20);

/// What the agent does with requests. Called on a thread of its own per request, so a
/// call may block (waiting for a process) without holding up others.
pub trait Service: Send + Sync + 'static {
    /// Answers `request`. Streams the answer names are opened through `ctx`.
    fn handle(&self, request: Request, ctx: &RequestContext) -> Response;
}

/// What a read of 0 bytes means on a transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EofMeans {
    /// Virtio-serial: the host is not connected (now); wait for it, and end the streams
    /// of the previous host.
    HostAbsent,
    /// A socket connection: it is over.
    Closed,
}

/// One host connection as the agent sees it: the writer every response and frame goes
/// through, and the streams opened on it.
pub struct Connection {
    writer: Mutex<Box<dyn Write + Send>>,
    streams: Mutex<HashMap<u64, Stream>>,
}

#[derive(Clone)]
enum Stream {
    Output(Arc<OutputShared>),
    Input(Arc<InputShared>),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("streams", &lock(&self.streams).len())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Connection {
    /// A connection writing to `writer`.
    pub fn new(writer: Box<dyn Write + Send>) -> Arc<Self> {
        Arc::new(Connection {
            writer: Mutex::new(writer),
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// Writes `value` as one line; lines of concurrent writers never interleave.
    pub fn send<T: Serialize>(&self, value: &T) -> io::Result<()> {
        let line = to_line(value);
        let mut writer = lock(&self.writer);
        writer.write_all(line.as_bytes())?;
        writer.flush()
    }

    /// Ends every stream of this connection: output streams stop reading and close their
    /// descriptors, input streams close theirs. Called when the host goes away.
    pub fn reset_streams(&self) {
        let streams: Vec<Stream> = lock(&self.streams).drain().map(|(_, s)| s).collect();
        for stream in streams {
            match stream {
                Stream::Output(s) => s.cancel(),
                Stream::Input(s) => s.cancel(),
            }
        }
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        lock(&self.streams).len()
    }

    fn forget(&self, id: u64) {
        lock(&self.streams).remove(&id);
    }

    fn on_frame(&self, frame: StreamFrame) {
        let id = frame.stream;
        let stream = lock(&self.streams).get(&id).cloned();
        let kind = match frame.kind() {
            Ok(kind) => kind,
            Err(e) => return log(&e),
        };
        match (stream, kind) {
            (Some(Stream::Output(s)), FrameKind::Credit(n)) => s.add_credit(n),
            (Some(Stream::Output(s)), FrameKind::Eof) => {
                // The host will not read: stop reading, so the process sees a closed pipe.
                self.forget(id);
                s.cancel();
            }
            (Some(Stream::Input(s)), FrameKind::Data(bytes)) => {
                if let Err(e) = s.push(bytes) {
                    log(&e);
                }
            }
            (Some(Stream::Input(s)), FrameKind::Eof) => s.close(),
            (Some(_), kind) => log(&format!(
                "Stream {id}: unexpected {} frame for its direction",
                kind_name(&kind)
            )),
            // A stream that already ended (or never was): late credit is normal.
            (None, _) => {}
        }
    }
}

fn kind_name(kind: &FrameKind) -> &'static str {
    match kind {
        FrameKind::Data(_) => "data",
        FrameKind::Eof => "eof",
        FrameKind::Credit(_) => "credit",
    }
}

fn log(message: &str) {
    eprintln!("guest-agent: {message}");
}

/// Streams opened while serving one request. Output streams start reading once the host
/// grants credit; input streams are granted their first credit right after the response.
pub struct RequestContext {
    conn: Arc<Connection>,
    new_inputs: Mutex<Vec<Arc<InputShared>>>,
}

impl std::fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestContext").finish_non_exhaustive()
    }
}

impl RequestContext {
    /// A context for a request arriving on `conn`.
    pub fn new(conn: Arc<Connection>) -> Self {
        RequestContext {
            conn,
            new_inputs: Mutex::new(Vec::new()),
        }
    }

    /// Opens a stream from the agent to the host that carries what `fd` yields
    /// (a pipe's read end or a pty master) until end of file. Returns its id.
    pub fn add_output(&self, fd: OwnedFd) -> io::Result<u64> {
        let shared = OutputShared::start(&self.conn, fd)?;
        let id = shared.id();
        lock(&self.conn.streams).insert(id, Stream::Output(shared));
        Ok(id)
    }

    /// Opens a stream from the host to the agent whose data is written to `fd` (a pipe's
    /// write end or a pty master). The handle closes it ([`InputHandle::close`]).
    pub fn add_input(&self, fd: OwnedFd) -> io::Result<InputHandle> {
        let shared = InputShared::start(&self.conn, fd)?;
        lock(&self.conn.streams).insert(shared.id(), Stream::Input(Arc::clone(&shared)));
        lock(&self.new_inputs).push(Arc::clone(&shared));
        Ok(InputHandle::new(shared))
    }

    /// Grants the first credit of the input streams this request opened; called after
    /// the response is written, so the host knows the stream before its credit arrives.
    fn activate_inputs(&self) {
        for input in lock(&self.new_inputs).drain(..) {
            input.grant_initial();
        }
    }
}

/// Serves one transport until it closes (`Ok`) or fails (`Err`): reads lines from
/// `reader`, answers requests on threads of their own through `conn`, routes stream frames.
pub fn serve<R: Read>(
    reader: &mut R,
    conn: &Arc<Connection>,
    service: &Arc<dyn Service>,
    eof: EofMeans,
) -> io::Result<()> {
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            // A connection's host that went away; one that closed its socket with lines of
            // ours still unread resets the connection rather than ending it.
            Ok(0) if eof == EofMeans::Closed => {
                conn.reset_streams();
                return Ok(());
            }
            Err(e) if eof == EofMeans::Closed && e.kind() == io::ErrorKind::ConnectionReset => {
                conn.reset_streams();
                return Ok(());
            }
            Ok(0) => {
                pending.clear();
                conn.reset_streams();
                thread::sleep(HOST_ABSENT_POLL);
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(HOST_ABSENT_POLL);
                continue;
            }
            Err(e) => {
                conn.reset_streams();
                return Err(e);
            }
        };
        pending.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(len) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + len];
            start += len + 1;
            if !line.iter().all(u8::is_ascii_whitespace) {
                dispatch(line, conn, service)?;
            }
        }
        pending.drain(..start);
        if pending.len() > MAX_LINE {
            pending.clear();
            conn.send(&Response::error(
                UNKNOWN_ID,
                format!("Invalid request: line longer than {MAX_LINE} bytes"),
            ))?;
        }
    }
}

fn dispatch(line: &[u8], conn: &Arc<Connection>, service: &Arc<dyn Service>) -> io::Result<()> {
    if let Some(frame) = StreamFrame::parse(line) {
        conn.on_frame(frame);
        return Ok(());
    }
    let request = match parse_request(line) {
        Ok(request) => request,
        Err(response) => return conn.send(&response),
    };
    let (conn, service) = (Arc::clone(conn), Arc::clone(service));
    thread::Builder::new()
        .name(format!("request-{}", request.id))
        .spawn(move || {
            let ctx = RequestContext::new(Arc::clone(&conn));
            let response = service.handle(request, &ctx);
            match conn.send(&response) {
                Ok(()) => ctx.activate_inputs(),
                Err(e) => log(&format!("Writing the response {}: {e}", response.id)),
            }
        })
        .map(drop)
}

/// Parses a request line; an invalid one becomes the error response to send.
pub fn parse_request(line: &[u8]) -> Result<Request, Response> {
    match serde_json::from_slice::<Request>(line) {
        Ok(request) => Ok(request),
        Err(e) => resynchronize(line)
            .ok_or_else(|| Response::error(id_of(line), format!("Invalid request: {e}"))),
    }
}

/// A valid request at the end of an invalid line. Virtio-serial keeps no connection
/// boundaries: the start of a line from a host that disconnected mid-request can be
/// glued to the next host's first request.
fn resynchronize(line: &[u8]) -> Option<Request> {
    line.iter()
        .enumerate()
        .skip(1)
        .filter(|(_, &byte)| byte == b'{')
        .find_map(|(start, _)| serde_json::from_slice::<Request>(&line[start..]).ok())
}

/// The `id` of a line that is JSON but not a valid request, so the client can still
/// match the error; [`UNKNOWN_ID`] otherwise.
fn id_of(line: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|value| value.get("id")?.as_u64())
        .unwrap_or(UNKNOWN_ID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_glued_to_a_stale_partial_line_is_still_parsed() {
        let request =
            parse_request(b"{\"id\":901,\"type\":\"hea{\"id\":1,\"type\":\"health\"}").unwrap();
        assert_eq!(request.id, 1);
    }

    #[test]
    fn invalid_lines_answer_with_their_id_or_the_unknown_id() {
        let response = parse_request(br#"{"id":5,"type":"reboot"}"#).unwrap_err();
        assert_eq!(response.id, 5);
        let response = parse_request(b"\x00\x01not json").unwrap_err();
        assert_eq!(response.id, UNKNOWN_ID);
    }
}
