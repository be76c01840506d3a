"""Pure policy code shared by the agents, the simulator and the lab metrics: granularity, leases,
coverage, renewal, level pipeline, rollout, liveness (time passed in; docs/policy.md)."""

from connpub.policy.granularity import (
    ClassHistory,
    GranularityController,
    apply_map_pressure,
    determine_granularity_level,
    map_pressure_min_level,
)
from connpub.policy.lease import (
    LeasePlan,
    aggregate_decision,
    baseline_expiry_ns,
    clamp_lease_ms,
    initial_expiry_ns,
    lb_lease_expiry_ns,
    lease_expiry_from_prediction,
    lease_repeats,
    may_wait_ns,
    renewal_margin_ns,
    repeat_lease_ms,
    repeat_start_ns,
    wire_lease_ms,
)
from connpub.policy.rollout import RolloutDecision, class_hash, in_cohort, rollout_levels

__all__ = [
    "ClassHistory",
    "GranularityController",
    "LeasePlan",
    "RolloutDecision",
    "aggregate_decision",
    "apply_map_pressure",
    "baseline_expiry_ns",
    "clamp_lease_ms",
    "class_hash",
    "determine_granularity_level",
    "in_cohort",
    "initial_expiry_ns",
    "lb_lease_expiry_ns",
    "lease_expiry_from_prediction",
    "lease_repeats",
    "map_pressure_min_level",
    "may_wait_ns",
    "renewal_margin_ns",
    "repeat_lease_ms",
    "repeat_start_ns",
    "rollout_levels",
    "wire_lease_ms",
]
