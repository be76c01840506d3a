/* SPDX-License-Identifier: GPL-2.0 */
/* Key and value layouts of the server-node program's maps. */
#ifndef CONNPUB_SERVER_STRUCTS_H
#define CONNPUB_SERVER_STRUCTS_H

#include "server_consts.h"

/* One tracked flow. The first 48 bytes are what every packet touches. */
struct flow_value {
	__u64 packets;
	__u64 bytes;          /* inner IP bytes (header + payload), as the client sent them */
	__u64 first_seen_ns;  /* datapath clock (bpf/include/clock.h) of the first packet */
	__u64 last_seen_ns;   /* same clock, of the latest packet */
	__u32 class_gen;      /* levels generation the level below was taken from */
	__u8 tcp_flags;       /* OR of every TCP flags byte seen */
	__u8 level;           /* granularity level the flow is aggregated at */
	__u8 closed;          /* 1 once a FIN or RST was seen */
	__u8 sketch_count;    /* packets recorded in the sketch, <= SKETCH_PACKETS */
	/* first-N-packets sketch, for the duration model */
	__u16 sketch_size[SKETCH_PACKETS];    /* inner IP length of packet i */
	__u32 sketch_gap_us[SKETCH_PACKETS];  /* microseconds since packet i-1 (0 for i = 0) */
	__u64 sketch_last_ktime;              /* bpf_ktime_get_ns() (precise, ns) of the last sketched packet */
	/* the connection's socket, stamped by bpf/tcpstate (never by this program; 0 = not
	 * stamped): the agent reads it with the flow instead of joining the socket table */
	__u64 sock_changed_ns;  /* datapath clock of the socket's latest change */
	__u32 sock_epoch;       /* recording epoch of the tcpstate load that stamped it */
	__u8 sock_state;        /* TCP state the socket entered (1 = ESTABLISHED) */
	__u8 sock_pad[3];
};

/* One aggregate: every flow of the same class level whose masked tuple is equal. Per-CPU: plain
 * adds, no atomics; readers sum the CPUs (max for last_seen_ns). A flow may open on one CPU and
 * close on another, so one CPU's active_flows can be negative; the sum never is. */
struct agg_value {
	__u64 packets;
	__u64 bytes;
	__u64 last_seen_ns;
	__s64 active_flows;   /* up on a new flow, down on its first FIN/RST */
	__u64 total_flows;    /* flows ever counted into this aggregate */
};

/* Singleton settings written by the control plane. */
struct server_config {
	__u32 levels_gen;     /* bumped after every change of the class map or the masks */
	__u8 default_level;   /* level of a class without an entry */
	__u8 pad[3];
};

/* Per-CPU counters. Outcomes: every packet is counted in exactly one of the first group. */
enum server_stat {
	STAT_TRACKED = 0,      /* parsed, flow (and aggregate) updated */
	STAT_NON_IP,           /* neither IPv4 nor IPv6 */
	STAT_TRUNCATED,        /* a header runs past the end of the packet */
	STAT_MALFORMED,        /* impossible header fields (IHL < 5, bad version, bad lengths) */
	STAT_FRAGMENT,         /* IPv4/IPv6 fragment */
	STAT_UNSUPPORTED,      /* IP but not TCP/UDP (ICMP, nested tunnels, ...) */
	STAT_TABLE_FULL,       /* a flow or aggregate could not be inserted */
	STAT_OUTCOME_COUNT,    /* -- events below, not outcomes -- */
	STAT_NEW_FLOW = STAT_OUTCOME_COUNT, /* flow entries created */
	STAT_FLOW_CLOSED,      /* flows whose first FIN/RST was seen */
	STAT_FLOW_REOPENED,    /* a SYN on a closed flow's tuple restarted it */
	STAT_LEVEL_CHANGED,    /* a flow moved to another level after a directive */
	STAT_BYTES,            /* sum of inner IP bytes of tracked packets */
	STAT_COUNT,
};

#endif /* CONNPUB_SERVER_STRUCTS_H */
