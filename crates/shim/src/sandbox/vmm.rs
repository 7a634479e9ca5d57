//! The sandbox's VMM: booting it (recorded as soon as the process exists), its saved
//! state, and the watch on its exit that ends any step it runs under.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hypervisor::{Hypervisor, VmExit};
use slog::{info, warn};

use super::{ms, Phase, Sandbox};
use crate::procfs::{self, ProcessStamp};

impl Sandbox {
    /// Starts the VM within the boot timeout, recording the VMM process as soon as it
    /// exists (before QEMU answers QMP), then its saved state.
    pub async fn boot(&mut self) -> Result<()> {
        let t = Instant::now();
        self.set_phase(Phase::Booting);
        let timeout = self.opts.boot_timeout;
        info!(self.log, "booting"; "timeout_s" => timeout.as_secs());
        let hv = self.hv.clone();
        let start = hv.start(timeout);
        tokio::pin!(start);
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let started = loop {
            let unrecorded = self.created().is_some_and(|r| r.vmm.is_none());
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
        self.save_state().await?;
        self.timings
            .insert("vmm_start".to_string(), ms(t.elapsed()));
        info!(self.log, "VMM running"; "pid" => self.vmm_pid, "ms" => ms(t.elapsed()));
        // A VM restored from a template gets its further NICs now (it has the template's).
        for (config, plan) in std::mem::take(&mut self.deferred) {
            let info = self
                .devices
                .add(config)
                .await
                .with_context(|| format!("Hot-plugging the NIC on TAP {}", plan.tap))?;
            self.pending.push((info, plan));
        }
        if self.template.is_some() {
            self.save_state().await?;
        }
        Ok(())
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

    /// A watch on the VM's exit, to race the steps after [`Sandbox::boot`] against it.
    pub fn exit_watch(&self) -> ExitWatch {
        ExitWatch {
            hv: self.hv.clone(),
            phase: self.phase.clone(),
            log: self.log.clone(),
        }
    }

    /// Whether the VM exits within a moment (a step failed because it is going).
    pub(super) async fn exits_soon(&self) -> bool {
        tokio::time::timeout(Duration::from_millis(500), self.hv.wait_exit())
            .await
            .is_ok()
    }
}

/// The VM's exit, watched apart from the [`Sandbox`] so that a step that borrows the
/// sandbox can be raced against it ([`ExitWatch::guard`]).
#[derive(Clone)]
pub struct ExitWatch {
    hv: Arc<dyn Hypervisor>,
    phase: Arc<Mutex<Phase>>,
    log: slog::Logger,
}

impl ExitWatch {
    /// Runs `step` until it ends or the VM exits. A VM that exits fails it at once with
    /// an error naming the exit, the phase, and the guest init's error line when the
    /// console has one; a step that failed because the VM went (its sockets close first)
    /// reports the exit too, the cause.
    pub async fn guard<T>(&self, step: impl Future<Output = Result<T>>) -> Result<T> {
        let exit = tokio::select! {
            done = step => {
                let e = match done {
                    Ok(v) => return Ok(v),
                    Err(e) => e,
                };
                match tokio::time::timeout(Duration::from_millis(500), self.hv.wait_exit()).await {
                    Ok(exit) => {
                        warn!(self.log, "step failed as the VM exited"; "error" => format!("{e:#}"));
                        exit
                    }
                    Err(_) => return Err(e),
                }
            }
            exit = self.hv.wait_exit() => exit,
        };
        Err(self.exited(exit).await)
    }

    /// The error for a VM that exited during the current phase.
    async fn exited(&self, exit: hypervisor::Result<VmExit>) -> anyhow::Error {
        let how = match exit {
            Ok(e) => e.to_string(),
            Err(e) => format!("{:#}", anyhow::Error::from(e)),
        };
        let when = self.phase.lock().unwrap_or_else(|p| p.into_inner()).when();
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use hypervisor::testing::FakeHypervisor;
    use hypervisor::{Capabilities, HypervisorConfig, SandboxSpec};

    use super::*;

    /// A running fake VM and a watch on it in `phase`.
    async fn running(phase: Phase) -> (Arc<FakeHypervisor>, ExitWatch) {
        let fake = Arc::new(FakeHypervisor::fake(Capabilities::default()));
        let spec = SandboxSpec {
            id: "watch".into(),
            netns: None,
            config: HypervisorConfig {
                kernel: "/vmlinux".into(),
                ..Default::default()
            },
        };
        fake.prepare(&spec).await.unwrap();
        fake.start(Duration::from_secs(1)).await.unwrap();
        let watch = ExitWatch {
            hv: fake.clone(),
            phase: Arc::new(Mutex::new(phase)),
            log: slog::Logger::root(slog::Discard, slog::o!()),
        };
        (fake, watch)
    }

    /// Set when dropped: tells that a step was cancelled.
    struct DropFlag(Arc<AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_step_that_ends_while_the_vm_runs_gives_its_value() {
        let (_fake, watch) = running(Phase::Agent).await;
        assert_eq!(watch.guard(async { anyhow::Ok(7) }).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn an_exit_cancels_the_step_and_names_the_phase() {
        let (fake, watch) = running(Phase::Agent).await;
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        let step = async move {
            let _flag = flag;
            std::future::pending::<Result<()>>().await
        };
        let crash = async {
            tokio::task::yield_now().await;
            fake.crash("vCPU 0: emulation failure");
        };
        let raced = async { tokio::join!(watch.guard(step), crash) };
        let (e, ()) = tokio::time::timeout(Duration::from_secs(5), raced)
            .await
            .expect("the step was not ended by the exit");
        let text = format!("{:#}", e.unwrap_err());
        assert!(
            text.starts_with("the VM exited before the guest agent answered: "),
            "{text}"
        );
        assert!(text.contains("vCPU 0: emulation failure"), "{text}");
        assert!(dropped.load(Ordering::SeqCst), "the step was not cancelled");
    }

    #[tokio::test]
    async fn a_step_failed_by_the_exit_reports_the_exit() {
        let (fake, watch) = running(Phase::Hotplug).await;
        let step = async {
            fake.crash("QEMU was killed");
            Err::<(), _>(anyhow::anyhow!("QMP socket closed"))
        };
        let text = format!("{:#}", watch.guard(step).await.unwrap_err());
        assert!(
            text.starts_with("the VM exited while a NIC was being hot-plugged: "),
            "{text}"
        );
        assert!(!text.contains("QMP socket closed"), "{text}");
    }

    #[tokio::test]
    async fn a_step_that_fails_while_the_vm_runs_gives_its_own_error() {
        let (_fake, watch) = running(Phase::Serving).await;
        let e = watch
            .guard(async { Err::<(), _>(anyhow::anyhow!("binding the control socket")) })
            .await
            .unwrap_err();
        assert_eq!(format!("{e:#}"), "binding the control socket");
    }
}
