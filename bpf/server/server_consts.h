/* SPDX-License-Identifier: GPL-2.0 */
/* Tunables of the server-node program; each can be overridden with bcc cflags -DNAME=value. */
#ifndef CONNPUB_SERVER_CONSTS_H
#define CONNPUB_SERVER_CONSTS_H

#ifndef MAX_FLOWS
#define MAX_FLOWS 1048576 /* entries of the per-flow LRU table */
#endif
#ifndef FLOWS_MAP_FLAGS
#define FLOWS_MAP_FLAGS 0 /* BPF_F_NO_COMMON_LRU: per-CPU LRU lists, capacity split per CPU */
#endif
#ifndef MAX_AGGREGATES
#define MAX_AGGREGATES 262144 /* entries of the aggregation table (levels 1-3) */
#endif
#ifndef MAX_CLASSES
#define MAX_CLASSES 4096 /* traffic classes with an explicit level */
#endif
#ifndef SKETCH_PACKETS
#define SKETCH_PACKETS 8 /* first-N packets whose sizes and gaps are kept for the model */
#endif
#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/connpub/root/unnamed" /* the loader always sets this */
#endif

#endif /* CONNPUB_SERVER_CONSTS_H */
