// SPDX-License-Identifier: GPL-2.0
/*
 * connpub-loadgen: the lab's load generator (docs/lab.md, "Scale"). One thread, one epoll
 * set, non-blocking sockets: tens of thousands of concurrent TCP connections and UDP sockets
 * from one client namespace on a schedule, every echoed byte checked.
 *
 *   connpub-loadgen --plan PLAN --out RESULTS [--start-at MONO_S] [--timeout S] [--nice N]
 *   connpub-loadgen --plan PLAN --schedule      # the exchange times, no network (tests)
 *
 * PLAN and RESULTS are the binary files of connpub.traffic.driver (PLAN_REC, RESULT_REC):
 * a 16-byte header (8-byte magic, record size, count) and packed little-endian records.
 *
 * Per flow: at start_s (from --start-at, CLOCK_MONOTONIC seconds) connect from `src` to
 * `dst`:port; TCP reads the echo server's banner `connpub-echo <name>\n`. Then exchanges: send
 * chunk_bytes of the flow's payload (`<flow_id>:<exchange>:` repeated) and read the echo back
 * (UDP: one datagram, the reply is `<name>\n` + the datagram), comparing every byte. Exchange
 * times (next_wait): chunks 0 - one at once, then every gap_s until start + duration; chunks
 * > 0 - exactly `chunks`, the first head_n after head_gaps_s[k], the rest spread evenly up to
 * the flow's end, then linger_s of silence. Then close. A flow is broken when a connect, the
 * banner or an echo fails (RST, refused, short or wrong echo, no answer within --timeout). A
 * UDP datagram without answer after UDP_RESEND_S is sent again (counted in `resent`).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEAD_GAPS 8
#define TIMER_SLACK_S 0.002 /* no extra exchange for less than this before the flow's end */
#define BANNER "connpub-echo "
#define BANNER_MAX 64
#define SCRATCH 65536
#define UDP_RESEND_S 1.0 /* a datagram without answer is sent again after this (as DNS does) */

struct __attribute__((packed)) plan_rec {
	uint64_t flow_id;
	double start_s, duration_s, gap_s, linger_s;
	double head_gaps_s[HEAD_GAPS];
	uint8_t dst[16], src[16]; /* IPv6, or IPv4-mapped (::ffff:a.b.c.d) */
	uint32_t chunk_bytes, chunks;
	uint16_t port;
	uint8_t proto, head_n, family, pad[3]; /* family 4 or 6 */
};

enum stage { ST_NONE, ST_CONNECT, ST_BANNER, ST_EXCHANGE, ST_CLOSE };
/* err: an errno (ETIMEDOUT for --timeout), or one of these */
#define ERR_SHORT (-1)    /* the peer closed before the echo was complete */
#define ERR_MISMATCH (-2) /* an echoed byte differs */
#define ERR_BANNER (-3)   /* not the echo server's banner */
#define ERR_STOPPED (-4)  /* SIGTERM/SIGINT before the flow ended */

struct __attribute__((packed)) result_rec {
	uint64_t flow_id;
	double started_s, ended_s;
	uint64_t bytes_echoed;
	uint32_t chunks;
	int32_t err;
	uint16_t local_port;
	uint8_t ok, stage;
	char server[16];
	float open_s;    /* from the flow's start to its banner (TCP) or socket (UDP) */
	float rtt_max_s; /* the slowest exchange, send to the last byte of its echo */
	uint32_t resent; /* UDP datagrams sent again (no answer within UDP_RESEND_S) */
};

struct header {
	char magic[8];
	uint32_t record_size, count;
};

enum state { S_IDLE, S_CONNECTING, S_BANNER, S_WAIT, S_ECHO, S_LINGER, S_DONE };

struct conn {
	int fd;
	uint8_t state;
	uint32_t events; /* the epoll mask set */
	uint32_t sent, recvd; /* bytes of the current exchange */
	uint32_t banner_len;
	double end_at;
	double timer_at;
	double sent_at; /* the current exchange began */
	double deadline; /* of the current exchange */
	int heap_pos; /* -1: no timer */
	char banner[BANNER_MAX];
};

