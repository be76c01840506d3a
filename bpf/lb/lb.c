/* SPDX-License-Identifier: GPL-2.0 */
/* LB-node XDP program: VIP packets go to the backend of their flow's or aggregate's lease (else a Maglev pick), IPIP-encapsulated. */
#include <uapi/linux/bpf.h>

#include "clock.h"
#include "parsing_helpers.h"
#include "lb_maps.h"
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

/* How the packet's backend was found; selects the per-VIP / per-backend counter. */
enum pick_kind {
	PICK_LEASE_HIT = 0, /* known flow, own lease valid */
	PICK_AGG_HIT,       /* known flow, aggregate lease valid */
	PICK_NEW,           /* Maglev pick of a flow entry (new flow, miss, SYN reuse, backend gone) */
	PICK_AGG_NEW,       /* Maglev pick of an aggregate entry (masked tuple) */
};

static __always_inline struct vip_meta *lookup_vip(struct packet_info *pkt)
{
	struct class_key ck = {};

	__builtin_memcpy(ck.vip_addr, pkt->key.vip_addr, 16);
	ck.vip_port = pkt->key.vip_port;
	ck.proto = pkt->key.proto;
	return vips.lookup(&ck);
}

/* fasthash64 over the tuple's five 64-bit words (connpub.maglev.flow_hash is the same). */
static __always_inline __u64 hash_mix(__u64 h)
{
	h ^= h >> 23;
	h *= 0x2127599bf4325c37ULL;
	h ^= h >> 47;
	return h;
}

static __always_inline __u64 flow_hash(const struct flow_key *key, __u32 vip_flags)
{
	const __u64 m = 0x880355f21e6d1957ULL;
	__u64 words[5], h = FLOW_HASH_SEED ^ (sizeof(words) * m);

	__builtin_memcpy(words, key, sizeof(words));
	if (vip_flags & VIP_F_HASH_CLIENT_ONLY) {
		words[2] = 0;
		words[3] = 0;
		words[4] = 0;
	}
#pragma unroll
	for (int i = 0; i < 5; i++) {
		h ^= hash_mix(words[i]);
		h *= m;
	}
	return hash_mix(h);
}

/* The backend Maglev gives this tuple (a flow's, or an aggregate's masked one) in the service's
 * active bank; 0 when none. */
static __always_inline __u32 maglev_pick(const struct flow_key *key, const struct vip_meta *vip)
{
	__u32 service = vip->service_id, index, *bank, *backend_id;

	if (service >= MAX_SERVICES)
		return 0;
	bank = maglev_bank.lookup(&service);
	if (!bank)
		return 0;
	index = (service * MAGLEV_BANKS + (*bank & 1)) * MAGLEV_SIZE +
		(__u32)(flow_hash(key, vip->flags) % MAGLEV_SIZE);
	backend_id = maglev.lookup(&index);
	return backend_id ? *backend_id : 0;
}

/* lk = (level, this tuple & mask[level], backend_id); 0 when the level has no mask. */
static __always_inline int agg_key_of(struct packet_info *pkt, __u8 level, __u32 backend_id,
				      struct agg_lease_key *lk)
{
	__u32 mask_index = MASK_INDEX(level, pkt->is_v6);
	struct flow_key *mask = masks.lookup(&mask_index);

	if (!mask)
		return 0;
	mask_flow_key(&pkt->key, mask, &lk->agg.masked);
	lk->agg.level = level;
	lk->backend_id = backend_id;
	return 1;
}

/* The aggregate at `level` covers a connection on backend_id: its own entry names that backend,
 * or the backend's cover entry (flows from before a level change), valid now. */
static __always_inline int agg_covers(struct packet_info *pkt, __u8 level, __u32 backend_id,
				      __u64 now_ns)
{
	struct agg_lease_key lk = {};
	struct agg_lease *agg;

	if (!agg_key_of(pkt, level, AGG_OWN_ENTRY, &lk))
		return 0;
	agg = agg_leases.lookup(&lk);
	if (agg && agg->backend_id == backend_id && now_ns < agg->lease_expiry_ns)
		return 1;
	lk.backend_id = backend_id;
	agg = agg_leases.lookup(&lk);
	return agg && now_ns < agg->lease_expiry_ns;
}

