//! virtio-net on a TAP device opened by name with `dbs-utils`.
//!
//! # Host side
//!
//! The TAP must already exist in the sandbox's network namespace (the runtime or CNI
//! creates it; `netdev` in this workspace). [`NetDevice::open_backend`] runs on the `db-vmm`
//! thread, which has entered that namespace, and first checks that the interface exists
//! there (`if_nametoindex`): `TUNSETIFF` on a missing name would *create* a TAP, which then
//! nobody would delete, so a missing TAP is an error ([`DeviceError::TapMissing`]) naming the TAP and
//! the namespace. It then attaches with `dbs_utils::net::Tap::open_named` (which fails for an
//! interface that is not a TAP, or whose queue mode differs: one queue pair needs a
//! single-queue TAP, more need an `IFF_MULTI_QUEUE` one), opens one queue fd per pair with
//! `Tap::into_mq_taps`, sets a 12-byte vnet header (the virtio 1.x `virtio_net_hdr` with
//! `num_buffers`), and brings the link up.
//!
//! # Guest side
//!
//! Queues `2i` and `2i + 1` are RX and TX of pair `i`. Offered: VERSION_1, MAC, MTU (when
//! configured), checksum and TSO offloads in both directions, and with more than one pair
//! `VIRTIO_NET_F_MQ` and the control queue it requires (`VIRTIO_NET_F_CTRL_VQ`, the last
//! queue, `2 * max_virtqueue_pairs`). At activation the TAP's offloads (`TUNSETOFFLOAD`)
//! follow what the guest acknowledged, so the kernel only hands the guest GSO frames or
//! partial checksums it said it can take.
//!
//! # Multi-queue
//!
//! Pair `i` uses TAP queue `i`. Until the driver enables more pairs with
//! `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`, and whenever it uses fewer than the maximum, the TAP
//! queues of unused pairs are detached (`IFF_DETACH_QUEUE`, through `netdev`), so the kernel
//! steers no frame to an RX queue the guest does not serve (virtio 1.x 5.1.6.5.5). A reset
//! detaches them again.
//!
//! # Events
//!
//! Every TAP queue fd is in the event thread's epoll, edge-triggered. On readiness, or on an
//! RX queue notification (new buffers), frames are moved until the TAP reports `EAGAIN` or
//! the guest has no buffer left; a frame read while no buffer is free waits in its pair's
//! `pending` slot for the next RX notification. TX notifications write every available
//! chain to the pair's TAP queue; control-queue notifications run the commands.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;

use dbs_utils::net::Tap;
use hypervisor::MacAddress;
use slog::{debug, info, warn};
use vmm_sys_util::epoll::EventSet;

use super::{bit, read_config_bytes, QueueCtx, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};
use crate::error::{DeviceError, Error, Result};

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
/// A control virtqueue exists.
pub const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
/// Multi-queue: `max_virtqueue_pairs` is valid, pairs are enabled through the control queue.
pub const VIRTIO_NET_F_MQ: u32 = 22;

/// Control class of multi-queue commands.
pub const VIRTIO_NET_CTRL_MQ: u8 = 4;
/// Multi-queue command: enable this many pairs (`le16`).
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// Control command acknowledgement: done.
pub const VIRTIO_NET_OK: u8 = 0;
/// Control command acknowledgement: refused.
pub const VIRTIO_NET_ERR: u8 = 1;

/// `virtio_net_hdr` with `num_buffers`, the header size with VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (64 KiB GSO plus Ethernet header) with its vnet header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Size of the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// Index of the first RX queue.
pub const RX: usize = 0;
/// Index of the first TX queue.
pub const TX: usize = 1;
/// Most queue pairs this device takes (each queue is a KVM ioeventfd).
pub const MAX_PAIRS: u16 = 16;

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

/// One pair's host side: its TAP queue, whether that queue is attached, and a frame read
/// from it that waits for a guest buffer.
struct PairBackend {
    tap: Tap,
    attached: bool,
    pending: Option<usize>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for PairBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairBackend")
            .field("fd", &self.tap.as_raw_fd())
            .field("attached", &self.attached)
            .field("pending", &self.pending)
            .finish()
    }
}

