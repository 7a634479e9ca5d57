//! The guest container runtime, run as root on this host (it only needs namespaces): busybox
//! root filesystems in temp dirs, real namespaces, `pivot_root`, ptys and signals.
//!
//! Tests hold one lock: each checks that it left no child process and no mount behind, which
//! only means something when no other test's containers are alive.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use anyhow::{bail, ensure, Context, Result};
use guest_agent::runtime::{Error, ExitStatus, Runtime, Stdio};
use oci_spec::runtime::{Process, Spec};
use serde_json::json;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ps", "sleep", "stty", "hostname", "id", "pwd", "ls", "grep", "true",
    "touch", "tty",
];

fn busybox() -> Result<PathBuf> {
    let cached =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/guest/busybox-root/bin/busybox");
    for candidate in [cached.as_path(), Path::new("/bin/busybox")] {
        if let Ok(out) = std::process::Command::new("file").arg(candidate).output() {
            if String::from_utf8_lossy(&out.stdout).contains("statically linked") {
                return Ok(candidate.to_path_buf());
            }
        }
    }
    bail!("no static busybox: run `make guest-assets` or install busybox-static")
}

/// A busybox root filesystem in a temp dir; `path()` is the rootfs.
struct Rootfs {
    dir: tempfile::TempDir,
}

impl Rootfs {
    fn new() -> Result<Rootfs> {
        let dir = tempfile::Builder::new().prefix("runtime-test").tempdir()?;
        let root = dir.path().join("rootfs");
        for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "work"] {
            fs::create_dir_all(root.join(sub))?;
        }
        fs::copy(busybox()?, root.join("bin/busybox")).context("copying busybox")?;
        for applet in APPLETS {
            symlink("busybox", root.join("bin").join(applet))?;
        }
        Ok(Rootfs { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

fn process_json(args: &[&str]) -> serde_json::Value {
    json!({
        "args": args,
        "env": ["PATH=/bin", "HOME=/root"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
    })
}

fn spec_json(args: &[&str]) -> serde_json::Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process_json(args),
        "root": {"path": "rootfs"},
        "hostname": "container",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
        ],
    })
}

fn spec(value: serde_json::Value) -> Spec {
    serde_json::from_value(value).expect("a valid spec")
}

fn process(args: &[&str]) -> Process {
    serde_json::from_value(process_json(args)).expect("a valid process")
}

/// Reads an fd to its end (a pty master ends with EIO once the slave is gone).
fn read_all(fd: Option<OwnedFd>) -> String {
    let mut file = fs::File::from(fd.expect("an output fd"));
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match file.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reader(fd: Option<OwnedFd>) -> thread::JoinHandle<String> {
    thread::spawn(move || read_all(fd))
}

/// Children of this test process (the runtime's processes are its direct children).
fn children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let status = fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if status
            .lines()
            .any(|l| l.strip_prefix("PPid:").map(str::trim) == Some(me.as_str()))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Mounts, in any mount namespace on the host, of something from `dir`. Matched on the temp
/// dir's unique name: a bind mount's root field is relative to its filesystem (/tmp may be one).
fn mounts_of(dir: &Path) -> Vec<String> {
    let needle = format!("/{}/", dir.file_name().unwrap().to_string_lossy());
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        let mountinfo = fs::read_to_string(entry.path().join("mountinfo")).unwrap_or_default();
        found.extend(
            mountinfo
                .lines()
                .filter(|l| l.contains(&needle))
                .map(|l| format!("{:?}: {l}", entry.path())),
        );
    }
    found
}

fn assert_nothing_left(runtime: &Runtime, rootfs: &Rootfs) -> Result<()> {
    ensure!(
        runtime.list().is_empty(),
        "containers left: {:?}",
        runtime.list()
    );
    let kids = children();
    ensure!(kids.is_empty(), "child processes left: {kids:?}");
    let mounts = mounts_of(rootfs.dir.path());
    ensure!(mounts.is_empty(), "mounts left: {mounts:#?}");
    Ok(())
}

