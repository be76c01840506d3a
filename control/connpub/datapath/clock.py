"""The datapath clock (jiffies x ns-per-jiffy, see bpf/include/clock.h) and CLOCK_MONOTONIC,
calibrated against each other by running bpf/common/clock.c with BPF_PROG_TEST_RUN."""

from __future__ import annotations

import functools
import json
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from connpub import paths
from connpub.datapath import testrun
from connpub.datapath.toolchain import check_headers, import_bcc
from connpub.errors import ConnpubError

KNOWN_HZ = (100, 250, 300, 1000)


@dataclass(frozen=True)
class DatapathClock:
    """datapath_ns = jiffies * ns_per_jiffy; monotonic_ns = datapath_ns + offset_ns (to a jiffy)."""

    hz: int
    offset_ns: int  # CLOCK_MONOTONIC minus datapath clock
    boot_id: str

    @property
    def ns_per_jiffy(self) -> int:
        return 1_000_000_000 // self.hz

    def now_ns(self) -> int:
        """The datapath clock's 'now', from CLOCK_MONOTONIC (no syscall into BPF)."""
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC) - self.offset_ns

    def to_monotonic(self, datapath_ns: np.ndarray | int) -> np.ndarray | int:
        return datapath_ns + self.offset_ns


def _sample(prog_fd: int) -> tuple[int, int]:
    result = testrun.run(prog_fd, bytes(64))
    jiffies, ktime_ns = struct.unpack_from("<QQ", result.data_out)
    return jiffies, ktime_ns


@dataclass
class _ClockProgram:
    bpf: object
    prog_fd: int


def _load_clock_program() -> _ClockProgram:
    """bpf/common/clock.c compiled and loaded (no maps, nothing pinned)."""
    check_headers()
    bcc = import_bcc()
    source = paths.BPF_DIR / "common" / "clock.c"
    try:
        bpf = bcc.BPF(src_file=str(source).encode())
        fn = bpf.load_func(b"xdp_clock", bcc.BPF.XDP)
    except Exception as err:
        raise ConnpubError(f"cannot load the clock program: {str(err).splitlines()[0]}") from err
    return _ClockProgram(bpf, fn.fd)


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def calibrate() -> DatapathClock:
    """Measure HZ and the offset (about 0.1 s; cached per boot under the run folder)."""
    cache = paths.RUN_ROOT / "clock.json"
    boot_id = _boot_id()
    if cache.exists():
        cached = DatapathClock(**json.loads(cache.read_text()))
        if cached.boot_id == boot_id:
            return cached
    program = _load_clock_program()
    try:
        j0, k0 = _sample(program.prog_fd)
        deadline = time.monotonic() + 0.12
        while time.monotonic() < deadline:
            time.sleep(0.02)
        # wait for a tick edge so the offset is exact to the tick
        j1, k1 = _sample(program.prog_fd)
        while True:
            j2, k2 = _sample(program.prog_fd)
            if j2 != j1:
                break
    finally:
        program.bpf.cleanup()
    measured_hz = (j1 - j0) * 1e9 / (k1 - k0)
    hz = min(KNOWN_HZ, key=lambda h: abs(h - measured_hz))
    # ktime_get_ns is CLOCK_MONOTONIC
    clock = DatapathClock(hz=hz, offset_ns=k2 - j2 * (1_000_000_000 // hz), boot_id=boot_id)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(asdict(clock)))
    return clock


@functools.cache
def datapath_clock() -> DatapathClock:
    return calibrate()
