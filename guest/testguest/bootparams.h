/* The parts of the zero page (struct boot_params, Documentation/arch/x86/zero-page.rst)
 * the test guest reads, and kernel command-line parsing. */
#ifndef TESTGUEST_BOOTPARAMS_H
#define TESTGUEST_BOOTPARAMS_H

#include <stddef.h>
#include <stdint.h>

#define BP_EXT_CMD_LINE_PTR 0x0c8 /* u32: high 32 bits of the command line address */
#define BP_E820_ENTRIES 0x1e8     /* u8 */
#define BP_HDR_BOOT_FLAG 0x1fe    /* u16: 0xaa55 */
#define BP_CMD_LINE_PTR 0x228     /* u32: low 32 bits of the command line address */
#define BP_CMDLINE_SIZE 0x238     /* u32 */

/* The NUL-terminated command line the VMM gave us, or "" if none. */
const char *bp_cmdline(const uint8_t *bp);
/* Number of e820 entries. */
unsigned bp_e820_entries(const uint8_t *bp);

/* Finds "key=value" in cmdline; points val and len at the value and returns 1, or returns 0. */
int cmdline_get(const char *cmdline, const char *key, const char **val, size_t *len);
/* True when the value of key equals want. */
int cmdline_is(const char *cmdline, const char *key, const char *want);

#endif
