//! The VMM of `sandbox run`: booting it (recorded as soon as the process exists), its saved
//! state, and the error when it exits under the run.

use std::time::Duration;

use anyhow::{Context, Result};
use hypervisor::VmExit;
use slog::{info, warn};

use super::{Phase, Sandbox};
use crate::procfs::{self, ProcessStamp};

impl Sandbox {
    /// Starts the VM, recording the VMM process as soon as it exists (before QEMU answers
    /// QMP), then its saved state.
    pub(super) async fn boot(&mut self, timeout: Duration) -> Result<()> {
        let hv = self.hv.clone();
        let start = hv.start(timeout);
        tokio::pin!(start);
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let started = loop {
            let unrecorded = self.records.as_ref().is_some_and(|r| r.get().vmm.is_none());
            tokio::select! {
                started = &mut start => break started,
                _ = tick.tick(), if unrecorded => {
                    if let Some(vmm) = procfs::child_vmm(&self.id) {
                        self.record(|r| r.vmm = Some(vmm))?;
                        info!(self.log, "VMM process recorded"; "pid" => vmm.pid);
                    }
                }
            }
        };
        started.with_context(|| format!("Starting the {} VM", self.hv.name()))?;
        let pids = self.hv.pids().await?;
        self.vmm_pid = Some(pids.vmm);
        // An in-process VMM's pid is the shim's own: nothing to record, nor to kill.
        if pids.vmm != std::process::id() {
            let stamp = ProcessStamp::of(pids.vmm);
            self.record(|r| r.vmm = stamp.or(r.vmm))?;
        }
        self.save_state().await
    }

    /// Stores the backend's saved state in the record.
    pub(super) async fn save_state(&mut self) -> Result<()> {
        match self.hv.save_state().await {
            Ok(state) => {
                let value = serde_json::to_value(state)?;
                self.record(|r| r.saved_state = Some(value))
            }
            Err(e) => {
                warn!(self.log, "the backend cannot save its state"; "error" => e.to_string());
                Ok(())
            }
        }
    }

    /// The error for a VM that exited during `self.phase`.
    pub(super) async fn exited(&mut self, exit: hypervisor::Result<VmExit>) -> anyhow::Error {
        let how = match exit {
            Ok(e) => e.to_string(),
            Err(e) => format!("{:#}", anyhow::Error::from(e)),
        };
        let when = match self.phase {
            Phase::Preparing | Phase::Booting => "while it was booting",
            Phase::Agent => "before the guest agent answered",
            Phase::GuestNetwork => "while the guest's network was being configured",
            Phase::Serving => "on its own",
            Phase::Hotplug => "while a NIC was being hot-plugged",
        };
        let console = self.hv.console_log().await;
        match console
            .as_deref()
            .and_then(guest_agent::console::init_failure_in)
        {
            Some(why) => {
                anyhow::anyhow!("the VM exited {when} ({how}): the guest init failed: {why}")
            }
            None => anyhow::anyhow!("the VM exited {when}: {how}"),
        }
    }
}
