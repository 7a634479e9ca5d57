//! The container's processes as `/proc` shows them: by PID namespace.

use std::fs;
use std::os::unix::fs::MetadataExt;

use super::ProcessInfo;

/// Identity of a PID namespace: the device and inode of its nsfs file.
pub(crate) type NsId = (u64, u64);

/// The PID namespace of `pid`, as seen by the agent.
pub(crate) fn pid_ns(pid: u32) -> std::io::Result<NsId> {
    let md = fs::metadata(format!("/proc/{pid}/ns/pid"))?;
    Ok((md.dev(), md.ino()))
}

/// The pid of `pid` in its innermost PID namespace (the last `NSpid` field).
fn ns_pid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

fn command(pid: u32) -> String {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        // A kernel thread or a zombie: its name in brackets, as ps shows it.
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        format!("[{}]", comm.trim_end())
    } else {
        args.join(" ")
    }
}

/// Host pids of every live process in the PID namespace `ns`.
pub(crate) fn pids_in(ns: NsId) -> std::io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit while we look: skip what vanished.
        if pid_ns(pid).is_ok_and(|n| n == ns) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// The processes of the PID namespace `ns`, with their pids inside it.
pub(crate) fn processes_in(ns: NsId) -> std::io::Result<Vec<ProcessInfo>> {
    Ok(pids_in(ns)?
        .into_iter()
        .filter_map(|host_pid| {
            Some(ProcessInfo {
                pid: ns_pid(host_pid)?,
                host_pid,
                cmd: command(host_pid),
            })
        })
        .collect())
}
