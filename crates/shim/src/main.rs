//! `containerd-shim-kata-v2`: the runtime shim, with its hypervisor backends chosen by cargo
//! features.
//!
//! This binary owns the choice of backends (features `qemu`, the default, and `dragonball`;
//! `make build HYPERVISOR=qemu|dragonball|all`), reading Kata's `configuration.toml` (the
//! subset in `CONFIG.md`), and operator commands:
//!
//! - `sandbox run --config FILE [--netns PATH] [--id ID]` boots a sandbox VM with a TAP NIC
//!   (or, in a namespace CNI prepared, one per pod interface, connected by tc redirection),
//!   gives the guest its addresses and routes through its agent, prints the facts, and
//!   removes everything it created on SIGINT or SIGTERM (exit status 0; 1 when it failed;
//!   3 when a second signal forced the teardown, see [`cli::run`]) over the sandbox layer
//!   ([`sandbox`]);
//! - `sandbox hotplug-nic --id ID` hot-plugs one more NIC into a running sandbox;
//!   `sandbox unplug-nic --id ID --nic NIC` unplugs one;
//! - `sandbox exec --id ID [--rootfs DIR] [--tty] -- CMD ARGS...` runs a command to its end
//!   in a new container of a running sandbox (with `shared_fs = "virtio-fs"`), prints its
//!   output and exits with its status ([`cli::exec`]); `sandbox ps --id ID --container C`
//!   lists a container's processes;
//! - `sandbox cleanup --id ID` removes what a `sandbox run` that died left, from the record
//!   it kept in its run directory ([`records`], [`cleanup`]);
//! - `sandbox check [--config FILE]` says whether this host can run one.
//!
//! Run by containerd (`-namespace NS -address A -id ID start`, `delete`, and the daemon `start`
//! spawns), it is the shim v2 runtime `io.containerd.kata.v2`: see [`task`].
//!
//! Backend `cfg`s live only in [`backend`], the factory. Libraries below this binary return
//! typed errors; `anyhow` is used here, at the edge.
//!
//! ```text
//! $ containerd-shim-kata-v2 --version
//! containerd-shim-kata-v2 0.1.0
//! backends: qemu
//! $ containerd-shim-kata-v2 sandbox run --config configs/configuration-qemu.toml
//! ```

mod backend;
mod check;
mod cleanup;
mod cli;
mod config;
mod facts;
mod logging;
mod mounts;
mod net;
mod pod;
mod procfs;
mod records;
mod sandbox;
mod task;
mod template;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::facts::{ControlRequest, ControlResponse};
use crate::logging::{LogFormat, LogLevel};

/// Default parent of run directories: short, since a 64-character containerd id and a
/// socket name under `vm/ID/` must fit a Unix socket path (108 bytes).
const DEFAULT_RUN_ROOT: &str = "/run/kata";

/// The containerd shim v2 runtime for VM sandboxes, and its operator commands.
#[derive(Debug, Parser)]
#[command(name = "containerd-shim-kata-v2")]
struct Cli {
    /// Log record format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Lowest log level written.
    #[arg(long, value_enum, default_value_t = LogLevel::Info, global = true)]
    log_level: LogLevel,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Operate one sandbox VM from the command line.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
}

