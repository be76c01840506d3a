/* SPDX-License-Identifier: GPL-2.0 */
/* Packet parsers shared by every connpub XDP program: a cursor and one parse_* per header. */
#ifndef CONNPUB_PARSING_HELPERS_H
#define CONNPUB_PARSING_HELPERS_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "flow.h"

#ifndef VLAN_MAX_DEPTH
#define VLAN_MAX_DEPTH 2 /* 802.1Q, and 802.1ad QinQ: outer S-tag + inner C-tag */
#endif
#ifndef IPV6_EXT_MAX_CHAIN
#define IPV6_EXT_MAX_CHAIN 4 /* extension headers skipped before giving up */
#endif

#define PARSE_TRUNCATED -1 /* a header runs past the end of the packet */
#define PARSE_MALFORMED -2 /* a header is there but its fields are impossible */
#define PARSE_FRAGMENT -3  /* an IP fragment: no L4 header to read */

#define IPV4_FRAG_MASK 0x3FFF /* IP_MF | IP_OFFSET of frag_off (host order) */

struct hdr_cursor {
	void *pos;
};

struct vlan_hdr {
	__be16 h_vlan_TCI;
	__be16 h_vlan_encapsulated_proto;
};

/* What the programs need from one packet, filled by parse_flow(). */
struct packet_info {
	struct flow_key key; /* the (inner) client -> vip tuple */
	__u32 l3_offset;     /* offset of the outermost IP header from the frame start */
	__u32 l3_len;        /* length of the inner IP packet (header + payload); IPv6's
			      * payload_len + 40 can exceed 16 bits */
	__be16 l3_proto;     /* ethertype of the outermost IP header */
	__u8 tcp_flags;      /* TCP flags byte (0 for UDP) */
	__u8 is_v6;          /* inner header is IPv6 */
	__u8 encapsulated;   /* arrived inside IPIP / IPv6-in-IPv6 / 4in6 / 6in4 */
	__u8 pad;
};

/* Ethernet plus up to VLAN_MAX_DEPTH VLAN tags. Returns the ethertype (network order). */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end, struct ethhdr **ethhdr)
{
	struct ethhdr *eth = nh->pos;
	struct vlan_hdr *vlh;
	__be16 h_proto;

	if ((void *)(eth + 1) > data_end)
		return PARSE_TRUNCATED;
	nh->pos = eth + 1;
	*ethhdr = eth;
	h_proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < VLAN_MAX_DEPTH; i++) {
		if (h_proto != bpf_htons(ETH_P_8021Q) && h_proto != bpf_htons(ETH_P_8021AD))
			break;
		vlh = nh->pos;
		if ((void *)(vlh + 1) > data_end)
			return PARSE_TRUNCATED;
		h_proto = vlh->h_vlan_encapsulated_proto;
		nh->pos = vlh + 1;
	}
	return h_proto;
}

/* IPv4 with options. Returns the protocol of the next header. */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end, struct iphdr **iphdr)
{
	struct iphdr *iph = nh->pos;
	int hdrsize;

	if ((void *)(iph + 1) > data_end)
		return PARSE_TRUNCATED;
	if (iph->version != 4 || iph->ihl < 5)
		return PARSE_MALFORMED;
	hdrsize = iph->ihl * 4;
	if (nh->pos + hdrsize > data_end)
		return PARSE_TRUNCATED;
	if (bpf_ntohs(iph->tot_len) < hdrsize)
		return PARSE_MALFORMED;
	if (iph->frag_off & bpf_htons(IPV4_FRAG_MASK))
		return PARSE_FRAGMENT;
	nh->pos += hdrsize;
	*iphdr = iph;
	return iph->protocol;
}

/* IPv6, skipping hop-by-hop, routing, destination-options and AH headers. */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end, struct ipv6hdr **ip6hdr)
{
	struct ipv6hdr *ip6h = nh->pos;
	__u8 nexthdr;

	if ((void *)(ip6h + 1) > data_end)
		return PARSE_TRUNCATED;
	if (ip6h->version != 6)
		return PARSE_MALFORMED;
	nh->pos = ip6h + 1;
	*ip6hdr = ip6h;
	nexthdr = ip6h->nexthdr;
#pragma unroll
	for (int i = 0; i < IPV6_EXT_MAX_CHAIN; i++) {
		__u8 *ext = nh->pos;
		int extlen;

		if (nexthdr == IPPROTO_FRAGMENT)
			return PARSE_FRAGMENT;
		if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING &&
		    nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_AH)
			break;
		if ((void *)(ext + 2) > data_end)
			return PARSE_TRUNCATED;
		if (nexthdr == IPPROTO_AH)
			extlen = (ext[1] + 2) * 4;
		else
			extlen = (ext[1] + 1) * 8;
		if (nh->pos + extlen > data_end)
			return PARSE_TRUNCATED;
		nexthdr = ext[0];
		nh->pos += extlen;
	}
	return nexthdr;
}