static struct plan_rec *plan;
static struct result_rec *res;
static struct conn *conns;
static uint32_t n_flows, n_done, n_open, peak_open;
static uint32_t *heap, heap_len;
static int ep;
static double t0, timeout_s = 5.0;
static uint8_t scratch[SCRATCH];
static volatile sig_atomic_t stop;

static double mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "connpub-loadgen: %s\n", what);
	exit(2);
}

/* --- timers: one per connection, a binary min-heap on timer_at ------------------------- */

static void heap_swap(uint32_t a, uint32_t b)
{
	uint32_t t = heap[a];
	heap[a] = heap[b];
	heap[b] = t;
	conns[heap[a]].heap_pos = (int)a;
	conns[heap[b]].heap_pos = (int)b;
}

static void heap_up(uint32_t pos)
{
	while (pos > 0) {
		uint32_t parent = (pos - 1) / 2;
		if (conns[heap[parent]].timer_at <= conns[heap[pos]].timer_at)
			break;
		heap_swap(pos, parent);
		pos = parent;
	}
}

static void heap_down(uint32_t pos)
{
	for (;;) {
		uint32_t left = 2 * pos + 1, right = left + 1, best = pos;
		if (left < heap_len && conns[heap[left]].timer_at < conns[heap[best]].timer_at)
			best = left;
		if (right < heap_len && conns[heap[right]].timer_at < conns[heap[best]].timer_at)
			best = right;
		if (best == pos)
			return;
		heap_swap(pos, best);
		pos = best;
	}
}

static void timer_cancel(uint32_t i)
{
	int pos = conns[i].heap_pos;
	if (pos < 0)
		return;
	heap_len--;
	if ((uint32_t)pos != heap_len) {
		heap_swap((uint32_t)pos, heap_len);
		heap_up((uint32_t)pos);
		heap_down((uint32_t)pos);
	}
	conns[i].heap_pos = -1;
}

static void timer_set(uint32_t i, double at)
{
	timer_cancel(i);
	conns[i].timer_at = at;
	conns[i].heap_pos = (int)heap_len;
	heap[heap_len++] = i;
	heap_up(heap_len - 1);
}

/* --- the schedule (also printed by --schedule) ------------------------------------------ */

/* Seconds to wait before exchange `done` (< 0: no more exchanges). */
static double next_wait(const struct plan_rec *p, uint32_t done, double end_at, double now)
{
	if (p->chunks == 0) {
		if (done == 0)
			return 0.0;
		double wait = fmin(p->gap_s, end_at - now);
		return wait > TIMER_SLACK_S ? wait : -1.0;
	}
	if (done >= p->chunks)
		return -1.0;
	if (done < p->head_n)
		return p->head_gaps_s[done];
	return fmax(end_at - now, 0.0) / (double)(p->chunks - done);
}

/* Silence after the last exchange before the close. */
static double rest_before_close(const struct plan_rec *p, double end_at, double now)
{
	return p->chunks ? end_at - now + p->linger_s : 0.0;
}

static int print_schedule(void)
{
	for (uint32_t i = 0; i < n_flows; i++) {
		const struct plan_rec *p = &plan[i];
		double now = p->start_s, end_at = p->start_s + p->duration_s, wait;
		printf("%llu", (unsigned long long)p->flow_id);
		for (uint32_t done = 0; (wait = next_wait(p, done, end_at, now)) >= 0; done++) {
			now += wait;
			printf(" %.6f", now);
		}
		double rest = rest_before_close(p, end_at, now);
		printf(" close %.6f\n", now + (rest > 0 ? rest : 0));
	}
	return 0;
}

/* --- flows ------------------------------------------------------------------------------ */

/* The payload of one exchange from byte `offset`: "<flow_id>:<exchange>:" repeated. */
static void payload(const struct plan_rec *p, uint32_t exchange, uint32_t offset, uint8_t *out,
		    uint32_t len)
{
	char seed[48];
	uint32_t seed_len = (uint32_t)snprintf(seed, sizeof(seed), "%llu:%u:",
					       (unsigned long long)p->flow_id, exchange);
	uint32_t skip = offset % seed_len, first = seed_len - skip;
	if (first > len)
		first = len;
	memcpy(out, seed + skip, first);
	if (first == len)
		return;
	/* out[first..] starts a whole seed: copy it, then double what is there */
	uint32_t have = seed_len < len - first ? seed_len : len - first;
	memcpy(out + first, seed, have);
	while (have < len - first) {
		uint32_t more = have < len - first - have ? have : len - first - have;
		memcpy(out + first + have, out + first, more);
		have += more;
	}
}