#[derive(Debug, Subcommand)]
enum SandboxCommand {
    /// Boot a sandbox, print its facts, stay until SIGINT/SIGTERM, then remove it.
    ///
    /// The first SIGINT/SIGTERM cancels whatever is in progress (boot, agent wait, a
    /// hotplug) and removes the sandbox; a second one during that teardown forces it: the
    /// VMM is killed and what the sandbox's record lists is removed.
    ///
    /// Exit status: 0 = stopped on request and removed; 1 = failed (the error says why;
    /// what was created is removed); 3 = the teardown was forced by a second signal.
    ///
    /// Everything created is recorded in the run directory (0700, files 0600) as it is
    /// created: if this process dies, `sandbox cleanup --id ID` removes what it left, and
    /// `sandbox run` with that id refuses, naming the cleanup command.
    Run(RunArgs),
    /// Remove what a `sandbox run` that died left (VMM, namespace, TAPs, tc state, files),
    /// from its record; refuses while that shim runs; succeeds when there is nothing left.
    ///
    /// Exit status: 0 = removed (or nothing to remove); 1 = the owner still runs, or
    /// something could not be removed (it says what; run it again once fixed).
    Cleanup(CleanupArgs),
    /// Hot-plug one more NIC into a running sandbox and give the guest an address on it.
    HotplugNic(TargetArgs),
    /// Unplug a NIC from a running sandbox (by its id, as the facts name it) and remove its
    /// TAP.
    UnplugNic(UnplugArgs),
    /// Print the facts of a running sandbox.
    Facts(TargetArgs),
    /// Run a command to its end in a new container of a running sandbox (shared_fs =
    /// "virtio-fs"), print its output, delete the container, and exit with its status.
    ///
    /// The container's root is a host directory bind-mounted into the sandbox's shared
    /// directory; its spec is a minimal OCI one (root, PID/mount/UTS/IPC namespaces, hostname
    /// = container id). SIGINT and SIGTERM are sent on to the container.
    ///
    /// Exit status: the container's (its code, or 128 + the signal that killed it); 1 when
    /// it could not be run (the error says why).
    Exec(ExecArgs),
    /// List the processes of a container of a running sandbox.
    Ps(PsArgs),
    /// Run a command in the guest VM itself (outside any container) through its agent, print
    /// its output and exit with its status: for inspection and debugging.
    Guest(GuestArgs),
    /// Check that this host can run a sandbox (with this configuration).
    Check(CheckArgs),
    /// Manage VM templates (`[factory] enable_template`): create, list, delete.
    #[command(subcommand)]
    Template(TemplateCommand),
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// Boot, save and stop the template of a configuration (nothing when it exists).
    Create(TemplateConfigArgs),
    /// List the templates of the configuration's store: digest, state, what they were made of.
    List(TemplateConfigArgs),
    /// Delete a template (`--digest`) or all (`--all`); sandboxes restored from it keep running.
    Delete(TemplateDeleteArgs),
}

#[derive(Debug, Args)]
struct TemplateConfigArgs {
    /// Kata configuration file (its `[factory] template_path` is the store).
    #[arg(long, short)]
    config: PathBuf,
    #[command(flatten)]
    root: RunRoot,
}

