//! Prepare, start, pause/resume, stop, save and cleanup.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::{
    AgentAddress, AgentChannelKind, ConfigError, Error, ExitReason, HypervisorConfig, Operation,
    Result, SandboxSpec, SavedState, VmExit, VmState, VmmPids,
};
use serde_json::json;
use slog::{info, warn};

use crate::cmdline::{Accel, AgentArgs, BlockArgs, CmdlineSpec, Machine, NicArgs};
use crate::process::{self, QemuProcess};
use crate::qmp::{QmpClient, QmpEvent, QmpEvents};
use crate::{ColdDevice, QemuHypervisor, RootPort, RunDir, Shared, BACKEND};

/// Why an operation gave up because a `stop` is under way.
pub(crate) const STOPPING: &str = "the VM is stopping";

/// First `pcie.0` slot for devices; slot 0 is the host bridge, 0x1f the ICH9 LPC/SMBus.
pub(crate) const FIRST_ROOT_SLOT: u8 = 2;
/// Last usable `pcie.0` slot.
pub(crate) const LAST_ROOT_SLOT: u8 = 0x1e;

impl QemuHypervisor {
    pub(crate) fn binary(&self, config: &HypervisorConfig) -> PathBuf {
        config
            .path
            .clone()
            .unwrap_or_else(|| self.opts.default_binary.clone())
    }

    fn check(&self, op: Operation) -> Result<VmState> {
        self.shared.state().next(op)
    }

    pub(crate) async fn do_prepare(&self, spec: &SandboxSpec) -> Result<()> {
        let mut inner = self.inner.lock().await;
        self.check(Operation::Prepare)?;
        spec.validate()?;
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
            _ => AgentAddress::VirtioSerial {
                path: PathBuf::new(),
            },
        };