static socklen_t sockaddr_of(const uint8_t addr[16], uint8_t family, uint16_t port,
			     struct sockaddr_storage *out)
{
	memset(out, 0, sizeof(*out));
	if (family == 4) {
		struct sockaddr_in *sin = (struct sockaddr_in *)out;
		sin->sin_family = AF_INET;
		sin->sin_port = htons(port);
		memcpy(&sin->sin_addr, addr + 12, 4);
		return sizeof(*sin);
	}
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)out;
	sin6->sin6_family = AF_INET6;
	sin6->sin6_port = htons(port);
	memcpy(&sin6->sin6_addr, addr, 16);
	return sizeof(*sin6);
}

static void finish(uint32_t i, int err, uint8_t stage)
{
	struct conn *c = &conns[i];
	timer_cancel(i);
	if (c->fd >= 0) {
		close(c->fd); /* also leaves the epoll set */
		c->fd = -1;
		n_open--;
	}
	c->state = S_DONE;
	res[i].ok = err == 0;
	res[i].err = err;
	res[i].stage = err ? stage : ST_NONE;
	res[i].ended_s = mono() - t0;
	n_done++;
}

static void watch(uint32_t i, uint32_t events, int op)
{
	if (op == EPOLL_CTL_MOD && conns[i].events == events)
		return;
	struct epoll_event ev = {.events = events, .data.u64 = i};
	conns[i].events = events;
	if (epoll_ctl(ep, op, conns[i].fd, &ev) < 0)
		finish(i, errno, ST_CONNECT);
}

static void local_port(uint32_t i)
{
	struct sockaddr_storage local;
	socklen_t len = sizeof(local);
	if (getsockname(conns[i].fd, (struct sockaddr *)&local, &len) == 0)
		res[i].local_port = ntohs(local.ss_family == AF_INET
						  ? ((struct sockaddr_in *)&local)->sin_port
						  : ((struct sockaddr_in6 *)&local)->sin6_port);
}

static void send_some(uint32_t i);

/* After an exchange (or the open): the next one, the silence before the close, or the close. */
static void schedule_next(uint32_t i, double now)
{
	struct conn *c = &conns[i];
	const struct plan_rec *p = &plan[i];
	double wait = next_wait(p, res[i].chunks, c->end_at, now);
	if (wait > 0) {
		c->state = S_WAIT;
		timer_set(i, now + wait);
		return;
	}
	if (wait == 0) {
		send_some(i);
		return;
	}
	double rest = rest_before_close(p, c->end_at, now);
	if (rest > 0) {
		c->state = S_LINGER;
		timer_set(i, now + rest);
		return;
	}
	finish(i, 0, ST_CLOSE);
}

/* Start the next exchange, or continue sending it (TCP). */
static void send_some(uint32_t i)
{
	struct conn *c = &conns[i];
	const struct plan_rec *p = &plan[i];
	if (c->state != S_ECHO) {
		c->state = S_ECHO;
		c->sent = c->recvd = 0;
		c->sent_at = mono();
		c->deadline = c->sent_at + timeout_s;
		timer_set(i, p->proto == 17 ? fmin(c->sent_at + UDP_RESEND_S, c->deadline)
					    : c->deadline);
	}
	while (c->sent < p->chunk_bytes) {
		uint32_t len = p->chunk_bytes - c->sent;
		if (len > SCRATCH)
			len = SCRATCH;
		payload(p, res[i].chunks, c->sent, scratch, len);
		ssize_t n = send(c->fd, scratch, len, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				watch(i, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
				return;
			}
			finish(i, errno, ST_EXCHANGE);
			return;
		}
		c->sent += (uint32_t)n;
	}
	watch(i, EPOLLIN, EPOLL_CTL_MOD);
}

