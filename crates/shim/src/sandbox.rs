//! `sandbox run` and `sandbox hotplug-nic`: one sandbox VM driven from the command line.
//!
//! `run` creates the network namespace (unless given one), a TAP per NIC, boots the VM with
//! the configured backend, waits for the guest agent, gives the guest its addresses through
//! the agent, prints the facts, then serves a control socket until SIGINT or SIGTERM. At the
//! end, and on every failure path after the first thing it created, it stops the VM and
//! removes what it created: the VMM process, the TAPs (they go with the VMM's fds, or are
//! deleted when the backend opened them by name), the run directories, the namespace it
//! created and the ready file.
//!
//! A given namespace that holds interfaces (a pod network CNI prepared) is used through the
//! `endpoint` crate ([`crate::pod`]): each interface is connected to a TAP by tc redirection,
//! the guest NIC gets the interface's MAC, addresses and routes, and at the end exactly the
//! TAPs, qdiscs and filters that were added are removed. A namespace with no interface but
//! `lo` gets the shim's own TAP and /24, as an owned one does.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use guest_agent::client::AgentClient;
use guest_agent::protocol::InterfaceConfig;
use hypervisor::device::VsockConfig;
use hypervisor::{AgentAddress, DeviceConfig, DeviceManager, Hypervisor, MacAddress, SandboxSpec};
use slog::{error, info, warn};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};

use crate::backend::{self, BackendKind, BackendOptions};
use crate::config;
use crate::facts::{ControlRequest, ControlResponse, NicFacts, SandboxFacts};
use crate::net::{self, NicPlan, Subnet24, TapHandoff};
use crate::pod::{self, PodNetwork};

/// How long the guest may take to show a NIC after it was plugged.
const GUEST_NIC_TIMEOUT: Duration = Duration::from_secs(30);
/// Guest context id of the vsock device added for backends whose agent channel is one.
const GUEST_CID: u32 = 3;

/// Options of `sandbox run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Configuration file.
    pub config: PathBuf,
    /// Existing namespace to use; `None` creates one.
    pub netns: Option<PathBuf>,
    /// Sandbox id; `None` generates one.
    pub id: Option<String>,
    /// First /24 to try for NICs.
    pub subnet: Subnet24,
    /// Print facts as JSON.
    pub json: bool,
    /// Write the facts (JSON) here once the sandbox is up.
    pub ready_file: Option<PathBuf>,
    /// Parent of the shim's and the backend's run directories.
    pub run_root: PathBuf,
    /// Limit for the VMM to come up.
    pub boot_timeout: Duration,
    /// Limit for the guest agent to answer.
    pub agent_timeout: Duration,
}

/// The shim's own run directory of sandbox `id`.
pub fn state_dir(run_root: &Path, id: &str) -> PathBuf {
    run_root.join("sandboxes").join(id)
}

/// Parent of the backend's run directories.
pub fn vm_root(run_root: &Path) -> PathBuf {
    run_root.join("vm")
}

/// Runs a sandbox until SIGINT or SIGTERM. See the module docs.
pub async fn run(log: &slog::Logger, opts: RunOptions) -> Result<()> {
    let began = Instant::now();
    let cfg = config::load(&opts.config)?;
    for w in &cfg.warnings {
        warn!(log, "configuration key ignored";
            "file" => w.file.display().to_string(), "line" => w.line, "key" => &w.key,
            "reason" => &w.reason);
    }
    let id = opts
        .id
        .clone()
        .unwrap_or_else(|| format!("sandbox-{}", std::process::id()));
    let base_log = log;
    let log = log.new(slog::o!("sandbox" => id.clone()));
    info!(log, "configuration loaded"; "file" => cfg.file.display().to_string(),
        "backend" => cfg.backend.name());
    // Ask for the backend before creating anything: a backend this build lacks is an error
    // that leaves nothing behind.
    let hv = backend::create(
        cfg.backend,
        base_log,
        &BackendOptions {
            run_root: vm_root(&opts.run_root),
        },
    )?;
    let spec = SandboxSpec {
        id: id.clone(),
        netns: None,
        config: cfg.hypervisor.clone(),
    };
    spec.validate()
        .with_context(|| format!("Checking sandbox id {id:?}"))?;

    let signals = StopSignals::new()?;
    let mut sb = Sandbox::new(log.clone(), id, cfg.backend, hv, &opts, signals);
    let outcome = sb.run(opts, spec, began).await;
    if let Err(e) = &outcome {
        error!(log, "sandbox failed, tearing down"; "error" => format!("{e:#}"));
    }
    let teardown = sb.teardown().await;
    outcome.and(teardown)
}

