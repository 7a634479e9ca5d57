//! QEMU's steps of the lifecycle: prepare, start, pause/resume, stop, and what the core asks
//! of a backend (capabilities, the agent's address, saved state).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hypervisor::vm::{Backend, Context};
use hypervisor::{
    AgentAddress, AgentChannelKind, Capabilities, ConfigError, Device, DeviceId, DeviceInfo, Error,
    HypervisorConfig, Operation, PlugMode, Result, VmmPids,
};
use serde_json::json;
use slog::{info, warn};

use crate::cmdline::{Accel, AgentArgs, BlockArgs, CmdlineSpec, Machine, NicArgs, SharedFsArgs};
use crate::exit::{
    connect_or_exit, kill_and_reap, spawn_exit_watch, vcpu_threads, wait_exited, KillOnDrop,
};
use crate::process;
use crate::virtiofs::Virtiofsd;
use crate::{ColdDevice, Qemu, QemuSandbox, RootPort, RunDir, BACKEND};

/// First `pcie.0` slot for devices; slot 0 is the host bridge, 0x1f the ICH9 LPC/SMBus.
pub(crate) const FIRST_ROOT_SLOT: u8 = 2;
/// Last usable `pcie.0` slot.
pub(crate) const LAST_ROOT_SLOT: u8 = 0x1e;

#[async_trait]
impl Backend for Qemu {
    type Sandbox = QemuSandbox;

