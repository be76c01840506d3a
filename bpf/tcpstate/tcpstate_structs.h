/* SPDX-License-Identifier: GPL-2.0 */
/* Key and value layouts of the TCP socket-state program's maps. */
#ifndef CONNPUB_TCPSTATE_STRUCTS_H
#define CONNPUB_TCPSTATE_STRUCTS_H

#include "tcpstate_consts.h"

/* The key is struct flow_key (bpf/include/flow.h) as the server program sees the connection:
 * client = the socket's remote end, vip = its local end, ports in network order, proto 6. */

/* Latest state of one server-side TCP connection. */
struct sock_state {
	__u64 changed_ns;  /* datapath clock (bpf/include/clock.h) of the change */
	__u8 state;        /* TCP_ESTABLISHED (1), or the first state after it (4 FIN_WAIT1: the
			    * server closed, 8 CLOSE_WAIT: the client closed, 7 CLOSE: reset) */
	__u8 old_state;    /* the state it left */
	__u8 pad[6];
};

/* Per-CPU counters. */
enum tcpstate_stat {
	TSTAT_EVENTS = 0,      /* state changes seen in the watched namespace (any socket) */
	TSTAT_OTHER_NETNS,     /* state changes of sockets in another namespace (ignored) */
	TSTAT_ESTABLISHED,     /* entries written: socket became ESTABLISHED */
	TSTAT_LEFT_ESTABLISHED,/* entries written: socket left ESTABLISHED */
	TSTAT_IGNORED,         /* not TCP, or a transition neither into nor out of ESTABLISHED */
	TSTAT_MAP_FULL,        /* an update failed (table full) */
	TSTAT_FLOW_STAMPED,    /* the connection's entry in the server's flow table was stamped */
	TSTAT_NO_FLOW,         /* stamping on: the flow table had no entry for the connection */
	TSTAT_COUNT,
};

#endif /* CONNPUB_TCPSTATE_STRUCTS_H */