/// SIGTERM and SIGINT, caught from the start so that a signal during start-up still ends in
/// a teardown.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("Handling SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("Handling SIGINT")?,
        })
    }

    /// Waits for either signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The namespace the sandbox's NICs live in.
#[derive(Debug)]
enum Netns {
    Owned(netdev::NetNs),
    Given(PathBuf),
}

impl Netns {
    fn path(&self) -> &Path {
        match self {
            Netns::Owned(ns) => ns.path(),
            Netns::Given(p) => p,
        }
    }

    fn name(&self) -> Option<String> {
        let p = self.path();
        (p.parent() == Some(Path::new(netdev::NETNS_RUN_DIR)))
            .then(|| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .flatten()
    }
}

struct Sandbox {
    log: slog::Logger,
    id: String,
    backend: BackendKind,
    hv: Arc<dyn Hypervisor>,
    devices: DeviceManager,
    netns: Option<Netns>,
    state_dir: PathBuf,
    state_dir_created: bool,
    ready_file: Option<PathBuf>,
    agent: Option<AgentClient>,
    nics: Vec<NicFacts>,
    taps: Vec<String>,
    /// How the backend takes TAPs, known once it is prepared.
    handoff: TapHandoff,
    /// Persistent TAPs (handed over by name): deleted by the teardown.
    persistent_taps: Vec<String>,
    /// The pod network's endpoints, when the given namespace held interfaces.
    pod: Option<PodNetwork>,
    subnet_base: Subnet24,
    queues: u16,
    vmm_pid: Option<u32>,
    facts: Option<SandboxFacts>,
    signals: StopSignals,
}

impl Sandbox {
    fn new(
        log: slog::Logger,
        id: String,
        backend: BackendKind,
        hv: Arc<dyn Hypervisor>,
        opts: &RunOptions,
        signals: StopSignals,
    ) -> Sandbox {
        Sandbox {
            backend,
            devices: DeviceManager::new(hv.clone()),
            state_dir: state_dir(&opts.run_root, &id),
            log,
            id,
            hv,
            netns: None,
            state_dir_created: false,
            ready_file: opts.ready_file.clone(),
            agent: None,
            nics: Vec::new(),
            taps: Vec::new(),
            handoff: TapHandoff::Fds,
            persistent_taps: Vec::new(),
            pod: None,
            subnet_base: opts.subnet,
            queues: 1,
            vmm_pid: None,
            facts: None,
            signals,
        }
    }

    fn netns_path(&self) -> &Path {
        self.netns.as_ref().expect("set before use").path()
    }

