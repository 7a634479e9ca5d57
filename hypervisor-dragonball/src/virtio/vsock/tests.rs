//! Unit tests of the virtio-vsock device.

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
