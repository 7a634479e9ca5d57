//! Shared harness of the privileged tests: a private network namespace per test,
//! observation through `ip`, `ethtool` and sysfs, and leak checks.
//!
//! Tests in one binary run one at a time (a process-wide lock) so that the
//! open-fd count of the process can be compared before and after each test.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use netdev::NetNs;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A test's private namespace and the state to compare at the end.
pub struct TestNs {
    pub ns: NetNs,
    fds_before: usize,
    _serial: MutexGuard<'static, ()>,
}

/// Fails the test (never skips it silently) when a prerequisite is missing.
pub fn require_privileges() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "SKIPPED-AS-FAILURE: privileged netdev tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); run them as root"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "SKIPPED-AS-FAILURE: /dev/net/tun is missing; load the tun module"
    );
    assert!(
        tool_works("ip", &["-V"]),
        "SKIPPED-AS-FAILURE: the `ip` tool (iproute2) is needed to check results"
    );
}

fn tool_works(tool: &str, args: &[&str]) -> bool {
    Command::new(tool)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Open fds of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("listing /proc/self/fd")
        .count()
        - 1 // the directory handle itself
}

impl TestNs {
    /// Takes the lock, counts fds and creates `ndt-PID-N`.
    pub fn new() -> TestNs {
        TestNs::with_warmup(|| ())
    }

    /// Like [`TestNs::new`], running `warmup` under the lock before counting fds:
    /// for process-wide state that is created once and kept (tokio's SIGCHLD pipe).
    pub fn with_warmup(warmup: impl FnOnce()) -> TestNs {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        require_privileges();
        warmup();
        let fds_before = fd_count();
        let name = format!(
            "ndt-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns = NetNs::create(&name).expect("creating the test namespace");
        TestNs {
            ns,
            fds_before,
            _serial: serial,
        }
    }

    pub fn path(&self) -> &Path {
        self.ns.path()
    }

    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// `ip -n NS -d -j link show dev DEV`, parsed.
    pub fn link(&self, dev: &str) -> Value {
        let out = run(
            "ip",
            &["-n", self.name(), "-d", "-j", "link", "show", "dev", dev],
        );
        let mut v: Value = serde_json::from_str(&out).expect("parsing ip -j output");
        v.as_array_mut()
            .and_then(|a| a.pop())
            .expect("ip printed no link")
    }

    /// `linkinfo.info_data` of a TUN/TAP link.
    pub fn tun_info(&self, dev: &str) -> Value {
        let link = self.link(dev);
        assert_eq!(
            link["linkinfo"]["info_kind"], "tun",
            "{dev} is not a tun device: {link}"
        );
        link["linkinfo"]["info_data"].clone()
    }

    /// Interface names in the namespace, without `lo`.
    pub fn links(&self) -> Vec<String> {
        let out = run("ip", &["-n", self.name(), "-j", "link", "show"]);
        let v: Value = serde_json::from_str(&out).expect("parsing ip -j output");
        v.as_array()
            .expect("ip printed no array")
            .iter()
            .map(|l| l["ifname"].as_str().unwrap_or_default().to_owned())
            .filter(|n| n != "lo")
            .collect()
    }

    /// Runs a command inside the namespace (`ip netns exec`, which also mounts the
    /// namespace's sysfs) and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `/sys/class/net/DEV/tun_flags` as seen inside the namespace.
    pub fn tun_flags(&self, dev: &str) -> u32 {
        let path = format!("/sys/class/net/{dev}/tun_flags");
        let text = self.exec(&["cat", &path]);
        u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).expect("parsing tun_flags")
    }

    /// `/sys/class/net/DEV/statistics/NAME` inside the namespace.
    pub fn stat(&self, dev: &str, name: &str) -> u64 {
        let path = format!("/sys/class/net/{dev}/statistics/{name}");
        self.exec(&["cat", &path])
            .trim()
            .parse()
            .expect("parsing a counter")
    }

    /// The offload features `ethtool -k` reports as on.
    pub fn ethtool_features(&self, dev: &str) -> Vec<String> {
        assert!(
            tool_works("ethtool", &["--version"]),
            "SKIPPED-AS-FAILURE: ethtool is needed to observe offloads; install it"
        );
        self.exec(&["ethtool", "-k", dev])
            .lines()
            .filter_map(|l| {
                let (k, v) = l.trim().split_once(": ")?;
                v.starts_with("on").then(|| k.to_owned())
            })
            .collect()
    }

    /// Checks that nothing is left: no interface in the namespace and as many open
    /// fds as at the start. Then removes the namespace.
    pub fn finish(self) {
        assert_eq!(self.links(), Vec::<String>::new(), "leftover interfaces");
        assert_eq!(
            fd_count(),
            self.fds_before,
            "open fds changed during the test"
        );
    }
}

/// Runs a command, panics with its stderr if it fails, returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("non-UTF-8 output")
}

/// The network namespace inode of the calling thread.
pub fn thread_netns_inode() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .expect("stat /proc/thread-self/ns/net")
        .ino()
}