    async fn run(&mut self, opts: RunOptions, mut spec: SandboxSpec, began: Instant) -> Result<()> {
        let mut timings = BTreeMap::new();
        self.queues = spec.config.network_queues;

        // Run directory first: it also tells that the id is free.
        std::fs::create_dir_all(self.state_dir.parent().expect("has a parent"))
            .with_context(|| format!("Creating {}", opts.run_root.display()))?;
        std::fs::create_dir(&self.state_dir).with_context(|| {
            format!(
                "Creating run directory {} (is a sandbox with id {:?} running?)",
                self.state_dir.display(),
                self.id
            )
        })?;
        self.state_dir_created = true;

        let t = Instant::now();
        self.netns = Some(match &opts.netns {
            Some(p) => {
                let p = netdev_resolve(p);
                if !p.exists() {
                    bail!(
                        "network namespace {} does not exist: create it (ip netns add) or leave out --netns",
                        p.display()
                    );
                }
                Netns::Given(p)
            }
            None => {
                let name = format!("kata-{}", self.id);
                Netns::Owned(
                    netdev::NetNs::create(&name)
                        .with_context(|| format!("Creating network namespace {name}"))?,
                )
            }
        });
        spec.netns = Some(self.netns_path().to_path_buf());
        info!(self.log, "network namespace ready"; "netns" => self.netns_path().display().to_string(),
            "owned" => matches!(self.netns, Some(Netns::Owned(_))));

        self.hv
            .prepare(&spec)
            .await
            .with_context(|| format!("Preparing the {} VM", self.hv.name()))?;
        let caps = self.hv.capabilities().await;
        // Backends that cannot take open fds (Dragonball) open a persistent TAP by name.
        self.handoff = if caps.tap_fds {
            TapHandoff::Fds
        } else {
            TapHandoff::Name
        };
        if self.backend.agent_needs_vsock_device() {
            self.devices
                .add(DeviceConfig::Vsock(VsockConfig {
                    guest_cid: GUEST_CID,
                }))
                .await
                .context("Adding the vsock device of the agent channel")?;
        }
        let mut plugged = Vec::new();
        if let Some(Netns::Given(path)) = &self.netns {
            let opts = endpoint::AttachOptions {
                queues: self.queues,
                handoff: self.handoff,
            };
            self.pod = pod::attach(&self.log, path, &opts).await?;
        }
        if let Some(pod) = &self.pod {
            let nics: Vec<_> = pod
                .endpoints
                .iter()
                .map(|ep| (pod::plan(ep), ep.network.clone()))
                .collect();
            self.taps
                .extend(nics.iter().map(|(plan, _)| plan.tap.clone()));
            for (plan, config) in nics {
                let info = self
                    .devices
                    .add(DeviceConfig::Network(config))
                    .await
                    .with_context(|| {
                        format!(
                            "Adding the NIC on TAP {} (pod interface {})",
                            plan.tap,
                            plan.pod_interface.as_deref().unwrap_or_default()
                        )
                    })?;
                plugged.push((info, plan));
            }
        } else {
            let nic = self.new_host_nic()?;
            let plan = nic.plan();
            let info = self
                .devices
                .add(DeviceConfig::Network(nic.config))
                .await
                .with_context(|| format!("Adding the NIC on TAP {}", plan.tap))?;
            plugged.push((info, plan));
        }
        timings.insert("prepare".to_string(), ms(t.elapsed()));

        let t = Instant::now();
        info!(self.log, "booting"; "timeout_s" => opts.boot_timeout.as_secs());
        self.hv
            .start(opts.boot_timeout)
            .await
            .with_context(|| format!("Starting the {} VM", self.hv.name()))?;
        let pids = self.hv.pids().await?;
        self.vmm_pid = Some(pids.vmm);
        timings.insert("vmm_start".to_string(), ms(t.elapsed()));
        info!(self.log, "VMM running"; "pid" => pids.vmm, "ms" => ms(t.elapsed()));

        let t = Instant::now();
        let address = self.hv.agent_address().await?;
        let waiting = progress(&self.log, "waiting for the guest agent", async {
            let mut agent = connect_agent(&address).await?;
            let health = agent
                .wait_ready(opts.agent_timeout)
                .await
                .context("Waiting for the guest agent")?;
            anyhow::Ok((agent, health))
        });
        let (agent, health) = tokio::select! {
            ready = waiting => ready?,
            sig = self.signals.recv() => bail!("{sig} received while waiting for the guest agent"),
        };
        self.agent = Some(agent);
        timings.insert("agent_ready".to_string(), ms(t.elapsed()));
        info!(self.log, "guest agent ready"; "agent" => address.to_string(),
            "guest_uptime_ms" => health.uptime_ms, "ms" => ms(t.elapsed()));

        let t = Instant::now();
        for (info, plan) in &plugged {
            let nic = self.configure_guest(info, plan, Instant::now()).await?;
            self.nics.push(nic);
        }
        timings.insert("guest_network".to_string(), ms(t.elapsed()));
        timings.insert("total".to_string(), ms(began.elapsed()));

        let config = self.hv.config().await.ok();
        let accelerator = backend::probe_host(
            self.backend,
            spec.config.accelerator,
            config.as_ref().and_then(|c| c.path.as_deref()),
        )
        .ok()
        .and_then(|p| p.accelerator.ok())
        .map(|(a, _)| a);
        let control = self.state_dir.join("control.sock");
        let facts = SandboxFacts {
            id: self.id.clone(),
            backend: self.hv.name().to_string(),
            machine_type: config.and_then(|c| c.machine_type),
            accelerator,
            shim_pid: std::process::id(),
            vmm_pid: pids.vmm,
            vcpu_threads: pids.vcpus.clone(),
            netns: self.netns_path().to_path_buf(),
            netns_name: self.netns.as_ref().and_then(Netns::name),
            netns_owned: matches!(self.netns, Some(Netns::Owned(_))),
            nics: self.nics.clone(),
            agent: address.to_string(),
            console_log: self.hv.console_log().await,
            control_socket: control.clone(),
            timings_ms: timings,
        };
        let listener = UnixListener::bind(&control)
            .with_context(|| format!("Binding control socket {}", control.display()))?;
        self.facts = Some(facts.clone());
        self.publish(&facts, opts.json)?;
        info!(self.log, "sandbox ready"; "ms" => ms(began.elapsed()));
        self.serve(listener).await
    }

