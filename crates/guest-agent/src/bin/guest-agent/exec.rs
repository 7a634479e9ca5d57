//! `exec`: runs a program with a timeout and size-capped output.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use guest_agent::protocol::{ExecOutput, ExecRequest, EXEC_DEFAULT_TIMEOUT_MS, EXEC_OUTPUT_LIMIT};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long to wait for the output pipes to close once the program has exited.
/// A background process that keeps them open is left running; what was read
/// by then is returned.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// Runs `request.argv` in a new process group, stdin from /dev/null.
pub fn run(request: &ExecRequest) -> Result<ExecOutput, String> {
    let (program, args) = request
        .argv
        .split_first()
        .ok_or("Exec needs a non-empty argv")?;
    let timeout = Duration::from_millis(request.timeout_ms.unwrap_or(EXEC_DEFAULT_TIMEOUT_MS));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("Starting {program:?}: {e}"))?;
    let stdout = Capture::start(child.stdout.take());
    let stderr = Capture::start(child.stderr.take());

    let started = Instant::now();
    let mut poll = Duration::from_millis(1);
    let mut timed_out = false;
    let status = loop {
        match child
            .try_wait()
            .map_err(|e| format!("Waiting for {program:?}: {e}"))?
        {
            Some(status) => break status,
            None if started.elapsed() >= timeout => {
                timed_out = true;
                let pid = i32::try_from(child.id()).map_err(|e| e.to_string())?;
                // The group may already be gone; `wait` below reaps the child either way.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                break child
                    .wait()
                    .map_err(|e| format!("Waiting for {program:?}: {e}"))?;
            }
            None => {
                thread::sleep(poll);
                poll = (poll * 2).min(Duration::from_millis(20));
            }
        }
    };

    let drain_deadline = Instant::now() + DRAIN_GRACE;
    let (stdout, stdout_truncated) = stdout.finish(drain_deadline);
    let (stderr, stderr_truncated) = stderr.finish(drain_deadline);
    Ok(ExecOutput {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        stdout,
        stderr,
        truncated: stdout_truncated || stderr_truncated,
    })
}

#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
    done: bool,
}

/// Reads a pipe on a thread, keeping at most [`EXEC_OUTPUT_LIMIT`] bytes and
/// discarding the rest so the program never blocks on a full pipe.
struct Capture(Arc<Mutex<Captured>>);

impl Capture {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Self {
        let shared = Arc::new(Mutex::new(Captured::default()));
        let Some(mut pipe) = pipe else {
            shared.lock().unwrap_or_else(|e| e.into_inner()).done = true;
            return Capture(shared);
        };
        let writer = Arc::clone(&shared);
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut captured = writer.lock().unwrap_or_else(|e| e.into_inner());
                let room = EXEC_OUTPUT_LIMIT.saturating_sub(captured.bytes.len());
                captured.truncated |= n > room;
                captured.bytes.extend_from_slice(&buf[..n.min(room)]);
            }
            writer.lock().unwrap_or_else(|e| e.into_inner()).done = true;
        });
        Capture(shared)
    }

    /// Waits until the pipe closes or `deadline`, then returns the text so far.
    fn finish(self, deadline: Instant) -> (String, bool) {
        loop {
            let captured = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if captured.done || Instant::now() >= deadline {
                return (
                    String::from_utf8_lossy(&captured.bytes).into_owned(),
                    captured.truncated,
                );
            }
            drop(captured);
            thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(argv: &[&str], timeout_ms: Option<u64>) -> Result<ExecOutput, String> {
        run(&ExecRequest {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            timeout_ms,
        })
    }

    #[test]
    fn exec_reports_exit_code_and_both_outputs() {
        let out = exec(&["sh", "-c", "echo out; echo err >&2; exit 3"], None).unwrap();
        assert_eq!(
            (out.exit_code, out.signal, out.timed_out),
            (Some(3), None, false)
        );
        assert_eq!(
            (out.stdout.as_str(), out.stderr.as_str()),
            ("out\n", "err\n")
        );
        assert!(!out.truncated);
    }

    #[test]
    fn exec_past_its_timeout_is_killed() {
        let started = Instant::now();
        let out = exec(&["sleep", "5"], Some(100)).unwrap();
        assert!(out.timed_out);
        assert_eq!((out.exit_code, out.signal), (None, Some(9)));
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn exec_output_is_capped() {
        let out = exec(&["sh", "-c", "head -c 200000 /dev/zero"], None).unwrap();
        assert_eq!(out.stdout.len(), EXEC_OUTPUT_LIMIT);
        assert!(out.truncated);
        assert_eq!(out.exit_code, Some(0));
    }

    #[test]
    fn exec_of_missing_program_or_empty_argv_is_an_error() {
        assert!(exec(&["/nonexistent/program"], None)
            .unwrap_err()
            .starts_with("Starting"));
        assert!(exec(&[], None).is_err());
    }
}
