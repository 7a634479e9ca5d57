/* A polled virtio-net driver. By default one RX and one TX queue, VIRTIO_F_VERSION_1 and
 * VIRTIO_NET_F_MAC only (no offloads: the header is the 12-byte virtio_net_hdr with
 * num_buffers, all zero on TX). Command-line options:
 *   testguest.net_pairs=N     negotiate VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ, set up N
 *                             pairs (at most NET_MAX_PAIRS) and enable them with
 *                             VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on the control queue
 *   testguest.net_offloads=1  also acknowledge GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, GUEST_ECN
 *   testguest.net_echoes=K    echo K frames instead of one */
#include "bootparams.h"
#include "devices.h"
#include "io.h"
#include "lib.h"
#include "serial.h"
#include "virtio.h"

#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_GUEST_TSO4 7
#define VIRTIO_NET_F_GUEST_TSO6 8
#define VIRTIO_NET_F_GUEST_ECN 9
#define VIRTIO_NET_F_CTRL_VQ 17
#define VIRTIO_NET_F_MQ 22
#define VIRTIO_NET_CTRL_MQ 4
#define VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0
#define CONFIG_MAX_PAIRS 8 /* offset of max_virtqueue_pairs in virtio_net_config */

#define NET_MAX_PAIRS 4
#define VNET_HDR 12
#define BUF_SIZE 2048
#define ETHERTYPE 0x88b5
#define RX_BUFS 4
/* Polls of the used ring before giving up (the host answers in far fewer). */
#define WAIT_SPINS 2000000000ull

static struct virtq rxq[NET_MAX_PAIRS], txq[NET_MAX_PAIRS], ctrlq;
static uint8_t rx_buf[NET_MAX_PAIRS][RX_BUFS][BUF_SIZE] __attribute__((aligned(64)));
static uint8_t tx_buf[BUF_SIZE] __attribute__((aligned(64)));
static uint8_t ctrl_buf[8] __attribute__((aligned(8)));

static const char hello[] = "testguest hello";

static void put_mac(const uint8_t *m)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 6; i++) {
        serial_putc(hex[m[i] >> 4]);
        serial_putc(hex[m[i] & 15]);
        if (i < 5)
            serial_putc(':');
    }
}

static void put_kv(const char *key, uint64_t v)
{
    char num[21];
    serial_puts(key);
    serial_puts(utoa(v, num));
}

static void post_rx(unsigned pair, uint16_t i)
{
    struct virtq *q = &rxq[pair];
    q->desc[i].addr = (uint64_t)rx_buf[pair][i];
    q->desc[i].len = BUF_SIZE;
    q->desc[i].flags = VIRTQ_DESC_F_WRITE;
    virtq_submit(q, i);
}

static int send(unsigned pair, const uint8_t *frame, size_t len)
{
    struct virtq *q = &txq[pair];
    uint32_t used;
    memset(tx_buf, 0, VNET_HDR);
    memcpy(tx_buf + VNET_HDR, frame, len);
    q->desc[0].addr = (uint64_t)tx_buf;
    q->desc[0].len = (uint32_t)(VNET_HDR + len);
    q->desc[0].flags = 0;
    virtq_submit(q, 0);
    return virtq_wait_used(q, &used, WAIT_SPINS) == 0 ? 0 : -1;
}

/* VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: returns the device's ack (0 OK), or -1 on timeout. */
static int set_pairs(unsigned pairs)
{
    uint32_t used;
    ctrl_buf[0] = VIRTIO_NET_CTRL_MQ;
    ctrl_buf[1] = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET;
    ctrl_buf[2] = (uint8_t)pairs;
    ctrl_buf[3] = (uint8_t)(pairs >> 8);
    ctrl_buf[4] = 0xff; /* the ack, written by the device */
    ctrlq.desc[0].addr = (uint64_t)ctrl_buf;
    ctrlq.desc[0].len = 4;
    ctrlq.desc[0].flags = VIRTQ_DESC_F_NEXT;
    ctrlq.desc[0].next = 1;
    ctrlq.desc[1].addr = (uint64_t)&ctrl_buf[4];
    ctrlq.desc[1].len = 1;
    ctrlq.desc[1].flags = VIRTQ_DESC_F_WRITE;
    virtq_submit(&ctrlq, 0);
    if (virtq_wait_used(&ctrlq, &used, WAIT_SPINS) != 0)
        return -1;
    barrier();
    return ((volatile uint8_t *)ctrl_buf)[4];
}

static uint64_t option(const char *cmdline, const char *key, uint64_t def)
{
    const char *v;
    size_t n;
    return cmdline_get(cmdline, key, &v, &n) ? parse_u64(v, n, def) : def;
}

/* Waits for the next frame with our ethertype on any RX queue; reposts others. Returns
 * the pair it came on and points *frame, *len at it (its buffer is not reposted). */
static int wait_frame(unsigned pairs, uint8_t **frame, size_t *len, uint16_t *buf)
{
    for (uint64_t spin = 0; spin < WAIT_SPINS; spin++) {
        for (unsigned p = 0; p < pairs; p++) {
            uint32_t used;
            int id = virtq_wait_used(&rxq[p], &used, 0);
            if (id < 0)
                continue;
            uint8_t *f = rx_buf[p][id] + VNET_HDR;
            size_t flen = used > VNET_HDR ? used - VNET_HDR : 0;
            if (flen < 14 || f[12] != (ETHERTYPE >> 8) || f[13] != (ETHERTYPE & 0xff)) {
                /* Not ours (IPv6 neighbour discovery and the like): give the buffer back. */
                post_rx(p, (uint16_t)id);
                continue;
            }
            *frame = f;
            *len = flen;
            *buf = (uint16_t)id;
            return (int)p;
        }
        cpu_relax();
    }
    return -1;
}

