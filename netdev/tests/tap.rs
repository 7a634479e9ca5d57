//! Privileged tests of TAP creation and settings. Each test works in a private
//! network namespace and checks results with `ip`, `ethtool` and sysfs.

mod common;

use std::fs::File;
use std::os::fd::OwnedFd;

use common::{fd_count, thread_netns_inode, TestNs};
use netdev::{adopt, delete_tap, Error, Offloads, Reaper, TapBuilder};

const IFF_TAP: u32 = libc::IFF_TAP as u32;
const IFF_NO_PI: u32 = libc::IFF_NO_PI as u32;
const IFF_VNET_HDR: u32 = libc::IFF_VNET_HDR as u32;
const IFF_MULTI_QUEUE: u32 = libc::IFF_MULTI_QUEUE as u32;
const IFF_PERSIST: u32 = libc::IFF_PERSIST as u32;

#[test]
fn tap_created_from_a_template_returns_the_real_name() {
    let t = TestNs::new();
    let tap = TapBuilder::new("vm%d").netns(t.path()).create().unwrap();
    assert!(tap.name().starts_with("vm") && tap.name()[2..].parse::<u32>().is_ok());
    assert_eq!(t.links(), [tap.name()]);
    assert_eq!(t.link(tap.name())["ifindex"], tap.ifindex());
    drop(tap);
    t.finish();
}

#[test]
fn tap_created_by_exact_name_has_tap_flags() {
    let t = TestNs::new();
    let tap = TapBuilder::new("exact0").netns(t.path()).create().unwrap();
    assert_eq!(tap.name(), "exact0");
    let info = t.tun_info("exact0");
    assert_eq!(info["type"], "tap");
    assert_eq!(info["pi"], false);
    assert_eq!(info["vnet_hdr"], true);
    assert_eq!(info["multi_queue"], false);
    assert_eq!(info["persist"], false);
    assert_eq!(
        t.tun_flags("exact0"),
        IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        "tun_flags"
    );
    drop(tap);
    t.finish();
}

#[test]
fn invalid_names_are_rejected_before_any_syscall() {
    let t = TestNs::new();
    let fds = fd_count();
    let long = "a".repeat(16);
    for name in [
        "", &long, ".", "..", "a/b", "a b", "a\tb", "a\nb", "a:b", "a\0b", "t%d%d", "t%s", "t%",
    ] {
        // A namespace that does not exist: a name check after any system call
        // would report the namespace instead.
        let err = TapBuilder::new(name)
            .netns("/nonexistent/netns")
            .create()
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidName { .. }),
            "{name:?} gave {err:?}"
        );
    }
    let err = delete_tap("a/b", Some("/nonexistent/netns".as_ref())).unwrap_err();
    assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
    assert_eq!(fd_count(), fds);
    t.finish();
}

#[test]
fn vnet_header_and_offloads_are_visible() {
    let t = TestNs::new();
    let tap = TapBuilder::new("off0")
        .netns(t.path())
        .offloads(Offloads::virtio_default())
        .create()
        .unwrap();
    assert_eq!(t.tun_info("off0")["vnet_hdr"], true);
    let on = t.ethtool_features("off0");
    for feature in [
        "tx-checksum-ip-generic",
        "tx-tcp-segmentation",
        "tx-tcp6-segmentation",
        "tx-tcp-ecn-segmentation",
    ] {
        assert!(on.iter().any(|f| f == feature), "{feature} is off: {on:?}");
    }
    drop(tap);

    let plain = TapBuilder::new("plain0")
        .netns(t.path())
        .vnet_hdr(None)
        .create()
        .unwrap();
    assert_eq!(t.tun_info("plain0")["vnet_hdr"], false);
    assert_eq!(t.tun_flags("plain0") & IFF_VNET_HDR, 0);
    let on = t.ethtool_features("plain0");
    assert!(
        !on.iter()
            .any(|f| f == "tx-checksum-ip-generic" || f == "tx-tcp-segmentation"),
        "{on:?}"
    );
    drop(plain);

    let err = TapBuilder::new("bad0")
        .vnet_hdr(None)
        .offloads(Offloads::virtio_default())
        .create()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    t.finish();
}

#[test]
fn offloads_left_on_a_persistent_tap_are_cleared_on_reopen() {
    let t = TestNs::new();
    let first = TapBuilder::new("reuse0")
        .netns(t.path())
        .persist(true)
        .offloads(Offloads::virtio_default())
        .create()
        .unwrap();
    drop(first);
    assert!(t
        .ethtool_features("reuse0")
        .iter()
        .any(|f| f == "tx-tcp-segmentation"));

    let second = TapBuilder::new("reuse0").netns(t.path()).create().unwrap();
    let on = t.ethtool_features("reuse0");
    assert!(
        !on.iter()
            .any(|f| f == "tx-checksum-ip-generic" || f.starts_with("tx-tcp")),
        "offloads survived: {on:?}"
    );
    assert!(second.is_persistent());
    second.delete().unwrap();
    t.finish();
}

