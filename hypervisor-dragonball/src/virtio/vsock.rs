//! virtio-vsock with a "hybrid vsock" host side: a Unix socket instead of `AF_VSOCK`, as
//! Firecracker and Dragonball have it (no `/dev/vhost-vsock` is needed on the host).
//!
//! A host client connects to the socket at [`VsockDevice::socket_path`] and writes
//! `CONNECT <port>\n`. The device then queues a `VIRTIO_VSOCK_OP_REQUEST` from the host
//! (CID 2, a fresh local port) to the guest's `port`. When the guest answers with
//! `OP_RESPONSE`, the client reads `OK <local port>\n` and the socket becomes the byte
//! stream of the connection (`OP_RW` both ways); `OP_RST` or `OP_SHUTDOWN` from the guest,
//! or the client closing, end it. A line that is not `CONNECT <u32>` (or longer than 64
//! bytes) gets the connection closed at once, as in Firecracker.
//!
//! Host fds are in an epoll of the device's own (the listener level-triggered, connections
//! edge-triggered), whose fd the event thread polls. Credit: the device advertises a
//! 256 KiB receive buffer and does not yet hold back host data when the guest's advertised
//! credit is exhausted (a guest with smaller buffers could see drops).

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use slog::{debug, warn};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{bit, read_config_bytes, QueueCtx, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1};
use crate::error::{DeviceError, Error, Result};

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Stream sockets.
pub const VIRTIO_VSOCK_TYPE_STREAM: u16 = 1;
/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or reset.
pub const OP_RST: u16 = 3;
/// Orderly shutdown.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit update.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Credit request.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// Receive queue index.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;
/// Buffer space the host side advertises per connection.
pub const HOST_BUF_ALLOC: u32 = 256 * 1024;
/// First local port handed to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT` line accepted.
pub const MAX_CONNECT_LINE: usize = 64;
const QUEUE_SIZE: u16 = 256;
const TOKEN_LISTENER: u64 = u64::MAX;
/// Largest payload moved per packet.
const MAX_PAYLOAD: usize = 64 * 1024;

/// `struct virtio_vsock_hdr` (44 bytes, little-endian, packed).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// `VIRTIO_VSOCK_TYPE_STREAM`.
    pub type_: u16,
    /// `OP_*`.
    pub op: u16,
    /// Flags (shutdown bits).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed.
    pub fwd_cnt: u32,
}

// SAFETY: a packed struct of integers: every bit pattern is valid, there is no padding.
unsafe impl ByteValued for PacketHeader {}

/// Length of [`PacketHeader`].
pub const HDR_LEN: usize = std::mem::size_of::<PacketHeader>();

/// A stream packet header from the host (`local` port) to the guest (`peer` port).
pub fn header(guest_cid: u64, local: u32, peer: u32, op: u16, fwd_cnt: u32) -> PacketHeader {
    PacketHeader {
        src_cid: HOST_CID.to_le(),
        dst_cid: guest_cid.to_le(),
        src_port: local.to_le(),
        dst_port: peer.to_le(),
        len: 0,
        type_: VIRTIO_VSOCK_TYPE_STREAM.to_le(),
        op: op.to_le(),
        flags: 0,
        buf_alloc: HOST_BUF_ALLOC.to_le(),
        fwd_cnt: fwd_cnt.to_le(),
    }
}

/// Parses a `CONNECT <port>\n` line (without the newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[derive(Debug)]
enum ConnState {
    /// Reading the `CONNECT` line.
    Handshake(Vec<u8>),
    /// `OP_REQUEST` queued or sent; waiting for the guest.
    Requested { peer_port: u32 },
    /// Data flows.
    Established { peer_port: u32 },
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: ConnState,
    /// The stream may have data (edge seen, not yet read to `EAGAIN`).
    readable: bool,
    /// Bytes of guest data written to the host stream (our `fwd_cnt`).
    fwd_cnt: u32,
}

/// A virtio-vsock device whose host side is a Unix socket.
#[derive(Debug)]
pub struct VsockDevice {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: BTreeMap<u32, Conn>,
    next_port: u32,
    /// Packets (header, payload) waiting for an RX buffer.
    rx_pending: VecDeque<(PacketHeader, Vec<u8>)>,
    active: bool,
    log: slog::Logger,
}

