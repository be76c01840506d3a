/* SPDX-License-Identifier: GPL-2.0 */
/* The flow tuple and the aggregation key shared by the server and LB programs. */
#ifndef CONNPUB_FLOW_H
#define CONNPUB_FLOW_H

/* Levels of aggregation (docs/policy.md, "Masks"). A level is a mask over struct flow_key. */
enum granularity_level {
	LEVEL_FLOW = 0,        /* proto, client ip, client port, vip, vip port */
	LEVEL_SESSION = 1,     /* proto, client ip, vip, vip port */
	LEVEL_APPLICATION = 2, /* proto, client ip, vip */
	LEVEL_SUBNET = 3,      /* proto, client ip /25 (v6 /56; the masks map), vip */
	LEVEL_COUNT = 4,
};

/* One key type for IPv4 and IPv6: IPv4 addresses are stored IPv4-mapped (::ffff:a.b.c.d),
 * so a v4 and a v6 flow never collide and masks are plain byte masks. Ports in network order.
 * "client" is the packet's source as it travels client -> VIP; "vip" its destination. */
struct flow_key {
	__u8 client_addr[16];
	__u8 vip_addr[16];
	__be16 client_port;
	__be16 vip_port;
	__u8 proto;
	__u8 pad[3];
};

/* Key of one aggregate: the flow key ANDed with the level's mask. */
struct agg_key {
	struct flow_key masked;
	__u8 level;
	__u8 pad[3];
};

/* Index into the masks array: level * 2 + is_ipv6 (v4 and v6 keep different subnet prefixes). */
#define MASK_INDEX(level, is_v6) ((level) * 2 + (is_v6))
#define MASK_SLOTS (LEVEL_COUNT * 2)

/* The one mask helper of both programs: *out = *key AND *mask, word by word (the caller looks
 * the mask up: bcc rewrites map calls only in the main source file). connpub.datapath.masks
 * apply_masks is its Python twin (tests/test_conformance.py compares them). */
static __always_inline void mask_flow_key(const struct flow_key *key, const struct flow_key *mask,
					  struct flow_key *out)
{
	__u64 words[5], mask_words[5];

	__builtin_memcpy(words, key, sizeof(words));
	__builtin_memcpy(mask_words, mask, sizeof(mask_words));
#pragma unroll
	for (int i = 0; i < 5; i++)
		words[i] &= mask_words[i];
	__builtin_memcpy(out, words, sizeof(words));
}

/* A traffic class is a service: (vip, vip port, proto). The control plane writes one level per
 * class; a class with no entry uses the default slot (all-zero key). */
struct class_key {
	__u8 vip_addr[16];
	__be16 vip_port;
	__u8 proto;
	__u8 pad;
};

#endif /* CONNPUB_FLOW_H */
