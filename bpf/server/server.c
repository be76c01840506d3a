/* SPDX-License-Identifier: GPL-2.0 */
/* Server-node XDP program: tracks every (inner) flow and its aggregate at the class's level; never drops. */
#include <uapi/linux/bpf.h>

#include "clock.h"
#include "parsing_helpers.h"
#include "server_maps.h"
#include "stats_helpers.h"

static __always_inline void count(__u32 stat, __u64 amount)
{
	__u64 *value = stats.lookup(&stat);

	if (value)
		*value += amount;
}

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* The level of the flow's traffic class: an explicit entry, else the configured default. */
static __always_inline __u8 class_level(struct packet_info *pkt, const struct server_config *cfg)
{
	struct class_key ck = {};
	__u8 *level;

	__builtin_memcpy(ck.vip_addr, pkt->key.vip_addr, 16);
	ck.vip_port = pkt->key.vip_port;
	ck.proto = pkt->key.proto;
	level = class_levels.lookup(&ck);
	if (level && *level < LEVEL_COUNT)
		return *level;
	return cfg->default_level < LEVEL_COUNT ? cfg->default_level : LEVEL_FLOW;
}

/* The aggregate key of this packet's tuple at `level`: (level, tuple & mask). */
static __always_inline int agg_key_of(struct packet_info *pkt, __u8 level, struct agg_key *ak)
{
	__u32 mask_index = MASK_INDEX(level, pkt->is_v6);
	struct flow_key *mask = masks.lookup(&mask_index);

	if (!mask)
		return -1;
	mask_flow_key(&pkt->key, mask, &ak->masked);
	ak->level = level;
	return 0;
}

/* The aggregate at `level` (1-3), created if missing (*created = 1); NULL when the table is full. */
static __always_inline struct agg_value *aggregate_of(struct packet_info *pkt, __u8 level, int *created)
{
	struct agg_key ak = {};
	struct agg_value *agg;

	*created = 0;
	if (agg_key_of(pkt, level, &ak))
		return NULL;
	agg = aggregates.lookup(&ak);
	if (agg)
		return agg;
	struct agg_value fresh = {};
	if (aggregates.insert(&ak, &fresh))
		return NULL;
	*created = 1;
	return aggregates.lookup(&ak);
}

/* A flow leaves the active count of its aggregate: only an existing aggregate is changed. */
static __always_inline void leave_aggregate(struct packet_info *pkt, __u8 level)
{
	struct agg_key ak = {};
	struct agg_value *agg;

	if (level == LEVEL_FLOW || agg_key_of(pkt, level, &ak))
		return;
	agg = aggregates.lookup(&ak);
	if (agg)
		agg->active_flows -= 1;
}

/* First packet of a flow (or a SYN reusing a closed flow's tuple). The aggregate comes first:
 * a flow that cannot be counted in its aggregate is not created either. */
static __always_inline __u32 track_new_flow(struct packet_info *pkt, const struct server_config *cfg,
					    __u64 now_ns, int reopened)
{
	struct flow_value fresh = {};
	struct agg_value *agg = NULL;
	int created;

	fresh.packets = 1;
	fresh.bytes = pkt->l3_len;
	fresh.first_seen_ns = now_ns;
	fresh.last_seen_ns = now_ns;
	fresh.class_gen = cfg->levels_gen;
	fresh.tcp_flags = pkt->tcp_flags;
	fresh.level = class_level(pkt, cfg);
	fresh.closed = (pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) ? 1 : 0;
	fresh.sketch_count = 1;
	fresh.sketch_size[0] = pkt->l3_len;
	fresh.sketch_last_ktime = bpf_ktime_get_ns();
	if (fresh.level != LEVEL_FLOW) {
		agg = aggregate_of(pkt, fresh.level, &created);
		if (!agg)
			return STAT_TABLE_FULL;
	}
	if (flows.update(&pkt->key, &fresh))
		return STAT_TABLE_FULL;
	count(reopened ? STAT_FLOW_REOPENED : STAT_NEW_FLOW, 1);

	if (agg) {
		agg->packets += 1;
		agg->bytes += pkt->l3_len;
		agg->last_seen_ns = now_ns;
		agg->total_flows += 1;
		if (!fresh.closed)
			agg->active_flows += 1;
	}
	if (fresh.closed)
		count(STAT_FLOW_CLOSED, 1);
	return STAT_TRACKED;
}

