//! The Dragonball steps of the lifecycle ([`Backend`]): prepare's KVM checks, start, pause
//! and resume, stop, and what a saved state records. The lifecycle core ([`hypervisor::Vm`])
//! does the rest: states, `wait_exit`, the run directory, the namespace check.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use hypervisor::vm::{unsupported, Context};
use hypervisor::{
    Accelerator, AgentAddress, AgentChannelSource, Backend, Capabilities, ConfigError, Device,
    DeviceId, DeviceInfo, Error, HypervisorConfig, Operation, PlugMode, Result, VmmPids,
};
use serde_json::json;
use slog::info;

use crate::boot::KernelCmdline;
use crate::vcpu::VcpuCommand;
use crate::vmm::{self, BootPlan};
use crate::{Dragonball, DragonballSandbox, BACKEND};

#[async_trait]
impl Backend for Dragonball {
    type Sandbox = DragonballSandbox;

    fn name(&self) -> &'static str {
        BACKEND
    }

    fn run_root(&self) -> &std::path::Path {
        &self.opts.run_root
    }

    async fn prepare(&self, _vm: &mut DragonballSandbox, ctx: Context<'_>) -> Result<()> {
        let spec = ctx.spec;
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
        info!(self.log, "prepared"; "sandbox" => &spec.id, "run_dir" => ctx.run_dir.display().to_string());
        Ok(())
    }

    async fn start(
        &self,
        vm: &mut DragonballSandbox,
        ctx: Context<'_>,
        timeout: Duration,
    ) -> Result<VmmPids> {
        let began = Instant::now();
        let spec = ctx.spec;
        let mut cmdline = KernelCmdline::new();
        for d in &vm.devices {
            cmdline.add_virtio_mmio(&d.window);
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
                .unwrap_or_else(|| ctx.run_dir.join("console.log")),
        };
        let virtio: Vec<_> = vm
            .devices
            .iter_mut()
            .filter_map(|d| {
                let dev = d.device.take()?;
                Some((
                    d.window,
                    dev.into_inner().unwrap_or_else(|p| p.into_inner()),
                ))
            })
            .collect();
        info!(self.log, "starting the VM"; "sandbox" => &spec.id,
            "kernel" => plan.kernel.display().to_string(), "cmdline" => &plan.cmdline,
            "vcpus" => plan.vcpus, "memory_mib" => spec.config.memory_mib);

        // A failed start is recorded as the VM's exit by the lifecycle core. Whatever was
        // built is dropped with a cancelled future, and a dropped `RunningVm` tells its event
        // thread to stop the threads already started.
        let starting = async {
            let log = self.log.clone();
            let built = tokio::task::spawn_blocking(move || vmm::build(&plan, virtio, &log))
                .await
                .map_err(|e| Error::backend("Building the Dragonball VM", e))??;
            vmm::launch(
                built,
                spec.netns.clone(),
                ctx.lifecycle.clone(),
                self.log.clone(),
            )
            .await
            .map_err(Error::from)
        };
        let running = tokio::time::timeout(timeout, starting)
            .await
            .map_err(|_| Error::Timeout {
                what: "the Dragonball VM to start".into(),
                timeout,
            })??;
        let pids = VmmPids {
            vmm: std::process::id(),
            main_thread: running.event_tid,
            vcpus: running.vcpu_tids.clone(),
        };
        info!(self.log, "VM running"; "sandbox" => &spec.id,
            "vcpu_tids" => format!("{:?}", running.vcpu_tids),
            "ms" => began.elapsed().as_millis() as u64);
        vm.running = Some(running);
        Ok(pids)
    }

    async fn stop(&self, vm: &mut DragonballSandbox, _ctx: Context<'_>) -> Result<()> {
        let Some(mut running) = vm.running.take() else {
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
        info!(self.log, "VM stopped"; "ms" => began.elapsed().as_millis() as u64);
        Ok(())
    }

    async fn pause(&self, vm: &mut DragonballSandbox, ctx: Context<'_>) -> Result<()> {
        let running = vm
            .running
            .as_ref()
            .ok_or_else(|| ctx.lifecycle.exited_or_state(Operation::Pause))?;
        let mut acks = Vec::new();
        running.vcpus.send_all(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            acks.push(rx);
            VcpuCommand::Pause(tx)
        });
        let all_parked = async {
            for ack in acks {
                if ack.await.is_err() {
                    // The vCPU returned instead: the VM is ending.
                    return Err(Error::VmmExited(ctx.lifecycle.wait_exit().await));
                }
            }
            Ok(())
        };
        match tokio::time::timeout(self.opts.pause_timeout, all_parked).await {
            Ok(parked) => parked,
            Err(_) => {
                running.vcpus.resume();
                Err(Error::Timeout {
                    what: "every vCPU to pause".into(),
                    timeout: self.opts.pause_timeout,
                })
            }
        }
    }

    async fn resume(&self, vm: &mut DragonballSandbox, ctx: Context<'_>) -> Result<()> {
        let running = vm
            .running
            .as_ref()
            .ok_or_else(|| ctx.lifecycle.exited_or_state(Operation::Resume))?;
        running.vcpus.resume();
        Ok(())
    }

    async fn cold_plug(
        &self,
        vm: &mut DragonballSandbox,
        ctx: Context<'_>,
        device: Device,
    ) -> Result<DeviceInfo> {
        self.add_cold(vm, ctx, device)
    }

    async fn remove(
        &self,
        vm: &mut DragonballSandbox,
        _ctx: Context<'_>,
        id: &DeviceId,
        mode: PlugMode,
    ) -> Result<()> {
        self.remove_cold(vm, id, mode)
    }

    fn capabilities(&self, _vm: &DragonballSandbox) -> Capabilities {
        Capabilities {
            network_hotplug: false,
            block_hotplug: false,
            multi_queue: true,
            tap_fds: false,
            pause: true,
            vsock: true,
            in_process: true,
            // The first CID a guest may have (0 to 2 are reserved); each VM has its own
            // hybrid-vsock socket, so one CID serves every sandbox.
            agent_channel: AgentChannelSource::VsockDevice { guest_cid: 3 },
            shared_fs: false,
            shared_fs_hotplug: false,
            templates: false,
        }
    }

    fn agent_address(&self, vm: &DragonballSandbox) -> Result<AgentAddress> {
        vm.agent.clone().ok_or_else(|| {
            unsupported(
                BACKEND,
                "an agent channel without a vsock device",
                "add a DeviceConfig::Vsock before start; the agent is reached over hybrid vsock",
            )
        })
    }

    fn effective_config(&self, _vm: &DragonballSandbox, config: &mut HypervisorConfig) {
        config.accelerator = Accelerator::Kvm;
        config.path = None;
    }

    fn saved(&self, vm: &DragonballSandbox) -> (Vec<DeviceInfo>, serde_json::Value) {
        let data = json!({
            "in_process": true,
            "devices": vm.devices.iter().map(|d| json!({
                "id": d.info.id.as_str(), "kind": d.info.kind,
                "location": d.info.location.to_string(), "host": d.info.host,
            })).collect::<Vec<_>>(),
            "mmio_windows": vm.devices.iter().map(|d| json!({
                "base": d.window.base, "size": d.window.size, "irq": d.window.irq,
            })).collect::<Vec<_>>(),
        });
        (Vec::new(), data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DragonballHypervisor, DragonballOptions};
    use hypervisor::{Hypervisor, SandboxSpec, Vm, VmState};

    fn backend(root: &std::path::Path) -> DragonballHypervisor {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        Vm::new(Dragonball::new(
            log,
            DragonballOptions {
                run_root: root.to_path_buf(),
                ..Default::default()
            },
        ))
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
        assert!(!dir.path().join("tcg").exists(), "the run directory stayed");
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
            .add_device(nic("net0", "02:00:00:00:00:01", 1), PlugMode::Cold)
            .await
            .unwrap();
        let b = vm
            .add_device(nic("net1", "02:00:00:00:00:02", 1), PlugMode::Cold)
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
        let windows: Vec<_> = vm
            .with_sandbox(|s| s.devices.iter().map(|d| d.window).collect())
            .await;
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
        vm.add_device(nic("net0", "02:00:00:00:00:01", 1), PlugMode::Cold)
            .await
            .unwrap();
        let err = vm
            .add_device(nic("net1", "02:00:00:00:00:01", 1), PlugMode::Cold)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(c) if c.field == "network.guest_mac"),
            "{err:?}"
        );
        let err = vm
            .add_device(nic("net0", "02:00:00:00:00:03", 1), PlugMode::Cold)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(c) if c.field == "id"),
            "{err:?}"
        );
        let b = vm
            .add_device(nic("net2", "02:00:00:00:00:02", 1), PlugMode::Cold)
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
            .add_device(nic("net0", "02:00:00:00:00:01", 17), PlugMode::Cold)
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
            .add_device(
                blk("/etc/hostname", BlockDriver::VirtioBlkPci),
                PlugMode::Cold,
            )
            .await
            .unwrap_err();
        assert!(err.is_unsupported(), "{err}");
        let err = vm
            .add_device(
                blk("/nonexistent/disk.img", BlockDriver::VirtioBlkMmio),
                PlugMode::Cold,
            )
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

    #[tokio::test]
    async fn a_failed_cold_batch_is_rolled_back_through_the_device_manager() {
        let dir = tempfile::tempdir().unwrap();
        let vm = std::sync::Arc::new(backend(dir.path()));
        vm.prepare(&spec("batch")).await.unwrap();
        let manager = hypervisor::DeviceManager::new(vm.clone());
        let mut net =
            hypervisor::device::NetworkConfig::tap("tap0", "02:00:00:00:00:01".parse().unwrap());
        net.queue_pairs = 1;
        let err = manager
            .add_all(vec![
                hypervisor::DeviceConfig::Vsock(hypervisor::device::VsockConfig { guest_cid: 3 }),
                hypervisor::DeviceConfig::Network(net.clone()),
                hypervisor::DeviceConfig::Block(hypervisor::device::BlockConfig {
                    path: "/nonexistent/disk.img".into(),
                    read_only: true,
                    driver: hypervisor::device::BlockDriver::VirtioBlkMmio,
                }),
            ])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Device { .. }), "{err:?}");
        assert!(manager.list().await.is_empty());
        assert_eq!(vm.with_sandbox(|s| s.devices.len()).await, 0);
        // The vsock device was dropped: its socket is gone, and so is the agent address.
        assert!(!dir
            .path()
            .join("batch")
            .join(crate::attach::VSOCK_SOCKET)
            .exists());
        assert!(vm.agent_address().await.unwrap_err().is_unsupported());
        // The windows are free again: the next device gets the first one.
        let info = manager
            .add(hypervisor::DeviceConfig::Network(net))
            .await
            .unwrap();
        assert!(matches!(
            info.location,
            hypervisor::device::GuestLocation::Mmio {
                base: 0xc000_0000,
                ..
            }
        ));
        let gone = hypervisor::DeviceId::new("blk9").unwrap();
        assert!(matches!(
            vm.remove_device(&gone, PlugMode::Cold).await.unwrap_err(),
            Error::DeviceNotFound(_)
        ));
        vm.cleanup().await.unwrap();
        assert!(!dir.path().join("batch").exists());
    }
}
