"""Faults with live traffic, issue 7 part 5 (loss): random loss on the publishing path (every
server's `fab` egress, `lab.impair`, a tc BPF program here) under the `mixed` workload through a
fresh lab (`labrun.run`). Slow (about a minute per run): `pytest -m slow
tests/test_faults_loss.py`; the full sweep is tests/faults_loss_sweep.py, measured numbers in
docs/reliability.md."""

from __future__ import annotations

import uuid

import pytest
from connpub.lab import run as labrun

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.parametrize(("loss_pct", "mode"), [(5.0, "baseline"), (5.0, "adaptive"),
                                                (20.0, "baseline"), (20.0, "adaptive")])
def test_publish_loss_breaks_no_connection(loss_pct, mode):
    spec = labrun.RunSpec(mode=mode, loss_pct=loss_pct, duration_s=30.0, flows=300,
                          interval_s=0.5, prefix="fl" + uuid.uuid4().hex[:5])
    metrics = labrun.run(spec)
    print(f"\nloss {loss_pct}% {mode}: {metrics['lease_misses']} lease misses, "
          f"{metrics['broken_connections']} broken of {metrics['flows']}, "
          f"{metrics['publish_bytes_per_s']:.0f} publish B/s")
    assert metrics["broken_connections"] == 0
    if loss_pct <= 5.0:
        # k = 3: a miss needs two or three publish packets in a row lost (docs/reliability.md)
        assert metrics["lease_misses"] == 0
