"""Full mode through class-level changes on a simulated clock, without root: the server agent's
real publish cycle (ServerAgent.build_cycle with the PredictivePlanner, its idle-horizon UDP
leases and aggregate_plan), a model of the server datapath (a live flow takes its class's new
level only at its next packet, bpf/server/server.c) and of the LB: the agent's plan_leases into
a connection table and aggregate leases, each packet forwarded on the datapath's cover rule
(agents.lb.valid_leases mirrors bpf/lb/lb.c aggregate_keeps_alive)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pytest
from connpub.agents import server as srv
from connpub.agents.lb import plan_leases, valid_leases
from connpub.config import Config, LeaseConfig, LivenessConfig, PublishConfig, RolloutConfig
from connpub.datapath import lbctl
from connpub.datapath.abi import (
    AGG_KEY_DTYPE,
    AGG_VALUE_DTYPE,
    CLASS_KEY_DTYPE,
    FLOW_KEY_DTYPE,
    FLOW_VALUE_DTYPE,
    LB_AGG_LEASE_DTYPE,
    LB_AGG_LEASE_KEY_DTYPE,
    LB_CONN_DTYPE,
)
from connpub.datapath.masks import apply_masks
from connpub.model.predictive import PredictivePlanner
from connpub.traffic import workload as wl

S = 1_000_000_000
MS = 1_000_000
# the lab's run settings (labrun.LAB_RUN_SETTINGS): T = 0.5 s, k = 3, idle timeout 3 s
CFG = Config(publish=PublishConfig(interval_s=0.5, mode="full"),
             lease=LeaseConfig(idle_timeout_s=3.0), rollout=RolloutConfig(fraction=1.0),
             liveness=LivenessConfig(udp_idle_s=3.0, udp_stream_idle_s=3.0))
VIP = wl.ipv4_mapped(10, 200, 0, 1)
DIRECTIVE_DELAY_NS = 2 * MS  # LB decides a level, the servers apply it this much later
SERVER_DELAY_NS = 100_000  # a packet reaches its server after the LB
PUBLISH_DELAY_NS = 200_000  # a PUBLISH reaches the LB after the server's tick


class NoModel:
    """UDP flows are leased to their idle horizon: the model never runs for them."""

    def predict(self, features):
        raise AssertionError("the model ran for a UDP flow")


def _raw(key) -> bytes:
    key = np.array(key, FLOW_KEY_DTYPE).copy()
    key["pad"] = 0
    return key.tobytes()


def _class_of(key) -> tuple:
    return bytes(key["vip_addr"]), int(key["vip_port"]), int(key["proto"])


def _masked(key, level: int) -> np.ndarray:
    return apply_masks(np.array([key], FLOW_KEY_DTYPE), level)[0]


class ServerDatapath:
    """The server program's flow and aggregate tables for UDP flows, and the agent's cycle."""

    def __init__(self, server_id: int, retire: bool = True) -> None:
        self.retire = retire  # hand the agent class_levels (members leave a left level)
        self.flows: dict[bytes, np.ndarray] = {}
        self.keys: dict[bytes, np.ndarray] = {}
        self.aggregates: dict[tuple[int, bytes], np.ndarray] = {}
        self.class_levels: dict[tuple, int] = {}
        self.levels_gen = 0
        agent = object.__new__(srv.ServerAgent)
        agent.cfg, agent.mode, agent.server_id = CFG, "full", server_id
        agent.times = srv.FlowTimes.from_config(CFG)
        agent.planner = PredictivePlanner(CFG, NoModel())
        agent.lease_hook, agent.previous_cycle_ns = agent.planner, None
        agent.closed_repeats = srv.ClosedRepeats(2)
        self.agent = agent

    def directive(self, klass: tuple, level: int) -> None:
        if self.class_levels.get(klass, 0) != level:
            self.class_levels[klass] = level
            self.levels_gen += 1

    def _aggregate(self, key, level: int) -> tuple[np.ndarray, bool]:
        slot = (level, _raw(_masked(key, level)))
        created = slot not in self.aggregates
        if created:
            self.aggregates[slot] = np.zeros(1, AGG_VALUE_DTYPE)
        return self.aggregates[slot], created

    def packet(self, key, now_ns: int) -> None:
        raw = _raw(key)
        flow = self.flows.get(raw)
        level = self.class_levels.get(_class_of(key), 0)
        if flow is None:  # track_new_flow
            flow = np.zeros(1, FLOW_VALUE_DTYPE)
            flow["packets"], flow["bytes"], flow["sketch_count"] = 1, 100, 1
            flow["first_seen_ns"] = flow["last_seen_ns"] = now_ns
            flow["class_gen"], flow["level"] = self.levels_gen, level
            self.flows[raw], self.keys[raw] = flow, np.array(key, FLOW_KEY_DTYPE)
            if level:
                agg, _ = self._aggregate(key, level)
                agg["active_flows"] += 1
                agg["last_seen_ns"] = now_ns
            return
        flow["packets"] += 1  # track_known_flow
        flow["last_seen_ns"] = now_ns
        if int(flow["class_gen"][0]) != self.levels_gen:
            old = int(flow["level"][0])
            if level != old and old == 0:  # a level-0 flow moves; members stay (server.c)
                if old:
                    left = self.aggregates.get((old, _raw(_masked(key, old))))
                    if left is not None:
                        left["active_flows"] -= 1
                flow["level"] = level
                if level:
                    self._aggregate(key, level)[0]["active_flows"] += 1
            flow["class_gen"] = self.levels_gen
        if flow["level"][0]:
            agg, created = self._aggregate(key, int(flow["level"][0]))
            if created:
                agg["active_flows"] += 1
            agg["last_seen_ns"] = now_ns

    def tick(self, now_ns: int) -> np.ndarray:
        """One publish cycle of the real agent code; returns its PUBLISH entries."""
        raws = list(self.flows)
        keys = np.array([self.keys[r] for r in raws], FLOW_KEY_DTYPE).reshape(-1)
        values = np.concatenate([self.flows[r] for r in raws] or [np.zeros(0, FLOW_VALUE_DTYPE)])
        slots = list(self.aggregates)
        agg_keys = np.zeros(len(slots), AGG_KEY_DTYPE)
        for row, (level, masked) in enumerate(slots):
            agg_keys["masked"][row] = np.frombuffer(masked, FLOW_KEY_DTYPE)[0]
            agg_keys["level"][row] = level
        agg_values = np.concatenate([self.aggregates[s] for s in slots]
                                    or [np.zeros(0, AGG_VALUE_DTYPE)])
        # the class_levels map: members of a class that left their level are published as
        # flows of their own (policy.granularity.leaves_aggregate)
        class_keys = np.zeros(len(self.class_levels), CLASS_KEY_DTYPE)
        for row, (addr, port, proto) in enumerate(self.class_levels):
            class_keys[row] = (np.frombuffer(addr, np.uint8), port, proto, 0)
        levels = np.array(list(self.class_levels.values()), np.uint8)
        entries, finished, stale = self.agent.build_cycle(
            keys, values, agg_keys, agg_values, now_ns,
            class_levels=(class_keys, levels, 0) if self.retire else None)
        for row in finished.tolist():
            del self.flows[raws[row]], self.keys[raws[row]]
        for row in stale.tolist():
            del self.aggregates[slots[row]]
        self.agent.previous_cycle_ns = now_ns
        return entries


Cover = Callable[["LoadBalancer", np.ndarray, np.ndarray, int], bool]


def datapath_cover(lb: LoadBalancer, key, conn: np.ndarray, now_ns: int) -> bool:
    """The shipped rule, through the agent's mirror of the datapath."""
    return bool(valid_leases(np.array([key], FLOW_KEY_DTYPE), conn, *lb.agg_arrays(),
                             now_ns)[0])


