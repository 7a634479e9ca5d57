//! Hermetic tests of `AgentClient` against a scripted fake agent on a Unix socket.
#![cfg(feature = "client")]

use std::time::Duration;

use guest_agent::client::{AgentClient, ClientError};
use guest_agent::protocol::{to_line, HealthInfo, Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Next request line, skipping the blank lines clients send to resynchronize.
async fn next_request(
    lines: &mut tokio::io::Lines<impl tokio::io::AsyncBufRead + Unpin>,
) -> Request {
    loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("client closed the connection");
        if !line.trim().is_empty() {
            return serde_json::from_str(&line).unwrap();
        }
    }
}

fn health() -> HealthInfo {
    HealthInfo {
        version: "test".into(),
        uptime_ms: 1,
        agent_uptime_ms: 1,
        protocol: guest_agent::protocol::PROTOCOL_VERSION,
    }
}

#[tokio::test]
async fn wait_ready_resends_and_skips_stale_and_garbage_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let agent = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        // Like a guest that opens its port late: the first two requests go unanswered.
        let first: Request = next_request(&mut lines).await;
        let second: Request = next_request(&mut lines).await;
        assert!(second.id > first.id, "each attempt uses a new id");
        let third: Request = next_request(&mut lines).await;
        // Then noise, a stale answer, and the real one.
        write.write_all(b"{\"partial\n").await.unwrap();
        write
            .write_all(to_line(&Response::ok(first.id, &health())).as_bytes())
            .await
            .unwrap();
        write
            .write_all(to_line(&Response::ok(third.id, &health())).as_bytes())
            .await
            .unwrap();
        // Late answer to `second`, which the next call must skip.
        write
            .write_all(to_line(&Response::ok(second.id, &health())).as_bytes())
            .await
            .unwrap();
        let fourth: Request = next_request(&mut lines).await;
        write
            .write_all(to_line(&Response::error(fourth.id, "No interface has MAC x")).as_bytes())
            .await
            .unwrap();
    });

    let mut client = AgentClient::connect_serial(&path).await.unwrap();
    let ready = client.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ready, health());

    let error = client
        .list_interfaces(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::Agent { request: "list_interfaces", ref message } if message == "No interface has MAC x")
    );
    agent.await.unwrap();
}

#[tokio::test]
async fn call_without_answer_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let client = AgentClient::connect_serial(&path).await.unwrap();
    let _held = listener.accept().await.unwrap();

    let error = client.health(Duration::from_millis(50)).await.unwrap_err();

    assert!(matches!(
        error,
        ClientError::Timeout {
            request: "health",
            ..
        }
    ));
}

#[tokio::test]
async fn connect_to_missing_socket_names_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let error = AgentClient::connect_serial(dir.path().join("absent.sock"))
        .await
        .unwrap_err();
    assert!(error
        .to_string()
        .starts_with("Connecting to the agent at serial:"));
}
