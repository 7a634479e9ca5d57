//! TAP creation and teardown: netdev against dbs-utils and the `ip` tool, side by
//! side in one run, inside a private network namespace.
//!
//! Run as root: `cargo bench -p hypervisor-dragonball --bench tap_vs_dbs_utils`.
//! This bench lives here, not in netdev, so that dbs-utils stays out of netdev's
//! dependency graph.

use std::os::fd::OwnedFd;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dbs_utils::net::Tap as DbsTap;
use netdev::{NetNs, Offloads, Reaper, TapBuilder};

const VNET_HDR: usize = 12;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

struct Row {
    what: String,
    n: usize,
    p50: Duration,
    p99: Duration,
}

impl Row {
    fn new(what: impl Into<String>, mut samples: Vec<Duration>) -> Row {
        Row {
            what: what.into(),
            n: samples.len(),
            p50: percentile(&mut samples, 0.50),
            p99: percentile(&mut samples, 0.99),
        }
    }
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn netdev_create(name: &str, queues: usize, mtu: Option<u32>) -> netdev::Tap {
    let mut b = TapBuilder::new(name)
        .multi_queue(queues > 1)
        .queues(queues)
        .vnet_hdr(Some(VNET_HDR))
        .offloads(Offloads::virtio_default())
        .must_create(true)
        .up(true);
    if let Some(mtu) = mtu {
        b = b.mtu(mtu);
    }
    b.create().expect("netdev create")
}

/// netdev's creation, then the link flags written the way dbs-utils' `enable` writes them:
/// `IFF_UP | IFF_RUNNING` as the whole flag word, which also clears the device's
/// `IFF_MULTICAST` (netdev keeps it and sets only `IFF_UP`).
fn netdev_create_dbs_flags(name: &str) -> netdev::Tap {
    let tap = TapBuilder::new(name)
        .vnet_hdr(Some(VNET_HDR))
        .offloads(Offloads::virtio_default())
        .must_create(true)
        .create()
        .expect("netdev create");
    // SAFETY: socket has no memory preconditions; the fd is owned below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(sock >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `sock` is a fresh fd that nothing else owns.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own, on a socket we own.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCSIFFLAGS,
            &req,
        )
    };
    assert_eq!(rc, 0, "SIOCSIFFLAGS: {}", std::io::Error::last_os_error());
    tap
}

fn dbs_create(name: &str, queues: usize) -> Vec<DbsTap> {
    let tap = DbsTap::open_named(name, queues > 1).expect("dbs-utils open_named");
    tap.set_vnet_hdr_size(VNET_HDR as i32).expect("vnet hdr");
    tap.set_offload(Offloads::virtio_default().bits())
        .expect("offload");
    tap.enable().expect("enable");
    tap.into_mq_taps(queues).expect("mq taps")
}

/// Alternates netdev and dbs-utils iterations so that drift affects both alike, and
/// which of the two goes first each round, so that neither always follows the other's
/// teardown. Only creation is timed; devices are closed between iterations.
fn create_pair(queues: usize, iters: usize) -> (Vec<Duration>, Vec<Duration>) {
    let (nd, dbs, _) = create_trio(queues, iters, false);
    (nd, dbs)
}

/// [`create_pair`], plus (when `with_dbs_flags`) netdev creations whose link flags are
/// written like dbs-utils writes them, in the same rotation.
fn create_trio(
    queues: usize,
    iters: usize,
    with_dbs_flags: bool,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let (mut nd, mut dbs, mut ndf) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iters {
        let netdev_round = |nd: &mut Vec<Duration>| {
            let t = Instant::now();
            let tap = netdev_create("bnd0", queues, None);
            nd.push(t.elapsed());
            assert_eq!(tap.queues().len(), queues);
            drop(tap);
        };
        let dbs_round = |dbs: &mut Vec<Duration>| {
            let t = Instant::now();
            let taps = dbs_create("bdb0", queues);
            dbs.push(t.elapsed());
            assert_eq!(taps.len(), queues);
            drop(taps);
        };
        let flags_round = |ndf: &mut Vec<Duration>| {
            if with_dbs_flags {
                let t = Instant::now();
                let tap = netdev_create_dbs_flags("bnf0");
                ndf.push(t.elapsed());
                drop(tap);
            }
        };
        if i % 2 == 0 {
            netdev_round(&mut nd);
            dbs_round(&mut dbs);
            flags_round(&mut ndf);
        } else {
            flags_round(&mut ndf);
            dbs_round(&mut dbs);
            netdev_round(&mut nd);
        }
        if i == 0 {
            // Warm-up iteration.
            nd.clear();
            dbs.clear();
            ndf.clear();
        }
    }
    (nd, dbs, ndf)
}