#[derive(Debug, Args)]
struct TemplateDeleteArgs {
    /// Kata configuration file (its `[factory] template_path` is the store).
    #[arg(long, short)]
    config: PathBuf,
    /// The template's digest, as `list` prints it.
    #[arg(long, required_unless_present = "all", conflicts_with = "all")]
    digest: Option<String>,
    /// Every template of the store.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Kata configuration file (see CONFIG.md).
    #[arg(long, short)]
    config: PathBuf,
    /// Existing network namespace (path or name under /run/netns). When it holds
    /// interfaces (a pod network from CNI), each is connected to a TAP by tc redirection and
    /// the guest gets its MAC, addresses and routes. Without it the shim creates `kata-ID`
    /// and deletes it at exit.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Sandbox id (default: sandbox-PID).
    #[arg(long)]
    id: Option<String>,
    /// First /24 to try for the NICs: the TAP gets .1, the guest .2; the next NIC the next
    /// free /24.
    #[arg(long, default_value = "10.200.0.0/24")]
    subnet: String,
    /// Print the facts as one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// Write the facts (JSON) to this file once the sandbox is up; removed at exit.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Seconds the VMM may take to come up.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Seconds the guest agent may take to answer.
    #[arg(long, default_value_t = 120)]
    agent_timeout: u64,
    #[command(flatten)]
    root: RunRoot,
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// Id of the running sandbox.
    #[arg(long)]
    id: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    root: RunRoot,
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// Id of the running sandbox.
    #[arg(long)]
    id: String,
    /// Container id (default: exec-PID).
    #[arg(long)]
    container: Option<String>,
    /// Run the command in the running container --container (another `sandbox exec`'s)
    /// instead of creating one.
    #[arg(long, requires = "container", conflicts_with = "rootfs")]
    join: bool,
    /// Root filesystem directory (default: `rootfs` beside the sandbox's kernel, which
    /// `make guest-assets` builds from busybox-static).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Give the command a terminal (24x80); its output and errors come on stdout.
    #[arg(long, short)]
    tty: bool,
    /// Copy this command's stdin into the container's.
    #[arg(long, short)]
    interactive: bool,
    #[command(flatten)]
    root: RunRoot,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct PsArgs {
    /// Id of the running sandbox.
    #[arg(long)]
    id: String,
    /// Container id.
    #[arg(long)]
    container: String,
    #[command(flatten)]
    root: RunRoot,
}

#[derive(Debug, Args)]
struct GuestArgs {
    /// Id of the running sandbox.
    #[arg(long)]
    id: String,
    #[command(flatten)]
    root: RunRoot,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct UnplugArgs {
    /// Id of the running sandbox.
    #[arg(long)]
    id: String,
    /// Id of the NIC (`net1`), as `sandbox facts` lists it.
    #[arg(long)]
    nic: String,
    #[command(flatten)]
    root: RunRoot,
}

#[derive(Debug, Args)]
struct RunRoot {
    /// Parent of the run directories (sockets, logs, facts).
    #[arg(long, default_value = DEFAULT_RUN_ROOT)]
    run_root: PathBuf,
}

#[derive(Debug, Args)]
struct CleanupArgs {
    /// Id of the sandbox to remove.
    #[arg(long)]
    id: String,
    #[command(flatten)]
    root: RunRoot,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Kata configuration file: also check its backend and guest assets.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

/// `--version`: the crate version and the compiled-in backends.
fn version_text() -> String {
    let backends: Vec<String> = backend::compiled()
        .into_iter()
        .map(|b| b.to_string())
        .collect();
    format!(
        "{}\nbackends: {}",
        env!("CARGO_PKG_VERSION"),
        if backends.is_empty() {
            "none (built with --no-default-features)".to_string()
        } else {
            backends.join(", ")
        }
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if task::is_containerd_invocation(&args) {
        return task::main(&args, std::path::Path::new(DEFAULT_RUN_ROOT));
    }
    let version = version_text();
    let matches = Cli::command()
        .version(version.clone().leak() as &str)
        .get_matches_from(&args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let (log, guard) = logging::init(cli.log_format, cli.log_level);
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(dispatch(&log, cli.command)));
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `sandbox exec`: the container's status, nothing to say.
            if let Some(exit) = e.downcast_ref::<cli::exec::ContainerExit>() {
                drop(log);
                drop(guard);
                return ExitCode::from(exit.code);
            }
            let code = if e.downcast_ref::<cli::run::Forced>().is_some() {
                ExitCode::from(cli::run::EXIT_FORCED)
            } else {
                ExitCode::FAILURE
            };
            // JSON consumers get the error as a record; people get one plain line.
            if cli.log_format == LogFormat::Json {
                slog::error!(log, "failed"; "error" => format!("{e:#}"));
            }
            drop(log);
            drop(guard);
            if cli.log_format == LogFormat::Text {
                eprintln!("containerd-shim-kata-v2: error: {e:#}");
            }
            return code;
        }
    };
    drop(log);
    drop(guard);
    code
}

async fn dispatch(log: &slog::Logger, command: Command) -> Result<()> {
    match command {
        Command::Sandbox(SandboxCommand::Run(a)) => {
            let opts = cli::run::RunOptions {
                config: a.config,
                netns: a.netns,
                id: a.id,
                subnet: net::Subnet24::parse(&a.subnet)?,
                json: a.json,
                ready_file: a.ready_file,
                run_root: a.root.run_root,
                boot_timeout: Duration::from_secs(a.boot_timeout),
                agent_timeout: Duration::from_secs(a.agent_timeout),
            };
            cli::run::run(log, opts).await
        }
        Command::Sandbox(SandboxCommand::Cleanup(c)) => {
            cleanup::command(&c.root.run_root, &c.id).await
        }
        Command::Sandbox(SandboxCommand::HotplugNic(t)) => {
            match cli::control::request(&t.root.run_root, &t.id, ControlRequest::HotplugNic).await?
            {
                ControlResponse::Nic(n) if t.json => println!("{}", serde_json::to_string(&n)?),
                ControlResponse::Nic(n) => println!("{} {}", n.id, n.human()),
                other => bail!("unexpected answer: {other:?}"),
            }
            Ok(())
        }
        Command::Sandbox(SandboxCommand::UnplugNic(u)) => {
            let req = ControlRequest::UnplugNic { nic: u.nic };
            match cli::control::request(&u.root.run_root, &u.id, req).await? {
                ControlResponse::Unplugged(nic) => println!("{nic} unplugged"),
                other => bail!("unexpected answer: {other:?}"),
            }
            Ok(())
        }
        Command::Sandbox(SandboxCommand::Facts(t)) => {
            match cli::control::request(&t.root.run_root, &t.id, ControlRequest::Facts).await? {
                ControlResponse::Facts(f) if t.json => println!("{}", serde_json::to_string(&f)?),
                ControlResponse::Facts(f) => println!("{}", f.human()),
                other => bail!("unexpected answer: {other:?}"),
            }
            Ok(())
        }
        Command::Sandbox(SandboxCommand::Exec(x)) => {
            cli::exec::run(cli::exec::ExecOptions {
                run_root: x.root.run_root,
                id: x.id,
                container_id: x.container,
                rootfs: x.rootfs,
                join: x.join,
                tty: x.tty,
                interactive: x.interactive,
                args: x.command,
            })
            .await
        }
        Command::Sandbox(SandboxCommand::Guest(g)) => {
            let req = ControlRequest::Guest { argv: g.command };
            match cli::control::request(&g.root.run_root, &g.id, req).await? {
                ControlResponse::GuestOutput {
                    exit_code,
                    stdout,
                    stderr,
                } => {
                    print!("{stdout}");
                    eprint!("{stderr}");
                    match exit_code {
                        Some(0) => Ok(()),
                        Some(code) => Err(cli::exec::ContainerExit {
                            code: u8::try_from(code).unwrap_or(1),
                        }
                        .into()),
                        None => bail!("the command was killed by a signal"),
                    }
                }
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Command::Sandbox(SandboxCommand::Ps(p)) => {
            let req = ControlRequest::Ps {
                container_id: p.container,
            };
            match cli::control::request(&p.root.run_root, &p.id, req).await? {
                ControlResponse::Processes(ps) => {
                    println!("{:>6} {:>9}  CMD", "PID", "GUEST-PID");
                    for (pid, guest_pid, cmd) in ps {
                        println!("{pid:>6} {guest_pid:>9}  {cmd}");
                    }
                }
                other => bail!("unexpected answer: {other:?}"),
            }
            Ok(())
        }
        Command::Sandbox(SandboxCommand::Template(t)) => cli::template::run(log, t.into()).await,
        Command::Sandbox(SandboxCommand::Check(c)) => {
            // It runs the VMM binary and opens devices: off the async worker.
            let lines = net::blocking(move || check::run(c.config.as_deref())).await?;
            for l in &lines {
                println!("{l}");
            }
            let failed = lines
                .iter()
                .filter(|l| l.status == check::Status::Fail)
                .count();
            if failed > 0 {
                bail!("{failed} required check(s) failed");
            }
            let warned = lines
                .iter()
                .filter(|l| l.status == check::Status::Warn)
                .count();
            if warned > 0 {
                println!("ok: this host can run a sandbox ({warned} warning(s) above: read them)");
            } else {
                println!("ok: this host can run a sandbox");
            }
            Ok(())
        }
    }
}

impl From<TemplateCommand> for cli::template::Request {
    fn from(t: TemplateCommand) -> Self {
        use cli::template::Request;
        match t {
            TemplateCommand::Create(a) => Request::Create {
                config: a.config,
                run_root: a.root.run_root,
            },
            TemplateCommand::List(a) => Request::List { config: a.config },
            TemplateCommand::Delete(a) => Request::Delete {
                config: a.config,
                digest: a.digest,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
