//! The sandbox layer: one sandbox VM and everything made for it, whatever front-end drives
//! it (`sandbox run` in [`crate::cli::run`], the containerd task service in [`crate::task`]).
//!
//! A [`Sandbox`] owns its network namespace (created `kata-ID`, or given), the TAPs of its
//! NICs and their host addressing ([`crate::net`]), the pod endpoints of a namespace CNI
//! prepared ([`crate::pod`]), its devices through [`hypervisor::DeviceManager`], the guest
//! agent client, NIC hotplug, the teardown, and the record of what it created
//! ([`crate::records`]). A front-end calls, in order:
//!
//! 1. [`Sandbox::new`]: asks the factory for the configured backend and checks the id;
//!    creates nothing ([`refuse_existing`] first tells a free id from a taken one);
//! 2. [`Sandbox::prepare`]: claims the run directory with its record, opens or creates the
//!    namespace, prepares the VM and adds its cold devices (agent vsock, the shared directory
//!    with `shared_fs = "virtio-fs"`, NICs);
//! 3. [`Sandbox::boot`]: starts the VMM, recorded as soon as its process exists;
//! 4. [`Sandbox::wait_ready`]: waits for the guest agent, has it mount the share, and gives
//!    the guest its NICs' addresses and routes; then [`Sandbox::facts`] says what runs, and
//!    [`Sandbox::publish`] writes `facts.json` (and a ready file);
//! 5. [`Sandbox::add_nic`] / [`Sandbox::remove_nic`] while it runs, and containers:
//!    [`Sandbox::create_container`], [`Sandbox::start_container`], [`Sandbox::exec_process`],
//!    [`Sandbox::signal_process`], [`Sandbox::process`] (a [`containers::ProcessHandle`] to wait from a
//!    task), [`Sandbox::list_processes`], [`Sandbox::resize_pty`],
//!    [`Sandbox::delete_container`]; [`copy_stdio`] copies a
//!    process's stdio to and from files or FIFOs (see the `containers` module);
//! 6. [`Sandbox::teardown`] (or [`Sandbox::force_teardown`]) at the end, also after a
//!    failure or a cancelled step: it deletes the containers left and removes exactly what
//!    the sandbox created, the shared directory's mounts included.
//!
//! Steps from `wait_ready` on are raced against the VM's exit with an [`ExitWatch`]: a VM
//! that exits fails the step at once, naming the phase ([`Sandbox::phase`]) and the guest
//! init's error line (`guest-init: error: ...`) when its console has one. Any step may be
//! cancelled by dropping its future (a signal); the teardown then removes what was made.
//!
//! A given namespace that holds interfaces (a pod network CNI prepared) is used through the
//! `endpoint` crate: each interface is connected to a TAP by tc redirection, the guest NIC
//! gets the interface's MAC, addresses and routes, and the teardown removes exactly the
//! TAPs, qdiscs and filters that were added. A namespace with no interface but `lo` gets
//! the sandbox's own TAP and /24, as an owned one does.
//!
//! # Crash safety
//!
//! Everything is recorded in the run directory as it is created, so that `sandbox cleanup
//! --id ID` ([`crate::cleanup`]) removes a sandbox whose shim died ([`Sandbox::created`] is
//! that record). Nothing is recorded as the sandbox's that someone else made: an existing
//! `kata-ID` namespace, a taken TAP name or a busy ingress of a pod interface fail the
//! sandbox before the record names them. The run directory is 0700, its files 0600.
//!
//! Nothing here blocks the async runtime: namespace and TAP calls that join a thread run on
//! the blocking pool ([`crate::net::blocking`]), host addressing goes over route netlink.

mod containers;
mod guest;
mod hotplug;
mod prepare;
mod teardown;
mod vmm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_agent::client::AgentClient;
use hypervisor::{DeviceInfo, DeviceManager, Hypervisor, SandboxSpec};
use slog::info;

use crate::backend::{self, BackendKind, BackendOptions};
use crate::config::ShimConfig;
use crate::facts::{NicFacts, SandboxFacts};
use crate::net::{NicPlan, Subnet24, TapHandoff};
use crate::pod::PodNetwork;
use crate::records::{self, Existing, Record, Records};

