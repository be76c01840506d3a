"""Compile connpub's XDP programs with bcc, pin their maps, attach and detach them."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from connpub import paths
from connpub.datapath import libbpf, masks, netlink
from connpub.datapath.abi import SERVER_CONFIG_DTYPE
from connpub.datapath.clock import datapath_clock
from connpub.datapath.maps import PinnedMap
from connpub.datapath.toolchain import HEADERS_FIX, check_headers, import_bcc  # noqa: F401
from connpub.errors import ConnpubError

log = logging.getLogger(__name__)

# role -> (source under bpf/, function name, include folders under bpf/)
PROGRAMS = {
    "server": ("server/server.c", "xdp_server", ("include", "server")),
    "lb": ("lb/lb.c", "xdp_lb", ("include", "lb")),
    "empty": ("common/empty.c", "xdp_empty", ("include",)),
    "clock": ("common/clock.c", "xdp_clock", ("include",)),
    "tcpstate": ("tcpstate/tcpstate.c", "on_inet_sock_set_state",
                 ("include", "tcpstate", "server")),
}
# roles whose program is not XDP -> bcc program type name
PROGRAM_TYPES = {"tcpstate": "RAW_TRACEPOINT"}

def check_privileges() -> None:
    """Root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and a mounted bpffs, else one clear line."""
    if os.geteuid() != 0:
        raise ConnpubError(
            "needs root (XDP, bpffs and netns need CAP_SYS_ADMIN/CAP_NET_ADMIN): use sudo"
        )
    if not os.path.ismount(paths.BPFFS):
        raise ConnpubError(
            f"bpffs is not mounted at {paths.BPFFS}: run `sudo make setup` "
            f"or `mount -t bpf bpf {paths.BPFFS}`"
        )


DEFINE_VALUE = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)(U|UL|ULL|L|LL)?$")


def check_defines(defines: dict[str, int | str] | None) -> dict[str, int | str]:
    """C defines for a build: UPPER_CASE names and integer values (table sizes, tunables), else
    one ConnpubError line before anything is compiled."""
    for name, value in (defines or {}).items():
        if not name.isidentifier() or not name.isupper():
            raise ConnpubError(f"bad define {name!r}: expected an UPPER_CASE C identifier")
        if not DEFINE_VALUE.match(str(value)):
            raise ConnpubError(f"bad define {name}={value!r}: expected an integer, e.g. "
                               f"{name}=4096")
    return dict(defines or {})


def cflags_for(role: str, pin_dir: Path, defines: dict[str, int | str] | None = None) -> list[str]:
    _, _, includes = PROGRAMS[role]
    flags = [f"-I{paths.BPF_DIR / inc}" for inc in includes]
    flags.append(f'-DPIN_DIR="{pin_dir}"')
    for name, value in check_defines(defines).items():
        flags.append(f"-D{name}={value}")
    return flags


@dataclass
class LoadedProgram:
    """A compiled and loaded program whose maps are pinned under pin_dir."""

    role: str
    pin_dir: Path
    bpf: object
    prog_fd: int
    defines: dict = field(default_factory=dict)

    def close(self) -> None:
        """Release this process's handles (maps stay pinned; an attached program stays attached)."""
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def table(self, name: str):
        return self.bpf[name]


def compile_program(
    role: str, pin_dir: Path, defines: dict[str, int | str] | None = None
) -> LoadedProgram:
    """Compile and load `role`'s program; its maps are created (or reused) and pinned in pin_dir."""
    if role not in PROGRAMS:
        raise ConnpubError(f"unknown role {role!r}: expected one of {', '.join(PROGRAMS)}")
    check_headers()
    bcc = import_bcc()
    source, func, _ = PROGRAMS[role]
    src = paths.BPF_DIR / source
    if not src.exists():
        raise ConnpubError(f"program source {src} not found (set CONNPUB_BPF_DIR?)")
    defines = dict(defines or {})
    if role in ("server", "lb", "tcpstate"):
        defines.setdefault("NS_PER_JIFFY", f"{datapath_clock().ns_per_jiffy}ULL")
    pin_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        bpf = bcc.BPF(src_file=str(src).encode(), cflags=cflags_for(role, pin_dir, defines))
        fn = bpf.load_func(func.encode(), getattr(bcc.BPF, PROGRAM_TYPES.get(role, "XDP")))
    except Exception as err:
        raise ConnpubError(f"cannot load the {role} program: {str(err).splitlines()[0]}") from err
    log.info("compiled %s in %.2fs", source, time.monotonic() - started)
    return LoadedProgram(role, pin_dir, bpf, fn.fd, defines)


