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
//!
//! # Crash safety
//!
//! Everything the run creates is recorded in its run directory as it is created
//! ([`crate::records`]), so that `sandbox cleanup --id ID` ([`crate::cleanup`]) removes a
//! sandbox whose shim died. `run` with the id of such a sandbox refuses at once and names
//! the cleanup command; with the id of a running one it names the owner's pid. Nothing is
//! recorded as the sandbox's that someone else made: an existing `kata-ID` namespace, a
//! taken TAP name or a busy ingress of a pod interface fail the run before the record
//! names them. The run directory is 0700, its files and the control socket 0600.
//!
//! # Signals and exit status
//!
//! The whole run (boot, agent wait, guest NIC configuration, a hotplug being served) is
//! raced against SIGTERM/SIGINT: the first one cancels whatever is in progress and tears
//! down; its log line (`signal received, stopping`) says what was in progress in its
//! `during` field. A second one during the teardown forces it: the VMM is killed (SIGKILL)
//! and what the record lists is removed. While the guest agent is awaited, the VM's exit is watched
//! too: a VM that exits fails the run at once, naming the exit and the guest init's error
//! line (`guest-init: error: ...`) when its console has one.
//!
//! Exit status of `sandbox run`:
//! - 0: stopped by SIGTERM/SIGINT and everything removed;
//! - 1: failed (the error says why; what was created is removed);
//! - [`EXIT_FORCED`] (3): the teardown was forced by a second signal. Not 128+N: shells and
//!   supervisors read that as "killed by signal N", while here the shim exits by itself
//!   after removing what its record lists.

mod control;
mod guest;
mod teardown;
mod vmm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_agent::client::AgentClient;
use hypervisor::device::VsockConfig;
use hypervisor::{
    AgentChannelSource, DeviceConfig, DeviceManager, Hypervisor, MacAddress, SandboxSpec,
};
use slog::{error, info, warn};
use tokio::signal::unix::{signal, SignalKind};

use crate::backend::{self, BackendKind, BackendOptions};
use crate::config;
use crate::facts::{NicFacts, SandboxFacts};
use crate::net::{self, NicPlan, Subnet24, TapHandoff};
use crate::pod::{self, PodNetwork};
use crate::records::{self, ClaimError, Existing, NetnsRecord, Record, Records, TapRecord};

pub use control::request;

/// Exit status of `sandbox run` when a second signal forced the teardown.
pub const EXIT_FORCED: u8 = 3;

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

/// The teardown was forced by a second signal: the VMM was killed and what the record
/// lists removed. `sandbox run` exits with [`EXIT_FORCED`].
#[derive(Debug, thiserror::Error)]
#[error("teardown forced by a second {signal}: the VMM was killed and what the record lists was removed{}",
    if problems.is_empty() { String::new() } else { format!("; left: {}", problems.join("; ")) })]
pub struct Forced {
    /// The second signal.
    pub signal: &'static str,
    /// What could not be removed.
    pub problems: Vec<String>,
}

/// Runs a sandbox until SIGINT or SIGTERM. See the module docs.
pub async fn run(log: &slog::Logger, opts: RunOptions) -> Result<()> {
    let began = Instant::now();
    let id = opts
        .id
        .clone()
        .unwrap_or_else(|| format!("sandbox-{}", std::process::id()));
    refuse_existing(&opts.run_root, &id)?;
    let cfg = config::load(&opts.config)?;
    for w in &cfg.warnings {
        warn!(log, "configuration key ignored";
            "file" => w.file.display().to_string(), "line" => w.line, "key" => &w.key,
            "reason" => &w.reason);
    }
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

    let mut signals = StopSignals::new()?;
    let mut sb = Sandbox::new(log.clone(), id, cfg.backend, hv, &opts);
    let outcome = tokio::select! {
        done = sb.run(opts, spec, began) => done,
        sig = signals.recv() => {
            info!(log, "signal received, stopping"; "signal" => sig, "during" => sb.phase.doing());
            Ok(())
        }
    };
    if let Err(e) = &outcome {
        error!(log, "sandbox failed, tearing down"; "error" => format!("{e:#}"));
    }
    info!(log, "tearing down");
    let teardown = tokio::select! {
        done = sb.teardown() => done,
        sig = signals.recv() => {
            warn!(log, "second signal: forcing the teardown"; "signal" => sig,
                "during" => "tearing down");
            let problems = sb.force().await;
            if let Err(e) = outcome {
                error!(log, "the sandbox had failed before"; "error" => format!("{e:#}"));
            }
            return Err(Forced { signal: sig, problems }.into());
        }
    };
    outcome.and(teardown)
}

