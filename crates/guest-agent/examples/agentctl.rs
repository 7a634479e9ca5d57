//! `agentctl`: talk to a guest agent from the host, for debugging and manual checks.
//!
//! ```text
//! agentctl [--timeout SECS] ENDPOINT COMMAND [ARGS]
//!   ENDPOINT  PATH (QEMU virtio-serial Unix socket) | vsock:CID:PORT | hvsock:PATH:PORT
//!   COMMAND   wait                 resend health until the agent answers
//!             health
//!             list-interfaces
//!             configure MAC [CIDR...] [--mtu N] [--gateway IP] [--route CIDR[,GW]]
//!             exec [--timeout-ms N] -- PROGRAM [ARGS...]
//!             mount-share TAG TARGET [--ro]
//!             run ID ROOTFS -- PROGRAM [ARGS...]
//!                                  a container with a minimal spec; its stdout and stderr
//!                                  stream to ours, stdin from ours; exits with its status
//! ```
//! Results are printed as JSON. Example:
//! `cargo run -p guest-agent --example agentctl --features client -- /tmp/vm/agent.sock health`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_agent::client::{AgentClient, Endpoint};
use guest_agent::protocol::{CreateContainer, MountShare, StdioRequest};
use guest_agent::{ExecRequest, InterfaceConfig, RouteConfig};

fn parse_endpoint(text: &str) -> Result<Endpoint> {
    if let Some(rest) = text.strip_prefix("vsock:") {
        let (cid, port) = rest.split_once(':').context("Expected vsock:CID:PORT")?;
        return Ok(Endpoint::Vsock {
            cid: cid.parse()?,
            port: port.parse()?,
        });
    }
    if let Some(rest) = text.strip_prefix("hvsock:") {
        let (path, port) = rest.rsplit_once(':').context("Expected hvsock:PATH:PORT")?;
        return Ok(Endpoint::HybridVsock {
            path: PathBuf::from(path),
            port: port.parse()?,
        });
    }
    Ok(Endpoint::Serial(PathBuf::from(text)))
}

fn parse_configure(args: &[String]) -> Result<InterfaceConfig> {
    let (mac, mut rest) = args.split_first().context("configure needs a MAC")?;
    let mut config = InterfaceConfig {
        mac: mac.clone(),
        set_mac: None,
        addresses: Vec::new(),
        mtu: None,
        routes: Vec::new(),
    };
    while let Some((arg, tail)) = rest.split_first() {
        let value = || tail.first().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--mtu" => config.mtu = Some(value()?.parse()?),
            "--gateway" => config.routes.push(RouteConfig {
                dest: "default".into(),
                gateway: Some(value()?.clone()),
            }),
            "--route" => {
                let (dest, gateway) = match value()?.split_once(',') {
                    Some((dest, gateway)) => (dest.to_owned(), Some(gateway.to_owned())),
                    None => (value()?.clone(), None),
                };
                config.routes.push(RouteConfig { dest, gateway });
            }
            address => {
                config.addresses.push(address.to_owned());
                rest = tail;
                continue;
            }
        }
        rest = &tail[1..];
    }
    Ok(config)
}

fn parse_exec(args: &[String]) -> Result<ExecRequest> {
    let mut timeout_ms = None;
    let mut rest = args;
    while let Some((arg, tail)) = rest.split_first() {
        match arg.as_str() {
            "--timeout-ms" => {
                timeout_ms = Some(
                    tail.first()
                        .context("--timeout-ms needs a value")?
                        .parse()?,
                );
                rest = &tail[1..];
            }
            "--" => {
                rest = tail;
                break;
            }
            _ => break,
        }
    }
    if rest.is_empty() {
        bail!("exec needs a program");
    }
    Ok(ExecRequest {
        argv: rest.to_vec(),
        timeout_ms,
    })
}

