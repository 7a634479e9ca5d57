//! Container requests, mapped onto `guest_agent::runtime`.

use std::collections::HashMap;
use std::error::Error;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Mutex;

use guest_agent::protocol::{
    ContainerStarted, Done, ProcessCreated, ProcessEntry, ProcessExit, RequestBody, StdioRequest,
    StreamIds, DEFAULT_TERMINAL_SIZE,
};
use guest_agent::runtime::{ProcessIo, Runtime, Stdio};
use guest_agent::server::{InputHandle, RequestContext};
use serde::Serialize;
use serde_json::Value;

use crate::spec::{parse_process, parse_spec};

/// The runtime and the stdin streams of its processes (for `close_stdin`).
pub struct Containers {
    runtime: Runtime,
    stdins: Mutex<HashMap<(String, Option<String>), InputHandle>>,
}

/// The error and its sources, `: `-separated.
fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn value<T: Serialize>(result: T) -> Result<Value, String> {
    serde_json::to_value(result).map_err(|e| format!("Encoding the result: {e}"))
}

fn stdio(request: StdioRequest) -> Stdio {
    if request.terminal {
        Stdio::Terminal {
            rows: request.rows.unwrap_or(DEFAULT_TERMINAL_SIZE.0),
            cols: request.cols.unwrap_or(DEFAULT_TERMINAL_SIZE.1),
        }
    } else {
        Stdio::Pipes {
            stdin: request.stdin,
        }
    }
}

impl Containers {
    pub fn new() -> Result<Self, String> {
        Ok(Containers {
            runtime: Runtime::new().map_err(|e| chain(&e))?,
            stdins: Mutex::new(HashMap::new()),
        })
    }

    fn stdins(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Option<String>), InputHandle>> {
        self.stdins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers a container request (any request the handler does not serve itself).
    pub fn handle(&self, body: RequestBody, ctx: &RequestContext) -> Result<Value, String> {
        let rt = &self.runtime;
        match body {
            RequestBody::CreateContainer(create) => {
                let spec = parse_spec(&create.spec)?;
                let io = rt
                    .create(
                        &create.container_id,
                        Path::new(&create.rootfs),
                        &spec,
                        stdio(create.stdio),
                    )
                    .map_err(|e| chain(&e))?;
                let key = (create.container_id.clone(), None);
                match self.open_streams(key, io, create.stdio, ctx) {
                    Ok(created) => value(created),
                    Err(e) => {
                        // Nothing is left on error; the runtime's own error is secondary.
                        let _ = rt.delete(&create.container_id);
                        Err(e)
                    }
                }
            }
            RequestBody::StartContainer(c) => {
                let pid = rt.start(&c.container_id).map_err(|e| chain(&e))?;
                value(ContainerStarted { pid })
            }
            RequestBody::ExecProcess(exec) => {
                let process = parse_process(exec.process)?;
                let io = rt
                    .exec(
                        &exec.container_id,
                        &exec.exec_id,
                        &process,
                        stdio(exec.stdio),
                    )
                    .map_err(|e| chain(&e))?;
                let key = (exec.container_id, Some(exec.exec_id));
                value(self.open_streams(key, io, exec.stdio, ctx)?)
            }
            RequestBody::SignalProcess(s) => {
                rt.signal(&s.container_id, s.exec_id.as_deref(), s.signal, s.all)
                    .map_err(|e| chain(&e))?;
                value(Done {})
            }
            RequestBody::WaitProcess(p) => {
                let status = rt
                    .wait(&p.container_id, p.exec_id.as_deref())
                    .map_err(|e| chain(&e))?;
                value(ProcessExit {
                    exit_code: status.code,
                    signal: status.signal,
                    exited_at_ms: status.exited_at_ms,
                })
            }
            RequestBody::ListProcesses(c) => {
                let list = rt.ps(&c.container_id).map_err(|e| chain(&e))?;
                let entries: Vec<ProcessEntry> = list
                    .into_iter()
                    .map(|p| ProcessEntry {
                        pid: p.pid,
                        host_pid: p.host_pid,
                        cmd: p.cmd,
                    })
                    .collect();
                value(entries)
            }
            RequestBody::ResizePty(r) => {
                rt.resize(&r.container_id, r.exec_id.as_deref(), r.rows, r.cols)
                    .map_err(|e| chain(&e))?;
                value(Done {})
            }
            RequestBody::CloseStdin(p) => {
                let key = (p.container_id, p.exec_id);
                match self.stdins().remove(&key) {
                    Some(stdin) => stdin.close(),
                    None => {
                        // Unknown process, or one without stdin (or closed already): the
                        // runtime tells which when asked about the process.
                        rt.ps(&key.0).map_err(|e| chain(&e))?;
                    }
                }
                value(Done {})
            }
            RequestBody::DeleteContainer(c) => {
                rt.delete(&c.container_id).map_err(|e| chain(&e))?;
                self.stdins().retain(|(id, _), _| *id != c.container_id);
                value(Done {})
            }
            other => Err(format!(
                "Request {} is not a container request",
                other.name()
            )),
        }
    }

    fn open_streams(
        &self,
        key: (String, Option<String>),
        io: ProcessIo,
        request: StdioRequest,
        ctx: &RequestContext,
    ) -> Result<ProcessCreated, String> {
        let ProcessIo {
            stdin,
            stdout,
            stderr,
            pid,
        } = io;
        // With a terminal, input goes to the pty master too (the runtime's `stdin` is a
        // dup of it); without `stdin` asked for, the host gets no input stream.
        let stdin: Option<OwnedFd> = match (stdin, &stdout) {
            (Some(_), _) if request.terminal && !request.stdin => None,
            (Some(fd), _) => Some(fd),
            (None, Some(master)) if request.terminal && request.stdin => Some(
                master
                    .try_clone()
                    .map_err(|e| format!("Duplicating the terminal of {}: {e}", key.0))?,
            ),
            (None, _) => None,
        };
        let output = |fd: Option<OwnedFd>, name: &str| {
            fd.map(|fd| ctx.add_output(fd))
                .transpose()
                .map_err(|e| format!("Opening the {name} stream of {}: {e}", key.0))
        };
        let mut streams = StreamIds {
            stdout: output(stdout, "stdout")?,
            stderr: output(stderr, "stderr")?,
            stdin: None,
        };
        if let Some(fd) = stdin {
            let handle = ctx
                .add_input(fd)
                .map_err(|e| format!("Opening the stdin stream of {}: {e}", key.0))?;
            streams.stdin = Some(handle.id());
            self.stdins().insert(key, handle);
        }
        Ok(ProcessCreated { pid, streams })
    }
}
