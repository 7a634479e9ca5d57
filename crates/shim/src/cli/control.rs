//! The control socket of a running `sandbox run`: facts, NIC hotplug and unplug, one JSON line each
//! way, served over the sandbox layer's API; and its client.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use slog::warn;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::facts::{ControlRequest, ControlResponse};
use crate::sandbox::{state_dir, Sandbox};

/// Serves the control socket, one request at a time, until the caller drops it (a signal)
/// or the VM exits (both watched by the caller).
pub async fn serve(sb: &mut Sandbox, listener: UnixListener) -> Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if let Err(e) = answer(sb, stream).await {
                    warn!(sb.log(), "control request failed"; "error" => format!("{e:#}"));
                }
            }
            Err(e) => {
                warn!(sb.log(), "accepting on the control socket"; "error" => e.to_string())
            }
        }
    }
}

async fn answer(sb: &mut Sandbox, stream: UnixStream) -> Result<()> {
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