/* A valid aggregate covering this connection at any level 1-3: tried at the flow's level, then
 * at the VIP's current level, then at the others; a hit makes that the flow's level. The server
 * moves a live flow to its class's new level only at the flow's next packet, and the flow's level
 * here follows only on an aggregate hit, so after two level changes the server may hold the flow
 * at a level that is neither (0 -> 3 -> 2: level 0 here, VIP at 2, server at 3). */
static __always_inline int aggregate_keeps_alive(struct packet_info *pkt, struct conn_value *conn,
						 const struct vip_meta *vip, __u64 now_ns)
{
	__u8 own = conn->level, vip_level = vip->level;

	if (conn->flags & CONN_F_CLIENT_CLOSED)
		return 0;
	if (own != LEVEL_FLOW && own < LEVEL_COUNT && agg_covers(pkt, own, conn->backend_id, now_ns))
		return 1;
	if (vip_level != own && vip_level != LEVEL_FLOW && vip_level < LEVEL_COUNT &&
	    agg_covers(pkt, vip_level, conn->backend_id, now_ns)) {
		conn->level = vip_level;
		return 1;
	}
#pragma unroll
	for (__u8 level = LEVEL_FLOW + 1; level < LEVEL_COUNT; level++) {
		if (level == own || level == vip_level)
			continue;
		if (agg_covers(pkt, level, conn->backend_id, now_ns)) {
			conn->level = level;
			return 1;
		}
	}
	return 0;
}

/* A backend that may take new flows. */
static __always_inline struct backend *usable_backend(__u32 backend_id)
{
	struct backend *be;

	if (!backend_id)
		return NULL;
	be = backends.lookup(&backend_id);
	if (!be || (be->flags & (BACKEND_F_PRESENT | BACKEND_F_DRAINING)) != BACKEND_F_PRESENT)
		return NULL;
	return be;
}

/* A present backend (draining or not): where a leased flow or aggregate keeps going. */
static __always_inline struct backend *present_backend(__u32 backend_id)
{
	struct backend *be = backends.lookup(&backend_id);

	return be && (be->flags & BACKEND_F_PRESENT) ? be : NULL;
}

/* Level 0: Maglev pick over the tuple, then the flow gets (or its expired entry is rewritten
 * with) a short initial lease. */
static __always_inline struct backend *pick_new_backend(struct packet_info *pkt, struct conn_value *conn,
							const struct vip_meta *vip,
							const struct lb_config *cfg, __u64 now_ns,
							__u32 *backend_id)
{
	struct backend *be;

	*backend_id = maglev_pick(&pkt->key, vip);
	be = usable_backend(*backend_id);
	if (!be)
		return NULL;
	if (conn) {
		conn->backend_id = *backend_id;
		conn->lease_expiry_ns = now_ns + cfg->initial_lease_ns;
		conn->created_ns = now_ns;
		conn->level = LEVEL_FLOW;
		conn->flags = 0;
		conn->vip_index = vip->vip_index;
	} else {
		struct conn_value fresh = {};

		fresh.backend_id = *backend_id;
		fresh.lease_expiry_ns = now_ns + cfg->initial_lease_ns;
		fresh.created_ns = now_ns;
		fresh.vip_index = vip->vip_index;
		if (conns.update(&pkt->key, &fresh))
			count(STAT_CONN_INSERT_FAILED, 1);
		/* the class is about to change level (or did): the LRU must not lose this flow */
		if (vip->holds_flows && held.update(&pkt->key, &fresh))
			count(STAT_CONN_INSERT_FAILED, 1);
	}
	count(STAT_NEW_FLOW, 1);
	return be;
}

/* This tuple's aggregate at `level` when its own entry is valid now, else NULL. */
static __always_inline struct agg_lease *valid_aggregate(struct packet_info *pkt, __u8 level,
							 __u64 now_ns)
{
	struct agg_lease_key lk = {};
	struct agg_lease *agg;

	if (!agg_key_of(pkt, level, AGG_OWN_ENTRY, &lk))
		return NULL;
	agg = agg_leases.lookup(&lk);
	if (!agg || now_ns >= agg->lease_expiry_ns)
		return NULL;
	return agg;
}

