//! Removing a sandbox from its record alone ([`crate::records`]): what `sandbox cleanup`
//! does for a sandbox whose shim died, what a forced teardown does, and the last sweep of
//! every teardown.
//!
//! In order: the VMM (SIGKILL, only if the recorded pid still names the recorded process;
//! also any VMM of that sandbox the shim spawned but died before recording), the pod
//! endpoints' qdiscs, filters and TAPs, the shim's TAPs, the owned namespace, the shared
//! directory's mounts (the container root filesystems bound under it, then itself), the
//! backend's run directory, the ready file, and the run directory with the record last, so
//! that an interrupted cleanup can run again. The run directory is never removed while
//! anything is mounted under it: that would delete the files of a bound root filesystem.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::mounts;
use crate::net;
use crate::procfs::{self, ProcessStamp};
use crate::records::{self, Existing, Record};
use crate::sandbox::state_dir;

/// How long a killed VMM may take to be gone.
const KILL_LIMIT: Duration = Duration::from_secs(10);
/// How long a TAP handed over as fds may take to go once its last fd closed.
const TAP_GONE_LIMIT: Duration = Duration::from_secs(2);

/// What a removal did.
#[derive(Debug, Default)]
pub struct Report {
    /// What was removed, as people read it.
    pub removed: Vec<String>,
    /// What could not be removed, and why.
    pub problems: Vec<String>,
}

