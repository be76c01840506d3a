"""Pure policy code shared by the agents and the simulator: granularity, leases, rollout."""

from connpub.policy.granularity import (
    ClassHistory,
    GranularityController,
    apply_map_pressure,
    determine_granularity_level,
    map_pressure_min_level,
)
from connpub.policy.lease import (
    LeasePlan,
    baseline_expiry_ns,
    clamp_lease_ms,
    initial_expiry_ns,
    lb_lease_expiry_ns,
    lease_expiry_from_prediction,
)
from connpub.policy.rollout import RolloutDecision, class_hash, in_cohort, rollout_levels

__all__ = [
    "ClassHistory",
    "GranularityController",
    "LeasePlan",
    "RolloutDecision",
    "apply_map_pressure",
    "baseline_expiry_ns",
    "clamp_lease_ms",
    "class_hash",
    "determine_granularity_level",
    "in_cohort",
    "initial_expiry_ns",
    "lb_lease_expiry_ns",
    "lease_expiry_from_prediction",
    "map_pressure_min_level",
    "rollout_levels",
]
