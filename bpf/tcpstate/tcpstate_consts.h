/* SPDX-License-Identifier: GPL-2.0 */
/* Tunables of the TCP socket-state program; each can be overridden with bcc cflags -DNAME=value. */
#ifndef CONNPUB_TCPSTATE_CONSTS_H
#define CONNPUB_TCPSTATE_CONSTS_H

#ifndef MAX_SOCKETS
#define MAX_SOCKETS 1048576 /* entries of the socket-state table (= the server's flow table) */
#endif
#ifndef SOCKETS_MAP_FLAGS
#define SOCKETS_MAP_FLAGS BPF_F_NO_PREALLOC /* memory only for the sockets there are */
#endif
#ifndef STAMP_FLOWS
#define STAMP_FLOWS 0 /* 1: also stamp each connection's entry in the server's pinned flow table */
#endif
#ifndef NETNS_INO
#define NETNS_INO 0 /* inode of the watched network namespace; 0 = every namespace */
#endif
/* Offsets into struct sock / struct net of the RUNNING kernel: the loader reads them from its
 * BTF (/sys/kernel/btf/vmlinux), because the installed headers may be another version. The
 * fallbacks are the headers' offsets. */
#ifndef OFF_SK_DADDR
#define OFF_SK_DADDR offsetof(struct sock, __sk_common.skc_daddr)
#endif
#ifndef OFF_SK_RCV_SADDR
#define OFF_SK_RCV_SADDR offsetof(struct sock, __sk_common.skc_rcv_saddr)
#endif
#ifndef OFF_SK_DPORT
#define OFF_SK_DPORT offsetof(struct sock, __sk_common.skc_dport)
#endif
#ifndef OFF_INET_SPORT /* not skc_num: unhashing clears that before the CLOSE event */
#define OFF_INET_SPORT offsetof(struct inet_sock, inet_sport)
#endif
#ifndef OFF_SK_FAMILY
#define OFF_SK_FAMILY offsetof(struct sock, __sk_common.skc_family)
#endif
#ifndef OFF_SK_NET
#define OFF_SK_NET offsetof(struct sock, __sk_common.skc_net.net)
#endif
#ifndef OFF_SK_V6_DADDR
#define OFF_SK_V6_DADDR offsetof(struct sock, __sk_common.skc_v6_daddr)
#endif
#ifndef OFF_SK_V6_RCV_SADDR
#define OFF_SK_V6_RCV_SADDR offsetof(struct sock, __sk_common.skc_v6_rcv_saddr)
#endif
#ifndef OFF_SK_PROTOCOL
#define OFF_SK_PROTOCOL offsetof(struct sock, sk_protocol)
#endif
#ifndef OFF_NET_NS_INUM
#define OFF_NET_NS_INUM offsetof(struct net, ns.inum)
#endif
#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/connpub/root/unnamed" /* the loader always sets this */
#endif

#endif /* CONNPUB_TCPSTATE_CONSTS_H */
