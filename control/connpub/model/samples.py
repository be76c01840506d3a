"""Training/evaluation samples as the server agent sees flows when it decides them
(docs/model.md, "Samples"): each flow of a FLOW_DTYPE table at its decision ages, through the
agent's own flow-table -> features path, with its true remaining duration as target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connpub.errors import ConnpubError
from connpub.model.features import MIN_REMAINING_S, ClientHistory, compute_features
from connpub.model.observations import flow_observations, snapshot_rows
from connpub.traffic.flowlogs import flows_from_history
from connpub.traffic.workload import NS_PER_S

DEFAULT_INTERVAL_S = 1.0  # publish cycle T of the decision schedule ([publish] interval_s)
MAX_RENEWALS = 16  # decision k >= 1 at age u + T * (2**k - 1): up to ~18 h at T = 1 s
SAMPLE_SEED = 0


@dataclass
class Samples:
    """Training/evaluation rows: features, target and where each row came from."""

    features: np.ndarray  # (n, N_FEATURES) float32
    log_remaining_s: np.ndarray  # (n,) float64, natural log of true remaining seconds
    vip_port: np.ndarray
    proto: np.ndarray
    age_s: np.ndarray
    flow_index: np.ndarray  # row of the flow table / history each sample came from
    duration_s: np.ndarray | None = None  # true duration of the sample's flow
    decided_ns: np.ndarray | None = None  # when the agent decides (the table's clock)

    def subset(self, rows: np.ndarray) -> Samples:
        """The samples at `rows` (index or bool mask)."""
        return Samples(self.features[rows], self.log_remaining_s[rows], self.vip_port[rows],
                       self.proto[rows], self.age_s[rows], self.flow_index[rows],
                       None if self.duration_s is None else self.duration_s[rows],
                       None if self.decided_ns is None else self.decided_ns[rows])

    @staticmethod
    def concat(parts: list[Samples]) -> Samples:
        """One Samples of several (flow_index offset so flows stay distinct)."""
        offset, shifted = 0, []
        for part in parts:
            shifted.append(part.flow_index + offset)
            offset += int(part.flow_index.max()) + 1 if part.flow_index.size else 0
        return Samples(*(np.concatenate([getattr(p, name) for p in parts]) for name in (
            "features", "log_remaining_s", "vip_port", "proto", "age_s")),
            np.concatenate(shifted), *(
                None if any(getattr(p, name) is None for p in parts)
                else np.concatenate([getattr(p, name) for p in parts])
                for name in ("duration_s", "decided_ns")))


def decision_ages_s(duration_s: np.ndarray, interval_s: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(flow rows, ages) at which the agent decides each flow: its first tick, u ~ U(0, T)
    after the first packet, then renewals at u + T * (2**k - 1) (a lease grows with age), for
    every such age the flow is still alive at. A flow that ends before its first tick is
    never decided and gets no sample."""
    if interval_s <= 0:
        raise ConnpubError(f"decision interval must be positive, got {interval_s}")
    first_tick = np.random.default_rng(seed).uniform(0.0, interval_s, duration_s.size)
    rows, ages = [], []
    for k in range(MAX_RENEWALS + 1):
        age = first_tick + interval_s * (2.0**k - 1.0)
        alive = np.flatnonzero(age < duration_s)
        if alive.size == 0:
            break
        rows.append(alive)
        ages.append(age[alive])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(rows), np.concatenate(ages)


def sample_flows(flows: np.ndarray, interval_s: float = DEFAULT_INTERVAL_S,
                 client_history: ClientHistory | None = None, seed: int = SAMPLE_SEED,
                 priors_from_flows: bool = True) -> Samples:
    """Every flow of a FLOW_DTYPE table at every decision age (decision_ages_s), with the
    features the agent computes from its flow table then (connpub.model.predictive
    flow_observations) and the true remaining duration (floored at 1 ms) as target. Client
    priors count the flows that ended before the decision (of the same table unless another
    ClientHistory is given; none with priors_from_flows=False)."""
    if flows.size == 0:
        raise ConnpubError("no flows to sample; generate, import or record some first")
    duration_s = (flows["end_ns"] - flows["start_ns"]).astype(np.float64) / NS_PER_S
    rows, age_s = decision_ages_s(duration_s, interval_s, seed)
    rec = flows[rows]
    now_ns = rec["start_ns"].astype(np.int64) + np.rint(age_s * NS_PER_S).astype(np.int64)
    keys, values = snapshot_rows(rec, now_ns)
    obs = flow_observations(keys, values, 0)
    obs["age_s"] = age_s
    if client_history is None and priors_from_flows:
        client_history = client_history_of_flows(flows)
    if client_history is not None:
        count, mean = client_history.lookup(rec["client_addr"], now_ns)
        obs["client_prior_count"], obs["client_prior_log_duration"] = count, mean
    remaining = np.maximum(duration_s[rows] - age_s, MIN_REMAINING_S)
    return Samples(compute_features(obs), np.log(remaining), rec["vip_port"].astype(np.int64),
                   rec["proto"].astype(np.int64), age_s, rows, duration_s[rows], now_ns)


def client_history_of_flows(flows: np.ndarray) -> ClientHistory:
    """ClientHistory of a FLOW_DTYPE table (a flow counts once it has ended)."""
    duration = np.maximum((flows["end_ns"] - flows["start_ns"]) / NS_PER_S, MIN_REMAINING_S)
    return ClientHistory(flows["client_addr"], flows["end_ns"].astype(np.int64),
                         np.log(duration))


def sample_history(history: np.ndarray, interval_s: float = DEFAULT_INTERVAL_S,
                   client_history: ClientHistory | None = None, seed: int = SAMPLE_SEED
                   ) -> Samples:
    """sample_flows of finished-flow HISTORY_DTYPE records (flows_from_history); client
    priors from the same records (end = last_seen_ns) unless another ClientHistory is given."""
    if history.size == 0:
        raise ConnpubError("history is empty; generate or record some finished flows first")
    clients = client_history or ClientHistory.from_history(history)
    return sample_flows(flows_from_history(history), interval_s, clients, seed)