impl VsockDevice {
    /// Binds the Unix socket at `path` for a guest with CID `guest_cid`.
    pub fn new(guest_cid: u32, path: &Path, log: slog::Logger) -> Result<VsockDevice> {
        let file_err = |step, source| Error::File {
            step,
            path: path.to_path_buf(),
            source,
        };
        let listener =
            UnixListener::bind(path).map_err(|e| file_err("Binding the hybrid vsock socket", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| file_err("Making the hybrid vsock socket non-blocking", e))?;
        let epoll = Epoll::new().map_err(|source| DeviceError::VsockEpoll {
            step: "Creating the vsock device's epoll",
            source,
        })?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(|source| DeviceError::VsockEpoll {
                step: "Polling the hybrid vsock socket",
                source,
            })?;
        Ok(VsockDevice {
            guest_cid: u64::from(guest_cid),
            path: path.to_path_buf(),
            listener,
            epoll,
            conns: BTreeMap::new(),
            next_port: FIRST_LOCAL_PORT,
            rx_pending: VecDeque::new(),
            active: false,
            log: log.new(slog::o!("device" => "virtio-vsock")),
        })
    }

    /// The Unix socket host clients connect to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Packets queued towards the guest and not yet delivered.
    pub fn pending_packets(&self) -> usize {
        self.rx_pending.len()
    }

    fn header(&self, local: u32, peer: u32, op: u16, fwd_cnt: u32) -> PacketHeader {
        header(self.guest_cid, local, peer, op, fwd_cnt)
    }

    /// Accepts clients, reads handshakes and host data; called when the epoll fd is ready.
    fn host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                warn!(self.log, "waiting on the vsock epoll failed"; "error" => %e);
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == TOKEN_LISTENER {
                self.accept_all();
            } else if let Some(c) = self.conns.get_mut(&(ev.data() as u32)) {
                c.readable = true;
            }
        }
        self.read_handshakes();
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let port = self.next_port;
                    self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
                    let ok = stream.set_nonblocking(true).is_ok()
                        && self
                            .epoll
                            .ctl(
                                ControlOperation::Add,
                                stream.as_raw_fd(),
                                EpollEvent::new(
                                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                                    u64::from(port),
                                ),
                            )
                            .is_ok();
                    if ok {
                        let conn = Conn {
                            stream,
                            state: ConnState::Handshake(Vec::new()),
                            readable: true,
                            fwd_cnt: 0,
                        };
                        self.conns.insert(port, conn);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(self.log, "accepting a hybrid vsock client failed"; "error" => %e);
                    return;
                }
            }
        }
    }

    fn read_handshakes(&mut self) {
        let mut requests = Vec::new();
        let mut closed = Vec::new();
        for (&local, c) in self.conns.iter_mut() {
            let ConnState::Handshake(line) = &mut c.state else {
                continue;
            };
            if !c.readable {
                continue;
            }
            let mut byte = [0u8; 1];
            // Byte by byte: data after the newline belongs to the guest, once connected.
            loop {
                match c.stream.read(&mut byte) {
                    Ok(0) => {
                        closed.push(local);
                        break;
                    }
                    Ok(_) if byte[0] == b'\n' => {
                        match parse_connect(line) {
                            Some(port) => requests.push((local, port)),
                            None => closed.push(local),
                        }
                        break;
                    }
                    Ok(_) => {
                        line.push(byte[0]);
                        if line.len() > MAX_CONNECT_LINE {
                            closed.push(local);
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        c.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed.push(local);
                        break;
                    }
                }
            }
        }
        for local in closed {
            debug!(self.log, "hybrid vsock client closed or sent a bad CONNECT line"; "local_port" => local);
            self.conns.remove(&local);
        }
        for (local, port) in requests {
            if let Some(c) = self.conns.get_mut(&local) {
                c.state = ConnState::Requested { peer_port: port };
            }
            debug!(self.log, "connection request to the guest"; "port" => port, "local_port" => local);
            let hdr = self.header(local, port, OP_REQUEST, 0);
            self.rx_pending.push_back((hdr, Vec::new()));
        }
    }

    /// Reads host data of established connections into `OP_RW` packets, while the guest
    /// has RX buffers.
    fn read_host_data(&mut self, ctx: &mut QueueCtx<'_>) {
        let mut closed = Vec::new();
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        for local in ports {
            loop {
                if !self.rx_pending.is_empty() {
                    self.deliver(ctx);
                    if !self.rx_pending.is_empty() {
                        return;
                    }
                }
                let Some(c) = self.conns.get_mut(&local) else {
                    break;
                };
                let ConnState::Established { peer_port } = c.state else {
                    break;
                };
                if !c.readable {
                    break;
                }
                let mut buf = vec![0u8; MAX_PAYLOAD];
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        closed.push((local, peer_port));
                        break;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        let hdr = PacketHeader {
                            len: (n as u32).to_le(),
                            ..header(self.guest_cid, local, peer_port, OP_RW, c.fwd_cnt)
                        };
                        self.rx_pending.push_back((hdr, buf));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        c.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed.push((local, peer_port));
                        break;
                    }
                }
            }
        }
        for (local, peer) in closed {
            self.conns.remove(&local);
            let hdr = self.header(local, peer, OP_RST, 0);
            self.rx_pending.push_back((hdr, Vec::new()));
        }
        self.deliver(ctx);
    }

    /// Moves queued packets into the guest's RX buffers.
    fn deliver(&mut self, ctx: &mut QueueCtx<'_>) {
        if !self.active {
            return;
        }
        let mut used = false;
        while let Some((hdr, payload)) = self.rx_pending.front() {
            let q = &mut ctx.queues[RXQ];
            let chain = match q.pop(ctx.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    warn!(self.log, "the vsock RX queue is broken"; "error" => %e);
                    break;
                }
            };
            let mut bytes = hdr.as_slice().to_vec();
            bytes.extend_from_slice(payload);
            if chain.writable_len() < bytes.len() {
                // Too small for this packet: give it back empty and stop.
                warn!(self.log, "vsock RX buffer too small"; "need" => bytes.len());
                let _ = q.add_used(ctx.mem, chain.head, 0);
                used = true;
                break;
            }
            let n = chain.write_all(ctx.mem, &bytes).unwrap_or(0);
            if q.add_used(ctx.mem, chain.head, n as u32).is_err() {
                break;
            }
            used = true;
            self.rx_pending.pop_front();
        }
        if used {
            ctx.notify_used(RXQ);
        }
    }

    /// Handles the packets the guest sent.
    fn process_tx(&mut self, ctx: &mut QueueCtx<'_>) {
        let mut used = false;
        loop {
            let q = &mut ctx.queues[TXQ];
            let chain = match q.pop(ctx.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    warn!(self.log, "the vsock TX queue is broken"; "error" => %e);
                    break;
                }
            };
            let bytes = chain
                .read_all(ctx.mem, HDR_LEN + MAX_PAYLOAD)
                .unwrap_or_default();
            let _ = q.add_used(ctx.mem, chain.head, 0);
            used = true;
            if bytes.len() < HDR_LEN {
                continue;
            }
            let hdr = ctx
                .mem
                .read_obj::<PacketHeader>(GuestAddress(chain.descriptors[0].addr))
                .unwrap_or_default();
            self.guest_packet(&hdr, &bytes[HDR_LEN..]);
        }
        if used {
            ctx.notify_used(TXQ);
        }
    }

    fn guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        let local = u32::from_le(hdr.dst_port);
        let peer = u32::from_le(hdr.src_port);
        let op = u16::from_le(hdr.op);
        if u64::from_le(hdr.dst_cid) != HOST_CID {
            return;
        }
        let Some(c) = self.conns.get_mut(&local) else {
            if op != OP_RST {
                let rst = self.header(local, peer, OP_RST, 0);
                self.rx_pending.push_back((rst, Vec::new()));
            }
            return;
        };
        match (op, &c.state) {
            (OP_RESPONSE, ConnState::Requested { peer_port }) if *peer_port == peer => {
                c.state = ConnState::Established { peer_port: peer };
                // A blocking write of a short line to a fresh socket cannot stall.
                if c.stream
                    .write_all(format!("OK {local}\n").as_bytes())
                    .is_err()
                {
                    self.conns.remove(&local);
                }
            }
            (OP_RW, ConnState::Established { .. }) => {
                let len = (u32::from_le(hdr.len) as usize).min(payload.len());
                if c.stream.write_all(&payload[..len]).is_ok() {
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(len as u32);
                }
            }
            (OP_RST | OP_SHUTDOWN, _) => {
                self.conns.remove(&local);
                if op == OP_SHUTDOWN {
                    let rst = self.header(local, peer, OP_RST, 0);
                    self.rx_pending.push_back((rst, Vec::new()));
                }
            }
            (OP_CREDIT_REQUEST, ConnState::Established { .. }) => {
                let fwd = c.fwd_cnt;
                let upd = self.header(local, peer, OP_CREDIT_UPDATE, fwd);
                self.rx_pending.push_back((upd, Vec::new()));
            }
            _ => {}
        }
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        bit(VIRTIO_F_VERSION_1)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _acked: u64) -> std::result::Result<(), super::ActivateError> {
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = false;
        self.conns.clear();
        self.rx_pending.clear();
    }

    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.epoll.as_raw_fd(), EventSet::IN)]
    }

    fn queue_event(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) {
        match queue {
            TXQ => {
                self.process_tx(ctx);
                self.read_host_data(ctx);
            }
            RXQ => self.read_host_data(ctx),
            _ => {}
        }
    }

    fn backend_event(&mut self, _index: usize, ctx: &mut QueueCtx<'_>) {
        self.host_events();
        self.read_host_data(ctx);
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests;
