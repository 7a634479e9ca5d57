#include "lib.h"

void *memcpy(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d < s) {
        while (n--)
            *d++ = *s++;
    } else {
        while (n--)
            d[n] = s[n];
    }
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

char *utoa(uint64_t v, char *buf)
{
    char tmp[21];
    int i = 0, j = 0;
    do {
        tmp[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        buf[j++] = tmp[--i];
    buf[j] = 0;
    return buf;
}

uint64_t parse_u64(const char *s, size_t n, uint64_t def)
{
    uint64_t v = 0;
    size_t i;
    if (n == 0 || s[0] < '0' || s[0] > '9')
        return def;
    for (i = 0; i < n && s[i] >= '0' && s[i] <= '9'; i++)
        v = v * 10 + (uint64_t)(s[i] - '0');
    return v;
}

char *utohex(uint64_t v, char *buf)
{
    static const char digits[] = "0123456789abcdef";
    char tmp[17];
    int i = 0, j = 0;
    do {
        tmp[i++] = digits[v & 0xf];
        v >>= 4;
    } while (v);
    while (i)
        buf[j++] = tmp[--i];
    buf[j] = 0;
    return buf;
}
