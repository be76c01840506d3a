/* SPDX-License-Identifier: GPL-2.0 */
/* Key and value layouts of the LB-node program's maps. */
#ifndef CONNPUB_LB_STRUCTS_H
#define CONNPUB_LB_STRUCTS_H

#include "flow.h"
#include "lb_consts.h"

/* VIP table value. The VIP key is struct class_key (vip, vip port, proto): a VIP is a class. */
struct vip_meta {
	__u32 service_id;     /* Maglev table (and backend set) of this VIP, < MAX_SERVICES */
	__u32 vip_index;      /* slot in vip_stats, < MAX_VIPS */
	__u32 flags;          /* VIP_F_* */
	__u8 level;           /* granularity level of the class, set by the LB agent */
	__u8 other_levels;    /* bit L: aggregates of an earlier level L (1-3) may still be valid */
	__u8 holds_flows;     /* the class changed level: its flows from before may be in `held` */
	__u8 pad;
};

#define VIP_F_HASH_CLIENT_ONLY 0x1 /* Maglev hash over the client address only (client affinity) */

/* Slot of a (vip, vip port, proto) in the vip_filter array: a multiplicative hash of the
 * address's last 32 bits, port and protocol (connpub.lbctl.vip_filter_slots is the same). */
static __always_inline __u32 vip_filter_slot(const __u8 *vip_addr, __be16 vip_port, __u8 proto)
{
	__u32 word = *(const __u32 *)&vip_addr[12];

	return ((word ^ ((__u32)vip_port << 8) ^ proto) * 0x9E3779B1U) >> (32 - VIP_FILTER_BITS);
}

/* One backend (server). Index = backend id; id 0 is never used. */
struct backend {
	__u8 addr[16];        /* IPv6, or IPv4-mapped ::ffff:a.b.c.d when is_v6 = 0 */
	__u8 mac[6];          /* next-hop MAC; all zero = the config's gateway_mac */
	__u8 is_v6;           /* outer header family */
	__u8 flags;           /* BACKEND_F_* */
	__u64 services;       /* bit s set = member of service s */
};

#define BACKEND_F_PRESENT 0x1  /* the slot holds a backend */
#define BACKEND_F_DRAINING 0x2 /* no new flows; flows holding a lease stay */

/* Connection table value. Timestamps are the datapath clock (bpf/include/clock.h). */
#define CONN_F_CLIENT_CLOSED 0x01 /* the client sent FIN/RST: no aggregate lease keeps it alive */

struct conn_value {
	__u64 lease_expiry_ns; /* the flow's own lease: valid while now < lease_expiry_ns */
	__u64 created_ns;      /* when the LB picked this backend */
	__u32 backend_id;
	__u8 level;            /* granularity level whose aggregate lease also keeps it alive */
	__u8 flags;            /* CONN_F_*: CONN_F_CLIENT_CLOSED once the client sent FIN or RST */
	__u16 vip_index;       /* the VIP's stats slot: a leased flow is forwarded without a VIP lookup */
};

/* Aggregate table key: (level, tuple & mask[level]) and a backend id (docs/lb.md "Aggregates").
 * backend_id 0 = the aggregate's own entry: every new member flow goes to its backend.
 * backend_id B = a cover entry: the lease of B's flows that predate a level change (they keep
 * their connection entry and backend) while the aggregate's own entry names another backend. */
struct agg_lease_key {
	struct agg_key agg;
	__u32 backend_id;
};

#define AGG_OWN_ENTRY 0 /* agg_lease_key.backend_id of the aggregate's own entry */

/* Aggregate table value. Timestamps are the datapath clock (bpf/include/clock.h). */
struct agg_lease {
	__u64 lease_expiry_ns; /* the aggregate's lease: valid while now < lease_expiry_ns */
	__u64 created_ns;      /* when the LB picked this backend */
	__u32 backend_id;      /* the backend of every member */
	__u32 flow_count;      /* members: the server's last published count, + SYNs seen since */
	__u16 vip_index;       /* stats slot of the VIP that created it */
	__u8 pad[6];
};

