//! The shim under Debian's containerd, run privately (`workspace_tests::containerd`), driven
//! with `ctr`: a busybox image built offline and imported, containers run with
//! `--runtime io.containerd.kata.v2` (this crate's binary, first on containerd's `PATH`), and
//! nothing left after each test. The first test runs the same image under runc: it proves
//! the harness and the image, whatever the shim does.

mod common;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use workspace_tests::containerd::{
    run_with_timeout, Containerd, Image, Options, Ran, IMAGE_USER, KATA_RUNTIME, RUNC_RUNTIME,
};
use workspace_tests::{require_root, unique_name};

/// One VM at a time in this binary (2 cores, guests under TCG).
static VM: Mutex<()> = Mutex::new(());

/// How long a `ctr` command that boots or stops a VM may take.
const VM_CALL: Duration = Duration::from_secs(180);

fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// The image most tests run: `sh`, with an environment variable, a working directory and a
/// non-root user in its config.
fn configured_image() -> Image {
    Image {
        env: vec!["PATH=/bin".into(), "GREETING=hello from the image".into()],
        working_dir: "/work".into(),
        user: IMAGE_USER.1.into(),
        ..Image::busybox("configured")
    }
}

/// A private containerd that runs this crate's shim with the repository's QEMU
/// configuration and guest, with `images` imported.
fn kata_containerd(images: &[&Image]) -> Containerd {
    kata_containerd_with(common::config("configuration-qemu.toml").as_path(), images)
}

fn kata_containerd_with(config: &Path, images: &[&Image]) -> Containerd {
    require_root();
    let ctrd = Containerd::start(
        Options::default()
            .shim(common::SHIM)
            .env("KATA_CONF_FILE", config)
            .env("GUEST_DIR", common::guest_dir()),
    )
    .unwrap();
    for image in images {
        ctrd.import(image).unwrap();
    }
    ctrd
}

/// A private containerd (runc only), with `images` imported.
/// A case of both runtimes, run with runc: the busybox image on a containerd of its own.
fn on_runc(case: fn(Containerd, &str, &Image)) {
    let image = Image::busybox("1");
    case(runc_containerd(&[&image]), RUNC_RUNTIME, &image);
}

/// The same case with this shim, one VM case at a time.
fn on_kata(case: fn(Containerd, &str, &Image)) {
    let _vm = vm_lock();
    let image = Image::busybox("1");
    case(kata_containerd(&[&image]), KATA_RUNTIME, &image);
}

fn runc_containerd(images: &[&Image]) -> Containerd {
    let ctrd = Containerd::start(Options::default()).unwrap();
    for image in images {
        ctrd.import(image).unwrap();
    }
    ctrd
}

/// `ctr run --rm --runtime RUNTIME [FLAGS] IMAGE ID ARGS`, with `stdin`.
fn run_rm(
    ctrd: &Containerd,
    runtime: &str,
    flags: &[&str],
    image: &Image,
    id: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Ran {
    let mut argv = vec!["run", "--rm", "--runtime", runtime];
    argv.extend_from_slice(flags);
    argv.extend([image.name.as_str(), id]);
    argv.extend_from_slice(args);
    ctrd.ctr_output(&argv, stdin, VM_CALL).unwrap()
}

/// No task and no container is left in containerd.
fn assert_nothing_listed(ctrd: &Containerd) {
    let tasks = ctrd.tasks().unwrap();
    assert!(tasks.is_empty(), "tasks left: {tasks:?}");
    let containers = ctrd.ctr_ok(&["container", "ls", "-q"]).unwrap();
    assert!(
        containers.trim().is_empty(),
        "containers left: {containers}"
    );
}

/// Kills task `id` with SIGKILL, waits until it stopped, deletes it (its exit code, which
/// `ctr task delete` warns of, must be `code`) and its container.
fn kill_and_delete(ctrd: &Containerd, id: &str, code: i32) {
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]).unwrap();
    ctrd.wait_task_status(id, "STOPPED", Duration::from_secs(60))
        .unwrap();
    let deleted = ctrd
        .ctr_output(&["task", "delete", id], None, VM_CALL)
        .unwrap();
    // `ctr task delete` exits 0 and warns of a non-zero exit code.
    assert_eq!(deleted.code(), Some(0), "{deleted}");
    assert!(
        deleted
            .stderr
            .contains(&format!("exit with non-zero exit code {code}")),
        "{deleted}"
    );
    ctrd.ctr_ok(&["container", "rm", id]).unwrap();
}

