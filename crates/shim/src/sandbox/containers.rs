//! Containers in the sandbox: the shared directory (virtio-fs, Kata's `kataShared`), each
//! container's root filesystem bound into it, and the agent's container requests.
//!
//! With `shared_fs = "virtio-fs"`, [`Sandbox::prepare`] makes `RUN_DIR/shared` a mount point
//! with shared propagation ([`crate::mounts`] says why) before it adds the share device, so that
//! the bind mounts made later under it reach the virtiofsd serving it; [`Sandbox::wait_ready`]
//! has the agent mount the share at [`GUEST_SHARE_DIR`]. [`Sandbox::create_container`]
//! bind-mounts the host root filesystem directory on `RUN_DIR/shared/ID/rootfs` (recorded
//! before the mount), which the guest sees as `/run/kata-containers/shared/ID/rootfs`, and
//! asks the agent to create the container there. [`Sandbox::delete_container`] deletes it in
//! the guest, unmounts the bind and removes its directory. The teardown deletes what is left;
//! the record lets `sandbox cleanup` unmount everything after a crash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use guest_agent::client::{AgentClient, ProcessStdio};
use guest_agent::protocol::{
    CreateContainer, ExecProcess, MountShare, ProcessEntry, ProcessExit, ResizePty, SignalProcess,
    StdioRequest,
};
use hypervisor::device::SharedFsConfig;
use hypervisor::DeviceConfig;
use slog::{info, warn};
use tokio::task::JoinHandle;

use super::Sandbox;
use crate::{mounts, net};

/// The tag of the sandbox's share (Kata's).
pub const SHARE_TAG: &str = "kataShared";
/// Where the agent mounts the share in the guest (Kata's).
pub const GUEST_SHARE_DIR: &str = "/run/kata-containers/shared";
/// Limit of the agent's quick container requests (create, start, signal, delete...).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit of a wait for a process's exit: none, in practice.
const WAIT_FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// The sandbox's share and its containers.
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// The host directory shared with the guest; `None` without `shared_fs`.
    pub(super) host_dir: Option<PathBuf>,
    /// Containers by id, with the host directory their root filesystem is bound on.
    pub(super) containers: BTreeMap<String, PathBuf>,
}

/// How a process's stdio is set up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioOptions {
    /// A terminal of this many rows and columns (its output comes on `stdout`, no `stderr`).
    pub terminal: Option<(u16, u16)>,
    /// Open a stdin stream; without it stdin is `/dev/null` (a terminal always has input).
    pub stdin: bool,
}

impl StdioOptions {
    fn request(self) -> StdioRequest {
        StdioRequest {
            terminal: self.terminal.is_some(),
            rows: self.terminal.map(|t| t.0),
            cols: self.terminal.map(|t| t.1),
            stdin: self.stdin,
        }
    }
}

/// A host file or directory bound into a container's directory of the share, beside its root
/// filesystem (the spec's bind mounts of host files: CRI's `/etc/hosts`...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMount {
    /// The host path.
    pub source: PathBuf,
    /// Where it goes, relative to the container's directory of the share (`mounts/0`).
    pub rel: String,
}

/// Files or FIFOs a process's stdio is copied to and from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// Read until its end into the process's stdin.
    pub stdin: Option<PathBuf>,
    /// Where stdout (or the terminal's output) goes.
    pub stdout: Option<PathBuf>,
    /// Where stderr goes.
    pub stderr: Option<PathBuf>,
}