pub use containers::{
    copy_stdio, ProcessHandle, SharedMount, StdioOptions, StdioPaths, GUEST_SHARE_DIR,
};
pub use guest::connect_agent;
pub use vmm::ExitWatch;

/// Room of a Unix socket path (`sun_path`), its final NUL included.
const SUN_PATH_MAX: usize = 108;
/// The longest socket name a backend binds in its run directory.
const LONGEST_SOCKET: &str = "virtiofsd-fs99.sock";

/// What a sandbox is asked to be, besides its configuration file.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Sandbox id.
    pub id: String,
    /// Existing namespace to use; `None` creates `kata-ID`.
    pub netns: Option<PathBuf>,
    /// First /24 to try for the sandbox's own NICs.
    pub subnet: Subnet24,
    /// Parent of the shim's and the backend's run directories.
    pub run_root: PathBuf,
    /// Limit for the VMM to come up.
    pub boot_timeout: Duration,
    /// Limit for the guest agent to answer.
    pub agent_timeout: Duration,
    /// When the request began: the `total` timing counts from here.
    pub began: Instant,
}

/// The shim's own run directory of sandbox `id`.
pub fn state_dir(run_root: &Path, id: &str) -> PathBuf {
    run_root.join("sandboxes").join(id)
}

/// Parent of the backend's run directories.
pub fn vm_root(run_root: &Path) -> PathBuf {
    run_root.join("vm")
}

/// Fails when the run directory of `id` exists, saying whose it is and what to do.
pub fn refuse_existing(run_root: &Path, id: &str) -> Result<()> {
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

/// What a sandbox is doing: for the message when the VM exits under it, and for a
/// front-end's log line when it cancels a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Claiming the run directory, making the namespace, TAPs and cold devices.
    Preparing,
    /// Starting the VMM.
    Booting,
    /// Waiting for the guest agent.
    Agent,
    /// Giving the guest its NICs' addresses and routes.
    GuestNetwork,
    /// Up: the front-end serves it.
    Serving,
    /// Hot-plugging a NIC.
    Hotplug,
}

impl Phase {
    /// What is in progress, as a log line's `during` field says it.
    pub fn doing(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing the namespace, TAPs and devices",
            Phase::Booting => "booting",
            Phase::Agent => "waiting for the guest agent",
            Phase::GuestNetwork => "configuring the guest network",
            Phase::Serving => "serving",
            Phase::Hotplug => "hot-plugging a NIC",
        }
    }

    /// When the VM exited, as the error says it.
    fn when(self) -> &'static str {
        match self {
            Phase::Preparing | Phase::Booting => "while it was booting",
            Phase::Agent => "before the guest agent answered",
            Phase::GuestNetwork => "while the guest's network was being configured",
            Phase::Serving => "on its own",
            Phase::Hotplug => "while a NIC was being hot-plugged",
        }
    }
}

/// One sandbox VM and what was made for it. See the module docs for the order of calls.
pub struct Sandbox {
    log: slog::Logger,
    id: String,
    backend: BackendKind,
    hv: Arc<dyn Hypervisor>,
    devices: DeviceManager,
    spec: SandboxSpec,
    opts: SandboxOptions,
    netns: Option<Netns>,
    state_dir: PathBuf,
    backend_dir: PathBuf,
    /// The record of what was created; `None` until the run directory is claimed.
    records: Option<Records>,
    agent: Option<AgentClient>,
    /// Guest NICs configured so far.
    nics: Vec<NicFacts>,
    /// Cold-plugged NICs the guest has still to configure ([`Sandbox::wait_ready`]).
    pending: Vec<(DeviceInfo, NicPlan)>,
    taps: Vec<String>,
    /// How the backend takes TAPs, known once it is prepared.
    handoff: TapHandoff,
    /// Persistent TAPs (handed over by name): deleted by the teardown.
    persistent_taps: Vec<String>,
    /// The pod network's endpoints, when the given namespace held interfaces.
    pod: Option<PodNetwork>,
    queues: u16,
    vmm_pid: Option<u32>,
    facts: Option<SandboxFacts>,
    timings: BTreeMap<String, u64>,
    phase: Arc<Mutex<Phase>>,
    /// The shared directory and the containers bound into it.
    shared: containers::Shared,
    /// The configuration the sandbox was made from (`[factory]`: templates).
    shim_config: ShimConfig,
    /// The template the VM is restored from, with `[factory] enable_template`.
    template: Option<crate::template::Template>,
    /// NICs of a VM restored from a template, hot-plugged once it runs.
    deferred: Vec<(hypervisor::DeviceConfig, NicPlan)>,
}