    fn name(&self) -> &'static str {
        BACKEND
    }

    fn run_root(&self) -> &std::path::Path {
        &self.opts.run_root
    }

    async fn prepare(&self, vm: &mut QemuSandbox, ctx: Context<'_>) -> Result<()> {
        let spec = ctx.spec;
        let machine = match &spec.config.machine_type {
            None => Machine::Q35,
            Some(m) => Machine::parse(m).ok_or_else(|| {
                ConfigError::new(
                    "machine_type",
                    format!(
                        "{m:?} is not supported by the QEMU backend; use \"q35\" or \"microvm\""
                    ),
                )
            })?,
        };
        let (accel, why) = self.host.choose_accel(spec.config.accelerator)?;
        let run = RunDir {
            dir: ctx.run_dir.to_path_buf(),
        };
        let agent = match spec.config.agent_channel {
            AgentChannelKind::Vsock if !self.host.vhost_vsock => {
                return Err(Self::unsupported(
                    "a vsock agent channel",
                    "/dev/vhost-vsock is not available on this host; use agent_channel = \"virtio_serial\" or \"auto\"",
                ))
            }
            AgentChannelKind::Vsock | AgentChannelKind::Auto if self.host.vhost_vsock => {
                AgentAddress::Vsock {
                    cid: guest_cid(&spec.id),
                    port: spec.config.agent_port,
                }
            }
            _ => AgentAddress::VirtioSerial { path: run.agent() },
        };
        if let Some(image) = &spec.config.image {
            // Checked here, so a bad image fails prepare naming the key.
            std::fs::File::open(image).map_err(|e| {
                ConfigError::new(
                    "image",
                    format!(
                        "{} cannot be opened read-only ({e}); give an existing root filesystem image, or remove the key",
                        image.display()
                    ),
                )
            })?;
        }
        // Checked here, so an unusable rootless setup fails prepare naming the key.
        crate::confine::check_access(
            &spec.config,
            accel,
            matches!(agent, AgentAddress::Vsock { .. }),
        )?;
        // Likewise a template role's files and machine.
        if machine == Machine::Microvm && spec.config.boot.template_dir().is_some() {
            return Err(Self::unsupported(
                "VM templates on microvm",
                "a template's vmgenid device needs q35's ACPI tables; use machine_type = \"q35\"",
            ));
        }
        crate::template::check(&spec.config)?;
        // Likewise a virtio-fs daemon that is missing or is not virtiofsd.
        let daemon = crate::virtiofs::resolve(&spec.config).await?;
        if let Some(d) = &daemon {
            info!(self.log, "virtio-fs daemon"; "sandbox" => &spec.id,
                "binary" => d.path.display().to_string(), "flavour" => format!("{:?}", d.flavour));
        }
        info!(self.log, "prepared";
            "sandbox" => &spec.id, "machine" => machine.as_str(),
            "accel" => accel.as_str(), "accel_reason" => why, "agent" => agent.to_string());
        vm.machine = Some(machine);
        vm.accel = Some(accel);
        vm.agent = Some(agent);
        vm.run = Some(run);
        vm.daemon = daemon;
        vm.next_root_slot = FIRST_ROOT_SLOT;
        if let Some(image) = &spec.config.image {
            // The first device, so the guest enumerates it first (`vda`).
            self.attach_image(vm, image)?;
        }
        Ok(())
    }

    async fn start(
        &self,
        vm: &mut QemuSandbox,
        ctx: Context<'_>,
        timeout: Duration,
    ) -> Result<VmmPids> {
        self.start_qemu(vm, ctx, timeout).await
    }

    async fn stop(&self, vm: &mut QemuSandbox, _ctx: Context<'_>) -> Result<()> {
        let Some(child) = vm.process.as_ref() else {
            self.stop_virtiofsd(vm).await;
            return Ok(());
        };
        let mut exited = child.exited.clone();
        let pid = child.pid;
        let began = Instant::now();
        // The shares' daemons end when QEMU lets go of them: that is part of this stop.
        for d in vm.virtiofsd.values() {
            d.expect_exit();
        }
        if let Some(qmp) = vm.qmp.clone() {
            // Graceful first: ACPI power button, then QEMU's own quit. A QEMU that does not
            // answer is killed without waiting more; one that exits ends the wait at once
            // (its QMP connection closes). A guest whose vCPUs are stopped (paused, or a
            // saved template) cannot see the button: straight to quit.
            let t = self.opts.qmp_timeout;
            let answered = |r: &crate::qmp::Result<_>| !matches!(r, Err(e) if e.is_timeout());
            let status = qmp.execute("query-status", None, t).await;
            let running = match &status {
                Ok(s) => s.get("running").and_then(serde_json::Value::as_bool) != Some(false),
                Err(_) => true,
            };
            if !qmp.is_closed()
                && answered(&status)
                && (!running
                    || (answered(&qmp.execute("system_powerdown", None, t).await)
                        && !wait_exited(&mut exited, self.opts.stop_grace).await))
                && !qmp.is_closed()
            {
                let _ = qmp.execute("quit", None, t).await;
            }
        }
        if !wait_exited(&mut exited, Duration::from_secs(3)).await {
            warn!(self.log, "QEMU did not quit; killing it"; "pid" => pid);
            kill_and_reap(vm.process.as_ref().expect("checked")).await;
        }
        vm.qmp = None;
        vm.process = None;
        self.stop_virtiofsd(vm).await;
        info!(self.log, "QEMU stopped"; "pid" => pid, "ms" => began.elapsed().as_millis() as u64);
        Ok(())
    }

    async fn pause(&self, vm: &mut QemuSandbox, ctx: Context<'_>) -> Result<()> {
        self.stop_or_cont(vm, ctx, Operation::Pause).await
    }

    async fn resume(&self, vm: &mut QemuSandbox, ctx: Context<'_>) -> Result<()> {
        self.stop_or_cont(vm, ctx, Operation::Resume).await
    }

    async fn cold_plug(
        &self,
        vm: &mut QemuSandbox,
        ctx: Context<'_>,
        device: Device,
    ) -> Result<DeviceInfo> {
        self.plug(vm, ctx, device, PlugMode::Cold).await
    }

    async fn save_template(
        &self,
        vm: &mut QemuSandbox,
        ctx: Context<'_>,
    ) -> Result<hypervisor::TemplateFiles> {
        self.save(vm, ctx).await
    }

    async fn hot_plug(
        &self,
        vm: &mut QemuSandbox,
        ctx: Context<'_>,
        device: Device,
    ) -> Result<DeviceInfo> {
        self.plug(vm, ctx, device, PlugMode::Hot).await
    }

    async fn remove(
        &self,
        vm: &mut QemuSandbox,
        ctx: Context<'_>,
        id: &DeviceId,
        mode: PlugMode,
    ) -> Result<()> {
        self.unplug(vm, ctx, id, mode).await
    }

    fn capabilities(&self, vm: &QemuSandbox) -> Capabilities {
        self.capabilities_for(vm.machine, vm.daemon.is_some())
    }

    fn agent_address(&self, vm: &QemuSandbox) -> Result<AgentAddress> {
        vm.agent
            .clone()
            .ok_or_else(|| Error::backend("Reading the agent's address", "not prepared"))
    }

    fn effective_config(&self, vm: &QemuSandbox, config: &mut HypervisorConfig) {
        config.path = Some(self.binary(config));
        config.machine_type = vm.machine.map(|m| m.as_str().to_string());
    }

    fn saved(&self, vm: &QemuSandbox) -> (Vec<DeviceInfo>, serde_json::Value) {
        let data = json!({
            "qmp_socket": vm.run.as_ref().map(RunDir::qmp),
            "machine": vm.machine.map(Machine::as_str),
            "accel": vm.accel.map(Accel::as_str),
            "agent": vm.agent,
            "unplug_pending": vm.unplugging.iter().collect::<Vec<_>>(),
            "unsettled": vm.unsettled.values().collect::<Vec<_>>(),
            "ports": vm.ports.iter().map(|p| json!({
                "id": p.id, "slot": p.slot, "used_by": p.used_by,
            })).collect::<Vec<_>>(),
        });
        (vm.hot.values().cloned().collect(), data)
    }
}

