"""Fleet-scale training (docs/model.md, "Fleet-scale training"): the histories of many servers
(Parquet files: a glob or a directory) as one Dask dataframe of decision samples, LightGBM's
Dask estimators (quantile objective) on a dask.distributed cluster (an in-process LocalCluster
by default, or a scheduler address), exported through onnxmltools into the same one-node
connpub model file as the single-machine trainer (median trees shared by the three quantiles,
p10/p90 residual corrections, CQR offsets per service class)."""

from __future__ import annotations

import glob
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from connpub.errors import ConnpubError
from connpub.model.calibration import ConformalOffsets, service_class
from connpub.model.evaluation import ServiceMedians
from connpub.model.features import N_FEATURES
from connpub.model.quantile import QUANTILES, TrainConfig, package_onnx
from connpub.model.samples import Samples

CALIBRATION_SHARE = 0.2  # flows of every partition held back for the conformal offsets
MAX_CALIBRATION_ROWS = 1_000_000  # rows brought to the client for the offsets / medians
_COLUMNS = [f"f{i}" for i in range(N_FEATURES)]
_EXTRA = ["target", "proto", "vip_port", "calibration"]


def history_files(pattern: str) -> list[str]:
    """Parquet history files of a glob, a directory (every *.parquet under it) or one file."""
    path = Path(pattern)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
    else:
        files = sorted(glob.glob(pattern))
    if not files:
        raise ConnpubError(f"{pattern}: no Parquet history files (want a glob, a directory or a "
                           "file)")
    return files


def _partition(path: str, interval_s: float, seed: int):
    """pandas DataFrame of one server history's decision samples (client priors of that
    server, as its agent sees them), with a seeded calibration flag per flow."""
    import pandas as pd  # noqa: PLC0415

    from connpub.model.samples import sample_history  # noqa: PLC0415
    from connpub.traffic.trace import read_history  # noqa: PLC0415

    samples = sample_history(read_history(path), interval_s=interval_s, seed=seed)
    frame = pd.DataFrame(samples.features, columns=_COLUMNS)
    frame["target"] = samples.log_remaining_s.astype(np.float32)
    frame["proto"] = samples.proto.astype(np.int32)
    frame["vip_port"] = samples.vip_port.astype(np.int32)
    flows = np.unique(samples.flow_index)
    held = np.random.default_rng(seed + 7919).random(flows.size) < CALIBRATION_SHARE
    frame["calibration"] = np.isin(samples.flow_index, flows[held])
    return frame


def _empty_frame():
    import pandas as pd  # noqa: PLC0415

    frame = pd.DataFrame({name: np.zeros(0, np.float32) for name in _COLUMNS + ["target"]})
    frame["proto"] = np.zeros(0, np.int32)
    frame["vip_port"] = np.zeros(0, np.int32)
    frame["calibration"] = np.zeros(0, bool)
    return frame


def sample_frame(files: list[str], interval_s: float = 1.0, seed: int = 0):
    """Dask dataframe of decision samples, one partition per history file."""
    import dask  # noqa: PLC0415
    import dask.dataframe as dd  # noqa: PLC0415

    parts = [dask.delayed(_partition)(path, interval_s, seed) for path in files]
    return dd.from_delayed(parts, meta=_empty_frame(), verify_meta=False)


@dataclass
class FleetResult:
    """What train_fleet did: the model file, sizes and times."""

    path: str
    files: int
    rows: int
    fit_rows: int
    calibration_rows: int
    workers: int
    sample_seconds: float
    train_seconds: float
    trees: int


def _regressor(quantile: float, rounds: int, leaves: int, depth: int, config: TrainConfig,
               seed: int, client, threads: int):
    from lightgbm import DaskLGBMRegressor  # noqa: PLC0415

    return DaskLGBMRegressor(
        client=client, objective="quantile", alpha=quantile, n_estimators=rounds,
        num_leaves=leaves, max_depth=depth, learning_rate=config.learning_rate,
        min_child_samples=config.min_samples_leaf, max_bin=config.max_bins, random_state=seed,
        deterministic=True, force_row_wise=True, n_jobs=threads, verbose=-1)


def _tree_attributes(booster) -> dict:
    """Attributes of the TreeEnsembleRegressor onnxmltools makes of a LightGBM booster."""
    import onnx  # noqa: PLC0415
    import onnxmltools  # noqa: PLC0415
    from onnxmltools.convert.common.data_types import FloatTensorType  # noqa: PLC0415

    converted = onnxmltools.convert_lightgbm(
        booster, initial_types=[("features", FloatTensorType([None, N_FEATURES]))],
        target_opset=15)
    nodes = [n for n in converted.graph.node if n.op_type == "TreeEnsembleRegressor"]
    if len(nodes) != 1:
        raise ConnpubError(f"onnxmltools made {len(nodes)} tree ensembles of one booster; "
                           "this connpub expects one (see docs/model.md)")
    return {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}