/* Whether aggregates at `level` may still hold members of this class: a level it left
 * (vip->other_levels) that is not its current one. */
static __always_inline int is_earlier_level(const struct vip_meta *vip, __u8 level)
{
	return level != vip->level && ((vip->other_levels >> level) & 1);
}

/* A flow without a connection entry, not a SYN: a member of a valid aggregate of an earlier level
 * of its class (vip->other_levels; the class changed level since the aggregate was made). With
 * two earlier levels valid (3 -> 2 -> 1), or the current one older (3 -> 2 -> 3), the oldest
 * aggregate is the flow's: a member of a newer one that disagreed with an older one got a
 * connection entry (keep_transition_flow), one that agreed is on the same backend either way. */
static __always_inline struct backend *member_at_other_level(struct packet_info *pkt,
							     const struct vip_meta *vip,
							     __u64 now_ns, __u32 *backend_id)
{
	struct agg_lease *agg, *oldest = NULL;

#pragma unroll
	for (__u8 level = LEVEL_FLOW + 1; level < LEVEL_COUNT; level++) {
		if (!is_earlier_level(vip, level))
			continue;
		agg = valid_aggregate(pkt, level, now_ns);
		if (agg && (!oldest || agg->created_ns < oldest->created_ns))
			oldest = agg;
	}
	if (!oldest)
		return NULL;
	/* back at a level it had before (3 -> 2 -> 3): the class's own aggregate may be the oldest,
	 * its members are then the current level's (pick_in_aggregate) */
	agg = vip->level != LEVEL_FLOW && vip->level < LEVEL_COUNT ?
	      valid_aggregate(pkt, vip->level, now_ns) : NULL;
	if (agg && agg->created_ns < oldest->created_ns)
		return NULL;
	*backend_id = oldest->backend_id;
	return present_backend(*backend_id);
}

/* Whether a valid aggregate of this tuple at another level than the class's, not newer than the
 * flow's own aggregate (created own_created_ns; it lives as long as the flow), names another
 * backend than backend_id. Any of them, not only the oldest (member_at_other_level's pick): the
 * oldest may expire first, and the next one then takes the flow's packets. Every other level,
 * not only the class's earlier ones (vip->other_levels): levels 2-3 drop the VIP port, so a
 * sibling port's class may have made the aggregate, and the bit of its level is set once this
 * class passes through that level, while the flow lives. */
static __always_inline int other_level_disagrees(struct packet_info *pkt,
						 const struct vip_meta *vip, __u64 now_ns,
						 __u32 backend_id, __u64 own_created_ns)
{
	struct agg_lease *agg;

#pragma unroll
	for (__u8 level = LEVEL_FLOW + 1; level < LEVEL_COUNT; level++) {
		if (level == vip->level)
			continue;
		agg = valid_aggregate(pkt, level, now_ns);
		if (agg && agg->backend_id != backend_id && agg->created_ns <= own_created_ns)
			return 1;
	}
	return 0;
}

/* A new member placed on backend_id while an aggregate of its tuple at another level names
 * another backend (other_level_disagrees): the non-SYN packets of that aggregate's members find
 * it first, so this flow gets its own entry (level = the class's, kept alive by its aggregate's
 * lease). */
static __always_inline void keep_transition_flow(struct packet_info *pkt, const struct vip_meta *vip,
						 const struct lb_config *cfg, __u64 now_ns,
						 __u32 backend_id, __u64 own_created_ns)
{
	struct conn_value fresh = {};

	if (!other_level_disagrees(pkt, vip, now_ns, backend_id, own_created_ns))
		return;
	fresh.backend_id = backend_id;
	fresh.lease_expiry_ns = now_ns + cfg->initial_lease_ns;
	fresh.created_ns = now_ns;
	fresh.level = vip->level;
	fresh.vip_index = vip->vip_index;
	if (conns.update(&pkt->key, &fresh))
		count(STAT_CONN_INSERT_FAILED, 1);
	/* its connection entry is all that tells it from the earlier level's members: a copy the
	 * LRU cannot evict */
	if (vip->holds_flows && held.update(&pkt->key, &fresh))
		count(STAT_CONN_INSERT_FAILED, 1);
	count(STAT_TRANSITION_FLOW, 1);
}

