//! `sandbox exec` end to end: containers in a real QEMU guest (TCG where KVM is not usable)
//! whose root filesystems are host directories bound into the sandbox's virtio-fs share. Needs
//! root and the guest assets of `make guest-assets` (with their busybox `rootfs`); without
//! them the tests fail with the reason.
#![cfg(feature = "qemu")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::{config, guest_dir, SHIM};
use workspace_tests::require_root;

const READY_LIMIT: Duration = Duration::from_secs(240);
const EXIT_LIMIT: Duration = Duration::from_secs(60);

fn shim() -> Command {
    let mut c = Command::new(SHIM);
    c.env("GUEST_DIR", guest_dir());
    c
}

/// A `sandbox run` child, killed if the test fails half-way.
struct Running {
    child: Child,
    id: String,
    run_root: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
        // What a killed shim left (the kill -9 test cleans up itself; this is for failures).
        let _ = shim()
            .args(["sandbox", "cleanup", "--id", &self.id, "--run-root"])
            .arg(&self.run_root)
            .output();
    }
}

impl Running {
    /// `sandbox exec --id ID --run-root R ARGS`.
    fn exec(&self, args: &[&str]) -> Command {
        let mut c = shim();
        c.args(["sandbox", "exec", "--id", &self.id, "--run-root"])
            .arg(&self.run_root)
            .args(args);
        c
    }

    fn ps(&self, container: &str) -> String {
        let out = shim()
            .args(["sandbox", "ps", "--id", &self.id, "--container", container])
            .arg("--run-root")
            .arg(&self.run_root)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The virtiofsd processes serving this sandbox's share.
    fn virtiofsd(&self) -> Vec<u32> {
        let needle = format!("--shared-dir={}", self.run_root.display());
        processes_with(&needle)
    }
}

/// Pids of the processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .is_ok_and(|c| c.contains(needle))
        })
        .collect()
}

/// Mount points at or under `dir` in our mount namespace (the shim's).
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect()
}

/// Starts `sandbox run --json` and waits for its facts line.
fn start(id: &str, run_root: &Path) -> Running {
    let rootfs = guest_dir().join("rootfs");
    assert!(
        rootfs.join("bin/busybox").exists(),
        "{} is missing: run `make guest-assets`",
        rootfs.display()
    );
    let mut child = shim()
        .args(["sandbox", "run", "--json", "--config"])
        .arg(config("configuration-qemu.toml"))
        .args(["--id", id, "--run-root"])
        .arg(run_root)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the shim");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let running = Running {
        child,
        id: id.to_string(),
        run_root: run_root.to_path_buf(),
    };
    let line = rx
        .recv_timeout(READY_LIMIT)
        .unwrap_or_else(|_| panic!("sandbox {id} was not ready within {READY_LIMIT:?}"));
    let _: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("the shim printed no facts ({e}): {line:?}; see its log above"));
    running
}

