/* The few C library pieces a freestanding guest needs. gcc may emit calls to memcpy,
 * memset, memmove and memcmp even with -ffreestanding, so they are defined here. */
#ifndef TESTGUEST_LIB_H
#define TESTGUEST_LIB_H

#include <stddef.h>
#include <stdint.h>

void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* Writes v in decimal into buf (at least 21 bytes); returns buf. */
char *utoa(uint64_t v, char *buf);
/* Writes v in lowercase hex (no prefix) into buf (at least 17 bytes); returns buf. */
char *utohex(uint64_t v, char *buf);
/* Parses a decimal prefix of s (length n); returns def if there is none. */
uint64_t parse_u64(const char *s, size_t n, uint64_t def);

#endif
