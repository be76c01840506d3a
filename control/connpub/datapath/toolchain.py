"""The bcc toolchain of this host: Debian's python3-bpfcc and the kernel headers it compiles
against, each checked with one clear error line. Used by the loader, the datapath clock's
calibration and the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

from connpub.errors import ConnpubError

HEADERS_FIX = (
    "bcc needs kernel headers at /lib/modules/{release}/build and none were found; "
    "run `sudo make setup` (installs linux-headers-amd64 and links build -> "
    "/usr/src/linux-headers-*-amd64, source -> /usr/src/linux-headers-*-common)"
)



def check_headers() -> None:
    release = os.uname().release
    build = Path(f"/lib/modules/{release}/build")
    if not (build / "include").exists() and not (build / "Makefile").exists():
        raise ConnpubError(HEADERS_FIX.format(release=release))


def import_bcc():
    try:
        import bcc  # noqa: PLC0415 - Debian's python3-bpfcc, only present on set-up hosts
    except ImportError as err:
        raise ConnpubError(
            "cannot import bcc: install Debian's python3-bpfcc and use a venv with "
            "--system-site-packages (`sudo make setup` does both)"
        ) from err
    return bcc