        if let Some(image) = &spec.config.image {
            // Checked here, so a bad image fails prepare naming the key, with nothing created.
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
        let run = RunDir {
            dir: self.opts.run_root.join(&spec.id),
            console_log: spec.config.console_log.clone(),
        };
        // Checked here, so an unusable rootless setup fails prepare naming the key, with
        // nothing created.
        crate::confine::check_access(
            &spec.config,
            accel,
            matches!(agent, AgentAddress::Vsock { .. }),
        )?;
        crate::confine::create_run_root(&self.opts.run_root).map_err(|e| {
            Error::backend(
                format!("Creating the run root {}", self.opts.run_root.display()),
                e,
            )
        })?;
        crate::confine::create_run_dir(&run.dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                ConfigError::new(
                    "id",
                    format!(
                        "run directory {} already exists: a sandbox with this id is running or was not cleaned up",
                        run.dir.display()
                    ),
                )
                .into()
            } else {
                Error::backend(format!("Creating run directory {}", run.dir.display()), e)
            }
        })?;
        let agent = match agent {
            AgentAddress::VirtioSerial { .. } => AgentAddress::VirtioSerial { path: run.agent() },
            other => other,
        };
        info!(self.log, "prepared";
            "sandbox" => &spec.id, "machine" => machine.as_str(),
            "accel" => accel.as_str(), "accel_reason" => why, "agent" => agent.to_string());
        inner.spec = Some(spec.clone());
        inner.machine = Some(machine);
        inner.accel = Some(accel);
        inner.agent = Some(agent);
        inner.run = Some(run);
        inner.next_root_slot = FIRST_ROOT_SLOT;
        if let Some(image) = &spec.config.image {
            // The first device, so the guest enumerates it first (`vda`).
            if let Err(e) = self.attach_image(&mut inner, image) {
                let run = inner.run.take().expect("set above");
                let _ = std::fs::remove_dir(&run.dir);
                *inner = crate::Inner::default();
                return Err(e);
            }
        }
        self.shared.set_state(VmState::Prepared);
        Ok(())
    }

    pub(crate) async fn do_start(&self, timeout: Duration) -> Result<()> {
        let mut inner = self.inner.lock().await;
        self.check(Operation::Start)?;
        // A stop during boot ends it (the dropped start kills the QEMU it spawned).
        self.unless_stopping(self.start_locked(&mut inner, timeout), || {
            Error::backend("Starting QEMU", STOPPING)
        })
        .await
    }

    async fn start_locked(&self, inner: &mut crate::Inner, timeout: Duration) -> Result<()> {
        let began = Instant::now();
        let spec = inner.spec.clone().expect("prepared");
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

        let files = crate::confine::StartFiles::open(&spec.config, &run, &inner.cold, &mut fds)?;

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
        let mut nics = Vec::new();
        let mut blocks = Vec::new();
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
            }
        }
        let cmd = CmdlineSpec {
            name: spec.id.clone(),
            machine,
            accel,
            vcpus: spec.config.vcpus,
            memory_mib: spec.config.memory_mib,
            kernel: files.kernel,
            initrd: files.initrd,
            kernel_params: spec.config.kernel_params.clone(),
            qmp_fd,
            console_log: files.console,
            fdsets: files.fdsets,
            seccomp: files.seccomp,
            chroot: files.chroot,
            agent,
            nics,
            blocks,
            root_ports: ports.iter().map(|p| (p.id.clone(), p.slot)).collect(),
        };
        let binary = self.binary(&spec.config);
        let args = cmd.args();
        info!(self.log, "starting QEMU"; "sandbox" => &spec.id, "binary" => binary.display().to_string(),
            "args" => args.join(" "));
        // From here until start returns, a dropped start future (the caller cancelled boot)
        // kills QEMU and leaves the VM `Stopped`, so cleanup finds nothing running.
        let mut cancelled = StartGuard {
            shared: &self.shared,
            child: None,
            log: &self.log,
            armed: true,
            exit: VmExit {
                reason: ExitReason::Stopped,
                code: None,
                signal: None,
            },
        };
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
                // The cold devices' fds went with the failed command: this VM cannot start.
                let e = Error::backend(format!("Starting QEMU for sandbox {}", spec.id), e);
                cancelled.exit.reason = ExitReason::Crashed(crate::error_chain(&e));
                return Err(e);
            }
        };
        let pid = child.pid;
        cancelled.child = Some((pid, child.exited.clone()));

        let connected = tokio::time::timeout(timeout, connect_or_exit(&run, &child)).await;
        let qmp = match connected {
            Ok(Ok(qmp)) => qmp,
            Ok(Err(e)) => {
                kill_and_reap(&child).await;
                cancelled.exit = match &e {
                    Error::VmmExited(exit) => exit.clone(),
                    other => crashed(other),
                };
                return Err(e);
            }
            Err(_) => {
                kill_and_reap(&child).await;
                let e = Error::Timeout {
                    what: format!("QEMU (pid {pid}) to answer on QMP"),
                    timeout,
                };
                cancelled.exit = crashed(&e);
                return Err(e);
            }
        };
        // Taken before anything else is asked, so no SHUTDOWN event can slip by the watcher.
        let events = qmp.subscribe();
        let qmp = Arc::new(qmp);
        let vcpus = vcpu_threads(&qmp, self.opts.qmp_timeout).await;
        self.shared.status().pids = Some(VmmPids {
            vmm: pid,
            main_thread: pid,
            vcpus,
        });
        // The watcher starts after the state is Running, so an exit it sees always wins.
        self.shared.transition(VmState::Prepared, VmState::Running);
        spawn_exit_watch(self.shared.clone(), &child, events, self.log.clone());
        cancelled.armed = false;
        for info in cold_infos {
            inner.hot.insert(info.id.clone(), info);
        }
        inner.ports = ports;
        inner.qmp = Some(qmp);
        inner.process = Some(child);
        info!(self.log, "QEMU running"; "sandbox" => &spec.id, "pid" => pid,
            "qemu" => inner.qmp.as_ref().map(|q| q.version.clone()).unwrap_or_default(),
            "ms" => began.elapsed().as_millis() as u64);
        Ok(())
    }

    pub(crate) fn take_root_slot(&self, inner: &mut crate::Inner) -> Result<u8> {
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

    pub(crate) async fn do_pause_resume(&self, pause: bool) -> Result<()> {
        let inner = self.inner.lock().await;
        let op = if pause {
            Operation::Pause
        } else {
            Operation::Resume
        };
        let from = self.shared.state();
        let next = self.check_op(op)?;
        let qmp = inner.qmp.clone().expect("running VMs have QMP");
        let (cmd, event) = if pause {
            ("stop", "STOP")
        } else {
            ("cont", "RESUME")
        };
        let mut events = qmp.subscribe();
        let done = async {
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
                Err((step, e)) => Err(self.qmp_failure(step, e).await),
            }
        };
        self.unless_stopping(done, || {
            Error::backend(format!("Asking QEMU to {op}"), STOPPING)
        })
        .await?;
        // Compare-and-set: a VM that exited meanwhile stays Stopped.
        if !self.shared.transition(from, next) {
            return Err(self.exited_or_state(op));
        }
        Ok(())
    }

    pub(crate) async fn do_stop(&self) -> Result<()> {
        // Before the lock: an operation holding it gives up its QMP waits now.
        let _request = crate::StopRequest::new(&self.shared);
        let mut inner = self.inner.lock().await;
        self.check(Operation::Stop)?;
        let Some(child) = inner.process.as_ref() else {
            self.shared.set_state(VmState::Stopped);
            return Ok(());
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        let mut exited = child.exited.clone();
        let pid = child.pid;
        let began = Instant::now();
        if let Some(qmp) = inner.qmp.clone() {
            // Graceful first: ACPI power button, then QEMU's own quit. A QEMU that does not
            // answer is killed without waiting more; one that exits ends the wait at once
            // (its QMP connection closes).
            let answered = |r: &crate::qmp::Result<_>| !matches!(r, Err(e) if e.is_timeout());
            if !qmp.is_closed()
                && answered(
                    &qmp.execute("system_powerdown", None, self.opts.qmp_timeout)
                        .await,
                )
                && !wait_exited(&mut exited, self.opts.stop_grace).await
                && !qmp.is_closed()
            {
                let _ = qmp.execute("quit", None, self.opts.qmp_timeout).await;
            }
        }
        if !wait_exited(&mut exited, Duration::from_secs(3)).await {
            warn!(self.log, "QEMU did not quit; killing it"; "pid" => pid);
            kill_and_reap(inner.process.as_ref().expect("checked")).await;
        }
        inner.qmp = None;
        inner.process = None;
        self.shared.set_state(VmState::Stopped);
        info!(self.log, "QEMU stopped"; "pid" => pid, "ms" => began.elapsed().as_millis() as u64);
        Ok(())
    }

    pub(crate) async fn do_save_state(&self) -> Result<SavedState> {
        let inner = self.inner.lock().await;
        let st = self.shared.status();
        let sandbox = inner.spec.clone().ok_or(Error::InvalidState {
            operation: Operation::Prepare,
            state: st.state,
        })?;
        let run = inner.run.as_ref().expect("prepared");
        Ok(SavedState {
            backend: BACKEND.into(),
            sandbox,
            state: st.state,
            pids: st.pids.clone().unwrap_or_default(),
            devices: inner.hot.values().cloned().collect(),
            backend_data: json!({
                "run_dir": run.dir,
                "qmp_socket": run.qmp(),
                "machine": inner.machine.map(Machine::as_str),
                "accel": inner.accel.map(Accel::as_str),
                "agent": inner.agent,
                "unplug_pending": inner.unplugging.iter().collect::<Vec<_>>(),
                "unsettled": inner.unsettled.values().collect::<Vec<_>>(),
                "ports": inner.ports.iter().map(|p| json!({
                    "id": p.id, "slot": p.slot, "used_by": p.used_by,
                })).collect::<Vec<_>>(),
            }),
        })
    }

    /// Re-attaches to a QEMU that an earlier runtime process started, from the state that
    /// process saved with [`save_state`](hypervisor::Hypervisor::save_state): reconnects to
    /// its QMP socket, reads whether it runs or is paused, and watches its pid for exit.
    pub async fn restore(
        log: slog::Logger,
        opts: crate::QemuOptions,
        saved: SavedState,
    ) -> Result<QemuHypervisor> {
        if saved.backend != BACKEND {
            return Err(ConfigError::new(
                "backend",
                format!(
                    "saved state is for the {} backend, not {BACKEND}",
                    saved.backend
                ),
            )
            .into());
        }
        if !saved.state.is_alive() {
            return Err(Error::InvalidState {
                operation: Operation::Start,
                state: saved.state,
            });
        }
        let data = &saved.backend_data;
        let field = |name: &str| {
            data[name].as_str().map(String::from).ok_or_else(|| {
                ConfigError::new(
                    format!("backend_data.{name}"),
                    "missing from the saved state",
                )
            })
        };
        let run = RunDir {
            dir: PathBuf::from(field("run_dir")?),
            console_log: saved.sandbox.config.console_log.clone(),
        };
        let machine = Machine::parse(&field("machine")?)
            .ok_or_else(|| ConfigError::new("backend_data.machine", "unknown machine type"))?;
        let accel = match field("accel")?.as_str() {
            "kvm" => Accel::Kvm,
            _ => Accel::Tcg,
        };
        let agent: AgentAddress = serde_json::from_value(data["agent"].clone())
            .map_err(|e| ConfigError::new("backend_data.agent", e))?;
        let ports = data["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some(RootPort {
                    id: p["id"].as_str()?.to_string(),
                    slot: u8::try_from(p["slot"].as_u64()?).ok()?,
                    used_by: p["used_by"]
                        .as_str()
                        .and_then(|id| hypervisor::DeviceId::new(id).ok()),
                })
            })
            .collect();

        let pid = saved.pids.vmm;
        let child = process::watch_pid(pid)
            .map_err(|e| Error::backend(format!("Watching QEMU pid {pid}"), e))?;
        let qmp = QmpClient::connect(&run.qmp(), opts.qmp_timeout)
            .await
            .map_err(|e| Error::backend(format!("Re-attaching to QEMU pid {pid}"), e))?;
        let events = qmp.subscribe();
        let status = qmp
            .execute("query-status", None, opts.qmp_timeout)
            .await
            .map_err(|e| Error::backend("Querying QEMU's run state", e))?;
        let state = if status["running"].as_bool() == Some(true) {
            VmState::Running
        } else {
            VmState::Paused
        };

        let hv = QemuHypervisor::new(log, opts);
        {
            let mut st = hv.shared.status();
            st.state = state;
            st.pids = Some(saved.pids.clone());
        }
        spawn_exit_watch(hv.shared.clone(), &child, events, hv.log.clone());
        {
            let mut inner = hv.inner.lock().await;
            inner.spec = Some(saved.sandbox.clone());
            inner.machine = Some(machine);
            inner.accel = Some(accel);
            inner.agent = Some(agent);
            inner.run = Some(run);
            inner.hot = saved
                .devices
                .iter()
                .map(|d| (d.id.clone(), d.clone()))
                .collect();
            inner.ports = ports;
            // Unplugs the guest had not acknowledged are still pending: their ports stay
            // reserved until QEMU no longer has the device.
            inner.unplugging = data["unplug_pending"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|id| hypervisor::DeviceId::new(id.as_str()?).ok())
                .filter(|id| inner.hot.contains_key(id))
                .collect();
            inner.unsettled = unsettled_from(data, inner.ports.len());
            inner.qmp = Some(Arc::new(qmp));
            inner.process = Some(child);
        }
        info!(hv.log, "re-attached"; "sandbox" => &saved.sandbox.id, "pid" => pid, "state" => state.to_string());
        Ok(hv)
    }

    pub(crate) async fn do_cleanup(&self) -> Result<()> {
        if self.shared.state().is_alive() {
            self.do_stop().await?;
        }
        let mut inner = self.inner.lock().await;
        // Devices that never reached QEMU: their fds close here, and with them the TAPs
        // this backend created.
        inner.cold.clear();
        inner.hot.clear();
        inner.unsettled.clear();
        inner.unplugging.clear();
        if let Some(run) = inner.run.take() {
            match std::fs::remove_dir_all(&run.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::backend(
                        format!("Removing run directory {}", run.dir.display()),
                        e,
                    ))
                }
            }
        }
        if self.shared.state() != VmState::Created {
            self.shared.set_state(VmState::Stopped);
        }
        Ok(())
    }
}

