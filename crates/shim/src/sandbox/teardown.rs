//! Ending a sandbox: the orderly teardown (the containers are deleted, the backend stops its
//! VM, the endpoints detach, the TAPs go), then a sweep from the record ([`crate::cleanup::remove`]) that removes
//! whatever the orderly part could not know of (a VMM spawned by a cancelled boot), the
//! shared directory's mounts and the files; and the forced teardown of a second signal, from the record alone.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use slog::{info, warn};

use super::{ms, Netns, Sandbox};
use crate::cleanup;
use crate::net;
use crate::records::Records;

impl Sandbox {
    /// Stops the VM and removes everything the sandbox created, also after a failure or a
    /// cancelled step; reports what could not be removed. Dropping it half-way leaves the
    /// record for [`Sandbox::force_teardown`].
    pub async fn teardown(&mut self) -> Result<()> {
        let t = Instant::now();
        let mut problems: Vec<String> = Vec::new();
        let alive = self.hv.state().await.is_alive();
        if alive {
            problems.extend(self.delete_containers().await);
        }
        self.agent = None;
        if alive {
            if let Err(e) = self.hv.stop().await {
                problems.push(format!("stopping the VM: {}", cleanup::chain(e)));
            }
        }
        if let Err(e) = self.hv.cleanup().await {
            problems.push(format!("cleaning up the VM: {}", cleanup::chain(e)));
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
                match net::delete_tap(&tap, ns.path()).await {
                    Ok(()) | Err(netdev::Error::TapNotFound { .. }) => {}
                    Err(e) => problems.push(format!("deleting TAP {tap}: {}", cleanup::chain(e))),
                }
            }
        }
        // Non-persistent TAPs disappear when their last fd (the VMM's) is closed; closing
        // waits for an RCU grace period, so give it a moment. A VMM the backend does not
        // know of (a cancelled boot) still holds its TAPs: the sweep below kills it.
        if let (Some(ns), Some(_)) = (&self.netns, self.vmm_pid) {
            let deadline = Instant::now() + Duration::from_secs(5);
            let handle = match net::connect(ns.path()).await {
                Ok(h) => Some(h),
                Err(e) => {
                    problems.push(format!("listing TAPs: {e:#}"));
                    None
                }
            };
            while let Some(handle) = &handle {
                let left: Vec<String> = match net::taps_in(handle).await {
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
                        let _ = net::delete_tap(tap, ns.path()).await;
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

    /// The forced teardown (a front-end's answer to a second signal): whatever the orderly
    /// one was doing is abandoned, the VMM is killed and what the record lists is removed.
    /// Returns what could not be.
    pub async fn force_teardown(&mut self) -> Vec<String> {
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
        sweep(&self.log, &mut self.records, &self.state_dir).await
    }
}

/// Removes what `records` lists and still exists, `state_dir` last. The record is let go
/// only once the removal is done: a sweep cancelled half-way (the orderly teardown dropped
/// by a second signal) leaves it for the forced one.
async fn sweep(log: &slog::Logger, records: &mut Option<Records>, state_dir: &Path) -> Vec<String> {
    let Some(record) = records.as_ref().map(|r| r.get().clone()) else {
        return Vec::new();
    };
    let report = cleanup::remove(&record, state_dir).await;
    *records = None;
    for item in &report.removed {
        info!(log, "removed"; "what" => item);
    }
    report.problems
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Record, TapRecord};

    /// A sweep dropped while it waits for a TAP to go keeps the record; the next one
    /// removes everything and lets it go.
    #[tokio::test]
    async fn a_cancelled_sweep_leaves_the_record_for_the_next_one() {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let ns = netdev::NetNs::create(&format!("sweep-{}", std::process::id()))
            .expect("creating a namespace (needs root)");
        // Held open here: the sweep waits for it to go with its last fd.
        let tap = netdev::TapBuilder::new("tap%d")
            .netns(ns.path())
            .create()
            .unwrap();
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sandboxes").join("s");
        let mut record = Record::new("s");
        record.taps.push(TapRecord {
            name: tap.name().to_string(),
            netns: ns.path().to_path_buf(),
            persistent: false,
        });
        let mut records = Some(Records::claim(&dir, record).unwrap());

        let cut =
            tokio::time::timeout(Duration::from_millis(200), sweep(&log, &mut records, &dir)).await;
        assert!(cut.is_err(), "the sweep did not wait for the TAP");
        assert!(records.is_some(), "a cancelled sweep let the record go");
        assert!(dir.join(crate::records::RECORD_FILE).exists());

        drop(tap);
        let problems = sweep(&log, &mut records, &dir).await;
        assert_eq!(problems, Vec::<String>::new());
        assert!(records.is_none());
        assert!(!dir.exists(), "the run directory is left");
        let handle = net::connect(ns.path()).await.unwrap();
        assert_eq!(net::taps_in(&handle).await.unwrap(), Vec::<String>::new());
        drop(handle);
        ns.delete().unwrap();
    }
}