/// Fails when the run directory of `id` exists, saying whose it is and what to do.
fn refuse_existing(run_root: &Path, id: &str) -> Result<()> {
    let dir = state_dir(run_root, id);
    let cleanup = format!(
        "containerd-shim-kata-v2 sandbox cleanup --id {id} --run-root {}",
        run_root.display()
    );
    match records::existing(&dir) {
        Existing::None => Ok(()),
        Existing::Alive(r) => bail!(
            "a sandbox with id {id} is running (pid {}); stop it with SIGTERM or pick another id",
            r.owner.pid
        ),
        Existing::Dead(r) => bail!(
            "sandbox {id} was left by a shim that died (pid {}); remove what it left with `{cleanup}`",
            r.owner.pid
        ),
        Existing::Unrecorded(why) => bail!(
            "run directory {} exists without a record ({why}); remove it with `{cleanup}`",
            dir.display()
        ),
    }
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

/// What the run is doing: for the message when the VM exits under it, and for the log
/// line of a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Preparing,
    Booting,
    Agent,
    GuestNetwork,
    Serving,
    Hotplug,
}

impl Phase {
    /// As the `during` field of the signal's log line says it.
    fn doing(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing the namespace, TAPs and devices",
            Phase::Booting => "booting",
            Phase::Agent => "waiting for the guest agent",
            Phase::GuestNetwork => "configuring the guest network",
            Phase::Serving => "serving",
            Phase::Hotplug => "hot-plugging a NIC",
        }
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
    backend_dir: PathBuf,
    /// The record of what was created; `None` until the run directory is claimed.
    records: Option<Records>,
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
    phase: Phase,
}

impl Sandbox {
    fn new(
        log: slog::Logger,
        id: String,
        backend: BackendKind,
        hv: Arc<dyn Hypervisor>,
        opts: &RunOptions,
    ) -> Sandbox {
        Sandbox {
            backend,
            devices: DeviceManager::new(hv.clone()),
            state_dir: state_dir(&opts.run_root, &id),
            backend_dir: vm_root(&opts.run_root).join(&id),
            log,
            id,
            hv,
            netns: None,
            records: None,
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
            phase: Phase::Preparing,
        }
    }

    fn netns_path(&self) -> &Path {
        self.netns.as_ref().expect("set before use").path()
    }

    /// Records a change; before the run directory is claimed there is nothing to record.
    fn record(&mut self, change: impl FnOnce(&mut Record)) -> Result<()> {
        match &mut self.records {
            Some(r) => r.update(change),
            None => Ok(()),
        }
    }

