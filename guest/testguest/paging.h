/* 1:1 page tables for the first 4 GiB (the virtio-mmio windows are at 3 GiB). */
#ifndef TESTGUEST_PAGING_H
#define TESTGUEST_PAGING_H

void paging_init(void);

#endif
