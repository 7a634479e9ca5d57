//! Guest memory given back to the host: `reclaim_guest_freed_memory` (a virtio-balloon with
//! free page reporting) on a real QEMU guest, against the same guest without it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use workspace_tests::qemu::{device_ids, Kept, Qemu};
use workspace_tests::{Backend, GuestAssets, Sandbox};

/// What the guest writes to its RAM-backed /tmp and deletes, in MiB.
const WRITTEN_MIB: u64 = 96;

/// QEMU's private dirty memory, in MiB, from `/proc/PID/smaps_rollup`.
fn private_dirty_mib(pid: u32) -> Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let kib: u64 = rollup
        .lines()
        .find(|l| l.starts_with("Private_Dirty:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no Private_Dirty in smaps_rollup")?
        .parse()?;
    Ok(kib / 1024)
}

/// Boots the guest, has it write [`WRITTEN_MIB`] to its RAM-backed /tmp and delete it, and
/// returns QEMU's private dirty MiB before the write, right after the delete, and once it is
/// back near where it was (or `settle` passed), with QEMU's device ids:
/// `(before, after_free, settled, devices)`.
async fn write_and_free(reclaim: bool, settle: Duration) -> Result<(u64, u64, u64, Vec<String>)> {
    let assets = GuestAssets::find();
    let backend = Kept::new(Qemu::Q35);
    let mut config = backend.config(&assets);
    config.reclaim_guest_freed_memory = reclaim;
    let mut sb = Sandbox::prepare(&backend, config).await?;
    sb.start().await?;
    let pid = sb.hv.pids().await?.vmm;
    let devices = device_ids(&backend.hypervisor()).await?;
    let before = private_dirty_mib(pid)?;
    sb.guest_ok(&[
        "sh",
        "-c",
        &format!("dd if=/dev/zero of=/tmp/fill bs=1M count={WRITTEN_MIB} && rm /tmp/fill"),
    ])
    .await?;
    let after_free = private_dirty_mib(pid)?;
    // Free page reporting runs a couple of seconds after pages are freed: polled until the
    // memory is back near where it was, or `settle` ran out.
    let began = Instant::now();
    let mut settled = after_free;
    while began.elapsed() < settle {
        settled = private_dirty_mib(pid)?;
        if settled < before + WRITTEN_MIB / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sb.teardown(Some(pid)).await?;
    Ok((before, after_free, settled, devices))
}

/// With `reclaim_guest_freed_memory` the pages of a freed 96 MiB file go back to the host;
/// without it QEMU keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_guest_memory_goes_back_to_the_host_only_with_reclaim() {
    let (before, after_free, settled, devices) =
        write_and_free(true, Duration::from_secs(30)).await.unwrap();
    eprintln!(
        "reclaim on: QEMU Private_Dirty {before} MiB before, {after_free} MiB after the guest freed {WRITTEN_MIB} MiB, {settled} MiB once reported"
    );
    assert!(
        devices.iter().any(|d| d == "balloon0"),
        "no balloon0 among QEMU's devices: {devices:?}"
    );
    assert!(
        after_free >= before + WRITTEN_MIB / 2,
        "writing {WRITTEN_MIB} MiB in the guest did not show in QEMU ({before} -> {after_free} MiB)"
    );
    assert!(
        settled < before + WRITTEN_MIB / 4,
        "the freed memory did not go back to the host within 30 s ({before} -> {after_free} -> {settled} MiB)"
    );

    // The control: the same guest without the balloon keeps the pages.
    let (before, after_free, settled, devices) =
        write_and_free(false, Duration::from_secs(5)).await.unwrap();
    eprintln!(
        "reclaim off: QEMU Private_Dirty {before} MiB before, {after_free} MiB after the guest freed {WRITTEN_MIB} MiB, {settled} MiB 5 s later"
    );
    assert!(
        !devices.iter().any(|d| d == "balloon0"),
        "balloon0 without reclaim: {devices:?}"
    );
    assert!(
        settled >= before + WRITTEN_MIB / 2,
        "without the balloon QEMU gave the memory back too ({before} -> {settled} MiB): the first half proves nothing"
    );
}
