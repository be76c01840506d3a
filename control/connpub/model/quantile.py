"""Remaining-duration quantile model: training, one-file ONNX export, batched inference, checks."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from connpub.errors import ConnpubError
from connpub.model.calibration import (
    ConformalOffsets,
    apply_offsets,
    classes_of_features,
    service_class,
)
from connpub.model.evaluation import (  # noqa: F401 (re-exported: the model's public API)
    NOMINAL_COVERAGE,
    ServiceMedians,
    evaluate,
    evaluate_samples,
    service_median_baseline,
    should_promote,
)
from connpub.model.features import FEATURE_NAMES, FEATURE_VERSION, N_FEATURES
from connpub.model.samples import Samples, sample_history

QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9)
FORMAT_VERSION = "1"
INPUT_NAME = "features"
OUTPUT_NAME = "log_remaining_s"
META_PREFIX = "connpub."
DEFAULT_MODEL_FILE = "default_model.onnx"
CALIBRATION_FRACTION = 0.2  # flows held back from fitting for the conformal offsets


@dataclass(frozen=True)
class TrainConfig:
    """Gradient-boosting settings. The median ensemble is shared by all three quantiles; p10 and
    p90 add small correction ensembles fitted on its residuals (fewer trees -> faster inference)."""

    max_iter: int = 20  # rounds of the median ensemble (26 trees in all: docs/model.md)
    max_leaf_nodes: int = 24
    max_depth: int = 6
    learning_rate: float = 0.4
    correction_iter: int = 3  # rounds of each of the p10 / p90 residual ensembles
    correction_leaf_nodes: int = 16
    correction_depth: int = 5
    min_samples_leaf: int = 50
    max_bins: int = 255
    threads: int = 1


@dataclass
class QuantileModel:
    """Median HistGradientBoostingRegressor plus p10/p90 residual-quantile corrections."""

    median: object  # sklearn HistGradientBoostingRegressor, quantile 0.5 of log remaining
    lower: object  # quantile 0.1 of (truth - median prediction)
    upper: object  # quantile 0.9 of (truth - median prediction)
    config: TrainConfig
    seed: int
    training: dict = field(default_factory=dict)
    calibration: ConformalOffsets | None = None  # CQR offsets per service class

    def predict_log(self, features: np.ndarray) -> np.ndarray:
        """(n, 3) log-remaining [p10, p50, p90] as the sklearn models compute them."""
        p50 = self.median.predict(features)
        return np.stack(
            [p50 + self.lower.predict(features), p50, p50 + self.upper.predict(features)], axis=1
        )


def _quantile_regressor(quantile: float, rounds: int, leaves: int, depth: int,
                        config: TrainConfig, seed: int):
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(
        loss="quantile", quantile=quantile, max_iter=rounds, max_leaf_nodes=leaves,
        max_depth=depth, learning_rate=config.learning_rate,
        min_samples_leaf=config.min_samples_leaf, max_bins=config.max_bins,
        early_stopping=False, random_state=seed,
    )


def _calibration_flows(flow_index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Bool per row: its flow is held back for calibration (a seeded share of the flows)."""
    flows = np.unique(flow_index)
    held = np.random.default_rng(seed + 7919).random(flows.size) < fraction
    return np.isin(flow_index, flows[held])


def _fit_trees(samples: Samples, config: TrainConfig, seed: int) -> QuantileModel:
    """The median ensemble and the p10/p90 residual corrections on all rows of samples."""
    from threadpoolctl import threadpool_limits

    if samples.features.shape[0] < 2 * config.min_samples_leaf:
        raise ConnpubError(
            f"only {samples.features.shape[0]} training rows; need at least "
            f"{2 * config.min_samples_leaf} (record or generate more history)"
        )
    features, target = samples.features, samples.log_remaining_s
    with threadpool_limits(limits=config.threads):
        median = _quantile_regressor(QUANTILES[1], config.max_iter, config.max_leaf_nodes,
                                     config.max_depth, config, seed).fit(features, target)
        residual = target - median.predict(features)
        lower, upper = (
            _quantile_regressor(quantile, config.correction_iter, config.correction_leaf_nodes,
                                config.correction_depth, config, seed).fit(features, residual)
            for quantile in (QUANTILES[0], QUANTILES[2])
        )
    return QuantileModel(median, lower, upper, config, seed)


