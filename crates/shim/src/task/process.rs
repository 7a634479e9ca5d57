//! The task service's view of containers and their processes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Result;
use containerd_shim_protos::api::{StateResponse, Status};
use guest_agent::protocol::ProcessExit;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::events::timestamp;
use crate::sandbox::StdioPaths;

/// containerd's exit status of a process killed by signal N is 128 + N.
const SIGNAL_BASE: u32 = 128;
/// The status reported for a process whose end could not be learnt (the VM went away).
pub const UNKNOWN_EXIT: u32 = 255;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status as containerd reports it.
    pub status: u32,
    /// When (the host's clock when the shim learnt it).
    pub at: SystemTime,
}

impl Exit {
    /// The exit the agent reported.
    pub fn from_agent(e: &ProcessExit) -> Exit {
        let status = match (e.exit_code, e.signal) {
            (_, Some(sig)) => SIGNAL_BASE + sig as u32,
            (Some(code), None) => code as u32,
            (None, None) => UNKNOWN_EXIT,
        };
        Exit {
            status,
            at: SystemTime::now(),
        }
    }
}

/// The stdio containerd gave a process: FIFO paths (empty when none) and the terminal flag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Io {
    /// Its stdin FIFO.
    pub stdin: String,
    /// Its stdout FIFO.
    pub stdout: String,
    /// Its stderr FIFO.
    pub stderr: String,
    /// Whether it has a terminal.
    pub terminal: bool,
}

impl Io {
    /// Where the shim copies the streams.
    pub fn paths(&self) -> StdioPaths {
        let path = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        StdioPaths {
            stdin: path(&self.stdin),
            stdout: path(&self.stdout),
            stderr: path(&self.stderr),
        }
    }
}

/// A container's init or one of its exec processes.
#[derive(Debug)]
pub struct Process {
    /// `None` for the init.
    pub exec_id: Option<String>,
    /// The pid containerd is told (the VMM's: guest pids mean nothing on the host).
    pub pid: u32,
    /// Its stdio.
    pub io: Io,
    /// Whether it was started.
    pub started: bool,
    /// Its end, once known.
    pub exit: watch::Sender<Option<Exit>>,
    /// An exec's process spec (OCI JSON), until it starts.
    pub spec: Option<serde_json::Value>,
    /// The copy of its streams, started at create (the init) and handed to its waiter.
    pub copy: Option<JoinHandle<Result<(u64, u64)>>>,
}

impl Process {
    /// A process not started yet.
    pub fn new(exec_id: Option<String>, pid: u32, io: Io) -> Process {
        Process {
            exec_id,
            pid,
            io,
            started: false,
            exit: watch::channel(None).0,
            spec: None,
            copy: None,
        }
    }

    /// Its end, if it ended.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Its status as containerd names it.
    pub fn status(&self, paused: bool) -> Status {
        match (self.exited(), self.started) {
            (Some(_), _) => Status::STOPPED,
            (None, true) if paused => Status::PAUSED,
            (None, true) => Status::RUNNING,
            (None, false) => Status::CREATED,
        }
    }

    /// Its `State` answer.
    pub fn state(&self, id: &str, bundle: &str, paused: bool) -> StateResponse {
        let exit = self.exited();
        StateResponse {
            id: id.to_string(),
            bundle: bundle.to_string(),
            pid: self.pid,
            status: self.status(paused).into(),
            stdin: self.io.stdin.clone(),
            stdout: self.io.stdout.clone(),
            stderr: self.io.stderr.clone(),
            terminal: self.io.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map_or_else(Default::default, |e| timestamp(e.at)),
            exec_id: self.exec_id.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// A container of the sandbox.
#[derive(Debug)]
pub struct Container {
    /// Its bundle directory.
    pub bundle: PathBuf,
    /// Whether the shim mounted its root filesystem on `<bundle>/rootfs`.
    pub rootfs_mounted: bool,
    /// Its init.
    pub init: Process,
    /// Its exec processes by id.
    pub execs: BTreeMap<String, Process>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_as_containerd_reports_them() {
        let e = |code, signal| {
            Exit::from_agent(&ProcessExit {
                exit_code: code,
                signal,
                exited_at_ms: 0,
            })
            .status
        };
        assert_eq!(e(Some(7), None), 7);
        assert_eq!(e(None, Some(9)), 137);
        assert_eq!(e(None, Some(15)), 143);
        assert_eq!(e(None, None), UNKNOWN_EXIT);
    }

    #[test]
    fn statuses_follow_the_process() {
        let mut p = Process::new(None, 1, Io::default());
        assert_eq!(p.status(false), Status::CREATED);
        p.started = true;
        assert_eq!(p.status(false), Status::RUNNING);
        assert_eq!(p.status(true), Status::PAUSED);
        p.exit.send_replace(Some(Exit {
            status: 0,
            at: SystemTime::now(),
        }));
        assert_eq!(p.status(true), Status::STOPPED);
        assert_eq!(p.state("c", "/b", false).exit_status, 0);
    }
}
