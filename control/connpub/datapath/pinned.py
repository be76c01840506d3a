"""The pinned maps of one attachment: open one by role and name with the dtypes of
abi.MAP_LAYOUTS, and read the role's per-CPU stats counters by name (abi.STAT_NAMES, parsed
from the C enums by tests/test_abi.py). The one place the agents, the CLI, the lab, the
benchmarks and the fuzz harness do either."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from connpub.datapath.abi import MAP_LAYOUTS, STAT_NAMES
from connpub.datapath.maps import PinnedMap
from connpub.errors import ConnpubError

STATS_MAP = {"server": "stats", "lb": "stats", "tcpstate": "tcpstate_stats"}


def open_pinned(pin_dir: str | Path, role: str, name: str,
                layouts: dict[str, tuple[np.dtype, np.dtype]] | None = None) -> PinnedMap:
    """The pinned map `name` of a `role` attachment (layouts: the role's MAP_LAYOUTS by
    default); ConnpubError naming the fix when the program is not attached."""
    layouts = MAP_LAYOUTS.get(role, {}) if layouts is None else layouts
    if name not in layouts:
        known = ", ".join(sorted(layouts)) or "none"
        raise ConnpubError(f"no map {name!r} in a {role} program (maps: {known})")
    path = Path(pin_dir) / name
    if not path.exists():
        raise ConnpubError(f"no {role} map {path}: attach the {role} program first "
                           f"(`connpub attach --role {role} --iface IF --netns NS`)")
    key_dtype, value_dtype = layouts[name]
    return PinnedMap(path, key_dtype, value_dtype)


def stat_totals(pin_dir: str | Path, role: str) -> np.ndarray:
    """The role's per-CPU counters summed over CPUs, in enum order (int64)."""
    with open_pinned(pin_dir, role, STATS_MAP[role]) as stats:
        _, per_cpu = stats.items()
    totals = per_cpu.sum(axis=1) if per_cpu.ndim > 1 else per_cpu
    return totals.astype(np.int64)


def read_stats(pin_dir: str | Path, role: str) -> dict[str, int]:
    """The role's counters by enum name, summed over CPUs (an index past the names: statN)."""
    totals = stat_totals(pin_dir, role)
    names = STAT_NAMES[role]
    return {names[i] if i < len(names) else f"stat{i}": int(totals[i])
            for i in range(len(totals))}


def zero_stats(pin_dir: str | Path, role: str) -> None:
    """Set every counter of the role's stats array to 0 (benchmarks)."""
    with open_pinned(pin_dir, role, STATS_MAP[role]) as stats:
        keys, _ = stats.items()
        stats.update_batch(keys, np.zeros(len(keys), stats.value_dtype))