static void start_flow(uint32_t i, double now)
{
	struct conn *c = &conns[i];
	const struct plan_rec *p = &plan[i];
	int udp = p->proto == 17;
	res[i].flow_id = p->flow_id;
	res[i].started_s = now - t0;
	c->end_at = t0 + p->start_s + p->duration_s;
	c->fd = socket(p->family == 4 ? AF_INET : AF_INET6,
		       (udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		finish(i, errno, ST_CONNECT);
		return;
	}
	n_open++;
	if (n_open > peak_open)
		peak_open = n_open;
	struct sockaddr_storage addr;
	int one = 1;
	/* the port is picked at connect, per (source, destination): 24 sources x 64k ports */
	if (!udp)
		setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
	socklen_t len = sockaddr_of(p->src, p->family, 0, &addr);
	if (bind(c->fd, (struct sockaddr *)&addr, len) < 0) {
		finish(i, errno, ST_CONNECT);
		return;
	}
	len = sockaddr_of(p->dst, p->family, p->port, &addr);
	if (connect(c->fd, (struct sockaddr *)&addr, len) < 0 && errno != EINPROGRESS) {
		finish(i, errno, ST_CONNECT);
		return;
	}
	local_port(i);
	if (udp) {
		res[i].open_s = (float)(mono() - now);
		watch(i, EPOLLIN, EPOLL_CTL_ADD);
		if (c->state != S_DONE)
			schedule_next(i, now);
		return;
	}
	c->state = S_CONNECTING;
	watch(i, EPOLLOUT, EPOLL_CTL_ADD);
	if (c->state != S_DONE)
		timer_set(i, now + timeout_s);
}

static void on_connected(uint32_t i)
{
	struct conn *c = &conns[i];
	int err = 0;
	socklen_t len = sizeof(err);
	getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
	if (err) {
		finish(i, err, ST_CONNECT);
		return;
	}
	local_port(i);
	c->state = S_BANNER;
	c->banner_len = 0;
	watch(i, EPOLLIN, EPOLL_CTL_MOD);
	timer_set(i, mono() + timeout_s);
}

static void on_banner(uint32_t i)
{
	struct conn *c = &conns[i];
	/* the server sends nothing after its banner before the first chunk: no echo is read */
	ssize_t n = recv(c->fd, c->banner + c->banner_len, BANNER_MAX - c->banner_len, 0);
	if (n <= 0) {
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		finish(i, n == 0 ? ERR_SHORT : errno, ST_BANNER);
		return;
	}
	c->banner_len += (uint32_t)n;
	char *nl = memchr(c->banner, '\n', c->banner_len);
	if (!nl) {
		if (c->banner_len == BANNER_MAX)
			finish(i, ERR_BANNER, ST_BANNER);
		return;
	}
	size_t prefix = strlen(BANNER);
	if ((size_t)(nl - c->banner) < prefix || memcmp(c->banner, BANNER, prefix) != 0 ||
	    nl + 1 != c->banner + c->banner_len) {
		finish(i, ERR_BANNER, ST_BANNER);
		return;
	}
	size_t name_len = (size_t)(nl - c->banner) - prefix;
	if (name_len >= sizeof(res[i].server))
		name_len = sizeof(res[i].server) - 1;
	memcpy(res[i].server, c->banner + prefix, name_len);
	timer_cancel(i);
	double now = mono();
	res[i].open_s = (float)(now - t0 - res[i].started_s);
	schedule_next(i, now);
}

/* Compare echoed bytes with what was sent; 1 when the exchange is complete. */
static int check_echo(uint32_t i, const uint8_t *got, uint32_t len)
{
	struct conn *c = &conns[i];
	const struct plan_rec *p = &plan[i];
	static uint8_t want[SCRATCH];
	payload(p, res[i].chunks, c->recvd, want, len);
	if (memcmp(got, want, len) != 0) {
		finish(i, ERR_MISMATCH, ST_EXCHANGE);
		return 0;
	}
	c->recvd += len;
	if (c->recvd < p->chunk_bytes)
		return 0;
	res[i].chunks++;
	res[i].bytes_echoed += p->chunk_bytes;
	c->state = S_WAIT; /* between exchanges: the next one (even at once) starts afresh */
	float rtt = (float)(mono() - c->sent_at);
	if (rtt > res[i].rtt_max_s)
		res[i].rtt_max_s = rtt;
	timer_cancel(i);
	return 1;
}

static void on_echo_tcp(uint32_t i)
{
	struct conn *c = &conns[i];
	uint32_t want = plan[i].chunk_bytes - c->recvd;
	if (want == 0 || c->recvd >= c->sent) {
		/* nothing outstanding: data or EOF now is the peer's doing */
		ssize_t n = recv(c->fd, scratch, 1, MSG_PEEK);
		if (n == 0)
			finish(i, ERR_SHORT, ST_EXCHANGE);
		else if (n > 0)
			finish(i, ERR_MISMATCH, ST_EXCHANGE);
		else if (errno != EAGAIN && errno != EWOULDBLOCK)
			finish(i, errno, ST_EXCHANGE);
		return;
	}
	if (want > c->sent - c->recvd)
		want = c->sent - c->recvd;
	ssize_t n = recv(c->fd, scratch, want > SCRATCH ? SCRATCH : want, 0);
	if (n <= 0) {
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		finish(i, n == 0 ? ERR_SHORT : errno, ST_EXCHANGE);
		return;
	}
	if (check_echo(i, scratch, (uint32_t)n))
		schedule_next(i, mono());
}

static void on_echo_udp(uint32_t i)
{
	struct conn *c = &conns[i];
	ssize_t n = recv(c->fd, scratch, SCRATCH, 0);
	if (n < 0) {
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			finish(i, errno, ST_EXCHANGE);
		return;
	}
	uint8_t *nl = memchr(scratch, '\n', (size_t)n);
	size_t name_len = nl ? (size_t)(nl - scratch) : 0;
	uint32_t len = nl ? (uint32_t)((size_t)n - name_len - 1) : 0;
	if (nl && res[i].resent && res[i].chunks > 0 && len == plan[i].chunk_bytes) {
		/* the second answer to a datagram sent twice: the previous exchange's payload */
		static uint8_t previous[SCRATCH];
		payload(&plan[i], res[i].chunks - 1, 0, previous, len);
		if (memcmp(nl + 1, previous, len) == 0)
			return;
	}
	if (c->state != S_ECHO || !nl) {
		finish(i, ERR_MISMATCH, ST_EXCHANGE);
		return;
	}
	if (len != plan[i].chunk_bytes) {
		finish(i, len < plan[i].chunk_bytes ? ERR_SHORT : ERR_MISMATCH, ST_EXCHANGE);
		return;
	}
	if (name_len >= sizeof(res[i].server))
		name_len = sizeof(res[i].server) - 1;
	memset(res[i].server, 0, sizeof(res[i].server));
	memcpy(res[i].server, scratch, name_len);
	if (check_echo(i, nl + 1, len))
		schedule_next(i, mono());
}

static void on_event(uint32_t i, uint32_t events)
{
	struct conn *c = &conns[i];
	if (c->state == S_DONE)
		return;
	if (c->state == S_CONNECTING) {
		if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
			on_connected(i);
		return;
	}
	if ((events & EPOLLERR) && !(events & EPOLLIN)) {
		int err = 0;
		socklen_t len = sizeof(err);
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		finish(i, err ? err : ERR_SHORT, c->state == S_BANNER ? ST_BANNER : ST_EXCHANGE);
		return;
	}
	if (c->state == S_BANNER) {
		on_banner(i);
		return;
	}
	if (plan[i].proto == 17) {
		on_echo_udp(i);
		return;
	}
	if ((events & EPOLLOUT) && c->state == S_ECHO && c->sent < plan[i].chunk_bytes) {
		send_some(i);
		if (c->state == S_DONE)
			return;
	}
	if (events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP))
		on_echo_tcp(i);
}

