//! The control socket of a running `sandbox run`: facts, NIC hotplug and unplug, containers
//! (`sandbox exec`, [`super::exec`]; a signal to one; its processes), one JSON line each way,
//! served over the sandbox layer's API; and its client.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use slog::warn;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use tokio::task::JoinSet;

use super::exec;
use crate::facts::{ControlRequest, ControlResponse};
use crate::sandbox::{state_dir, Sandbox};

/// Serves the control socket until the caller drops it (a signal) or the VM exits (both
/// watched by the caller). Requests are answered one at a time, except that a container of
/// `Exec` runs in a task of its own once started: its end is served like a request.
/// Dropping this drops those tasks; the teardown deletes their containers.
pub async fn serve(sb: &mut Sandbox, listener: UnixListener) -> Result<()> {
    let mut running: JoinSet<exec::Finished> = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Err(e) = answer(sb, stream, &mut running).await {
                        warn!(sb.log(), "control request failed"; "error" => format!("{e:#}"));
                    }
                }
                Err(e) => {
                    warn!(sb.log(), "accepting on the control socket"; "error" => e.to_string())
                }
            },
            Some(done) = running.join_next() => {
                let finished = match done {
                    Ok(f) => exec::finish(sb, f).await,
                    Err(e) => Err(anyhow::anyhow!("an exec task failed: {e}")),
                };
                if let Err(e) = finished {
                    warn!(sb.log(), "ending a container"; "error" => format!("{e:#}"));
                }
            }
        }
    }
}

async fn answer(
    sb: &mut Sandbox,
    stream: UnixStream,
    running: &mut JoinSet<exec::Finished>,
) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(r).read_line(&mut line),
    )
    .await
    .context("Reading a control request")??;
    let response = match serde_json::from_str::<ControlRequest>(&line) {
        Err(e) => ControlResponse::Error(format!("not a control request: {e}")),
        Ok(ControlRequest::Facts) => match sb.facts() {
            Some(f) => ControlResponse::Facts(Box::new(f)),
            None => ControlResponse::Error("the sandbox is not ready".into()),
        },
        Ok(ControlRequest::HotplugNic) => match sb.add_nic().await {
            Ok(nic) => ControlResponse::Nic(Box::new(nic)),
            Err(e) => ControlResponse::Error(format!("{e:#}")),
        },
        Ok(ControlRequest::UnplugNic { nic }) => match sb.remove_nic(&nic).await {
            Ok(()) => ControlResponse::Unplugged(nic),
            Err(e) => ControlResponse::Error(format!("{e:#}")),
        },
        // Answered by the task, once the container has ended.
        Ok(ControlRequest::Exec(req)) => match exec::begin(sb, *req, w, running).await {
            Ok(()) => return Ok(()),
            Err((writer, e)) => {
                w = writer;
                ControlResponse::Error(format!("{e:#}"))
            }
        },
        Ok(ControlRequest::Signal {
            container_id,
            signal,
        }) => match sb.signal_process(&container_id, None, signal, false).await {
            Ok(()) => ControlResponse::Signalled,
            Err(e) => ControlResponse::Error(format!("{e:#}")),
        },
        Ok(ControlRequest::Guest { argv }) => match sb.guest_exec(argv).await {
            Ok(out) => ControlResponse::GuestOutput {
                exit_code: out.exit_code,
                stdout: out.stdout,
                stderr: out.stderr,
            },
            Err(e) => ControlResponse::Error(format!("{e:#}")),
        },
        Ok(ControlRequest::Ps { container_id }) => match sb.list_processes(&container_id).await {
            Ok(ps) => ControlResponse::Processes(
                ps.into_iter().map(|p| (p.pid, p.host_pid, p.cmd)).collect(),
            ),
            Err(e) => ControlResponse::Error(format!("{e:#}")),
        },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    w.write_all(out.as_bytes()).await?;
    Ok(())
}

/// `sandbox hotplug-nic`, `sandbox unplug-nic` and `sandbox facts`: one request to a running `sandbox run`.
pub async fn request(run_root: &Path, id: &str, req: ControlRequest) -> Result<ControlResponse> {
    let path = state_dir(run_root, id).join("control.sock");
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "Connecting to {} (is `sandbox run --id {id}` running with the same --run-root?)",
            path.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(&req)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(120),
        BufReader::new(r).read_line(&mut answer),
    )
    .await
    .context("Waiting for the sandbox to answer")??;
    if answer.is_empty() {
        bail!("the sandbox closed the connection without answering (it is stopping or died)");
    }
    match serde_json::from_str(&answer).context("Reading the sandbox's answer")? {
        ControlResponse::Error(e) => bail!("the sandbox refused: {e}"),
        ok => Ok(ok),
    }
}
