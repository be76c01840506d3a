"""Run a loaded XDP program on a packet with BPF_PROG_TEST_RUN (libbpf's bpf_prog_test_run_opts)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from connpub.datapath import libbpf

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICT_NAMES = {
    XDP_ABORTED: "XDP_ABORTED",
    XDP_DROP: "XDP_DROP",
    XDP_PASS: "XDP_PASS",
    XDP_TX: "XDP_TX",
    XDP_REDIRECT: "XDP_REDIRECT",
}
# Room for programs that grow the packet (encapsulation adds at most an IPv6 header).
OUT_HEADROOM = 256


@dataclass
class RunResult:
    verdict: int
    data_out: bytes
    duration_ns: int  # mean per repetition, as the kernel measured it

    @property
    def verdict_name(self) -> str:
        return VERDICT_NAMES.get(self.verdict, str(self.verdict))


def run(prog_fd: int, packet: bytes, repeat: int = 1) -> RunResult:
    """One BPF_PROG_TEST_RUN. With repeat > 1 the kernel reuses ONE buffer: a program that
    rewrites the packet sees its own output from the second run on (see bench for the fix)."""
    data_in = ctypes.create_string_buffer(bytes(packet), len(packet))
    out_size = len(packet) + OUT_HEADROOM
    data_out = ctypes.create_string_buffer(out_size)
    opts = libbpf.BpfTestRunOpts(
        sz=ctypes.sizeof(libbpf.BpfTestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(packet),
        data_size_out=out_size,
        repeat=max(1, repeat),
    )
    libbpf.check(
        libbpf.LIB.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN"
    )
    return RunResult(opts.retval, data_out.raw[: opts.data_size_out], opts.duration)