impl Qemu {
    pub(crate) fn binary(&self, config: &HypervisorConfig) -> PathBuf {
        config
            .path
            .clone()
            .unwrap_or_else(|| self.opts.default_binary.clone())
    }

    async fn start_qemu(
        &self,
        inner: &mut QemuSandbox,
        ctx: Context<'_>,
        timeout: Duration,
    ) -> Result<VmmPids> {
        let began = Instant::now();
        let spec = ctx.spec;
        let run = inner.run.clone().expect("prepared");
        let machine = inner.machine.expect("prepared");
        let accel = inner.accel.expect("prepared");

        // Listening sockets, created here and inherited by QEMU: they exist before QEMU runs,
        // so connecting never races its start-up.
        let bind = |path: PathBuf| {
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path)
                .and_then(|l| crate::confine::make_private(&path).map(|()| l))
                .map(OwnedFd::from)
                .map_err(|e| Error::backend(format!("Binding {}", path.display()), e))
        };
        let mut fds = netdev::ChildFds::new();
        let qmp_fd = fds.push(bind(run.qmp())?);
        let agent = match inner.agent.clone().expect("prepared") {
            AgentAddress::Vsock { cid, .. } => AgentArgs::Vsock { cid },
            _ => AgentArgs::Serial {
                fd: fds.push(bind(run.agent())?),
            },
        };
        let console = spec
            .config
            .console_log
            .clone()
            .unwrap_or_else(|| run.dir.join("console.log"));
        let files =
            crate::confine::StartFiles::open(&spec.config, &run, &console, &inner.cold, &mut fds)?;
        let template = crate::template::open(&spec.config, &mut fds)?;