/// The fds this process has open (the runtime's pipes, ptys, pidfds and eventfd must all close).
fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .map(|e| {
            let target = fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect();
    fds.sort();
    fds
}

fn assert_same_fds(before: &[String]) -> Result<()> {
    let after = open_fds();
    let leaked: Vec<&String> = after.iter().filter(|fd| !before.contains(fd)).collect();
    ensure!(leaked.is_empty(), "fds left open: {leaked:?}");
    Ok(())
}

fn exited(code: i32) -> impl Fn(&ExitStatus) -> bool {
    move |s| s.code == Some(code) && s.signal.is_none() && s.exited_at_ms > 0
}

#[test]
fn output_stderr_and_exit_code_are_exact() -> Result<()> {
    let _serial = serial();
    let fds = open_fds();
    let rootfs = Rootfs::new()?;
    let runtime = Runtime::new()?;
    let spec = spec(spec_json(&["sh", "-c", "echo out; echo err >&2; exit 3"]));
    let io = runtime.create(
        "exact",
        &rootfs.path(),
        &spec,
        Stdio::Pipes { stdin: false },
    )?;
    ensure!(io.stdin.is_none(), "no stdin was asked for");
    let (out, err) = (reader(io.stdout), reader(io.stderr));
    let pid = runtime.start("exact")?;
    ensure!(pid == io.pid, "start returned {pid}, create {}", io.pid);
    let status = runtime.wait("exact", None)?;
    ensure!(exited(3)(&status), "status {status:?}");
    assert_eq!(out.join().unwrap(), "out\n");
    assert_eq!(err.join().unwrap(), "err\n");
    // A wait after the exit returns the same status at once.
    assert_eq!(runtime.wait("exact", None)?, status);
    runtime.delete("exact")?;
    assert_nothing_left(&runtime, &rootfs)?;
    drop(runtime);
    assert_same_fds(&fds)
}

#[test]
fn stdin_reaches_the_process_and_closing_it_ends_cat() -> Result<()> {
    let _serial = serial();
    let rootfs = Rootfs::new()?;
    let runtime = Runtime::new()?;
    let spec = spec(spec_json(&["cat"]));
    let io = runtime.create("stdin", &rootfs.path(), &spec, Stdio::Pipes { stdin: true })?;
    let out = reader(io.stdout);
    runtime.start("stdin")?;
    let mut stdin = fs::File::from(io.stdin.context("stdin")?);
    stdin.write_all(b"hello through cat\n")?;
    drop(stdin);
    let status = runtime.wait("stdin", None)?;
    ensure!(exited(0)(&status), "status {status:?}");
    assert_eq!(out.join().unwrap(), "hello through cat\n");
    runtime.delete("stdin")?;
    assert_nothing_left(&runtime, &rootfs)
}

#[test]
fn sigterm_and_sigkill_are_reported_and_signalling_an_exited_process_is_ok() -> Result<()> {
    let _serial = serial();
    let fds = open_fds();
    let rootfs = Rootfs::new()?;
    let runtime = Arc::new(Runtime::new()?);
    let spec = spec(spec_json(&["sleep", "1000"]));
    runtime.create(
        "signals",
        &rootfs.path(),
        &spec,
        Stdio::Pipes { stdin: false },
    )?;
    runtime.start("signals")?;
    runtime.exec(
        "signals",
        "term",
        &process(&["sleep", "1001"]),
        Stdio::Pipes { stdin: false },
    )?;
    runtime.signal("signals", Some("term"), libc::SIGTERM, false)?;
    let status = runtime.wait("signals", Some("term"))?;
    ensure!(
        status.signal == Some(libc::SIGTERM) && status.code.is_none(),
        "{status:?}"
    );
    runtime.signal("signals", Some("term"), libc::SIGKILL, false)?;

    // The reaper leaves other children alone: std::process::Command still waits for its own,
    // and a spawn whose exec fails (std waits for that child itself) is an error, not a panic.
    let status = std::process::Command::new("true").status()?;
    ensure!(
        status.success(),
        "Command lost its child's status: {status:?}"
    );
    ensure!(
        std::process::Command::new("/no/such/program")
            .spawn()
            .is_err(),
        "spawning a missing program succeeded"
    );

    // Several waiters on the init, all woken by its exit.
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let runtime = runtime.clone();
            thread::spawn(move || runtime.wait("signals", None))
        })
        .collect();
    runtime.signal("signals", None, libc::SIGKILL, false)?;
    for waiter in waiters {
        let status = waiter.join().unwrap()?;
        ensure!(status.signal == Some(libc::SIGKILL), "{status:?}");
    }
    runtime.signal("signals", None, libc::SIGKILL, false)?;
    runtime.signal("signals", None, libc::SIGKILL, true)?;
    runtime.delete("signals")?;
    assert_nothing_left(&runtime, &rootfs)?;
    drop(runtime);
    assert_same_fds(&fds)
}

