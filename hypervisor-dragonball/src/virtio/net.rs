//! virtio-net on a TAP device opened by name with `dbs-utils`.
//!
//! # Host side
//!
//! The TAP must already exist in the sandbox's network namespace (the runtime or CNI
//! creates it; `netdev` in this workspace). [`NetDevice::open_backend`] runs on the `db-vmm`
//! thread, which has entered that namespace, and first checks that the interface exists
//! there (`if_nametoindex`): `TUNSETIFF` on a missing name would *create* a TAP, which then
//! nobody would delete, so a missing TAP is an error ([`Error::Device`]) naming the TAP and
//! the namespace. It then attaches with `dbs_utils::net::Tap::open_named` (which fails for an
//! interface that is not a TAP, or a multi-queue TAP), sets a 12-byte vnet header (the
//! virtio 1.x `virtio_net_hdr` with `num_buffers`), and brings the link up.
//!
//! # Guest side
//!
//! One RX and one TX queue (multi-queue is refused at `add_device`). Offered: VERSION_1,
//! MAC, MTU (when configured), checksum and TSO offloads in both directions. At activation
//! the TAP's offloads (`TUNSETOFFLOAD`) follow what the guest acknowledged, so the kernel
//! only hands the guest GSO frames or partial checksums it said it can take.
//!
//! # Events
//!
//! The TAP fd is in the event thread's epoll, edge-triggered. On readiness, or on an RX
//! queue notification (new buffers), frames are moved until the TAP reports `EAGAIN` or the
//! guest has no buffer left; a frame read while no buffer is free waits in `pending` for
//! the next RX notification. TX notifications write every available chain to the TAP.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;

use dbs_utils::net::Tap;
use hypervisor::MacAddress;
use slog::{debug, warn};
use vmm_sys_util::epoll::EventSet;

use super::{bit, read_config_bytes, QueueCtx, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};
use crate::error::{Error, Result};

/// Guest can handle partial checksums.
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// Guest accepts partial checksums from the device.
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// `mtu` in the configuration is valid.
pub const VIRTIO_NET_F_MTU: u32 = 3;
/// `mac` in the configuration is valid.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Guest takes TSOv4.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// Guest takes TSOv6.
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// Guest takes TSO with ECN.
pub const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
/// Device takes TSOv4.
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// Device takes TSOv6.
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// Device takes TSO with ECN.
pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
/// Multi-queue (not offered).
pub const VIRTIO_NET_F_MQ: u32 = 22;

/// `virtio_net_hdr` with `num_buffers`, the header size with VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (64 KiB GSO plus Ethernet header) with its vnet header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Index of the RX queue.
pub const RX: usize = 0;
/// Index of the TX queue.
pub const TX: usize = 1;

/// Frame counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames to the guest.
    pub rx_frames: u64,
    /// Frames from the guest.
    pub tx_frames: u64,
    /// Frames dropped (no room in the guest's buffer, TAP write error, bad chain).
    pub dropped: u64,
}

/// A virtio-net device on a TAP.
#[derive(Debug)]
pub struct NetDevice {
    tap_name: String,
    netns: Option<PathBuf>,
    mac: MacAddress,
    mtu: Option<u32>,
    queue_size: u16,
    tap: Option<Tap>,
    active: bool,
    pending: Option<usize>,
    buf: Vec<u8>,
    counters: NetCounters,
    log: slog::Logger,
}

impl NetDevice {
    /// A device for the TAP `tap_name` in `netns` (for messages: the caller's thread must be
    /// in it when [`open_backend`](VirtioDevice::open_backend) runs).
    pub fn new(
        tap_name: &str,
        netns: Option<PathBuf>,
        mac: MacAddress,
        mtu: Option<u32>,
        queue_size: Option<u16>,
        log: slog::Logger,
    ) -> NetDevice {
        NetDevice {
            tap_name: tap_name.to_string(),
            netns,
            mac,
            mtu,
            queue_size: queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            tap: None,
            active: false,
            pending: None,
            buf: vec![0; MAX_FRAME],
            counters: NetCounters::default(),
            log: log.new(slog::o!("device" => "virtio-net", "tap" => tap_name.to_string())),
        }
    }

