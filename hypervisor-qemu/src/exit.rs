//! QEMU's start-up and end: connecting to a QEMU that may die first, killing a QEMU whose
//! start was dropped, and the watcher that records why QEMU exited.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use hypervisor::{Error, ExitReason, Lifecycle, Result, VmExit};
use slog::{info, warn};

use crate::process::QemuProcess;
use crate::qmp::{QmpClient, QmpEvent, QmpEvents};
use crate::RunDir;

pub(crate) async fn connect_or_exit(run: &RunDir, child: &QemuProcess) -> Result<QmpClient> {
    let socket = run.qmp();
    let mut exited = child.exited.clone();
    let connected = tokio::select! {
        qmp = QmpClient::connect(&socket, Duration::from_secs(3600)) => qmp,
        _ = exited.wait_for(Option::is_some) => return Err(early_exit(child)),
    };
    match connected {
        Ok(q) => Ok(q),
        // QEMU closing the socket usually means it exited: report its own words.
        Err(_) if wait_exited(&mut child.exited.clone(), Duration::from_secs(2)).await => {
            Err(early_exit(child))
        }
        Err(e) => Err(Error::backend("Connecting to QEMU's QMP socket", e)),
    }
}

pub(crate) fn early_exit(child: &QemuProcess) -> Error {
    let status = (*child.exited.borrow()).unwrap_or_else(|| ExitStatus::from_raw(0));
    let output = child.output.text();
    let why = if output.trim().is_empty() {
        "it printed nothing".to_string()
    } else {
        output
    };
    Error::VmmExited(VmExit {
        reason: ExitReason::Crashed(format!("QEMU exited during start-up: {why}")),
        code: status.code(),
        signal: status.signal(),
    })
}

pub(crate) async fn wait_exited(
    exited: &mut tokio::sync::watch::Receiver<Option<ExitStatus>>,
    limit: Duration,
) -> bool {
    tokio::time::timeout(limit, exited.wait_for(Option::is_some))
        .await
        .is_ok()
}

pub(crate) async fn kill_and_reap(child: &QemuProcess) {
    if child.exited.borrow().is_none() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let mut exited = child.exited.clone();
    let _ = exited.wait_for(Option::is_some).await;
}

pub(crate) async fn vcpu_threads(qmp: &QmpClient, timeout: Duration) -> Vec<u32> {
    match qmp.execute("query-cpus-fast", None, timeout).await {
        Ok(v) => v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["thread-id"].as_u64())
            .map(|t| t as u32)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Kills QEMU if `start` is dropped after spawning it and before it returned (the caller
/// cancelled boot, or a stop came): the child's reaper task collects it. The lifecycle core
/// records the end.
pub(crate) struct KillOnDrop<'a> {
    pid: u32,
    exited: tokio::sync::watch::Receiver<Option<ExitStatus>>,
    log: &'a slog::Logger,
    armed: bool,
}

impl<'a> KillOnDrop<'a> {
    pub(crate) fn new(child: &QemuProcess, log: &'a slog::Logger) -> Self {
        KillOnDrop {
            pid: child.pid,
            exited: child.exited.clone(),
            log,
            armed: true,
        }
    }

    /// QEMU started: it is the exit watcher's now.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed && self.exited.borrow().is_none() {
            warn!(self.log, "start cancelled; killing QEMU"; "pid" => self.pid);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Watches QEMU until it exits, then records why. It reads QEMU's events meanwhile (so its
/// queue never grows) and keeps the reason of the last `SHUTDOWN`: QEMU exits 0 on a guest
/// power-off, on a `quit` and on SIGTERM alike, and only that event tells them apart.
pub(crate) fn spawn_exit_watch(
    life: Arc<Lifecycle>,
    child: &QemuProcess,
    events: QmpEvents,
    log: slog::Logger,
) {
    let mut exited = child.exited.clone();
    let output = child.output.clone();
    let status_known = child.status_known;
    tokio::spawn(async move {
        let mut events = Some(events);
        let mut shutdown = None;
        let status = loop {
            tokio::select! {
                s = exited.wait_for(Option::is_some) => match s {
                    Ok(s) => break (*s).expect("Some"),
                    Err(_) => return,
                },
                ev = next_event(&mut events) => match ev {
                    Some(ev) => note_shutdown(&mut shutdown, &ev),
                    None => events = None,
                },
            }
        };
        let stopping = life.is_stopping();
        if let (false, Some(mut rest)) = (stopping, events) {
            // QEMU wrote its last events before it exited: they are read once its socket's
            // end is (the connection closes right after).
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(ev) = rest.next().await {
                    note_shutdown(&mut shutdown, &ev);
                }
            })
            .await;
        }
        let reason = exit_reason(
            stopping,
            status,
            status_known,
            shutdown.as_deref(),
            &output.text(),
        );
        let exit = VmExit {
            reason,
            code: status.code().filter(|_| status_known),
            signal: status.signal().filter(|_| status_known),
        };
        info!(log, "QEMU exited"; "how" => exit.to_string(), "shutdown" => shutdown);
        life.finish(exit);
    });
}