/* A packet of a known flow. Flow counters are plain adds: RSS keeps one flow on one CPU. */
static __always_inline __u32 track_known_flow(struct flow_value *flow, struct packet_info *pkt,
					      const struct server_config *cfg, __u64 now_ns)
{
	struct agg_value *agg;
	__u8 idx = flow->sketch_count;
	int closing, created;

	if (idx < SKETCH_PACKETS) {
		/* the model wants fine gaps: pay for the precise clock on the first packets only */
		__u64 precise_ns = bpf_ktime_get_ns();

		idx &= SKETCH_PACKETS - 1;
		flow->sketch_size[idx] = pkt->l3_len;
		flow->sketch_gap_us[idx] = (precise_ns - flow->sketch_last_ktime) / 1000;
		flow->sketch_last_ktime = precise_ns;
		flow->sketch_count = idx + 1;
	}
	flow->packets += 1;
	flow->bytes += pkt->l3_len;
	flow->last_seen_ns = now_ns;
	flow->tcp_flags |= pkt->tcp_flags;

	if (flow->class_gen != cfg->levels_gen) {
		__u8 level = class_level(pkt, cfg);

		/* a live level-0 flow leaves for its class's new level (the LB keeps its connection
		 * entry, so any aggregate of its backend covers it); a member of an aggregate stays
		 * in it until it ends: the LB keeps no entry for it, it is found (and its backend
		 * kept) only through that aggregate (docs/lb.md "Aggregates") */
		if (level != flow->level && flow->level == LEVEL_FLOW) {
			if (!flow->closed)
				leave_aggregate(pkt, flow->level);
			flow->level = level;
			flow->class_gen = cfg->levels_gen;
			count(STAT_LEVEL_CHANGED, 1);
			if (level != LEVEL_FLOW && !flow->closed) {
				agg = aggregate_of(pkt, level, &created);
				if (!agg)
					return STAT_TABLE_FULL;
				agg->active_flows += 1;
				agg->total_flows += 1;
			}
		} else {
			flow->class_gen = cfg->levels_gen;
		}
	}

	closing = !flow->closed && (pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST));
	if (flow->level != LEVEL_FLOW) {
		agg = aggregate_of(pkt, flow->level, &created);
		if (!agg)
			return STAT_TABLE_FULL;
		/* a missing aggregate (evicted or removed while this flow was live) is rebuilt
		 * with the flow counted in it, so a later FIN never takes it below zero */
		if (created && !flow->closed) {
			agg->active_flows += 1;
			agg->total_flows += 1;
		}
		agg->packets += 1;
		agg->bytes += pkt->l3_len;
		agg->last_seen_ns = now_ns;
		if (closing)
			agg->active_flows -= 1;
	}
	if (closing) {
		flow->closed = 1;
		count(STAT_FLOW_CLOSED, 1);
	}
	return STAT_TRACKED;
}

int xdp_server(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct packet_info pkt = {};
	struct server_config *cfg;
	struct flow_value *flow;
	__u32 zero = 0, outcome;
	__u64 now_ns;
	int err;

	err = parse_flow(data, data_end, &pkt);
	if (err < 0) {
		outcome = outcome_of_parse_error(err);
		goto out;
	}
	cfg = config.lookup(&zero);
	if (!cfg) {
		outcome = STAT_UNSUPPORTED;
		goto out;
	}
	now_ns = datapath_now_ns();
	flow = flows.lookup(&pkt.key);
	if (!flow)
		outcome = track_new_flow(&pkt, cfg, now_ns, 0);
	else if (flow->closed && (pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		outcome = track_new_flow(&pkt, cfg, now_ns, 1);
	else
		outcome = track_known_flow(flow, &pkt, cfg, now_ns);
	if (outcome == STAT_TRACKED)
		count(STAT_BYTES, pkt.l3_len);
out:
	count(outcome, 1);
	return XDP_PASS;
}
