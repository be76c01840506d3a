"""The lab's C programs (native/: the load generator and the echo server), compiled on first
use with the system C compiler and cached by a hash of their source (docs/lab.md, "Scale").

    from connpub.traffic import native
    native.binary("loadgen")   # Path of connpub-loadgen-<hash>, built if missing
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from connpub.errors import ConnpubError
from connpub.paths import NATIVE_DIR, RUN_ROOT

PROGRAMS = ("loadgen", "echod")
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
# nice of the load generator and the echo servers in the lab, each a session of its own whose
# autogroup gets it too: they are the traffic, not the system under test, and other jobs on a
# shared machine must not starve them into timeouts (docs/lab.md, "Scale")
LAB_NICE = -5


def cache_dir() -> Path:
    """Where built programs live: the run directory as root, a per-user temp folder otherwise."""
    if os.geteuid() == 0:
        return RUN_ROOT / "native"
    return Path(tempfile.gettempdir()) / f"connpub-native-{os.getuid()}"


def binary(program: str) -> Path:
    """The built program (connpub-<program>-<source hash>), compiling it when missing."""
    if program not in PROGRAMS:
        raise ConnpubError(f"unknown native program {program!r}: one of {', '.join(PROGRAMS)}")
    source = NATIVE_DIR / f"{program}.c"
    digest = hashlib.sha256(source.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    folder = cache_dir()
    out = folder / f"connpub-{program}-{digest}"
    if out.exists():
        return out
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise ConnpubError("no C compiler (cc, gcc or clang) for the lab's load generator: "
                           "install gcc (make setup does)")
    folder.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent builds (tests, labs) never see half a file
    fd, tmp = tempfile.mkstemp(prefix=out.name, dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *CFLAGS, "-o", tmp, str(source), "-lm"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
            raise ConnpubError(f"compiling {source} failed: {first}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out
