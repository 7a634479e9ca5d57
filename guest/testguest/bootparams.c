#include "bootparams.h"
#include "lib.h"

static uint32_t rd32(const uint8_t *bp, unsigned off)
{
    uint32_t v;
    memcpy(&v, bp + off, sizeof(v));
    return v;
}

const char *bp_cmdline(const uint8_t *bp)
{
    uint64_t addr = (uint64_t)rd32(bp, BP_CMD_LINE_PTR) |
                    ((uint64_t)rd32(bp, BP_EXT_CMD_LINE_PTR) << 32);
    if (addr == 0)
        return "";
    return (const char *)addr;
}

unsigned bp_e820_entries(const uint8_t *bp)
{
    return bp[BP_E820_ENTRIES];
}

int cmdline_get(const char *cmdline, const char *key, const char **val, size_t *len)
{
    size_t klen = strlen(key);
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *word = p;
        while (*p && *p != ' ')
            p++;
        size_t wlen = (size_t)(p - word);
        if (wlen > klen && memcmp(word, key, klen) == 0 && word[klen] == '=') {
            *val = word + klen + 1;
            *len = wlen - klen - 1;
            return 1;
        }
    }
    return 0;
}

int cmdline_is(const char *cmdline, const char *key, const char *want)
{
    const char *v;
    size_t n;
    if (!cmdline_get(cmdline, key, &v, &n))
        return 0;
    return n == strlen(want) && memcmp(v, want, n) == 0;
}
