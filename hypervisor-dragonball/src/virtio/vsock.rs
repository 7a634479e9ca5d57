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

    fn activate(&mut self, _acked: u64) -> std::result::Result<(), String> {
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
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(b"CONNECT 1 2"), None);
    }

    #[test]
    fn the_packet_header_is_44_bytes() {
        assert_eq!(HDR_LEN, 44);
    }

    use crate::virtio::queue::testing::{mem, publish_at, queue_at, set_desc_at, used_at};
    use crate::virtio::queue::VIRTQ_DESC_F_WRITE;
    use crate::virtio::{Interrupt, Queue};

    const RX_BASE: u64 = 0x1000;
    const TX_BASE: u64 = 0x4000;
    const EV_BASE: u64 = 0x7000;
    const RX_BUF: u64 = 0x2_0000;
    const TX_BUF: u64 = 0x3_0000;

    struct Rig {
        dev: VsockDevice,
        mem: crate::memory::GuestMem,
        queues: Vec<Queue>,
        irq: Interrupt,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        fn new() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let log = slog::Logger::root(slog::Discard, slog::o!());
            let mut dev = VsockDevice::new(3, &dir.path().join("v.sock"), log).unwrap();
            dev.activate(bit(VIRTIO_F_VERSION_1)).unwrap();
            let mem = mem();
            // Four RX buffers of 4 KiB.
            for i in 0..4u16 {
                let addr = RX_BUF + 0x1000 * u64::from(i);
                set_desc_at(&mem, RX_BASE, i, addr, 0x1000, VIRTQ_DESC_F_WRITE, 0);
            }
            publish_at(&mem, RX_BASE, 8, &[0, 1, 2, 3]);
            Rig {
                dev,
                mem,
                queues: vec![
                    queue_at(RX_BASE, 8),
                    queue_at(TX_BASE, 8),
                    queue_at(EV_BASE, 8),
                ],
                irq: Interrupt::unwired(),
                _dir: dir,
            }
        }

        fn ctx(&mut self) -> (&mut VsockDevice, QueueCtx<'_>) {
            (
                &mut self.dev,
                QueueCtx {
                    mem: &self.mem,
                    queues: &mut self.queues,
                    interrupt: &self.irq,
                },
            )
        }

        /// Waits (poll(2), no spinning) for the device's epoll fd, then serves it.
        fn serve_host(&mut self) {
            let fd = self.dev.backend_fds()[0].0;
            let outer = Epoll::new().unwrap();
            outer
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
                .unwrap();
            let mut ev = [EpollEvent::default()];
            let n = outer.wait(5000, &mut ev).unwrap();
            assert_eq!(n, 1, "the device's epoll fd did not become ready");
            let (dev, mut ctx) = self.ctx();
            dev.backend_event(0, &mut ctx);
        }

        fn rx_packet(&self, n: u16) -> (PacketHeader, Vec<u8>) {
            let (_, id, len) = used_at(&self.mem, RX_BASE, n);
            let addr = RX_BUF + 0x1000 * u64::from(id);
            let hdr: PacketHeader = self.mem.read_obj(GuestAddress(addr)).unwrap();
            let mut payload = vec![0u8; len as usize - HDR_LEN];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            (hdr, payload)
        }

        /// The guest sends `hdr` + `payload` on TX.
        fn guest_sends(&mut self, i: u16, hdr: PacketHeader, payload: &[u8]) {
            let addr = TX_BUF + 0x1000 * u64::from(i);
            self.mem.write_obj(hdr, GuestAddress(addr)).unwrap();
            self.mem
                .write_slice(payload, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            let len = (HDR_LEN + payload.len()) as u32;
            set_desc_at(&self.mem, TX_BASE, i, addr, len, 0, 0);
            publish_at(&self.mem, TX_BASE, 8, &[i]);
            let (dev, mut ctx) = self.ctx();
            dev.queue_event(TXQ, &mut ctx);
        }
    }

    fn guest_header(op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn connect_queues_a_request_and_the_guest_response_answers_ok_then_data_flows() {
        let mut rig = Rig::new();
        let mut client = UnixStream::connect(rig.dev.socket_path()).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        while rig
            .dev
            .conns
            .values()
            .all(|c| matches!(c.state, ConnState::Handshake(_)))
        {
            rig.serve_host();
        }
        let (req, _) = rig.rx_packet(0);
        let PacketHeader {
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            op,
            type_,
            ..
        } = req;
        assert_eq!(
            (src_cid, dst_cid, dst_port, op, type_),
            (2, 3, 1024, OP_REQUEST, 1)
        );
        assert!(src_port >= FIRST_LOCAL_PORT);
        assert_eq!(rig.irq.status() & crate::virtio::INT_VRING, 1);

        rig.guest_sends(0, guest_header(OP_RESPONSE, 1024, src_port, 0), b"");
        let mut line = [0u8; 32];
        let n = client.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {src_port}\n")
        );

        rig.guest_sends(1, guest_header(OP_RW, 1024, src_port, 5), b"hello");
        let mut got = [0u8; 5];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");

        client.write_all(b"from host").unwrap();
        let mut n = 1;
        loop {
            rig.serve_host();
            let (idx, _, _) = used_at(&rig.mem, RX_BASE, 0);
            if idx > n {
                break;
            }
            n = idx;
        }
        let (rw, payload) = rig.rx_packet(1);
        let (op, len) = (rw.op, rw.len);
        assert_eq!((op, len), (OP_RW, 9));
        assert_eq!(payload, b"from host");
    }

    #[test]
    fn a_bad_connect_line_closes_the_connection_and_queues_nothing() {
        let mut rig = Rig::new();
        for line in [&b"CONNECT x\n"[..], b"HELLO\n", &[b'A'; 100]] {
            let mut client = UnixStream::connect(rig.dev.socket_path()).unwrap();
            client.write_all(line).unwrap();
            client
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 8];
            loop {
                rig.serve_host();
                if rig.dev.conns.is_empty() {
                    break;
                }
            }
            // EOF, or a reset when the device closed with bytes of ours unread.
            match client.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => panic!("{line:?} was not refused: {other:?}"),
            }
        }
        assert_eq!(rig.dev.pending_packets(), 0);
        assert_eq!(used_at(&rig.mem, RX_BASE, 0).0, 0);
    }

    #[test]
    fn a_guest_reset_closes_the_client_and_a_client_close_resets_the_guest() {
        let mut rig = Rig::new();
        // The guest refuses the request: the client sees EOF and no OK line.
        let mut refused = UnixStream::connect(rig.dev.socket_path()).unwrap();
        refused.write_all(b"CONNECT 4000\n").unwrap();
        while rig.dev.pending_packets() == 0 && used_at(&rig.mem, RX_BASE, 0).0 == 0 {
            rig.serve_host();
        }
        let (req, _) = rig.rx_packet(0);
        let (local, op) = (req.src_port, req.op);
        assert_eq!(op, OP_REQUEST);
        rig.guest_sends(0, guest_header(OP_RST, 4000, local, 0), b"");
        assert!(rig.dev.conns.is_empty());
        refused
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(refused.read(&mut buf).unwrap(), 0, "expected EOF");

        // An established connection whose client goes away: OP_RST to the guest.
        let mut client = UnixStream::connect(rig.dev.socket_path()).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        while used_at(&rig.mem, RX_BASE, 0).0 < 2 {
            rig.serve_host();
        }
        let (req, _) = rig.rx_packet(1);
        let local = req.src_port;
        rig.guest_sends(1, guest_header(OP_RESPONSE, 1024, local, 0), b"");
        let mut ok = [0u8; 32];
        assert!(client.read(&mut ok).unwrap() > 0);
        drop(client);
        while used_at(&rig.mem, RX_BASE, 0).0 < 3 {
            rig.serve_host();
        }
        let (rst, _) = rig.rx_packet(2);
        let (op, src, dst) = (rst.op, rst.src_port, rst.dst_port);
        assert_eq!((op, src, dst), (OP_RST, local, 1024));
        assert!(rig.dev.conns.is_empty());
    }
}