impl Sandbox {
    /// A sandbox of configuration `cfg`, with the backend it names. Creates nothing: a
    /// backend this build lacks, or a bad id, is an error that leaves nothing behind.
    /// `log` is the front-end's; the sandbox logs with its id added.
    pub fn new(log: &slog::Logger, cfg: &ShimConfig, opts: SandboxOptions) -> Result<Sandbox> {
        let id = opts.id.clone();
        let sb_log = log.new(slog::o!("sandbox" => id.clone()));
        info!(sb_log, "configuration loaded"; "file" => cfg.file.display().to_string(),
            "backend" => cfg.backend.name());
        let hv = backend::create(
            cfg.backend,
            log,
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
        // The backend binds its sockets (QMP, agent, virtiofsd-fsN.sock) in vm/ID/.
        let longest = vm_root(&opts.run_root).join(&id).join(LONGEST_SOCKET);
        if longest.as_os_str().len() >= SUN_PATH_MAX {
            bail!(
                "socket paths under {} would be longer than a Unix socket path may be ({} bytes) with sandbox id {id:?}: use a shorter run root (--run-root) or id",
                opts.run_root.display(),
                SUN_PATH_MAX
            );
        }
        Ok(Sandbox {
            log: sb_log,
            backend: cfg.backend,
            devices: DeviceManager::new(hv.clone()),
            state_dir: state_dir(&opts.run_root, &id),
            backend_dir: vm_root(&opts.run_root).join(&id),
            queues: spec.config.network_queues,
            spec,
            opts,
            id,
            hv,
            netns: None,
            records: None,
            agent: None,
            nics: Vec::new(),
            pending: Vec::new(),
            taps: Vec::new(),
            handoff: TapHandoff::Fds,
            persistent_taps: Vec::new(),
            pod: None,
            vmm_pid: None,
            facts: None,
            timings: BTreeMap::new(),
            phase: Arc::new(Mutex::new(Phase::Preparing)),
            shared: containers::Shared::default(),
            shim_config: cfg.clone(),
            template: None,
            deferred: Vec::new(),
        })
    }

    /// The sandbox's logger (the front-end's, with the sandbox id).
    pub fn log(&self) -> &slog::Logger {
        &self.log
    }

    /// What the sandbox is doing.
    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
    }

    /// What the sandbox created so far, as recorded; `None` before the run directory is
    /// claimed and after the teardown removed it.
    pub fn created(&self) -> Option<&Record> {
        self.records.as_ref().map(Records::get)
    }

    /// The facts of a ready sandbox ([`Sandbox::wait_ready`]), with its NICs as they are now.
    pub fn facts(&self) -> Option<SandboxFacts> {
        self.facts.clone().map(|mut f| {
            f.nics = self.nics.clone();
            f
        })
    }

    /// Where a front-end serves the sandbox's control socket (in the run directory, 0700).
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    /// Writes `facts.json` in the run directory and, when given, `ready_file` (recorded, so
    /// the teardown removes it), each replaced at once; returns the facts written.
    pub fn publish(&mut self, ready_file: Option<&Path>) -> Result<SandboxFacts> {
        let facts = self.facts().context("The sandbox is not ready")?;
        let line = serde_json::to_string(&facts)?;
        write_atomic(&self.state_dir.join("facts.json"), &line)?;
        if let Some(ready) = ready_file {
            self.record(|r| r.ready_file = Some(ready.to_path_buf()))?;
            write_atomic(ready, &line)
                .with_context(|| format!("Writing the ready file {}", ready.display()))?;
        }
        Ok(facts)
    }

    /// The VMM's pid once it runs (this process's for an in-process backend).
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm_pid
    }

    /// Pauses the VM (every vCPU).
    pub async fn pause(&self) -> Result<()> {
        self.hv.pause().await.context("Pausing the VM")
    }

    /// Resumes a paused VM.
    pub async fn resume(&self) -> Result<()> {
        self.hv.resume().await.context("Resuming the VM")
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
