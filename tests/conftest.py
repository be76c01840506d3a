"""Shared pytest set-up: the `root` marker skips without root/bpffs; unique names per test run."""

from __future__ import annotations

import os
import uuid

import pytest


def _kernel_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.ismount("/sys/fs/bpf"):
        return "needs bpffs mounted at /sys/fs/bpf (sudo make setup)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _kernel_ready()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def unique_prefix() -> str:
    """A short prefix for namespaces/interfaces owned by one test (fits IFNAMSIZ with suffixes)."""
    return "t" + uuid.uuid4().hex[:5]
