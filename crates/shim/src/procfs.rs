//! Processes as `/proc` shows them: a pid with its start time (so that a reused pid is not
//! taken for the process that was recorded), liveness, SIGKILL, and finding a sandbox's VMM
//! by its command line.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A process: its pid and its start time (field 22 of `/proc/PID/stat`, in clock ticks since
/// boot). Two processes with the same pid never have the same start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStamp {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks after boot.
    pub start_time: u64,
}

/// `PF_EXITING` in the kernel's per-task flags: the task has begun to exit.
const PF_EXITING: u64 = 0x4;

/// What `/proc/PID/stat` says of a process.
#[derive(Debug, PartialEq)]
struct Stat {
    /// State letter (field 3): `Z` for a zombie.
    state: char,
    /// Kernel flags (field 9).
    flags: u64,
    /// Start time (field 22).
    start_time: u64,
}

/// Parses a `/proc/PID/stat` line.
fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); flags are field 9, the start time field 22.
    let state = fields.next()?.chars().next()?;
    let flags = fields.nth(5)?.parse().ok()?;
    let start_time = fields.nth(12)?.parse().ok()?;
    Some(Stat {
        state,
        flags,
        start_time,
    })
}

/// `/proc/PID/stat` of `pid`, when it exists.
fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

impl ProcessStamp {
    /// The stamp of the running process `pid`.
    pub fn of(pid: u32) -> Option<ProcessStamp> {
        stat(pid).map(|s| ProcessStamp {
            pid,
            start_time: s.start_time,
        })
    }

    /// This process.
    pub fn current() -> ProcessStamp {
        ProcessStamp::of(std::process::id()).expect("/proc/self/stat is readable")
    }

    /// Whether this very process still exists (not exited, not a zombie, pid not reused); it
    /// may be exiting.
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start_time == self.start_time && s.state != 'Z')
    }

    /// Whether this very process runs and is not exiting. A process killed with SIGKILL
    /// closes its fds (its sockets) before it is a zombie: whoever saw its socket close may
    /// look before then, and must take it for dead.
    pub fn is_running(&self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start_time == self.start_time
            && s.state != 'Z'
            && s.flags & PF_EXITING == 0)
    }

    /// Sends SIGKILL if this very process still runs, and waits up to `limit` for it to be
    /// gone (or a zombie: its fds are closed by then), without blocking the runtime (a
    /// process in uninterruptible sleep may take a while). `Ok(true)` when it was killed.
    pub async fn kill(&self, limit: Duration) -> Result<bool, String> {
        if !self.is_alive() {
            return Ok(false);
        }
        let pid = i32::try_from(self.pid).map_err(|e| e.to_string())?;
        match kill(Pid::from_raw(pid), Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(format!("sending SIGKILL to process {}: {e}", self.pid)),
        }
        let began = Instant::now();
        while self.is_alive() {
            if began.elapsed() > limit {
                return Err(format!(
                    "process {} is still alive {limit:?} after SIGKILL",
                    self.pid
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(true)
    }
}

/// The argument vector of `pid`.
fn argv(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is the VMM of sandbox `id`: QEMU names it `-name sandbox-ID`.
fn is_vmm_of(pid: u32, id: &str) -> bool {
    let name = format!("sandbox-{id}");
    argv(pid)
        .windows(2)
        .any(|w| w[0] == "-name" && w[1] == name)
}

/// The VMM of sandbox `id` among this process's children, once it has been spawned.
pub fn child_vmm(id: &str) -> Option<ProcessStamp> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
            if is_vmm_of(pid, id) {
                if let Some(stamp) = ProcessStamp::of(pid) {
                    return Some(stamp);
                }
            }
        }
    }
    None
}

/// Running VMMs of sandbox `id` in the network namespace `netns`, started after `owner`
/// started: what a shim that died before it recorded its VMM's pid may have left.
pub fn find_vmms(id: &str, netns: &Path, owner: &ProcessStamp) -> Vec<ProcessStamp> {
    let Ok(ns) = std::fs::metadata(netns) else {
        return Vec::new();
    };
    let ns_inode = std::os::unix::fs::MetadataExt::ino(&ns);
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_vmm_of(*pid, id))
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == ns_inode)
        })
        .filter_map(ProcessStamp::of)
        .filter(|s| s.start_time >= owner.start_time && s.is_alive())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let me = ProcessStamp::current();
        assert!(me.is_alive() && me.is_running());
        let reused = ProcessStamp {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.is_alive() && !reused.is_running());
    }

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with spaces and parentheses; flags 0x404044 (PF_EXITING set).
        let line = "4242 (a (b) c) R 1 4242 4242 0 -1 4211012 0 0 0 0 1 2 0 0 20 0 3 0 987654 \
                    0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'R',
                flags: 4_211_012,
                start_time: 987_654
            })
        );
        assert_ne!(4_211_012 & PF_EXITING, 0);
    }

    #[tokio::test]
    async fn kill_ends_the_recorded_process_once() {
        let mut child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        let stamp = ProcessStamp::of(child.id()).unwrap();
        assert_eq!(stamp.kill(Duration::from_secs(10)).await, Ok(true));
        // A zombie until reaped: not alive, nothing more to kill.
        assert!(!stamp.is_alive());
        assert_eq!(stamp.kill(Duration::from_secs(10)).await, Ok(false));
        assert!(!child.wait().unwrap().success());
    }

    #[test]
    fn an_exited_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let stamp = ProcessStamp::of(child.id());
        child.wait().unwrap();
        if let Some(stamp) = stamp {
            assert!(!stamp.is_alive());
        }
    }
}