def two_level_cover(lb: LoadBalancer, key, conn: np.ndarray, now_ns: int) -> bool:
    """The rule before: own lease, the aggregate at the connection's level, else at the VIP's
    current level (a hit there moves the connection to that level)."""
    if int(conn["lease_expiry_ns"][0]) > now_ns:
        return True
    agg_keys, agg_values = lb.agg_arrays()
    agg_expiry = agg_values["lease_expiry_ns"]
    vip_level = lb.vip_level[_class_of(key)]
    for level in (int(conn["level"][0]), vip_level):
        if level == 0:
            continue
        wanted = lbctl.agg_lease_keys(level, _masked(key, level), conn["backend_id"][0])
        hit = (agg_keys == wanted[0]) & (agg_expiry > now_ns)
        if hit.any():
            conn["level"] = level
            return True
    return False


class LoadBalancer:
    """The LB node: connection table, aggregate leases, VIP levels, Maglev = crc32 % servers."""

    def __init__(self, classes: list[tuple], servers: int, cover: Cover) -> None:
        self.conns: dict[bytes, np.ndarray] = {}
        self.aggregates: dict[bytes, int] = {}
        self.vip_level = dict.fromkeys(classes, 0)
        self.servers, self.cover = servers, cover
        self.misses: list[tuple[float, int]] = []
        self.vip_keys = np.zeros(len(classes), CLASS_KEY_DTYPE)
        for row, (addr, port, proto) in enumerate(classes):
            self.vip_keys[row] = (np.frombuffer(addr, np.uint8), port, proto, 0)

    def agg_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The aggregate leases as the LB's cover entries (level, masked, publishing backend)."""
        keys = np.frombuffer(b"".join(self.aggregates), LB_AGG_LEASE_KEY_DTYPE)
        values = np.zeros(len(keys), LB_AGG_LEASE_DTYPE)
        values["lease_expiry_ns"] = list(self.aggregates.values())
        values["backend_id"] = keys["backend_id"]
        return keys, values

    def _new(self, key, now_ns: int) -> np.ndarray:
        conn = np.zeros(1, LB_CONN_DTYPE)
        conn["backend_id"] = 1 + zlib.crc32(_raw(key)) % self.servers
        conn["lease_expiry_ns"] = now_ns + round(CFG.lease.initial_s * S)
        conn["level"] = self.vip_level[_class_of(key)]
        conn["created_ns"] = now_ns
        return conn

    def packet(self, key, now_ns: int, flow_id: int) -> int:
        """Forward one packet; returns the backend."""
        raw = _raw(key)
        conn = self.conns.get(raw)
        if conn is None or not self.cover(self, key, conn, now_ns):
            if conn is not None:
                self.misses.append((now_ns / S, flow_id))
            conn = self.conns[raw] = self._new(key, now_ns)
        return int(conn["backend_id"][0])

    def apply(self, entries: np.ndarray, now_ns: int) -> None:
        """The LB agent's writes: expiries only grow; a CLOSED cuts a flow's lease at level 0."""
        batch = plan_leases(entries, self.vip_keys, now_ns, CFG)
        for key, backend, expiry in zip(batch.flow_keys, batch.flow_backends,
                                        batch.flow_expiry_ns, strict=True):
            conn = self.conns.get(_raw(key))
            if conn is None:
                conn = self.conns[_raw(key)] = np.zeros(1, LB_CONN_DTYPE)
                conn["backend_id"] = backend
            if conn["backend_id"][0] == backend:
                conn["lease_expiry_ns"] = max(int(conn["lease_expiry_ns"][0]), int(expiry))
        for key, backend in zip(batch.closed_flow_keys, batch.closed_flow_backends, strict=True):
            conn = self.conns.get(_raw(key))
            if conn is not None and conn["backend_id"][0] == backend:
                conn["lease_expiry_ns"], conn["level"] = now_ns, 0
        for agg_key, expiry in zip(batch.agg_keys, batch.agg_expiry_ns, strict=True):
            raw = agg_key.tobytes()
            self.aggregates[raw] = max(self.aggregates.get(raw, 0), int(expiry))


