"""Prometheus metrics of the agents (prometheus_client, one registry per agent) and the same
numbers as a plain dict for the status file. Names and meanings: docs/agents.md."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

BOTH = ("server", "lb")
# name -> (kind, help, label names, roles exporting it). Counters get the _total suffix from
# prometheus_client. Addresses are labels of their own (address, port, proto): an IPv6 VIP
# with its port in one label is ambiguous.
METRICS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "publish_packets": ("counter", "PUBLISH packets sent or received", ("direction",), BOTH),
    "publish_bytes": ("counter", "PUBLISH UDP payload bytes sent or received", ("direction",),
                      BOTH),
    "publish_entries": ("counter", "PUBLISH entries sent or received", ("direction", "level"),
                        BOTH),
    "entries_applied": ("counter", "PUBLISH entries applied to the LB maps", ("kind",), ("lb",)),
    "entries_ignored": ("counter", "accepted entries not applied", ("reason",), BOTH),
    "map_writes": ("counter", "map entries written (batched updates/deletes)", ("map",), BOTH),
    "rejected": ("counter", "received packets rejected by the decoder, by reason", ("reason",),
                 BOTH),
    "source_filtered": ("counter", "datagrams dropped before verification: the sender is not "
                        "an allowed peer (LB: a server address; server: an LB address)", (),
                        BOTH),
    "tag_checks": ("counter", "received packets whose HMAC tag was computed", (), BOTH),
    "socket_drops": ("counter", "datagrams the kernel dropped on the agent's full socket "
                     "(SO_RXQ_OVFL)", (), BOTH),
    "directives": ("counter", "DIRECTIVE packets sent or received", ("direction",), BOTH),
    "directive_entries": ("counter", "DIRECTIVE entries sent or received", ("direction",),
                          BOTH),
    "resync_requests": ("counter", "RESYNC-REQUEST packets sent or received", ("direction",),
                        BOTH),
    "flows_finished": ("counter", "flows removed from the server flow table", ("reason",),
                       ("server",)),
    "history_records": ("counter", "finished-flow records appended to the history", (),
                        ("server",)),
    "lease_misses": ("counter", "lease misses counted by the LB datapath since the agent "
                     "started", (), ("lb",)),
    "tcp_socket_table_full": ("counter", "failed updates of the server's tcp_sockets table (its "
                              "flows fall back to packets)", (), ("server",)),
    "tcp_socket_lookups": ("counter", "TCP flows whose socket state came from the tcp_sockets "
                           "table, not from the stamp in their flow entry", (), ("server",)),
    "tracked": ("gauge", "entries in a table at the last tick", ("table",), BOTH),
    "class_level": ("gauge", "effective granularity level per traffic class (VIP)",
                    ("address", "port", "proto"), ("lb",)),
    "interval_coverage": ("gauge", "share of the model's scored p10-p90 intervals that held the "
                          "true end, per traffic class (online coverage tracker)",
                          ("address", "port", "proto"), ("server",)),
    "interval_scored": ("gauge", "model decisions the coverage tracker scored, per traffic class",
                        ("address", "port", "proto"), ("server",)),
    "interval_offset": ("gauge", "the coverage tracker's widening of the model's p10 (side lower) "
                        "and p90 (side upper) in log seconds, per traffic class",
                        ("address", "port", "proto", "side"), ("server",)),
    "tick_seconds": ("histogram", "duration of one periodic job", ("job",), BOTH),
}
COVERAGE_CLASSES_EXPORTED = 32  # busiest traffic classes of the coverage tracker exported
TICK_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def exported_names(role: str) -> set[str]:
    """Every sample name the role's registry exposes (connpub_lb_rejected_total, ...)."""
    names = set()
    for name, (kind, _, _, roles) in METRICS.items():
        if role not in roles:
            continue
        full = f"connpub_{role}_{name}"
        if kind == "counter":
            names.update({f"{full}_total", f"{full}_created"})
        elif kind == "histogram":
            names.update({f"{full}_bucket", f"{full}_sum", f"{full}_count", f"{full}_created"})
        else:
            names.add(full)
    return names


class AgentMetrics:
    """Counters/gauges for one agent. `totals` mirrors every counter as "name{labels}" -> value
    so the JSON status file carries the same numbers as the scrape."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics = {}
        for name, (kind, doc, labels, roles) in METRICS.items():
            if role not in roles:
                continue
            full = f"connpub_{role}_{name}"
            if kind == "counter":
                metric = Counter(full, doc, labels, registry=self.registry)
            elif kind == "gauge":
                metric = Gauge(full, doc, labels, registry=self.registry)
            else:
                metric = Histogram(full, doc, labels, buckets=TICK_BUCKETS,
                                   registry=self.registry)
            self._metrics[name] = metric
        self.totals: dict[str, float] = {}
        self.gauges: dict[str, float] = {}
        self.port: int | None = None

    @staticmethod
    def _key(name: str, labels: dict) -> str:
        if not labels:
            return name
        return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"

    def _child(self, name: str, labels: dict):
        metric = self._metrics[name]
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, amount: float = 1, **labels) -> None:
        if amount <= 0:
            return
        self._child(name, labels).inc(amount)
        key = self._key(name, labels)
        self.totals[key] = self.totals.get(key, 0) + amount

    def set(self, name: str, value: float, **labels) -> None:
        self._child(name, labels).set(value)
        self.gauges[self._key(name, labels)] = value

    def observe(self, name: str, seconds: float, **labels) -> None:
        self._child(name, labels).observe(seconds)
        self.gauges[self._key(f"last_{name}", labels)] = round(seconds, 6)

    def total(self, name: str, **labels) -> float:
        """Sum of a counter over every label set matching `labels`."""
        prefix = name + "{"
        found = 0.0
        for key, value in self.totals.items():
            if key != name and not key.startswith(prefix):
                continue
            if all(f"{k}={v}" in key for k, v in labels.items()):
                found += value
        return found

    def serve(self, port: int, address: str = "") -> None:
        """Expose /metrics on port (0 = off) in the current network namespace."""
        if port == 0:
            return
        start_http_server(port, addr=address or "0.0.0.0", registry=self.registry)
        self.port = port
        log.info("metrics on :%d/metrics", port)

    def set_coverage(self, classes: list[dict]) -> None:
        """The coverage tracker's busiest classes (CoverageTracker.classes()) as gauges."""
        for entry in classes[:COVERAGE_CLASSES_EXPORTED]:
            labels = {"address": entry["address"], "port": str(entry["port"]),
                      "proto": entry["proto"]}
            self.set("interval_coverage", round(entry["coverage"], 6), **labels)
            self.set("interval_scored", entry["decisions"], **labels)
            for side, value in zip(("lower", "upper"), entry["offsets"], strict=True):
                self.set("interval_offset", value, side=side, **labels)
