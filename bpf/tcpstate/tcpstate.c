/* SPDX-License-Identifier: GPL-2.0 */
/* Records when a TCP socket of one network namespace becomes or stops being ESTABLISHED (raw
 * tracepoint sock:inet_sock_set_state), so the server agent knows which connections are open. */
#include <linux/tcp.h>
#include <net/sock.h>
#include <net/net_namespace.h>
#include <net/inet_sock.h>

#include "flow.h"
#include "clock.h"
#include "tcpstate_maps.h"

/* Read a field at the running kernel's offset (tcpstate_consts.h; plain pointer arithmetic,
 * which bcc does not rewrite). */
#define READ_AT(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(base) + (off))
#define READ_BYTES_AT(dst, len, base, off) \
	bpf_probe_read_kernel((dst), (len), (void *)(base) + (off))

static __always_inline void count(__u32 stat)
{
	__u64 *value = tcpstate_stats.lookup(&stat);

	if (value)
		*value += 1;
}

/* The connection as the server program keys it: client = remote end, vip = local end. IPv4 is
 * stored IPv4-mapped; an IPv6 socket with mapped addresses gives the same key. */
static __always_inline void key_of(struct sock *sk, __u16 family, struct flow_key *key)
{
	__be16 local_port = 0;
	__be16 remote_port = 0;

	READ_AT(local_port, sk, OFF_INET_SPORT);
	READ_AT(remote_port, sk, OFF_SK_DPORT);
	if (family == AF_INET) {
		key->client_addr[10] = 0xff;
		key->client_addr[11] = 0xff;
		key->vip_addr[10] = 0xff;
		key->vip_addr[11] = 0xff;
		READ_BYTES_AT(&key->client_addr[12], 4, sk, OFF_SK_DADDR);
		READ_BYTES_AT(&key->vip_addr[12], 4, sk, OFF_SK_RCV_SADDR);
	} else {
		READ_BYTES_AT(key->client_addr, 16, sk, OFF_SK_V6_DADDR);
		READ_BYTES_AT(key->vip_addr, 16, sk, OFF_SK_V6_RCV_SADDR);
	}
	key->client_port = remote_port;
	key->vip_port = local_port;
	key->proto = IPPROTO_TCP;
}

/* Stamp the connection's flow entry (if the server program tracks it) with its socket state, so
 * the agent reads both in one table. changed_ns is written first: a reader that sees the new
 * state sees the new time too (x86 keeps store order; barrier() keeps the compiler's). */
static __always_inline void stamp_flow(struct flow_key *key, const struct sock_state *value)
{
#if STAMP_FLOWS
	struct flow_value *flow = flows.lookup(key);
	__u32 zero = 0;
	__u32 *epoch = tcpstate_epoch.lookup(&zero);

	if (!flow || !epoch) {
		count(TSTAT_NO_FLOW);
		return;
	}
	flow->sock_changed_ns = value->changed_ns;
	flow->sock_epoch = *epoch;
	barrier();
	flow->sock_state = value->state;
	count(TSTAT_FLOW_STAMPED);
#endif
}

/* What one state change does; returns the counter of its outcome. */
static __always_inline __u32 record(struct sock *sk, int old_state, int new_state)
{
	struct flow_key key = {};
	struct sock_state value = {};
	__u16 protocol = 0;
	__u16 family = 0;
	__u32 netns = 0;
	struct net *net = NULL;

	READ_AT(protocol, sk, OFF_SK_PROTOCOL);
	if (protocol != IPPROTO_TCP)
		return TSTAT_IGNORED;
	READ_AT(net, sk, OFF_SK_NET);
	if (net)
		READ_AT(netns, net, OFF_NET_NS_INUM);
	if (NETNS_INO != 0 && netns != NETNS_INO)
		return TSTAT_OTHER_NETNS;
	if (new_state != TCP_ESTABLISHED && old_state != TCP_ESTABLISHED)
		return TSTAT_IGNORED;
	READ_AT(family, sk, OFF_SK_FAMILY);
	if (family != AF_INET && family != AF_INET6)
		return TSTAT_IGNORED;
	key_of(sk, family, &key);
	value.changed_ns = datapath_now_ns();
	value.state = (__u8)new_state;
	value.old_state = (__u8)old_state;
	/* BPF_ANY both ways: a close recorded before the agent's seed wins over the seed
	 * (the agent seeds with BPF_NOEXIST) */
	stamp_flow(&key, &value);
	if (tcp_sockets.update(&key, &value) != 0)
		return TSTAT_MAP_FULL;
	return new_state == TCP_ESTABLISHED ? TSTAT_ESTABLISHED : TSTAT_LEFT_ESTABLISHED;
}

/* raw tracepoint args: const struct sock *sk, const int oldstate, const int newstate.
 * One exit, counting the outcome (and every event of the watched namespace). */
int on_inet_sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 outcome = record((struct sock *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2]);

	if (outcome != TSTAT_OTHER_NETNS)
		count(TSTAT_EVENTS);
	count(outcome);
	return 0;
}
