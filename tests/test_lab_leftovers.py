"""`connpub lab down --all` finds the remains of labs that are gone (issue 15 item 5): a `lab run`
folder whose process ended, pins and attachment records of node namespaces that no longer exist;
and leaves alone those of a lab whose namespaces exist or whose `lab run` process is alive.
Fake remains with unique prefixes, no real lab (docs/lab.md "Teardown")."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from connpub.datapath import netlink
from connpub.lab import teardown
from connpub.lab import topology as labmod
from connpub.paths import PIN_ROOT, RUN_ROOT

pytestmark = pytest.mark.root


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def fake_node(name: str) -> list[Path]:
    """Pins folder and attachment record of one node namespace, as `connpub attach` leaves them."""
    pins = PIN_ROOT / name / "eth0"
    pins.mkdir(parents=True)  # bpffs takes folders (pinned maps are not needed here)
    record = RUN_ROOT / "attachments" / name / "eth0.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"iface": "eth0", "role": "lb"}\n')
    return [PIN_ROOT / name, record.parent]


def test_down_all_finds_remains_of_gone_labs_and_keeps_live_ones():
    tag = uuid.uuid4().hex[:4]
    gone, legacy, running, live_ns = (f"{c}{tag}" for c in ("g", "l", "r", "n"))
    made: list[Path] = []
    try:
        # a run that crashed: its folder names a pid that has ended; its nodes' netns are gone
        folder = RUN_ROOT / f"labrun-{gone}"
        folder.mkdir(parents=True)
        (folder / "key").write_text("00\n")
        (folder / teardown.RUN_PID_FILE).write_text(f"{dead_pid()} 1\n")
        made.append(folder)
        made += fake_node(f"{gone}-lb1") + fake_node(f"{gone}-srv1")
        # a folder of an older version (no pid file), untouched for longer than the idle bound
        old = RUN_ROOT / f"labrun-{legacy}"
        old.mkdir()
        (old / "key").write_text("00\n")
        stale = time.time() - teardown.LEGACY_RUN_IDLE_S - 60
        for path in (old / "key", old):
            os.utime(path, (stale, stale))
        made.append(old)
        # a run in progress (this process) and a node whose netns exists: left alone
        live_folder = RUN_ROOT / f"labrun-{running}"
        live_folder.mkdir()
        labmod.write_run_pid(live_folder)
        made.append(live_folder)
        netlink.create_netns(f"{live_ns}-srv1")
        made += fake_node(f"{live_ns}-srv1")
        assert teardown.run_alive(live_folder)
        assert not teardown.run_alive(folder)
        assert not teardown.run_alive(old)

        found = labmod.all_prefixes()
        assert {gone, legacy} <= set(found)
        assert running not in found and live_ns not in found
        assert {f"{gone}-lb1", f"{gone}-srv1"} <= set(teardown.leftover_nodes())
        assert f"{live_ns}-srv1" not in teardown.leftover_nodes()

        # `lab down --all` is all_prefixes() then down() of each: only ours here (other labs
        # on this host belong to other runs)
        for prefix in (gone, legacy, running, live_ns):
            if prefix in found:
                labmod.down(prefix)
        for path in (folder, old, PIN_ROOT / f"{gone}-lb1", PIN_ROOT / f"{gone}-srv1",
                     RUN_ROOT / "attachments" / f"{gone}-lb1",
                     RUN_ROOT / "attachments" / f"{gone}-srv1"):
            assert not path.exists(), path
        # a live run's own `lab down --prefix` (run() calls it first) keeps its folder
        labmod.down(running)
        assert (live_folder / teardown.RUN_PID_FILE).exists()
        assert (PIN_ROOT / f"{live_ns}-srv1" / "eth0").is_dir()
        assert (RUN_ROOT / "attachments" / f"{live_ns}-srv1" / "eth0.json").exists()
        assert f"{gone}" not in labmod.all_prefixes()
    finally:
        netlink.delete_netns(f"{live_ns}-srv1")
        for path in made:
            shutil.rmtree(path, ignore_errors=True)