static void on_timer(uint32_t i, double now)
{
	struct conn *c = &conns[i];
	c->heap_pos = -1;
	switch (c->state) {
	case S_WAIT:
		send_some(i);
		break;
	case S_LINGER:
		finish(i, 0, ST_CLOSE);
		break;
	case S_CONNECTING:
		finish(i, ETIMEDOUT, ST_CONNECT);
		break;
	case S_BANNER:
		finish(i, ETIMEDOUT, ST_BANNER);
		break;
	case S_ECHO:
		if (plan[i].proto == 17 && now + 1e-3 < c->deadline) {
			const struct plan_rec *p = &plan[i];
			payload(p, res[i].chunks, 0, scratch, p->chunk_bytes);
			if (send(c->fd, scratch, p->chunk_bytes, 0) < 0 && errno != EAGAIN) {
				finish(i, errno, ST_EXCHANGE);
				break;
			}
			res[i].resent++;
			timer_set(i, fmin(now + UDP_RESEND_S, c->deadline));
			break;
		}
		finish(i, ETIMEDOUT, ST_EXCHANGE);
		break;
	default:
		break;
	}
}

/* --- files, limits, main ---------------------------------------------------------------- */

static void *read_plan(const char *path, uint32_t *count)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		die("cannot open the plan");
	struct header h;
	if (fread(&h, sizeof(h), 1, f) != 1 || memcmp(h.magic, "CPLGPLN1", 8) != 0 ||
	    h.record_size != sizeof(struct plan_rec))
		die("the plan is not a connpub-loadgen plan (magic CPLGPLN1, record size 152)");
	void *recs = calloc(h.count ? h.count : 1, sizeof(struct plan_rec));
	if (!recs || fread(recs, sizeof(struct plan_rec), h.count, f) != h.count)
		die("the plan is truncated");
	fclose(f);
	*count = h.count;
	return recs;
}