def train_samples(samples: Samples, seed: int = 0, config: TrainConfig | None = None,
                  calibration_fraction: float = CALIBRATION_FRACTION,
                  groups: np.ndarray | None = None) -> QuantileModel:
    """Fit the quantile models on prepared samples (deterministic for a given seed), then
    split-conformal (CQR) offsets per service class (docs/model.md, "Calibration"):
    - groups (one source id per row, >= 2 distinct): cross-source calibration, for a model
      meant for networks it has not seen: each group's rows are scored by trees fitted on the
      other groups, the pooled scores give the offsets, the shipped trees use every row;
    - else the trees are fitted on the flows not held back (calibration_fraction of them) and
      the offsets come from the held-back flows (0: no calibration)."""
    config = config or TrainConfig()
    if min(config.max_iter, config.correction_iter) <= 0:
        raise ConnpubError("max_iter and correction_iter must be positive")
    if not 0.0 <= calibration_fraction < 1.0:
        raise ConnpubError(f"calibration fraction {calibration_fraction} not in [0, 1)")
    cross = groups is not None and np.unique(groups).size >= 2
    if cross:
        scored, predicted = [], []
        for group in np.unique(groups):
            inside = np.asarray(groups) == group
            model = _fit_trees(samples.subset(~inside), config, seed)
            part = samples.subset(inside)
            scored.append(part)
            predicted.append(np.sort(model.predict_log(part.features), axis=1))
        held = np.zeros(samples.flow_index.size, bool)
        cal, cal_predicted = Samples.concat(scored), np.concatenate(predicted)
    else:
        held = (_calibration_flows(samples.flow_index, calibration_fraction, seed)
                if calibration_fraction > 0 else np.zeros(samples.flow_index.size, bool))
    fit = samples.subset(~held)
    model = _fit_trees(fit, config, seed)
    if not cross and held.any():
        cal = samples.subset(held)
        cal_predicted = np.sort(model.predict_log(cal.features), axis=1)
    model.training = {
        "rows": int(samples.features.shape[0]),
        "fit_rows": int(fit.features.shape[0]),
        "calibration": ("cross-source" if cross else "held-back flows") if (
            cross or held.any()) else "none",
        "calibration_rows": int(cal.log_remaining_s.size) if (cross or held.any()) else 0,
        "flows": int(np.unique(samples.flow_index).size),
        "log_remaining_quantiles": [float(v) for v in np.quantile(fit.log_remaining_s,
                                                                  QUANTILES)],
        "services": int(np.unique(service_class(samples.proto, samples.vip_port)).size),
        "baseline": ServiceMedians.fit(samples).to_dict(),
    }
    if cross or held.any():
        model.calibration = ConformalOffsets.fit(
            cal_predicted, cal.log_remaining_s, service_class(cal.proto, cal.vip_port))
    return model


def train(history: np.ndarray, seed: int = 0, config: TrainConfig | None = None) -> QuantileModel:
    """Train on HISTORY_DTYPE records (each flow sampled at the ages it was alive at)."""
    return train_samples(sample_history(history), seed, config)


def _float32_leq_threshold(threshold: np.ndarray) -> np.ndarray:
    """Largest float32 t32 with t32 <= t: for float32 x, x <= t exactly when x <= t32."""
    t32 = threshold.astype(np.float32)
    too_big = t32.astype(np.float64) > threshold
    t32[too_big] = np.nextafter(t32[too_big], np.float32(-np.inf))
    return t32


