//! `sandbox run`: one sandbox VM driven from the command line, a thin front-end over
//! [`Sandbox`].
//!
//! It loads the configuration, prepares and boots the sandbox, waits for it to be ready,
//! serves its control socket ([`super::control`]), writes the facts (and the ready file)
//! and prints them, then stays until SIGINT or SIGTERM. At the end, and on every failure
//! path after the first thing it created, [`Sandbox::teardown`] removes what the sandbox
//! created. `run` with the id of a sandbox whose shim died refuses at once and names the
//! cleanup command; with the id of a running one it names the owner's pid.
//!
//! # Signals and exit status
//!
//! The whole run (boot, agent wait, guest NIC configuration, a hotplug being served) is
//! raced against SIGTERM/SIGINT: the first one cancels whatever is in progress and tears
//! down; its log line (`signal received, stopping`) says what was in progress in its
//! `during` field. A second one during the teardown forces it: the VMM is killed (SIGKILL)
//! and what the record lists is removed. While the guest agent is awaited, and from then
//! on, the VM's exit is watched too ([`ExitWatch`]).
//!
//! Exit status of `sandbox run`:
//! - 0: stopped by SIGTERM/SIGINT and everything removed;
//! - 1: failed (the error says why; what was created is removed);
//! - [`EXIT_FORCED`] (3): the teardown was forced by a second signal. Not 128+N: shells and
//!   supervisors read that as "killed by signal N", while here the shim exits by itself
//!   after removing what its record lists.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use slog::{error, info, warn};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::config;
use crate::net::Subnet24;
use crate::records;
use crate::sandbox::{self, ExitWatch, Sandbox, SandboxOptions};

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
    sandbox::refuse_existing(&opts.run_root, &id)?;
    let cfg = config::load(&opts.config)?;
    for w in &cfg.warnings {
        warn!(log, "configuration key ignored";
            "file" => w.file.display().to_string(), "line" => w.line, "key" => &w.key,
            "reason" => &w.reason);
    }
    let mut sb = Sandbox::new(
        log,
        &cfg,
        SandboxOptions {
            id,
            netns: opts.netns.clone(),
            subnet: opts.subnet,
            run_root: opts.run_root.clone(),
            boot_timeout: opts.boot_timeout,
            agent_timeout: opts.agent_timeout,
            began,
        },
    )?;
    let log = sb.log().clone();

    let mut signals = StopSignals::new()?;
    let outcome = tokio::select! {
        done = serve(&mut sb, &opts, began) => done,
        sig = signals.recv() => {
            info!(log, "signal received, stopping"; "signal" => sig, "during" => sb.phase().doing());
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
            let problems = sb.force_teardown().await;
            if let Err(e) = outcome {
                error!(log, "the sandbox had failed before"; "error" => format!("{e:#}"));
            }
            return Err(Forced { signal: sig, problems }.into());
        }
    };
    outcome.and(teardown)
}

/// Brings the sandbox up, publishes and prints its facts, and serves its control socket;
/// from the boot on, the VM's exit ends it with the exit's error.
async fn serve(sb: &mut Sandbox, opts: &RunOptions, began: Instant) -> Result<()> {
    sb.prepare().await?;
    sb.boot().await?;
    let watch: ExitWatch = sb.exit_watch();
    watch
        .guard(async {
            sb.wait_ready().await?;
            let control = sb.control_socket();
            let listener = UnixListener::bind(&control)
                .with_context(|| format!("Binding control socket {}", control.display()))?;
            // Inside a 0700 directory: nobody else could connect meanwhile.
            records::set_mode(&control, records::FILE_MODE)?;
            // The facts file and the ready file are in place before the facts are printed:
            // whoever waits on any of the three finds the other two.
            let facts = sb.publish(opts.ready_file.as_deref())?;
            if opts.json {
                println!("{}", serde_json::to_string(&facts)?);
            } else {
                println!("{}", facts.human());
            }
            info!(sb.log(), "sandbox ready"; "ms" => began.elapsed().as_millis() as u64);
            super::control::serve(sb, listener).await
        })
        .await
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
