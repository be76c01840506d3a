"""`connpub lab run` as an operator sees it (issue 15 items 5, 6, 10): its agents keep their
metrics on, a finished run leaves no /run/connpub/labrun-* folder and no status files, and
`lab down` in the middle of a run makes it say that the lab was removed (one line, exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from connpub import paths
from connpub.agents.common import read_statuses
from connpub.lab import topology as labmod

pytestmark = pytest.mark.root


def lab_run(prefix: str, duration_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "connpub.cli", "lab", "run", "--workload", "web", "--flows", "30",
         "--duration", str(duration_s), "--prefix", prefix, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def agents_of(prefix: str) -> list[dict]:
    return [s for s in read_statuses() if (s.get("netns") or "").startswith(f"{prefix}-")]


def wait_agents(prefix: str, proc: subprocess.Popen, count: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = agents_of(prefix)
        if len(found) >= count and all(s.get("updated_unix") for s in found):
            return found
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    raise AssertionError(f"the run's {count} agents did not start in {timeout_s}s")


def test_finished_run_leaves_nothing_behind(unique_prefix):
    proc = lab_run(unique_prefix, 5)
    try:
        statuses = wait_agents(unique_prefix, proc, 4, 300)
        assert {s["metrics_port"] for s in statuses} == {9465}  # metrics on in every netns
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        labmod.down(unique_prefix)
    assert proc.returncode == 0, err
    assert json.loads(out)["baseline"]["flows"] > 0
    assert not (paths.RUN_ROOT / f"labrun-{unique_prefix}").exists()
    assert agents_of(unique_prefix) == []


def test_lab_down_during_run_says_the_lab_was_removed(unique_prefix):
    proc = lab_run(unique_prefix, 60)
    try:
        wait_agents(unique_prefix, proc, 4, 300)
        down = subprocess.run([sys.executable, "-m", "connpub.cli", "lab", "down", "--prefix",
                               unique_prefix], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        labmod.down(unique_prefix)
        # a failed run keeps its folder (logs for the error message): remove it here
        shutil.rmtree(paths.RUN_ROOT / f"labrun-{unique_prefix}", ignore_errors=True)
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last == (f"connpub: error: the lab {unique_prefix} was removed during the run "
                    "(`connpub lab down`?): run stopped"), err[-2000:]
    assert agents_of(unique_prefix) == []
