//! What the shim's test binaries share: the built binary, the repository's files, the guest
//! assets, the reading of `sandbox check` output, and a `sandbox run` child ([`start`]).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test.
pub const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-kata-v2");

/// A file of the repository's `configs/`.
pub fn config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name)
}

/// `$GUEST_DIR` or the repository's `.cache/guest`, checked to hold the guest.
pub fn guest_dir() -> PathBuf {
    let assets = workspace_tests::GuestAssets::find();
    assets
        .kernel
        .parent()
        .expect("the kernel is in a directory")
        .to_path_buf()
}

/// The `sandbox check` line about `name` (its second word), failing with the whole output
/// when there is none.
pub fn check_line(stdout: &str, name: &str) -> String {
    stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} line in:\n{stdout}"))
        .to_string()
}

pub const READY_LIMIT: Duration = Duration::from_secs(240);
pub const EXIT_LIMIT: Duration = Duration::from_secs(60);

pub fn shim() -> Command {
    let mut c = Command::new(SHIM);
    c.env("GUEST_DIR", guest_dir());
    c
}

/// A `sandbox run` child, killed if the test fails half-way.
pub struct Running {
    /// The shim.
    pub child: Child,
    /// Its facts (`--json`).
    pub facts: serde_json::Value,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}

/// Starts `sandbox run --json --config CONFIG` and waits for its facts line.
pub fn start(config: &Path, id: &str, run_root: &Path, extra: &[&str]) -> Running {
    let mut child = shim()
        .args(["sandbox", "run", "--json", "--config"])
        .arg(config)
        .args(["--id", id, "--run-root"])
        .arg(run_root)
        .args(extra)
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
    let mut running = Running {
        child,
        facts: serde_json::Value::Null,
    };
    let line = rx
        .recv_timeout(READY_LIMIT)
        .unwrap_or_else(|_| panic!("sandbox {id} was not ready within {READY_LIMIT:?}"));
    running.facts = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("the shim printed no facts ({e}): {line:?}; see its log above"));
    running
}

/// Whether `ip` answers a ping from namespace `netns` within 30 s.
pub fn ping(netns: &str, ip: &str) -> bool {
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(30) {
        let ok = Command::new("ip")
            .args(["netns", "exec", netns, "ping", "-c", "1", "-W", "1", ip])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return true;
        }
    }
    false
}

/// Sends SIGTERM and waits for a clean exit.
pub fn stop(mut r: Running) {
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
    assert!(
        status.success(),
        "the shim exited with {status} after SIGTERM"
    );
}

/// A configuration with templates on, its store in `dir/templates`, no shared directory
/// (templates refuse it), the guest of `guest` (a directory with vmlinuz and initramfs.img).
pub fn template_config(dir: &Path, guest: &Path) -> PathBuf {
    let text = std::fs::read_to_string(config("configuration-qemu.toml")).unwrap();
    let text = text
        .replace("${GUEST_DIR}", &guest.display().to_string())
        .replace("shared_fs = \"virtio-fs\"", "shared_fs = \"none\"");
    assert!(
        text.contains("shared_fs = \"none\""),
        "the shipped config changed"
    );
    let text = format!(
        "{text}\n[factory]\nenable_template = true\ntemplate_path = \"{}\"\n",
        dir.join("templates").display()
    );
    let file = dir.join("configuration.toml");
    std::fs::write(&file, text).unwrap();
    file
}

/// The output of `argv` run in the guest (`sandbox guest`).
pub fn guest(run_root: &Path, id: &str, argv: &[&str]) -> String {
    let out = shim()
        .args(["sandbox", "guest", "--id", id, "--run-root"])
        .arg(run_root)
        .arg("--")
        .args(argv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sandbox guest {argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