    async fn run(&mut self, opts: RunOptions, mut spec: SandboxSpec, began: Instant) -> Result<()> {
        let mut timings = BTreeMap::new();
        self.queues = spec.config.network_queues;

        // Run directory first, with its record: it also tells that the id is free. The
        // backend's run directory is known before the backend creates it.
        let mut record = Record::new(&self.id);
        record.backend_dir = Some(self.backend_dir.clone());
        self.records = Some(match Records::claim(&self.state_dir, record) {
            Ok(r) => r,
            Err(ClaimError::Taken) => {
                refuse_existing(&opts.run_root, &self.id)?;
                bail!(
                    "run directory {} appeared meanwhile",
                    self.state_dir.display()
                )
            }
            Err(ClaimError::Failed(e)) => return Err(e),
        });

        let t = Instant::now();
        self.open_netns(opts.netns.as_deref())?;
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
        if let AgentChannelSource::VsockDevice { guest_cid } = caps.agent_channel {
            self.devices
                .add(DeviceConfig::Vsock(VsockConfig { guest_cid }))
                .await
                .context("Adding the vsock device of the agent channel")?;
        }
        let plugged = self.plug_nics().await?;
        timings.insert("prepare".to_string(), ms(t.elapsed()));

        let t = Instant::now();
        self.phase = Phase::Booting;
        info!(self.log, "booting"; "timeout_s" => opts.boot_timeout.as_secs());
        self.boot(opts.boot_timeout).await?;
        timings.insert("vmm_start".to_string(), ms(t.elapsed()));
        info!(self.log, "VMM running"; "pid" => self.vmm_pid, "ms" => ms(t.elapsed()));

        // From here the VM may exit under any step: that ends the run at once.
        let hv = self.hv.clone();
        let exit = tokio::select! {
            done = self.up(&opts, plugged, timings, began, &spec) => {
                let Err(e) = done else { return Ok(()) };
                // A step that failed because the VM went (its sockets close first) reports
                // the exit, the cause.
                match tokio::time::timeout(Duration::from_millis(500), hv.wait_exit()).await {
                    Ok(exit) => {
                        warn!(self.log, "step failed as the VM exited"; "error" => format!("{e:#}"));
                        exit
                    }
                    Err(_) => return Err(e),
                }
            }
            exit = hv.wait_exit() => exit,
        };
        Err(self.exited(exit).await)
    }

    fn open_netns(&mut self, given: Option<&Path>) -> Result<()> {
        self.netns = Some(match given {
            Some(p) => {
                let p = netdev::netns::resolve(p);
                if !p.exists() {
                    bail!(
                        "network namespace {} does not exist: create it (ip netns add) or leave out --netns",
                        p.display()
                    );
                }
                self.record(|r| {
                    r.netns = Some(NetnsRecord {
                        path: p.clone(),
                        owned: false,
                    })
                })?;
                Netns::Given(p)
            }
            None => {
                let name = format!("kata-{}", self.id);
                let path = Path::new(netdev::NETNS_RUN_DIR).join(&name);
                // Someone else's: never recorded as ours, so no cleanup deletes it.
                if path.exists() {
                    bail!(
                        "network namespace {name} exists already and is not this sandbox's; delete it (ip netns del {name}) or pick another id"
                    );
                }
                // Recorded before it exists: a crash right after creating it leaves it listed.
                self.record(|r| r.netns = Some(NetnsRecord { path, owned: true }))?;
                match netdev::NetNs::create(&name) {
                    Ok(ns) => Netns::Owned(ns),
                    Err(e) => {
                        // Not ours (it may be another sandbox's): the record must not say so.
                        self.record(|r| r.netns = None)?;
                        return Err(anyhow::Error::from(e)
                            .context(format!("Creating network namespace {name}")));
                    }
                }
            }
        });
        Ok(())
    }

    /// The NICs the VM boots with: one per pod interface, or the shim's own TAP.
    async fn plug_nics(&mut self) -> Result<Vec<(hypervisor::DeviceInfo, NicPlan)>> {
        let mut plugged = Vec::new();
        if let Some(Netns::Given(path)) = &self.netns {
            let path = path.clone();
            let opts = endpoint::AttachOptions {
                queues: self.queues,
                handoff: self.handoff,
            };
            let records = self.records.as_mut().expect("claimed");
            self.pod = pod::attach(&self.log, &path, &opts, records).await?;
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
        Ok(plugged)
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
        let persistent = self.handoff == TapHandoff::Name;
        self.record(|r| {
            r.taps.push(TapRecord {
                name: nic.tap.clone(),
                netns: ns.clone(),
                persistent,
            })
        })?;
        self.taps.push(nic.tap.clone());
        if persistent {
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
}

/// Writes `path` (0600) through a temporary file renamed over it.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    records::write_private(&tmp, format!("{text}\n").as_bytes())?;
    std::fs::rename(&tmp, path).with_context(|| format!("Renaming to {}", path.display()))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