def merge_ensembles(median: dict, lower: dict, upper: dict):
    """One TreeEnsembleRegressor node, n_targets=3: the median trees feed all three targets,
    the lower / upper correction trees feed p10 / p90 (as quantile.build_onnx does)."""
    from onnx import helper  # noqa: PLC0415

    from connpub.model.quantile import INPUT_NAME, OUTPUT_NAME  # noqa: PLC0415

    merged: dict[str, list] = {key: [] for key in (
        "nodes_treeids", "nodes_nodeids", "nodes_modes", "nodes_featureids", "nodes_values",
        "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
        "target_treeids", "target_nodeids", "target_ids", "target_weights")}
    base = [0.0, 0.0, 0.0]
    offset = 0
    for attrs, targets in ((median, (0, 1, 2)), (lower, (0,)), (upper, (2,))):
        trees = [t + offset for t in attrs["nodes_treeids"]]
        merged["nodes_treeids"] += trees
        for key in ("nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_truenodeids",
                    "nodes_falsenodeids"):
            merged[key] += list(attrs[key])
        merged["nodes_modes"] += [m.decode() if isinstance(m, bytes) else m
                                  for m in attrs["nodes_modes"]]
        merged["nodes_missing_value_tracks_true"] += list(attrs.get(
            "nodes_missing_value_tracks_true", [0] * len(trees)))
        for target in targets:
            merged["target_treeids"] += [t + offset for t in attrs["target_treeids"]]
            merged["target_nodeids"] += list(attrs["target_nodeids"])
            merged["target_ids"] += [target] * len(attrs["target_treeids"])
            merged["target_weights"] += list(attrs["target_weights"])
            base[target] += float((attrs.get("base_values") or [0.0])[0])
        offset = max(merged["nodes_treeids"]) + 1
    node = helper.make_node(
        "TreeEnsembleRegressor", [INPUT_NAME], [OUTPUT_NAME], domain="ai.onnx.ml",
        n_targets=len(QUANTILES), aggregate_function="SUM", post_transform="NONE",
        base_values=base, **merged)
    return node, offset


def _connect(scheduler: str | None, workers: int, processes: bool):
    """A client of the scheduler at ADDR, else of a LocalCluster: in-process (one worker with
    `workers` threads: LightGBM trains there with that many threads) unless processes=True
    (one worker process per core; LightGBM then trains across them over its own sockets)."""
    from dask.distributed import Client, LocalCluster  # noqa: PLC0415

    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except OSError as err:
            raise ConnpubError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from err
    if processes:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=40)
    else:
        cluster = LocalCluster(n_workers=1, threads_per_worker=workers, processes=False,
                               dashboard_address=None, silence_logs=40)
    return Client(cluster), cluster


def train_fleet(pattern: str, out: str | Path, scheduler: str | None = None, workers: int = 2,
                config: TrainConfig | None = None, interval_s: float = 1.0, seed: int = 0,
                created: str | None = None, processes: bool = False) -> FleetResult:
    """Train on every history file of `pattern` through Dask + LightGBM and write the model."""
    config = config or TrainConfig()
    files = history_files(pattern)
    client, cluster = _connect(scheduler, workers, processes)
    threads = 1 if (processes or scheduler) else workers
    try:
        started = time.perf_counter()
        frame = sample_frame(files, interval_s, seed).persist()
        rows = int(frame.shape[0].compute())
        if rows < 2 * config.min_samples_leaf:
            raise ConnpubError(f"{pattern}: only {rows} decision samples; record more history")
        fit = frame[~frame["calibration"]]
        features, target = fit[_COLUMNS].to_dask_array(lengths=True), fit["target"].to_dask_array(
            lengths=True)
        sample_seconds = time.perf_counter() - started
        started = time.perf_counter()
        median = _regressor(QUANTILES[1], config.max_iter, config.max_leaf_nodes,
                            config.max_depth, config, seed, client, threads).fit(features, target)
        residual = target - median.predict(features)
        lower, upper = (_regressor(q, config.correction_iter, config.correction_leaf_nodes,
                                   config.correction_depth, config, seed, client, threads
                                   ).fit(features, residual)
                        for q in (QUANTILES[0], QUANTILES[2]))
        train_seconds = time.perf_counter() - started
        held = frame[frame["calibration"]]
        n_held = int(held.shape[0].compute())
        if n_held > MAX_CALIBRATION_ROWS:
            held = held.sample(frac=MAX_CALIBRATION_ROWS / n_held, random_state=seed)
        cal = held.compute()
        boosters = [m.to_local().booster_ for m in (median, lower, upper)]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    cal_features = cal[_COLUMNS].to_numpy(np.float32)
    predicted = np.stack([boosters[0].predict(cal_features) + boosters[1].predict(cal_features),
                          boosters[0].predict(cal_features),
                          boosters[0].predict(cal_features) + boosters[2].predict(cal_features)],
                         axis=1)
    truth = cal["target"].to_numpy(np.float64)
    classes = service_class(cal["proto"].to_numpy(), cal["vip_port"].to_numpy())
    offsets = ConformalOffsets.fit(np.sort(predicted, axis=1), truth, classes)
    medians = ServiceMedians.fit(Samples(cal_features, truth, cal["vip_port"].to_numpy(),
                                         cal["proto"].to_numpy(), np.zeros(truth.size),
                                         np.arange(truth.size)))
    node, trees = merge_ensembles(*(_tree_attributes(b) for b in boosters))
    training = {"rows": rows, "fit_rows": rows - n_held, "calibration_rows": int(truth.size),
                "calibration": "held-back flows", "files": len(files),
                "engine": "lightgbm.dask", "baseline": medians.to_dict(),
                "baseline_note": "per-service medians of the calibration rows"}
    trainer = {"seed": seed, **asdict(config), "interval_s": interval_s}
    model = package_onnx(node, trees, training, trainer, offsets.to_json(), created)
    import onnx  # noqa: PLC0415

    target_path = Path(out)
    target_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(target_path))
    return FleetResult(str(target_path), len(files), rows, rows - n_held, int(truth.size),
                       workers if scheduler is None else -1, round(sample_seconds, 2),
                       round(train_seconds, 2), trees)

