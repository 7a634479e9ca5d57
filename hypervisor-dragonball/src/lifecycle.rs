//! Prepare, start, pause/resume, stop, save and cleanup.

use std::time::{Duration, Instant};

use hypervisor::{
    Accelerator, ConfigError, Error, ExitReason, Operation, Result, SandboxSpec, SavedState,
    VmExit, VmState, VmmPids,
};
use serde_json::json;
use slog::info;

use crate::boot::KernelCmdline;
use crate::vcpu::VcpuCommand;
use crate::vmm::{self, BootPlan};
use crate::{DragonballHypervisor, BACKEND};

impl DragonballHypervisor {
    fn check(&self, op: Operation) -> Result<VmState> {
        self.shared.state().next(op)
    }

    pub(crate) async fn do_prepare(&self, spec: &SandboxSpec) -> Result<()> {
        let mut inner = self.inner.lock().await;
        self.check(Operation::Prepare)?;
        spec.validate()?;
        if spec.config.accelerator == Accelerator::Tcg {
            return Err(ConfigError::new(
                "accelerator",
                "the Dragonball backend runs only on KVM; use \"kvm\" or \"auto\", or the QEMU backend for TCG",
            )
            .into());
        }
        if spec.config.vcpus > u32::from(u8::MAX) {
            return Err(ConfigError::new(
                "vcpus",
                format!(
                    "{} is more than the Dragonball backend's 255",
                    spec.config.vcpus
                ),
            )
            .into());
        }
        if let Some(ns) = &spec.netns {
            if !ns.exists() {
                return Err(ConfigError::new(
                    "netns",
                    format!(
                        "network namespace {} does not exist; create it (ip netns add) or pass an existing one",
                        ns.display()
                    ),
                )
                .into());
            }
        }
        let run_dir = self.opts.run_root.join(&spec.id);
        std::fs::create_dir_all(&self.opts.run_root).map_err(|e| {
            Error::backend(
                format!("Creating the run root {}", self.opts.run_root.display()),
                e,
            )
        })?;
        std::fs::create_dir(&run_dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                ConfigError::new(
                    "id",
                    format!(
                        "run directory {} already exists: a sandbox with this id is running or was not cleaned up",
                        run_dir.display()
                    ),
                )
                .into()
            } else {
                Error::backend(format!("Creating run directory {}", run_dir.display()), e)
            }
        })?;
        info!(self.log, "prepared"; "sandbox" => &spec.id, "run_dir" => run_dir.display().to_string());
        inner.spec = Some(spec.clone());
        inner.run_dir = Some(run_dir);
        self.shared.set_state(VmState::Prepared);
        Ok(())
    }

    pub(crate) async fn do_start(&self, timeout: Duration) -> Result<()> {
        let mut inner = self.inner.lock().await;
        self.check(Operation::Start)?;
        let began = Instant::now();
        let spec = inner.spec.clone().expect("prepared");
        let run_dir = inner.run_dir.clone().expect("prepared");
        let mut cmdline = KernelCmdline::new();
        for w in &inner.mmio_windows {
            cmdline.add_virtio_mmio(w);
        }
        cmdline.extend_user(spec.config.kernel_params.iter().cloned());
        let plan = BootPlan {
            kvm_path: self.opts.kvm_path.clone(),
            kernel: spec.config.kernel.clone(),
            initrd: spec.config.initrd.clone(),
            cmdline: cmdline.build()?,
            vcpus: spec.config.vcpus as u8,
            mem_bytes: u64::from(spec.config.memory_mib) << 20,
            console: spec
                .config
                .console_log
                .clone()
                .unwrap_or_else(|| run_dir.join("console.log")),
        };
        let virtio = std::mem::take(&mut inner.virtio);
        info!(self.log, "starting the VM"; "sandbox" => &spec.id,
            "kernel" => plan.kernel.display().to_string(), "cmdline" => &plan.cmdline,
            "vcpus" => plan.vcpus, "memory_mib" => spec.config.memory_mib);

        let starting = async {
            let log = self.log.clone();
            let built = tokio::task::spawn_blocking(move || vmm::build(&plan, virtio, &log))
                .await
                .map_err(|e| Error::backend("Building the Dragonball VM", e))??;
            vmm::launch(
                built,
                spec.netns.clone(),
                self.shared.clone(),
                self.log.clone(),
            )
            .await
            .map_err(Error::from)
        };
        let running = match tokio::time::timeout(timeout, starting).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.start_failed(e.to_string());
                return Err(e);
            }
            Err(_) => {
                // Whatever was built is dropped with the cancelled future, and a dropped
                // `RunningVm` tells its event thread to stop the threads already started.
                self.start_failed(format!("start timed out after {timeout:?}"));
                return Err(Error::Timeout {
                    what: "the Dragonball VM to start".into(),
                    timeout,
                });
            }
        };
        {
            let mut st = self.shared.status();
            st.pids = Some(VmmPids {
                vmm: std::process::id(),
                main_thread: running.event_tid,
                vcpus: running.vcpu_tids.clone(),
            });
            // A guest that already ended keeps its `Stopped`.
            if st.state == VmState::Prepared {
                st.state = VmState::Running;
            }
        }
        info!(self.log, "VM running"; "sandbox" => &spec.id,
            "vcpu_tids" => format!("{:?}", running.vcpu_tids),
            "ms" => began.elapsed().as_millis() as u64);
        inner.running = Some(running);
        Ok(())
    }

    /// A start that failed ends the VM, so that `wait_exit` does not wait forever.
    fn start_failed(&self, why: String) {
        self.shared.finish(VmExit {
            reason: ExitReason::Crashed(format!("the VM did not start: {why}")),
            code: None,
            signal: None,
        });
    }

    pub(crate) async fn do_pause(&self) -> Result<()> {
        let inner = self.inner.lock().await;
        let next = self.check(Operation::Pause)?;
        let running = inner.running.as_ref().expect("running VMs have threads");
        let mut acks = Vec::new();
        running.vcpus.send_all(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            acks.push(rx);
            VcpuCommand::Pause(tx)
        });
        let mut exit = self.shared.exit.subscribe();
        let all_parked = async {
            for ack in acks {
                if ack.await.is_err() {
                    // The vCPU returned instead: the VM is ending.
                    let _ = exit.wait_for(Option::is_some).await;
                    let ended = exit.borrow().clone().expect("waited for Some");
                    return Err(Error::VmmExited(ended));
                }
            }
            Ok(())
        };
        match tokio::time::timeout(self.opts.pause_timeout, all_parked).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                running.vcpus.resume();
                return Err(Error::Timeout {
                    what: "every vCPU to pause".into(),
                    timeout: self.opts.pause_timeout,
                });
            }
        }
        self.transition(VmState::Running, next);
        Ok(())
    }

    pub(crate) async fn do_resume(&self) -> Result<()> {
        let inner = self.inner.lock().await;
        let next = self.check(Operation::Resume)?;
        let running = inner.running.as_ref().expect("paused VMs have threads");
        running.vcpus.resume();
        self.transition(VmState::Paused, next);
        Ok(())
    }

    /// Moves from `from` to `to` unless the VM ended in between.
    fn transition(&self, from: VmState, to: VmState) {
        let mut st = self.shared.status();
        if st.state == from {
            st.state = to;
        }
    }

    pub(crate) async fn do_stop(&self) -> Result<()> {
        let mut inner = self.inner.lock().await;
        self.check(Operation::Stop)?;
        let Some(mut running) = inner.running.take() else {
            self.shared.set_state(VmState::Stopped);
            return Ok(());
        };
        let began = Instant::now();
        let timeout = self.opts.stop_timeout;
        if tokio::time::timeout(timeout, vmm::stop(&mut running))
            .await
            .is_err()
        {
            return Err(Error::Timeout {
                what: "the Dragonball VM's threads to stop".into(),
                timeout,
            });
        }
        self.shared.set_state(VmState::Stopped);
        info!(self.log, "VM stopped"; "ms" => began.elapsed().as_millis() as u64);
        Ok(())
    }

    pub(crate) async fn do_save_state(&self) -> Result<SavedState> {
        let inner = self.inner.lock().await;
        let st = self.shared.status();
        let sandbox = inner.spec.clone().ok_or(Error::InvalidState {
            operation: Operation::Prepare,
            state: st.state,
        })?;
        Ok(SavedState {
            backend: BACKEND.into(),
            sandbox,
            state: st.state,
            pids: st.pids.clone().unwrap_or_default(),
            devices: Vec::new(),
            backend_data: json!({
                "run_dir": inner.run_dir,
                "in_process": true,
                "devices": inner.attached.iter().map(|d| json!({
                    "id": d.id.as_str(), "kind": d.kind, "location": d.location.to_string(),
                    "host": d.host,
                })).collect::<Vec<_>>(),
                "mmio_windows": inner.mmio_windows.iter().map(|w| json!({
                    "base": w.base, "size": w.size, "irq": w.irq,
                })).collect::<Vec<_>>(),
            }),
        })
    }

    pub(crate) async fn do_cleanup(&self) -> Result<()> {
        if self.shared.state() != VmState::Created {
            self.do_stop().await?;
        }
        let mut inner = self.inner.lock().await;
        if let Some(dir) = inner.run_dir.take() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::backend(
                        format!("Removing run directory {}", dir.display()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DragonballOptions;
    use hypervisor::{Hypervisor, HypervisorConfig};

    fn backend(root: &std::path::Path) -> DragonballHypervisor {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        DragonballHypervisor::new(
            log,
            DragonballOptions {
                run_root: root.to_path_buf(),
                ..Default::default()
            },
        )
    }

    fn spec(id: &str) -> SandboxSpec {
        SandboxSpec {
            id: id.into(),
            netns: None,
            config: HypervisorConfig {
                kernel: "/var/lib/guest/vmlinux".into(),
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn tcg_is_rejected_because_dragonball_runs_only_on_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let vm = backend(dir.path());
        let mut s = spec("tcg");
        s.config.accelerator = Accelerator::Tcg;
        let err = vm.prepare(&s).await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(c) if c.field == "accelerator"),
            "{err:?}"
        );
        assert_eq!(vm.state().await, VmState::Created);
    }

    #[tokio::test]
    async fn pause_before_start_is_an_invalid_state() {
        let dir = tempfile::tempdir().unwrap();
        let vm = backend(dir.path());
        vm.prepare(&spec("early")).await.unwrap();
        let err = vm.pause().await.unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidState {
                operation: Operation::Pause,
                state: VmState::Prepared
            }
        ));
        assert!(vm.pids().await.is_err());
    }

    fn nic(id: &str, mac: &str, queue_pairs: u16) -> hypervisor::Device {
        let mut nic =
            hypervisor::device::NetworkConfig::tap(id.replace("net", "tap"), mac.parse().unwrap());
        nic.queue_pairs = queue_pairs;
        hypervisor::Device {
            id: hypervisor::DeviceId::new(id).unwrap(),
            config: hypervisor::DeviceConfig::Network(nic),
        }
    }

    #[tokio::test]
    async fn cold_devices_get_consecutive_mmio_windows_and_are_on_the_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        let vm = backend(dir.path());
        vm.prepare(&spec("dev")).await.unwrap();
        let a = vm
            .add_device(nic("net0", "02:00:00:00:00:01", 1))
            .await
            .unwrap();
        let b = vm
            .add_device(nic("net1", "02:00:00:00:00:02", 1))
            .await
            .unwrap();
        assert_eq!(
            a.location,
            hypervisor::device::GuestLocation::Mmio {
                base: 0xc000_0000,
                size: 0x1000,
                irq: Some(5)
            }
        );
        assert_eq!(
            b.location,
            hypervisor::device::GuestLocation::Mmio {
                base: 0xc000_1000,
                size: 0x1000,
                irq: Some(6)
            }
        );
        assert_eq!((a.queue_pairs, a.host.as_deref()), (Some(1), Some("tap0")));
        let windows = vm.inner.lock().await.mmio_windows.clone();
        assert_eq!(
            windows[0].cmdline_param(),
            "virtio_mmio.device=4K@0xc0000000:5"
        );
    }

    #[tokio::test]
    async fn a_second_nic_with_the_same_mac_or_id_is_refused_and_takes_no_window() {
        let dir = tempfile::tempdir().unwrap();
        let vm = backend(dir.path());
        vm.prepare(&spec("mac")).await.unwrap();
        vm.add_device(nic("net0", "02:00:00:00:00:01", 1))
            .await
            .unwrap();
        let err = vm
            .add_device(nic("net1", "02:00:00:00:00:01", 1))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(c) if c.field == "network.guest_mac"),
            "{err:?}"
        );
        let err = vm
            .add_device(nic("net0", "02:00:00:00:00:03", 1))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(c) if c.field == "id"),
            "{err:?}"
        );
        let b = vm
            .add_device(nic("net2", "02:00:00:00:00:02", 1))
            .await
            .unwrap();
        assert!(matches!(
            b.location,
            hypervisor::device::GuestLocation::Mmio {
                base: 0xc000_1000,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn multi_queue_pci_block_and_missing_images_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let vm = backend(dir.path());
        vm.prepare(&spec("bad")).await.unwrap();
        // More pairs than the device takes (crate::virtio::net::MAX_PAIRS).
        let err = vm
            .add_device(nic("net0", "02:00:00:00:00:01", 17))
            .await
            .unwrap_err();
        assert!(err.is_unsupported(), "{err}");
        let blk = |path: &str, driver| hypervisor::Device {
            id: hypervisor::DeviceId::new("blk0").unwrap(),
            config: hypervisor::DeviceConfig::Block(hypervisor::device::BlockConfig {
                path: path.into(),
                read_only: true,
                driver,
            }),
        };
        use hypervisor::device::BlockDriver;
        let err = vm
            .add_device(blk("/etc/hostname", BlockDriver::VirtioBlkPci))
            .await
            .unwrap_err();
        assert!(err.is_unsupported(), "{err}");
        let err = vm
            .add_device(blk("/nonexistent/disk.img", BlockDriver::VirtioBlkMmio))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Device { .. }), "{err:?}");
        let chain = format!("{:?}", std::error::Error::source(&err));
        assert!(chain.contains("/nonexistent/disk.img"), "{chain}");
    }

    #[tokio::test]
    async fn cleanup_removes_the_run_directory_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let vm = backend(dir.path());
        vm.prepare(&spec("clean")).await.unwrap();
        let console = vm.console_log().await.unwrap();
        assert_eq!(console, dir.path().join("clean/console.log"));
        assert!(dir.path().join("clean").is_dir());
        vm.cleanup().await.unwrap();
        vm.cleanup().await.unwrap();
        assert!(!dir.path().join("clean").exists());
        assert_eq!(vm.state().await, VmState::Stopped);
    }

    #[tokio::test]
    async fn a_second_sandbox_with_the_same_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        backend(dir.path()).prepare(&spec("same")).await.unwrap();
        let err = backend(dir.path())
            .prepare(&spec("same"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(c) if c.field == "id"),
            "{err:?}"
        );
    }
}