#[test]
fn persistent_tap_outlives_its_fds_until_deleted() {
    let t = TestNs::new();
    let tap = TapBuilder::new("keep0")
        .netns(t.path())
        .persist(true)
        .create()
        .unwrap();
    assert_eq!(t.tun_info("keep0")["persist"], true);
    assert_ne!(t.tun_flags("keep0") & IFF_PERSIST, 0);
    drop(tap);
    assert_eq!(t.links(), ["keep0"]);
    delete_tap("keep0", Some(t.path())).unwrap();
    assert!(t.links().is_empty());

    // Tap::delete does the same with the fds it holds.
    let tap = TapBuilder::new("keep1")
        .netns(t.path())
        .persist(true)
        .create()
        .unwrap();
    tap.delete().unwrap();

    let err = delete_tap("missing0", Some(t.path())).unwrap_err();
    assert!(matches!(err, Error::TapNotFound { .. }), "{err:?}");
    t.finish();
}

#[test]
fn owner_and_group_are_visible_in_ip() {
    let t = TestNs::new();
    let tap = TapBuilder::new("own0")
        .netns(t.path())
        .owner(65534)
        .group(65534)
        .create()
        .unwrap();
    let info = t.tun_info("own0");
    assert!(info["user"] == "nobody" || info["user"] == 65534, "{info}");
    assert!(
        info["group"] == "nogroup" || info["group"] == "nobody" || info["group"] == 65534,
        "{info}"
    );
    drop(tap);
    t.finish();
}

#[test]
fn multi_queue_tap_with_four_queues_is_multi_queue() {
    let t = TestNs::new();
    let tap = TapBuilder::new("mq%d")
        .netns(t.path())
        .multi_queue(true)
        .queues(4)
        .create()
        .unwrap();
    assert_eq!(tap.queues().len(), 4);
    assert!(tap.is_multi_queue());
    let info = t.tun_info(tap.name());
    assert_eq!(info["multi_queue"], true);
    assert_eq!(info["numqueues"], 4);
    assert_ne!(t.tun_flags(tap.name()) & IFF_MULTI_QUEUE, 0);

    // The mode is never inferred from the count.
    let one = TapBuilder::new("mq1")
        .netns(t.path())
        .multi_queue(true)
        .create()
        .unwrap();
    assert_eq!(t.tun_info("mq1")["multi_queue"], true);
    let err = TapBuilder::new("sq4").queues(4).create().unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    drop((tap, one));
    t.finish();
}

#[test]
fn opening_a_tap_with_the_other_queue_mode_is_a_queue_mode_mismatch() {
    let t = TestNs::new();
    let single = TapBuilder::new("sq0")
        .netns(t.path())
        .persist(true)
        .create()
        .unwrap();
    drop(single);
    let err = TapBuilder::new("sq0")
        .netns(t.path())
        .multi_queue(true)
        .create()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::QueueModeMismatch {
                existing_multi_queue: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("single-queue"), "{err}");

    // An open (busy) single-queue TAP too.
    let held = TapBuilder::new("sq1").netns(t.path()).create().unwrap();
    let err = TapBuilder::new("sq1")
        .netns(t.path())
        .multi_queue(true)
        .create()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::QueueModeMismatch {
                existing_multi_queue: false,
                ..
            }
        ),
        "{err:?}"
    );
    // Opening it again single-queue is busy.
    let err = TapBuilder::new("sq1").netns(t.path()).create().unwrap_err();
    assert!(matches!(err, Error::NameBusy { .. }), "{err:?}");
    drop(held);

    let multi = TapBuilder::new("mq0")
        .netns(t.path())
        .multi_queue(true)
        .queues(2)
        .create()
        .unwrap();
    let err = TapBuilder::new("mq0").netns(t.path()).create().unwrap_err();
    assert!(
        matches!(
            err,
            Error::QueueModeMismatch {
                existing_multi_queue: true,
                ..
            }
        ),
        "{err:?}"
    );
    drop(multi);

    // A name held by a device that is not a TAP.
    t.exec(&[
        "ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum1",
    ]);
    let err = TapBuilder::new("dum0")
        .netns(t.path())
        .create()
        .unwrap_err();
    assert!(matches!(err, Error::NameBusy { .. }), "{err:?}");
    t.exec(&["ip", "link", "del", "dum0"]);

    delete_tap("sq0", Some(t.path())).unwrap();
    t.finish();
}

