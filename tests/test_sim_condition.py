"""Input repair and idle-time compression before the simulator (connpub.sim.condition)."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from connpub.cli import main
from connpub.config import Config
from connpub.sim import SimOptions, simulate
from connpub.sim.condition import condition_trace, keep_idle_s
from connpub.traffic.trace import write_trace
from connpub.traffic.workload import NS_PER_S, generate

YEAR_NS = 365 * 86400 * NS_PER_S


def _bursts(gap_ns: int) -> np.ndarray:
    """Two bursts of the same 400 flows, the second `gap_ns` after the first one ended."""
    burst = generate("web", 400, seed=2, window_s=30)
    second = burst.copy()
    second["client_port"] += 1  # other tuples
    offset = int(burst["end_ns"].max()) + gap_ns
    second["start_ns"] += offset
    second["end_ns"] += offset
    both = np.concatenate([burst, second])
    both["flow_id"] = np.arange(1, both.size + 1)
    return both


def test_idle_years_are_cut_and_results_match_the_short_gap():
    cfg = Config()
    keep_ns = round(keep_idle_s(cfg) * NS_PER_S)
    far = _bursts(5 * YEAR_NS)
    near = _bursts(keep_ns)
    conditioned, report = condition_trace(far, cfg)
    assert report.idle_gaps_cut == 1
    assert report.idle_removed_s == (far["start_ns"].max() - conditioned["start_ns"].max()
                                     ) / NS_PER_S > 5 * 365 * 86400 - keep_idle_s(cfg)
    gap = conditioned["start_ns"][400:].min() - conditioned["end_ns"][:400].max()
    assert gap == keep_ns
    assert np.array_equal(conditioned["start_ns"], condition_trace(near, cfg)[0]["start_ns"])
    options = SimOptions(seed=1)
    a = simulate(far, ["baseline", "adaptive"], cfg, options=options)
    b = simulate(near, ["baseline", "adaptive"], cfg, options=options)
    for mode in a:
        assert a[mode]["duration_s"] == b[mode]["duration_s"] < 600
        assert a[mode]["totals"] == b[mode]["totals"]
        assert a[mode]["lease_miss_packets"] == b[mode]["lease_miss_packets"]


def test_backwards_flows_and_epoch_times_are_repaired(tmp_path):
    trace = generate("mixed", 500, seed=3, window_s=60)
    trace["start_ns"] += 1_700_000_000 * NS_PER_S  # epoch times
    trace["end_ns"] += 1_700_000_000 * NS_PER_S
    backwards = np.arange(0, 500, 7)
    trace["start_ns"][backwards], trace["end_ns"][backwards] = (
        trace["end_ns"][backwards] + 5, trace["start_ns"][backwards].copy())
    trace["first_n"][:3] = 200
    trace["flow_id"][10] = trace["flow_id"][11]
    fixed, report = condition_trace(trace, Config())
    assert report.swapped_start_end == backwards.size
    assert report.rebased_by_s > 1.6e9 and fixed["start_ns"][0] == 0
    assert np.all(fixed["end_ns"] >= fixed["start_ns"])
    assert report.first_n_clamped == 3 and fixed["first_n"].max() <= 8
    assert report.flow_ids_renumbered == 1
    path = tmp_path / "messy.parquet"
    write_trace(trace, path)
    result = CliRunner().invoke(main, ["sim", "--trace", str(path), "--modes", "baseline",
                                       "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["conditioning"]["swapped_start_end"] == backwards.size
    assert out["modes"]["baseline"]["flows"] == 500
    assert "repaired the trace: swapped_start_end 72" in result.stderr


def test_clean_generated_trace_is_untouched():
    trace = generate("mixed", 2000, seed=5, window_s=120)
    fixed, report = condition_trace(trace, Config())
    assert report.repaired() == {}
    assert np.array_equal(fixed, trace[np.argsort(trace["start_ns"], kind="stable")])
