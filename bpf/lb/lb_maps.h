/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of the LB-node program, each pinned under PIN_DIR. */
#ifndef CONNPUB_LB_MAPS_H
#define CONNPUB_LB_MAPS_H

#include "lb_structs.h"

/* (vip, vip port, proto) -> service id, stats slot, flags, class level */
BPF_TABLE_PINNED("hash", struct class_key, struct vip_meta, vips, MAX_VIPS, PIN_DIR "/vips");
/* vip_filter_slot(vip, port, proto) -> VIPs in that slot; 0 = surely not a VIP (no hash lookup) */
BPF_TABLE_PINNED("array", __u32, __u32, vip_filter, 1 << VIP_FILTER_BITS, PIN_DIR "/vip_filter");
/* (service * MAGLEV_BANKS + bank) * MAGLEV_SIZE + slot -> backend id (0 = none) */
BPF_TABLE_PINNED("array", __u32, __u32, maglev, MAGLEV_ENTRIES, PIN_DIR "/maglev");
/* service id -> the bank packets read; flipped only after the other bank is fully written */
BPF_TABLE_PINNED("array", __u32, __u32, maglev_bank, MAX_SERVICES, PIN_DIR "/maglev_bank");
/* backend id -> address, next-hop MAC, flags, services */
BPF_TABLE_PINNED("array", __u32, struct backend, backends, MAX_BACKENDS, PIN_DIR "/backends");
/* flow tuple -> backend, lease expiry, level, created */
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct conn_value, conns, MAX_CONNS, PIN_DIR "/conns");
/* flow tuple -> a copy of its connection entry, for the flows of a class that changed level
 * (level-0 flows, transition flows): a plain hash, never evicted, written by the LB agent (and
 * by the datapath for transition flows), read on a connection-table miss (docs/lb.md "Held
 * flows") */
BPF_TABLE_PINNED("hash", struct flow_key, struct conn_value, held, MAX_CONNS, PIN_DIR "/held", BPF_F_NO_PREALLOC);
/* (level, masked tuple, 0 = own entry | backend id = cover) -> backend, lease expiry, members */
BPF_TABLE_PINNED("lru_hash", struct agg_lease_key, struct agg_lease, agg_leases, MAX_AGG_LEASES, PIN_DIR "/agg_leases");
/* MASK_INDEX(level, is_v6) -> mask ANDed with the flow tuple (same layout as the server's) */
BPF_TABLE_PINNED("array", __u32, struct flow_key, masks, MASK_SLOTS, PIN_DIR "/masks");
/* [0] -> settings written by the control plane */
BPF_TABLE_PINNED("array", __u32, struct lb_config, config, 1, PIN_DIR "/config");
/* [0] -> ifindex of the egress interface when config.use_redirect is set */
BPF_XDP_REDIRECT_MAP("devmap:" PIN_DIR "/tx_port", int, tx_port, 1);
/* vip_index -> per-CPU counters of that VIP */
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_stats, vip_stats, MAX_VIPS, PIN_DIR "/vip_stats");
/* backend id -> per-CPU counters of that backend */
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_stats, backend_stats, MAX_BACKENDS, PIN_DIR "/backend_stats");
/* enum lb_stat -> per-CPU counter */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, stats, STAT_COUNT, PIN_DIR "/stats");

#endif /* CONNPUB_LB_MAPS_H */