/* Singleton settings written by the control plane (connpub.lbctl.init_lb_maps). */
struct lb_config {
	__u8 lb_addr6[16];        /* outer source of IPv6 tunnels */
	__be32 lb_addr4;          /* outer source of IPv4 tunnels */
	__u32 mtu;                /* largest encapsulated IP packet; 0 = DEFAULT_MTU */
	__u64 initial_lease_ns;   /* lease of a flow the LB has just picked a backend for */
	__u8 src_mac[6];          /* Ethernet source of forwarded frames */
	__u8 gateway_mac[6];      /* Ethernet destination when a backend has no MAC */
	__u8 use_redirect;        /* 1: XDP_REDIRECT via tx_port[0]; 0: XDP_TX */
	__u8 pad[3];
	__u64 close_linger_ns;    /* a flow's lease after its client's FIN/RST (late ACKs pass) */
};

/* Per-VIP and per-backend counters (per-CPU). */
struct lb_stats {
	__u64 packets;
	__u64 bytes;          /* inner IP bytes forwarded */
	__u64 new_flows;      /* backend picks by Maglev (new flows, misses, SYN reuse) */
	__u64 lease_hits;     /* forwarded on the flow's own lease */
	__u64 agg_hits;       /* forwarded on an aggregate lease only */
	__u64 lease_misses;   /* known flow or aggregate, lease expired, not a SYN */
	__u64 agg_inserts;    /* aggregate entries the datapath created (or re-picked) */
};

/* Per-CPU global counters. Outcomes: every packet is counted in exactly one of the first group. */
enum lb_stat {
	STAT_FORWARDED = 0,    /* encapsulated and sent (XDP_TX / XDP_REDIRECT) */
	STAT_NOT_VIP,          /* TCP/UDP not to a VIP: XDP_PASS */
	STAT_NON_IP,           /* neither IPv4 nor IPv6: XDP_PASS */
	STAT_TRUNCATED,        /* a header runs past the end of the packet: XDP_PASS */
	STAT_MALFORMED,        /* impossible header fields: XDP_PASS */
	STAT_FRAGMENT,         /* IP fragment: XDP_PASS */
	STAT_UNSUPPORTED,      /* IP but not TCP/UDP (ICMP, ...): XDP_PASS */
	STAT_TUNNELLED,        /* arrived already encapsulated: XDP_PASS */
	STAT_NO_BACKEND,       /* VIP whose service has no usable backend: XDP_DROP */
	STAT_TOO_BIG,          /* encapsulated packet would exceed the MTU: XDP_DROP */
	STAT_ENCAP_FAILED,     /* bpf_xdp_adjust_head failed (no headroom): XDP_DROP */
	STAT_NO_CONFIG,        /* config singleton missing (cannot happen with an array): XDP_PASS */
	STAT_OUTCOME_COUNT,    /* -- events below, not outcomes -- */
	STAT_NEW_FLOW = STAT_OUTCOME_COUNT, /* Maglev picks for flows not in the table */
	STAT_LEASE_HIT,        /* known flow forwarded on its own lease */
	STAT_AGG_HIT,          /* known flow forwarded on an aggregate lease */
	STAT_LEASE_MISS,       /* known flow, both leases expired, not a SYN: re-picked */
	STAT_SYN_REUSE,        /* known flow, both leases expired, a SYN: re-picked, no miss */
	STAT_MIDSTREAM_NEW,    /* unknown TCP flow whose packet is not a SYN (evicted / other LB) */
	STAT_BACKEND_GONE,     /* a flow's backend was removed: re-picked */
	STAT_CONN_INSERT_FAILED, /* the connection or aggregate table refused an insert (forwarded anyway) */
	STAT_CLIENT_CLOSED,    /* a known flow's client sent its first FIN/RST */
	STAT_BYTES,            /* inner IP bytes forwarded */
	STAT_AGG_INSERT,       /* aggregate entry created or re-picked by Maglev over the masked tuple */
	STAT_AGG_MEMBER,       /* a flow without a connection entry forwarded on its aggregate's entry */
	STAT_AGG_MISS,         /* expired aggregate entry + TCP non-SYN (also counted in lease_miss) */
	STAT_TRANSITION_FLOW,  /* a new member got a flow entry: its tuple's aggregate at an earlier
				* level names another backend */
	STAT_HELD_HIT,         /* a non-SYN packet without a connection entry (the LRU evicted it)
				* found its flow in `held`: kept on its backend */
	STAT_HELD_DROPPED,     /* a SYN reusing the tuple of a held flow: the held copy is deleted */
	STAT_COUNT,
};

#endif /* CONNPUB_LB_STRUCTS_H */