/// Creation while earlier devices stay open (many sandboxes on a host): no
/// unregistration runs between creations.
fn kept_open(iters: usize) -> (Vec<Duration>, Vec<Duration>) {
    let (mut nd, mut dbs) = (Vec::new(), Vec::new());
    let mut keep_nd = Vec::new();
    let mut keep_dbs = Vec::new();
    for i in 0..iters {
        let t = Instant::now();
        let tap = netdev_create(&format!("bko{i}"), 1, None);
        nd.push(t.elapsed());
        keep_nd.push(tap);
        let t = Instant::now();
        let taps = dbs_create(&format!("bkd{i}"), 1);
        dbs.push(t.elapsed());
        keep_dbs.push(taps);
    }
    (nd, dbs)
}

fn netdev_with_mtu(iters: usize) -> Vec<Duration> {
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            let tap = netdev_create("bmtu0", 1, Some(9000));
            let d = t.elapsed();
            drop(tap);
            d
        })
        .collect()
}

fn netdev_in_netns(ns: &NetNs, iters: usize) -> Vec<Duration> {
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            let tap = TapBuilder::new("bns0")
                .netns(ns.path())
                .vnet_hdr(Some(VNET_HDR))
                .offloads(Offloads::virtio_default())
                .mtu(1500)
                .up(true)
                .create()
                .expect("create in netns");
            let d = t.elapsed();
            drop(tap);
            d
        })
        .collect()
}

fn teardown_close(queues: usize, iters: usize) -> Vec<Duration> {
    (0..iters)
        .map(|_| {
            let tap = netdev_create("bcl0", queues, None);
            let t = Instant::now();
            drop(tap);
            t.elapsed()
        })
        .collect()
}

fn teardown_reaper(queues: usize, iters: usize) -> (Vec<Duration>, Duration) {
    let reaper = Reaper::new().unwrap();
    let mut samples = Vec::new();
    for i in 0..iters {
        let tap = netdev_create(&format!("brp{i}"), queues, None);
        let t = Instant::now();
        reaper.close(tap);
        samples.push(t.elapsed());
    }
    let t = Instant::now();
    assert!(reaper.flush().is_empty());
    (samples, t.elapsed())
}

fn parallel_64(rounds: usize) -> (Vec<Duration>, Vec<Duration>) {
    let mut per = Vec::new();
    let mut wall = Vec::new();
    for _ in 0..rounds {
        let barrier = Arc::new(Barrier::new(64));
        let start = Instant::now();
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    let tap = netdev_create(&format!("bp{i}"), 1, Some(1500));
                    (t.elapsed(), tap)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        wall.push(start.elapsed());
        let mut taps: Vec<OwnedFd> = Vec::new();
        for (d, tap) in results {
            per.push(d);
            taps.extend(tap.into_queues());
        }
        drop(taps);
    }
    (per, wall)
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect(args[0]);
    assert!(st.success(), "{args:?}");
}

