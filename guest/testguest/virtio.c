#include "virtio.h"
#include "io.h"
#include "lib.h"
#include "serial.h"

#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG 0x100

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8

#define MAGIC 0x74726976

static uint64_t parse_hex(const char *s, size_t n, size_t *used)
{
    uint64_t v = 0;
    size_t i = 0;
    if (n >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        i = 2;
    for (; i < n; i++) {
        char c = s[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else
            break;
        v = v * 16 + d;
    }
    *used = i;
    return v;
}

static uint32_t rd(uint64_t base, unsigned off)
{
    return mmio_read32(base + off);
}

static void wr(uint64_t base, unsigned off, uint32_t v)
{
    mmio_write32(base + off, v);
}

int virtio_find(const char *cmdline, uint32_t device_id, struct virtio_dev *dev)
{
    static const char key[] = "virtio_mmio.device=";
    const size_t klen = sizeof(key) - 1;
    const char *p = cmdline;
    char num[21];
    while (*p) {
        while (*p == ' ')
            p++;
        const char *word = p;
        while (*p && *p != ' ')
            p++;
        size_t wlen = (size_t)(p - word);
        if (wlen <= klen || memcmp(word, key, klen) != 0)
            continue;
        /* SIZE@ADDR:IRQ */
        const char *v = word + klen, *end = word + wlen, *at = v;
        while (at < end && *at != '@')
            at++;
        if (at == end)
            continue;
        size_t used;
        uint64_t base = parse_hex(at + 1, (size_t)(end - at - 1), &used);
        const char *colon = at + 1 + used;
        unsigned irq = 0;
        if (colon < end && *colon == ':')
            irq = (unsigned)parse_u64(colon + 1, (size_t)(end - colon - 1), 0);
        uint32_t magic = rd(base, REG_MAGIC), version = rd(base, REG_VERSION);
        uint32_t id = rd(base, REG_DEVICE_ID);
        serial_puts("testguest: virtio-mmio at 0x");
        serial_puts(utohex(base, num));
        serial_puts(" irq ");
        serial_puts(utoa(irq, num));
        serial_puts(" magic=0x");
        serial_puts(utohex(magic, num));
        serial_puts(" version=");
        serial_puts(utoa(version, num));
        serial_puts(" device=");
        serial_puts(utoa(id, num));
        serial_puts("\n");
        if (magic != MAGIC || version != 2 || id != device_id)
            continue;
        dev->base = base;
        dev->irq = irq;
        dev->device_id = id;
        return 0;
    }
    return -1;
}

int virtio_negotiate(const struct virtio_dev *dev, uint32_t features_low, uint32_t *acked_low)
{
    uint64_t b = dev->base;
    wr(b, REG_STATUS, 0);
    wr(b, REG_STATUS, STATUS_ACKNOWLEDGE);
    wr(b, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(b, REG_DEVICE_FEATURES_SEL, 1);
    uint32_t high = rd(b, REG_DEVICE_FEATURES);
    wr(b, REG_DEVICE_FEATURES_SEL, 0);
    uint32_t low = rd(b, REG_DEVICE_FEATURES);
    if (!(high & 1))
        return -1; /* no VIRTIO_F_VERSION_1 */
    wr(b, REG_DRIVER_FEATURES_SEL, 0);
    wr(b, REG_DRIVER_FEATURES, low & features_low);
    if (acked_low)
        *acked_low = low & features_low;
    wr(b, REG_DRIVER_FEATURES_SEL, 1);
    wr(b, REG_DRIVER_FEATURES, 1);
    wr(b, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(rd(b, REG_STATUS) & STATUS_FEATURES_OK))
        return -1;
    return 0;
}

int virtio_queue_setup(const struct virtio_dev *dev, struct virtq *q, uint16_t index)
{
    uint64_t b = dev->base;
    memset(q, 0, sizeof(*q));
    q->index = index;
    q->base = b;
    wr(b, REG_QUEUE_SEL, index);
    if (rd(b, REG_QUEUE_READY) != 0 || rd(b, REG_QUEUE_NUM_MAX) < VQ_SIZE)
        return -1;
    wr(b, REG_QUEUE_NUM, VQ_SIZE);
    uint64_t d = (uint64_t)q->desc, a = (uint64_t)&q->avail, u = (uint64_t)&q->used;
    wr(b, REG_QUEUE_DESC_LOW, (uint32_t)d);
    wr(b, REG_QUEUE_DESC_HIGH, (uint32_t)(d >> 32));
    wr(b, REG_QUEUE_DRIVER_LOW, (uint32_t)a);
    wr(b, REG_QUEUE_DRIVER_HIGH, (uint32_t)(a >> 32));
    wr(b, REG_QUEUE_DEVICE_LOW, (uint32_t)u);
    wr(b, REG_QUEUE_DEVICE_HIGH, (uint32_t)(u >> 32));
    wr(b, REG_QUEUE_READY, 1);
    return 0;
}

uint32_t virtio_driver_ok(const struct virtio_dev *dev)
{
    wr(dev->base, REG_STATUS,
       STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    return rd(dev->base, REG_STATUS);
}

void virtq_submit(struct virtq *q, uint16_t head)
{
    volatile uint16_t *idx = &q->avail.idx;
    q->avail.ring[*idx % VQ_SIZE] = head;
    barrier(); /* x86 keeps stores in order; stop the compiler reordering them */
    *idx = (uint16_t)(*idx + 1);
    barrier();
    mmio_write32(q->base + REG_QUEUE_NOTIFY, q->index);
}

int virtq_wait_used(struct virtq *q, uint32_t *len, uint64_t spins)
{
    volatile uint16_t *idx = &q->used.idx;
    for (uint64_t i = 0; *idx == q->last_used; i++) {
        if (i == spins)
            return -1;
        cpu_relax();
    }
    barrier();
    uint16_t slot = q->last_used % VQ_SIZE;
    q->last_used++;
    *len = q->used.ring[slot].len;
    return (int)q->used.ring[slot].id;
}

uint8_t virtio_config8(const struct virtio_dev *dev, unsigned offset)
{
    return *(volatile uint8_t *)(dev->base + REG_CONFIG + offset);
}
