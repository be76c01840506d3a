"""Shared helpers for datapath tests: a scratch-loaded program, its maps, packet builders."""

from __future__ import annotations

import ipaddress
from contextlib import contextmanager

import numpy as np
from connpub.datapath import loader
from connpub.datapath.abi import MAP_LAYOUTS, STAT_NAMES
from connpub.datapath.maps import PinnedMap, fold_cpus


def mapped(addr: str) -> bytes:
    """16-byte key form of an address (IPv4-mapped for IPv4)."""
    ip = ipaddress.ip_address(addr)
    return ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed


class ScratchProgram:
    """A compiled program (not attached) whose pinned maps the test reads and resets."""

    def __init__(self, role: str, defines: dict | None = None):
        self.role = role
        self.program = loader.compile_program(role, loader.scratch_pin_dir(f"test-{role}"), defines)
        self.pin_dir = self.program.pin_dir
        self.prog_fd = self.program.prog_fd

    def open(self, name: str) -> PinnedMap:
        key_dtype, value_dtype = MAP_LAYOUTS[self.role][name]
        return PinnedMap(self.pin_dir / name, key_dtype, value_dtype)

    def entries(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        with self.open(name) as pinned:
            keys, values = pinned.items()
        return keys, fold_cpus(values)

    def stats(self) -> dict[str, int]:
        _, values = self.entries("stats")
        names = STAT_NAMES[self.role]
        return {names[i]: int(values[i]) for i in range(len(names))}

    def clear(self, *names: str) -> None:
        for name in names:
            with self.open(name) as pinned:
                if pinned.map_type in (2, 6):  # arrays: zero every slot
                    count = pinned.max_entries
                    pinned.update_batch(
                        np.arange(count, dtype="<u4"), np.zeros(count, dtype=pinned.value_dtype)
                    )
                else:
                    pinned.clear()

    def close(self) -> None:
        self.program.close()
        loader.remove_pins(self.pin_dir)


@contextmanager
def scratch(role: str, defines: dict | None = None):
    prog = ScratchProgram(role, defines)
    try:
        yield prog
    finally:
        prog.close()