int net_echo(const char *cmdline)
{
    struct virtio_dev dev;
    uint8_t mac[6], frame[64];
    char num[21];
    unsigned pairs = (unsigned)option(cmdline, "testguest.net_pairs", 1);
    uint64_t echoes = option(cmdline, "testguest.net_echoes", 1);
    uint32_t want = 1u << VIRTIO_NET_F_MAC, acked;

    if (pairs < 1 || pairs > NET_MAX_PAIRS) {
        serial_puts("testguest: net: testguest.net_pairs must be 1 to 4\n");
        return -1;
    }
    if (pairs > 1)
        want |= 1u << VIRTIO_NET_F_MQ | 1u << VIRTIO_NET_F_CTRL_VQ;
    if (option(cmdline, "testguest.net_offloads", 0))
        want |= 1u << VIRTIO_NET_F_GUEST_CSUM | 1u << VIRTIO_NET_F_GUEST_TSO4 |
                1u << VIRTIO_NET_F_GUEST_TSO6 | 1u << VIRTIO_NET_F_GUEST_ECN;
    if (virtio_find(cmdline, VIRTIO_ID_NET, &dev)) {
        serial_puts("testguest: net: no virtio-net device\n");
        return -1;
    }
    if (virtio_negotiate(&dev, want, &acked)) {
        serial_puts("testguest: net: feature negotiation failed\n");
        return -1;
    }
    serial_puts("testguest: net: features=0x");
    serial_puts(utohex(acked, num));
    serial_puts("\n");
    if (acked != want) {
        serial_puts("testguest: net: the device lacks features we asked for\n");
        return -1;
    }
    unsigned max_pairs = 1;
    if (pairs > 1) {
        max_pairs = virtio_config8(&dev, CONFIG_MAX_PAIRS) |
                    (unsigned)virtio_config8(&dev, CONFIG_MAX_PAIRS + 1) << 8;
        put_kv("testguest: net: max_virtqueue_pairs=", max_pairs);
        serial_puts("\n");
        if (max_pairs < pairs)
            return -1;
    }
    for (unsigned p = 0; p < pairs; p++) {
        if (virtio_queue_setup(&dev, &rxq[p], (uint16_t)(2 * p)) ||
            virtio_queue_setup(&dev, &txq[p], (uint16_t)(2 * p + 1))) {
            serial_puts("testguest: net: queue setup failed\n");
            return -1;
        }
    }
    /* The control queue follows all max_virtqueue_pairs pairs. */
    if (pairs > 1 && virtio_queue_setup(&dev, &ctrlq, (uint16_t)(2 * max_pairs))) {
        serial_puts("testguest: net: control queue setup failed\n");
        return -1;
    }
    uint32_t status = virtio_driver_ok(&dev);
    put_kv("testguest: net: status=", status);
    serial_puts("\n");
    if (status & 0x40)
        return -1;
    if (pairs > 1) {
        int ack = set_pairs(pairs);
        put_kv("testguest: net: pairs=", pairs);
        serial_puts(" ack=");
        serial_puts(ack < 0 ? "timeout" : utoa((uint64_t)ack, num));
        serial_puts("\n");
        if (ack != 0)
            return -1;
    }
    for (int i = 0; i < 6; i++)
        mac[i] = virtio_config8(&dev, (unsigned)i);
    serial_puts("testguest: net: mac=");
    put_mac(mac);
    serial_puts("\n");
    for (unsigned p = 0; p < pairs; p++)
        for (uint16_t i = 0; i < RX_BUFS; i++)
            post_rx(p, i);

    /* On every TX queue: broadcast, from us, local experimental ethertype, the hello
     * payload ("testguest hello" on pair 0, "testguest hello qN" on pair N). */
    for (unsigned p = 0; p < pairs; p++) {
        size_t len = 14 + sizeof(hello) - 1;
        memset(frame, 0xff, 6);
        memcpy(frame + 6, mac, 6);
        frame[12] = ETHERTYPE >> 8;
        frame[13] = ETHERTYPE & 0xff;
        memcpy(frame + 14, hello, sizeof(hello) - 1);
        if (p > 0) {
            frame[len++] = ' ';
            frame[len++] = 'q';
            frame[len++] = (uint8_t)('0' + p);
        }
        if (send(p, frame, len)) {
            serial_puts("testguest: net: TX timed out\n");
            return -1;
        }
        put_kv("testguest: net: sent hello on tx", p);
        serial_puts("\n");
    }

    for (uint64_t n = 0; n < echoes; n++) {
        uint8_t *f;
        size_t flen;
        uint16_t buf;
        int p = wait_frame(pairs, &f, &flen, &buf);
        if (p < 0) {
            serial_puts("testguest: net: RX timed out\n");
            return -1;
        }
        put_kv("testguest: net: received frame len=", flen);
        put_kv(" on rx", (uint64_t)p);
        serial_puts(" from ");
        put_mac(f + 6);
        serial_puts("\n");
        uint8_t echo[BUF_SIZE];
        if (flen > sizeof(echo))
            flen = sizeof(echo);
        memcpy(echo, f + 6, 6);
        memcpy(echo + 6, f, 6);
        memcpy(echo + 12, f + 12, flen - 12);
        post_rx((unsigned)p, buf);
        if (send((unsigned)p, echo, flen)) {
            serial_puts("testguest: net: TX timed out\n");
            return -1;
        }
        put_kv("testguest: net: echoed len=", flen);
        put_kv(" on tx", (uint64_t)p);
        serial_puts("\n");
    }
    return 0;
}
