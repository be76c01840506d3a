/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of the TCP socket-state program, each pinned under PIN_DIR. */
#ifndef CONNPUB_TCPSTATE_MAPS_H
#define CONNPUB_TCPSTATE_MAPS_H

#include "tcpstate_structs.h"
#if STAMP_FLOWS
#include "server_structs.h"
#endif

/* connection tuple (server program orientation) -> latest state; the server agent seeds it
 * from sock_diag and deletes entries once their connection is finished */
BPF_TABLE_PINNED("hash", struct flow_key, struct sock_state, tcp_sockets, MAX_SOCKETS,
		 PIN_DIR "/tcp_sockets", SOCKETS_MAP_FLAGS);
#if STAMP_FLOWS
/* the server program's flow table (created and pinned by it; MAX_FLOWS and FLOWS_MAP_FLAGS are
 * set to the pinned table's): record() stamps the connection's entry */
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_value, flows, MAX_FLOWS, PIN_DIR "/flows",
		 FLOWS_MAP_FLAGS);
#endif
/* [0] -> recording epoch written with each stamp: the watcher raises it when a load follows a
 * time nothing recorded, so the agent stops trusting older stamps */
BPF_TABLE_PINNED("array", __u32, __u32, tcpstate_epoch, 1, PIN_DIR "/tcpstate_epoch");
/* enum tcpstate_stat -> per-CPU counter */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, tcpstate_stats, TSTAT_COUNT,
		 PIN_DIR "/tcpstate_stats");

#endif /* CONNPUB_TCPSTATE_MAPS_H */