static void write_results(const char *path)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "wb");
	if (!f)
		die("cannot write the results");
	struct header h = {.record_size = sizeof(struct result_rec), .count = n_flows};
	memcpy(h.magic, "CPLGRES1", 8);
	if (fwrite(&h, sizeof(h), 1, f) != 1 ||
	    fwrite(res, sizeof(struct result_rec), n_flows, f) != n_flows || fclose(f) != 0)
		die("cannot write the results");
	if (rename(tmp, path) < 0)
		die("cannot rename the results into place");
}

/* One descriptor per open flow: the soft and (as root) the hard RLIMIT_NOFILE raised to the
 * flows + 1024, at most fs.nr_open. */
static void raise_open_files(uint32_t flows)
{
	struct rlimit lim;
	getrlimit(RLIMIT_NOFILE, &lim);
	rlim_t want = (rlim_t)flows + 1024, nr_open = 1048576;
	FILE *f = fopen("/proc/sys/fs/nr_open", "r");
	if (f) {
		unsigned long v;
		if (fscanf(f, "%lu", &v) == 1)
			nr_open = v;
		fclose(f);
	}
	if (want > nr_open)
		want = nr_open;
	if (want > lim.rlim_max) {
		struct rlimit raised = {want, want};
		if (setrlimit(RLIMIT_NOFILE, &raised) == 0)
			return;
	}
	lim.rlim_cur = lim.rlim_max > want ? want : lim.rlim_max;
	setrlimit(RLIMIT_NOFILE, &lim);
}

/* Run at `nice` (< 0: ahead of other jobs), also as a session: with the scheduler's
 * autogroups (kernel.sched_autogroup_enabled) a process's nice only counts within its session,
 * so the session's autogroup gets it too. Failures are said and ignored. */
