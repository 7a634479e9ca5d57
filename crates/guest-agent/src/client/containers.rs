//! Typed calls of the shared-filesystem and container requests.

use std::sync::Arc;
use std::time::Duration;

use super::conn::Conn;
use super::{AgentClient, InputStream, OutputStream, Result};
use crate::protocol::{
    ContainerId, ContainerStarted, CreateContainer, Done, ExecProcess, MountShare, ProcessCreated,
    ProcessEntry, ProcessExit, ProcessId, RequestBody, ResizePty, SignalProcess,
};

/// A process the agent created, with the host ends of its stdio streams.
#[derive(Debug)]
pub struct ProcessStdio {
    /// Pid in the guest.
    pub pid: u32,
    /// Its stdin (or terminal input), when requested.
    pub stdin: Option<InputStream>,
    /// Its stdout (or terminal output).
    pub stdout: Option<OutputStream>,
    /// Its stderr; `None` with a terminal.
    pub stderr: Option<OutputStream>,
}

impl ProcessStdio {
    fn open(conn: &Arc<Conn>, created: ProcessCreated) -> Self {
        let streams = created.streams;
        ProcessStdio {
            pid: created.pid,
            stdin: streams.stdin.map(|id| InputStream::open(conn, id)),
            stdout: streams.stdout.map(|id| OutputStream::open(conn, id)),
            stderr: streams.stderr.map(|id| OutputStream::open(conn, id)),
        }
    }
}

fn process_id(container_id: &str, exec_id: Option<&str>) -> ProcessId {
    ProcessId {
        container_id: container_id.to_owned(),
        exec_id: exec_id.map(str::to_owned),
    }
}

fn container(container_id: &str) -> ContainerId {
    ContainerId {
        container_id: container_id.to_owned(),
    }
}

impl AgentClient {
    /// `mount_share`: mounts virtio-fs share `tag` on `target` in the guest.
    pub async fn mount_share(&self, request: MountShare, timeout: Duration) -> Result<()> {
        let _: Done = self.call(RequestBody::MountShare(request), timeout).await?;
        Ok(())
    }

    /// `create_container`: creates the container; its init waits for
    /// [`AgentClient::start_container`]. The output streams get credit at once, so
    /// read or drop them.
    pub async fn create_container(
        &self,
        request: CreateContainer,
        timeout: Duration,
    ) -> Result<ProcessStdio> {
        let conn = Arc::clone(self.conn()?);
        let created = self
            .call(RequestBody::CreateContainer(request), timeout)
            .await?;
        Ok(ProcessStdio::open(&conn, created))
    }

    /// `start_container`: starts the init; returns its guest pid.
    pub async fn start_container(&self, container_id: &str, timeout: Duration) -> Result<u32> {
        let started: ContainerStarted = self
            .call(
                RequestBody::StartContainer(container(container_id)),
                timeout,
            )
            .await?;
        Ok(started.pid)
    }

    /// `exec_process`: runs another process in a running container.
    pub async fn exec_process(
        &self,
        request: ExecProcess,
        timeout: Duration,
    ) -> Result<ProcessStdio> {
        let conn = Arc::clone(self.conn()?);
        let created = self
            .call(RequestBody::ExecProcess(request), timeout)
            .await?;
        Ok(ProcessStdio::open(&conn, created))
    }

    /// `signal_process`: sends `request.signal`; a process that already exited is no error.
    pub async fn signal_process(&self, request: SignalProcess, timeout: Duration) -> Result<()> {
        let _: Done = self
            .call(RequestBody::SignalProcess(request), timeout)
            .await?;
        Ok(())
    }

    /// `wait_process`: waits up to `timeout` for the process (the init when `exec_id` is
    /// `None`) to exit. Other calls go on meanwhile.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
        timeout: Duration,
    ) -> Result<ProcessExit> {
        self.call(
            RequestBody::WaitProcess(process_id(container_id, exec_id)),
            timeout,
        )
        .await
    }

    /// `list_processes`: the container's processes.
    pub async fn list_processes(
        &self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<Vec<ProcessEntry>> {
        self.call(RequestBody::ListProcesses(container(container_id)), timeout)
            .await
    }

    /// `resize_pty`: resizes the process's terminal.
    pub async fn resize_pty(&self, request: ResizePty, timeout: Duration) -> Result<()> {
        let _: Done = self.call(RequestBody::ResizePty(request), timeout).await?;
        Ok(())
    }

    /// `close_stdin`: the agent closes the process's stdin once what was sent is written.
    pub async fn close_stdin(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
        timeout: Duration,
    ) -> Result<()> {
        let _: Done = self
            .call(
                RequestBody::CloseStdin(process_id(container_id, exec_id)),
                timeout,
            )
            .await?;
        Ok(())
    }

    /// `delete_container`: kills what is left of the container and removes it.
    pub async fn delete_container(&self, container_id: &str, timeout: Duration) -> Result<()> {
        let _: Done = self
            .call(
                RequestBody::DeleteContainer(container(container_id)),
                timeout,
            )
            .await?;
        Ok(())
    }
}