/// The saved hotplugs of unknown outcome whose port is in range; the next device operation
/// settles them with QEMU.
fn unsettled_from(
    data: &serde_json::Value,
    ports: usize,
) -> std::collections::BTreeMap<hypervisor::DeviceId, crate::reconcile::Unsettled> {
    data["unsettled"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| serde_json::from_value::<crate::reconcile::Unsettled>(u.clone()).ok())
        .filter(|u| u.port < ports)
        .map(|u| (u.info.id.clone(), u))
        .collect()
}

/// A guest CID derived from the sandbox id, in the unreserved range.
fn guest_cid(id: &str) -> u32 {
    let mac = hypervisor::MacAddress::local_from_seed(id.as_bytes()).0;
    3 + (u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]) % 0x3fff_fff0)
}

async fn connect_or_exit(run: &RunDir, child: &QemuProcess) -> Result<QmpClient> {
    let socket = run.qmp();
    let mut exited = child.exited.clone();
    let connected = tokio::select! {
        qmp = QmpClient::connect(&socket, Duration::from_secs(3600)) => qmp,
        _ = exited.wait_for(Option::is_some) => return Err(early_exit(child)),
    };
    match connected {
        Ok(q) => Ok(q),
        // QEMU closing the socket usually means it exited: report its own words.
        Err(_) if wait_exited(&mut child.exited.clone(), Duration::from_secs(2)).await => {
            Err(early_exit(child))
        }
        Err(e) => Err(Error::backend("Connecting to QEMU's QMP socket", e)),
    }
}

