/* SPDX-License-Identifier: GPL-2.0 */
/* Tunables of the LB-node program; each can be overridden with bcc cflags -DNAME=value. */
#ifndef CONNPUB_LB_CONSTS_H
#define CONNPUB_LB_CONSTS_H

#ifndef MAX_CONNS
#define MAX_CONNS 1048576 /* entries of the connection LRU table */
#endif
#ifndef MAX_AGG_LEASES
#define MAX_AGG_LEASES 262144 /* entries of the aggregate-lease LRU table */
#endif
#ifndef MAX_VIPS
#define MAX_VIPS 256 /* (vip, port, proto) entries; also the per-VIP stats slots */
#endif
#ifndef VIP_FILTER_BITS
#define VIP_FILTER_BITS 12 /* the VIP pre-filter has 2^VIP_FILTER_BITS slots */
#endif
#ifndef MAX_SERVICES
#define MAX_SERVICES 16 /* services with a Maglev table; at most 64 (a backend's services bitmask) */
#endif
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 1024 /* backend ids 1..MAX_BACKENDS-1; id 0 means "no backend" */
#endif
#ifndef MAGLEV_SIZE
#define MAGLEV_SIZE 65537 /* slots of one Maglev table; must be prime */
#endif
#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/connpub/root/unnamed" /* the loader always sets this */
#endif

#if MAX_VIPS > 65536
#error "MAX_VIPS must be <= 65536: a connection keeps its VIP's stats slot in 16 bits"
#endif
#if MAX_SERVICES > 64
#error "MAX_SERVICES must be <= 64: struct backend keeps the services it serves in a u64 bitmask"
#endif

#define MAGLEV_BANKS 2 /* a table is rebuilt into the idle bank, then the bank index flips */
#define MAGLEV_ENTRIES ((__u32)MAX_SERVICES * MAGLEV_BANKS * MAGLEV_SIZE)

#ifndef FLOW_HASH_SEED
#define FLOW_HASH_SEED 0x5bd1e9955bd1e995ULL /* seed of the flow hash; connpub.maglev mirrors it */
#endif

#define IPIP_TTL 64 /* TTL / hop limit of the outer header */
#define DEFAULT_MTU 1500

#endif /* CONNPUB_LB_CONSTS_H */
