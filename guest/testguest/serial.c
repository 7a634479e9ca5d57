#include "serial.h"
#include "io.h"
#include "lib.h"

#define COM1 0x3f8
#define REG_THR 0 /* transmit holding register (DLAB=0) */
#define REG_IER 1 /* interrupt enable */
#define REG_LCR 3 /* line control */
#define REG_MCR 4 /* modem control */
#define REG_LSR 5 /* line status */
#define LSR_THRE 0x20 /* transmit holding register empty */

void serial_init(void)
{
    outb(COM1 + REG_IER, 0x00); /* no interrupts: we poll */
    outb(COM1 + REG_LCR, 0x03); /* 8N1 */
    outb(COM1 + REG_MCR, 0x03); /* DTR, RTS */
}

void serial_putc(char c)
{
    /* Bounded wait: a UART that never drains must not hang the guest. */
    for (unsigned i = 0; i < 100000 && !(inb(COM1 + REG_LSR) & LSR_THRE); i++)
        cpu_relax();
    outb(COM1 + REG_THR, (uint8_t)c);
}

void serial_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n')
            serial_putc('\r');
        serial_putc(s[i]);
    }
}

void serial_puts(const char *s)
{
    serial_write(s, strlen(s));
}
