/* SPDX-License-Identifier: GPL-2.0 */
/* Benchmark wrappers: vary the packet per BPF_PROG_TEST_RUN iteration, then tail-call the program under test. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

/* [0] -> the program under test */
BPF_PROG_ARRAY(bench_target, 1);

/* Every iteration gets a new IPv4 source address (a new flow): saddr += 1. */
int xdp_new_source(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);

	if ((void *)(iph + 1) > data_end)
		return XDP_ABORTED;
	iph->saddr = bpf_htonl(bpf_ntohl(iph->saddr) + 1);
	bench_target.call(ctx, 0);
	return XDP_ABORTED; /* the tail call failed */
}

/* The same packet every iteration: only the tail call (measures the wrapper's own cost). */
int xdp_passthrough(struct xdp_md *ctx)
{
	bench_target.call(ctx, 0);
	return XDP_ABORTED;
}
