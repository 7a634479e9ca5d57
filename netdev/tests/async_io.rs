//! Privileged tests of async frame I/O (feature `tokio`).

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::TestNs;
use netdev::{send_with_fds_async, AsyncTapQueue, ChildFds, TapBuilder};
use tokio::time::timeout;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn frames_from_the_kernel_are_read_and_frames_written_are_received() {
    // tokio's signal driver keeps a process-wide pipe from the first runtime on.
    let t = TestNs::with_warmup(|| drop(runtime()));
    let tap = TapBuilder::new("aio0")
        .netns(t.path())
        .vnet_hdr(None)
        .nonblocking(true)
        .mac([0x02, 0, 0, 0, 0, 0x01])
        .up(true)
        .create()
        .unwrap();
    t.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", "aio0"]);
    let rt = runtime();
    rt.block_on(async {
        let queue = AsyncTapQueue::new(tap.queues()[0].try_clone().unwrap()).unwrap();

        // The kernel resolves 10.77.0.2 with an ARP request out of the TAP.
        let mut ping = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                t.name(),
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                "10.77.0.2",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 2048];
        let arp = timeout(Duration::from_secs(5), async {
            loop {
                let n = queue.recv(&mut buf).await.unwrap();
                let frame = &buf[..n];
                // Ethertype ARP, opcode request, target 10.77.0.2.
                if n >= 42 && frame[12..14] == [0x08, 0x06] && frame[38..42] == [10, 77, 0, 2] {
                    return frame.to_vec();
                }
            }
        })
        .await
        .expect("no ARP request from the kernel within 5 s");
        assert_eq!(&arp[0..6], &[0xff; 6]);
        assert_eq!(&arp[6..12], &[0x02, 0, 0, 0, 0, 0x01]);
        let _ = ping.kill();
        let _ = ping.wait();

        // A frame written to the queue is received by the kernel.
        let before = t.stat("aio0", "rx_packets");
        let mut frame = vec![0u8; 60];
        frame[0..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        frame[12..14].copy_from_slice(&[0x88, 0xb5]);
        let sent = timeout(Duration::from_secs(5), queue.send(&frame))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sent, 60);
        assert_eq!(t.stat("aio0", "rx_packets"), before + 1);

        // Nothing queued: a non-blocking read says WouldBlock, not an empty frame.
        while queue.try_recv(&mut buf).is_ok() {}
        assert_eq!(
            queue.try_recv(&mut buf).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        drop(queue);
    });
    drop(rt);
    drop(tap);
    t.finish();
}

#[test]
fn fds_reach_a_tokio_child_and_a_tokio_socket() {
    // tokio keeps a process-wide SIGCHLD pipe from the first child on.
    let t = TestNs::with_warmup(|| {
        runtime().block_on(async {
            let status = tokio::process::Command::new("true").status().await;
            assert!(status.unwrap().success());
        })
    });
    let rt = runtime();
    rt.block_on(async {
        let tap = TapBuilder::new("tk%d").netns(t.path()).create().unwrap();
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let fds = [tap.queues()[0].as_fd()];
        let sent = send_with_fds_async(&a, b"getfd", &fds).await.unwrap();
        assert_eq!(sent, 5);
        drop((a, b));

        let mut child = ChildFds::new();
        assert_eq!(child.extend(tap.into_queues()), [3]);
        let mut cmd = tokio::process::Command::new("readlink");
        cmd.arg("/proc/self/fd/3");
        child.apply_tokio(&mut cmd).unwrap();
        let out = cmd.output().await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "/dev/net/tun");
    });
    drop(rt);
    t.finish();
}
