//! The control socket of a running sandbox: facts and NIC hotplug, one JSON line each way.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hypervisor::DeviceConfig;
use slog::{info, warn};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{state_dir, Phase, Sandbox};
use crate::facts::{ControlRequest, ControlResponse, NicFacts};

impl Sandbox {
    /// Serves the control socket, one request at a time, until the run is cancelled (a
    /// signal) or the VM exits (both watched by the caller).
    pub(super) async fn serve(&mut self, listener: UnixListener) -> Result<()> {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if let Err(e) = self.control(stream).await {
                        warn!(self.log, "control request failed"; "error" => format!("{e:#}"));
                    }
                }
                Err(e) => {
                    warn!(self.log, "accepting on the control socket"; "error" => e.to_string())
                }
            }
        }
    }

    async fn control(&mut self, stream: UnixStream) -> Result<()> {
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
            Ok(ControlRequest::Facts) => match &self.facts {
                Some(f) => {
                    let mut f = f.clone();
                    f.nics = self.nics.clone();
                    ControlResponse::Facts(Box::new(f))
                }
                None => ControlResponse::Error("the sandbox is not ready".into()),
            },
            Ok(ControlRequest::HotplugNic) => {
                self.phase = Phase::Hotplug;
                let plugged = self.hotplug_nic().await;
                // A hotplug failed by the VM's exit (QMP closes first) still names the
                // hotplug when the exit ends the run, right after this answer.
                if plugged.is_ok() || !self.exits_soon().await {
                    self.phase = Phase::Serving;
                }
                match plugged {
                    Ok(nic) => ControlResponse::Nic(Box::new(nic)),
                    Err(e) => ControlResponse::Error(format!("{e:#}")),
                }
            }
        };
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        w.write_all(out.as_bytes()).await?;
        Ok(())
    }

    /// Whether the VM exits within a moment.
    async fn exits_soon(&self) -> bool {
        tokio::time::timeout(Duration::from_millis(500), self.hv.wait_exit())
            .await
            .is_ok()
    }

    async fn hotplug_nic(&mut self) -> Result<NicFacts> {
        let t = Instant::now();
        if !self.hv.capabilities().await.network_hotplug {
            bail!(
                "the {} backend cannot hot-plug NICs (machine {}); nothing was created",
                self.hv.name(),
                self.facts
                    .as_ref()
                    .and_then(|f| f.machine_type.clone())
                    .unwrap_or_else(|| "default".into())
            );
        }
        info!(self.log, "hot-plugging a NIC");
        let nic = self.new_host_nic()?;
        let tap = nic.tap.clone();
        let plan = nic.plan();
        let added = self.devices.add(DeviceConfig::Network(nic.config)).await;
        let info = match added {
            Ok(info) => info,
            Err(e) => {
                self.forget_tap(&tap);
                return Err(
                    anyhow::Error::from(e).context(format!("Hot-plugging a NIC on TAP {tap}"))
                );
            }
        };
        self.save_state().await?;
        let facts = self.configure_guest(&info, &plan, t).await?;
        info!(self.log, "NIC hot-plugged"; "nic" => facts.human());
        self.nics.push(facts.clone());
        Ok(facts)
    }
}

/// `sandbox hotplug-nic` and `sandbox facts`: one request to a running `sandbox run`.
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
