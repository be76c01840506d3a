/* SPDX-License-Identifier: GPL-2.0 */
/* Outcome helpers shared by the programs; include after the program's structs header, whose enum
 * defines STAT_TRUNCATED, STAT_MALFORMED, STAT_FRAGMENT, STAT_NON_IP and STAT_UNSUPPORTED.
 * (count() stays in each .c: bcc rewrites map calls such as stats.lookup() only in the main
 * file, not in headers.) */
#ifndef CONNPUB_STATS_HELPERS_H
#define CONNPUB_STATS_HELPERS_H

/* The outcome counter of a parse_flow() error. */
static __always_inline __u32 outcome_of_parse_error(int err)
{
	switch (err) {
	case PARSE_TRUNCATED:
		return STAT_TRUNCATED;
	case PARSE_MALFORMED:
		return STAT_MALFORMED;
	case PARSE_FRAGMENT:
		return STAT_FRAGMENT;
	case PARSE_NOT_IP:
		return STAT_NON_IP;
	default:
		return STAT_UNSUPPORTED;
	}
}

#endif /* CONNPUB_STATS_HELPERS_H */
