"""The agents' Prometheus metrics (issue 15 item 6, no root): counters are counters (`_total`),
each role exports only its own metrics, addresses are separate labels, the lease-miss count
survives a program re-attach without going negative, and the shipped Grafana dashboard only
queries metric names the agents' registries really expose."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from connpub.agents.lb import LbAgent
from connpub.agents.metrics import METRICS, AgentMetrics, exported_names
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "connpub.json"
PROMQL_WORDS = {"sum", "by", "rate", "max", "min", "avg", "histogram_quantile", "le", "job",
                "instance", "irate", "increase", "without"}


def families(metrics: AgentMetrics) -> dict[str, str]:
    text = generate_latest(metrics.registry).decode()
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def test_each_role_exports_only_its_metrics_and_counters_are_counters():
    lb, server = families(AgentMetrics("lb")), families(AgentMetrics("server"))
    assert lb["connpub_lb_lease_misses"] == "counter"
    assert "connpub_lb_flows_finished" not in lb and "connpub_lb_history_records" not in lb
    assert "connpub_server_lease_misses" not in server
    assert "connpub_server_class_level" not in server
    assert "connpub_server_entries_applied" not in server
    assert "connpub_server_flows_finished" in server
    for role, found in (("lb", lb), ("server", server)):
        for name, (kind, _, _, roles) in METRICS.items():
            if role in roles:
                assert found[f"connpub_{role}_{name}"] == kind


def test_ipv6_vip_labels_are_unambiguous():
    metrics = AgentMetrics("lb")
    metrics.set("class_level", 2, address="fd00:200::1", port="8443", proto="tcp")
    text = generate_latest(metrics.registry).decode()
    assert 'connpub_lb_class_level{address="fd00:200::1",port="8443",proto="tcp"} 2.0' in text


def test_lease_misses_since_start_never_negative_across_a_reattach():
    agent = SimpleNamespace(last_lease_misses=100, lease_misses_since_start=0,
                            metrics=AgentMetrics("lb"))
    for datapath_total, grown in ((105, 5), (105, 0), (3, 3), (8, 5)):  # 3: program re-attached
        assert LbAgent.count_lease_misses(agent, datapath_total) == grown
    assert agent.lease_misses_since_start == 13
    text = generate_latest(agent.metrics.registry).decode()
    assert "connpub_lb_lease_misses_total 13.0" in text  # the metric and the table agree


def test_dashboard_queries_real_metric_names():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    known = exported_names("lb") | exported_names("server")
    used = set()
    for expr in exprs:
        without_strings = re.sub(r'"[^"]*"', "", expr)
        without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
        for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_ranges):
            if name.startswith("connpub_"):
                assert name in known, (name, expr)
                used.add(name)
            else:
                labels = {label for _, (_, _, names, _) in METRICS.items() for label in names}
                assert name in PROMQL_WORDS | labels, (name, expr)
    assert "connpub_lb_lease_misses_total" in used and "connpub_lb_socket_drops_total" in used


def test_coverage_tracker_classes_become_gauges():
    import numpy as np
    from connpub.model.calibration import CoverageTracker
    from connpub.traffic import workload as wl

    tracker = CoverageTracker()
    vip = np.stack([wl.ipv4_mapped(10, 200, 0, 1)] * 2)
    tracker.adjust(np.array([1, 2], np.uint64), 0, np.ones(2), np.full(2, 10.0),
                   proto=np.array([6, 6]), vip_port=np.array([443, 443]), vip_addr=vip)
    tracker.resolve(np.array([1, 2], np.uint64), np.array([5, 50]) * 1_000_000_000)
    metrics = AgentMetrics("server")
    metrics.set_coverage(tracker.classes())
    text = generate_latest(metrics.registry).decode()
    labels = 'address="10.200.0.1",port="443",proto="tcp"'
    assert f"connpub_server_interval_coverage{{{labels}}} 0.5" in text
    assert f"connpub_server_interval_scored{{{labels}}} 2.0" in text
    (entry,) = tracker.classes()
    key = "interval_offset{address=10.200.0.1,port=443,proto=tcp,side=upper}"
    assert metrics.gauges[key] == entry["offsets"][1] > 0