#[test]
fn must_create_refuses_an_existing_tap() {
    let t = TestNs::new();
    let tap = TapBuilder::new("excl0")
        .netns(t.path())
        .multi_queue(true)
        .create()
        .unwrap();
    let err = TapBuilder::new("excl0")
        .netns(t.path())
        .multi_queue(true)
        .must_create(true)
        .create()
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    // Without must_create the same request opens a second queue.
    let again = TapBuilder::new("excl0")
        .netns(t.path())
        .multi_queue(true)
        .create()
        .unwrap();
    assert_eq!(t.tun_info("excl0")["numqueues"], 2);
    drop((tap, again));
    t.finish();
}

#[test]
fn queues_can_be_detached_and_attached_again() {
    let t = TestNs::new();
    let tap = TapBuilder::new("q0")
        .netns(t.path())
        .multi_queue(true)
        .queues(3)
        .create()
        .unwrap();
    tap.detach_queue(1).unwrap();
    let info = t.tun_info("q0");
    assert_eq!(
        (info["numqueues"].as_u64(), info["numdisabled"].as_u64()),
        (Some(2), Some(1))
    );
    tap.attach_queue(1).unwrap();
    let info = t.tun_info("q0");
    assert_eq!(
        (info["numqueues"].as_u64(), info["numdisabled"].as_u64()),
        (Some(3), Some(0))
    );
    assert!(matches!(
        tap.attach_queue(7),
        Err(Error::InvalidConfig { .. })
    ));
    drop(tap);
    t.finish();
}

#[test]
fn link_settings_read_back_and_show_in_ip() {
    let t = TestNs::new();
    let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    let tap = TapBuilder::new("link0")
        .netns(t.path())
        .mtu(9000)
        .mac(mac)
        .up(true)
        .create()
        .unwrap();
    let state = tap.link().unwrap();
    assert_eq!(state.mtu, 9000);
    assert_eq!(state.mac, mac);
    assert!(state.up);
    assert_eq!(state.ifindex, tap.ifindex());
    let link = t.link("link0");
    assert_eq!(link["mtu"], 9000);
    assert_eq!(link["address"], "02:11:22:33:44:55");
    assert!(
        link["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{link}"
    );

    // Changed later from this thread, which is not in the namespace.
    tap.set_mtu(1400).unwrap();
    tap.set_mac([0x02, 0, 0, 0, 0, 0x09]).unwrap();
    tap.set_up(false).unwrap();
    let state = tap.link().unwrap();
    assert_eq!((state.mtu, state.up), (1400, false));
    let link = t.link("link0");
    assert_eq!(link["mtu"], 1400);
    assert_eq!(link["address"], "02:00:00:00:00:09");
    assert!(
        !link["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{link}"
    );
    drop(tap);
    t.finish();
}

#[test]
fn creating_in_a_namespace_leaves_the_calling_thread_where_it_was() {
    let t = TestNs::new();
    let before = thread_netns_inode();
    let tap = TapBuilder::new("nsx0").netns(t.path()).create().unwrap();
    assert_eq!(thread_netns_inode(), before);
    assert_eq!(t.links(), ["nsx0"]);
    // Not in the caller's namespace.
    let here = std::process::Command::new("ip")
        .args(["link", "show", "dev", "nsx0"])
        .output()
        .unwrap();
    assert!(!here.status.success());
    drop(tap);
    t.finish();
}

#[test]
fn a_missing_namespace_is_reported_as_not_found() {
    let t = TestNs::new();
    let missing = format!("{}-missing", t.name());
    let err = TapBuilder::new("tap%d")
        .netns(&missing)
        .create()
        .unwrap_err();
    assert!(matches!(err, Error::NetnsNotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&missing) && msg.starts_with("Creating TAP \"tap%d\" in netns"),
        "{msg}"
    );
    // A file that is not a namespace.
    let err = TapBuilder::new("tap%d")
        .netns("/proc/self/status")
        .create()
        .unwrap_err();
    assert!(matches!(err, Error::NotANetns { .. }), "{err:?}");
    t.finish();
}

#[test]
fn adopting_a_pipe_or_a_file_is_not_a_tap() {
    let t = TestNs::new();
    let (r, w) = nix::unistd::pipe().unwrap();
    assert!(matches!(adopt(r), Err(Error::NotATap { .. })));
    drop(w);
    let file: OwnedFd = File::open("/proc/self/status").unwrap().into();
    assert!(matches!(adopt(file), Err(Error::NotATap { .. })));
    let unattached: OwnedFd = File::open("/dev/net/tun").unwrap().into();
    assert!(matches!(adopt(unattached), Err(Error::NotATap { .. })));

    let tap = TapBuilder::new("adopt0")
        .netns(t.path())
        .multi_queue(true)
        .queues(2)
        .create()
        .unwrap();
    let mut queues = tap.into_queues();
    let adopted = adopt(queues.pop().unwrap()).unwrap();
    assert_eq!(adopted.name(), "adopt0");
    assert!(
        adopted.flags().is_tap() && adopted.flags().multi_queue() && adopted.flags().vnet_hdr()
    );
    drop((queues, adopted));
    t.finish();
}

#[test]
fn failure_part_way_through_creation_leaves_no_device_and_no_fd() {
    let t = TestNs::new();
    let fds = fd_count();
    let err = TapBuilder::new("fail0")
        .netns(t.path())
        .multi_queue(true)
        .queues(4)
        .mtu(70000)
        .create()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Setting MTU 70000 on TAP \"fail0\""),
        "{err}"
    );
    assert!(t.links().is_empty());
    assert_eq!(fd_count(), fds);

    let err = TapBuilder::new("fail1")
        .netns(t.path())
        .multi_queue(true)
        .queues(4)
        .persist(true)
        .mac([0x01, 0, 0x5e, 0, 0, 1])
        .create()
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(t.links().is_empty(), "a persistent device was left behind");
    assert_eq!(fd_count(), fds);
    t.finish();
}