static __always_inline void count_lease_miss(struct lb_stats *vstats)
{
	count(STAT_LEASE_MISS, 1);
	if (vstats)
		vstats->lease_misses += 1;
}

/* Class at level L >= 1: the flow is a member of its aggregate (L, tuple & mask[L]). A valid own
 * entry gives the backend (a SYN, a new member, also counts in flow_count and gets at least the
 * initial lease); none, expired, or on a removed backend: Maglev over the masked tuple picks one
 * (never a draining backend) and the entry is (re)written. `known`: the flow had a connection
 * entry whose lease miss is already counted. An expired entry + TCP non-SYN is a lease miss; UDP
 * (no SYN to tell a new flow) only when the pick moves the aggregate to another backend. While
 * aggregates of an earlier level of the class may be valid (vip->other_levels), a non-SYN packet
 * tries them first, and a new member they disagree with gets a flow entry. */
static __always_inline struct backend *pick_in_aggregate(struct packet_info *pkt,
							 const struct vip_meta *vip,
							 const struct lb_config *cfg,
							 struct lb_stats *vstats, __u64 now_ns,
							 int is_syn, int known, __u32 *backend_id,
							 __u32 *kind)
{
	struct agg_lease_key lk = {};
	struct agg_lease fresh = {}, *agg;
	struct backend *be;
	__u32 expired_backend = 0;

	/* a member of an earlier level's aggregate first: new members that would disagree with it
	 * got their own flow entry (keep_transition_flow) */
	if (!is_syn && !known && vip->other_levels) {
		be = member_at_other_level(pkt, vip, now_ns, backend_id);
		if (be) {
			*kind = PICK_AGG_HIT;
			count(STAT_AGG_HIT, 1);
			count(STAT_AGG_MEMBER, 1);
			return be;
		}
	}
	if (!agg_key_of(pkt, vip->level, AGG_OWN_ENTRY, &lk))
		return NULL;
	agg = agg_leases.lookup(&lk);
	if (agg && now_ns < agg->lease_expiry_ns) {
		*backend_id = agg->backend_id;
		be = present_backend(*backend_id);
		if (be) {
			if (is_syn) {
				/* not atomic: an estimate between publishes (the agent sets it) */
				agg->flow_count += 1;
				if (agg->lease_expiry_ns < now_ns + cfg->initial_lease_ns)
					agg->lease_expiry_ns = now_ns + cfg->initial_lease_ns;
			}
			if (is_syn || known)
				keep_transition_flow(pkt, vip, cfg, now_ns, *backend_id,
						     agg->created_ns);
			*kind = PICK_AGG_HIT;
			count(STAT_AGG_HIT, 1);
			count(STAT_AGG_MEMBER, 1);
			return be;
		}
		count(STAT_BACKEND_GONE, 1);
	} else if (agg) {
		expired_backend = agg->backend_id;
	}
	if (!is_syn && !known) {
		if (pkt->key.proto == IPPROTO_TCP && expired_backend) {
			count_lease_miss(vstats);
			count(STAT_AGG_MISS, 1);
		} else if (pkt->key.proto == IPPROTO_TCP) {
			count(STAT_MIDSTREAM_NEW, 1);
		}
	}
	*backend_id = maglev_pick(&lk.agg.masked, vip);
	be = usable_backend(*backend_id);
	if (!be)
		return NULL;
	if (!is_syn && !known && pkt->key.proto != IPPROTO_TCP && expired_backend &&
	    expired_backend != *backend_id)
		count_lease_miss(vstats);
	fresh.backend_id = *backend_id;
	fresh.lease_expiry_ns = now_ns + cfg->initial_lease_ns;
	fresh.created_ns = now_ns;
	fresh.flow_count = 1;
	fresh.vip_index = vip->vip_index;
	if (agg_leases.update(&lk, &fresh))
		count(STAT_CONN_INSERT_FAILED, 1);
	if (is_syn || known)
		keep_transition_flow(pkt, vip, cfg, now_ns, *backend_id, now_ns);
	*kind = PICK_AGG_NEW;
	count(STAT_AGG_INSERT, 1);
	count(STAT_NEW_FLOW, 1);
	return be;
}