def init_server_maps(
    pin_dir: Path, mask_rows: np.ndarray | None = None, default_level: int = 0
) -> None:
    """Write the masks and the config singleton of a server program (keeps levels_gen moving)."""
    rows = masks.mask_table() if mask_rows is None else mask_rows
    with PinnedMap(pin_dir / "masks", np.dtype("<u4"), rows.dtype) as mask_map:
        mask_map.update_batch(np.arange(len(rows), dtype="<u4"), rows)
    with PinnedMap(pin_dir / "config", np.dtype("<u4"), SERVER_CONFIG_DTYPE) as cfg_map:
        current = cfg_map.lookup(np.array(0, dtype="<u4"))
        cfg = np.zeros(1, dtype=SERVER_CONFIG_DTYPE)
        cfg["levels_gen"] = (int(current["levels_gen"]) + 1) if current is not None else 1
        cfg["default_level"] = default_level
        cfg_map.update(np.array(0, dtype="<u4"), cfg)


def remove_pins(pin_dir: Path) -> None:
    """Remove an attachment's pins and its now-empty parent folders up to the connpub root."""
    if pin_dir.exists():
        for entry in pin_dir.iterdir():
            entry.unlink()
        pin_dir.rmdir()
    paths.build_record(pin_dir).unlink(missing_ok=True)  # the TCP-state program's, if any
    parent = pin_dir.parent
    while parent != paths.BPFFS and parent.is_relative_to(paths.PIN_ROOT):
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


# ---------------------------------------------------------------------------------------------
# attachments: a program on an interface, outliving the process that attached it


@dataclass
class Attachment:
    role: str
    iface: str
    netns: str | None
    mode: str
    pin_dir: str
    prog_id: int
    attached_at: float
    defines: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return paths.attachment_name(self.iface, self.netns)


def _state_file(iface: str, netns: str | None) -> Path:
    return paths.RUN_ROOT / "attachments" / (netns or "root") / f"{iface}.json"


def load_attachment(iface: str, netns: str | None) -> Attachment | None:
    state = _state_file(iface, netns)
    if not state.exists():
        return None
    return Attachment(**json.loads(state.read_text()))


def list_attachments() -> list[Attachment]:
    root = paths.RUN_ROOT / "attachments"
    if not root.exists():
        return []
    return [Attachment(**json.loads(p.read_text())) for p in sorted(root.glob("*/*.json"))]


def attach(
    role: str,
    iface: str,
    netns: str | None = None,
    mode: str = "auto",
    defines: dict[str, int | str] | None = None,
    default_level: int = 0,
    mask_rows: np.ndarray | None = None,
    replace: bool = False,
) -> Attachment:
    """Compile, load and attach `role` on iface; pin maps and the program. All or nothing.

    replace: swap the program already attached there (same role) for a new build in one
    atomic netlink request; the new build reuses every pinned map (BPF_TABLE_PINNED), so
    connections, leases, counters and settings carry over and no packet meets an empty table
    or no program. On failure the old program stays attached and the pins stay."""
    check_privileges()
    if role not in ("server", "lb"):
        raise ConnpubError(f"unknown role {role!r}: expected server or lb")
    netlink.ifindex(iface, netns)  # raises a one-line error for a missing netns/interface
    existing = netlink.xdp_prog_id(iface, netns)
    if replace:
        previous = load_attachment(iface, netns)
        if existing is None or previous is None or previous.role != role:
            raise ConnpubError(
                f"nothing of role {role} attached on {paths.attachment_name(iface, netns)} to "
                "replace: attach without --replace")
        return _replace(previous, defines, mask_rows, default_level)
    if existing is not None:
        raise ConnpubError(
            f"{paths.attachment_name(iface, netns)} already has XDP program id {existing} "
            "attached: run `connpub detach` first (or attach --replace for a new build)"
        )
    pin_dir = paths.pin_dir(iface, netns)
    if pin_dir.exists() and any(pin_dir.iterdir()):
        log.warning("reusing pinned maps in %s (state kept from an earlier attachment)", pin_dir)
    program = None
    attached = False
    try:
        program = compile_program(role, pin_dir, defines)
        if role == "server":
            init_server_maps(pin_dir, mask_rows, default_level)
        used_mode = netlink.attach_xdp(iface, netns, program.prog_fd, mode)
        attached = True
        prog_pin = pin_dir / "prog"
        if prog_pin.exists():
            prog_pin.unlink()
        libbpf.obj_pin(program.prog_fd, str(prog_pin))
        prog_id = libbpf.prog_info(program.prog_fd).id
        attachment = Attachment(
            role, iface, netns, used_mode, str(pin_dir), prog_id, time.time(), dict(defines or {})
        )
        state = _state_file(iface, netns)
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps(asdict(attachment)))
        return attachment
    except BaseException:
        if attached:
            netlink.detach_xdp(iface, netns)
        remove_pins(pin_dir)
        raise
    finally:
        if program is not None:
            program.close()