/// Waits until `ready` holds, within 30 s.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let began = Instant::now();
    while !ready() {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "{what} did not happen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn explain(out: &Output) -> String {
    format!(
        "status {}, stdout {:?}, stderr {:?}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id())
}

#[test]
fn sandbox_exec_runs_containers_and_sigterm_leaves_no_virtiofsd_nor_mount() {
    require_root();
    let id = unique("exec");
    let run_root = tempfile::tempdir().unwrap();
    let mut r = start(&id, run_root.path());
    let daemons = r.virtiofsd();
    assert!(
        !daemons.is_empty(),
        "no virtiofsd serves the sandbox's share"
    );
    let shared = run_root.path().join("sandboxes").join(&id).join("shared");
    assert_eq!(
        mounts_under(run_root.path()),
        [shared.display().to_string()]
    );

    // Output and exit code come back, each stream on its own.
    let out = r
        .exec(&["--", "sh", "-c", "echo out; echo err >&2; exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", explain(&out));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    // A missing program is an error naming it, and leaves no bind mount.
    let out = r.exec(&["--", "/no/such/program"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert!(
        text(&out.stderr).contains("/no/such/program"),
        "{}",
        explain(&out)
    );
    assert_eq!(
        mounts_under(run_root.path()),
        [shared.display().to_string()]
    );

    // Two containers at once: a long one, and one that cannot see it.
    let long = format!("long{}", std::process::id());
    let mut first = r
        .exec(&[
            "--container",
            &long,
            "--",
            "sh",
            "-c",
            "hostname; exec sleep 120",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first container's sleep", || {
        r.ps(&long).contains("sleep 120")
    });
    let bind = shared.join(&long).join("rootfs");
    assert!(
        mounts_under(run_root.path()).contains(&bind.display().to_string()),
        "no bind mount of the first container's rootfs: {:?}",
        mounts_under(run_root.path())
    );
    let second = format!("second{}", std::process::id());
    let out = r
        .exec(&[
            "--container",
            &second,
            "--",
            "sh",
            "-c",
            "hostname; ps -o pid,args",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let seen = text(&out.stdout);
    assert!(seen.starts_with(&format!("{second}\n")), "{seen}");
    assert!(
        !seen.contains("sleep"),
        "the second container sees the first: {seen}"
    );
    // A process run in the first container sees its sleep as pid 2, after its init.
    let out = r
        .exec(&["--container", &long, "--join", "--", "ps", "-o", "pid,args"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let seen = text(&out.stdout);
    assert!(
        seen.lines().any(|l| l.trim() == "1 sleep 120"),
        "the joined process does not see the container's init: {seen}"
    );

    // SIGTERM while the first container runs: its exec ends with an error, and nothing is
    // left: no virtiofsd, no mount under the run root, no run directory.
    let pid = r.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let began = Instant::now();
    let status = loop {
        if let Some(s) = r.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            began.elapsed() < EXIT_LIMIT,
            "the shim did not exit within {EXIT_LIMIT:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the shim exited with {status}");
    let first_status = first.wait().unwrap();
    assert!(!first_status.success(), "the interrupted exec succeeded");
    let mut first_out = String::new();
    std::io::Read::read_to_string(first.stdout.as_mut().unwrap(), &mut first_out).unwrap();
    assert_eq!(first_out, format!("{long}\n"));
    for pid in daemons {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "virtiofsd {pid} is left"
        );
    }
    assert_eq!(r.virtiofsd(), Vec::<u32>::new(), "a virtiofsd is left");
    assert_eq!(mounts_under(run_root.path()), Vec::<String>::new());
    assert!(!run_root.path().join("sandboxes").join(&id).exists());
    assert!(!run_root.path().join("vm").join(&id).exists());
    assert!(
        guest_dir().join("rootfs/bin/busybox").exists(),
        "the rootfs was emptied"
    );
}

#[test]
fn sandbox_cleanup_after_kill_9_unmounts_the_shared_dir_and_its_binds() {
    require_root();
    let id = unique("exec9");
    let run_root = tempfile::tempdir().unwrap();
    let mut r = start(&id, run_root.path());
    let daemons = r.virtiofsd();
    assert!(
        !daemons.is_empty(),
        "no virtiofsd serves the sandbox's share"
    );
    let container = format!("k{}", std::process::id());
    let mut running = r
        .exec(&["--container", &container, "--", "sleep", "120"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let shared = run_root.path().join("sandboxes").join(&id).join("shared");
    let bind = shared.join(&container).join("rootfs");
    wait_for("the container's sleep", || {
        r.ps(&container).contains("sleep 120")
    });

    assert!(Command::new("kill")
        .args(["-KILL", &r.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    r.child.wait().unwrap();
    assert!(!running.wait().unwrap().success());
    // The dead shim's mounts stay until the cleanup.
    assert_eq!(
        mounts_under(run_root.path()),
        [shared.display().to_string(), bind.display().to_string()]
    );

    let out = shim()
        .args(["sandbox", "cleanup", "--id", &id, "--run-root"])
        .arg(run_root.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("removed mount {}", bind.display())),
        "{said}"
    );
    assert!(
        said.contains(&format!("removed mount {}", shared.display())),
        "{said}"
    );
    assert_eq!(mounts_under(run_root.path()), Vec::<String>::new());
    wait_for("the virtiofsd exit", || r.virtiofsd().is_empty());
    assert!(!run_root.path().join("sandboxes").join(&id).exists());
    assert!(!run_root.path().join("vm").join(&id).exists());
    assert!(
        guest_dir().join("rootfs/bin/busybox").exists(),
        "the cleanup emptied the rootfs"
    );
}
