/* A polled virtio-vsock driver that listens on one port (testguest.action=vsock):
 * accepts host connections to testguest.vsock_port (default 1024) with OP_RESPONSE,
 * refuses every other port with OP_RST, echoes the bytes of accepted connections back,
 * and reports resets and shutdowns from the host. It serves packets forever (the test
 * stops the VM); every event is one console line, see README.md. */
#include "bootparams.h"
#include "devices.h"
#include "io.h"
#include "lib.h"
#include "serial.h"
#include "virtio.h"

#define VIRTIO_ID_VSOCK 19
#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define HDR_LEN 44
#define RX_BUFS 4
#define BUF_SIZE 4096
#define GUEST_BUF_ALLOC 65536
#define WAIT_SPINS 2000000000ull

struct vsock_hdr {
    uint64_t src_cid;
    uint64_t dst_cid;
    uint32_t src_port;
    uint32_t dst_port;
    uint32_t len;
    uint16_t type;
    uint16_t op;
    uint32_t flags;
    uint32_t buf_alloc;
    uint32_t fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct vsock_hdr) == HDR_LEN, "virtio_vsock_hdr is 44 bytes");

static struct virtq rxq, txq, evq;
static uint8_t rx_buf[RX_BUFS][BUF_SIZE] __attribute__((aligned(64)));
static uint8_t tx_buf[BUF_SIZE] __attribute__((aligned(64)));
static uint64_t guest_cid;
static uint32_t fwd_cnt; /* bytes received, all connections (the test runs one at a time) */

static void put_kv(const char *key, uint64_t v)
{
    char num[21];
    serial_puts(key);
    serial_puts(utoa(v, num));
}

static void post_rx(uint16_t i)
{
    rxq.desc[i].addr = (uint64_t)rx_buf[i];
    rxq.desc[i].len = BUF_SIZE;
    rxq.desc[i].flags = VIRTQ_DESC_F_WRITE;
    virtq_submit(&rxq, i);
}

/* Sends `op` from our `port` to the host's `peer` port, with `len` bytes of payload. */
static int reply(uint16_t op, uint32_t port, uint32_t peer, const uint8_t *payload, uint32_t len)
{
    struct vsock_hdr h = {
        .src_cid = guest_cid,
        .dst_cid = HOST_CID,
        .src_port = port,
        .dst_port = peer,
        .len = len,
        .type = TYPE_STREAM,
        .op = op,
        .buf_alloc = GUEST_BUF_ALLOC,
        .fwd_cnt = fwd_cnt,
    };
    uint32_t used;
    memcpy(tx_buf, &h, HDR_LEN);
    if (len)
        memcpy(tx_buf + HDR_LEN, payload, len);
    txq.desc[0].addr = (uint64_t)tx_buf;
    txq.desc[0].len = HDR_LEN + len;
    txq.desc[0].flags = 0;
    virtq_submit(&txq, 0);
    return virtq_wait_used(&txq, &used, WAIT_SPINS) == 0 ? 0 : -1;
}

static void packet(const struct vsock_hdr *h, const uint8_t *payload, uint32_t len,
                   uint32_t listen_port)
{
    if (h->type != TYPE_STREAM || h->dst_cid != guest_cid)
        return;
    switch (h->op) {
    case OP_REQUEST:
        if (h->dst_port == listen_port) {
            reply(OP_RESPONSE, h->dst_port, h->src_port, 0, 0);
            serial_puts("testguest: vsock: accepted");
        } else {
            reply(OP_RST, h->dst_port, h->src_port, 0, 0);
            serial_puts("testguest: vsock: refused");
        }
        put_kv(" port ", h->dst_port);
        put_kv(" from ", h->src_cid);
        put_kv(":", h->src_port);
        serial_puts("\n");
        break;
    case OP_RW:
        if (len > h->len)
            len = h->len;
        fwd_cnt += len;
        put_kv("testguest: vsock: got ", len);
        put_kv(" bytes from ", h->src_cid);
        put_kv(":", h->src_port);
        serial_puts("\n");
        reply(OP_RW, h->dst_port, h->src_port, payload, len);
        break;
    case OP_RST:
        put_kv("testguest: vsock: reset by ", h->src_cid);
        put_kv(":", h->src_port);
        serial_puts("\n");
        break;
    case OP_SHUTDOWN:
        put_kv("testguest: vsock: shutdown by ", h->src_cid);
        put_kv(":", h->src_port);
        serial_puts("\n");
        reply(OP_RST, h->dst_port, h->src_port, 0, 0);
        break;
    default:
        break; /* credit updates and requests: nothing to do at this size */
    }
}

int vsock_serve(const char *cmdline)
{
    struct virtio_dev dev;
    const char *v;
    size_t n;
    uint32_t listen_port = 1024;

    if (cmdline_get(cmdline, "testguest.vsock_port", &v, &n))
        listen_port = (uint32_t)parse_u64(v, n, listen_port);
    if (virtio_find(cmdline, VIRTIO_ID_VSOCK, &dev)) {
        serial_puts("testguest: vsock: no virtio-vsock device\n");
        return -1;
    }
    if (virtio_negotiate(&dev, 0, NULL)) {
        serial_puts("testguest: vsock: feature negotiation failed\n");
        return -1;
    }
    if (virtio_queue_setup(&dev, &rxq, 0) || virtio_queue_setup(&dev, &txq, 1) ||
        virtio_queue_setup(&dev, &evq, 2)) {
        serial_puts("testguest: vsock: queue setup failed\n");
        return -1;
    }
    if (virtio_driver_ok(&dev) & 0x40)
        return -1;
    for (unsigned i = 0; i < 8; i++)
        guest_cid |= (uint64_t)virtio_config8(&dev, i) << (8 * i);
    for (uint16_t i = 0; i < RX_BUFS; i++)
        post_rx(i);
    put_kv("testguest: vsock: cid=", guest_cid);
    put_kv(" listening on port ", listen_port);
    serial_puts("\n");
    for (;;) {
        uint32_t len;
        int id = virtq_wait_used(&rxq, &len, WAIT_SPINS);
        if (id < 0)
            continue;
        if (len >= HDR_LEN) {
            struct vsock_hdr h;
            memcpy(&h, rx_buf[id], HDR_LEN);
            packet(&h, rx_buf[id] + HDR_LEN, len - HDR_LEN, listen_port);
        }
        post_rx((uint16_t)id);
    }
}