/// Removes everything `record` lists that still exists, then `state_dir`.
pub async fn remove(record: &Record, state_dir: &Path) -> Report {
    let mut report = Report::default();
    kill_vmms(record, &mut report).await;
    for ep in &record.endpoints {
        if !ep.netns.exists() {
            continue;
        }
        // A TAP handed over as fds goes with its last one, after an RCU grace period (longer
        // while a VMM that shared its memory exits); until then it cannot be opened to be
        // deleted.
        if !ep.persistent {
            wait_tap_gone(&ep.netns, &ep.tap).await;
        }
        let detached = async {
            let ns = endpoint::NetnsHandle::connect(&ep.netns).await?;
            endpoint::detach_planned(&ns, &ep.plan()).await
        }
        .await;
        match detached {
            Ok(items) => report.removed.extend(
                items
                    .into_iter()
                    .map(|i| format!("{i} in {}", ep.netns.display())),
            ),
            Err(e) => report.problems.push(format!(
                "detaching pod interface {} from TAP {}: {:#}",
                ep.interface,
                ep.tap,
                anyhow::Error::from(e)
            )),
        }
    }
    for tap in &record.taps {
        remove_tap(tap, &mut report).await;
    }
    if let Some(ns) = record.netns.as_ref().filter(|n| n.owned) {
        if ns.path.exists() {
            let path = ns.path.clone();
            // An unmount: off the async workers.
            match net::blocking(move || netdev::delete_netns(&path)).await {
                Ok(Ok(())) => report
                    .removed
                    .push(format!("network namespace {}", ns.path.display())),
                // Gone meanwhile (a cancelled creation's namespace deleted itself).
                Ok(Err(netdev::Error::NetnsNotFound { .. })) => {}
                Ok(Err(e)) => report.problems.push(format!(
                    "deleting network namespace {}: {}",
                    ns.path.display(),
                    chain(e)
                )),
                Err(e) => report.problems.push(format!(
                    "deleting network namespace {}: {e:#}",
                    ns.path.display()
                )),
            }
        }
    }
    let mut mounted = false;
    for dir in record.shared_dir.iter().chain(&record.binds) {
        let dir = dir.clone();
        // Unmounts: off the async workers.
        match net::blocking(move || mounts::unmount_all_under(&dir)).await {
            Ok(Ok(done)) => report
                .removed
                .extend(done.iter().map(|p| format!("mount {}", p.display()))),
            Ok(Err(e)) => {
                mounted = true;
                report.problems.push(format!("{e:#}"));
            }
            Err(e) => {
                mounted = true;
                report.problems.push(format!("unmounting: {e:#}"));
            }
        }
    }
    if let Some(dir) = &record.backend_dir {
        remove_path(dir, "backend run directory", &mut report);
    }
    if let Some(ready) = &record.ready_file {
        remove_path(ready, "ready file", &mut report);
    }
    let left = mounts::mounts_under(state_dir);
    if mounted || !left.is_empty() {
        report.problems.push(format!(
            "run directory {} kept: mounts are left under it ({})",
            state_dir.display(),
            left.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return report;
    }
    remove_path(state_dir, "run directory", &mut report);
    report
}

async fn kill_vmms(record: &Record, report: &mut Report) {
    let mut vmms: Vec<ProcessStamp> = record.vmm.into_iter().collect();
    if let Some(ns) = &record.netns {
        for found in procfs::find_vmms(&record.id, &ns.path, &record.owner) {
            if !vmms.contains(&found) {
                vmms.push(found);
            }
        }
    }
    for vmm in vmms {
        match vmm.kill(KILL_LIMIT).await {
            Ok(true) => report
                .removed
                .push(format!("VMM process {} (killed)", vmm.pid)),
            Ok(false) => {}
            Err(e) => report.problems.push(e),
        }
    }
}

/// Waits up to [`TAP_GONE_LIMIT`] for TAP `name` in `netns` to go; a TAP that stays (or a
/// namespace that cannot be read) is left to the deletion that follows, which reports it.
async fn wait_tap_gone(netns: &Path, name: &str) {
    let Ok(handle) = net::connect(netns).await else {
        return;
    };
    let began = Instant::now();
    while began.elapsed() < TAP_GONE_LIMIT {
        match net::taps_in(&handle).await {
            Ok(taps) if taps.iter().any(|t| t == name) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            _ => return,
        }
    }
}

async fn remove_tap(tap: &records::TapRecord, report: &mut Report) {
    if !tap.netns.exists() {
        return;
    }
    let handle = match net::connect(&tap.netns).await {
        Ok(h) => h,
        Err(e) => {
            report
                .problems
                .push(format!("listing TAPs in {}: {e:#}", tap.netns.display()));
            return;
        }
    };
    // A TAP handed over as fds goes when its last fd closes, after an RCU grace period.
    let began = Instant::now();
    loop {
        match net::taps_in(&handle)
            .await
            .map(|all| all.contains(&tap.name))
        {
            Ok(false) => return,
            Ok(true) if tap.persistent || began.elapsed() > TAP_GONE_LIMIT => break,
            Ok(true) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => {
                report
                    .problems
                    .push(format!("listing TAPs in {}: {e:#}", tap.netns.display()));
                return;
            }
        }
    }
    match net::delete_tap(&tap.name, &tap.netns).await {
        Ok(()) => report
            .removed
            .push(format!("TAP {} in {}", tap.name, tap.netns.display())),
        Err(netdev::Error::TapNotFound { .. }) => {}
        Err(e) => report
            .problems
            .push(format!("deleting TAP {}: {}", tap.name, chain(e))),
    }
}

fn remove_path(path: &Path, what: &str, report: &mut Report) {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Ok(()) => report.removed.push(format!("{what} {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report
            .problems
            .push(format!("removing {what} {}: {e}", path.display())),
    }
}

/// An error with its causes, on one line.
pub fn chain(e: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

/// Removes the sandbox `id` if its shim is gone (what `sandbox cleanup` and containerd's
/// `delete` do): from its record, or, without one, its run directory (unmounted first). A
/// sandbox whose shim runs is left alone: the report is then empty, as when there is nothing.
pub async fn dead(run_root: &Path, id: &str) -> Result<Report> {
    let dir = state_dir(run_root, id);
    let mut report = Report::default();
    let parent = dir.parent().expect("a run directory has a parent");
    for stale in records::stale_claims(parent, id) {
        remove_path(&stale, "unfinished run directory", &mut report);
    }
    match records::existing(&dir) {
        Existing::None | Existing::Alive(_) => {}
        Existing::Dead(r) => {
            let done = remove(&r, &dir).await;
            report.removed.extend(done.removed);
            report.problems.extend(done.problems);
        }
        Existing::Unrecorded(why) => {
            // Claims are atomic with their record: a directory without one is no live
            // sandbox's, and lists nothing else to remove.
            eprintln!("sandbox {id}: no record ({why}); removing the run directory only");
            // Mounts under it (a shared directory) are the sandbox's: unmounted first, so
            // that the removal never reaches into a bound root filesystem.
            let under = dir.clone();
            match crate::net::blocking(move || mounts::unmount_all_under(&under)).await? {
                Ok(done) => report
                    .removed
                    .extend(done.iter().map(|p| format!("mount {}", p.display()))),
                Err(e) => bail!("Cleaning up sandbox {id}: {e:#} (run it again once fixed)"),
            }
            remove_path(&dir, "run directory", &mut report);
        }
    }
    Ok(report)
}

/// `sandbox cleanup --id ID`: removes a sandbox whose shim is gone, and prints what it
/// removed. Refuses while the owner runs; succeeds, saying so, when there is nothing.
pub async fn command(run_root: &Path, id: &str) -> Result<()> {
    if let Existing::Alive(r) = records::existing(&state_dir(run_root, id)) {
        bail!(
            "sandbox {id} is owned by a running shim (pid {}): stop it with SIGTERM (kill -TERM {}); it removes everything itself",
            r.owner.pid,
            r.owner.pid
        );
    }
    let report = dead(run_root, id).await?;
    if report.removed.is_empty() && report.problems.is_empty() {
        println!(
            "sandbox {id}: nothing to clean up (no run directory under {})",
            run_root.display()
        );
        return Ok(());
    }
    for item in &report.removed {
        println!("removed {item}");
    }
    if !report.problems.is_empty() {
        bail!(
            "Cleaning up sandbox {id}: {} (run it again once fixed)",
            report.problems.join("; ")
        );
    }
    println!("sandbox {id}: cleaned up");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory whose record is gone still has its shared directory and a bound root
    /// filesystem unmounted before it is removed: the bound files stay.
    #[tokio::test]
    async fn a_run_directory_without_a_record_is_unmounted_before_it_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let dir = state_dir(root.path(), "u");
        let shared = dir.join("shared");
        let src = root.path().join("rootfs");
        std::fs::create_dir_all(shared.join("c/rootfs")).unwrap();
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), "kept").unwrap();
        mounts::make_shared_mount_point(&shared).expect("mounting (needs root)");
        mounts::bind(&src, &shared.join("c/rootfs")).unwrap();

        command(root.path(), "u").await.unwrap();
        assert_eq!(
            mounts::mounts_under(root.path()),
            Vec::<std::path::PathBuf>::new()
        );
        assert!(!dir.exists(), "the run directory is left");
        assert_eq!(std::fs::read_to_string(src.join("f")).unwrap(), "kept");
    }
}
