/* COM1 (16550 UART at port 0x3f8), polled: no interrupts. */
#ifndef TESTGUEST_SERIAL_H
#define TESTGUEST_SERIAL_H

#include <stddef.h>

void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, size_t n);
void serial_puts(const char *s);

#endif