static void set_nice(int nice)
{
	if (setpriority(PRIO_PROCESS, 0, nice) < 0)
		fprintf(stderr, "connpub-loadgen: cannot set nice %d: %s\n", nice, strerror(errno));
	FILE *f = fopen("/proc/self/autogroup", "w");
	if (f && (fprintf(f, "%d", nice) < 0 || fclose(f) != 0))
		fprintf(stderr, "connpub-loadgen: cannot set the autogroup's nice %d\n", nice);
}

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static int by_start(const void *a, const void *b)
{
	double x = plan[*(const uint32_t *)a].start_s, y = plan[*(const uint32_t *)b].start_s;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	const char *plan_path = NULL, *out_path = NULL;
	int schedule_only = 0, nice_value = 0;
	t0 = -1;
	for (int k = 1; k < argc; k++) {
		if (!strcmp(argv[k], "--plan") && k + 1 < argc)
			plan_path = argv[++k];
		else if (!strcmp(argv[k], "--out") && k + 1 < argc)
			out_path = argv[++k];
		else if (!strcmp(argv[k], "--start-at") && k + 1 < argc)
			t0 = strtod(argv[++k], NULL);
		else if (!strcmp(argv[k], "--timeout") && k + 1 < argc)
			timeout_s = strtod(argv[++k], NULL);
		else if (!strcmp(argv[k], "--schedule"))
			schedule_only = 1;
		else if (!strcmp(argv[k], "--nice") && k + 1 < argc)
			nice_value = atoi(argv[++k]);
		else
			die("usage: connpub-loadgen --plan PLAN (--out RESULTS [--start-at S] "
			    "[--timeout S] [--nice N] | --schedule)");
	}
	if (!plan_path || (!out_path && !schedule_only) || !(timeout_s > 0))
		die("usage: connpub-loadgen --plan PLAN (--out RESULTS [--start-at S] "
		    "[--timeout S] [--nice N] | --schedule)");
	plan = read_plan(plan_path, &n_flows);
	if (schedule_only)
		return print_schedule();

	raise_open_files(n_flows);
	if (nice_value)
		set_nice(nice_value);
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGPIPE, SIG_IGN);
	res = calloc(n_flows ? n_flows : 1, sizeof(*res));
	conns = calloc(n_flows ? n_flows : 1, sizeof(*conns));
	heap = calloc(n_flows ? n_flows : 1, sizeof(*heap));
	uint32_t *order = calloc(n_flows ? n_flows : 1, sizeof(*order));
	if (!res || !conns || !heap || !order)
		die("out of memory");
	for (uint32_t i = 0; i < n_flows; i++) {
		conns[i].fd = -1;
		conns[i].heap_pos = -1;
		res[i].flow_id = plan[i].flow_id;
		order[i] = i;
	}
	qsort(order, n_flows, sizeof(*order), by_start);
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1 failed");
	if (t0 < 0)
		t0 = mono();

	struct epoll_event events[1024];
	uint32_t next = 0;
	int ms = 0;
	while (n_done < n_flows && !stop) {
		/* events before timers: an answer already there beats its deadline */
		int n = epoll_wait(ep, events, 1024, ms);
		if (n < 0 && errno != EINTR)
			die("epoll_wait failed");
		for (int k = 0; k < n; k++)
			on_event((uint32_t)events[k].data.u64, events[k].events);
		double now = mono();
		while (next < n_flows && t0 + plan[order[next]].start_s <= now)
			start_flow(order[next++], now);
		while (heap_len && conns[heap[0]].timer_at <= now) {
			uint32_t i = heap[0];
			timer_cancel(i);
			on_timer(i, now);
		}
		double wake = now + 1.0;
		if (heap_len && conns[heap[0]].timer_at < wake)
			wake = conns[heap[0]].timer_at;
		if (next < n_flows && t0 + plan[order[next]].start_s < wake)
			wake = t0 + plan[order[next]].start_s;
		ms = n == 1024 ? 0 : (int)ceil((wake - mono()) * 1000.0);
		if (ms < 0)
			ms = 0;
	}
	for (uint32_t i = 0; i < n_flows; i++) /* stopped: what was left is broken */
		if (conns[i].state != S_DONE) {
			if (res[i].started_s == 0 && conns[i].fd < 0)
				res[i].started_s = mono() - t0;
			finish(i, ERR_STOPPED, ST_NONE);
		}
	write_results(out_path);
	uint32_t ok = 0;
	for (uint32_t i = 0; i < n_flows; i++)
		ok += res[i].ok;
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	struct rlimit files;
	getrlimit(RLIMIT_NOFILE, &files);
	fprintf(stderr,
		"{\"flows\": %u, \"ok\": %u, \"broken\": %u, \"peak_open\": %u, \"open_files\": "
		"%lu, \"user_s\": %.2f, \"sys_s\": %.2f}\n",
		n_flows, ok, n_flows - ok, peak_open, (unsigned long)files.rlim_cur,
		(double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
		(double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
	return stop ? 1 : 0;
}