        // Before the cold devices are taken: a start refused here can be retried with them.
        let mut ports = Vec::new();
        if machine == Machine::Q35 {
            for i in 0..self.opts.hotplug_ports {
                let slot = self.take_root_slot(inner)?;
                ports.push(RootPort {
                    id: format!("rp{i}"),
                    slot,
                    used_by: None,
                });
            }
        }
        // The shares' daemons, each with the connected end of its socket for QEMU. Stopped
        // again if this start fails or is dropped (`Virtiofsd`'s drop kills).
        let mut daemons = Vec::new();
        let mut share_fds = std::collections::BTreeMap::new();
        for dev in &inner.cold {
            if let ColdDevice::SharedFs { info, share, .. } = dev {
                let daemon = inner.daemon.as_ref().expect("checked at cold plug");
                match Virtiofsd::start(daemon, &run, &info.id, share, &self.log).await {
                    Ok((d, conn)) => {
                        share_fds.insert(info.id.clone(), fds.push(conn));
                        daemons.push((info.id.clone(), d));
                    }
                    Err(e) => {
                        stop_all(daemons).await;
                        return Err(e);
                    }
                }
            }
        }
        let mut nics = Vec::new();
        let mut blocks = Vec::new();
        let mut shares = Vec::new();
        let mut cold_infos = Vec::new();
        for dev in inner.cold.drain(..) {
            cold_infos.push(dev.info().clone());
            match dev {
                ColdDevice::Nic {
                    info,
                    taps,
                    vhost,
                    queue_size,
                    mtu,
                    place,
                } => nics.push(NicArgs {
                    id: info.id.to_string(),
                    mac: info.mac.expect("NICs have a MAC"),
                    tap_fds: fds.extend(taps),
                    vhost_fds: fds.extend(vhost),
                    queue_size,
                    mtu,
                    place,
                }),
                ColdDevice::Block {
                    info,
                    path,
                    read_only,
                    place,
                } => blocks.push(BlockArgs {
                    id: info.id.to_string(),
                    path: files.disks.get(&info.id).cloned().unwrap_or(path),
                    read_only,
                    place,
                }),
                ColdDevice::SharedFs { info, share, place } => shares.push(SharedFsArgs {
                    id: info.id.to_string(),
                    socket_fd: share_fds[&info.id],
                    tag: share.tag,
                    place,
                }),
            }
        }
        let cmd = CmdlineSpec {
            name: spec.id.clone(),
            machine,
            accel,
            vcpus: spec.config.vcpus,
            memory_mib: spec.config.memory_mib,
            kernel: template
                .as_ref()
                .and_then(|t| t.kernel.clone())
                .unwrap_or(files.kernel),
            initrd: match template.as_ref().and_then(|t| t.kernel.as_ref()) {
                Some(_) => None,
                None => files.initrd,
            },
            kernel_params: self
                .opts
                .boot_params
                .split_whitespace()
                .map(String::from)
                .chain(spec.config.kernel_params.iter().cloned())
                .collect(),
            firmware: match machine {
                // qboot stops before the kernel when a vmgenid device is there (it cannot
                // serve the device's ACPI table); templates and their clones keep SeaBIOS.
                Machine::Q35 if template.is_some() => None,
                Machine::Q35 => self.opts.q35_firmware.clone(),
                Machine::Microvm => None,
            },
            tb_size_mib: self.opts.tcg_tb_size_mib,
            free_page_reporting: spec.config.reclaim_guest_freed_memory,
            qmp_fd,
            console_log: files.console,
            fdsets: files.fdsets,
            seccomp: files.seccomp,
            chroot: files.chroot,
            agent,
            nics,
            blocks,
            root_ports: ports.iter().map(|p| (p.id.clone(), p.slot)).collect(),
            shared_memory: inner.daemon.is_some(),
            shares,
            template: template.as_ref().map(|t| t.args.clone()),
        };
        let binary = self.binary(&spec.config);
        let args = cmd.args();
        info!(self.log, "starting QEMU"; "sandbox" => &spec.id, "binary" => binary.display().to_string(),
            "args" => args.join(" "));
        let child = match process::spawn(
            &binary,
            &args,
            fds,
            spec.netns.as_deref(),
            &run.qemu_log(),
            files.run_as,
        )
        .await
        {
            Ok(child) => child,
            Err(e) => {
                stop_all(daemons).await;
                return Err(Error::backend(
                    format!("Starting QEMU for sandbox {}", spec.id),
                    e,
                ));
            }
        };
        // From here until start returns, a dropped start (the caller cancelled boot, or a
        // stop came) kills QEMU.
        let mut spawned = KillOnDrop::new(&child, &self.log);
        let pid = child.pid;

        let connected = tokio::time::timeout(timeout, connect_or_exit(&run, &child)).await;
        let qmp = match connected {
            Ok(Ok(qmp)) => qmp,
            Ok(Err(e)) => {
                kill_and_reap(&child).await;
                stop_all(daemons).await;
                return Err(e);
            }
            Err(_) => {
                kill_and_reap(&child).await;
                stop_all(daemons).await;
                return Err(Error::Timeout {
                    what: format!("QEMU (pid {pid}) to answer on QMP"),
                    timeout,
                });
            }
        };
        // Taken before anything else is asked, so no SHUTDOWN event can slip by the watcher.
        let events = qmp.subscribe();
        let qmp = Arc::new(qmp);
        let vcpus = vcpu_threads(&qmp, self.opts.qmp_timeout).await;
        if let Some(incoming) = template.and_then(|t| t.incoming) {
            let left = timeout.saturating_sub(began.elapsed());
            if let Err(e) = self.restore_template(&qmp, &child, incoming, left).await {
                kill_and_reap(&child).await;
                stop_all(daemons).await;
                return Err(e);
            }
        }
        spawn_exit_watch(ctx.lifecycle.clone(), &child, events, self.log.clone());
        spawned.disarm();
        for info in cold_infos {
            inner.hot.insert(info.id.clone(), info);
        }
        inner.ports = ports;
        inner.virtiofsd.extend(daemons);
        info!(self.log, "QEMU running"; "sandbox" => &spec.id, "pid" => pid,
            "qemu" => qmp.version.clone(), "ms" => began.elapsed().as_millis() as u64);
        inner.qmp = Some(qmp);
        inner.process = Some(child);
        Ok(VmmPids {
            vmm: pid,
            main_thread: pid,
            vcpus,
        })
    }

    pub(crate) fn take_root_slot(&self, inner: &mut QemuSandbox) -> Result<u8> {
        let slot = inner.next_root_slot;
        if slot > LAST_ROOT_SLOT {
            return Err(Self::unsupported(
                "another PCI device",
                "every slot of pcie.0 is used; lower hotplug_ports or attach fewer cold devices",
            ));
        }
        inner.next_root_slot += 1;
        Ok(slot)
    }

    /// QMP `stop` or `cont`, and waiting for QEMU's `STOP` or `RESUME` event.
    async fn stop_or_cont(
        &self,
        inner: &mut QemuSandbox,
        ctx: Context<'_>,
        op: Operation,
    ) -> Result<()> {
        let qmp = inner.qmp.clone().expect("running VMs have QMP");
        let (cmd, event) = if op == Operation::Pause {
            ("stop", "STOP")
        } else {
            ("cont", "RESUME")
        };
        let mut events = qmp.subscribe();
        let asked = async {
            qmp.execute(cmd, None, self.opts.qmp_timeout)
                .await
                .map_err(|e| (format!("Asking QEMU to {op}"), e))?;
            qmp.wait_event(&mut events, event, |_| true, self.opts.qmp_timeout)
                .await
                .map_err(|e| (format!("Waiting for QEMU's {event} event"), e))
        };
        match asked.await {
            Ok(_) => Ok(()),
            Err((step, e)) => Err(self.qmp_failure(ctx.lifecycle, step, e).await),
        }
    }
}

