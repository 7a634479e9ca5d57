//! Privileged tests of fd hand-off: `SCM_RIGHTS` and child fd numbers.

mod common;

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;

use common::TestNs;
use netdev::{adopt, send_with_fds, ChildFds, TapBuilder};
use nix::sys::socket::{
    recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

fn unix_pair(flags: SockFlag) -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        flags | SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

#[test]
fn send_with_fds_delivers_a_usable_tap_fd() {
    let t = TestNs::new();
    let tap = TapBuilder::new("send%d")
        .netns(t.path())
        .multi_queue(true)
        .queues(2)
        .create()
        .unwrap();
    let (a, b) = unix_pair(SockFlag::empty());
    let payload = br#"{"execute":"getfd","arguments":{"fdname":"q0"}}"#;
    let fds: Vec<_> = tap.queues().iter().map(AsFd::as_fd).collect();
    assert_eq!(
        send_with_fds(a.as_fd(), payload, &fds).unwrap(),
        payload.len()
    );

    let mut buf = [0u8; 128];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        b.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .unwrap();
    assert_eq!(msg.bytes, payload.len());
    let mut received = Vec::new();
    for cmsg in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this fd for us; nothing else owns it.
                received.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    assert_eq!(&buf[..payload.len()], payload);
    assert_eq!(received.len(), 2);
    let name = tap.name().to_owned();
    drop(tap);
    // The received fds keep the device alive and are TAP queues.
    assert_eq!(t.links(), std::slice::from_ref(&name));
    for fd in received {
        let adopted = adopt(fd).unwrap();
        assert_eq!(adopted.name(), name);
        assert!(adopted.flags().multi_queue());
    }
    drop((a, b));
    t.finish();
}

#[test]
fn send_with_fds_on_a_full_nonblocking_socket_reports_would_block() {
    let t = TestNs::new();
    let (a, b) = unix_pair(SockFlag::SOCK_NONBLOCK);
    let chunk = [0u8; 65536];
    let err = loop {
        match send_with_fds(a.as_fd(), &chunk, &[]) {
            Ok(_) => continue,
            Err(err) => break err,
        }
    };
    assert!(err.is_would_block(), "{err:?}");
    assert_eq!(
        std::io::Error::from(err).kind(),
        std::io::ErrorKind::WouldBlock
    );
    drop((a, b));
    t.finish();
}

/// `ls -l /proc/self/fd` of a child: fd number to link target.
fn child_fds(cmd: &mut Command) -> Vec<(RawFd, String)> {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (left, target) = l.split_once(" -> ")?;
            let fd = left.rsplit(' ').next()?.parse().ok()?;
            Some((fd, target.to_owned()))
        })
        .collect()
}

#[test]
fn child_fds_gives_the_child_exactly_the_chosen_fds() {
    let t = TestNs::new();
    let tap = TapBuilder::new("child%d")
        .netns(t.path())
        .multi_queue(true)
        .queues(2)
        .create()
        .unwrap();
    // An fd without close-on-exec in the parent must not reach the child either.
    // SAFETY: dup returns a new fd that nothing else owns.
    let stray = unsafe { OwnedFd::from_raw_fd(libc::dup(2)) };
    assert!(stray.as_raw_fd() > 2);

    let mut fds = ChildFds::new();
    let numbers = fds.extend(tap.into_queues());
    assert_eq!(numbers, [3, 4]);
    assert_eq!(fds.numbers(), [3, 4]);
    let mut cmd = Command::new("ls");
    cmd.args(["-l", "/proc/self/fd"]);
    fds.apply(&mut cmd).unwrap();
    let seen = child_fds(&mut cmd);
    let numbers: Vec<RawFd> = seen.iter().map(|(fd, _)| *fd).collect();
    // 0, 1, 2, the two queues, and the directory `ls` is reading.
    assert_eq!(numbers.len(), 6, "{seen:?}");
    assert_eq!(&numbers[..5], [0, 1, 2, 3, 4], "{seen:?}");
    assert_eq!(seen[3].1, "/dev/net/tun");
    assert_eq!(seen[4].1, "/dev/net/tun");
    assert!(seen[5].1.starts_with("/proc/"), "{seen:?}");
    // The command holds the parent's copies until it is dropped; then the TAP goes.
    assert_eq!(t.links().len(), 1);
    drop(cmd);
    drop(stray);
    t.finish();
}
