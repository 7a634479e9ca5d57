/* A polled virtio-mmio (version 2) driver core: finds devices on the command line
 * (virtio_mmio.device=SIZE@ADDR:IRQ), negotiates features, and drives split virtqueues
 * in static memory (the guest runs identity-mapped, so addresses are physical). */
#ifndef TESTGUEST_VIRTIO_H
#define TESTGUEST_VIRTIO_H

#include <stdint.h>

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

#define VQ_SIZE 8
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* One queue: descriptor table, available and used rings, each in its own page. */
struct virtq {
    struct virtq_desc desc[VQ_SIZE] __attribute__((aligned(4096)));
    struct {
        uint16_t flags;
        uint16_t idx;
        uint16_t ring[VQ_SIZE];
        uint16_t used_event;
    } avail __attribute__((aligned(4096)));
    struct {
        uint16_t flags;
        uint16_t idx;
        struct {
            uint32_t id;
            uint32_t len;
        } ring[VQ_SIZE];
        uint16_t avail_event;
    } used __attribute__((aligned(4096)));
    uint16_t last_used;
    uint16_t index;
    uint64_t base; /* the device's register window */
};

struct virtio_dev {
    uint64_t base;
    unsigned irq;
    uint32_t device_id;
};

/* Finds the first virtio-mmio device with this device id; 0 on success. Prints what it
 * finds. */
int virtio_find(const char *cmdline, uint32_t device_id, struct virtio_dev *dev);
/* Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 plus those of `features_low` the device
 * offers, stored in *acked_low unless it is NULL), FEATURES_OK. Returns 0, or -1 when the
 * device refuses. */
int virtio_negotiate(const struct virtio_dev *dev, uint32_t features_low, uint32_t *acked_low);
/* Sets up queue `index` in `q`; returns 0 or -1. */
int virtio_queue_setup(const struct virtio_dev *dev, struct virtq *q, uint16_t index);
/* Sets DRIVER_OK; returns the status read back. */
uint32_t virtio_driver_ok(const struct virtio_dev *dev);
/* Makes the chain starting at descriptor `head` available and notifies the device. */
void virtq_submit(struct virtq *q, uint16_t head);
/* Waits (polling) for the next used element; returns its id and sets *len. Returns -1
 * after `spins` polls without one. */
int virtq_wait_used(struct virtq *q, uint32_t *len, uint64_t spins);
/* Reads a byte of the device's configuration space. */
uint8_t virtio_config8(const struct virtio_dev *dev, unsigned offset);

#endif