    /// Frame counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    fn where_(&self) -> String {
        match &self.netns {
            Some(ns) => format!("network namespace {}", ns.display()),
            None => "the runtime's network namespace".into(),
        }
    }

    fn tap_error(&self, step: &str, e: impl std::fmt::Display) -> Error {
        Error::Device(format!(
            "{step} TAP {:?} in {}: {e}",
            self.tap_name,
            self.where_()
        ))
    }

    /// Moves frames from the TAP to the guest's RX buffers.
    fn rx(&mut self, ctx: &mut QueueCtx<'_>) {
        if !self.active {
            return;
        }
        let Some(tap) = self.tap.as_mut() else { return };
        let mut used = false;
        loop {
            let len = match self.pending {
                Some(n) => n,
                None => match tap.read(&mut self.buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!(self.log, "reading the TAP failed"; "error" => %e);
                        break;
                    }
                },
            };
            let q = &mut ctx.queues[RX];
            let chain = match q.pop(ctx.mem) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    // No buffer: keep the frame until the guest posts one.
                    self.pending = Some(len);
                    break;
                }
                Err(e) => {
                    warn!(self.log, "the RX queue is broken"; "error" => %e);
                    self.pending = Some(len);
                    break;
                }
            };
            self.pending = None;
            // The kernel leaves `num_buffers` alone; without MRG_RXBUF it is 1.
            self.buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = if chain.writable_len() < len {
                self.counters.dropped += 1;
                debug!(self.log, "frame larger than the guest's buffer dropped"; "len" => len);
                0
            } else {
                match chain.write_all(ctx.mem, &self.buf[..len]) {
                    Ok(n) => {
                        self.counters.rx_frames += 1;
                        n
                    }
                    Err(e) => {
                        warn!(self.log, "writing a frame to the guest failed"; "error" => %e);
                        self.counters.dropped += 1;
                        0
                    }
                }
            };
            if let Err(e) = q.add_used(ctx.mem, chain.head, written as u32) {
                warn!(self.log, "the RX used ring is broken"; "error" => %e);
                break;
            }
            used = true;
        }
        if used {
            ctx.notify_used(RX);
        }
    }

    /// Writes every frame the guest made available on TX to the TAP.
    fn tx(&mut self, ctx: &mut QueueCtx<'_>) {
        let Some(tap) = self.tap.as_mut() else { return };
        let mut used = false;
        loop {
            let q = &mut ctx.queues[TX];
            let chain = match q.pop(ctx.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    warn!(self.log, "the TX queue is broken"; "error" => %e);
                    break;
                }
            };
            match chain.read_all(ctx.mem, MAX_FRAME) {
                Ok(frame) if frame.len() > VNET_HDR_LEN => match tap.write(&frame) {
                    Ok(_) => self.counters.tx_frames += 1,
                    Err(e) => {
                        self.counters.dropped += 1;
                        debug!(self.log, "writing a frame to the TAP failed"; "error" => %e);
                    }
                },
                Ok(_) => self.counters.dropped += 1,
                Err(e) => {
                    self.counters.dropped += 1;
                    warn!(self.log, "reading a guest frame failed"; "error" => %e);
                }
            }
            if let Err(e) = q.add_used(ctx.mem, chain.head, 0) {
                warn!(self.log, "the TX used ring is broken"; "error" => %e);
                break;
            }
            used = true;
        }
        if used {
            ctx.notify_used(TX);
        }
    }
}

/// The TAP offloads (`TUN_F_*`) matching the guest's acknowledged features.
pub fn tap_offloads(acked: u64) -> libc::c_uint {
    let has = |f: u32| acked & bit(f) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size, self.queue_size]
    }

    fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN);
        if self.mtu.is_some() {
            f |= bit(VIRTIO_NET_F_MTU);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu.
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac.0);
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        let mtu = self.mtu.unwrap_or(1500).min(u32::from(u16::MAX)) as u16;
        cfg[10..12].copy_from_slice(&mtu.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn open_backend(&mut self) -> Result<()> {
        if nix::net::if_::if_nametoindex(self.tap_name.as_str()).is_err() {
            return Err(Error::Device(format!(
                "TAP {:?} does not exist in {}: this backend opens an existing TAP and does not create one (create it first, e.g. with the netdev crate)",
                self.tap_name,
                self.where_()
            )));
        }
        let tap = Tap::open_named(&self.tap_name, false)
            .map_err(|e| self.tap_error("Attaching to (not a single-queue TAP?)", e))?;
        tap.set_vnet_hdr_size(VNET_HDR_LEN as libc::c_int)
            .map_err(|e| self.tap_error("Setting the vnet header size of", e))?;
        tap.set_offload(0)
            .map_err(|e| self.tap_error("Clearing the offloads of", e))?;
        tap.enable().map_err(|e| self.tap_error("Bringing up", e))?;
        self.tap = Some(tap);
        Ok(())
    }

    fn activate(&mut self, acked: u64) -> std::result::Result<(), String> {
        let tap = self.tap.as_ref().ok_or("the TAP is not open")?;
        let flags = tap_offloads(acked);
        tap.set_offload(flags)
            .map_err(|e| format!("setting TAP offloads {flags:#x}: {e}"))?;
        debug!(self.log, "activated"; "features" => format!("{acked:#x}"), "offloads" => flags);
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = false;
        self.pending = None;
        if let Some(tap) = &self.tap {
            let _ = tap.set_offload(0);
        }
    }

    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        self.tap
            .iter()
            .map(|t| (t.as_raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED))
            .collect()
    }

    fn queue_event(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) {
        match queue {
            RX => self.rx(ctx),
            TX => self.tx(ctx),
            _ => {}
        }
    }

    fn backend_event(&mut self, _index: usize, ctx: &mut QueueCtx<'_>) {
        self.rx(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(mtu: Option<u32>) -> NetDevice {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        NetDevice::new(
            "tap0",
            None,
            "02:00:00:00:00:01".parse().unwrap(),
            mtu,
            None,
            log,
        )
    }

    #[test]
    fn config_space_has_the_mac_one_queue_pair_and_the_mtu() {
        let d = dev(Some(9000));
        let mut cfg = [0u8; 12];
        d.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);
        assert_ne!(d.features() & bit(VIRTIO_NET_F_MTU), 0);
        assert_eq!(dev(None).features() & bit(VIRTIO_NET_F_MTU), 0);
        assert_eq!(d.features() & bit(VIRTIO_NET_F_MQ), 0);
    }

    #[test]
    fn tap_offloads_follow_the_guest_features() {
        assert_eq!(tap_offloads(bit(VIRTIO_F_VERSION_1)), 0);
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)),
            0,
            "TSO needs CSUM"
        );
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        );
    }

    #[test]
    fn a_missing_tap_is_an_error_and_nothing_is_created() {
        let mut d = dev(None);
        d.tap_name = "dbmissing0".into();
        let err = d.open_backend().unwrap_err().to_string();
        assert!(err.contains("\"dbmissing0\" does not exist"), "{err}");
        assert!(nix::net::if_::if_nametoindex("dbmissing0").is_err());
    }
}
