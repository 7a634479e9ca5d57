//! Containers in real QEMU guests under TCG, through the trait, the device manager and the
//! agent client: a busybox root filesystem in the sandbox's virtio-fs share (mounted by the
//! agent at `/run/kata-containers/shared`), stdio streamed with flow control, signals, exec,
//! a terminal, isolation between containers, and bad input. Each test checks the guest holds
//! no container process and the mounts it had before, and that no virtiofsd serves its share
//! after teardown (the harness's teardown checks the rest of the host side).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use guest_agent::client::{AgentClient, ClientError, ProcessStdio};
use guest_agent::protocol::{
    CreateContainer, ExecProcess, MountShare, ResizePty, SignalProcess, StdioRequest,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use workspace_tests::containers::{
    assert_guest_clean, backend, boot_with_share, busybox_rootfs, container_processes,
    daemons_serving, guest_mounts, guest_rootfs, guest_sh, process_json, read_to_end, sha256_file,
    spec_json, CALL,
};
use workspace_tests::Sandbox;

/// How long a test waits for a container process to exit.
const EXIT: Duration = Duration::from_secs(120);

const PIPES: StdioRequest = StdioRequest {
    terminal: false,
    rows: None,
    cols: None,
    stdin: false,
};

async fn create(
    agent: &AgentClient,
    id: &str,
    spec: &Value,
    stdio: StdioRequest,
) -> Result<ProcessStdio, ClientError> {
    agent
        .create_container(
            CreateContainer {
                container_id: id.into(),
                rootfs: guest_rootfs(id),
                spec: spec.to_string(),
                stdio,
            },
            CALL,
        )
        .await
}

async fn exec(
    agent: &AgentClient,
    id: &str,
    exec_id: &str,
    args: &[&str],
    stdio: StdioRequest,
) -> Result<ProcessStdio> {
    Ok(agent
        .exec_process(
            ExecProcess {
                container_id: id.into(),
                exec_id: exec_id.into(),
                process: process_json(args),
                stdio,
            },
            CALL,
        )
        .await?)
}

async fn signal(agent: &AgentClient, id: &str, exec_id: Option<&str>, signal: i32) -> Result<()> {
    agent
        .signal_process(
            SignalProcess {
                container_id: id.into(),
                exec_id: exec_id.map(String::from),
                signal,
                all: false,
            },
            CALL,
        )
        .await?;
    Ok(())
}

/// Runs `args` in a running container; its exit code and stdout.
async fn exec_output(
    agent: &AgentClient,
    id: &str,
    exec_id: &str,
    args: &[&str],
) -> Result<(Option<i32>, String, String)> {
    let io = exec(agent, id, exec_id, args, PIPES).await?;
    let (out, err, exit) = tokio::join!(
        read_to_end(io.stdout),
        read_to_end(io.stderr),
        agent.wait_process(id, Some(exec_id), EXIT)
    );
    Ok((
        exit?.exit_code,
        String::from_utf8(out?)?,
        String::from_utf8(err?)?,
    ))
}

/// Deletes `ids`, checks the guest is as it was (`baseline` mounts, no container process),
/// tears the sandbox down and checks no virtiofsd serves `share` any more.
async fn finish(mut sb: Sandbox, ids: &[&str], baseline: &str, shares: &[&Path]) -> Result<()> {
    let agent = sb.agent().clone();
    for id in ids {
        agent
            .delete_container(id, CALL)
            .await
            .with_context(|| format!("deleting {id}"))?;
    }
    assert_guest_clean(&agent, baseline).await?;
    let pid = sb.hv.pids().await?.vmm;
    sb.teardown(Some(pid)).await?;
    for dir in shares {
        let left = daemons_serving(dir);
        ensure!(left.is_empty(), "virtiofsd left after teardown: {left:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_stderr_and_exit_code_of_a_container_are_reported_exactly() -> Result<()> {
    let share = tempfile::tempdir()?;
    busybox_rootfs(share.path(), "outerr")?;
    let mut sb = boot_with_share(&backend(), share.path(), vec![]).await?;
    let agent = sb.agent().clone();
    let baseline = guest_mounts(&agent).await?;

    let spec = spec_json(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
    let io = create(&agent, "outerr", &spec, PIPES).await?;
    ensure!(io.stdin.is_none(), "a stdin stream nobody asked for");
    let started = agent.start_container("outerr", CALL).await?;
    ensure!(
        started == io.pid,
        "started pid {started}, created {}",
        io.pid
    );
    let (out, err, exit) = tokio::join!(
        read_to_end(io.stdout),
        read_to_end(io.stderr),
        agent.wait_process("outerr", None, EXIT)
    );
    let exit = exit?;
    ensure!(out? == b"out\n", "stdout differs");
    ensure!(err? == b"err\n", "stderr differs");
    ensure!(
        exit.exit_code == Some(3) && exit.signal.is_none(),
        "{exit:?}"
    );
    ensure!(exit.exited_at_ms > 0, "{exit:?}");
    // A second wait after the exit reports the same.
    ensure!(agent.wait_process("outerr", None, EXIT).await? == exit);

    finish(sb, &["outerr"], &baseline, &[share.path()]).await
}

/// The agent's resident memory in the guest, in KiB.
async fn agent_rss_kib(agent: &AgentClient) -> Result<u64> {
    let out = guest_sh(
        agent,
        // The shell's parent is the agent that ran it.
        "grep -q '^Name:[[:space:]]*guest-agent$' /proc/$PPID/status && \
         grep VmRSS /proc/$PPID/status | tr -s ' \t' ' ' | cut -d' ' -f2",
    )
    .await?;
    out.trim()
        .parse()
        .with_context(|| format!("VmRSS of the agent: {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_out_and_sixteen_mib_in_arrive_whole_and_a_slow_reader_bounds_the_agent(
) -> Result<()> {
    const OUT: u64 = 64 << 20;
    const IN: u64 = 16 << 20;
    const PAUSE_EVERY: u64 = 16 << 20;
    let share = tempfile::tempdir()?;
    let root = busybox_rootfs(share.path(), "bigout")?;
    busybox_rootfs(share.path(), "bigin")?;
    let host = tempfile::tempdir()?;
    let source = root.join("big.bin");
    std::fs::write(&source, random_bytes(OUT)?)?;
    let mut sb = boot_with_share(&backend(), share.path(), vec![]).await?;
    let agent = sb.agent().clone();
    let baseline = guest_mounts(&agent).await?;
    let rss_before = agent_rss_kib(&agent).await?;

    // 64 MiB out, read by a reader that stops for a while every 16 MiB: meanwhile the
    // agent's memory and the client's buffer stay within the flow-control window.
    let io = create(&agent, "bigout", &spec_json(&["cat", "/big.bin"]), PIPES).await?;
    agent.start_container("bigout", CALL).await?;
    let mut stdout = io.stdout.context("no stdout")?;
    let received = host.path().join("received.bin");
    let mut file = tokio::fs::File::create(&received).await?;
    let mut buf = vec![0u8; 64 << 10];
    let (mut total, mut next_pause, mut rss_max) = (0u64, PAUSE_EVERY, rss_before);
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).await?;
        total += n as u64;
        if total >= next_pause && total < OUT {
            next_pause += PAUSE_EVERY;
            // A second of not reading: an agent without flow control would read the rest of
            // `cat`'s output meanwhile.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss = agent_rss_kib(&agent).await?;
            rss_max = rss_max.max(rss);
            ensure!(
                stdout.buffered() <= 1 << 20,
                "the client buffered {} bytes",
                stdout.buffered()
            );
        }
    }
    file.flush().await?;
    drop(file);
    let exit = agent.wait_process("bigout", None, EXIT).await?;
    ensure!(exit.exit_code == Some(0), "{exit:?}");
    ensure!(total == OUT, "received {total} bytes of {OUT}");
    ensure!(
        sha256_file(&received)? == sha256_file(&source)?,
        "stdout's checksum differs"
    );
    let stderr = read_to_end(io.stderr).await?;
    ensure!(stderr.is_empty(), "{}", String::from_utf8_lossy(&stderr));
    let growth = rss_max.saturating_sub(rss_before);
    eprintln!("agent VmRSS {rss_before} KiB before, at most {rss_max} KiB while held");
    ensure!(
        growth < 16 << 10,
        "the agent grew by {growth} KiB while the reader held the stream"
    );

    // 16 MiB in through `cat` into a file of the share; the guest and the host count and
    // checksum it.
    let input = host.path().join("input.bin");
    std::fs::write(&input, random_bytes(IN)?)?;
    let spec = spec_json(&[
        "sh",
        "-c",
        "cat > /received; wc -c < /received; sha256sum /received",
    ]);
    let stdio = StdioRequest {
        stdin: true,
        ..PIPES
    };
    let io = create(&agent, "bigin", &spec, stdio).await?;
    agent.start_container("bigin", CALL).await?;
    let stdin = io.stdin.context("no stdin")?;
    let (sent, out, exit) = tokio::join!(
        stdin.copy_from_path(&input),
        read_to_end(io.stdout),
        agent.wait_process("bigin", None, EXIT)
    );
    ensure!(sent? == IN);
    ensure!(exit?.exit_code == Some(0));
    let out = String::from_utf8(out?)?;
    let digest = sha256_file(&input)?;
    let mut lines = out.lines();
    ensure!(
        lines.next().map(str::trim) == Some(&IN.to_string()),
        "{out}"
    );
    ensure!(
        lines.next().is_some_and(|l| l.starts_with(&digest)),
        "{out}"
    );
    let landed = share.path().join("bigin/rootfs/received");
    ensure!(std::fs::metadata(&landed)?.len() == IN);
    ensure!(sha256_file(&landed)? == digest);

    finish(sb, &["bigout", "bigin"], &baseline, &[share.path()]).await
}

fn random_bytes(n: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(n as usize);
    std::fs::File::open("/dev/urandom")?
        .take(n)
        .read_to_end(&mut out)?;
    ensure!(out.len() as u64 == n);
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigkill_are_reported_and_signalling_an_exited_process_is_no_error(
) -> Result<()> {
    let share = tempfile::tempdir()?;
    busybox_rootfs(share.path(), "sig")?;
    let mut sb = boot_with_share(&backend(), share.path(), vec![]).await?;
    let agent = sb.agent().clone();
    let baseline = guest_mounts(&agent).await?;

    let io = create(&agent, "sig", &spec_json(&["sleep", "1000"]), PIPES).await?;
    agent.start_container("sig", CALL).await?;
    // The init is PID 1 of its namespace, which ignores SIGTERM without a handler (as
    // under runc); an exec'd `sleep` is not.
    let term = exec(&agent, "sig", "term", &["sleep", "1001"], PIPES).await?;
    signal(&agent, "sig", Some("term"), libc::SIGTERM).await?;
    let exit = agent.wait_process("sig", Some("term"), EXIT).await?;
    ensure!(
        exit.signal == Some(libc::SIGTERM) && exit.exit_code.is_none(),
        "{exit:?}"
    );
    signal(&agent, "sig", Some("term"), libc::SIGKILL).await?;
    drop(term);

    signal(&agent, "sig", None, libc::SIGKILL).await?;
    let exit = agent.wait_process("sig", None, EXIT).await?;
    ensure!(
        exit.signal == Some(libc::SIGKILL) && exit.exit_code.is_none(),
        "{exit:?}"
    );
    // What containerd does after an exit: SIGKILL to all, then to the init.
    agent
        .signal_process(
            SignalProcess {
                container_id: "sig".into(),
                exec_id: None,
                signal: libc::SIGKILL,
                all: true,
            },
            CALL,
        )
        .await?;
    signal(&agent, "sig", None, libc::SIGTERM).await?;
    ensure!(read_to_end(io.stdout).await?.is_empty());

    finish(sb, &["sig"], &baseline, &[share.path()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ps_execs_into_a_running_container_and_a_terminal_shows_its_resized_size() -> Result<()> {
    let share = tempfile::tempdir()?;
    busybox_rootfs(share.path(), "pst")?;
    busybox_rootfs(share.path(), "tty")?;
    let mut sb = boot_with_share(&backend(), share.path(), vec![]).await?;
    let agent = sb.agent().clone();
    let baseline = guest_mounts(&agent).await?;

    create(&agent, "pst", &spec_json(&["sleep", "1000"]), PIPES).await?;
    agent.start_container("pst", CALL).await?;
    let (code, out, err) = exec_output(&agent, "pst", "ps", &["ps", "-o", "pid,args"]).await?;
    ensure!(code == Some(0), "ps failed: {err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    ensure!(rows.len() == 2, "ps saw other processes: {out}");
    ensure!(rows[0] == ["1", "sleep", "1000"], "{out}");
    ensure!(rows[1][1..] == ["ps", "-o", "pid,args"], "{out}");
    let listed = agent.list_processes("pst", CALL).await?;
    ensure!(
        listed.len() == 1 && listed[0].pid == 1 && listed[0].cmd.contains("sleep"),
        "{listed:?}"
    );
    // What the end-of-test checks look for is there while the container runs: its init in
    // namespaces of its own, with the spec's mounts.
    let seen = container_processes(&agent).await?;
    ensure!(
        seen == [format!("{} sleep", listed[0].host_pid)],
        "{seen:?}"
    );
    let mounts = guest_sh(&agent, &format!("cat /proc/{}/mounts", listed[0].host_pid)).await?;
    ensure!(
        mounts.contains(" /dev/pts devpts ") && mounts.contains(" /proc proc "),
        "{mounts}"
    );

    // A terminal: the container's own pty (`tty` names its devpts instance's first, stdin is a
    // terminal), `stty size` before and after a resize; an exec'd terminal gets the next pty.
    let stdio = StdioRequest {
        terminal: true,
        rows: Some(24),
        cols: Some(80),
        stdin: true,
    };
    let script = "tty; test -t 0 && echo stdin-is-a-tty; stty size; read line; stty size";
    let spec = spec_json(&["sh", "-c", script]);
    let io = create(&agent, "tty", &spec, stdio).await?;
    ensure!(io.stderr.is_none(), "a terminal has no stderr stream");
    agent.start_container("tty", CALL).await?;
    let mut output = io.stdout.context("no terminal output")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        let n = output.read(&mut buf).await?;
        ensure!(n > 0, "the terminal ended before its first size: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
    }
    let first = String::from_utf8_lossy(&seen).replace('\r', "");
    ensure!(
        first.lines().any(|l| l == "/dev/pts/0") && first.contains("stdin-is-a-tty\n"),
        "the init's terminal: {first:?}"
    );
    let exec_tty = exec(
        &agent,
        "tty",
        "tty",
        &["sh", "-c", "tty; test -t 0 && echo exec-stdin-is-a-tty"],
        StdioRequest {
            stdin: false,
            ..stdio
        },
    )
    .await?;
    let (exec_out, exec_exit) = tokio::join!(
        read_to_end(exec_tty.stdout),
        agent.wait_process("tty", Some("tty"), EXIT)
    );
    let exec_out = String::from_utf8_lossy(&exec_out?).replace('\r', "");
    ensure!(
        exec_out == "/dev/pts/1\nexec-stdin-is-a-tty\n",
        "the exec'd terminal: {exec_out:?}"
    );
    ensure!(
        exec_exit?.exit_code == Some(0),
        "the exec'd terminal's exit"
    );
    agent
        .resize_pty(
            ResizePty {
                container_id: "tty".into(),
                exec_id: None,
                rows: 40,
                cols: 132,
            },
            CALL,
        )
        .await?;
    let mut stdin = io.stdin.context("no terminal input")?;
    stdin.write_all(b"go\n").await?;
    output.read_to_end(&mut seen).await?;
    let text = String::from_utf8_lossy(&seen);
    ensure!(text.contains("40 132"), "{text:?}");
    let exit = agent.wait_process("tty", None, EXIT).await?;
    ensure!(exit.exit_code == Some(0), "{exit:?}");
    drop(stdin);

    finish(sb, &["pst", "tty"], &baseline, &[share.path()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containers_are_isolated_and_writes_land_in_a_read_write_share_only() -> Result<()> {
    let share = tempfile::tempdir()?;
    let ro = tempfile::tempdir()?;
    std::fs::write(ro.path().join("from-host"), "host\n")?;
    let root_a = busybox_rootfs(share.path(), "ca")?;
    busybox_rootfs(share.path(), "cb")?;
    std::fs::write(root_a.join("only-in-a"), "a\n")?;
    let ro_share = workspace_tests::containers::share("roShare", ro.path(), true);
    let mut sb = boot_with_share(&backend(), share.path(), vec![ro_share]).await?;
    let agent = sb.agent().clone();
    agent
        .mount_share(
            MountShare {
                tag: "roShare".into(),
                target: "/run/kata-containers/ro".into(),
                read_only: true,
            },
            CALL,
        )
        .await?;
    let baseline = guest_mounts(&agent).await?;

    let mut spec = spec_json(&["sleep", "1001"]);
    spec["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/ro", "type": "bind", "source": "/run/kata-containers/ro",
        "options": ["rbind"],
    }));
    create(&agent, "ca", &spec, PIPES).await?;
    agent.start_container("ca", CALL).await?;
    create(&agent, "cb", &spec_json(&["sleep", "1002"]), PIPES).await?;
    agent.start_container("cb", CALL).await?;

    // b sees its own processes and files only.
    let (code, out, err) = exec_output(&agent, "cb", "ps", &["ps", "-o", "args"]).await?;
    ensure!(code == Some(0), "{err}");
    ensure!(out.contains("sleep 1002"), "{out}");
    ensure!(!out.contains("sleep 1001"), "b sees a's process: {out}");
    let (code, out, err) = exec_output(&agent, "cb", "ls", &["ls", "/"]).await?;
    ensure!(code == Some(0), "{err}");
    ensure!(!out.contains("only-in-a"), "b sees a's file: {out}");
    let (code, out, err) = exec_output(&agent, "cb", "cat", &["cat", "/only-in-a"]).await?;
    ensure!(code != Some(0), "b read a's file: {out}");
    ensure!(err.contains("No such file"), "{err}");
    let (_, out, _) = exec_output(&agent, "ca", "look", &["ps", "-o", "args"]).await?;
    ensure!(
        out.contains("sleep 1001") && !out.contains("sleep 1002"),
        "a sees b: {out}"
    );

    // A write in a's root lands in the host directory of the read-write share; one in the
    // read-only share fails and leaves nothing there.
    let (code, _, err) = exec_output(
        &agent,
        "ca",
        "write",
        &["sh", "-c", "echo from-a > /work/written"],
    )
    .await?;
    ensure!(code == Some(0), "{err}");
    ensure!(std::fs::read_to_string(root_a.join("work/written"))? == "from-a\n");
    let (code, out, err) = exec_output(
        &agent,
        "ca",
        "rowrite",
        &["sh", "-c", "cat /ro/from-host; echo x > /ro/written"],
    )
    .await?;
    ensure!(out == "host\n", "{out}");
    ensure!(code != Some(0), "a write to the read-only share succeeded");
    ensure!(err.contains("Read-only file system"), "{err}");
    ensure!(!ro.path().join("written").exists());

    finish(sb, &["ca", "cb"], &baseline, &[share.path(), ro.path()]).await
}

/// Expects `create` to fail with an agent error containing every one of `needles`, and no
/// container `id` left in the guest.
async fn refused(
    agent: &AgentClient,
    id: &str,
    spec: &Value,
    baseline: &str,
    needles: &[&str],
) -> Result<()> {
    let err = match create(agent, id, spec, PIPES).await {
        Ok(_) => anyhow::bail!("container {id} was created"),
        Err(e) => e,
    };
    let message = match &err {
        ClientError::Agent { message, .. } => message.clone(),
        other => anyhow::bail!("expected the agent's error, got {other}"),
    };
    for needle in needles {
        ensure!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    eprintln!("{id}: {message}");
    let err = agent.start_container(id, CALL).await.unwrap_err();
    ensure!(err.to_string().contains(id), "{err}");
    assert_guest_clean(agent, baseline).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_named_and_leaves_nothing_in_the_guest_or_on_the_host() -> Result<()> {
    let share = tempfile::tempdir()?;
    for id in ["noargv", "baduid", "unknown"] {
        busybox_rootfs(share.path(), id)?;
    }
    let mut sb = boot_with_share(&backend(), share.path(), vec![]).await?;
    let agent = sb.agent().clone();
    let baseline = guest_mounts(&agent).await?;

    refused(
        &agent,
        "norootfs",
        &spec_json(&["true"]),
        &baseline,
        &["Root filesystem", &guest_rootfs("norootfs"), "missing"],
    )
    .await?;
    refused(
        &agent,
        "noargv",
        &spec_json(&["no-such-binary"]),
        &baseline,
        &["\"no-such-binary\"", "not found"],
    )
    .await?;
    let mut spec = spec_json(&["true"]);
    spec["process"]["user"] = json!({"uid": 4294967295u32, "gid": 0});
    refused(&agent, "baduid", &spec, &baseline, &["uid 4294967295"]).await?;
    let mut spec = spec_json(&["true"]);
    spec["hostnam"] = json!("typo");
    spec["process"]["colour"] = json!("blue");
    refused(
        &agent,
        "unknown",
        &spec,
        &baseline,
        &["unknown fields", "hostnam", "process.colour"],
    )
    .await?;

    finish(sb, &[], &baseline, &[share.path()]).await
}