def build_onnx(model: QuantileModel, created: str | None = None):
    """One ONNX graph: a single ai.onnx.ml TreeEnsembleRegressor with n_targets=len(QUANTILES)."""
    from onnx import helper

    nodes_tree, nodes_id, nodes_mode, nodes_feature, nodes_value = [], [], [], [], []
    nodes_true, nodes_false, nodes_missing = [], [], []
    target_tree, target_node, target_id, target_weight = [], [], [], []
    tree_id = 0
    for est in (model.lower, model.median, model.upper):
        if not hasattr(est, "_predictors") or not hasattr(est, "_baseline_prediction"):
            import sklearn

            raise ConnpubError(
                f"scikit-learn {sklearn.__version__} changed HistGradientBoosting internals the "
                "ONNX export reads; install the version in docs/model.md (tested: 1.9.1)"
            )
    baseline = [float(np.asarray(est._baseline_prediction).reshape(-1)[0])
                for est in (model.lower, model.median, model.upper)]
    base_values = [baseline[1] + baseline[0], baseline[1], baseline[1] + baseline[2]]
    # median trees feed all three targets; each correction ensemble feeds its own target
    for est, targets in ((model.median, (0, 1, 2)), (model.lower, (0,)), (model.upper, (2,))):
        for (predictor,) in est._predictors:
            nodes = predictor.nodes
            if nodes["is_categorical"].any():
                raise ConnpubError("categorical splits cannot be exported; train numeric only")
            count = nodes.size
            leaf = nodes["is_leaf"].astype(bool)
            nodes_tree += [tree_id] * count
            nodes_id += list(range(count))
            nodes_mode += ["LEAF" if is_leaf else "BRANCH_LEQ" for is_leaf in leaf]
            nodes_feature += np.where(leaf, 0, nodes["feature_idx"]).astype(int).tolist()
            thresholds = _float32_leq_threshold(nodes["num_threshold"].astype(np.float64))
            nodes_value += np.where(leaf, 0.0, thresholds).astype(np.float32).tolist()
            nodes_true += np.where(leaf, 0, nodes["left"]).astype(int).tolist()
            nodes_false += np.where(leaf, 0, nodes["right"]).astype(int).tolist()
            nodes_missing += np.where(leaf, 0, nodes["missing_go_to_left"]).astype(int).tolist()
            leaves = np.flatnonzero(leaf)
            for target in targets:
                target_tree += [tree_id] * leaves.size
                target_node += leaves.tolist()
                target_id += [target] * leaves.size
                target_weight += nodes["value"][leaves].astype(np.float64).tolist()
            tree_id += 1
    ensemble = helper.make_node(
        "TreeEnsembleRegressor", [INPUT_NAME], [OUTPUT_NAME], domain="ai.onnx.ml",
        n_targets=len(QUANTILES), aggregate_function="SUM", post_transform="NONE",
        base_values=base_values, nodes_treeids=nodes_tree, nodes_nodeids=nodes_id,
        nodes_modes=nodes_mode, nodes_featureids=nodes_feature, nodes_values=nodes_value,
        nodes_truenodeids=nodes_true, nodes_falsenodeids=nodes_false,
        nodes_missing_value_tracks_true=nodes_missing, target_treeids=target_tree,
        target_nodeids=target_node, target_ids=target_id, target_weights=target_weight,
    )
    return package_onnx(ensemble, tree_id, model.training,
                        {"seed": model.seed, **asdict(model.config)},
                        None if model.calibration is None else model.calibration.to_json(),
                        created)


def package_onnx(ensemble, trees: int, training: dict, trainer: dict,
                 calibration_json: str | None, created: str | None):
    """The connpub model file around one TreeEnsembleRegressor node (input `features` [N, 19],
    output `log_remaining_s` [N, 3]) with its connpub.* metadata; checked."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [ensemble], "connpub_remaining_duration",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, N_FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, len(QUANTILES)])],
    )
    onnx_model = helper.make_model(
        graph, producer_name="connpub", producer_version=FORMAT_VERSION,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
    )
    onnx_model.ir_version = 8
    model_id = hashlib.sha256(graph.SerializeToString()).hexdigest()[:16]
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "feature_version": str(FEATURE_VERSION),
        "feature_names": json.dumps(list(FEATURE_NAMES)),
        "quantiles": json.dumps(list(QUANTILES)),
        "target": "natural log of remaining duration in seconds",
        "trees": str(trees),
        "training": json.dumps(training, sort_keys=True),
        "trainer": json.dumps(trainer, sort_keys=True),
        "created": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if calibration_json is not None:
        metadata["calibration"] = calibration_json
    for key, value in metadata.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    onnx.checker.check_model(onnx_model)
    return onnx_model


def export_onnx(model: QuantileModel, path: str | Path, created: str | None = None) -> Path:
    """Write the model as one ONNX file; returns the path."""
    import onnx

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    onnx.save_model(build_onnx(model, created), str(tmp))
    os.replace(tmp, target)
    return target


def default_model_path() -> Path:
    """The model shipped with the package (trained by connpub.model.train_default)."""
    return Path(str(resources.files("connpub") / "data" / DEFAULT_MODEL_FILE))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The connpub.* metadata of an ONNX file (prefix stripped); ConnpubError if unreadable."""
    import onnx

    try:
        onnx_model = onnx.load_model(str(path), load_external_data=False)
    except FileNotFoundError as err:
        raise ConnpubError(f"{path}: no such model file") from err
    except Exception as err:  # onnx raises DecodeError and others for junk
        raise ConnpubError(f"{path}: not an ONNX model ({type(err).__name__})") from err
    return {
        entry.key[len(META_PREFIX):]: entry.value
        for entry in onnx_model.metadata_props
        if entry.key.startswith(META_PREFIX)
    }