fn early_exit(child: &QemuProcess) -> Error {
    let status = (*child.exited.borrow()).unwrap_or_else(|| ExitStatus::from_raw(0));
    let output = child.output.text();
    let why = if output.trim().is_empty() {
        "it printed nothing".to_string()
    } else {
        output
    };
    Error::VmmExited(VmExit {
        reason: ExitReason::Crashed(format!("QEMU exited during start-up: {why}")),
        code: status.code(),
        signal: status.signal(),
    })
}

async fn wait_exited(
    exited: &mut tokio::sync::watch::Receiver<Option<ExitStatus>>,
    limit: Duration,
) -> bool {
    tokio::time::timeout(limit, exited.wait_for(Option::is_some))
        .await
        .is_ok()
}

async fn kill_and_reap(child: &QemuProcess) {
    if child.exited.borrow().is_none() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let mut exited = child.exited.clone();
    let _ = exited.wait_for(Option::is_some).await;
}

async fn vcpu_threads(qmp: &QmpClient, timeout: Duration) -> Vec<u32> {
    match qmp.execute("query-cpus-fast", None, timeout).await {
        Ok(v) => v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["thread-id"].as_u64())
            .map(|t| t as u32)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Kills QEMU if `start` is dropped after spawning it and before it returned (the caller
/// cancelled boot): the child's reaper task collects it, and the VM ends `Stopped`.
struct StartGuard<'a> {
    shared: &'a Shared,
    /// QEMU's pid and exit, once spawned (a child dropped inside `spawn` is killed there).
    child: Option<(u32, tokio::sync::watch::Receiver<Option<ExitStatus>>)>,
    log: &'a slog::Logger,
    /// Cleared once start succeeded.
    armed: bool,
    /// What `wait_exit` reports for a start that did not succeed: `Stopped` when it was
    /// cancelled (dropped, or ended by a stop), else why it failed.
    exit: VmExit,
}

/// The exit of a start that failed with `e` before QEMU ran.
fn crashed(e: &Error) -> VmExit {
    VmExit {
        reason: ExitReason::Crashed(format!("QEMU did not start: {}", crate::error_chain(e))),
        code: None,
        signal: None,
    }
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some((pid, exited)) = &self.child {
            if exited.borrow().is_none() {
                warn!(self.log, "start cancelled; killing QEMU"; "pid" => pid);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        self.shared.set_state(VmState::Stopped);
        // No exit watcher runs for this QEMU: record the end here, so that `wait_exit`
        // returns rather than waiting forever.
        let exit = self.exit.clone();
        self.shared.exit.send_if_modified(|current| {
            let unset = current.is_none();
            if unset {
                *current = Some(exit);
            }
            unset
        });
    }
}

/// Watches QEMU until it exits, then records why. It reads QEMU's events meanwhile (so its
/// queue never grows) and keeps the reason of the last `SHUTDOWN`: QEMU exits 0 on a guest
/// power-off, on a `quit` and on SIGTERM alike, and only that event tells them apart.
fn spawn_exit_watch(
    shared: Arc<Shared>,
    child: &QemuProcess,
    events: QmpEvents,
    log: slog::Logger,
) {
    let mut exited = child.exited.clone();
    let output = child.output.clone();
    let status_known = child.status_known;
    tokio::spawn(async move {
        let mut events = Some(events);
        let mut shutdown = None;
        let status = loop {
            tokio::select! {
                s = exited.wait_for(Option::is_some) => match s {
                    Ok(s) => break (*s).expect("Some"),
                    Err(_) => return,
                },
                ev = next_event(&mut events) => match ev {
                    Some(ev) => note_shutdown(&mut shutdown, &ev),
                    None => events = None,
                },
            }
        };
        let stopping = shared.stopping.load(Ordering::SeqCst);
        if let (false, Some(mut rest)) = (stopping, events) {
            // QEMU wrote its last events before it exited: they are read once its socket's
            // end is (the connection closes right after).
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(ev) = rest.next().await {
                    note_shutdown(&mut shutdown, &ev);
                }
            })
            .await;
        }
        let reason = exit_reason(
            stopping,
            status,
            status_known,
            shutdown.as_deref(),
            &output.text(),
        );
        let exit = VmExit {
            reason,
            code: status.code().filter(|_| status_known),
            signal: status.signal().filter(|_| status_known),
        };
        info!(log, "QEMU exited"; "how" => exit.to_string(), "shutdown" => shutdown);
        shared.set_state(VmState::Stopped);
        shared.exit.send_replace(Some(exit));
    });
}

