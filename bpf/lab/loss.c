// SPDX-License-Identifier: Apache-2.0
/* Lab helper: drop a random fraction of packets at tc (loss impairment where sch_netem is absent). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

/* [0]: drop when bpf_get_prandom_u32() < this (loss fraction * 2^32) */
BPF_ARRAY(lab_loss_threshold, u32, 1);
/* [0]: packets dropped, [1]: packets passed */
BPF_ARRAY(lab_loss_stats, u64, 2);

int lab_loss(struct __sk_buff *skb)
{
    u32 zero = 0, verdict_index = 1;
    u32 *threshold = lab_loss_threshold.lookup(&zero);
    int drop = threshold && bpf_get_prandom_u32() < *threshold;
    if (drop)
        verdict_index = 0;
    u64 *count = lab_loss_stats.lookup(&verdict_index);
    if (count)
        __sync_fetch_and_add(count, 1);
    return drop ? TC_ACT_SHOT : TC_ACT_OK;
}