#[test]
fn exec_ps_sees_only_the_container_processes() -> Result<()> {
    let _serial = serial();
    let rootfs = Rootfs::new()?;
    let runtime = Runtime::new()?;
    let spec = spec(spec_json(&["sleep", "1000"]));
    runtime.create("ps", &rootfs.path(), &spec, Stdio::Pipes { stdin: false })?;
    runtime.start("ps")?;
    let io = runtime.exec(
        "ps",
        "ps",
        &process(&["ps", "-o", "pid,args"]),
        Stdio::Pipes { stdin: false },
    )?;
    let out = reader(io.stdout);
    let status = runtime.wait("ps", Some("ps"))?;
    let out = out.join().unwrap();
    ensure!(exited(0)(&status), "ps: {status:?}");
    let rows: Vec<(u32, String)> = out
        .lines()
        .skip(1)
        .map(|l| {
            let (pid, args) = l.trim().split_once(' ').unwrap_or((l, ""));
            (pid.parse().unwrap_or(0), args.trim().to_string())
        })
        .collect();
    ensure!(rows.len() == 2, "ps saw other processes:\n{out}");
    ensure!(rows[0] == (1, "sleep 1000".to_string()), "ps:\n{out}");
    ensure!(rows[1].1 == "ps -o pid,args", "ps:\n{out}");

    let listed = runtime.ps("ps")?;
    ensure!(listed.len() == 1, "{listed:?}");
    ensure!(
        listed[0].pid == 1 && listed[0].cmd == "sleep 1000",
        "{listed:?}"
    );
    runtime.delete("ps")?;
    assert_nothing_left(&runtime, &rootfs)
}

