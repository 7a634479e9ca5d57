/* A second way in: the Xen PVH direct-boot ABI, which QEMU's `-kernel` uses for an ELF
 * that carries a XEN_ELFNOTE_PHYS32_ENTRY note. That entry runs in 32-bit protected mode
 * with paging off, flat segments and EBX = the physical address of struct hvm_start_info.
 * This stub builds what the 64-bit entry (_start, entered like a vmlinux) expects: a zero
 * page (struct boot_params) with the command line and the e820 map taken from the start
 * info, identity paging of the first GiB, long mode, and RSI = the zero page. The VMM of
 * this repository enters at the ELF entry point (_start) and never runs this code. */

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC 0x336ec578
/* struct hvm_start_info */
#define SI_MAGIC 0
#define SI_VERSION 4
#define SI_CMDLINE 24
#define SI_MEMMAP 40
#define SI_MEMMAP_ENTRIES 48
#define MEMMAP_ENTRY_SIZE 24
/* struct boot_params (see bootparams.h) */
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_HDR_BOOT_FLAG 0x1fe
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define E820_MAX 128
#define E820_ENTRY_SIZE 20

#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define CR4_PAE 0x20
#define CR0_PE_PG 0x80000001
#define PDE_P_W_PS 0x83
#define PTE_P_W 0x03

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                          /* namesz: "Xen\0" */
    .long 8                          /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .quad pvh_start                  /* physical = virtual: identity-linked */
    .balign 4

    .section .text.pvh, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    mov     %ebx, %ebp               /* struct hvm_start_info */
    cmpl    $HVM_START_MAGIC, SI_MAGIC(%ebp)
    jne     pvh_fail

    /* Zero page, cleared. */
    mov     $pvh_zero_page, %edi
    xor     %eax, %eax
    mov     $1024, %ecx
    rep stosl
    movw    $0xaa55, pvh_zero_page + BP_HDR_BOOT_FLAG
    mov     SI_CMDLINE(%ebp), %eax
    mov     %eax, pvh_zero_page + BP_CMD_LINE_PTR
    mov     SI_CMDLINE + 4(%ebp), %eax
    mov     %eax, pvh_zero_page + BP_EXT_CMD_LINE_PTR

    /* e820: the memory map exists from start info version 1 on. Its entries (addr, size,
     * type, reserved) hold e820's (addr, size, type) in their first 20 bytes. */
    cmpl    $1, SI_VERSION(%ebp)
    jb      2f
    mov     SI_MEMMAP_ENTRIES(%ebp), %ecx
    cmp     $E820_MAX, %ecx
    jbe     1f
    mov     $E820_MAX, %ecx
1:  mov     %cl, pvh_zero_page + BP_E820_ENTRIES
    mov     SI_MEMMAP(%ebp), %esi    /* below 4 GiB: the PVH ROM puts it there */
    mov     $pvh_zero_page + BP_E820_TABLE, %edi
3:  test    %ecx, %ecx
    jz      2f
    push    %ecx
    mov     $E820_ENTRY_SIZE / 4, %ecx
    rep movsl
    add     $MEMMAP_ENTRY_SIZE - E820_ENTRY_SIZE, %esi
    pop     %ecx
    dec     %ecx
    jmp     3b
2:
    /* Page tables: PML4[0] -> PDPT[0] -> PD of 512 2 MiB pages = the first GiB 1:1, as a
     * vmlinux boot loader provides (the guest maps the rest itself, see paging.c). */
    mov     $pvh_pml4, %edi
    xor     %eax, %eax
    mov     $3 * 1024, %ecx
    rep stosl
    mov     $pvh_pd, %edi
    mov     $PDE_P_W_PS, %eax
    xor     %ecx, %ecx
4:  mov     %eax, (%edi, %ecx, 8)
    add     $0x200000, %eax
    inc     %ecx
    cmp     $512, %ecx
    jb      4b
    movl    $pvh_pd + PTE_P_W, pvh_pdpt
    movl    $pvh_pdpt + PTE_P_W, pvh_pml4

    /* Long mode: PAE, CR3, EFER.LME, then paging on, and a far jump to 64-bit code. */
    lgdt    pvh_gdt_desc
    mov     %cr4, %eax
    or      $CR4_PAE, %eax
    mov     %eax, %cr4
    mov     $pvh_pml4, %eax
    mov     %eax, %cr3
    mov     $MSR_EFER, %ecx
    rdmsr
    or      $EFER_LME, %eax
    wrmsr
    mov     %cr0, %eax
    or      $CR0_PE_PG, %eax
    mov     %eax, %cr0
    ljmp    $0x08, $pvh_long

pvh_fail:
    hlt
    jmp     pvh_fail

    .code64
pvh_long:
    mov     $0x10, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     %eax, %fs
    mov     %eax, %gs
    mov     $pvh_zero_page, %esi
    jmp     _start

    .balign 8
pvh_gdt:
    .quad   0                        /* null */
    .quad   0x00af9a000000ffff       /* 0x08: 64-bit code */
    .quad   0x00cf92000000ffff       /* 0x10: data */
pvh_gdt_end:
pvh_gdt_desc:
    .word   pvh_gdt_end - pvh_gdt - 1
    .long   pvh_gdt

    .section .bss
    .balign 4096
pvh_pml4:
    .skip   4096
pvh_pdpt:
    .skip   4096
pvh_pd:
    .skip   4096
pvh_zero_page:
    .skip   4096

    .section .note.GNU-stack, "", @progbits