def _replace(previous: Attachment, defines: dict[str, int | str] | None,
             mask_rows: np.ndarray | None, default_level: int) -> Attachment:
    """attach(..., replace=True): compile against the existing pins, swap, re-pin `prog`."""
    pin_dir = Path(previous.pin_dir)
    defines = dict(previous.defines if defines is None else defines)
    program = compile_program(previous.role, pin_dir, defines)
    try:
        if previous.role == "server":
            config = pin_dir / "config"
            with PinnedMap(config, np.dtype("<u4"), SERVER_CONFIG_DTYPE) as cfg_map:
                current = cfg_map.lookup(np.array(0, dtype="<u4"))
            if current is not None:  # keep the operator's default level
                default_level = int(current["default_level"])
            init_server_maps(pin_dir, mask_rows, default_level)
        used_mode = netlink.attach_xdp(previous.iface, previous.netns, program.prog_fd,
                                       previous.mode, replace=True)
        prog_pin = pin_dir / "prog"
        tmp_pin = pin_dir / "prog_new"  # bpffs refuses names with a dot
        if tmp_pin.exists():
            tmp_pin.unlink()
        libbpf.obj_pin(program.prog_fd, str(tmp_pin))
        os.replace(tmp_pin, prog_pin)
        attachment = Attachment(previous.role, previous.iface, previous.netns, used_mode,
                                str(pin_dir), libbpf.prog_info(program.prog_fd).id, time.time(),
                                defines)
        _state_file(previous.iface, previous.netns).write_text(json.dumps(asdict(attachment)))
        return attachment
    finally:
        program.close()


def detach(iface: str, netns: str | None = None, force: bool = False) -> Attachment | None:
    """Detach the XDP program of iface and remove its pins and state. Returns what was attached.

    Refuses (ConnpubError, nothing changed) when no program is attached, or when the attached
    program is not the one connpub attached there (no attachment record, or another program
    id: someone else's program, or one swapped in behind connpub's back), unless `force`.
    An attachment whose interface or netns is gone only has its record and pins removed."""
    check_privileges()
    attachment = load_attachment(iface, netns)
    where = paths.attachment_name(iface, netns)
    present = (netlink.netns_exists(netns) if netns else True) and \
        netlink.interface_exists(iface, netns)
    if not present and attachment is None:
        raise ConnpubError(f"no netns {netns}" if netns and not netlink.netns_exists(netns)
                           else f"no interface {iface} in {netns or 'the root netns'}")
    if present:
        live_id = netlink.xdp_prog_id(iface, netns)
        if live_id is None and attachment is None:
            raise ConnpubError(f"nothing attached on {where}: no XDP program and no connpub "
                               "attachment (see `connpub status`)")
        ours = attachment is not None and live_id in (attachment.prog_id, None)
        if not ours and not force:
            owner = "no connpub attachment record" if attachment is None else \
                f"connpub attached program id {attachment.prog_id}"
            raise ConnpubError(f"{where} has XDP program id {live_id}, not connpub's ({owner}): "
                               "refusing to detach it; use --force to remove it anyway")
        if live_id is not None:
            netlink.detach_xdp(iface, netns)
    remove_pins(paths.pin_dir(iface, netns))
    state = _state_file(iface, netns)
    if state.exists():
        state.unlink()
        _remove_empty_parents(state.parent)
    return attachment


def _remove_empty_parents(folder: Path) -> None:
    while folder != paths.RUN_ROOT.parent and folder.is_relative_to(paths.RUN_ROOT):
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent


def scratch_pin_dir(tag: str) -> Path:
    """A fresh pin folder for a program that is not attached (tests, benchmarks)."""
    path = paths.PIN_ROOT / "scratch" / f"{tag}-{os.getpid()}-{time.monotonic_ns()}"
    if path.exists():
        shutil.rmtree(path)
    return path