#[test]
fn reaper_deletes_in_the_background_and_flush_waits() {
    let t = TestNs::new();
    let reaper = Reaper::new().unwrap();
    let plain = TapBuilder::new("r0").netns(t.path()).create().unwrap();
    let kept = TapBuilder::new("r1")
        .netns(t.path())
        .persist(true)
        .multi_queue(true)
        .queues(2)
        .create()
        .unwrap();
    reaper.close(plain);
    reaper.delete(kept);
    assert!(reaper.flush().is_empty());
    assert_eq!(reaper.pending(), 0);
    assert!(t.links().is_empty());

    // Dropping the reaper waits for what is pending.
    let tap = TapBuilder::new("r2").netns(t.path()).create().unwrap();
    reaper.close(tap);
    drop(reaper);
    assert!(t.links().is_empty());
    t.finish();
}

/// Runs in a child process without capabilities (uid 0, empty bounding set).
fn unprivileged_child(owned: &str, other_owner: &str) {
    let outcome = |r: netdev::Result<netdev::Tap>| match r {
        Ok(_) => "ok".to_owned(),
        Err(Error::PermissionDenied { step, .. }) => format!("PermissionDenied at {step}"),
        Err(e) => format!("other: {e}: {:?}", std::error::Error::source(&e)),
    };
    println!(
        "\nRESULT create {}",
        outcome(TapBuilder::new("denied%d").create())
    );
    println!(
        "\nRESULT owned {}",
        outcome(TapBuilder::new(owned).create())
    );
    println!(
        "\nRESULT other {}",
        outcome(TapBuilder::new(other_owner).create())
    );
}

#[test]
fn a_process_without_cap_net_admin_gets_permission_denied() {
    if let Ok(spec) = std::env::var("NETDEV_TEST_UNPRIVILEGED_CHILD") {
        let (owned, unowned) = spec.split_once(',').expect("child spec");
        return unprivileged_child(owned, unowned);
    }
    let t = TestNs::new();
    // Owned by the child's uid (0; /dev/net/tun may be root-only, so the child
    // keeps uid 0 and loses every capability), and by another user.
    let owned = TapBuilder::new("owned0")
        .netns(t.path())
        .persist(true)
        .owner(0)
        .create()
        .unwrap();
    let other = TapBuilder::new("other0")
        .netns(t.path())
        .persist(true)
        .owner(65534)
        .create()
        .unwrap();
    drop((owned, other));

    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", t.name(), "setpriv"])
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(&exe)
        .args([
            "--exact",
            "a_process_without_cap_net_admin_gets_permission_denied",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NETDEV_TEST_UNPRIVILEGED_CHILD", "owned0,other0")
        .output()
        .expect("running setpriv (util-linux) is needed for this test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("RESULT {key} ")))
            .unwrap_or_else(|| panic!("no result for {key}: {stdout}"))
            .to_owned()
    };
    // The kernel's CAP_NET_ADMIN check (TUNSETIFF), not the open of /dev/net/tun.
    assert_eq!(
        result("create"),
        "PermissionDenied at Creating TAP \"denied%d\""
    );
    assert_eq!(result("owned"), "ok");
    assert_eq!(
        result("other"),
        "PermissionDenied at Creating or opening TAP \"other0\""
    );

    delete_tap("owned0", Some(t.path())).unwrap();
    delete_tap("other0", Some(t.path())).unwrap();
    t.finish();
}

/// The lowest `n` fd numbers not open in this process.
fn free_fd_numbers(n: usize) -> Vec<i32> {
    (0..)
        .filter(|&fd| {
            // SAFETY: F_GETFD on any number only reads the fd table; EBADF means free.
            unsafe { libc::fcntl(fd, libc::F_GETFD) == -1 }
        })
        .take(n)
        .collect()
}

fn set_nofile_soft_limit(limit: libc::rlim_t) -> libc::rlim_t {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) };
    assert_eq!(got, 0);
    let old = current.rlim_cur;
    current.rlim_cur = limit;
    // SAFETY: setrlimit reads the struct we own; lowering the soft limit is allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &current) }, 0);
    old
}

