// SPDX-License-Identifier: GPL-2.0
/*
 * connpub-echod: the lab's echo servers (docs/lab.md), one thread, one epoll set.
 *
 *   connpub-echod --name srv1 --tcp-port 80 [--tcp-port 443 ...] --udp-port 53 [...]
 *                 [--udp-bind 10.200.0.1 ...] [--backlog 8192] [--nice N]
 *
 * TCP, on every address (dual-stack [::]): first one line `connpub-echo <name>\n`, then every
 * byte received is echoed. UDP, on each --udp-bind address (default [::]) and port: each
 * datagram is answered with `<name>\n` + the datagram. Bind UDP to the VIPs: an unbound UDP
 * reply takes the route's source address, and a direct-server-return reply must come from the
 * VIP the client sent to. Runs until SIGTERM/SIGINT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_SOCKETS 256 /* listening + UDP sockets */
#define SCRATCH 65536
#define UDP_BUFFER (16 << 20) /* bytes of socket buffer per UDP socket */
#define BANNER "connpub-echo "

enum kind { K_LISTEN = 1, K_UDP, K_CONN };

/* Bytes a connection could not send yet (its reader is slow): no reading until they are out. */
struct pending {
	uint8_t *buf;
	uint32_t len, off;
};

static struct pending *pending; /* by fd */
static size_t pending_cap;
static int ep;
static char name[64];
static size_t name_len;
static uint8_t scratch[SCRATCH + 80];
static volatile sig_atomic_t stop;

static void die(const char *what, const char *arg)
{
	fprintf(stderr, "connpub-echod: %s%s%s (%s)\n", what, arg ? " " : "", arg ? arg : "",
		strerror(errno));
	exit(2);
}

static void add(int fd, enum kind kind, uint32_t events, int op)
{
	struct epoll_event ev = {.events = events, .data.u64 = ((uint64_t)kind << 32) | (uint32_t)fd};
	if (epoll_ctl(ep, op, fd, &ev) < 0 && op != EPOLL_CTL_MOD)
		die("epoll_ctl", NULL);
}

static struct pending *pending_of(int fd)
{
	if ((size_t)fd >= pending_cap) {
		size_t cap = pending_cap ? pending_cap : 1024;
		while (cap <= (size_t)fd)
			cap *= 2;
		pending = realloc(pending, cap * sizeof(*pending));
		if (!pending)
			die("out of memory", NULL);
		memset(pending + pending_cap, 0, (cap - pending_cap) * sizeof(*pending));
		pending_cap = cap;
	}
	return &pending[fd];
}

static void drop(int fd)
{
	struct pending *p = pending_of(fd);
	free(p->buf);
	memset(p, 0, sizeof(*p));
	close(fd);
}

/* Send buf, keeping what the socket does not take; 0 on success, -1 when fd was closed. */
static int send_or_keep(int fd, const uint8_t *buf, uint32_t len)
{
	ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
	if (n < 0) {
		if (errno != EAGAIN && errno != EWOULDBLOCK) {
			drop(fd);
			return -1;
		}
		n = 0;
	}
	if ((uint32_t)n == len)
		return 0;
	struct pending *p = pending_of(fd);
	p->buf = malloc(len - (uint32_t)n);
	if (!p->buf)
		die("out of memory", NULL);
	memcpy(p->buf, buf + n, len - (uint32_t)n);
	p->len = len - (uint32_t)n;
	p->off = 0;
	add(fd, K_CONN, EPOLLOUT, EPOLL_CTL_MOD);
	return 0;
}

static void on_listen(int lfd)
{
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE)
				fprintf(stderr, "connpub-echod: accept: %s\n", strerror(errno));
			return; /* EAGAIN: all taken */
		}
		add(fd, K_CONN, EPOLLIN, EPOLL_CTL_ADD);
		memcpy(scratch, BANNER, strlen(BANNER));
		memcpy(scratch + strlen(BANNER), name, name_len);
		scratch[strlen(BANNER) + name_len] = '\n';
		send_or_keep(fd, scratch, (uint32_t)(strlen(BANNER) + name_len + 1));
	}
}

