//! Ending a sandbox: the orderly teardown (the backend stops its VM, the endpoints detach,
//! the TAPs go), then a sweep from the record ([`crate::cleanup::remove`]) that removes
//! whatever the orderly part could not know of (a VMM spawned by a cancelled boot) and the
//! files; and the forced teardown of a second signal, from the record alone.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use slog::{info, warn};

use super::{ms, Netns, Sandbox};
use crate::cleanup;
use crate::net;

impl Sandbox {
    /// Stops the VM and removes everything this run created; reports what could not be.
    pub(super) async fn teardown(&mut self) -> Result<()> {
        let t = Instant::now();
        let mut problems: Vec<String> = Vec::new();
        self.agent = None;
        if self.hv.state().await.is_alive() {
            if let Err(e) = self.hv.stop().await {
                problems.push(format!("stopping the VM: {e}"));
            }
        }
        if let Err(e) = self.hv.cleanup().await {
            problems.push(format!("cleaning up the VM: {e}"));
        }
        self.devices.clear().await;
        // Filters, qdiscs and TAPs the endpoints added; the pod's interfaces stay.
        if let Some(pod) = self.pod.take() {
            problems.extend(pod.detach(&self.log).await);
        }
        // An in-process VMM's pid is the shim's own.
        if let Some(pid) = self.vmm_pid.filter(|p| *p != std::process::id()) {
            if Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
                problems.push(format!("VMM process {pid} is still alive"));
            }
        }
        // Persistent TAPs (handed over by name) stay until deleted.
        if let Some(ns) = &self.netns {
            for tap in std::mem::take(&mut self.persistent_taps) {
                match netdev::delete_tap(&tap, Some(ns.path())) {
                    Ok(()) | Err(netdev::Error::TapNotFound { .. }) => {}
                    Err(e) => problems.push(format!("deleting TAP {tap}: {e}")),
                }
            }
        }
        // Non-persistent TAPs disappear when their last fd (the VMM's) is closed; closing
        // waits for an RCU grace period, so give it a moment. A VMM the backend does not
        // know of (a cancelled boot) still holds its TAPs: the sweep below kills it.
        if let (Some(ns), Some(_)) = (&self.netns, self.vmm_pid) {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let left: Vec<String> = match net::taps_in(ns.path()) {
                    Ok(all) => all.into_iter().filter(|t| self.taps.contains(t)).collect(),
                    Err(e) => {
                        problems.push(format!("listing TAPs: {e:#}"));
                        break;
                    }
                };
                if left.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    for tap in &left {
                        let _ = netdev::delete_tap(tap, Some(ns.path()));
                    }
                    problems.push(format!("TAPs were left behind and deleted: {left:?}"));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // The owned namespace is deleted by the sweep, from the record: keep only its path.
        if let Some(Netns::Owned(ns)) = self.netns.take() {
            let _ = ns.into_path();
        }
        problems.extend(self.sweep().await);
        if problems.is_empty() {
            info!(self.log, "sandbox removed"; "ms" => ms(t.elapsed()));
            Ok(())
        } else {
            Err(anyhow!(
                "Tearing down sandbox {}: {}",
                self.id,
                problems.join("; ")
            ))
        }
    }

    /// The forced teardown of a second signal: whatever the orderly one was doing is
    /// abandoned, the VMM is killed and what the record lists is removed. Returns what could
    /// not be.
    pub(super) async fn force(&mut self) -> Vec<String> {
        let t = Instant::now();
        // Our copies of TAP fds and the endpoints go first, so that the TAPs can go with
        // the VMM; the owned namespace is deleted from the record.
        self.agent = None;
        self.pod = None;
        if let Some(Netns::Owned(ns)) = self.netns.take() {
            let _ = ns.into_path();
        }
        let problems = self.sweep().await;
        warn!(self.log, "teardown forced"; "ms" => ms(t.elapsed()), "left" => problems.len());
        problems
    }

    /// Removes what the record lists and still exists, the run directory last.
    async fn sweep(&mut self) -> Vec<String> {
        let Some(records) = self.records.take() else {
            return Vec::new();
        };
        let report = cleanup::remove(records.get(), &self.state_dir).await;
        for item in &report.removed {
            info!(self.log, "removed"; "what" => item);
        }
        report.problems
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
