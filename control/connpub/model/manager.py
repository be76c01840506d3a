"""Continuous training in the running server agent (docs/model.md, "Continuous training"): the
ModelManager owns the Predictor the planner uses, refreshes the client priors from the agent's
history and retrains in a background thread, promoting a candidate only if it is better."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from connpub.config import Config
from connpub.errors import ConnpubError
from connpub.model.features import ClientHistory
from connpub.model.observations import ClientPriorIndex
from connpub.model.samples import sample_history

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainConfig:
    """When and how the ModelManager retrains (single-threaded, small)."""

    interval_s: float = 3600.0  # try a retraining this often
    first_after_s: float = 600.0  # first try this long after start
    min_flows: int = 5_000  # finished flows needed (train + held-back) to try at all
    min_new_flows: int = 5_000  # new finished flows since the last try
    max_flows: int = 200_000  # the most recent flows used
    holdout_fraction: float = 0.2  # most recent share held back for evaluation
    seed: int = 0
    coverage_tolerance: float = 0.02  # of model.should_promote
    priors_refresh_s: float = 60.0  # re-read the history for the client priors this often
    max_prior_records: int = 1_000_000  # most recent records in the client priors
    train: object = None  # model.TrainConfig; None = its defaults

    @classmethod
    def from_config(cls, cfg: Config) -> RetrainConfig:
        """Picks [model] retrain_* keys if the config defines them (else the defaults)."""
        model_cfg = cfg.model
        changes = {name: getattr(model_cfg, key) for name, key in (
            ("interval_s", "retrain_interval_s"), ("min_flows", "retrain_min_flows"),
            ("max_flows", "retrain_max_flows"), ("holdout_fraction", "retrain_holdout_fraction"),
        ) if hasattr(model_cfg, key)}
        return cls(**changes)


Trainer = Callable[[np.ndarray, Path, int], Path]


def default_trainer(config: RetrainConfig) -> Trainer:
    """train(history) -> export_onnx(path): the shipped model's recipe, one thread."""

    def run(history: np.ndarray, out: Path, version: int) -> Path:
        from connpub.model.quantile import TrainConfig, export_onnx, train_samples  # noqa: PLC0415

        samples = sample_history(history)
        fitted = train_samples(samples, seed=config.seed,
                               config=config.train or TrainConfig())
        fitted.training.update({"source": "connpub agent history", "version": version})
        return export_onnx(fitted, out)

    return run