/// The next event of `events`; never, once they ended.
async fn next_event(events: &mut Option<QmpEvents>) -> Option<QmpEvent> {
    match events {
        Some(e) => e.next().await,
        None => std::future::pending().await,
    }
}

fn note_shutdown(shutdown: &mut Option<String>, ev: &QmpEvent) {
    if ev.name == "SHUTDOWN" {
        *shutdown = Some(ev.data["reason"].as_str().unwrap_or("none").to_string());
    }
}

/// Why QEMU exited with `status`, given whether the runtime was `stopping` it and the reason
/// of its last `SHUTDOWN` event (QEMU 7.2: `guest-shutdown`, `guest-reset`, `guest-panic`;
/// `host-qmp-quit`, `host-signal`, `host-ui`, ...). A QEMU that failed after its SHUTDOWN
/// still reports the failure.
fn exit_reason(
    stopping: bool,
    status: ExitStatus,
    status_known: bool,
    shutdown: Option<&str>,
    output: &str,
) -> ExitReason {
    if stopping {
        return ExitReason::Stopped;
    }
    let clean = !status_known || status.code() == Some(0);
    match shutdown {
        Some("guest-shutdown" | "guest-reset" | "guest-panic") if clean => {
            return ExitReason::GuestShutdown
        }
        Some(host) if clean => {
            let why = match host {
                "host-qmp-quit" => "QEMU got a QMP quit that was not the runtime's stop".into(),
                "host-signal" => output
                    .lines()
                    .rev()
                    .find(|l| l.contains("terminating on signal"))
                    .map(|l| format!("QEMU got a termination signal ({})", l.trim()))
                    .unwrap_or_else(|| "QEMU got a termination signal".into()),
                other => format!("QEMU shut down, reason {other}"),
            };
            return ExitReason::HostRequest(why);
        }
        _ => {}
    }
    if !status_known {
        ExitReason::Crashed(
            "QEMU exited while re-attached; only its original parent can read its status".into(),
        )
    } else if status.signal().is_some() {
        ExitReason::Killed
    } else if status.code() == Some(0) {
        // No SHUTDOWN was seen (the monitor closed earlier): QEMU exits 0 only by shutting
        // down, most often for the guest.
        ExitReason::GuestShutdown
    } else {
        ExitReason::Crashed(output.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_cids_are_unreserved_and_stable() {
        let a = guest_cid("sandbox-1");
        assert!(a >= 3);
        assert_eq!(a, guest_cid("sandbox-1"));
        assert_ne!(a, guest_cid("sandbox-2"));
    }

    #[test]
    fn the_shutdown_event_tells_a_host_quit_and_a_signal_from_a_guest_power_off() {
        let ok = ExitStatus::from_raw(0);
        let reason = |shutdown, known| exit_reason(false, ok, known, shutdown, "");
        assert_eq!(
            reason(Some("guest-shutdown"), true),
            ExitReason::GuestShutdown
        );
        assert_eq!(reason(Some("guest-reset"), true), ExitReason::GuestShutdown);
        let ExitReason::HostRequest(why) = reason(Some("host-qmp-quit"), true) else {
            panic!("a quit behind the runtime's back is a host request");
        };
        assert!(why.contains("QMP quit"), "{why}");
        let signal = exit_reason(
            false,
            ok,
            true,
            Some("host-signal"),
            "qemu-system-x86_64: terminating on signal 15 from pid 42 (kill)",
        );
        let ExitReason::HostRequest(why) = signal else {
            panic!("SIGTERM to QEMU is a host request: {signal:?}");
        };
        assert!(why.contains("signal 15 from pid 42"), "{why}");
        // Re-attached: the event decides although the status is unknown.
        assert_eq!(
            reason(Some("guest-shutdown"), false),
            ExitReason::GuestShutdown
        );
        // The runtime's own stop, and a failure after the event, are not host requests.
        assert_eq!(
            exit_reason(true, ok, true, Some("host-qmp-quit"), ""),
            ExitReason::Stopped
        );
        let failed = ExitStatus::from_raw(1 << 8);
        assert!(matches!(
            exit_reason(false, failed, true, Some("host-qmp-quit"), "boom"),
            ExitReason::Crashed(t) if t == "boom"
        ));
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(
            exit_reason(false, killed, true, Some("guest-shutdown"), ""),
            ExitReason::Killed
        );
        // Without the event, as before.
        assert_eq!(reason(None, true), ExitReason::GuestShutdown);
    }

    #[tokio::test]
    async fn a_start_that_did_not_succeed_still_ends_wait_exit() {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let hv = QemuHypervisor::new(log.clone(), crate::QemuOptions::default());
        hv.shared.set_state(VmState::Prepared);
        drop(StartGuard {
            shared: &hv.shared,
            child: None,
            log: &log,
            armed: true,
            exit: VmExit {
                reason: ExitReason::Stopped,
                code: None,
                signal: None,
            },
        });
        assert_eq!(hv.shared.state(), VmState::Stopped);
        let exit = tokio::time::timeout(
            Duration::from_secs(5),
            hypervisor::Hypervisor::wait_exit(&hv),
        )
        .await
        .expect("wait_exit returns after a cancelled start")
        .unwrap();
        assert_eq!(exit.reason, ExitReason::Stopped);
    }

    #[tokio::test]
    async fn a_start_refused_for_want_of_slots_keeps_the_cold_devices() {
        use hypervisor::device::{BlockConfig, BlockDriver};
        use hypervisor::{Device, DeviceConfig, DeviceId, Hypervisor};
        let run_root = tempfile::tempdir().unwrap();
        let disk = tempfile::NamedTempFile::new().unwrap();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let hv = QemuHypervisor::new(
            log,
            crate::QemuOptions {
                run_root: run_root.path().to_path_buf(),
                // More ports than pcie.0 has slots: start is refused before QEMU runs.
                hotplug_ports: 40,
                ..crate::QemuOptions::default()
            },
        );
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
        let disk = BlockConfig {
            path: disk.path().to_path_buf(),
            read_only: true,
            driver: BlockDriver::VirtioBlkPci,
        };
        hv.add_device(Device {
            id: DeviceId::new("disk0").unwrap(),
            config: DeviceConfig::Block(disk),
        })
        .await
        .unwrap();
        let err = hv.start(Duration::from_secs(5)).await.unwrap_err();
        assert!(err.is_unsupported(), "{err}");
        assert_eq!(hv.state().await, VmState::Prepared);
        assert_eq!(hv.inner.lock().await.cold.len(), 1, "the cold disk is kept");
        hv.cleanup().await.unwrap();
    }

    #[tokio::test]
    async fn a_hotplug_of_unknown_outcome_survives_save_and_restore_with_its_port() {
        use hypervisor::device::GuestLocation;
        use hypervisor::{DeviceId, DeviceInfo, DeviceKind};
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let hv = QemuHypervisor::new(log, crate::QemuOptions::default());
        let id = DeviceId::new("net1").unwrap();
        {
            let mut inner = hv.inner.lock().await;
            inner.spec = Some(SandboxSpec {
                id: "sb".into(),
                netns: None,
                config: HypervisorConfig::default(),
            });
            inner.run = Some(RunDir {
                dir: "/run/x/sb".into(),
                console_log: None,
            });
            inner.ports = vec![RootPort {
                id: "rp0".into(),
                slot: 2,
                used_by: Some(id.clone()),
            }];
            let info = DeviceInfo {
                id: id.clone(),
                kind: DeviceKind::Network,
                location: GuestLocation::Pci {
                    path: "02/00".into(),
                },
                hotplugged: true,
                mac: None,
                queue_pairs: Some(1),
                host: Some("tap1".into()),
            };
            inner.unsettled.insert(
                id.clone(),
                crate::reconcile::Unsettled {
                    info,
                    port: 0,
                    fd_names: vec!["fd-net1-0".into()],
                    backend_maybe_added: true,
                },
            );
        }
        let saved = hv.do_save_state().await.unwrap();
        let restored = unsettled_from(&saved.backend_data, 1);
        let u = restored
            .get(&id)
            .expect("the unsettled hotplug is restored");
        assert_eq!((u.port, u.backend_maybe_added), (0, true));
        assert_eq!(u.fd_names, ["fd-net1-0"]);
        assert!(
            unsettled_from(&saved.backend_data, 0).is_empty(),
            "a port out of range is not trusted"
        );
    }

    #[test]
    fn unsupported_errors_name_the_backend() {
        let e = QemuHypervisor::unsupported("x", "y");
        assert!(e.to_string().contains(BACKEND));
    }
}