def run(flows: list[tuple], levels: list[tuple], duration_s: float, *, servers: int = 3,
        cover: Cover = datapath_cover, seed: int = 0, retire: bool = True
        ) -> list[tuple[float, int]]:
    """flows: (flow id, FLOW_KEY_DTYPE key, first packet ns, gap ns, last packet by ns);
    levels: (ns, class, level) decided by the LB, applied at the servers DIRECTIVE_DELAY_NS
    later. Server ticks every T from a random phase each. Returns the lease misses.
    retire: the servers publish members of a class that left their level as flows of their
    own (the shipped agent); False: they stay in their aggregate (the rule the older cover
    rules were written for)."""
    classes = sorted({_class_of(flow[1]) for flow in flows})
    lb = LoadBalancer(classes, servers, cover)
    nodes = {sid: ServerDatapath(sid, retire) for sid in range(1, servers + 1)}
    rng = np.random.default_rng(seed)
    interval = round(CFG.publish.interval_s * S)
    events = []  # (ns, order, a, b): 0 tick, 1 LB level, 2 packet, 3 server level
    for flow_id, key, first, gap, last in flows:
        events += [(t, 2, flow_id, key) for t in range(first, last + 1, gap)]
    for sid in nodes:
        events += [(t, 0, sid, None) for t in range(int(rng.integers(interval)),
                                                      round(duration_s * S), interval)]
    for t, klass, level in levels:
        events += [(t, 1, klass, level), (t + DIRECTIVE_DELAY_NS, 3, klass, level)]
    for t, kind, a, b in sorted(events, key=lambda event: event[:2]):
        if kind == 0:
            lb.apply(nodes[a].tick(t), t + PUBLISH_DELAY_NS)
        elif kind == 1:
            lb.vip_level[a] = b
        elif kind == 2:
            nodes[lb.packet(b, t, a)].packet(b, t + SERVER_DELAY_NS)
        else:
            for node in nodes.values():
                node.directive(a, b)
    return lb.misses