/// Waits until `ctr task exec` of `cat FILE` in task `id` prints `want`.
fn wait_file_in_task(ctrd: &Containerd, id: &str, file: &str, want: &str) {
    let began = Instant::now();
    for n in 0.. {
        let exec_id = format!("cat{n}");
        let out = ctrd
            .ctr_output(
                &["task", "exec", "--exec-id", &exec_id, id, "cat", file],
                None,
                VM_CALL,
            )
            .unwrap();
        if out.code() == Some(0) && out.stdout == want {
            return;
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "{file} in task {id} never read {want:?}: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn runc_runs_the_offline_image_with_its_config_and_exit_code() {
    let image = configured_image();
    let plain = Image::busybox("1");
    let ctrd = runc_containerd(&[&plain, &image]);
    let id = unique_name("rc");
    // A container of its own: a run that reused the first id at once was seen to lose its
    // output with runc's shim (as in containerd issue 770).
    let second = unique_name("rc");

    let out = run_rm(
        &ctrd,
        RUNC_RUNTIME,
        &[],
        &plain,
        &id,
        &["sh", "-c", "echo hi; exit 7"],
        None,
    );
    assert_eq!(out.code(), Some(7), "{out}");
    assert_eq!(out.stdout, "hi\n", "{out}");

    let out = run_rm(
        &ctrd,
        RUNC_RUNTIME,
        &[],
        &image,
        &second,
        &["sh", "-c", "echo $GREETING; pwd; id -u; id -g; id -un"],
        None,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(
        out.stdout,
        format!(
            "hello from the image\n/work\n{0}\n{0}\n{1}\n",
            IMAGE_USER.0, IMAGE_USER.1
        ),
        "{out}"
    );

    assert_nothing_listed(&ctrd);
    ctrd.finish(&[&id, &second]).unwrap();
}

#[test]
fn containerd_asked_for_a_network_namespace_runs_in_it_and_only_in_it() {
    require_root();
    let ns = netdev::NetNs::create(&unique_name("cn")).unwrap();
    let ctrd = Containerd::start(Options {
        netns: Some(ns.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    let pid = ctrd.pid().expect("running");
    let inode = |path: &str| {
        std::fs::metadata(path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    };
    assert_eq!(
        inode(&format!("/proc/{pid}/ns/net")),
        inode(ns.path().to_str().unwrap()),
        "containerd is not in {}",
        ns.path().display()
    );
    // Its mounts stay the test's: the same mount namespace.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    ctrd.finish(&[]).unwrap();
    ns.delete().unwrap();
}

#[test]
fn kata_run_rm_prints_hi_and_exits_7() {
    let _vm = vm_lock();
    let image = Image::busybox("1");
    let ctrd = kata_containerd(&[&image]);
    let id = unique_name("kt");

    let out = run_rm(
        &ctrd,
        KATA_RUNTIME,
        &[],
        &image,
        &id,
        &["sh", "-c", "echo hi; exit 7"],
        None,
    );
    assert_eq!(out.code(), Some(7), "{out}");
    assert_eq!(out.stdout, "hi\n", "{out}");

    assert_nothing_listed(&ctrd);
    ctrd.finish(&[&id]).unwrap();
}

#[test]
fn kata_run_honours_the_image_env_cwd_and_user() {
    let _vm = vm_lock();
    let image = configured_image();
    let ctrd = kata_containerd(&[&image]);
    let id = unique_name("kt");

    let out = run_rm(
        &ctrd,
        KATA_RUNTIME,
        &[],
        &image,
        &id,
        &["sh", "-c", "echo $GREETING; pwd; id -u; id -g; id -un"],
        None,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(
        out.stdout,
        format!(
            "hello from the image\n/work\n{0}\n{0}\n{1}\n",
            IMAGE_USER.0, IMAGE_USER.1
        ),
        "{out}"
    );

    assert_nothing_listed(&ctrd);
    ctrd.finish(&[&id]).unwrap();
}

#[test]
fn kata_run_pipes_stdin_through_cat() {
    let _vm = vm_lock();
    let image = Image::busybox("1");
    let ctrd = kata_containerd(&[&image]);
    let id = unique_name("kt");
    let input: String = (0..2000).map(|n| format!("line {n}\n")).collect();

    let out = run_rm(
        &ctrd,
        KATA_RUNTIME,
        &[],
        &image,
        &id,
        &["cat"],
        Some(input.as_bytes()),
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout == input,
        "cat gave back {} bytes of {} (stderr {:?})",
        out.stdout.len(),
        input.len(),
        out.stderr
    );

    assert_nothing_listed(&ctrd);
    ctrd.finish(&[&id]).unwrap();
}

#[test]
fn runc_detached_task_is_listed_exec_d_and_killed_with_sigterm_then_sigkill() {
    on_runc(detached_task_is_listed_exec_d_and_killed);
}

#[test]
fn kata_detached_task_is_listed_exec_d_and_killed_with_sigterm_then_sigkill() {
    on_kata(detached_task_is_listed_exec_d_and_killed);
}

/// `run -d`, `task ls`, `task ps`, `task exec` (with and without a terminal), `task pause` and
/// `resume`, `task kill` (SIGTERM, caught; then SIGKILL), `task delete`.
fn detached_task_is_listed_exec_d_and_killed(ctrd: Containerd, runtime: &str, image: &Image) {
    let id = unique_name("kt");

    // The init catches SIGTERM (it writes a file) and stays, so only SIGKILL ends it.
    let script = "trap 'echo term >> /tmp/got-term' TERM; \
                  while true; do sleep 1000 & echo started > /tmp/ready; wait; done";
    let out = ctrd
        .ctr_output(
            &[
                "run",
                "-d",
                "--runtime",
                runtime,
                &image.name,
                &id,
                "sh",
                "-c",
                script,
            ],
            None,
            VM_CALL,
        )
        .unwrap();
    assert_eq!(out.code(), Some(0), "{out}");

    // task ls: listed and running, with a pid.
    let tasks = ctrd.tasks().unwrap();
    let row = tasks
        .iter()
        .find(|t| t.id == id)
        .unwrap_or_else(|| panic!("{id} is not in `ctr task ls`: {tasks:?}"));
    assert_eq!(row.status, "RUNNING", "{tasks:?}");
    assert_ne!(row.pid, 0, "{tasks:?}");

    // task ps: the init and its sleep, once it started.
    wait_file_in_task(&ctrd, &id, "/tmp/ready", "started\n");
    let ps = ctrd.ctr_ok(&["task", "ps", &id]).unwrap();
    let pids: Vec<&str> = ps
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(pids.len() >= 2, "`ctr task ps` shows {pids:?}:\n{ps}");

    // task exec: output, stderr and exit code of the exec'd process.
    let out = ctrd
        .ctr_output(
            &[
                "task",
                "exec",
                "--exec-id",
                "e1",
                &id,
                "sh",
                "-c",
                "echo exec-out; echo exec-err >&2; exit 3",
            ],
            None,
            VM_CALL,
        )
        .unwrap();
    assert_eq!(out.code(), Some(3), "{out}");
    assert_eq!(out.stdout, "exec-out\n", "{out}");
    assert!(out.stderr.contains("exec-err"), "{out}");

    // task exec -t: the exec'd process has a terminal of its own.
    let exec = ctrd.ctr(&[
        "task",
        "exec",
        "-t",
        "--exec-id",
        "e2",
        &id,
        "sh",
        "-c",
        "tty; test -t 0 && echo stdin-is-a-terminal; exit 4",
    ]);
    let mut script = std::process::Command::new("script");
    script.args(["-q", "-e", "-c", &shell_words(&exec), "/dev/null"]);
    let out = run_with_timeout(script, Some(b""), VM_CALL).unwrap();
    assert_eq!(out.code(), Some(4), "{out}");
    assert!(out.stdout.contains("/dev/pts/"), "{out}");
    assert!(out.stdout.contains("stdin-is-a-terminal"), "{out}");

    // task pause and resume.
    ctrd.ctr_ok(&["task", "pause", &id]).unwrap();
    assert_eq!(ctrd.task_status(&id).unwrap().as_deref(), Some("PAUSED"));
    ctrd.ctr_ok(&["task", "resume", &id]).unwrap();
    assert_eq!(ctrd.task_status(&id).unwrap().as_deref(), Some("RUNNING"));

    // SIGTERM (task kill's default) reaches the init, which stays.
    ctrd.ctr_ok(&["task", "kill", &id]).unwrap();
    wait_file_in_task(&ctrd, &id, "/tmp/got-term", "term\n");
    assert_eq!(ctrd.task_status(&id).unwrap().as_deref(), Some("RUNNING"));

    // SIGKILL ends it: exit code 137.
    kill_and_delete(&ctrd, &id, 137);

    assert_nothing_listed(&ctrd);
    ctrd.finish(&[&id]).unwrap();
}

/// `COMMAND ARGS` as one `sh` word list (for `script -c`).
fn shell_words(cmd: &std::process::Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

// No runc twin: under runc 1.1.5 here, busybox's `stty size` in the container fails with
// ECHILD on most runs, so it could not tell a harness mistake from runc's own.

#[test]
fn kata_run_with_a_terminal_gives_the_container_a_tty() {
    on_kata(run_with_a_terminal);
}

/// `run -t` under `script`: the container's stdin is a terminal, `tty` names it.
fn run_with_a_terminal(ctrd: Containerd, runtime: &str, image: &Image) {
    let id = unique_name("kt");

    // ctr -t needs a terminal on its stdin: `script` gives it one.
    let ctr = ctrd.ctr(&[
        "run",
        "--rm",
        "-t",
        "--runtime",
        runtime,
        &image.name,
        &id,
        "sh",
        "-c",
        "tty; test -t 0 && echo stdin-is-a-terminal; \
         n=0; until s=$(stty size 2>/dev/null) && [ \"$s\" != '0 0' ]; do \
           n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.1; done; \
         echo \"$s\"; exit 5",
    ]);
    let mut script = std::process::Command::new("script");
    // A terminal of 30 rows and 100 columns, which ctr passes on (ResizePty) once the task
    // started: the container waits for it, at most 10 s.
    let command = format!("stty rows 30 cols 100 && {}", shell_words(&ctr));
    script.args(["-q", "-e", "-c", &command, "/dev/null"]);
    let out = run_with_timeout(script, Some(b""), VM_CALL).unwrap();
    assert_eq!(out.code(), Some(5), "{out}");
    // Terminal output: CR LF line ends (and what `script` echoes of its stdin first).
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    assert!(
        lines.iter().any(|l| l.ends_with("/dev/pts/0")),
        "no /dev/pts/0 from tty: {out}"
    );
    assert!(lines.contains(&"stdin-is-a-terminal"), "{out}");
    assert!(
        lines.contains(&"30 100"),
        "stty size did not say 30 100: {out}"
    );

    assert_nothing_listed(&ctrd);
    ctrd.finish(&[&id]).unwrap();
}

#[test]
fn runc_shim_killed_is_reported_exited_and_task_delete_leaves_nothing() {
    on_runc(shim_killed_is_reported_exited);
}

#[test]
fn kata_shim_killed_is_reported_exited_and_task_delete_leaves_nothing() {
    on_kata(shim_killed_is_reported_exited);
}

/// `kill -9` of the task's shim: containerd publishes the task's exit; `task delete` then
/// leaves nothing.
fn shim_killed_is_reported_exited(ctrd: Containerd, runtime: &str, image: &Image) {
    let id = unique_name("kt");

    let out = ctrd
        .ctr_output(
            &[
                "run",
                "-d",
                "--runtime",
                runtime,
                &image.name,
                &id,
                "sleep",
                "1000",
            ],
            None,
            VM_CALL,
        )
        .unwrap();
    assert_eq!(out.code(), Some(0), "{out}");
    ctrd.wait_task_status(&id, "RUNNING", Duration::from_secs(10))
        .unwrap();

    if runtime == KATA_RUNTIME {
        // What the running sandbox holds, as the end check sees it: this test can fail.
        let held = ctrd.leftovers(&[&id]);
        eprintln!("the running sandbox holds:\n  {}", held.join("\n  "));
        for what in [
            "shim process",
            "qemu-system",
            "virtiofsd",
            &format!("/run/netns/kata-{id}"),
            &format!("sandboxes/{id} exists"),
            "mount ",
        ] {
            assert!(
                held.iter().any(|l| l.contains(what)),
                "the leftover check does not see {what:?} of the running sandbox: {held:#?}"
            );
        }
    }

    // containerd's events, from before the kill.
    let events_log = ctrd.dir().join("events.log");
    let mut events = ctrd
        .ctr(&["events"])
        .stdout(std::fs::File::create(&events_log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let shims = ctrd.shim_processes();
    assert_eq!(shims.len(), 1, "one shim serves the task: {shims:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0].0 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    // containerd publishes the task's exit.
    let began = Instant::now();
    let exit = loop {
        let log = std::fs::read_to_string(&events_log).unwrap_or_default();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("/tasks/exit") && l.contains(&id))
        {
            break line.to_string();
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "no /tasks/exit event for {id} after the shim's kill -9; events:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = events.kill();
    let _ = events.wait();
    eprintln!("after kill -9 of the shim: {exit}");
    let status = ctrd.task_status(&id).unwrap();
    assert!(
        status.is_none() || status.as_deref() == Some("STOPPED"),
        "task {id} is {status:?} after its shim died"
    );

    // The task is gone or deletable; either way delete leaves nothing.
    let deleted = ctrd
        .ctr_output(&["task", "delete", &id], None, VM_CALL)
        .unwrap();
    assert!(
        deleted.stderr.is_empty() || deleted.stderr.contains("not found"),
        "{deleted}"
    );
    ctrd.ctr_ok(&["container", "rm", &id]).unwrap();
    if runtime == RUNC_RUNTIME {
        // runc's shim leaves its socket when killed (containerd removes a stale one when a
        // shim starts on it again); this shim's `delete` is asked to do better.
        let _ = std::fs::remove_file(ctrd.shim_socket(&id));
    }

    assert_nothing_listed(&ctrd);
    ctrd.finish(&[&id]).unwrap();
}

#[test]
fn runc_task_survives_a_containerd_restart() {
    on_runc(task_survives_a_containerd_restart);
}

#[test]
fn kata_task_survives_a_containerd_restart() {
    on_kata(task_survives_a_containerd_restart);
}

/// `run -d`, a containerd restart, then the same shim serves the task.
fn task_survives_a_containerd_restart(mut ctrd: Containerd, runtime: &str, image: &Image) {
    let id = unique_name("kt");

    let out = ctrd
        .ctr_output(
            &[
                "run",
                "-d",
                "--runtime",
                runtime,
                &image.name,
                &id,
                "sleep",
                "1000",
            ],
            None,
            VM_CALL,
        )
        .unwrap();
    assert_eq!(out.code(), Some(0), "{out}");
    ctrd.wait_task_status(&id, "RUNNING", Duration::from_secs(10))
        .unwrap();
    let shims = ctrd.shim_processes();

    ctrd.restart().unwrap();

    // The same shim, reconnected: the task is running and takes an exec.
    assert_eq!(ctrd.shim_processes(), shims);
    assert_eq!(ctrd.task_status(&id).unwrap().as_deref(), Some("RUNNING"));
    let out = ctrd
        .ctr_output(
            &[
                "task",
                "exec",
                "--exec-id",
                "after",
                &id,
                "echo",
                "still here",
            ],
            None,
            VM_CALL,
        )
        .unwrap();
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(out.stdout, "still here\n", "{out}");

    kill_and_delete(&ctrd, &id, 137);
    assert_nothing_listed(&ctrd);
    ctrd.finish(&[&id]).unwrap();
}

/// A `ctr run --rm` that must fail with `needle` in its output, leaving nothing.
fn assert_run_fails_naming(ctrd: Containerd, out: Ran, needle: &str, id: &str) {
    eprintln!("{out}");
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(
        out.stderr.contains(needle) || out.stdout.contains(needle),
        "ctr's output does not name {needle:?}: {out}"
    );
    assert_nothing_listed(&ctrd);
    ctrd.finish(&[id]).unwrap();
}

#[test]
fn kata_image_with_a_missing_entrypoint_is_named_and_leaves_nothing() {
    let _vm = vm_lock();
    let image = Image {
        entrypoint: vec!["/bin/no-such-program".into()],
        cmd: vec![],
        ..Image::busybox("noentry")
    };
    let ctrd = kata_containerd(&[&image]);
    let id = unique_name("kt");

    let out = run_rm(&ctrd, KATA_RUNTIME, &[], &image, &id, &[], None);
    assert_run_fails_naming(ctrd, out, "no-such-program", &id);
}

#[test]
fn kata_bundle_without_a_rootfs_is_named_and_leaves_nothing() {
    let _vm = vm_lock();
    let ctrd = kata_containerd(&[]);
    let id = unique_name("kt");
    // `--rootfs`: a root filesystem containerd does not manage, here one that does not exist:
    // the bundle has no rootfs mounts, and the spec names a missing directory.
    let missing = ctrd.dir().join("no-such-rootfs");

    let out = ctrd
        .ctr_output(
            &[
                "run",
                "--rm",
                "--runtime",
                KATA_RUNTIME,
                "--rootfs",
                missing.to_str().unwrap(),
                &id,
                "sh",
            ],
            None,
            VM_CALL,
        )
        .unwrap();
    assert_run_fails_naming(ctrd, out, "no-such-rootfs", &id);
}

#[test]
fn kata_configuration_that_fails_to_load_is_named_and_leaves_nothing() {
    let _vm = vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken-configuration.toml");
    std::fs::write(
        &broken,
        "[hypervisor.qemu\npath = \"/usr/bin/qemu-system-x86_64\"\n",
    )
    .unwrap();
    let image = Image::busybox("1");
    let ctrd = kata_containerd_with(&broken, &[&image]);
    let id = unique_name("kt");

    let out = run_rm(&ctrd, KATA_RUNTIME, &[], &image, &id, &["true"], None);
    assert_run_fails_naming(ctrd, out, "broken-configuration.toml", &id);
}

/// QEMU killed under a running task: the shim reports the task's end (status 255: what the
/// container's was is unknown), `ctr task delete` and `container rm` work, and the sandbox
/// goes with the task (the shim tears down what is left and exits).
#[test]
fn kata_vm_killed_ends_the_task_and_delete_leaves_nothing() {
    let _vm = vm_lock();
    let image = Image::busybox("1");
    let ctrd = kata_containerd(&[&image]);
    let id = unique_name("kt");
    let out = ctrd
        .ctr_output(
            &[
                "run",
                "-d",
                "--runtime",
                KATA_RUNTIME,
                &image.name,
                &id,
                "sleep",
                "1000",
            ],
            None,
            VM_CALL,
        )
        .unwrap();
    assert_eq!(out.code(), Some(0), "{out}");
    ctrd.wait_task_status(&id, "RUNNING", Duration::from_secs(10))
        .unwrap();
    let qemu = workspace_tests::run(
        "pgrep",
        &["-f", &format!("qemu-system.*-name sandbox-{id}")],
    )
    .unwrap();
    let qemu: i32 = qemu.trim().parse().expect("one QEMU for the sandbox");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    ctrd.wait_task_status(&id, "STOPPED", Duration::from_secs(60))
        .unwrap();
    let deleted = ctrd
        .ctr_output(&["task", "delete", &id], None, VM_CALL)
        .unwrap();
    assert_eq!(deleted.code(), Some(0), "{deleted}");
    assert!(
        deleted.stderr.contains("exit with non-zero exit code 255"),
        "{deleted}"
    );
    ctrd.ctr_ok(&["container", "rm", &id]).unwrap();
    assert_nothing_listed(&ctrd);
    ctrd.finish(&[&id]).unwrap();
}
