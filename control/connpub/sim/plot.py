"""One PNG of a simulation: publish bytes/s, lease misses, stale state and LB table size over
time, one line per mode (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PANELS = (
    ("publish_bytes", "publish bytes/s (wire)", True),
    ("lease_miss_packets", "lease-miss packets per step", False),
    ("stale_flow_seconds", "stale flow-seconds per step", False),
    ("lb_entries", "LB table entries (valid leases)", False),
)


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or values.size < width:
        return values.astype(np.float64)
    kernel = np.ones(width)
    total = np.convolve(values.astype(np.float64), kernel, mode="same")
    return total / np.convolve(np.ones(values.size), kernel, mode="same")


def plot_results(results: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Write the four panels for every mode of `simulate` results to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(10, 11), sharex=True)
    for mode, metrics in results.items():
        series = metrics["series"]
        t_s = series["t_s"]
        interval_s = float(t_s[1] - t_s[0]) if t_s.size > 1 else 1.0
        width = max(1, int(round(10.0 / interval_s)))  # 10 s moving average for readability
        for ax, (name, label, per_second) in zip(axes, PANELS, strict=True):
            values = series[name] / interval_s if per_second else series[name]
            ax.plot(t_s, _smooth(values, width) if name != "lb_entries" else values,
                    label=mode, linewidth=1)
            ax.set_ylabel(label, fontsize=8)
    axes[0].set_yscale("log")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("simulated time (s)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    target = Path(path)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
