/* Entry point, as for a vmlinux under the x86-64 boot protocol: 64-bit mode, identity
 * paging, RSI = boot_params. Sets up a stack of our own (the loader's stack sits between
 * the zero page and the page tables and is tiny) and calls tg_main(boot_params). */
    .section .text.entry, "ax"
    .code64
    .global _start
_start:
    cli
    cld
    lea     stack_top(%rip), %rsp
    xor     %ebp, %ebp
    mov     %rsi, %rdi
    call    tg_main
1:  hlt
    jmp     1b

    .section .bss
    .balign 16
stack:
    .skip   65536
stack_top:

    .section .note.GNU-stack, "", @progbits