impl PairBackend {
    /// Attaches or detaches this TAP queue (`TUNSETQUEUE`), if it is not so already.
    fn set_attached(&mut self, on: bool) -> std::io::Result<()> {
        if self.attached == on {
            return Ok(());
        }
        // SAFETY: the fd belongs to `self.tap`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.tap.as_raw_fd()) };
        netdev::attach_queue(fd, on)?;
        self.attached = on;
        if !on {
            self.pending = None;
        }
        Ok(())
    }
}

/// A virtio-net device on a TAP.
#[derive(Debug)]
pub struct NetDevice {
    tap_name: String,
    netns: Option<PathBuf>,
    mac: MacAddress,
    mtu: Option<u32>,
    queue_size: u16,
    pairs: u16,
    backends: Vec<PairBackend>,
    enabled_pairs: u16,
    active: bool,
    counters: NetCounters,
    log: slog::Logger,
}

impl NetDevice {
    /// A device with `pairs` queue pairs (1 to [`MAX_PAIRS`]) for the TAP `tap_name` in
    /// `netns` (for messages: the caller's thread must be in it when
    /// [`open_backend`](VirtioDevice::open_backend) runs).
    pub fn new(
        tap_name: &str,
        netns: Option<PathBuf>,
        mac: MacAddress,
        mtu: Option<u32>,
        queue_size: Option<u16>,
        pairs: u16,
        log: slog::Logger,
    ) -> NetDevice {
        NetDevice {
            tap_name: tap_name.to_string(),
            netns,
            mac,
            mtu,
            queue_size: queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            pairs: pairs.clamp(1, MAX_PAIRS),
            backends: Vec::new(),
            enabled_pairs: 1,
            active: false,
            counters: NetCounters::default(),
            log: log.new(slog::o!("device" => "virtio-net", "tap" => tap_name.to_string())),
        }
    }

    /// Frame counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Queue pairs the driver has enabled (1 until it enables more through the control
    /// queue).
    pub fn enabled_pairs(&self) -> u16 {
        self.enabled_pairs
    }

    /// Index of the control queue, when there is one (more than one pair).
    pub fn ctrl_queue(&self) -> Option<usize> {
        (self.pairs > 1).then(|| 2 * usize::from(self.pairs))
    }

    fn tap_error(&self, step: &str, source: dbs_utils::net::TapError) -> Error {
        DeviceError::Tap {
            step: step.to_string(),
            tap: self.tap_name.clone(),
            netns: self.netns.clone(),
            source,
        }
        .into()
    }

    /// Attaches the TAP queues of the first `n` pairs and detaches the others.
    fn use_pairs(&mut self, n: u16) -> std::io::Result<()> {
        for (i, b) in self.backends.iter_mut().enumerate() {
            b.set_attached(i < usize::from(n))?;
        }
        self.enabled_pairs = n;
        Ok(())
    }