static void on_conn(int fd, uint32_t events)
{
	struct pending *p = pending_of(fd);
	if (p->buf) {
		if (events & (EPOLLERR | EPOLLHUP)) {
			drop(fd);
			return;
		}
		ssize_t n = send(fd, p->buf + p->off, p->len - p->off, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				drop(fd);
			return;
		}
		p->off += (uint32_t)n;
		if (p->off == p->len) {
			free(p->buf);
			memset(p, 0, sizeof(*p));
			add(fd, K_CONN, EPOLLIN, EPOLL_CTL_MOD);
		}
		return;
	}
	ssize_t n = recv(fd, scratch, SCRATCH, 0);
	if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
		drop(fd);
		return;
	}
	if (n > 0)
		send_or_keep(fd, scratch, (uint32_t)n);
}

static void on_udp(int fd)
{
	struct sockaddr_storage peer;
	memcpy(scratch, name, name_len);
	scratch[name_len] = '\n';
	for (int k = 0; k < 256; k++) {
		socklen_t len = sizeof(peer);
		ssize_t n = recvfrom(fd, scratch + name_len + 1, SCRATCH, 0, (struct sockaddr *)&peer,
				     &len);
		if (n < 0)
			return;
		sendto(fd, scratch, name_len + 1 + (size_t)n, 0, (struct sockaddr *)&peer, len);
	}
}

static int tcp_listener(int port, int backlog)
{
	int fd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1, zero = 0;
	if (fd < 0)
		die("socket", NULL);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
	struct sockaddr_in6 addr = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port),
				    .sin6_addr = IN6ADDR_ANY_INIT};
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, backlog) < 0)
		die("cannot listen on TCP port", NULL);
	return fd;
}

static int udp_socket(const char *address, int port)
{
	struct sockaddr_storage addr;
	socklen_t len;
	memset(&addr, 0, sizeof(addr));
	int v6 = strchr(address, ':') != NULL, zero = 0;
	if (v6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&addr;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons((uint16_t)port);
		if (inet_pton(AF_INET6, address, &a->sin6_addr) != 1)
			die("not an address:", address);
		len = sizeof(*a);
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&addr;
		a->sin_family = AF_INET;
		a->sin_port = htons((uint16_t)port);
		if (inet_pton(AF_INET, address, &a->sin_addr) != 1)
			die("not an address:", address);
		len = sizeof(*a);
	}
	int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket", NULL);
	if (v6 && !strcmp(address, "::"))
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
	if (bind(fd, (struct sockaddr *)&addr, len) < 0)
		die("cannot bind UDP to", address);
	/* one socket takes every client's datagrams: room for bursts while this thread waits for
	 * the CPU (FORCE, as root, goes past net.core.rmem_max/wmem_max) */
	int size = UDP_BUFFER;
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0)
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
	return fd;
}

/* One descriptor per connection: soft and (as root) hard RLIMIT_NOFILE up to fs.nr_open. */
static rlim_t raise_open_files(void)
{
	struct rlimit lim;
	unsigned long nr_open = 1048576;
	FILE *f = fopen("/proc/sys/fs/nr_open", "r");
	if (f) {
		if (fscanf(f, "%lu", &nr_open) != 1)
			nr_open = 1048576;
		fclose(f);
	}
	struct rlimit raised = {nr_open, nr_open};
	if (setrlimit(RLIMIT_NOFILE, &raised) == 0)
		return nr_open;
	getrlimit(RLIMIT_NOFILE, &lim);
	lim.rlim_cur = lim.rlim_max;
	setrlimit(RLIMIT_NOFILE, &lim);
	return lim.rlim_cur;
}

