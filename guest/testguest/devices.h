/* The test guest's virtio device actions (see README.md). */
#ifndef TESTGUEST_DEVICES_H
#define TESTGUEST_DEVICES_H

/* testguest.action=net_echo: sends a hello frame on every TX queue, echoes frames back
 * (options in net.c: testguest.net_pairs, testguest.net_offloads, testguest.net_echoes).
 * 0 on success. */
int net_echo(const char *cmdline);
/* testguest.action=blk: reads, checksums, writes one sector. 0 on success. */
int blk_test(const char *cmdline);
/* testguest.action=vsock: serves host connections to testguest.vsock_port forever;
 * returns -1 only when the device cannot be set up. */
int vsock_serve(const char *cmdline);

#endif
