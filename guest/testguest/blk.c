/* A polled virtio-blk driver: reads testguest.blk_sectors= sectors (default 8) from
 * sector 0 and prints their FNV-1a 64 checksum, prints the device id (GET_ID), then
 * writes a pattern to sector testguest.blk_write= (if given) and prints the status. */
#include "devices.h"
#include "bootparams.h"
#include "io.h"
#include "lib.h"
#include "serial.h"
#include "virtio.h"

#define T_IN 0
#define T_OUT 1
#define T_GET_ID 8
#define MAX_SECTORS 16
#define WAIT_SPINS 2000000000ull

struct blk_req {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

static struct virtq q;
static struct blk_req req __attribute__((aligned(16)));
static uint8_t data[MAX_SECTORS * 512] __attribute__((aligned(512)));
static volatile uint8_t status_byte;

/* header, data (device-writable for reads and GET_ID), status. Returns the status. */
static int request(uint32_t type, uint64_t sector, uint32_t len)
{
    uint32_t used;
    req.type = type;
    req.reserved = 0;
    req.sector = sector;
    status_byte = 0xff;
    q.desc[0] = (struct virtq_desc){(uint64_t)&req, sizeof(req), VIRTQ_DESC_F_NEXT, 1};
    q.desc[1] = (struct virtq_desc){(uint64_t)data, len,
                                    (uint16_t)(VIRTQ_DESC_F_NEXT |
                                               (type == T_OUT ? 0 : VIRTQ_DESC_F_WRITE)),
                                    2};
    q.desc[2] = (struct virtq_desc){(uint64_t)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0};
    virtq_submit(&q, 0);
    if (virtq_wait_used(&q, &used, WAIT_SPINS) < 0)
        return -1;
    return status_byte;
}

static void say_num(const char *what, uint64_t v)
{
    char num[21];
    serial_puts("testguest: blk: ");
    serial_puts(what);
    serial_puts(utoa(v, num));
    serial_puts("\n");
}

int blk_test(const char *cmdline)
{
    struct virtio_dev dev;
    const char *v;
    size_t n;
    char num[21];
    uint64_t sectors = 8;

    if (cmdline_get(cmdline, "testguest.blk_sectors", &v, &n))
        sectors = parse_u64(v, n, sectors);
    if (sectors > MAX_SECTORS)
        sectors = MAX_SECTORS;
    if (virtio_find(cmdline, VIRTIO_ID_BLOCK, &dev)) {
        serial_puts("testguest: blk: no virtio-blk device\n");
        return -1;
    }
    if (virtio_negotiate(&dev, 1u << 5 /* VIRTIO_BLK_F_RO */, NULL) ||
        virtio_queue_setup(&dev, &q, 0) || (virtio_driver_ok(&dev) & 0x40)) {
        serial_puts("testguest: blk: device setup failed\n");
        return -1;
    }
    uint64_t capacity = 0;
    for (int i = 7; i >= 0; i--)
        capacity = (capacity << 8) | virtio_config8(&dev, (unsigned)i);
    say_num("capacity=", capacity);

    int st = request(T_IN, 0, (uint32_t)(sectors * 512));
    say_num("read status=", (uint64_t)(st < 0 ? 255 : st));
    if (st != 0)
        return -1;
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint64_t i = 0; i < sectors * 512; i++) {
        h ^= data[i];
        h *= 0x100000001b3ull;
    }
    serial_puts("testguest: blk: fnv1a=");
    serial_puts(utohex(h, num));
    serial_puts("\n");

    memset(data, 0, 20);
    st = request(T_GET_ID, 0, 20);
    data[20] = 0;
    serial_puts("testguest: blk: id=");
    serial_puts(st == 0 ? (const char *)data : "?");
    serial_puts("\n");

    if (cmdline_get(cmdline, "testguest.blk_write", &v, &n)) {
        uint64_t sector = parse_u64(v, n, 0);
        for (int i = 0; i < 512; i++)
            data[i] = (uint8_t)(i * 7 + 3);
        st = request(T_OUT, sector, 512);
        say_num("write status=", (uint64_t)(st < 0 ? 255 : st));
    }
    return 0;
}