    /// Writes `facts.json` and the ready file, then prints the facts: whoever waits on any
    /// of the three finds the other two in place.
    fn publish(&self, facts: &SandboxFacts, json: bool) -> Result<()> {
        let line = serde_json::to_string(facts)?;
        write_atomic(&self.state_dir.join("facts.json"), &line)?;
        if let Some(ready) = &self.ready_file {
            write_atomic(ready, &line)
                .with_context(|| format!("Writing the ready file {}", ready.display()))?;
        }
        if json {
            println!("{line}");
        } else {
            println!("{}", facts.human());
        }
        Ok(())
    }

    /// Serves the control socket until a signal or the VM's exit.
    async fn serve(&mut self, listener: UnixListener) -> Result<()> {
        let hv = self.hv.clone();
        let mut exited = tokio::spawn(async move { hv.wait_exit().await });
        loop {
            tokio::select! {
                sig = self.signals.recv() => {
                    info!(self.log, "signal received, stopping"; "signal" => sig);
                    break;
                }
                exit = &mut exited => {
                    let why = match exit {
                        Ok(Ok(e)) => e.to_string(),
                        Ok(Err(e)) => format!("{e}"),
                        Err(e) => format!("{e}"),
                    };
                    bail!("the VM exited on its own: {why}");
                }
                conn = listener.accept() => match conn {
                    Ok((stream, _)) => {
                        if let Err(e) = self.control(stream).await {
                            warn!(self.log, "control request failed"; "error" => format!("{e:#}"));
                        }
                    }
                    Err(e) => warn!(self.log, "accepting on the control socket"; "error" => e.to_string()),
                },
            }
        }
        exited.abort();
        Ok(())
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
            Ok(ControlRequest::HotplugNic) => match self.hotplug_nic().await {
                Ok(nic) => ControlResponse::Nic(Box::new(nic)),
                Err(e) => ControlResponse::Error(format!("{e:#}")),
            },
        };
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        w.write_all(out.as_bytes()).await?;
        Ok(())
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
        let facts = self.configure_guest(&info, &plan, t).await?;
        info!(self.log, "NIC hot-plugged"; "nic" => facts.human());
        self.nics.push(facts.clone());
        Ok(facts)
    }

    /// A TAP in a free /24 with a MAC derived from the sandbox id and NIC number.
    fn new_host_nic(&mut self) -> Result<net::HostNic> {
        let ns = self.netns_path().to_path_buf();
        let used = net::used_networks(&ns)?;
        let taken: Vec<Subnet24> = self
            .nics
            .iter()
            .filter_map(|n| n.host_address.as_deref())
            .filter_map(|a| Subnet24::parse(a).ok())
            .collect();
        let subnet = net::free_subnet(self.subnet_base, &used, &taken)?;
        let n = self.taps.len();
        let mac = MacAddress::local_from_seed(format!("{}/nic{n}", self.id).as_bytes());
        let nic = net::create_tap(&ns, subnet, self.queues, mac, self.handoff)?;
        self.taps.push(nic.tap.clone());
        if self.handoff == TapHandoff::Name {
            self.persistent_taps.push(nic.tap.clone());
        }
        info!(self.log, "TAP created"; "tap" => &nic.tap, "host" => format!("{}/24", subnet.host(1)),
            "queues" => self.queues);
        Ok(nic)
    }

    /// Removes a TAP of ours that no device uses (a failed hotplug).
    fn forget_tap(&mut self, tap: &str) {
        self.taps.retain(|t| t != tap);
        if let Some(i) = self.persistent_taps.iter().position(|t| t == tap) {
            self.persistent_taps.remove(i);
            if let Err(e) = netdev::delete_tap(tap, Some(self.netns_path())) {
                warn!(self.log, "deleting an unused TAP"; "tap" => tap, "error" => e.to_string());
            }
        }
    }

