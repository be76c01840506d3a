"""Predictive lease management in the running server agent (docs/model.md, "Predictive mode"),
in three modules: model.observations (flow-table rows -> features, client priors),
model.planner (the agent's planner over policy.renewal) and model.manager (continuous
training). This module gathers their public names."""

from connpub.model.manager import ModelManager, RetrainConfig, RetrainResult, default_trainer
from connpub.model.observations import (
    ClientPriorIndex,
    flow_features,
    flow_observations,
    sketch_summary,
    table_snapshot,
)
from connpub.model.planner import AggregatePlan, FlowPlan, PredictivePlanner, key_words

__all__ = ["AggregatePlan", "ClientPriorIndex", "FlowPlan", "ModelManager", "PredictivePlanner",
           "RetrainConfig", "RetrainResult", "default_trainer", "flow_features",
           "flow_observations", "key_words", "sketch_summary", "table_snapshot"]