/// A minimal OCI spec running `args` as root in new PID, mount, UTS and IPC namespaces.
fn minimal_spec(args: &[String]) -> String {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": args, "cwd": "/", "user": {"uid": 0, "gid": 0},
                    "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "root": {"path": "rootfs"},
        "hostname": "container",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"},
                                 {"type": "ipc"}]}
    })
    .to_string()
}

/// `run`: creates and starts a container, streams its stdio, waits, deletes it.
async fn run_container(agent: &AgentClient, args: &[String], timeout: Duration) -> Result<i32> {
    let [id, rootfs, dashdash, argv @ ..] = args else {
        bail!("run needs ID ROOTFS -- PROGRAM [ARGS...]");
    };
    if dashdash != "--" || argv.is_empty() {
        bail!("run needs ID ROOTFS -- PROGRAM [ARGS...]");
    }
    let create = CreateContainer {
        container_id: id.clone(),
        rootfs: rootfs.clone(),
        spec: minimal_spec(argv),
        stdio: StdioRequest {
            stdin: true,
            ..StdioRequest::default()
        },
    };
    let process = agent.create_container(create, timeout).await?;
    agent.start_container(id, timeout).await?;
    let mut stdin = process.stdin.context("no stdin stream")?;
    let mut stdout = process.stdout.context("no stdout stream")?;
    let mut stderr = process.stderr.context("no stderr stream")?;
    // Our stdin is copied until it ends; the process may exit first.
    let feeding = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut stdin).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stdin).await;
    });
    let (mut our_stdout, mut our_stderr) = (tokio::io::stdout(), tokio::io::stderr());
    let (out, err) = tokio::join!(
        tokio::io::copy(&mut stdout, &mut our_stdout),
        tokio::io::copy(&mut stderr, &mut our_stderr)
    );
    out.context("Copying stdout")?;
    err.context("Copying stderr")?;
    feeding.abort();
    let exit = agent.wait_process(id, None, timeout).await?;
    agent.delete_container(id, timeout).await?;
    Ok(exit
        .exit_code
        .unwrap_or_else(|| 128 + exit.signal.unwrap_or(0)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut timeout = Duration::from_secs(30);
    if args.first().map(String::as_str) == Some("--timeout") {
        timeout = Duration::from_secs_f64(args.get(1).context("--timeout needs seconds")?.parse()?);
        args.drain(..2);
    }
    let [endpoint, command, rest @ ..] = args.as_slice() else {
        bail!("usage: agentctl [--timeout SECS] ENDPOINT wait|health|list-interfaces|configure|exec|mount-share|run [ARGS]");
    };
    let endpoint = parse_endpoint(endpoint)?;
    let started = Instant::now();
    let mut agent = AgentClient::connect(endpoint.clone())
        .await
        .with_context(|| format!("Connecting to {endpoint}"))?;
    let value = match command.as_str() {
        "wait" => {
            let health = agent.wait_ready(timeout).await?;
            eprintln!("agent ready after {:?}", started.elapsed());
            serde_json::to_value(health)?
        }
        "health" => serde_json::to_value(agent.health(timeout).await?)?,
        "list-interfaces" | "list_interfaces" => {
            serde_json::to_value(agent.list_interfaces(timeout).await?)?
        }
        "configure" | "configure_interface" => serde_json::to_value(
            agent
                .configure_interface(parse_configure(rest)?, timeout)
                .await?,
        )?,
        "exec" => serde_json::to_value(agent.exec(parse_exec(rest)?, timeout).await?)?,
        "mount-share" | "mount_share" => {
            let [tag, target, flags @ ..] = rest else {
                bail!("mount-share needs TAG TARGET [--ro]");
            };
            let request = MountShare {
                tag: tag.clone(),
                target: target.clone(),
                read_only: flags.iter().any(|f| f == "--ro"),
            };
            agent.mount_share(request, timeout).await?;
            serde_json::json!({})
        }
        "run" => {
            let code = run_container(&agent, rest, timeout).await?;
            std::process::exit(code);
        }
        other => bail!("Unknown command {other:?}"),
    };
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}