#[test]
fn failure_opening_the_third_of_four_queues_leaves_no_device_and_no_fd() {
    let t = TestNs::new();
    let fds = fd_count();
    // Inside the namespace on this thread, so that the only fds creation opens are
    // its queues: with the soft fd limit at the third free number, queues 0 and 1
    // open and queue 2 fails with EMFILE. Tests in this binary run one at a time.
    let err = netdev::run_in(t.path(), || {
        let free = free_fd_numbers(3);
        let old = set_nofile_soft_limit(free[2] as libc::rlim_t);
        let result = TapBuilder::new("mq3of4")
            .multi_queue(true)
            .queues(4)
            .persist(true)
            .create();
        set_nofile_soft_limit(old);
        result.map(|_| ()).unwrap_err()
    })
    .unwrap();
    assert!(
        err.to_string()
            .starts_with("Opening queue 2 of TAP \"mq3of4\""),
        "{err}"
    );
    assert_eq!(
        err.os_error().and_then(|e| e.raw_os_error()),
        Some(libc::EMFILE),
        "{err:?}"
    );
    assert!(t.links().is_empty(), "a persistent device was left behind");
    assert_eq!(fd_count(), fds);
    t.finish();
}

#[test]
fn tokio_workers_create_taps_in_a_process_namespace_without_moving() {
    use std::os::unix::fs::MetadataExt;

    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    // tokio's signal driver keeps a process-wide socket pair from the first runtime on.
    let t = TestNs::with_warmup(|| drop(runtime()));
    // A process living in the test namespace; its /proc/PID/ns/net names it.
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", t.name(), "sleep", "60"])
        .spawn()
        .unwrap();
    let ns_path = std::path::PathBuf::from(format!("/proc/{}/ns/net", sleeper.id()));
    let target_inode = std::fs::metadata(t.path()).unwrap().ino();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::metadata(&ns_path).map(|m| m.ino()).ok() != Some(target_inode) {
        assert!(
            std::time::Instant::now() < deadline,
            "the sleeper never entered the namespace"
        );
        std::thread::yield_now();
    }

    let process_inode = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    let runtime = runtime();
    let taps = runtime.block_on(async {
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let ns = ns_path.clone();
                tokio::spawn(async move {
                    let tap = TapBuilder::new(format!("tok{i}"))
                        .netns(&ns)
                        .up(true)
                        .create()
                        .unwrap();
                    // Still this worker's own namespace, on the same thread.
                    (tap, thread_netns_inode())
                })
            })
            .collect();
        let mut taps = Vec::new();
        for task in tasks {
            let (tap, inode) = task.await.unwrap();
            assert_eq!(inode, process_inode, "a tokio worker changed namespace");
            taps.push(tap);
        }
        taps
    });
    // Every thread of the process (workers included) is still in its namespace.
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let ns = task.unwrap().path().join("ns/net");
        if let Ok(meta) = std::fs::metadata(&ns) {
            assert_eq!(meta.ino(), process_inode, "{} moved", ns.display());
        }
    }
    let mut names = t.links();
    names.sort();
    assert_eq!(names, ["tok0", "tok1", "tok2", "tok3"]);
    // The fds stay usable after creation: the kernel counts a written frame.
    // A zeroed 12-byte vnet header, then a broadcast Ethernet frame.
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
    frame.resize(12 + 60, 0);
    let written = nix::unistd::write(&taps[0].queues()[0], &frame).unwrap();
    assert_eq!(written, frame.len());
    assert_eq!(t.stat("tok0", "rx_packets"), 1);

    drop(taps);
    drop(runtime);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    t.finish();
}
