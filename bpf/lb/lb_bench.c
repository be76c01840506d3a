/* SPDX-License-Identifier: GPL-2.0 */
/* Benchmark harness: BPF_PROG_TEST_RUN reuses one buffer, so these wrappers undo the previous
 * iteration's encapsulation (and optionally vary the tuple) before tail-calling the program.
 * connpub.bench.lb compiles lb.c followed by this file as one source (bcc only loads functions
 * of the main source), so the wrappers and xdp_lb share maps. */

#define PREFILL_CLIENT_BASE 0xAC100000U /* 172.16.0.0: connpub.bench.lb.PREFILL_CLIENT_BASE */
#define AGG_MEMBER_CLIENT_BASE 0x0A640102U /* 10.100.1.2: connpub.bench.lb.CLIENT */
#define AGG_MEMBER_CLIENTS 16 /* connpub.bench.lb.AGG_MEMBER_CLIENTS */

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

/* [0] -> how many prefilled flows VARY_PREFILLED cycles through, [1] -> its stride */
BPF_ARRAY(bench_prefilled, __u32, 2);

enum vary {
	/* the low 24 bits of the client IPv4 address and the rest into the client port: 2^32
	 * distinct tuples, 2^24 distinct clients (every iteration a new flow and a new client) */
	VARY_CLIENT,
	/* client AGG_MEMBER_CLIENT_BASE + (n >> 16) % AGG_MEMBER_CLIENTS, client port n & 0xffff:
	 * 2^20 distinct tuples of AGG_MEMBER_CLIENTS clients (at levels >= 1, new members of their
	 * aggregates), as many as the cold-hit benchmark cycles through */
	VARY_MEMBER,
	/* prefilled flow i = (n * stride) % count: client PREFILL_CLIENT_BASE + i, port kept. Stride 1
	 * visits the flows in the order they were inserted (their table elements were allocated in
	 * that order: the prefetcher helps); a large prime stride in an order unrelated to memory,
	 * as the interleaved packets of many flows do */
	VARY_PREFILLED,
};

/* Restore the packet, then write the iteration counter n into its tuple as `how` says. IPv4
 * without options + TCP only. */
static __always_inline int vary_tuple(struct xdp_md *ctx, enum vary how)
{
	void *data, *data_end;
	struct iphdr *iph;
	struct tcphdr *tcph;
	__u32 zero = 0, one = 1, *counter, *count, *stride, n;

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
	if (how == VARY_CLIENT) {
		*((__u16 *)&iph->saddr + 1) = (__u16)n;
		*((__u8 *)&iph->saddr + 1) = (__u8)(n >> 16);
		tcph->source = (__be16)(n >> 24);
	} else if (how == VARY_MEMBER) {
		iph->saddr = bpf_htonl(AGG_MEMBER_CLIENT_BASE + ((n >> 16) % AGG_MEMBER_CLIENTS));
		tcph->source = bpf_htons((__u16)n);
	} else {
		count = bench_prefilled.lookup(&zero);
		stride = bench_prefilled.lookup(&one);
		if (!count || !*count || !stride)
			return -1;
		iph->saddr = bpf_htonl(PREFILL_CLIENT_BASE + (__u32)((__u64)n * *stride % *count));
	}
	return 0;
}

/* Every iteration is a new flow (a new client too): the new-flow benchmark at level 0, the
 * new-aggregate one at levels >= 1. */
int xdp_bench_new_flow(struct xdp_md *ctx)
{
	if (vary_tuple(ctx, VARY_CLIENT))
		return XDP_ABORTED;
	bench_next.call(ctx, 0);
	return XDP_ABORTED;
}

/* Every iteration is a new flow of one of a few clients: at levels >= 1 a new member of a
 * leased aggregate. */
int xdp_bench_new_member(struct xdp_md *ctx)
{
	if (vary_tuple(ctx, VARY_MEMBER))
		return XDP_ABORTED;
	bench_next.call(ctx, 0);
	return XDP_ABORTED;
}

/* Every iteration is the next prefilled flow: flow-table hits on a cold table. */
int xdp_bench_prefilled(struct xdp_md *ctx)
{
	if (vary_tuple(ctx, VARY_PREFILLED))
		return XDP_ABORTED;
	bench_next.call(ctx, 0);
	return XDP_ABORTED;
}

/* The floor: returns at once. */
int xdp_bench_empty(struct xdp_md *ctx)
{
	return XDP_TX;
}
