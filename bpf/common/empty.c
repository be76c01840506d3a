/* SPDX-License-Identifier: GPL-2.0 */
/* The floor for benchmarks: an XDP program that only returns XDP_PASS. */
#include <uapi/linux/bpf.h>

int xdp_empty(struct xdp_md *ctx)
{
	return XDP_PASS;
}