impl Qemu {
    /// Stops every share's virtiofsd (QEMU is gone, or never started).
    pub(crate) async fn stop_virtiofsd(&self, vm: &mut QemuSandbox) {
        for (id, d) in std::mem::take(&mut vm.virtiofsd) {
            let pid = d.pid();
            d.stop().await;
            info!(self.log, "virtiofsd stopped"; "id" => id.as_str(), "pid" => pid);
        }
    }
}

async fn stop_all(daemons: Vec<(DeviceId, Virtiofsd)>) {
    for (_, d) in daemons {
        d.stop().await;
    }
}

/// A guest CID derived from the sandbox id, in the unreserved range.
fn guest_cid(id: &str) -> u32 {
    let mac = hypervisor::MacAddress::local_from_seed(id.as_bytes()).0;
    3 + (u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]) % 0x3fff_fff0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::{Hypervisor, SandboxSpec, VmState};

    #[test]
    fn guest_cids_are_unreserved_and_stable() {
        let a = guest_cid("sandbox-1");
        assert!(a >= 3);
        assert_eq!(a, guest_cid("sandbox-1"));
        assert_ne!(a, guest_cid("sandbox-2"));
    }

    #[tokio::test]
    async fn a_start_refused_for_want_of_slots_keeps_the_cold_devices() {
        use hypervisor::device::{BlockConfig, BlockDriver};
        use hypervisor::{DeviceConfig, DeviceManager};
        let run_root = tempfile::tempdir().unwrap();
        let disk = tempfile::NamedTempFile::new().unwrap();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let hv = Arc::new(hypervisor::Vm::new(Qemu::new(
            log,
            crate::QemuOptions {
                run_root: run_root.path().to_path_buf(),
                // More ports than pcie.0 has slots: start is refused before QEMU runs.
                hotplug_ports: 40,
                ..crate::QemuOptions::default()
            },
        )));
        hv.prepare(&SandboxSpec {
            id: "slots".into(),
            netns: None,
            config: HypervisorConfig {
                kernel: "/nonexistent/vmlinuz".into(),
                seccomp_sandbox: None,
                ..Default::default()
            },
        })
        .await
        .unwrap();
        let devices = DeviceManager::new(hv.clone());
        devices
            .add(DeviceConfig::Block(BlockConfig {
                path: disk.path().to_path_buf(),
                read_only: true,
                driver: BlockDriver::VirtioBlkPci,
            }))
            .await
            .unwrap();
        let err = hv.start(Duration::from_secs(5)).await.unwrap_err();
        assert!(err.is_unsupported(), "{err}");
        assert_eq!(
            hv.with_sandbox(|s| s.cold.len()).await,
            1,
            "the cold disk is kept"
        );
        // The VM did not start: it is over, and says why.
        assert_eq!(hv.state().await, VmState::Stopped);
        let exit = hv.wait_exit().await.unwrap();
        assert!(
            format!("{exit}").contains("every slot of pcie.0 is used"),
            "{exit}"
        );
        hv.cleanup().await.unwrap();
        assert!(!run_root.path().join("slots").exists());
    }

    #[test]
    fn unsupported_errors_name_the_backend() {
        let e = Qemu::unsupported("x", "y");
        assert!(e.to_string().contains(BACKEND));
    }
}