/// Waits until `name` is unregistered in the calling thread's namespace.
fn wait_gone(name: &str) {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    while unsafe { libc::if_nametoindex(c.as_ptr()) } != 0 {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// `ip` against netdev under the same conditions: `ip link del` returns once the
/// device is unregistered, so each netdev creation here also starts with no
/// unregistration in flight (the netdev device is closed and waited for, untimed).
/// Iterations alternate.
fn ip_create_up(iters: usize) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let (mut create, mut del, mut nd) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        let tap = netdev_create("bipn0", 1, None);
        nd.push(t.elapsed());
        drop(tap);
        wait_gone("bipn0");

        let t = Instant::now();
        sh(&[
            "ip", "tuntap", "add", "dev", "bip0", "mode", "tap", "vnet_hdr",
        ]);
        sh(&["ip", "link", "set", "dev", "bip0", "up"]);
        create.push(t.elapsed());
        let t = Instant::now();
        sh(&["ip", "link", "del", "dev", "bip0"]);
        del.push(t.elapsed());
    }
    (create, del, nd)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("nproc {nproc}, kernel {}, CPU {cpu}", kernel.trim())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("tap_vs_dbs_utils: needs root (CAP_NET_ADMIN); not run");
        std::process::exit(1);
    }
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let scale = |n: usize| if quick { (n / 10).max(3) } else { n };

    let ns = NetNs::create(&format!("bench-tap-{}", std::process::id())).expect("netns");
    let rows = netdev::run_in(ns.path(), || {
        let mut rows = Vec::new();
        let mut ratios = Vec::new();

        let (nd, dbs, ndf) = create_trio(1, scale(301), true);
        let (a, b, c) = (Row::new("", nd), Row::new("", dbs), Row::new("", ndf));
        ratios.push(("1 queue", a.p50, b.p50));
        ratios.push((
            "1 queue, link flags written like dbs-utils",
            c.p50,
            b.p50,
        ));
        rows.push(Row {
            what: "netdev, create + vnet_hdr + offloads + up, 1 queue".into(),
            ..a
        });
        rows.push(Row {
            what: "dbs-utils, same steps: open_named + set_vnet_hdr_size + set_offload + enable"
                .into(),
            ..b
        });
        rows.push(Row {
            what: "netdev, same steps, link flags written like dbs-utils (IFF_UP|IFF_RUNNING, IFF_MULTICAST cleared)".into(),
            ..c
        });
        rows.push(Row::new(
            "netdev, same steps + MTU 9000",
            netdev_with_mtu(scale(300)),
        ));
        let (nd, dbs) = kept_open(scale(100));
        let (a, b) = (Row::new("", nd), Row::new("", dbs));
        ratios.push(("1 queue, devices kept open", a.p50, b.p50));
        rows.push(Row {
            what: "netdev, create + vnet_hdr + offloads + up, 1 queue, earlier devices kept open"
                .into(),
            ..a
        });
        rows.push(Row {
            what: "dbs-utils, same steps, earlier devices kept open".into(),
            ..b
        });
        rows.push(Row::new(
            "netdev, same steps + MTU, .netns(path) from outside the namespace (dedicated thread)",
            netdev_in_netns(&ns, scale(300)),
        ));

        let (nd, dbs) = create_pair(8, scale(61));
        let (a, b) = (Row::new("", nd), Row::new("", dbs));
        ratios.push(("8 queues", a.p50, b.p50));
        rows.push(Row {
            what: "netdev, create + vnet_hdr + offloads + up, 8 queues".into(),
            ..a
        });
        rows.push(Row {
            what: "dbs-utils, same steps, 8 queues (into_mq_taps(8))".into(),
            ..b
        });

        rows.push(Row::new(
            "teardown, close of the last fd, 1 queue",
            teardown_close(1, scale(100)),
        ));
        rows.push(Row::new(
            "teardown, close of 8 queue fds",
            teardown_close(8, scale(20)),
        ));
        let (caller, flush) = teardown_reaper(1, scale(100));
        rows.push(Row::new(
            "teardown via Reaper::close as seen by the caller, 1 queue",
            caller,
        ));
        rows.push(Row::new(
            format!("Reaper::flush of those {} (total)", scale(100)),
            vec![flush],
        ));
        let (caller, _) = teardown_reaper(8, scale(20));
        rows.push(Row::new(
            "teardown via Reaper::close as seen by the caller, 8 queues",
            caller,
        ));

        let (per, wall) = parallel_64(scale(20));
        rows.push(Row::new(
            "64 parallel creations (with MTU, up): per creation",
            per,
        ));
        rows.push(Row::new("64 parallel creations: wall time per round", wall));

        let (create, del, nd) = ip_create_up(scale(50));
        let ip = Row::new("ip tuntap add + ip link set up", create);
        let ip_p50 = ip.p50;
        let nd = Row::new(
            "netdev, create + vnet_hdr + offloads + up, 1 queue, no unregistration in flight (alternating with the ip rows)",
            nd,
        );
        ratios.push(("1 queue, no unregistration in flight", nd.p50, Duration::ZERO));
        rows.push(nd);
        rows.push(ip);
        rows.push(Row::new("ip link del", del));
        (rows, ratios, ip_p50)
    })
    .expect("running in the bench namespace");
    ns.delete().expect("deleting the bench namespace");

    let (rows, ratios, ip_p50) = rows;
    println!("command: cargo bench -p hypervisor-dragonball --bench tap_vs_dbs_utils (release)");
    println!("machine: {}", machine());
    println!();
    println!("| operation | n | p50 (µs) | p99 (µs) |");
    println!("|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} |",
            r.what.trim_start(),
            r.n,
            us(r.p50),
            us(r.p99)
        );
    }
    println!();
    for (what, nd, dbs) in ratios {
        if !dbs.is_zero() {
            println!(
                "ratio netdev/dbs-utils, {what} (p50): {:.2}",
                nd.as_secs_f64() / dbs.as_secs_f64()
            );
        }
        if what.starts_with("1 queue") && !what.contains("link flags") {
            println!(
                "ratio ip/netdev, create + up, {what} (p50): {:.0}x",
                ip_p50.as_secs_f64() / nd.as_secs_f64()
            );
        }
    }
}
