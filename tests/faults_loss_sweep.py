"""Loss on the publishing path, measured with real traffic (docs/reliability.md): for each loss
rate and mode, one `labrun.run` (fresh lab, both agents, the workload driver) with the loss
applied by `lab.impair` on every server's `fab` egress (server -> LB publishing packets, and
nothing else: client traffic reaches the servers through the LB's redirect into the fabric, but
replies leave through the servers' `eth0`). Too heavy for `make test` (about a minute per run):

    sudo .venv/bin/python tests/faults_loss_sweep.py --loss 5 20 50 --mode baseline adaptive \\
        --out /tmp/loss.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from connpub.lab import run as labrun

COLUMNS = ("lease_misses", "broken_connections", "flows", "publish_packets_per_s",
           "publish_bytes_per_s", "lb_map_writes_per_s", "stale_flow_seconds")


def sweep(losses: list[float], modes: list[str], duration_s: float, flows: int,
          interval_s: float, prefix: str) -> list[dict]:
    rows = []
    for loss in losses:
        for mode in modes:
            spec = labrun.RunSpec(mode=mode, loss_pct=loss, duration_s=duration_s, flows=flows,
                                  interval_s=interval_s, prefix=prefix)
            started = time.monotonic()
            metrics = labrun.run(spec)
            row = {"loss_pct": loss, "mode": mode, "run_s": round(time.monotonic() - started, 1),
                   **{column: metrics[column] for column in COLUMNS}}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", type=float, nargs="+", default=[5.0, 20.0, 50.0])
    parser.add_argument("--mode", nargs="+", default=["baseline", "adaptive"])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--flows", type=int, default=300)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--prefix", default="cploss")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = sweep(args.loss, args.mode, args.duration, args.flows, args.interval, args.prefix)
    text = json.dumps(rows, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
