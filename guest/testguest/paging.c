/* Page tables of our own: the VMM's identity map covers only the first GiB (like the one
 * a Linux boot loader sets up), but virtio-mmio windows sit at 3 GiB. These map the first
 * 4 GiB 1:1 with 2 MiB pages, the top GiB (the MMIO hole) uncached. */
#include <stdint.h>

#include "paging.h"

#define PTE_P 0x001
#define PTE_W 0x002
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS 0x080

static uint64_t pml4[512] __attribute__((aligned(4096)));
static uint64_t pdpt[512] __attribute__((aligned(4096)));
static uint64_t pd[4][512] __attribute__((aligned(4096)));

void paging_init(void)
{
    for (uint64_t g = 0; g < 4; g++) {
        uint64_t flags = PTE_P | PTE_W | PTE_PS | (g == 3 ? PTE_PCD | PTE_PWT : 0);
        for (uint64_t i = 0; i < 512; i++)
            pd[g][i] = (g << 30) | (i << 21) | flags;
        pdpt[g] = (uint64_t)pd[g] | PTE_P | PTE_W;
    }
    pml4[0] = (uint64_t)pdpt | PTE_P | PTE_W;
    /* Identity-mapped .bss: the virtual address is the physical one. */
    __asm__ volatile("mov %0, %%cr3" : : "r"((uint64_t)pml4) : "memory");
}