    /// Moves frames from pair `pair`'s TAP queue to its RX queue.
    fn rx(&mut self, pair: usize, ctx: &mut QueueCtx<'_>) {
        if !self.active || pair >= usize::from(self.enabled_pairs) {
            return;
        }
        let Some(b) = self.backends.get_mut(pair) else {
            return;
        };
        let queue = RX + 2 * pair;
        let mut used = false;
        loop {
            let len = match b.pending {
                Some(n) => n,
                None => match b.tap.read(&mut b.buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!(self.log, "reading the TAP failed"; "queue" => pair, "error" => %e);
                        break;
                    }
                },
            };
            let q = &mut ctx.queues[queue];
            let chain = match q.pop(ctx.mem) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    // No buffer: keep the frame until the guest posts one.
                    b.pending = Some(len);
                    break;
                }
                Err(e) => {
                    warn!(self.log, "the RX queue is broken"; "queue" => queue, "error" => %e);
                    b.pending = Some(len);
                    break;
                }
            };
            b.pending = None;
            // The kernel leaves `num_buffers` alone; without MRG_RXBUF it is 1.
            b.buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = if chain.writable_len() < len {
                self.counters.dropped += 1;
                debug!(self.log, "frame larger than the guest's buffer dropped"; "len" => len);
                0
            } else {
                match chain.write_all(ctx.mem, &b.buf[..len]) {
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
                warn!(self.log, "the RX used ring is broken"; "queue" => queue, "error" => %e);
                break;
            }
            used = true;
        }
        if used {
            ctx.notify_used(queue);
        }
    }

    /// Writes every frame the guest made available on pair `pair`'s TX queue to its TAP
    /// queue.
    fn tx(&mut self, pair: usize, ctx: &mut QueueCtx<'_>) {
        let Some(b) = self.backends.get_mut(pair) else {
            return;
        };
        let queue = TX + 2 * pair;
        let mut used = false;
        loop {
            let q = &mut ctx.queues[queue];
            let chain = match q.pop(ctx.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    warn!(self.log, "the TX queue is broken"; "queue" => queue, "error" => %e);
                    break;
                }
            };
            match chain.read_all(ctx.mem, MAX_FRAME) {
                Ok(frame) if frame.len() > VNET_HDR_LEN => match b.tap.write(&frame) {
                    Ok(_) => self.counters.tx_frames += 1,
                    Err(e) => {
                        self.counters.dropped += 1;
                        debug!(self.log, "writing a frame to the TAP failed"; "queue" => pair, "error" => %e);
                    }
                },
                Ok(_) => self.counters.dropped += 1,
                Err(e) => {
                    self.counters.dropped += 1;
                    warn!(self.log, "reading a guest frame failed"; "error" => %e);
                }
            }
            if let Err(e) = q.add_used(ctx.mem, chain.head, 0) {
                warn!(self.log, "the TX used ring is broken"; "queue" => queue, "error" => %e);
                break;
            }
            used = true;
        }
        if used {
            ctx.notify_used(queue);
        }
    }

    /// Runs the commands on the control queue, each acknowledged with one status byte.
    fn ctrl(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) {
        let mut used = false;
        loop {
            let chain = match ctx.queues[queue].pop(ctx.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    warn!(self.log, "the control queue is broken"; "error" => %e);
                    break;
                }
            };
            let ack = match chain.read_all(ctx.mem, 64) {
                Ok(cmd) => self.ctrl_command(&cmd),
                Err(e) => {
                    warn!(self.log, "reading a control command failed"; "error" => %e);
                    VIRTIO_NET_ERR
                }
            };
            let written = chain.write_all(ctx.mem, &[ack]).unwrap_or(0);
            if let Err(e) = ctx.queues[queue].add_used(ctx.mem, chain.head, written as u32) {
                warn!(self.log, "the control used ring is broken"; "error" => %e);
                break;
            }
            used = true;
        }
        if used {
            ctx.notify_used(queue);
        }
    }

    /// One control command (`class`, `command`, data); returns its acknowledgement.
    fn ctrl_command(&mut self, cmd: &[u8]) -> u8 {
        match cmd {
            [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, lo, hi, ..] => {
                let n = u16::from_le_bytes([*lo, *hi]);
                if n == 0 || n > self.pairs {
                    warn!(self.log, "the driver asked for an impossible number of queue pairs";
                        "asked" => n, "max" => self.pairs);
                    return VIRTIO_NET_ERR;
                }
                match self.use_pairs(n) {
                    Ok(()) => {
                        info!(self.log, "queue pairs enabled"; "pairs" => n);
                        VIRTIO_NET_OK
                    }
                    Err(e) => {
                        warn!(self.log, "attaching the TAP queues failed"; "pairs" => n, "error" => %e);
                        VIRTIO_NET_ERR
                    }
                }
            }
            _ => {
                debug!(self.log, "unsupported control command refused";
                    "command" => format!("{:02x?}", &cmd[..cmd.len().min(2)]));
                VIRTIO_NET_ERR
            }
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
        let mut sizes = vec![self.queue_size; 2 * usize::from(self.pairs)];
        if self.ctrl_queue().is_some() {
            sizes.push(CTRL_QUEUE_SIZE);
        }
        sizes
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
        if self.pairs > 1 {
            f |= bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu.
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac.0);
        cfg[8..10].copy_from_slice(&self.pairs.to_le_bytes());
        let mtu = self.mtu.unwrap_or(1500).min(u32::from(u16::MAX)) as u16;
        cfg[10..12].copy_from_slice(&mtu.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn open_backend(&mut self) -> Result<()> {
        if nix::net::if_::if_nametoindex(self.tap_name.as_str()).is_err() {
            return Err(DeviceError::TapMissing {
                tap: self.tap_name.clone(),
                netns: self.netns.clone(),
            }
            .into());
        }
        let multi = self.pairs > 1;
        let step = if multi {
            format!(
                "Attaching {} queues to (a multi-queue TAP is needed for {} queue pairs; is it single-queue?)",
                self.pairs, self.pairs
            )
        } else {
            "Attaching to (one queue pair needs a single-queue TAP; is it multi-queue?)".into()
        };
        let taps = Tap::open_named(&self.tap_name, multi)
            .and_then(|t| t.into_mq_taps(usize::from(self.pairs)))
            .map_err(|e| self.tap_error(&step, e))?;
        let first = &taps[0];
        first
            .set_vnet_hdr_size(VNET_HDR_LEN as libc::c_int)
            .map_err(|e| self.tap_error("Setting the vnet header size of", e))?;
        first
            .set_offload(0)
            .map_err(|e| self.tap_error("Clearing the offloads of", e))?;
        first
            .enable()
            .map_err(|e| self.tap_error("Bringing up", e))?;
        self.backends = taps
            .into_iter()
            .map(|tap| PairBackend {
                tap,
                attached: true,
                pending: None,
                buf: vec![0; MAX_FRAME],
            })
            .collect();
        // Only pair 0 until the driver enables more.
        self.use_pairs(1).map_err(|source| DeviceError::TapQueues {
            step: "Detaching the unused queues of",
            tap: self.tap_name.clone(),
            netns: self.netns.clone(),
            source,
        })?;
        Ok(())
    }

    fn activate(&mut self, acked: u64) -> std::result::Result<(), super::ActivateError> {
        if acked & bit(VIRTIO_NET_F_MQ) != 0 && acked & bit(VIRTIO_NET_F_CTRL_VQ) == 0 {
            return Err(super::ActivateError::MissingFeature {
                feature: "VIRTIO_NET_F_MQ",
                needs: "VIRTIO_NET_F_CTRL_VQ",
            });
        }
        let tap = &self
            .backends
            .first()
            .ok_or(super::ActivateError::BackendClosed("TAP"))?
            .tap;
        let flags = tap_offloads(acked);
        tap.set_offload(flags)
            .map_err(|source| super::ActivateError::TapOffloads { flags, source })?;
        debug!(self.log, "activated"; "features" => format!("{acked:#x}"), "offloads" => flags);
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = false;
        for b in &mut self.backends {
            b.pending = None;
        }
        if let Some(b) = self.backends.first() {
            let _ = b.tap.set_offload(0);
        }
        if let Err(e) = self.use_pairs(1) {
            warn!(self.log, "detaching the TAP queues at reset failed"; "error" => %e);
        }
    }

    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        self.backends
            .iter()
            .map(|b| (b.tap.as_raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED))
            .collect()
    }

    fn queue_event(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) {
        if Some(queue) == self.ctrl_queue() {
            self.ctrl(queue, ctx);
        } else if queue % 2 == RX {
            self.rx(queue / 2, ctx);
        } else {
            self.tx(queue / 2, ctx);
        }
    }

    fn backend_event(&mut self, index: usize, ctx: &mut QueueCtx<'_>) {
        self.rx(index, ctx);
    }
}

#[cfg(test)]
mod tests;