/* The backend of a known flow whose own lease holds (the fast path: no VIP lookup); else NULL. */
static __always_inline struct backend *leased_backend(struct conn_value *conn, __u64 now_ns,
						      __u32 *backend_id)
{
	if (!conn || now_ns >= conn->lease_expiry_ns)
		return NULL;
	*backend_id = conn->backend_id;
	return present_backend(*backend_id);
}

/* No connection entry, class changed level (vip->holds_flows): the flow's held copy, if the LRU
 * evicted its entry. A SYN reusing a held tuple is a new connection: the copy goes. */
static __always_inline struct conn_value *held_flow(struct packet_info *pkt,
						    const struct vip_meta *vip)
{
	struct conn_value *conn;

	if (!vip->holds_flows)
		return NULL;
	conn = held.lookup(&pkt->key);
	if (!conn)
		return NULL;
	if ((pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		held.delete(&pkt->key);
		count(STAT_HELD_DROPPED, 1);
		return NULL;
	}
	count(STAT_HELD_HIT, 1);
	return conn;
}

/* A VIP packet without a valid flow lease. A known flow: an aggregate lease keeps it on its
 * backend; else (lease miss, SYN reusing the tuple, backend gone) it is placed anew. An unknown
 * flow at level 0: a member of an aggregate from before its class went to level 0, else a new
 * flow. Placing anew at level 0 inserts a flow entry; at level >= 1 the flow joins its
 * aggregate (and its old connection entry goes). */
static __always_inline struct backend *recover_or_pick(struct packet_info *pkt, struct conn_value *conn,
						       const struct vip_meta *vip,
						       const struct lb_config *cfg,
						       struct lb_stats *vstats, __u64 now_ns,
						       __u32 *backend_id, __u32 *kind)
{
	int is_syn = (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	int aggregated = vip->level != LEVEL_FLOW && vip->level < LEVEL_COUNT;
	struct backend *be;

	*kind = PICK_NEW;
	if (conn) {
		*backend_id = conn->backend_id;
		be = present_backend(*backend_id);
		if (!be) {
			count(STAT_BACKEND_GONE, 1);
		} else if (now_ns < conn->lease_expiry_ns) {
			/* valid lease on a backend that was gone a moment ago (raced a re-add) */
			*kind = PICK_LEASE_HIT;
			count(STAT_LEASE_HIT, 1);
			return be;
		} else if (aggregate_keeps_alive(pkt, conn, vip, now_ns)) {
			*kind = PICK_AGG_HIT;
			count(STAT_AGG_HIT, 1);
			return be;
		} else if (is_syn) {
			count(STAT_SYN_REUSE, 1);
		} else {
			count_lease_miss(vstats);
		}
		if (!aggregated)
			return pick_new_backend(pkt, conn, vip, cfg, now_ns, backend_id);
		conns.delete(&pkt->key);
		if (vip->holds_flows)
			held.delete(&pkt->key);
		return pick_in_aggregate(pkt, vip, cfg, vstats, now_ns, is_syn, 1, backend_id, kind);
	}
	if (aggregated)
		return pick_in_aggregate(pkt, vip, cfg, vstats, now_ns, is_syn, 0, backend_id, kind);
	if (!is_syn && vip->other_levels) {
		be = member_at_other_level(pkt, vip, now_ns, backend_id);
		if (be) {
			*kind = PICK_AGG_HIT;
			count(STAT_AGG_HIT, 1);
			count(STAT_AGG_MEMBER, 1);
			return be;
		}
	}
	/* an evicted entry or a flow from another LB node (counted whatever other_levels is) */
	if (!is_syn && pkt->key.proto == IPPROTO_TCP)
		count(STAT_MIDSTREAM_NEW, 1);
	return pick_new_backend(pkt, NULL, vip, cfg, now_ns, backend_id);
}

/* Checksum of an option-less IPv4 header given as five 32-bit words in network order. */
static __always_inline __u16 ipv4_checksum(const __u32 words[5])
{
	__u64 sum = 0;

#pragma unroll
	for (int i = 0; i < 5; i++)
		sum += (words[i] & 0xffff) + (words[i] >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

static __always_inline void write_eth(struct ethhdr *eth, const struct backend *be,
				      const struct lb_config *cfg, __be16 proto)
{
	const __u8 *dst = be->mac;

	if (!(*(__u32 *)be->mac | *(__u16 *)&be->mac[4]))
		dst = cfg->gateway_mac;
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, cfg->src_mac, ETH_ALEN);
	eth->h_proto = proto;
}

/* Replace everything before the inner IP header by Ethernet + an outer IPv4/IPv6 header to the
 * backend (VLAN tags are not carried over). The inner packet is not touched. */
static __always_inline __u32 encapsulate(struct xdp_md *ctx, struct packet_info *pkt,
					 const struct backend *be, const struct lb_config *cfg)
{
	__u32 outer_len = be->is_v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
	__u32 mtu = cfg->mtu ? cfg->mtu : DEFAULT_MTU;
	__u8 inner_proto = pkt->is_v6 ? IPPROTO_IPV6 : IPPROTO_IPIP;
	void *data, *data_end;

	if (pkt->l3_len + outer_len > mtu)
		return STAT_TOO_BIG;
	if (bpf_xdp_adjust_head(ctx, (int)pkt->l3_offset - (int)(sizeof(struct ethhdr) + outer_len)))
		return STAT_ENCAP_FAILED;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;

	if (be->is_v6) {
		struct ethhdr *eth = data;
		struct ipv6hdr *ip6h = data + sizeof(*eth);

		if ((void *)(ip6h + 1) > data_end)
			return STAT_ENCAP_FAILED;
		write_eth(eth, be, cfg, bpf_htons(ETH_P_IPV6));
		*(__be32 *)ip6h = bpf_htonl(0x60000000); /* version 6, traffic class 0, flow label 0 */
		ip6h->payload_len = bpf_htons(pkt->l3_len);
		ip6h->nexthdr = inner_proto;
		ip6h->hop_limit = IPIP_TTL;
		__builtin_memcpy(&ip6h->saddr, cfg->lb_addr6, 16);
		__builtin_memcpy(&ip6h->daddr, be->addr, 16);
	} else {
		struct ethhdr *eth = data;
		struct iphdr *iph = data + sizeof(*eth);

		if ((void *)(iph + 1) > data_end)
			return STAT_ENCAP_FAILED;
		__u32 words[5];

		write_eth(eth, be, cfg, bpf_htons(ETH_P_IP));
		/* version 4, IHL 5, TOS 0, total length | id 0, DF (it already fits the MTU) |
		 * TTL, protocol, checksum 0 | source | destination: built in registers, stored once */
		words[0] = bpf_htonl(0x45000000 | (pkt->l3_len + sizeof(*iph)));
		words[1] = bpf_htonl(0x00004000);
		words[2] = bpf_htonl((IPIP_TTL << 24) | (inner_proto << 16));
		words[3] = cfg->lb_addr4;
		words[4] = *(const __u32 *)&be->addr[12];
		words[2] |= bpf_htonl(bpf_ntohs(ipv4_checksum(words)));
		__builtin_memcpy(iph, words, sizeof(words));
	}
	return STAT_FORWARDED;
}

static __always_inline void count_flow(struct lb_stats *s, __u32 kind, __u32 bytes)
{
	s->packets += 1;
	s->bytes += bytes;
	if (kind == PICK_LEASE_HIT)
		s->lease_hits += 1;
	else if (kind == PICK_AGG_HIT)
		s->agg_hits += 1;
	else
		s->new_flows += 1;
	if (kind == PICK_AGG_NEW)
		s->agg_inserts += 1;
}

/* The client closed (FIN/RST; with DSR the LB sees only the client's side): from now on only the
 * flow's own lease counts, ending close_linger_ns later, so its last ACKs still pass while no
 * aggregate lease keeps a closed flow alive. The server's FIN is never seen here. */
static __always_inline void note_client_close(struct packet_info *pkt, struct conn_value *conn,
					      const struct lb_config *cfg, __u64 now_ns)
{
	if (!conn)
		return;
	/* a SYN reusing the tuple within the linger: a new connection, aggregates cover it again */
	if ((conn->flags & CONN_F_CLIENT_CLOSED) &&
	    (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		conn->flags &= ~CONN_F_CLIENT_CLOSED;
		return;
	}
	if ((conn->flags & CONN_F_CLIENT_CLOSED) || !(pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		return;
	conn->flags |= CONN_F_CLIENT_CLOSED;
	conn->lease_expiry_ns = now_ns + cfg->close_linger_ns;
	count(STAT_CLIENT_CLOSED, 1);
}

/* Cheap pre-filter: a packet whose (vip, port, proto) slot holds no VIP is surely not for us. */
static __always_inline int maybe_vip(struct packet_info *pkt)
{
	__u32 slot = vip_filter_slot(pkt->key.vip_addr, pkt->key.vip_port, pkt->key.proto);
	__u32 *vips_in_slot = vip_filter.lookup(&slot);

	return vips_in_slot && *vips_in_slot;
}

int xdp_lb(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct packet_info pkt = {};
	struct lb_stats *vstats, *bstats;
	struct conn_value *conn;
	struct lb_config *cfg;
	struct vip_meta *vip;
	struct backend *be;
	__u32 zero = 0, verdict = XDP_PASS, outcome, backend_id = 0, kind, vip_index;
	__u64 now_ns;
	int err;

	err = parse_flow(data, data_end, &pkt);
	if (err < 0) {
		outcome = outcome_of_parse_error(err);
		goto out;
	}
	if (pkt.encapsulated) {
		outcome = STAT_TUNNELLED;
		goto out;
	}
	if (!maybe_vip(&pkt)) {
		outcome = STAT_NOT_VIP;
		goto out;
	}
	/* the whole inner packet must be there: its length goes into the outer header */
	if (pkt.l3_offset + pkt.l3_len > data_end - data) {
		outcome = STAT_TRUNCATED;
		goto out;
	}
	cfg = config.lookup(&zero);
	if (!cfg) {
		outcome = STAT_NO_CONFIG;
		goto out;
	}
	now_ns = datapath_now_ns();
	/* only VIP flows are in the table (lbctl.del_vip removes a VIP's flows with it) */
	conn = conns.lookup(&pkt.key);
	be = leased_backend(conn, now_ns, &backend_id);
	if (be) {
		kind = PICK_LEASE_HIT;
		count(STAT_LEASE_HIT, 1);
		vip_index = conn->vip_index;
		vstats = vip_stats.lookup(&vip_index);
	} else {
		vip = lookup_vip(&pkt);
		if (!vip) {
			outcome = STAT_NOT_VIP;
			goto out;
		}
		vip_index = vip->vip_index;
		vstats = vip_stats.lookup(&vip_index);
		if (!conn)
			conn = held_flow(&pkt, vip);
		be = recover_or_pick(&pkt, conn, vip, cfg, vstats, now_ns, &backend_id, &kind);
		if (!be) {
			verdict = XDP_DROP;
			outcome = STAT_NO_BACKEND;
			goto out;
		}
	}
	note_client_close(&pkt, conn, cfg, now_ns);
	outcome = encapsulate(ctx, &pkt, be, cfg);
	if (outcome != STAT_FORWARDED) {
		verdict = XDP_DROP;
		goto out;
	}
	verdict = cfg->use_redirect ? tx_port.redirect_map(0, 0) : XDP_TX;
	count(STAT_BYTES, pkt.l3_len);
	if (vstats)
		count_flow(vstats, kind, pkt.l3_len);
	bstats = backend_stats.lookup(&backend_id);
	if (bstats)
		count_flow(bstats, kind, pkt.l3_len);
out:
	count(outcome, 1);
	return verdict;
}