/* Run at `nice` (< 0: ahead of other jobs), also as a session: with the scheduler's
 * autogroups (kernel.sched_autogroup_enabled) a process's nice only counts within its session,
 * so the session's autogroup gets it too. Failures are said and ignored. */
static void set_nice(int nice)
{
	if (setpriority(PRIO_PROCESS, 0, nice) < 0)
		fprintf(stderr, "connpub-echod: cannot set nice %d: %s\n", nice, strerror(errno));
	FILE *f = fopen("/proc/self/autogroup", "w");
	if (f && (fprintf(f, "%d", nice) < 0 || fclose(f) != 0))
		fprintf(stderr, "connpub-echod: cannot set the autogroup's nice %d\n", nice);
}

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

int main(int argc, char **argv)
{
	int tcp_ports[MAX_SOCKETS], udp_ports[MAX_SOCKETS], n_tcp = 0, n_udp = 0, n_bind = 0;
	const char *binds[MAX_SOCKETS];
	int backlog = 8192, nice_value = 0;
	for (int k = 1; k < argc; k++) {
		const char *arg = argv[k], *val = k + 1 < argc ? argv[k + 1] : NULL;
		if (!val)
			die("usage: connpub-echod --name N --tcp-port P ... --udp-port P ... "
			    "[--udp-bind ADDR ...] [--backlog N] [--nice N]", NULL);
		k++;
		if (!strcmp(arg, "--name"))
			snprintf(name, sizeof(name), "%s", val);
		else if (!strcmp(arg, "--tcp-port") && n_tcp < MAX_SOCKETS)
			tcp_ports[n_tcp++] = atoi(val);
		else if (!strcmp(arg, "--udp-port") && n_udp < MAX_SOCKETS)
			udp_ports[n_udp++] = atoi(val);
		else if (!strcmp(arg, "--udp-bind") && n_bind < MAX_SOCKETS)
			binds[n_bind++] = val;
		else if (!strcmp(arg, "--backlog"))
			backlog = atoi(val);
		else if (!strcmp(arg, "--nice"))
			nice_value = atoi(val);
		else
			die("unknown option", arg);
	}
	name_len = strlen(name);
	if (!name_len || (n_tcp == 0 && n_udp == 0) || n_bind * n_udp > MAX_SOCKETS)
		die("usage: connpub-echod --name N --tcp-port P ... --udp-port P ... "
		    "[--udp-bind ADDR ...] [--backlog N] [--nice N]", NULL);
	if (n_bind == 0)
		binds[n_bind++] = "::";
	rlim_t files = raise_open_files();
	if (nice_value)
		set_nice(nice_value);
	signal(SIGPIPE, SIG_IGN);
	struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: epoll_wait returns */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1", NULL);
	for (int k = 0; k < n_tcp; k++)
		add(tcp_listener(tcp_ports[k], backlog), K_LISTEN, EPOLLIN, EPOLL_CTL_ADD);
	for (int b = 0; b < n_bind; b++)
		for (int k = 0; k < n_udp; k++)
			add(udp_socket(binds[b], udp_ports[k]), K_UDP, EPOLLIN, EPOLL_CTL_ADD);
	fprintf(stderr, "%s: echo on tcp/%d ports udp/%d ports x %d addresses, backlog %d, open "
		"files %lu\n", name, n_tcp, n_udp, n_bind, backlog, (unsigned long)files);
	struct epoll_event events[512];
	while (!stop) {
		int n = epoll_wait(ep, events, 512, -1);
		for (int k = 0; k < n; k++) {
			int fd = (int)(uint32_t)events[k].data.u64;
			switch (events[k].data.u64 >> 32) {
			case K_LISTEN:
				on_listen(fd);
				break;
			case K_UDP:
				on_udp(fd);
				break;
			default:
				on_conn(fd, events[k].events);
			}
		}
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	fprintf(stderr, "%s: stopped, cpu user %.2f s sys %.2f s\n", name,
		(double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
		(double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
	return 0;
}