class Predictor:
    """Batched onnxruntime inference of remaining-duration quantiles, single-threaded."""

    def __init__(self, path: str | Path | None = None, threads: int = 1,
                 calibrated: bool = True):
        import onnxruntime as ort

        self.path = Path(path) if path is not None else default_model_path()
        self.metadata = read_metadata(self.path)
        self._check_metadata()
        self.offsets_table: np.ndarray | None = None  # CQR offsets per service class
        if calibrated and "calibration" in self.metadata:
            try:
                offsets = ConformalOffsets.from_json(self.metadata["calibration"])
            except (ValueError, KeyError, TypeError) as err:
                raise ConnpubError(f"{self.path}: corrupt calibration metadata ({err})") from err
            self.offsets_table = offsets.table()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise ConnpubError(f"{self.path}: onnxruntime cannot load it ({err})") from err
        self._check_signature()

    def _check_metadata(self) -> None:
        meta, where = self.metadata, self.path
        if meta.get("format_version") != FORMAT_VERSION:
            raise ConnpubError(
                f"{where}: model format {meta.get('format_version')!r}, want {FORMAT_VERSION!r}; "
                "retrain with `connpub model train`"
            )
        if meta.get("feature_version") != str(FEATURE_VERSION):
            raise ConnpubError(
                f"{where}: feature version {meta.get('feature_version')!r}, this connpub computes "
                f"version {FEATURE_VERSION}; retrain with `connpub model train`"
            )
        try:
            names = json.loads(meta.get("feature_names", "null"))
            quantiles = json.loads(meta.get("quantiles", "null"))
        except json.JSONDecodeError as err:
            raise ConnpubError(f"{where}: corrupt feature_names/quantiles metadata") from err
        if names != list(FEATURE_NAMES):
            raise ConnpubError(f"{where}: feature names differ from this connpub's; retrain")
        if quantiles != list(QUANTILES):
            raise ConnpubError(f"{where}: quantiles {quantiles}, want {list(QUANTILES)}; retrain")

    def _check_signature(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(float)":
            raise ConnpubError(
                f"{self.path}: model inputs {[(i.name, i.type) for i in inputs]}, want one "
                f"float tensor {INPUT_NAME!r}"
            )
        if inputs[0].shape[-1] != N_FEATURES:
            raise ConnpubError(
                f"{self.path}: model takes {inputs[0].shape[-1]} features, want {N_FEATURES}"
            )
        if len(outputs) != 1 or outputs[0].name != OUTPUT_NAME or (
            outputs[0].shape[-1] != len(QUANTILES)
        ):
            raise ConnpubError(
                f"{self.path}: model outputs {[(o.name, o.shape) for o in outputs]}, want "
                f"{OUTPUT_NAME!r} with {len(QUANTILES)} columns"
            )

    def predict_raw(self, features: np.ndarray) -> np.ndarray:
        """(n, 3) float32 log remaining seconds exactly as the ONNX graph computes them."""
        batch = np.ascontiguousarray(features, dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != N_FEATURES:
            raise ConnpubError(f"features have shape {batch.shape}, want (n, {N_FEATURES})")
        if batch.shape[0] == 0:
            return np.zeros((0, len(QUANTILES)), np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    def predict_log(self, features: np.ndarray) -> np.ndarray:
        """(n, 3) log remaining seconds, sorted per row so p10 <= p50 <= p90, with the
        model's conformal offsets per service class applied (unless calibrated=False)."""
        raw = np.sort(self.predict_raw(features), axis=1)
        if self.offsets_table is None:
            return raw
        return apply_offsets(raw, classes_of_features(np.asarray(features)), self.offsets_table)

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p10, p50, p90) remaining duration in seconds, float32 arrays of length n."""
        seconds = np.exp(self.predict_log(features))
        return seconds[:, 0], seconds[:, 1], seconds[:, 2]


def model_info(path: str | Path) -> dict:
    """Metadata of a model file, checked by loading it as a Predictor."""
    predictor = Predictor(path)
    meta = dict(predictor.metadata)
    info = {"path": str(predictor.path), "size_bytes": predictor.path.stat().st_size}
    for key in ("feature_names", "quantiles", "training", "trainer"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    info.update(meta)
    return info
