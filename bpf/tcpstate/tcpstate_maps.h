/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of the TCP socket-state program, each pinned under PIN_DIR. */
#ifndef CONNPUB_TCPSTATE_MAPS_H
#define CONNPUB_TCPSTATE_MAPS_H

#include "tcpstate_structs.h"

/* connection tuple (server program orientation) -> latest state; the server agent seeds it
 * from sock_diag and deletes entries once their connection is finished */
BPF_TABLE_PINNED("hash", struct flow_key, struct sock_state, tcp_sockets, MAX_SOCKETS,
		 PIN_DIR "/tcp_sockets", SOCKETS_MAP_FLAGS);
/* enum tcpstate_stat -> per-CPU counter */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, tcpstate_stats, TSTAT_COUNT,
		 PIN_DIR "/tcpstate_stats");

#endif /* CONNPUB_TCPSTATE_MAPS_H */