def udp_flow(flow_id: int, host: int, port: int, vip_port: int, first_s: float, gap_s: float,
             last_s: float, subnet: int = 0) -> tuple:
    key = np.zeros((), FLOW_KEY_DTYPE)
    key["client_addr"] = wl.ipv4_mapped(10, 100 + subnet, 0, host)
    key["vip_addr"], key["client_port"], key["vip_port"], key["proto"] = VIP, port, vip_port, 17
    return flow_id, key, round(first_s * S), round(gap_s * S), round(last_s * S)


def rtp_class(vip_port: int) -> tuple:
    return bytes(VIP), vip_port, 17


def test_two_level_changes_before_the_flows_next_packet():
    """The lab's case: an RTP flow (a packet every 0.4 s) starts at level 0; its class goes to
    level 3 at 1.5 s: the server moves it at its next packet (1.7 s) into its level-3
    aggregate and stops publishing it on its own; the LB's entry keeps level 0 while its own
    lease (to 4.1 s) lasts. The class goes to level 2 at 4.0 s: the packet at 4.1 s finds its
    own lease over, no aggregate at level 0 (its entry's) or 2 (the VIP's), while the server
    holds it at level 3 (a member stays in its aggregate, bpf/server/server.c) with a lease to
    7.7 s: under the two-level rule a lease miss (Maglev re-picks the same server), and more
    later. The datapath checks every level: no miss."""
    flows = [udp_flow(0, 24, 26613, 5004, 0.1, 0.4, 12.0)]
    levels = [(1_500 * MS, rtp_class(5004), 3), (4_000 * MS, rtp_class(5004), 2)]
    assert run(flows, levels, 13.0, servers=1, cover=two_level_cover, retire=False)[0] == (4.1, 0)
    assert run(flows, levels, 13.0, servers=1) == []


def test_one_level_change_never_missed_even_under_the_old_rule():
    """One change: the LB's entry level or the VIP's level is always the server's."""
    flows = [udp_flow(i, 10 + i, 40000 + i, 5004 + 2 * (i % 2), 0.1 + 0.13 * i, 0.2 + 0.09 * i,
                      14.0) for i in range(16)]
    levels = [(2_000 * MS, rtp_class(5004), 3), (2_500 * MS, rtp_class(5006), 3)]
    assert run(flows, levels, 15.0, cover=two_level_cover, retire=False) == []
    assert run(flows, levels, 15.0) == []


@pytest.mark.parametrize("seed", range(4))
def test_level_churn_without_lease_misses(seed):
    """Random RTP-like flows (gaps 0.2-2 s, as the lab's driver) from two subnets in two UDP
    classes whose levels change every 1-5 s to any level, three servers: no packet of a live
    flow finds no lease. The same runs under the two-level rule miss 7 to 23 times each."""
    rng = np.random.default_rng(seed)
    flows = []
    for flow_id in range(40):
        first = rng.uniform(0.0, 24.0)
        flows.append(udp_flow(flow_id, int(rng.integers(10, 34)), int(rng.integers(1024, 65535)),
                              int(rng.choice([5004, 5006])), first, rng.uniform(0.2, 2.0),
                              min(first + rng.uniform(1.0, 30.0), 30.0),
                              subnet=int(rng.integers(2))))
    levels = []
    for vip_port in (5004, 5006):
        t = 0.0
        while (t := t + rng.uniform(1.0, 5.0)) < 30.0:
            levels.append((round(t * S), rtp_class(vip_port), int(rng.integers(4))))
    assert run(flows, levels, 30.0, seed=seed, cover=two_level_cover, retire=False) != []
    assert run(flows, levels, 30.0, seed=seed) == []
    assert run(flows, levels, 30.0, seed=seed, retire=False) == []
