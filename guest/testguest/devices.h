/* The test guest's virtio device actions (see README.md). */
#ifndef TESTGUEST_DEVICES_H
#define TESTGUEST_DEVICES_H

/* testguest.action=net_echo: sends a hello frame, echoes one frame back. 0 on success. */
int net_echo(const char *cmdline);
/* testguest.action=blk: reads, checksums, writes one sector. 0 on success. */
int blk_test(const char *cmdline);

#endif
