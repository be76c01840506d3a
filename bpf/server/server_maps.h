/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of the server-node program, each pinned under PIN_DIR. */
#ifndef CONNPUB_SERVER_MAPS_H
#define CONNPUB_SERVER_MAPS_H

#include "server_structs.h"

/* flow tuple -> counters, timestamps, flags, sketch, level */
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_value, flows, MAX_FLOWS, PIN_DIR "/flows",
		 FLOWS_MAP_FLAGS);
/* (level, masked tuple) -> per-CPU aggregate counters, for flows at levels 1-3 */
BPF_TABLE_PINNED("percpu_hash", struct agg_key, struct agg_value, aggregates, MAX_AGGREGATES,
		 PIN_DIR "/aggregates");
/* traffic class (vip, vip port, proto) -> granularity level, written by the server agent */
BPF_TABLE_PINNED("hash", struct class_key, __u8, class_levels, MAX_CLASSES, PIN_DIR "/class_levels");
/* MASK_INDEX(level, is_v6) -> mask ANDed with the flow tuple */
BPF_TABLE_PINNED("array", __u32, struct flow_key, masks, MASK_SLOTS, PIN_DIR "/masks");
/* [0] -> settings written by the control plane */
BPF_TABLE_PINNED("array", __u32, struct server_config, config, 1, PIN_DIR "/config");
/* enum server_stat -> per-CPU counter */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, stats, STAT_COUNT, PIN_DIR "/stats");

#endif /* CONNPUB_SERVER_MAPS_H */