    /// Waits for the guest to show the NIC of `plan` and gives it its addresses, MTU and
    /// routes through the agent.
    async fn configure_guest(
        &mut self,
        info: &hypervisor::DeviceInfo,
        plan: &NicPlan,
        began: Instant,
    ) -> Result<NicFacts> {
        let mac = plan.mac;
        let agent = self.agent.as_mut().ok_or_else(|| anyhow!("no agent"))?;
        // A hot-plugged NIC shows up once the guest has probed the PCI device: wait for the
        // agent to list its MAC before configuring it.
        let wanted = mac.to_string();
        let deadline = Instant::now() + GUEST_NIC_TIMEOUT;
        loop {
            let ifaces = agent
                .list_interfaces(Duration::from_secs(10))
                .await
                .context("Listing the guest's interfaces")?;
            if ifaces
                .iter()
                .any(|i| i.mac.as_deref() == Some(wanted.as_str()))
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the guest did not show a NIC with MAC {mac} within {GUEST_NIC_TIMEOUT:?} (see the console log)"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let done = agent
            .configure_interface(
                InterfaceConfig {
                    mac: wanted,
                    addresses: plan.addresses.clone(),
                    mtu: plan.mtu,
                    routes: plan.routes.clone(),
                },
                Duration::from_secs(30),
            )
            .await
            .with_context(|| {
                format!(
                    "Configuring the guest NIC {mac} with {} (routes: {})",
                    plan.addresses.join(" "),
                    plan.routes_human().join("; ")
                )
            })?;
        Ok(NicFacts {
            id: info.id.to_string(),
            tap: plan.tap.clone(),
            pod_interface: plan.pod_interface.clone(),
            host_address: plan.host_address.clone(),
            guest_address: plan.addresses.first().cloned().unwrap_or_default(),
            guest_addresses: plan.addresses.clone(),
            routes: plan.routes_human(),
            guest_ip: plan.guest_ip(),
            mac: mac.to_string(),
            guest_interface: done.name,
            location: info.location.to_string(),
            hotplugged: info.hotplugged,
            setup_ms: ms(began.elapsed()),
        })
    }

    /// Stops the VM and removes everything this run created; reports what could not be.
    async fn teardown(&mut self) -> Result<()> {
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
        // waits for an RCU grace period, so give it a moment.
        if let Some(ns) = &self.netns {
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
        match self.netns.take() {
            Some(Netns::Owned(ns)) => {
                let path = ns.path().display().to_string();
                if let Err(e) = ns.delete() {
                    problems.push(format!("deleting network namespace {path}: {e}"));
                }
            }
            Some(Netns::Given(_)) | None => {}
        }
        if let Some(ready) = &self.ready_file {
            let _ = std::fs::remove_file(ready);
        }
        if self.state_dir_created {
            if let Err(e) = std::fs::remove_dir_all(&self.state_dir) {
                problems.push(format!("removing {}: {e}", self.state_dir.display()));
            }
        }
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
    match serde_json::from_str(&answer).context("Reading the sandbox's answer")? {
        ControlResponse::Error(e) => bail!("the sandbox refused: {e}"),
        ok => Ok(ok),
    }
}

async fn connect_agent(address: &AgentAddress) -> Result<AgentClient> {
    Ok(match address {
        AgentAddress::VirtioSerial { path } => AgentClient::connect_serial(path).await?,
        AgentAddress::Vsock { cid, port } => AgentClient::connect_vsock(*cid, *port).await?,
        AgentAddress::HybridVsock { path, port } => {
            AgentClient::connect_hybrid_vsock(path, *port).await?
        }
    })
}

/// Awaits `fut`, logging every 10 s that it is still going.
async fn progress<T>(log: &slog::Logger, what: &str, fut: impl Future<Output = T>) -> T {
    let began = Instant::now();
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tick.tick() => info!(log, "still {}", what; "elapsed_s" => began.elapsed().as_secs()),
        }
    }
}

fn netdev_resolve(p: &Path) -> PathBuf {
    if p.components().count() == 1 && !p.has_root() {
        Path::new(netdev::NETNS_RUN_DIR).join(p)
    } else {
        p.to_path_buf()
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

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{text}\n"))
        .with_context(|| format!("Writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("Renaming to {}", path.display()))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
