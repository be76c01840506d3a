/* SPDX-License-Identifier: GPL-2.0 */
/* Clock calibration: writes (jiffies64, ktime_get_ns) into the first 16 bytes of the test packet. */
#include <uapi/linux/bpf.h>

int xdp_clock(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 *out = data;

	if ((void *)(out + 2) > data_end)
		return XDP_ABORTED;
	out[0] = bpf_jiffies64();
	out[1] = bpf_ktime_get_ns();
	return XDP_PASS;
}