class _HistoryReader:
    """The newest records of a history folder (Parquet part files), parts cached by
    (name, size, mtime); a part that cannot be read yet (being written) is skipped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._cache: dict[Path, tuple[tuple[int, int], np.ndarray]] = {}

    def parts(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if self.path.is_dir():
            return sorted(self.path.glob("*.parquet"))
        return []

    def current_signature(self) -> tuple:
        """(name, size, mtime) of every part now, without reading any."""
        stamps = []
        for part in self.parts():
            try:
                stat = part.stat()
            except OSError:
                continue
            stamps.append((part.name, (stat.st_size, stat.st_mtime_ns)))
        return tuple(stamps)

    def read(self, max_records: int) -> np.ndarray:
        from connpub.traffic.trace import HISTORY_DTYPE, read_history  # noqa: PLC0415

        parts = self.parts()
        if not parts:
            return np.zeros(0, HISTORY_DTYPE)
        chosen, total = [], 0
        for part in reversed(parts):
            try:
                stat = part.stat()
            except OSError:
                continue
            stamp = (stat.st_size, stat.st_mtime_ns)
            cached = self._cache.get(part)
            if cached is None or cached[0] != stamp:
                try:
                    cached = (stamp, read_history(part))
                except ConnpubError as err:
                    log.info("history part skipped for now: %s", err)
                    continue
                self._cache[part] = cached
            chosen.append(cached[1])
            total += cached[1].size
            if total >= max_records:
                break
        keep = set(self._cache) & set(parts)
        self._cache = {p: self._cache[p] for p in keep}
        if not chosen:
            return np.zeros(0, HISTORY_DTYPE)
        records = np.concatenate(chosen[::-1])
        return records[-max_records:] if records.size > max_records else records


@dataclass
class RetrainResult:
    outcome: str  # promoted | rejected | skipped
    reason: str
    candidate: dict = field(default_factory=dict)
    current: dict = field(default_factory=dict)
    seconds: float = 0.0
    path: str = ""


class ModelManager:
    """Owns the Predictor the planner uses. A background thread (start/stop) refreshes the
    client priors from the agent's history and, on a schedule, trains a candidate on the
    older part of the newest history, evaluates it and the current model on the most recent
    held-back slice, and promotes it only if model.should_promote agrees: the reference to
    the current Predictor is swapped under a lock, so a tick never waits for training."""

    def __init__(self, model_path: str | Path | None = None, *,
                 history_path: str | Path | None = None, model_dir: str | Path | None = None,
                 retrain: RetrainConfig | None = None, trainer: Trainer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from connpub.model.quantile import Predictor  # noqa: PLC0415

        self.retrain_config = retrain or RetrainConfig()
        self._predictor = Predictor(model_path or None)  # ConnpubError if unusable
        self._lock = threading.Lock()
        self.version = 1
        self.promotions = 0
        self.rejections = 0
        self.skipped = 0
        self.last_result: RetrainResult | None = None
        self.last_error = ""
        self.history_path = Path(history_path) if history_path else None
        self.model_dir = Path(model_dir) if model_dir else (
            self.history_path.parent / "models" if self.history_path else None)
        self.trainer = trainer or default_trainer(self.retrain_config)
        self._reader = _HistoryReader(self.history_path) if self.history_path else None
        self._priors: ClientPriorIndex | None = None
        self._priors_signature: tuple = ()
        self._flows_at_last_try = 0
        self._clock = clock
        self._started = clock()
        self._next_retrain = self._started + self.retrain_config.first_after_s
        self._next_priors = self._started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.training = False

    # -- serving -------------------------------------------------------------------------------

    @property
    def predictor(self):
        return self._predictor

    @property
    def model_id(self) -> str:
        return self._predictor.metadata.get("model_id", "")

    @property
    def client_priors(self) -> ClientPriorIndex | None:
        return self._priors

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        predictor = self._predictor  # one reference read: a swap never tears a batch
        return predictor.predict(features)

    def promote(self, predictor) -> int:
        """Make `predictor` the current model (atomic reference swap); returns the version."""
        with self._lock:
            self._predictor = predictor
            self.version += 1
            self.promotions += 1
            return self.version

    # -- history -------------------------------------------------------------------------------

    def refresh_priors(self) -> bool:
        """Rebuild the client priors when the history changed; True if rebuilt."""
        if self._reader is None:
            return False
        signature = self._reader.current_signature()
        if signature == self._priors_signature:
            return False
        records = self._reader.read(self.retrain_config.max_prior_records)
        self._priors = ClientPriorIndex.from_history(records) if records.size else None
        self._priors_signature = signature
        return True

    # -- retraining ----------------------------------------------------------------------------

    def _split(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(records["last_seen_ns"], kind="stable")
        records = records[order]
        held = max(1, int(round(records.size * self.retrain_config.holdout_fraction)))
        return records[:-held], records[-held:]

    def retrain_once(self, records: np.ndarray | None = None) -> RetrainResult:
        """Train, evaluate and maybe promote a candidate now (in the calling thread). `records`:
        HISTORY_DTYPE (default: the newest max_flows of the history folder)."""
        from connpub.model.quantile import Predictor, evaluate_samples, should_promote  # noqa: PLC0415

        started = time.perf_counter()
        config = self.retrain_config
        if records is None:
            if self._reader is None:
                return self._finish(RetrainResult("skipped", "no history path"), started)
            records = self._reader.read(config.max_flows)
        if records.size < config.min_flows:
            return self._finish(RetrainResult(
                "skipped", f"{records.size} finished flows, need {config.min_flows}"), started)
        self._flows_at_last_try = int(records.size)
        train_part, held = self._split(records)
        candidate_version = self.version + 1
        out_dir = self.model_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "connpub-models"
        out = out_dir / f"model-v{candidate_version}-{int(time.time())}.onnx"
        try:
            path = self.trainer(train_part, out, candidate_version)
            candidate = Predictor(path)
            clients = ClientHistory.from_history(records)
            samples = sample_history(held, client_history=clients)
            candidate_metrics = evaluate_samples(samples, candidate)
            current_metrics = evaluate_samples(samples, self._predictor)
            promote = should_promote(candidate_metrics, current_metrics,
                                     config.coverage_tolerance)
        except Exception as err:  # noqa: BLE001 - any failure rejects the candidate
            reason = str(err) if isinstance(err, ConnpubError) else f"{type(err).__name__}: {err}"
            log.warning("candidate model rejected: %s", reason)
            return self._finish(RetrainResult("rejected", reason, path=str(out)), started)
        result = RetrainResult(
            "promoted" if promote else "rejected",
            "beats the current model on the held-back slice" if promote else
            "not better than the current model on the held-back slice (model.should_promote)",
            candidate_metrics, current_metrics, path=str(path))
        if promote:
            self.promote(candidate)
            log.info("model v%d promoted: %s (MAE %.3f vs %.3f)", self.version, path,
                     candidate_metrics["mae"], current_metrics["mae"])
        else:
            log.info("candidate model kept out: MAE %.3f vs %.3f, coverage %.3f vs %.3f",
                     candidate_metrics["mae"], current_metrics["mae"],
                     candidate_metrics["coverage"], current_metrics["coverage"])
        return self._finish(result, started)

    def _finish(self, result: RetrainResult, started: float) -> RetrainResult:
        result.seconds = round(time.perf_counter() - started, 3)
        if result.outcome == "rejected":
            self.rejections += 1
            self.last_error = result.reason
        elif result.outcome == "skipped":
            self.skipped += 1
        self.last_result = result
        return result

    def _retrain_due(self) -> bool:
        if self._clock() < self._next_retrain or self._reader is None:
            return False
        self._next_retrain = self._clock() + self.retrain_config.interval_s
        return True

    def run_pending(self) -> None:
        """What the background thread does on each wake-up (callable directly in tests)."""
        now = self._clock()
        if now >= self._next_priors:
            self._next_priors = now + self.retrain_config.priors_refresh_s
            try:
                self.refresh_priors()
            except Exception as err:  # noqa: BLE001 - keep serving with the old priors
                log.warning("client priors not refreshed: %s", err)
        if self._retrain_due():
            records = self._reader.read(self.retrain_config.max_flows)
            new = records.size - self._flows_at_last_try
            if records.size >= self.retrain_config.max_flows or (
                    new >= self.retrain_config.min_new_flows):
                self.training = True
                try:
                    self.retrain_once(records)
                finally:
                    self.training = False

    def start(self) -> None:
        """Start the background thread (idempotent); lowers its own scheduling priority."""
        if self._thread is not None or self._reader is None:
            return

        def loop() -> None:
            with contextlib.suppress(OSError, AttributeError):  # training yields to the tick
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            while not self._stop.is_set():
                try:
                    self.run_pending()
                except Exception:  # noqa: BLE001 - never let the thread die
                    log.exception("model manager job failed")
                self._stop.wait(min(self.retrain_config.priors_refresh_s, 5.0))

        self._thread = threading.Thread(target=loop, name="connpub-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def status(self) -> dict:
        last = self.last_result
        return {
            "version": self.version, "model_id": self.model_id,
            "path": str(self._predictor.path), "promotions": self.promotions,
            "rejections": self.rejections, "skipped": self.skipped, "training": self.training,
            "last_error": self.last_error,
            "last_retrain": None if last is None else {
                "outcome": last.outcome, "reason": last.reason, "seconds": last.seconds,
                "path": last.path,
                "candidate_mae_log": last.candidate.get("mae"),
                "current_mae_log": last.current.get("mae")},
            "client_prior_records": 0 if self._priors is None else self._priors.records,
        }
