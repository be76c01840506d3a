/* SPDX-License-Identifier: GPL-2.0 */
/* Benchmark harness: BPF_PROG_TEST_RUN reuses one buffer, so these wrappers undo the previous
 * iteration's encapsulation (and optionally vary the tuple) before tail-calling the program.
 * connpub.bench.lb compiles lb.c followed by this file as one source (bcc only loads functions
 * of the main source), so the wrappers and xdp_lb share maps. */

#define PREFILL_CLIENT_BASE 0xAC100000U /* 172.16.0.0: connpub.bench.lb.PREFILL_CLIENT_BASE */

/* [0] -> the program under test (xdp_lb, or xdp_bench_empty to measure the wrapper itself) */
BPF_PROG_ARRAY(bench_next, 1);
/* [0] -> the benchmark packet's original Ethernet header */
BPF_ARRAY(bench_eth, struct ethhdr, 1);
/* [0] -> iteration counter, the varying part of the tuple in xdp_bench_new_flow (one counter for
 * all CPUs: the test-running process may migrate between runs) */
BPF_ARRAY(bench_counter, __u32, 1);

/* Strip an outer IPv4/IPv6 tunnel header if there is one (bpf_xdp_adjust_head by 0 otherwise, so
 * both paths cost the same) and put the original Ethernet header back. */
static __always_inline int restore_packet(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data, *saved;
	__u32 zero = 0;
	int outer_len = 0;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);

		if ((void *)(iph + 1) > data_end)
			return -1;
		if (iph->protocol == IPPROTO_IPIP || iph->protocol == IPPROTO_IPV6)
			outer_len = sizeof(*iph);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = (void *)(eth + 1);

		if ((void *)(ip6h + 1) > data_end)
			return -1;
		if (ip6h->nexthdr == IPPROTO_IPIP || ip6h->nexthdr == IPPROTO_IPV6)
			outer_len = sizeof(*ip6h);
	}
	if (bpf_xdp_adjust_head(ctx, outer_len))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	saved = bench_eth.lookup(&zero);
	if (!saved || (void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(eth, saved, sizeof(*eth));
	return 0;
}

/* Every iteration sees the original packet: the flow-table-hit benchmark. */
int xdp_bench_restore(struct xdp_md *ctx)
{
	if (restore_packet(ctx))
		return XDP_ABORTED;
	bench_next.call(ctx, 0);
	return XDP_ABORTED; /* the tail call failed */
}

/* Write a counter into the tuple: vary_client = the low 24 bits of the client IPv4 address and
 * the rest into the client port (2^32 distinct tuples, 2^24 distinct clients); else the client
 * port only. IPv4 without options + TCP only. */
static __always_inline int vary_tuple(struct xdp_md *ctx, int vary_client)
{
	void *data, *data_end;
	struct iphdr *iph;
	struct tcphdr *tcph;
	__u32 zero = 0, *counter, n;

	if (restore_packet(ctx))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	iph = data + sizeof(struct ethhdr);
	tcph = (void *)(iph + 1);
	counter = bench_counter.lookup(&zero);
	if (!counter || (void *)(tcph + 1) > data_end)
		return -1;
	n = *counter + 1; /* BPF_PROG_TEST_RUN runs one CPU at a time: no atomic needed */
	*counter = n;
	if (vary_client) {
		*((__u16 *)&iph->saddr + 1) = (__u16)n;
		*((__u8 *)&iph->saddr + 1) = (__u8)(n >> 16);
		tcph->source = (__be16)(n >> 24);
	} else {
		tcph->source = (__be16)n;
	}
	return 0;
}

/* Every iteration is a new flow (a new client too): the new-flow benchmark at level 0, the
 * new-aggregate one at levels >= 1. */
int xdp_bench_new_flow(struct xdp_md *ctx)
{
	if (vary_tuple(ctx, 1))
		return XDP_ABORTED;
	bench_next.call(ctx, 0);
	return XDP_ABORTED;
}

/* Every iteration is a new flow of the same client (only the client port varies): at levels
 * >= 1 a new member of one aggregate. */
int xdp_bench_new_member(struct xdp_md *ctx)
{
	if (vary_tuple(ctx, 0))
		return XDP_ABORTED;
	bench_next.call(ctx, 0);
	return XDP_ABORTED;
}

/* [0] -> how many prefilled flows xdp_bench_prefilled cycles through */
BPF_ARRAY(bench_prefilled, __u32, 1);

/* Every iteration is the next of the prefilled flows (client 172.16.0.0 + i, i < bench_prefilled,
 * port kept): flow-table hits on a cold table, as real traffic sees it. */
int xdp_bench_prefilled(struct xdp_md *ctx)
{
	void *data, *data_end;
	struct iphdr *iph;
	__u32 zero = 0, *counter, *count, n;

	if (restore_packet(ctx))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	iph = data + sizeof(struct ethhdr);
	counter = bench_counter.lookup(&zero);
	count = bench_prefilled.lookup(&zero);
	if (!counter || !count || !*count || (void *)(iph + 1) > data_end)
		return XDP_ABORTED;
	n = *counter + 1;
	*counter = n;
	iph->saddr = bpf_htonl(PREFILL_CLIENT_BASE + n % *count);
	bench_next.call(ctx, 0);
	return XDP_ABORTED;
}

/* The floor: returns at once. */
int xdp_bench_empty(struct xdp_md *ctx)
{
	return XDP_TX;
}
