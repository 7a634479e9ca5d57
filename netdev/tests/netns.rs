//! Privileged tests of the namespace helpers.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{run, thread_netns_inode, TestNs};
use netdev::{run_in, Error, NetNs};

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
