/* The test guest: boots like a vmlinux, reports on COM1, then does what its command line
 * asks (testguest.action=...) and ends the VM through the i8042 reset line, as a Linux
 * guest with reboot=k does. See README.md for the protocol the tests rely on. */
#include <stdint.h>

#include "bootparams.h"
#include "devices.h"
#include "io.h"
#include "lib.h"
#include "paging.h"
#include "serial.h"

#define I8042_COMMAND 0x64
#define I8042_CMD_RESET 0xfe

static void say(const char *s)
{
    serial_puts("testguest: ");
    serial_puts(s);
    serial_puts("\n");
}

static __attribute__((noreturn)) void i8042_reset(void)
{
    outb(I8042_COMMAND, I8042_CMD_RESET);
    /* The VMM stops the vCPUs; never run past the reset. */
    halt_forever();
}

static void spin(uint64_t loops)
{
    for (uint64_t i = 0; i < loops; i++)
        barrier();
}

/* Prints "testguest: tick N" every `loops` iterations, `count` times (0: forever). */
static void tick(uint64_t loops, uint64_t count)
{
    char num[21];
    for (uint64_t n = 1; count == 0 || n <= count; n++) {
        spin(loops);
        serial_puts("testguest: tick ");
        serial_puts(utoa(n, num));
        serial_puts("\n");
    }
}

/* An instruction the VMM cannot handle: #UD with no IDT escalates to a triple fault, which
 * KVM reports as KVM_EXIT_SHUTDOWN. */
static __attribute__((noreturn)) void crash(void)
{
    __asm__ volatile("ud2");
    halt_forever();
}

void tg_main(const uint8_t *boot_params)
{
    char num[21];
    const char *cmdline = bp_cmdline(boot_params);
    const char *v;
    size_t n;

    paging_init();
    serial_init();
    say("hello from the test guest");
    serial_puts("testguest: cmdline=");
    serial_puts(cmdline);
    serial_puts("\n");
    serial_puts("testguest: e820 entries=");
    serial_puts(utoa(bp_e820_entries(boot_params), num));
    serial_puts("\n");

    if (cmdline_is(cmdline, "testguest.action", "hlt_forever")) {
        say("action=hlt_forever");
        halt_forever();
    }
    if (cmdline_is(cmdline, "testguest.action", "crash")) {
        say("action=crash (ud2 without an IDT)");
        crash();
    }
    if (cmdline_is(cmdline, "testguest.action", "tick")) {
        uint64_t loops = 100000, count = 0;
        if (cmdline_get(cmdline, "testguest.tick_loops", &v, &n))
            loops = parse_u64(v, n, loops);
        if (cmdline_get(cmdline, "testguest.ticks", &v, &n))
            count = parse_u64(v, n, count);
        say("action=tick");
        tick(loops, count);
    } else if (cmdline_is(cmdline, "testguest.action", "net_echo")) {
        say("action=net_echo");
        say(net_echo(cmdline) == 0 ? "net_echo done" : "net_echo failed");
    } else if (cmdline_is(cmdline, "testguest.action", "blk")) {
        say("action=blk");
        say(blk_test(cmdline) == 0 ? "blk done" : "blk failed");
    } else if (cmdline_is(cmdline, "testguest.action", "vsock")) {
        say("action=vsock");
        vsock_serve(cmdline);
        say("vsock failed");
    } else if (cmdline_is(cmdline, "testguest.action", "reset")) {
        say("action=reset");
    } else {
        say("action=poweroff");
    }
    say("powering off (i8042 reset)");
    i8042_reset();
}
