/* SPDX-License-Identifier: GPL-2.0 */
/* The datapath clock: jiffies in nanoseconds. bpf_jiffies64() is inlined by the JIT (free);
 * bpf_ktime_get_ns() costs ~30 ns per packet here, so the per-packet timestamps use this. */
#ifndef CONNPUB_CLOCK_H
#define CONNPUB_CLOCK_H

#ifndef NS_PER_JIFFY
#define NS_PER_JIFFY 4000000ULL /* HZ=250; the loader passes the calibrated value */
#endif

static __always_inline __u64 datapath_now_ns(void)
{
	return bpf_jiffies64() * NS_PER_JIFFY;
}

#endif /* CONNPUB_CLOCK_H */