/// Copies the streams of `stdio` to and from `paths` until the output streams end; a stream
/// without a path is dropped (output is then discarded by the agent, input closed). The task
/// returns the bytes copied from stdout and stderr.
pub fn copy_stdio(stdio: ProcessStdio, paths: StdioPaths) -> JoinHandle<Result<(u64, u64)>> {
    tokio::spawn(async move {
        let input = match (stdio.stdin, paths.stdin) {
            (Some(s), Some(p)) => Some(tokio::spawn(async move {
                s.copy_from_path(&p)
                    .await
                    .with_context(|| format!("Copying {} to stdin", p.display()))
            })),
            _ => None,
        };
        let out = async {
            match (stdio.stdout, &paths.stdout) {
                (Some(s), Some(p)) => s
                    .copy_to_path(p)
                    .await
                    .with_context(|| format!("Copying stdout to {}", p.display())),
                _ => Ok(0),
            }
        };
        let err = async {
            match (stdio.stderr, &paths.stderr) {
                (Some(s), Some(p)) => s
                    .copy_to_path(p)
                    .await
                    .with_context(|| format!("Copying stderr to {}", p.display())),
                _ => Ok(0),
            }
        };
        let (out, err) = tokio::join!(out, err);
        // The process may end without reading all its input.
        if let Some(input) = input {
            input.abort();
        }
        Ok((out?, err?))
    })
}

/// A process of a container, apart from the [`Sandbox`]: waits for it from a task.
#[derive(Debug, Clone)]
pub struct ProcessHandle {
    agent: AgentClient,
    container_id: String,
    exec_id: Option<String>,
}

impl ProcessHandle {
    /// Waits for the process to exit.
    pub async fn wait(&self) -> Result<ProcessExit> {
        self.agent
            .wait_process(&self.container_id, self.exec_id.as_deref(), WAIT_FOREVER)
            .await
            .with_context(|| format!("Waiting for {}", self.name()))
    }

    fn name(&self) -> String {
        match &self.exec_id {
            Some(e) => format!("process {e} of container {}", self.container_id),
            None => format!("container {}", self.container_id),
        }
    }
}

impl Sandbox {
    /// Makes the shared directory a shared mount point (recorded first) and adds the share
    /// device; nothing without `shared_fs`. Before the VM boots: virtiofsd starts with it.
    pub(super) async fn prepare_share(&mut self) -> Result<()> {
        if self.spec.config.shared_fs == hypervisor::SharedFsKind::None {
            return Ok(());
        }
        let dir = self.state_dir.join("shared");
        self.record(|r| r.shared_dir = Some(dir.clone()))?;
        std::fs::create_dir(&dir).with_context(|| format!("Creating {}", dir.display()))?;
        let mount_dir = dir.clone();
        net::blocking(move || mounts::make_shared_mount_point(&mount_dir)).await??;
        self.shared.host_dir = Some(dir.clone());
        let mut share = SharedFsConfig::new(SHARE_TAG, &dir);
        share.cache = self.spec.config.virtio_fs_cache;
        self.devices
            .add(DeviceConfig::SharedFs(share))
            .await
            .with_context(|| format!("Adding the shared directory {}", dir.display()))?;
        info!(self.log, "shared directory ready"; "dir" => dir.display().to_string(),
            "tag" => SHARE_TAG);
        Ok(())
    }

    /// Has the agent mount the share at [`GUEST_SHARE_DIR`]; nothing without a share.
    pub(super) async fn mount_share(&mut self) -> Result<()> {
        if self.shared.host_dir.is_none() {
            return Ok(());
        }
        self.agent()?
            .mount_share(
                MountShare {
                    tag: SHARE_TAG.into(),
                    target: GUEST_SHARE_DIR.into(),
                    read_only: false,
                },
                REQUEST_TIMEOUT,
            )
            .await
            .with_context(|| {
                format!("Mounting share {SHARE_TAG} at {GUEST_SHARE_DIR} in the guest")
            })
    }

    fn agent(&self) -> Result<&AgentClient> {
        self.agent
            .as_ref()
            .ok_or_else(|| anyhow!("the sandbox's guest agent is not ready"))
    }

    /// The root filesystem the guest assets provide: `rootfs` beside the configured kernel.
    pub fn default_rootfs(&self) -> Option<PathBuf> {
        self.spec.config.kernel.parent().map(|d| d.join("rootfs"))
    }

    /// The ids of the containers created and not deleted.
    pub fn containers(&self) -> Vec<String> {
        self.shared.containers.keys().cloned().collect()
    }

