//! Hermetic tests of protocol 2: the client against the agent's serving loop
//! (`guest_agent::server`) over a socketpair, no VM. The service runs host processes
//! (and in-process producers) with piped stdio in place of containers, so framing,
//! demultiplexing and flow control are exercised end to end.
#![cfg(feature = "client")]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use guest_agent::client::{AgentClient, ClientError};
use guest_agent::protocol::{
    CreateContainer, Done, HealthInfo, ProcessCreated, ProcessExit, Request, RequestBody, Response,
    SignalProcess, StdioRequest, StreamIds, PROTOCOL_VERSION, STREAM_CHUNK, STREAM_WINDOW,
};
use guest_agent::server::{serve, Connection, EofMeans, InputHandle, RequestContext, Service};
use nix::fcntl::{fcntl, FcntlArg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CALL: Duration = Duration::from_secs(10);

type Exit = Arc<(Mutex<Option<ProcessExit>>, Condvar)>;

/// Pid, exit record and stdin of a process.
type Proc = (u32, Exit, Option<InputHandle>);

/// Host processes standing in for containers: `args` of the spec's `process` run with
/// pipes. `["@produce", N]` is a producer thread writing N pattern bytes into a pipe and
/// counting them in `produced`.
struct Processes {
    protocol: u32,
    produced: Arc<AtomicU64>,
    procs: Mutex<HashMap<String, Proc>>,
}

fn exited(exit: &Exit, status: ProcessExit) {
    *exit.0.lock().unwrap() = Some(status);
    exit.1.notify_all();
}

impl Processes {
    fn new(protocol: u32) -> Arc<Self> {
        Arc::new(Processes {
            protocol,
            produced: Arc::new(AtomicU64::new(0)),
            procs: Mutex::new(HashMap::new()),
        })
    }

    fn create(
        &self,
        create: CreateContainer,
        ctx: &RequestContext,
    ) -> Result<ProcessCreated, String> {
        let spec: serde_json::Value =
            serde_json::from_str(&create.spec).map_err(|e| e.to_string())?;
        let args: Vec<String> =
            serde_json::from_value(spec["process"]["args"].clone()).map_err(|e| e.to_string())?;
        let exit: Exit = Arc::default();
        let (pid, stdin, stdout, stderr): (u32, Option<OwnedFd>, OwnedFd, Option<OwnedFd>) =
            if args[0] == "@produce" {
                let total: u64 = args[1].parse().unwrap();
                let (read, write) = nix::unistd::pipe().map_err(|e| e.to_string())?;
                let mut write = std::fs::File::from(write);
                let (produced, exit) = (Arc::clone(&self.produced), Arc::clone(&exit));
                thread::spawn(move || {
                    let mut pattern = Pattern::new(7);
                    let mut chunk = vec![0u8; 4096];
                    let mut sent = 0;
                    while sent < total {
                        let n = chunk.len().min((total - sent) as usize);
                        pattern.fill(&mut chunk[..n]);
                        if write.write_all(&chunk[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                        produced.store(sent, Ordering::SeqCst);
                    }
                    drop(write);
                    exited(
                        &exit,
                        ProcessExit {
                            exit_code: Some(0),
                            signal: None,
                            exited_at_ms: 1,
                        },
                    );
                });
                (0, None, read, None)
            } else if create.stdio.terminal {
                let size = nix::pty::Winsize {
                    ws_row: create.stdio.rows.unwrap_or(24),
                    ws_col: create.stdio.cols.unwrap_or(80),
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                let pty = nix::pty::openpty(Some(&size), None).map_err(|e| e.to_string())?;
                let slave = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
                let mut child = Command::new(&args[0])
                    .args(&args[1..])
                    .stdin(slave(&pty.slave))
                    .stdout(slave(&pty.slave))
                    .stderr(slave(&pty.slave))
                    .spawn()
                    .map_err(|e| format!("Starting {:?}: {e}", args[0]))?;
                drop(pty.slave);
                let (pid, exit) = (child.id(), Arc::clone(&exit));
                thread::spawn(move || {
                    let status = child.wait().unwrap();
                    exited(
                        &exit,
                        ProcessExit {
                            exit_code: status.code(),
                            signal: status.signal(),
                            exited_at_ms: 1,
                        },
                    );
                });
                let input = create.stdio.stdin.then(|| pty.master.try_clone().unwrap());
                (pid, input, pty.master, None)
            } else {
                let mut child = Command::new(&args[0])
                    .args(&args[1..])
                    .stdin(if create.stdio.stdin {
                        Stdio::piped()
                    } else {
                        Stdio::null()
                    })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("Starting {:?}: {e}", args[0]))?;
                let stdin = child.stdin.take().map(OwnedFd::from);
                let stdout = OwnedFd::from(child.stdout.take().unwrap());
                let stderr = child.stderr.take().map(OwnedFd::from);
                let (pid, exit) = (child.id(), Arc::clone(&exit));
                thread::spawn(move || {
                    let status = child.wait().unwrap();
                    exited(
                        &exit,
                        ProcessExit {
                            exit_code: status.code(),
                            signal: status.signal(),
                            exited_at_ms: 1,
                        },
                    );
                });
                (pid, stdin, stdout, stderr)
            };
        let mut streams = StreamIds {
            stdout: Some(ctx.add_output(stdout).map_err(|e| e.to_string())?),
            ..StreamIds::default()
        };
        if let Some(stderr) = stderr {
            streams.stderr = Some(ctx.add_output(stderr).map_err(|e| e.to_string())?);
        }
        let stdin = match stdin {
            Some(fd) => Some(ctx.add_input(fd).map_err(|e| e.to_string())?),
            None => None,
        };
        streams.stdin = stdin.as_ref().map(InputHandle::id);
        self.procs
            .lock()
            .unwrap()
            .insert(create.container_id, (pid, exit, stdin));
        Ok(ProcessCreated { pid, streams })
    }

    fn exit_of(&self, id: &str) -> Result<Exit, String> {
        let procs = self.procs.lock().unwrap();
        let (_, exit, _) = procs.get(id).ok_or(format!("No container {id}"))?;
        Ok(Arc::clone(exit))
    }
}

impl Service for Processes {
    fn handle(&self, request: Request, ctx: &RequestContext) -> Response {
        let id = request.id;
        let reply = |r: Result<serde_json::Value, String>| match r {
            Ok(v) => Response::ok(id, &v),
            Err(e) => Response::error(id, e),
        };
        let json = |v: &dyn erased::Ser| serde_json::to_value(v.value()).map_err(|e| e.to_string());
        match request.body {
            RequestBody::Health(_) => Response::ok(
                id,
                &HealthInfo {
                    version: "test".into(),
                    uptime_ms: 1,
                    agent_uptime_ms: 1,
                    protocol: self.protocol,
                },
            ),
            RequestBody::CreateContainer(c) => reply(self.create(c, ctx).and_then(|r| json(&r))),
            RequestBody::WaitProcess(p) => reply(self.exit_of(&p.container_id).and_then(|exit| {
                let mut status = exit.0.lock().unwrap();
                while status.is_none() {
                    status = exit.1.wait(status).unwrap();
                }
                json(&status.unwrap())
            })),
            RequestBody::SignalProcess(s) => {
                let pid = self.procs.lock().unwrap()[&s.container_id].0;
                let signal = nix::sys::signal::Signal::try_from(s.signal).unwrap();
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
                reply(json(&Done {}))
            }
            RequestBody::CloseStdin(p) => {
                if let Some(stdin) = self
                    .procs
                    .lock()
                    .unwrap()
                    .get_mut(&p.container_id)
                    .and_then(|e| e.2.take())
                {
                    stdin.close();
                }
                reply(json(&Done {}))
            }
            other => Response::error(id, format!("{} is not served here", other.name())),
        }
    }
}

/// Serialize-to-Value for the closures above without naming each type.
mod erased {
    pub trait Ser {
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

/// Deterministic bytes (xorshift), so a receiver can check every byte.
struct Pattern(u64);

impl Pattern {
    fn new(seed: u64) -> Self {
        Pattern(seed)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *byte = self.0 as u8;
        }
    }
}

/// FNV-1a over everything fed to it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Checksum(u64, u64);

impl Checksum {
    fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325, 0)
    }
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        self.1 += bytes.len() as u64;
    }
}

/// An agent loop on a thread, serving one end of a socketpair.
struct Agent {
    conn: Arc<Connection>,
    socket: StdUnixStream,
    thread: Option<thread::JoinHandle<()>>,
}

impl Agent {
    fn start(service: Arc<dyn Service>) -> (Agent, AgentClient) {
        let (agent_end, host_end) = StdUnixStream::pair().unwrap();
        let mut reader = agent_end.try_clone().unwrap();
        let socket = agent_end.try_clone().unwrap();
        let conn = Connection::new(Box::new(agent_end));
        let thread_conn = Arc::clone(&conn);
        let thread = thread::spawn(move || {
            serve(&mut reader, &thread_conn, &service, EofMeans::Closed).unwrap();
        });
        host_end.set_nonblocking(true).unwrap();
        let client = AgentClient::over(tokio::net::UnixStream::from_std(host_end).unwrap());
        (
            Agent {
                conn,
                socket,
                thread: Some(thread),
            },
            client,
        )
    }

    /// The agent's side hangs up, as a guest that goes away.
    fn hang_up(&self) {
        self.socket.shutdown(std::net::Shutdown::Both).unwrap();
    }

    /// Drops the client and checks the loop ended and left no stream behind.
    async fn finish(mut self, client: AgentClient) {
        drop(client);
        // The client's tasks end (closing the socket) on the runtime; join off it.
        let thread = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        assert_eq!(self.conn.stream_count(), 0, "streams left behind");
    }
}

fn create(id: &str, args: &[&str], stdin: bool) -> CreateContainer {
    CreateContainer {
        container_id: id.into(),
        rootfs: "/".into(),
        spec: serde_json::json!({"process": {"args": args}}).to_string(),
        stdio: StdioRequest {
            stdin,
            ..StdioRequest::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_go_through_stdin_and_back_through_stdout_intact() {
    const TOTAL: u64 = 64 << 20;
    let (agent, client) = Agent::start(Processes::new(PROTOCOL_VERSION));
    let process = client
        .create_container(create("cat", &["cat"], true), CALL)
        .await
        .unwrap();
    let (mut stdin, mut stdout) = (process.stdin.unwrap(), process.stdout.unwrap());

    let writer = tokio::spawn(async move {
        let (mut pattern, mut sum) = (Pattern::new(42), Checksum::new());
        let mut chunk = vec![0u8; 100_000];
        let mut sent = 0;
        while sent < TOTAL {
            let n = chunk.len().min((TOTAL - sent) as usize);
            pattern.fill(&mut chunk[..n]);
            stdin.write_all(&chunk[..n]).await.unwrap();
            sum.feed(&chunk[..n]);
            sent += n as u64;
        }
        stdin.shutdown().await.unwrap();
        sum
    });
    let mut received = Checksum::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = stdout.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(stdout.buffered() as u64 <= STREAM_WINDOW);
        received.feed(&buf[..n]);
    }
    let sent = writer.await.unwrap();
    assert_eq!(sent.1, TOTAL);
    assert_eq!(received, sent, "byte count and checksum of what came back");
    let exit = client.wait_process("cat", None, CALL).await.unwrap();
    assert_eq!((exit.exit_code, exit.signal), (Some(0), None));
    drop((stdout, process.stderr));
    agent.finish(client).await;
}

/// Bytes the kernel buffers in a pipe like the producer's.
fn pipe_capacity() -> u64 {
    let (read, _write) = nix::unistd::pipe().unwrap();
    fcntl(read.as_fd(), FcntlArg::F_GETPIPE_SZ).unwrap() as u64
}

/// Waits until `value()` stops changing (three equal samples 20 ms apart), at most 10 s.
async fn settled(value: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut last, mut same) = (value(), 0);
    while same < 3 {
        assert!(Instant::now() < deadline, "never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = value();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_stops_the_producer_instead_of_growing_buffers() {
    const TOTAL: u64 = 16 << 20;
    let service = Processes::new(PROTOCOL_VERSION);
    let produced = Arc::clone(&service.produced);
    let (agent, client) = Agent::start(service);
    let process = client
        .create_container(create("p", &["@produce", &TOTAL.to_string()], false), CALL)
        .await
        .unwrap();
    let mut stdout = process.stdout.unwrap();
    // Bytes the producer may be ahead of the reader: the client's window, the pipe, and
    // the chunk the agent holds between reading the pipe and writing the frame.
    let bound = STREAM_WINDOW + pipe_capacity() + STREAM_CHUNK as u64;

    let mut consumed = 0u64;
    let mut check = Pattern::new(7);
    let mut expected = vec![0u8; 65536];
    let mut buf = vec![0u8; 65536];
    for round in 0..4 {
        let ahead = settled(|| produced.load(Ordering::SeqCst)).await - consumed;
        assert!(
            ahead <= bound,
            "round {round}: producer {ahead} bytes ahead of the reader, bound {bound}"
        );
        assert!(
            ahead >= STREAM_WINDOW,
            "round {round}: only {ahead} bytes ahead: credit not used"
        );
        assert!(stdout.buffered() as u64 <= STREAM_WINDOW);
        // Read a little, slowly.
        let mut taken = 0;
        while taken < 3 * STREAM_WINDOW {
            let n = stdout.read(&mut buf).await.unwrap();
            check.fill(&mut expected[..n]);
            assert_eq!(buf[..n], expected[..n]);
            taken += n as u64;
        }
        consumed += taken;
    }
    // Then the rest at full speed.
    loop {
        let n = stdout.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        check.fill(&mut expected[..n]);
        assert_eq!(buf[..n], expected[..n]);
        consumed += n as u64;
    }
    assert_eq!(consumed, TOTAL);
    drop(stdout);
    agent.finish(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_credit_holds_the_host_writer_while_the_process_does_not_read() {
    let (agent, client) = Agent::start(Processes::new(PROTOCOL_VERSION));
    let process = client
        .create_container(create("s", &["sleep", "30"], true), CALL)
        .await
        .unwrap();
    let mut stdin = process.stdin.unwrap();
    let chunk = vec![b'x'; 8192];
    let mut accepted = 0u64;
    let stalled = loop {
        match tokio::time::timeout(Duration::from_millis(500), stdin.write(&chunk)).await {
            Ok(n) => accepted += n.unwrap() as u64,
            Err(_) => break accepted,
        }
        assert!(accepted < 16 << 20, "the writer was never held back");
    };
    let bound = STREAM_WINDOW + pipe_capacity() + STREAM_CHUNK as u64;
    assert!(stalled >= STREAM_WINDOW, "only {stalled} bytes accepted");
    assert!(stalled <= bound, "{stalled} bytes accepted, bound {bound}");

    let kill = SignalProcess {
        container_id: "s".into(),
        exec_id: None,
        signal: 9,
        all: false,
    };
    client.signal_process(kill, CALL).await.unwrap();
    let exit = client.wait_process("s", None, CALL).await.unwrap();
    assert_eq!(exit.signal, Some(9));
    drop((stdin, process.stdout, process.stderr));
    agent.finish(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_wait_does_not_hold_up_other_calls() {
    let (agent, client) = Agent::start(Processes::new(PROTOCOL_VERSION));
    let process = client
        .create_container(create("w", &["sleep", "30"], false), CALL)
        .await
        .unwrap();
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .wait_process("w", None, Duration::from_secs(60))
                .await
        })
    };
    // While the wait is in flight, other calls are answered.
    for _ in 0..3 {
        let started = Instant::now();
        client.health(CALL).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    assert!(
        !waiter.is_finished(),
        "the wait returned before the process ended"
    );
    let term = SignalProcess {
        container_id: "w".into(),
        exec_id: None,
        signal: 15,
        all: false,
    };
    client.signal_process(term, CALL).await.unwrap();
    let exit = waiter.await.unwrap().unwrap();
    assert_eq!((exit.exit_code, exit.signal), (None, Some(15)));
    drop((process.stdout, process.stderr));
    agent.finish(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_copies_to_and_from_fifos_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let (stdin_fifo, stdout_fifo, stderr_file) = (
        dir.path().join("in"),
        dir.path().join("out"),
        dir.path().join("err.log"),
    );
    for fifo in [&stdin_fifo, &stdout_fifo] {
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }
    let (agent, client) = Agent::start(Processes::new(PROTOCOL_VERSION));
    let process = client
        .create_container(
            create("f", &["sh", "-c", "cat; echo err >&2; exit 3"], true),
            CALL,
        )
        .await
        .unwrap();
    // The other ends of the FIFOs, as containerd would hold them.
    let feeder = {
        let path = stdin_fifo.clone();
        thread::spawn(move || std::fs::write(path, b"hello\nworld\n").unwrap())
    };
    let drainer = {
        let path = stdout_fifo.clone();
        thread::spawn(move || {
            let mut text = String::new();
            std::fs::File::open(path)
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            text
        })
    };
    let copied_in = process.stdin.unwrap().copy_from_path(&stdin_fifo);
    let copied_out = process.stdout.unwrap().copy_to_path(&stdout_fifo);
    let copied_err = process.stderr.unwrap().copy_to_path(&stderr_file);
    let (copied_in, copied_out, copied_err) = tokio::join!(copied_in, copied_out, copied_err);
    assert_eq!(
        (copied_in.unwrap(), copied_out.unwrap(), copied_err.unwrap()),
        (12, 12, 4)
    );
    feeder.join().unwrap();
    assert_eq!(drainer.join().unwrap(), "hello\nworld\n");
    assert_eq!(std::fs::read_to_string(&stderr_file).unwrap(), "err\n");
    let exit = client.wait_process("f", None, CALL).await.unwrap();
    assert_eq!(exit.exit_code, Some(3));
    agent.finish(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_carries_input_and_output_and_ends_when_the_process_exits() {
    let (agent, client) = Agent::start(Processes::new(PROTOCOL_VERSION));
    let mut request = create("t", &["sh", "-c", "stty size; read x; echo got $x"], true);
    request.stdio.terminal = true;
    request.stdio.rows = Some(33);
    request.stdio.cols = Some(101);
    let process = client.create_container(request, CALL).await.unwrap();
    assert!(process.stderr.is_none(), "a terminal has no stderr stream");
    let (mut input, mut output) = (process.stdin.unwrap(), process.stdout.unwrap());
    input.write_all(b"hi\n").await.unwrap();
    let mut text = String::new();
    // Ends when the shell exits and the pty's last slave closes (EIO on the master).
    output.read_to_string(&mut text).await.unwrap();
    assert!(text.contains("33 101"), "{text:?}");
    assert!(text.contains("got hi"), "{text:?}");
    let exit = client.wait_process("t", None, CALL).await.unwrap();
    assert_eq!(exit.exit_code, Some(0));
    drop((input, output));
    agent.finish(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_goes_away_ends_its_streams_and_the_process_sees_stdin_close() {
    let service = Processes::new(PROTOCOL_VERSION);
    let (agent, client) = Agent::start(Arc::clone(&service) as Arc<dyn Service>);
    let process = client
        .create_container(create("gone", &["cat"], true), CALL)
        .await
        .unwrap();
    assert_eq!(agent.conn.stream_count(), 3);
    // The connection ends while the host holds every stream open (the socket is shut
    // down, as when the host process dies).
    agent.hang_up();
    let held = (process.stdin, process.stdout, process.stderr);
    let exit = service.exit_of("gone").unwrap();
    // The agent closed cat's stdin (and its output pipes), so cat ends.
    let status = tokio::task::spawn_blocking(move || {
        let (status, _) = exit
            .1
            .wait_timeout_while(exit.0.lock().unwrap(), Duration::from_secs(10), |s| {
                s.is_none()
            })
            .unwrap();
        *status
    })
    .await
    .unwrap();
    assert_eq!(status.map(|s| s.exit_code), Some(Some(0)));
    // The host's handles fail rather than wait forever.
    let (stdin, stdout, stderr) = held;
    let error = stdout.unwrap().read(&mut [0u8; 16]).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe);
    assert!(stdin.unwrap().write_all(b"late").await.is_err());
    drop(stderr);
    agent.finish(client).await;
}

#[tokio::test]
async fn an_agent_of_another_protocol_is_named() {
    let (agent, client) = Agent::start(Processes::new(1));
    let error = client.health(CALL).await.unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::ProtocolMismatch {
                agent: 1,
                client: 3
            }
        ),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "The agent speaks protocol 1; this client speaks protocol 3"
    );
    agent.finish(client).await;
}

#[tokio::test]
async fn unknown_requests_and_calls_after_the_agent_went_away_are_errors() {
    let (agent, client) = Agent::start(Processes::new(PROTOCOL_VERSION));
    let error = client.list_processes("nope", CALL).await.unwrap_err();
    assert!(
        matches!(error, ClientError::Agent { request: "list_processes", ref message } if message == "list_processes is not served here"),
        "{error:?}"
    );
    agent.hang_up();
    let error = loop {
        // The client notices the hang-up when its reader sees the end of the stream.
        match client.health(CALL).await {
            Ok(_) => tokio::task::yield_now().await,
            Err(e) => break e,
        }
    };
    assert!(matches!(error, ClientError::Closed), "{error:?}");
    agent.finish(client).await;
}

#[test]
fn a_host_that_closes_with_answers_unread_ends_its_connection_cleanly() {
    let (agent_end, mut host_end) = StdUnixStream::pair().unwrap();
    let mut reader = agent_end.try_clone().unwrap();
    let conn = Connection::new(Box::new(agent_end));
    let service: Arc<dyn Service> = Processes::new(PROTOCOL_VERSION);
    let served = thread::spawn(move || serve(&mut reader, &conn, &service, EofMeans::Closed));
    host_end
        .write_all(b"{\"id\":1,\"type\":\"health\"}\n")
        .unwrap();
    // The answer waits, unread, in the host's buffer when the host closes: the agent's next
    // read is a connection reset, which is the host going away, not a failure.
    let mut ready = [nix::poll::PollFd::new(
        host_end.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let n = nix::poll::poll(&mut ready, nix::poll::PollTimeout::from(5000u16)).unwrap();
    assert_eq!(n, 1, "the agent answered");
    drop(host_end);
    served.join().unwrap().expect("serve ends without an error");
}