/// The next event of `events`; never, once they ended.
async fn next_event(events: &mut Option<QmpEvents>) -> Option<QmpEvent> {
    match events {
        Some(e) => e.next().await,
        None => std::future::pending().await,
    }
}

fn note_shutdown(shutdown: &mut Option<String>, ev: &QmpEvent) {
    if ev.name == "SHUTDOWN" {
        *shutdown = Some(ev.data["reason"].as_str().unwrap_or("none").to_string());
    }
}

/// Why QEMU exited with `status`, given whether the runtime was `stopping` it and the reason
/// of its last `SHUTDOWN` event (QEMU 7.2: `guest-shutdown`, `guest-reset`, `guest-panic`;
/// `host-qmp-quit`, `host-signal`, `host-ui`, ...). A QEMU that failed after its SHUTDOWN
/// still reports the failure.
fn exit_reason(
    stopping: bool,
    status: ExitStatus,
    status_known: bool,
    shutdown: Option<&str>,
    output: &str,
) -> ExitReason {
    if stopping {
        return ExitReason::Stopped;
    }
    let clean = !status_known || status.code() == Some(0);
    match shutdown {
        Some("guest-shutdown" | "guest-reset" | "guest-panic") if clean => {
            return ExitReason::GuestShutdown
        }
        Some(host) if clean => {
            let why = match host {
                "host-qmp-quit" => "QEMU got a QMP quit that was not the runtime's stop".into(),
                "host-signal" => output
                    .lines()
                    .rev()
                    .find(|l| l.contains("terminating on signal"))
                    .map(|l| format!("QEMU got a termination signal ({})", l.trim()))
                    .unwrap_or_else(|| "QEMU got a termination signal".into()),
                other => format!("QEMU shut down, reason {other}"),
            };
            return ExitReason::HostRequest(why);
        }
        _ => {}
    }
    if !status_known {
        ExitReason::Crashed(
            "QEMU exited while re-attached; only its original parent can read its status".into(),
        )
    } else if status.signal().is_some() {
        ExitReason::Killed
    } else if status.code() == Some(0) {
        // No SHUTDOWN was seen (the monitor closed earlier): QEMU exits 0 only by shutting
        // down, most often for the guest.
        ExitReason::GuestShutdown
    } else {
        ExitReason::Crashed(output.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shutdown_event_tells_a_host_quit_and_a_signal_from_a_guest_power_off() {
        let ok = ExitStatus::from_raw(0);
        let reason = |shutdown, known| exit_reason(false, ok, known, shutdown, "");
        assert_eq!(
            reason(Some("guest-shutdown"), true),
            ExitReason::GuestShutdown
        );
        assert_eq!(reason(Some("guest-reset"), true), ExitReason::GuestShutdown);
        let ExitReason::HostRequest(why) = reason(Some("host-qmp-quit"), true) else {
            panic!("a quit behind the runtime's back is a host request");
        };
        assert!(why.contains("QMP quit"), "{why}");
        let signal = exit_reason(
            false,
            ok,
            true,
            Some("host-signal"),
            "qemu-system-x86_64: terminating on signal 15 from pid 42 (kill)",
        );
        let ExitReason::HostRequest(why) = signal else {
            panic!("SIGTERM to QEMU is a host request: {signal:?}");
        };
        assert!(why.contains("signal 15 from pid 42"), "{why}");
        // Re-attached: the event decides although the status is unknown.
        assert_eq!(
            reason(Some("guest-shutdown"), false),
            ExitReason::GuestShutdown
        );
        // The runtime's own stop, and a failure after the event, are not host requests.
        assert_eq!(
            exit_reason(true, ok, true, Some("host-qmp-quit"), ""),
            ExitReason::Stopped
        );
        let failed = ExitStatus::from_raw(1 << 8);
        assert!(matches!(
            exit_reason(false, failed, true, Some("host-qmp-quit"), "boom"),
            ExitReason::Crashed(t) if t == "boom"
        ));
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(
            exit_reason(false, killed, true, Some("guest-shutdown"), ""),
            ExitReason::Killed
        );
        // Without the event, as before.
        assert_eq!(reason(None, true), ExitReason::GuestShutdown);
    }
}