    /// Creates container `container_id` from the host directory `rootfs_dir` (bound into
    /// the share), the host paths of `extra` (bound beside it) and the OCI spec `spec_json`
    /// (config.json text; its `root.path` is not read). Its init waits for
    /// [`Sandbox::start_container`]. A failure leaves no mount.
    pub async fn create_container(
        &mut self,
        container_id: &str,
        rootfs_dir: &Path,
        extra: &[SharedMount],
        spec_json: &str,
        stdio: StdioOptions,
    ) -> Result<ProcessStdio> {
        let what = format!("Creating container {container_id}");
        let share = self
            .shared
            .host_dir
            .clone()
            .ok_or_else(|| anyhow!("the sandbox has no shared directory: set shared_fs = \"virtio-fs\" in the configuration"))
            .context(what.clone())?;
        check_container_id(container_id).context(what.clone())?;
        if self.shared.containers.contains_key(container_id) {
            bail!("{what}: the sandbox has a container of that id");
        }
        if !rootfs_dir.is_dir() {
            bail!(
                "{what}: root filesystem {} is not a directory",
                rootfs_dir.display()
            );
        }
        self.agent().context(what.clone())?;
        let dir = share.join(container_id);
        let target = dir.join("rootfs");
        self.record(|r| r.binds.push(target.clone()))?;
        self.shared
            .containers
            .insert(container_id.to_string(), dir.clone());
        let made = async {
            std::fs::create_dir_all(&target)
                .with_context(|| format!("Creating {}", target.display()))?;
            let (src, dst) = (rootfs_dir.to_path_buf(), target.clone());
            net::blocking(move || mounts::bind(&src, &dst)).await??;
            for m in extra {
                let dst = dir.join(&m.rel);
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("Creating {}", parent.display()))?;
                }
                if m.source.is_dir() {
                    std::fs::create_dir_all(&dst)
                } else {
                    std::fs::File::create(&dst).map(drop)
                }
                .with_context(|| format!("Creating {}", dst.display()))?;
                let src = m.source.clone();
                net::blocking(move || mounts::bind(&src, &dst)).await??;
            }
            let request = CreateContainer {
                container_id: container_id.to_string(),
                rootfs: format!("{GUEST_SHARE_DIR}/{container_id}/rootfs"),
                spec: spec_json.to_string(),
                stdio: stdio.request(),
            };
            Ok::<_, anyhow::Error>(
                self.agent()?
                    .create_container(request, REQUEST_TIMEOUT)
                    .await?,
            )
        }
        .await;
        match made {
            Ok(io) => {
                info!(self.log, "container created"; "container" => container_id,
                    "rootfs" => rootfs_dir.display().to_string(), "pid" => io.pid);
                Ok(io)
            }
            Err(e) => {
                if let Err(undo) = self.unbind(container_id).await {
                    warn!(self.log, "removing a failed container's root filesystem"; "container" => container_id,
                        "error" => format!("{undo:#}"));
                }
                Err(e.context(what))
            }
        }
    }

    /// Starts the container's init; returns its pid in the guest.
    pub async fn start_container(&self, container_id: &str) -> Result<u32> {
        self.agent()?
            .start_container(container_id, REQUEST_TIMEOUT)
            .await
            .with_context(|| format!("Starting container {container_id}"))
    }

    /// Runs `process` (an OCI process, as JSON) in the running container, at once.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process: &serde_json::Value,
        stdio: StdioOptions,
    ) -> Result<ProcessStdio> {
        let request = ExecProcess {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            process: process.clone(),
            stdio: stdio.request(),
        };
        self.agent()?
            .exec_process(request, REQUEST_TIMEOUT)
            .await
            .with_context(|| format!("Running process {exec_id} in container {container_id}"))
    }

    /// A handle on a process (`exec_id` `None`: the init) to wait for it from a task of its
    /// own.
    pub fn process(&self, container_id: &str, exec_id: Option<&str>) -> Result<ProcessHandle> {
        Ok(ProcessHandle {
            agent: self.agent()?.clone(),
            container_id: container_id.to_string(),
            exec_id: exec_id.map(str::to_string),
        })
    }

    /// Sends `signal` to a process, or to every process of the container with `all`.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
        signal: i32,
        all: bool,
    ) -> Result<()> {
        let request = SignalProcess {
            container_id: container_id.to_string(),
            exec_id: exec_id.map(str::to_string),
            signal,
            all,
        };
        self.agent()?
            .signal_process(request, REQUEST_TIMEOUT)
            .await
            .with_context(|| format!("Sending signal {signal} in container {container_id}"))
    }

    /// The container's processes.
    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<ProcessEntry>> {
        self.agent()?
            .list_processes(container_id, REQUEST_TIMEOUT)
            .await
            .with_context(|| format!("Listing the processes of container {container_id}"))
    }

    /// Resizes a process's terminal.
    pub async fn resize_pty(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<()> {
        let request = ResizePty {
            container_id: container_id.to_string(),
            exec_id: exec_id.map(str::to_string),
            rows,
            cols,
        };
        self.agent()?
            .resize_pty(request, REQUEST_TIMEOUT)
            .await
            .with_context(|| format!("Resizing the terminal in container {container_id}"))
    }

    /// Deletes the container in the guest (what is left of it is killed), unmounts its root
    /// filesystem and removes its directory from the share.
    pub async fn delete_container(&mut self, container_id: &str) -> Result<()> {
        if !self.shared.containers.contains_key(container_id) {
            bail!("Deleting container {container_id}: the sandbox has no container of that id");
        }
        self.agent()?
            .delete_container(container_id, REQUEST_TIMEOUT)
            .await
            .with_context(|| format!("Deleting container {container_id} in the guest"))?;
        self.unbind(container_id).await?;
        info!(self.log, "container deleted"; "container" => container_id);
        Ok(())
    }

    /// Unmounts container `container_id`'s root filesystem, removes its directory from the
    /// share, and forgets it.
    async fn unbind(&mut self, container_id: &str) -> Result<()> {
        let Some(dir) = self.shared.containers.get(container_id).cloned() else {
            return Ok(());
        };
        let under = dir.clone();
        net::blocking(move || mounts::unmount_all_under(&under)).await??;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("Removing {}", dir.display())),
        }
        self.shared.containers.remove(container_id);
        let target = dir.join("rootfs");
        self.record(|r| r.binds.retain(|b| *b != target))
    }

    /// Deletes every container left (the teardown's first step, while the VM runs), each
    /// within a few seconds; returns what failed. The sweep unmounts what is still mounted.
    pub(super) async fn delete_containers(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for id in self.containers() {
            let deleted = match &self.agent {
                Some(agent) => agent
                    .delete_container(&id, Duration::from_secs(5))
                    .await
                    .map_err(anyhow::Error::from),
                None => Ok(()),
            };
            if let Err(e) = deleted {
                warn!(self.log, "deleting a container in the guest"; "container" => &id,
                    "error" => format!("{e:#}"));
            }
            match self.unbind(&id).await {
                Ok(()) => info!(self.log, "container deleted"; "container" => &id),
                Err(e) => problems.push(format!("removing container {id}: {e:#}")),
            }
        }
        problems
    }
}

/// A container id is a directory name in the share: 1 to 64 of `[A-Za-z0-9_.-]`, not
/// starting with a dot.
fn check_container_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        bail!("container id {id:?} must be 1 to 64 of A-Z a-z 0-9 _ . - and not start with a dot");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_are_directory_names() {
        for good in ["a", "web-1", "x.y_z", &"a".repeat(64)] {
            check_container_id(good).unwrap();
        }
        for bad in ["", ".", "..", ".x", "a/b", "a b", &"a".repeat(65)] {
            assert!(check_container_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn stdio_options_become_the_request() {
        let r = StdioOptions {
            terminal: Some((30, 100)),
            stdin: false,
        }
        .request();
        assert!(r.terminal);
        assert_eq!((r.rows, r.cols), (Some(30), Some(100)));
        assert_eq!(StdioOptions::default().request(), StdioRequest::default());
    }
}
