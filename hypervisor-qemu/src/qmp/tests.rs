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
        fake.send(
            json!({"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}),
        )
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
        fake.send(json!({"event": "DEVICE_DELETED", "data": {"device": "dev-net1", "path": "/y"}}))
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
    let line =
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'x'"}}"#;
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
