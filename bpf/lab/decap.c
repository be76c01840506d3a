// SPDX-License-Identifier: Apache-2.0
/* Lab helpers: tc-ingress IPIP/IP6IP6 decapsulation (this kernel has no ipip/ip6tnl) and XDP_PASS. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

/* Kernel >= 6.3 flags (uapi enum), missing from the bcc headers of this machine. */
#define LAB_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define LAB_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)

/* index 0: packets decapsulated, 1: decapsulation failures */
BPF_ARRAY(lab_decap_stats, u64, 2);

static __always_inline void count(u32 index)
{
    u64 *value = lab_decap_stats.lookup(&index);
    if (value)
        __sync_fetch_and_add(value, 1);
}

/* Strip the outer IPv4 (proto 4 or 41) or IPv6 (next header 4 or 41) header of a tunnelled
 * packet so the inner packet goes up the stack, as a collect-md ipip/ip6tnl device would. */
int lab_decap(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    u32 outer_len;
    u8 inner_proto;

    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end || ip->ihl != 5 || (ip->frag_off & htons(0x3fff)))
            return TC_ACT_OK;
        inner_proto = ip->protocol;
        outer_len = sizeof(*ip);
    } else if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return TC_ACT_OK;
        inner_proto = ip6->nexthdr;
        outer_len = sizeof(*ip6);
    } else {
        return TC_ACT_OK;
    }

    u64 flags;
    u16 inner_ethertype;
    if (inner_proto == IPPROTO_IPIP) {
        flags = LAB_ADJ_ROOM_DECAP_L3_IPV4;
        inner_ethertype = htons(ETH_P_IP);
    } else if (inner_proto == IPPROTO_IPV6) {
        flags = LAB_ADJ_ROOM_DECAP_L3_IPV6;
        inner_ethertype = htons(ETH_P_IPV6);
    } else {
        return TC_ACT_OK;
    }
    if (bpf_skb_adjust_room(skb, -(s32)outer_len, BPF_ADJ_ROOM_MAC, flags) ||
        bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &inner_ethertype,
                            sizeof(inner_ethertype), 0)) {
        count(1);
        return TC_ACT_SHOT;
    }
    count(0);
    return TC_ACT_OK;
}

/* Pass-through XDP program: a veth peer needs one for native XDP_TX towards it. */
int lab_xdp_pass(struct xdp_md *ctx)
{
    return XDP_PASS;
}
