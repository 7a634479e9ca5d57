/* A polled virtio-net driver: one RX and one TX queue, VIRTIO_F_VERSION_1 and
 * VIRTIO_NET_F_MAC only (no offloads: the header is the 12-byte virtio_net_hdr with
 * num_buffers, all zero on TX). */
#include "devices.h"
#include "io.h"
#include "lib.h"
#include "serial.h"
#include "virtio.h"

#define VIRTIO_NET_F_MAC 5
#define VNET_HDR 12
#define BUF_SIZE 2048
#define ETHERTYPE 0x88b5
#define RX_BUFS 4
/* Polls of the used ring before giving up (the host answers in far fewer). */
#define WAIT_SPINS 2000000000ull

static struct virtq rxq, txq;
static uint8_t rx_buf[RX_BUFS][BUF_SIZE] __attribute__((aligned(64)));
static uint8_t tx_buf[BUF_SIZE] __attribute__((aligned(64)));

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

static void post_rx(uint16_t i)
{
    rxq.desc[i].addr = (uint64_t)rx_buf[i];
    rxq.desc[i].len = BUF_SIZE;
    rxq.desc[i].flags = VIRTQ_DESC_F_WRITE;
    virtq_submit(&rxq, i);
}

static int send(const uint8_t *frame, size_t len)
{
    uint32_t used;
    memset(tx_buf, 0, VNET_HDR);
    memcpy(tx_buf + VNET_HDR, frame, len);
    txq.desc[0].addr = (uint64_t)tx_buf;
    txq.desc[0].len = (uint32_t)(VNET_HDR + len);
    txq.desc[0].flags = 0;
    virtq_submit(&txq, 0);
    return virtq_wait_used(&txq, &used, WAIT_SPINS) == 0 ? 0 : -1;
}

int net_echo(const char *cmdline)
{
    struct virtio_dev dev;
    uint8_t mac[6], frame[64];
    char num[21];

    if (virtio_find(cmdline, VIRTIO_ID_NET, &dev)) {
        serial_puts("testguest: net: no virtio-net device\n");
        return -1;
    }
    if (virtio_negotiate(&dev, 1u << VIRTIO_NET_F_MAC)) {
        serial_puts("testguest: net: feature negotiation failed\n");
        return -1;
    }
    if (virtio_queue_setup(&dev, &rxq, 0) || virtio_queue_setup(&dev, &txq, 1)) {
        serial_puts("testguest: net: queue setup failed\n");
        return -1;
    }
    uint32_t status = virtio_driver_ok(&dev);
    serial_puts("testguest: net: status=");
    serial_puts(utoa(status, num));
    serial_puts("\n");
    if (status & 0x40)
        return -1;
    for (int i = 0; i < 6; i++)
        mac[i] = virtio_config8(&dev, (unsigned)i);
    serial_puts("testguest: net: mac=");
    put_mac(mac);
    serial_puts("\n");
    for (uint16_t i = 0; i < RX_BUFS; i++)
        post_rx(i);

    /* Broadcast, from us, local experimental ethertype, the hello payload. */
    memset(frame, 0xff, 6);
    memcpy(frame + 6, mac, 6);
    frame[12] = ETHERTYPE >> 8;
    frame[13] = ETHERTYPE & 0xff;
    memcpy(frame + 14, hello, sizeof(hello) - 1);
    if (send(frame, 14 + sizeof(hello) - 1)) {
        serial_puts("testguest: net: TX timed out\n");
        return -1;
    }
    serial_puts("testguest: net: sent hello\n");

    for (;;) {
        uint32_t len;
        int id = virtq_wait_used(&rxq, &len, WAIT_SPINS);
        if (id < 0) {
            serial_puts("testguest: net: RX timed out\n");
            return -1;
        }
        uint8_t *f = rx_buf[id] + VNET_HDR;
        size_t flen = len > VNET_HDR ? len - VNET_HDR : 0;
        if (flen < 14 || f[12] != (ETHERTYPE >> 8) || f[13] != (ETHERTYPE & 0xff)) {
            /* Not ours (IPv6 neighbour discovery and the like): give the buffer back. */
            post_rx((uint16_t)id);
            continue;
        }
        serial_puts("testguest: net: received frame len=");
        serial_puts(utoa(flen, num));
        serial_puts(" from ");
        put_mac(f + 6);
        serial_puts("\n");
        uint8_t echo[BUF_SIZE];
        if (flen > sizeof(echo))
            flen = sizeof(echo);
        memcpy(echo, f + 6, 6);
        memcpy(echo + 6, f, 6);
        memcpy(echo + 12, f + 12, flen - 12);
        if (send(echo, flen)) {
            serial_puts("testguest: net: TX timed out\n");
            return -1;
        }
        serial_puts("testguest: net: echoed len=");
        serial_puts(utoa(flen, num));
        serial_puts("\n");
        return 0;
    }
}
