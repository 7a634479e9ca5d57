//! The containerd shim v2 front-end: `start`, `delete` and the daemon serving the ttrpc task
//! service (`containerd.task.v2.Task`, the task API v2 containerd 1.6 speaks) over one
//! sandbox VM.
//!
//! - [`start`]: binds the shim socket and spawns the daemon (or finds the pod's shim
//!   serving it), prints the address;
//! - the daemon ([`serve`]): serves [`service::Service`] until `Shutdown` with no container
//!   left (or SIGTERM) has torn the sandbox down; logs go to containerd's log FIFO;
//! - [`delete`]: what containerd runs after a task is deleted or its shim died: unmounts the
//!   bundle's root filesystem and removes a dead shim's sandbox from its record; prints a
//!   `DeleteResponse`.

mod bundle;
mod config;
mod delete;
mod events;
mod flags;
mod process;
mod service;
mod start;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use containerd_shim_protos::shim_async::create_task;
use containerd_shim_protos::ttrpc::asynchronous::Server;
use slog::{error, info};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

pub use flags::is_containerd_invocation;

use crate::logging::{self, LogLevel};

/// The environment variable containerd sets to its ttrpc address (where events go).
const TTRPC_ADDRESS: &str = "TTRPC_ADDRESS";

/// Runs containerd's command line `args` (with the program name).
pub fn main(args: &[String], run_root: &Path) -> ExitCode {
    let flags = match flags::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-kata-v2: {e:#}");
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("containerd-shim-kata-v2 {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let result = match flags.action.as_str() {
        "start" => start::run(&flags),
        "delete" => delete::run(&flags, run_root),
        "" => return serve(&flags, run_root),
        other => Err(anyhow::anyhow!(
            "unknown action {other:?}: containerd runs `start`, `delete` or the daemon (no action)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // containerd shows this (it reads the output of `start` and `delete`).
            eprintln!("containerd-shim-kata-v2: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon: serves the task service on the socket `start` passed as fd 3.
fn serve(flags: &flags::Flags, run_root: &Path) -> ExitCode {
    let level = if flags.debug {
        LogLevel::Debug
    } else {
        LogLevel::Info
    };
    let bundle = flags.bundle().unwrap_or_else(|_| PathBuf::from("."));
    let (log, guard) = logging::fifo(&bundle.join("log"), level);
    let log = log.new(slog::o!("id" => flags.id.clone(), "namespace" => flags.namespace.clone()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime.map_err(anyhow::Error::from).and_then(|rt| {
        let served = rt.block_on(serve_async(&log, flags, run_root));
        // A copy may be blocked opening a FIFO whose other end never came: it must not
        // keep the daemon alive (dropping the runtime would wait for it).
        rt.shutdown_background();
        served
    });
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(log, "shim failed"; "error" => format!("{e:#}"));
            ExitCode::FAILURE
        }
    };
    drop(log);
    drop(guard);
    code
}

async fn serve_async(log: &slog::Logger, flags: &flags::Flags, run_root: &Path) -> Result<()> {
    let events = events::Publisher::start(
        log,
        &flags.namespace,
        std::env::var(TTRPC_ADDRESS).ok().filter(|a| !a.is_empty()),
    );
    let done = Arc::new(Notify::new());
    let service = Arc::new(service::Service::new(
        log.clone(),
        run_root.to_path_buf(),
        events,
        done.clone(),
    ));
    if std::fs::metadata(format!("/proc/self/fd/{}", start::LISTENER_FD)).is_err() {
        bail!(
            "no listening socket on fd {}: the daemon is started by `start`",
            start::LISTENER_FD
        );
    }
    // SAFETY: fd 3 is the listening Unix socket `start` passed (checked open above); the
    // server takes ownership of it and nothing else uses it.
    let server = unsafe { Server::new().add_unix_listener(start::LISTENER_FD) }
        .context("Serving the shim socket")?;
    let mut server = server.register_service(create_task(service.clone()));
    server.start().await.context("Starting the ttrpc server")?;
    info!(log, "serving"; "pid" => std::process::id());
    let mut term = signal(SignalKind::terminate()).context("Handling SIGTERM")?;
    tokio::select! {
        _ = done.notified() => {}
        _ = term.recv() => {
            info!(log, "SIGTERM: tearing the sandbox down");
            service.teardown().await;
        }
    }
    let _ = server.shutdown().await;
    if !flags.socket.is_empty() {
        let _ = std::fs::remove_file(&flags.socket);
    }
    info!(log, "shim exiting");
    Ok(())
}