/// Reads a pty master until `want` has been seen; returns everything read.
fn read_until(master: &mut fs::File, want: &str) -> Result<String> {
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while !seen.contains(want) {
        let n = master
            .read(&mut buf)
            .with_context(|| format!("reading until {want:?}, after {seen:?}"))?;
        ensure!(n > 0, "terminal closed before {want:?}: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    Ok(seen)
}

/// The terminal's name as `tty` printed it: a line `/dev/pts/N`.
fn pts_name(out: &str) -> Result<String> {
    out.lines()
        .map(str::trim)
        .find(|l| {
            l.strip_prefix("/dev/pts/")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
        .with_context(|| format!("`tty` printed no /dev/pts/N: {out:?}"))
}

/// A terminal process's pty is the container's: `tty` names one of the container's own devpts
/// instance (the init the first, /dev/pts/0; an exec'd process the next), stdin is a terminal,
/// and `stty size` follows the size given and each resize, for the init and an exec'd process.
#[test]
fn terminal_stty_size_follows_resize() -> Result<()> {
    let _serial = serial();
    let fds = open_fds();
    let rootfs = Rootfs::new()?;
    let runtime = Runtime::new()?;
    let script = "tty; test -t 0 && echo stdin-is-a-tty; stty size; read line; stty size";
    let spec = spec(spec_json(&["sh", "-c", script]));
    let io = runtime.create(
        "tty",
        &rootfs.path(),
        &spec,
        Stdio::Terminal { rows: 24, cols: 80 },
    )?;
    ensure!(io.stderr.is_none(), "a terminal has no separate stderr");
    let mut master = fs::File::from(io.stdout.context("pty master")?);
    let mut stdin = fs::File::from(io.stdin.context("pty stdin")?);
    runtime.start("tty")?;
    let seen = read_until(&mut master, "24 80")?;
    ensure!(pts_name(&seen)? == "/dev/pts/0", "init's tty: {seen:?}");
    ensure!(seen.contains("stdin-is-a-tty"), "init: {seen:?}");

    let exec_io = runtime.exec(
        "tty",
        "sh",
        &process(&["sh", "-c", &script.replace("stdin-is", "exec-stdin-is")]),
        Stdio::Terminal { rows: 30, cols: 90 },
    )?;
    ensure!(
        exec_io.stderr.is_none(),
        "a terminal has no separate stderr"
    );
    let mut exec_master = fs::File::from(exec_io.stdout.context("exec pty master")?);
    let mut exec_stdin = fs::File::from(exec_io.stdin.context("exec pty stdin")?);
    let exec_seen = read_until(&mut exec_master, "30 90")?;
    ensure!(
        pts_name(&exec_seen)? == "/dev/pts/1",
        "exec's tty: {exec_seen:?}"
    );
    ensure!(
        exec_seen.contains("exec-stdin-is-a-tty"),
        "exec: {exec_seen:?}"
    );
    runtime.resize("tty", Some("sh"), 50, 120)?;
    exec_stdin.write_all(b"go\n")?;
    drop(exec_stdin);
    let rest = read_all(Some(exec_master.into()));
    ensure!(rest.contains("50 120"), "exec after resize: {rest:?}");
    let status = runtime.wait("tty", Some("sh"))?;
    ensure!(exited(0)(&status), "exec: {status:?}");

    runtime.resize("tty", None, 40, 100)?;
    stdin.write_all(b"go\n")?;
    drop(stdin);
    let rest = read_all(Some(master.into()));
    ensure!(rest.contains("40 100"), "after resize: {rest:?}");
    let status = runtime.wait("tty", None)?;
    ensure!(exited(0)(&status), "{status:?}");
    runtime.delete("tty")?;
    assert_nothing_left(&runtime, &rootfs)?;
    drop(runtime);
    assert_same_fds(&fds)
}

#[test]
fn two_containers_cannot_see_each_others_processes_or_files() -> Result<()> {
    let _serial = serial();
    let (a, b) = (Rootfs::new()?, Rootfs::new()?);
    fs::write(a.path().join("tmp/a-secret"), "a")?;
    let runtime = Runtime::new()?;
    runtime.create(
        "iso-a",
        &a.path(),
        &spec(spec_json(&["sleep", "1001"])),
        Stdio::Pipes { stdin: false },
    )?;
    runtime.create(
        "iso-b",
        &b.path(),
        &spec(spec_json(&["sleep", "1002"])),
        Stdio::Pipes { stdin: false },
    )?;
    runtime.start("iso-a")?;
    runtime.start("iso-b")?;
    let look = process(&[
        "sh",
        "-c",
        "ps -o args; ls /tmp; echo written > /tmp/b-file",
    ]);
    let io = runtime.exec("iso-b", "look", &look, Stdio::Pipes { stdin: false })?;
    let out = reader(io.stdout);
    ensure!(
        exited(0)(&runtime.wait("iso-b", Some("look"))?),
        "look failed"
    );
    let out = out.join().unwrap();
    ensure!(
        out.contains("sleep 1002"),
        "b does not see its own init:\n{out}"
    );
    ensure!(!out.contains("sleep 1001"), "b sees a's process:\n{out}");
    ensure!(!out.contains("a-secret"), "b sees a's file:\n{out}");
    ensure!(
        !a.path().join("tmp/b-file").exists(),
        "b wrote into a's rootfs"
    );
    ensure!(
        b.path().join("tmp/b-file").exists(),
        "b's write did not land in its rootfs"
    );
    ensure!(
        runtime.ps("iso-a")?.iter().all(|p| p.cmd == "sleep 1001"),
        "a's ps"
    );
    runtime.delete("iso-a")?;
    runtime.delete("iso-b")?;
    assert_nothing_left(&runtime, &a)?;
    assert_nothing_left(&runtime, &b)
}

#[test]
fn hostname_env_cwd_user_rlimits_and_no_new_privileges_are_honoured() -> Result<()> {
    let _serial = serial();
    let rootfs = Rootfs::new()?;
    let runtime = Runtime::new()?;
    let mut value = spec_json(&[
        "sh",
        "-c",
        "hostname; echo $FOO; pwd; id -u; id -g; id -G; ulimit -n; grep NoNewPrivs /proc/self/status; ls /dev",
    ]);
    value["hostname"] = json!("honoured");
    value["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    value["process"]["cwd"] = json!("/work");
    value["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [2000]});
    value["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]);
    value["process"]["noNewPrivileges"] = json!(true);
    let io = runtime.create(
        "honoured",
        &rootfs.path(),
        &spec(value),
        Stdio::Pipes { stdin: false },
    )?;
    let (out, err) = (reader(io.stdout), reader(io.stderr));
    runtime.start("honoured")?;
    let status = runtime.wait("honoured", None)?;
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    ensure!(exited(0)(&status), "{status:?}: {err}");
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines[..7]
            == [
                "honoured",
                "bar",
                "/work",
                "1000",
                "1001",
                "1001 2000",
                "123"
            ],
        "{out}"
    );
    ensure!(
        lines[7].split_whitespace().eq(["NoNewPrivs:", "1"]),
        "{out}"
    );
    let devices: Vec<&str> = lines[8..]
        .iter()
        .flat_map(|l| l.split_whitespace())
        .collect();
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "mqueue",
    ] {
        ensure!(devices.contains(&dev), "/dev lacks {dev}: {devices:?}");
    }
    runtime.delete("honoured")?;
    assert_nothing_left(&runtime, &rootfs)
}

fn expect_err<T: std::fmt::Debug>(result: Result<T, Error>) -> Result<Error> {
    match result {
        Ok(v) => bail!("expected an error, got {v:?}"),
        Err(e) => Ok(e),
    }
}

#[test]
fn bad_input_is_named_and_leaves_no_process_and_no_mount() -> Result<()> {
    let _serial = serial();
    let fds = open_fds();
    let rootfs = Rootfs::new()?;
    let runtime = Runtime::new()?;
    let pipes = Stdio::Pipes { stdin: false };

    let missing = rootfs.dir.path().join("no-such-rootfs");
    let err = expect_err(runtime.create("bad", &missing, &spec(spec_json(&["true"])), pipes))?;
    ensure!(matches!(err, Error::RootfsMissing { .. }), "{err:?}");
    ensure!(err.to_string().contains("no-such-rootfs"), "{err}");
    assert_nothing_left(&runtime, &rootfs)?;

    let err = expect_err(runtime.create(
        "bad",
        &rootfs.path(),
        &spec(spec_json(&["no-such-binary"])),
        pipes,
    ))?;
    ensure!(matches!(err, Error::ExecutableNotFound { .. }), "{err:?}");
    ensure!(err.to_string().contains("\"no-such-binary\""), "{err}");
    assert_nothing_left(&runtime, &rootfs)?;

    let mut value = spec_json(&["true"]);
    value["process"]["user"] = json!({"uid": 4294967295u32, "gid": 0});
    let err = expect_err(runtime.create("bad", &rootfs.path(), &spec(value), pipes))?;
    ensure!(err.to_string().contains("uid 4294967295"), "{err}");
    assert_nothing_left(&runtime, &rootfs)?;

    let err = expect_err(runtime.start("bad"))?;
    ensure!(matches!(err, Error::UnknownContainer(_)), "{err:?}");

    // A terminal is the container's pty: without a devpts at /dev/pts there is none to open.
    let mut value = spec_json(&["true"]);
    value["mounts"]
        .as_array_mut()
        .context("mounts")?
        .retain(|m| m["type"] != "devpts");
    let terminal = Stdio::Terminal { rows: 24, cols: 80 };
    let err = expect_err(runtime.create("bad", &rootfs.path(), &spec(value), terminal))?;
    ensure!(matches!(err, Error::Setup { .. }), "{err:?}");
    ensure!(
        err.to_string()
            .contains("Opening the container's /dev/ptmx"),
        "{err}"
    );
    assert_nothing_left(&runtime, &rootfs)?;

    // In a running container: a missing binary for exec, an unknown exec id.
    runtime.create(
        "ok",
        &rootfs.path(),
        &spec(spec_json(&["sleep", "1000"])),
        pipes,
    )?;
    runtime.start("ok")?;
    let err = expect_err(runtime.exec("ok", "x", &process(&["/bin/no-such-binary"]), pipes))?;
    ensure!(err.to_string().contains("\"/bin/no-such-binary\""), "{err}");
    ensure!(
        runtime.ps("ok")?.len() == 1,
        "exec left a process: {:?}",
        runtime.ps("ok")?
    );
    let err = expect_err(runtime.resize("ok", None, 10, 10))?;
    ensure!(matches!(err, Error::NoTerminal { .. }), "{err:?}");
    let err = expect_err(runtime.wait("ok", Some("x")))?;
    ensure!(matches!(err, Error::UnknownProcess { .. }), "{err:?}");
    runtime.delete("ok")?;
    assert_nothing_left(&runtime, &rootfs)?;
    drop(runtime);
    assert_same_fds(&fds)
}

#[test]
fn delete_before_start_leaves_nothing() -> Result<()> {
    let _serial = serial();
    let rootfs = Rootfs::new()?;
    let runtime = Runtime::new()?;
    let io = runtime.create(
        "early",
        &rootfs.path(),
        &spec(spec_json(&["echo", "never"])),
        Stdio::Pipes { stdin: false },
    )?;
    let mounts = mounts_of(rootfs.dir.path());
    ensure!(
        !mounts.is_empty(),
        "created container has no mounts: {:?}",
        fs::read_to_string(format!("/proc/{}/mountinfo", io.pid))
    );
    runtime.delete("early")?;
    ensure!(read_all(io.stdout).is_empty(), "the init ran before start");
    let err = expect_err(runtime.delete("early"))?;
    ensure!(matches!(err, Error::UnknownContainer(_)), "{err:?}");
    assert_nothing_left(&runtime, &rootfs)
}

#[test]
fn masked_and_read_only_paths_sysctls_and_spec_devices_apply() -> Result<()> {
    let _serial = serial();
    let rootfs = Rootfs::new()?;
    fs::write(rootfs.path().join("tmp/masked-file"), "secret")?;
    fs::create_dir(rootfs.path().join("tmp/masked-dir"))?;
    fs::write(rootfs.path().join("tmp/masked-dir/inside"), "secret")?;
    let runtime = Runtime::new()?;
    let mut value = spec_json(&[
        "sh",
        "-c",
        "cat /tmp/masked-file; echo \"[$(ls /tmp/masked-dir)]\"; \
         touch /work/x 2>/dev/null && echo writable || echo read-only; \
         cat /proc/sys/kernel/shmmax; ls -ln /dev/custom-null",
    ]);
    value["linux"] = json!({
        "maskedPaths": ["/tmp/masked-file", "/tmp/masked-dir", "/tmp/not-there"],
        "readonlyPaths": ["/work", "/not-there"],
        "sysctl": {"kernel.shmmax": "12345678"},
        "devices": [{"path": "/dev/custom-null", "type": "c", "major": 1, "minor": 3,
                     "fileMode": 438, "uid": 1000, "gid": 1001}],
    });
    let io = runtime.create(
        "linux",
        &rootfs.path(),
        &spec(value),
        Stdio::Pipes { stdin: false },
    )?;
    let (out, err) = (reader(io.stdout), reader(io.stderr));
    runtime.start("linux")?;
    let status = runtime.wait("linux", None)?;
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    ensure!(exited(0)(&status), "{status:?}: {err}");
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines[..3] == ["[]", "read-only", "12345678"], "{out}");
    let device: Vec<&str> = lines[3].split_whitespace().collect();
    ensure!(
        device[0] == "crw-rw-rw-" && device[2..6] == ["1000", "1001", "1,", "3"],
        "{out}"
    );
    ensure!(
        !rootfs.path().join("work/x").exists(),
        "the read-only path was written"
    );
    runtime.delete("linux")?;
    assert_nothing_left(&runtime, &rootfs)
}

/// Runs [`a_root_that_cannot_be_pivoted_falls_back_to_move_and_chroot_inner`] in a child
/// process: it needs a chroot and a mount namespace of its own.
#[test]
fn a_root_that_cannot_be_pivoted_falls_back_to_move_and_chroot() -> Result<()> {
    let _serial = serial();
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "a_root_that_cannot_be_pivoted_falls_back_to_move_and_chroot_inner",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("RUNTIME_TEST_NO_PIVOT", "1")
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "inner test failed:\n{text}");
    ensure!(text.contains("1 passed"), "inner test did not run:\n{text}");
    Ok(())
}

/// pivot_root refuses a caller whose root is not a mount point, as on an initramfs (whose root
/// mount has no parent): the runtime must still give the container its root, by moving it onto
/// `/` and chrooting. Here the caller is chrooted into a plain directory.
#[test]
#[ignore = "run by a_root_that_cannot_be_pivoted_falls_back_to_move_and_chroot"]
fn a_root_that_cannot_be_pivoted_falls_back_to_move_and_chroot_inner() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    ensure!(
        std::env::var_os("RUNTIME_TEST_NO_PIVOT").is_some(),
        "run only by its outer test"
    );
    let jail = tempfile::Builder::new().prefix("runtime-jail").tempdir()?;
    let rootfs = Rootfs::new()?;
    let inner_root = jail.path().join("rootfs");
    fs::rename(rootfs.path(), &inner_root)?;
    fs::create_dir(jail.path().join("proc"))?;
    // This thread alone: a mount namespace and a root of its own (threads it spawns share them).
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_FS)?;
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
    mount(
        Some("proc"),
        &jail.path().join("proc"),
        Some("proc"),
        MsFlags::empty(),
        none,
    )?;
    nix::unistd::chroot(jail.path())?;
    nix::unistd::chdir("/")?;

    let runtime = Runtime::new()?;
    let spec = spec(spec_json(&["sh", "-c", "ls /; echo done"]));
    let io = runtime.create(
        "nopivot",
        Path::new("/rootfs"),
        &spec,
        Stdio::Pipes { stdin: false },
    )?;
    let (out, err) = (reader(io.stdout), reader(io.stderr));
    runtime.start("nopivot")?;
    let status = runtime.wait("nopivot", None)?;
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    ensure!(exited(0)(&status), "{status:?}: {err}");
    let entries: Vec<&str> = out.split_whitespace().collect();
    ensure!(
        entries == ["bin", "dev", "etc", "proc", "sys", "tmp", "work", "done"],
        "the container's root is not its rootfs: {out}"
    );
    runtime.delete("nopivot")?;
    Ok(())
}

/// `grep Cap /proc/self/status` as a map of set name to mask.
fn cap_masks(out: &str) -> std::collections::HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn capabilities_of_the_spec_are_the_processes_capabilities() -> Result<()> {
    let _serial = serial();
    let rootfs = Rootfs::new()?;
    let runtime = Runtime::new()?;
    let show = ["sh", "-c", "grep Cap /proc/self/status; sleep 1000"];
    let mut value = spec_json(&show);
    let chown_kill = json!(["CAP_CHOWN", "CAP_KILL"]);
    value["process"]["capabilities"] = json!({
        "bounding": chown_kill, "effective": chown_kill, "permitted": chown_kill,
    });
    let io = runtime.create(
        "caps",
        &rootfs.path(),
        &spec(value),
        Stdio::Pipes { stdin: false },
    )?;
    let mut stdout = fs::File::from(io.stdout.context("stdout")?);
    runtime.start("caps")?;
    let mut out = String::new();
    let mut buf = [0u8; 512];
    while !out.contains("CapAmb") {
        let n = stdout.read(&mut buf)?;
        ensure!(n > 0, "init ended early: {out}");
        out.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let init = cap_masks(&out);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        ensure!(init[set] == "0000000000000021", "{set} of root: {out}");
    }

    // A non-root process keeps across exec only what is ambient.
    let mut process = process_json(&["grep", "Cap", "/proc/self/status"]);
    let kill = json!(["CAP_KILL"]);
    process["user"] = json!({"uid": 1000, "gid": 1000});
    process["capabilities"] = json!({
        "bounding": kill, "effective": kill, "permitted": kill, "inheritable": kill, "ambient": kill,
    });
    let process: Process = serde_json::from_value(process)?;
    let io = runtime.exec("caps", "user", &process, Stdio::Pipes { stdin: false })?;
    let out = reader(io.stdout);
    ensure!(
        exited(0)(&runtime.wait("caps", Some("user"))?),
        "exec failed"
    );
    let out = out.join().unwrap();
    let user = cap_masks(&out);
    for set in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        ensure!(user[set] == "0000000000000020", "{set} of uid 1000: {out}");
    }
    runtime.delete("caps")?;
    assert_nothing_left(&runtime, &rootfs)
}
