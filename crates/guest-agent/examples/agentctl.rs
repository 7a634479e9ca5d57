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
//! ```
//! Results are printed as JSON. Example:
//! `cargo run -p guest-agent --example agentctl --features client -- /tmp/vm/agent.sock health`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_agent::client::{AgentClient, Endpoint};
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
        bail!("usage: agentctl [--timeout SECS] ENDPOINT wait|health|list-interfaces|configure|exec [ARGS]");
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
        other => bail!("Unknown command {other:?}"),
    };
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}
