//! Privileged tests of the namespace helpers.

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{run, thread_netns_inode, TestNs};
use netdev::{netns, run_in, Error, NetNs};

#[test]
fn netns_create_and_delete_work_like_ip_netns() {
    let t = TestNs::new();
    let name = format!("{}-extra", t.name());
    let ns = NetNs::create(&name).unwrap();
    assert!(run("ip", &["netns", "list"])
        .lines()
        .any(|l| l.split(' ').next() == Some(name.as_str())));
    // A fresh namespace: only lo.
    assert_eq!(run("ip", &["-n", &name, "-o", "link"]).lines().count(), 1);
    let err = NetNs::create(&name).unwrap_err();
    assert!(matches!(err, Error::NetnsExists { .. }), "{err:?}");
    let path = ns.path().to_owned();
    ns.delete().unwrap();
    assert!(!path.exists());
    assert!(!run("ip", &["netns", "list"])
        .lines()
        .any(|l| l.split(' ').next() == Some(name.as_str())));
    t.finish();
}

#[test]
fn run_in_runs_inside_the_namespace_and_leaves_the_caller_alone() {
    let t = TestNs::new();
    let before = thread_netns_inode();
    let inside = run_in(t.path(), thread_netns_inode).unwrap();
    assert_eq!(inside, std::fs::metadata(t.path()).unwrap().ino());
    assert_ne!(inside, before);
    assert_eq!(thread_netns_inode(), before);
    // Borrowing from the caller works; a bare name means /run/netns/NAME.
    let label = String::from("x");
    assert_eq!(run_in(t.name(), || label.len()).unwrap(), 1);
    let err = run_in("/nonexistent/ns", || ()).unwrap_err();
    assert!(matches!(err, Error::NetnsNotFound { .. }), "{err:?}");
    t.finish();
}

#[test]
fn a_panic_inside_run_in_reaches_the_caller() {
    let t = TestNs::new();
    let result = std::panic::catch_unwind(|| run_in(t.path(), || panic!("inside")));
    assert!(result.is_err());
    t.finish();
}

#[test]
fn enter_moves_only_the_calling_thread_and_reports_the_raw_error() {
    let t = TestNs::new();
    let before = thread_netns_inode();
    let want = std::fs::metadata(t.path()).unwrap().ino();
    let ns = std::fs::File::open(t.path()).unwrap();
    let not_ns = std::fs::File::open("/proc/self/status").unwrap();
    let (inside, refused) = std::thread::scope(|s| {
        s.spawn(|| {
            // A file that is not a namespace is refused with the bare errno and moves nothing.
            let refused = netns::enter(not_ns.as_fd()).unwrap_err();
            assert_eq!(thread_netns_inode(), before);
            netns::enter(ns.as_fd()).unwrap();
            (thread_netns_inode(), refused)
        })
        .join()
        .unwrap()
    });
    assert_eq!(inside, want);
    assert_eq!(refused.raw_os_error(), Some(libc::EINVAL), "{refused}");
    assert_eq!(thread_netns_inode(), before);
    // The typed path through run_in names the file and says what to pass.
    let err = run_in("/proc/self/status", || ()).unwrap_err();
    assert!(matches!(err, Error::NotANetns { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("/proc/self/status is not a network namespace"),
        "{err}"
    );
    drop((ns, not_ns));
    t.finish();
}

#[test]
fn resolve_maps_a_bare_name_under_run_netns_and_keeps_paths() {
    assert_eq!(
        netns::resolve(Path::new("pod1")),
        Path::new(netns::NETNS_RUN_DIR).join("pod1")
    );
    for p in ["/proc/7/ns/net", "./pod1", "run/netns/pod1"] {
        assert_eq!(netns::resolve(Path::new(p)), Path::new(p));
    }
}