static __always_inline int parse_tcphdr(struct hdr_cursor *nh, void *data_end, struct tcphdr **tcphdr)
{
	struct tcphdr *tcph = nh->pos;
	int len;

	if ((void *)(tcph + 1) > data_end)
		return PARSE_TRUNCATED;
	len = tcph->doff * 4;
	if (len < (int)sizeof(*tcph))
		return PARSE_MALFORMED;
	if (nh->pos + len > data_end)
		return PARSE_TRUNCATED;
	nh->pos += len;
	*tcphdr = tcph;
	return len;
}

static __always_inline int parse_udphdr(struct hdr_cursor *nh, void *data_end, struct udphdr **udphdr)
{
	struct udphdr *h = nh->pos;

	if ((void *)(h + 1) > data_end)
		return PARSE_TRUNCATED;
	if (bpf_ntohs(h->len) < sizeof(*h))
		return PARSE_MALFORMED;
	nh->pos = h + 1;
	*udphdr = h;
	return bpf_ntohs(h->len) - sizeof(*h);
}

static __always_inline int is_v4_mapped(const struct in6_addr *addr)
{
	return addr->in6_u.u6_addr32[0] == 0 && addr->in6_u.u6_addr32[1] == 0 &&
	       addr->in6_u.u6_addr32[2] == bpf_htonl(0x0000ffff);
}

/* One IP header (v4 or v6) into the key's addresses; returns the next protocol. */
static __always_inline int parse_ip_into_key(struct hdr_cursor *nh, void *data_end, int is_v6,
					     struct packet_info *pkt)
{
	int proto;

	if (is_v6) {
		struct ipv6hdr *ip6h;

		proto = parse_ip6hdr(nh, data_end, &ip6h);
		if (proto < 0)
			return proto;
		/* IPv4-mapped addresses never appear in an IPv6 header (RFC 4291 2.5.5.2); in the
		 * key they mean IPv4, so such a packet would share an IPv4 flow's key */
		if (is_v4_mapped(&ip6h->saddr) || is_v4_mapped(&ip6h->daddr))
			return PARSE_MALFORMED;
		__builtin_memcpy(pkt->key.client_addr, &ip6h->saddr, 16);
		__builtin_memcpy(pkt->key.vip_addr, &ip6h->daddr, 16);
		pkt->l3_len = bpf_ntohs(ip6h->payload_len) + sizeof(*ip6h);
	} else {
		struct iphdr *iph;

		proto = parse_iphdr(nh, data_end, &iph);
		if (proto < 0)
			return proto;
		__builtin_memset(pkt->key.client_addr, 0, 10);
		pkt->key.client_addr[10] = 0xff;
		pkt->key.client_addr[11] = 0xff;
		__builtin_memcpy(&pkt->key.client_addr[12], &iph->saddr, 4);
		__builtin_memset(pkt->key.vip_addr, 0, 10);
		pkt->key.vip_addr[10] = 0xff;
		pkt->key.vip_addr[11] = 0xff;
		__builtin_memcpy(&pkt->key.vip_addr[12], &iph->daddr, 4);
		pkt->l3_len = bpf_ntohs(iph->tot_len);
	}
	pkt->is_v6 = is_v6;
	return proto;
}

/* Parse a frame down to its (inner) TCP/UDP tuple. One level of IPIP / IPv6-in-IPv6 / 4in6 /
 * 6in4 is removed: the tuple is the inner one. Returns 0 on success or a PARSE_* error, or
 * PARSE_NOT_IP / PARSE_UNSUPPORTED (defined below) when there is nothing to track. */
#define PARSE_NOT_IP -4
#define PARSE_UNSUPPORTED -5
static __always_inline int parse_flow(void *data, void *data_end, struct packet_info *pkt)
{
	struct hdr_cursor nh = {.pos = data};
	struct ethhdr *eth;
	int eth_type, proto, is_v6;

	eth_type = parse_ethhdr(&nh, data_end, &eth);
	if (eth_type < 0)
		return eth_type;
	if (eth_type == bpf_htons(ETH_P_IP))
		is_v6 = 0;
	else if (eth_type == bpf_htons(ETH_P_IPV6))
		is_v6 = 1;
	else
		return PARSE_NOT_IP;
	pkt->l3_offset = nh.pos - data;
	pkt->l3_proto = eth_type;

	proto = parse_ip_into_key(&nh, data_end, is_v6, pkt);
	if (proto < 0)
		return proto;
	if (proto == IPPROTO_IPIP || proto == IPPROTO_IPV6) {
		pkt->encapsulated = 1;
		proto = parse_ip_into_key(&nh, data_end, proto == IPPROTO_IPV6, pkt);
		if (proto < 0)
			return proto;
	}

	pkt->key.proto = proto;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcph;
		int ret = parse_tcphdr(&nh, data_end, &tcph);

		if (ret < 0)
			return ret;
		pkt->key.client_port = tcph->source;
		pkt->key.vip_port = tcph->dest;
		pkt->tcp_flags = ((__u8 *)tcph)[13];
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *udph;
		int ret = parse_udphdr(&nh, data_end, &udph);

		if (ret < 0)
			return ret;
		pkt->key.client_port = udph->source;
		pkt->key.vip_port = udph->dest;
	} else {
		return PARSE_UNSUPPORTED;
	}
	return 0;
}

#endif /* CONNPUB_PARSING_HELPERS_H */
