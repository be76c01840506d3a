"""Remaining-duration predictors the simulator can plug into the lease policy: the ONNX model
(as the server agent runs it) and an oracle that knows every flow's end (for tests/bounds)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from connpub.sim.flows import MIN_REMAINING_S, SimFlows
from connpub.traffic.workload import NS_PER_S


class LeasePredictor(Protocol):
    def predict(self, flows: SimFlows, index: np.ndarray, now_ns: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p10, p50, p90) remaining seconds of flows `index` at now_ns."""


class ModelPredictor:
    """The ONNX model (connpub.model.quantile.Predictor) on features computed like the agent's."""

    def __init__(self, path: str | Path | None = None) -> None:
        from connpub.model.quantile import Predictor

        self.model = Predictor(path or None)
        self.name = f"model:{self.model.metadata.get('model_id', '?')}"

    def predict(self, flows: SimFlows, index: np.ndarray, now_ns: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p10, p50, p90 = self.model.predict(flows.features(index, now_ns))
        return p10.astype(np.float64), p50.astype(np.float64), p90.astype(np.float64)


class OraclePredictor:
    """Knows the truth: p10 = p50 = p90 = remaining seconds + margin_s (a point prediction)."""

    def __init__(self, margin_s: float = 1.0) -> None:
        self.margin_s = margin_s
        self.name = f"oracle(+{margin_s:g}s)"

    def predict(self, flows: SimFlows, index: np.ndarray, now_ns: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        remaining = np.maximum((flows.end_ns[index] - now_ns) / NS_PER_S, MIN_REMAINING_S)
        value = remaining + self.margin_s
        return value, value.copy(), value.copy()
