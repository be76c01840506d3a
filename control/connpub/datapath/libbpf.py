"""ctypes bindings to the few libbpf (1.x) calls connpub needs: pinned objects, batched map ops,
map info and BPF_PROG_TEST_RUN. libbpf 1.x returns -errno on failure."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from connpub.errors import ConnpubError

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


class BpfMapInfo(ctypes.Structure):
    """struct bpf_map_info (uapi), the fields up to map_extra."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info (uapi), the leading fields connpub reads."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("_rest", ctypes.c_uint8 * 160),
    ]


class BpfMapBatchOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class BpfTestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts of libbpf 1.x."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as err:
        raise ConnpubError(f"cannot load libbpf ({name}): {err}; run: sudo make setup") from err
    vp, u32p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)
    sigs = {
        "bpf_obj_get": ([ctypes.c_char_p], ctypes.c_int),
        "bpf_obj_pin": ([ctypes.c_int, ctypes.c_char_p], ctypes.c_int),
        "bpf_obj_get_info_by_fd": ([ctypes.c_int, vp, u32p], ctypes.c_int),
        "bpf_map_lookup_elem": ([ctypes.c_int, vp, vp], ctypes.c_int),
        "bpf_map_update_elem": ([ctypes.c_int, vp, vp, ctypes.c_uint64], ctypes.c_int),
        "bpf_map_delete_elem": ([ctypes.c_int, vp], ctypes.c_int),
        "bpf_map_get_next_key": ([ctypes.c_int, vp, vp], ctypes.c_int),
        "bpf_map_lookup_batch": ([ctypes.c_int, vp, vp, vp, vp, u32p, vp], ctypes.c_int),
        "bpf_map_update_batch": ([ctypes.c_int, vp, vp, u32p, vp], ctypes.c_int),
        "bpf_map_delete_batch": ([ctypes.c_int, vp, u32p, vp], ctypes.c_int),
        "bpf_prog_test_run_opts": ([ctypes.c_int, ctypes.POINTER(BpfTestRunOpts)], ctypes.c_int),
        "bpf_prog_get_fd_by_id": ([ctypes.c_uint32], ctypes.c_int),
        "libbpf_num_possible_cpus": ([], ctypes.c_int),
    }
    for fn, (argtypes, restype) in sigs.items():
        func = getattr(lib, fn)
        func.argtypes, func.restype = argtypes, restype
    return lib


LIB = _load()


def check(ret: int, what: str) -> int:
    """Raise OSError(errno) for a negative libbpf return, else return it."""
    if ret < 0:
        code = -ret if ret != -1 else (ctypes.get_errno() or errno.EIO)
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


def obj_get(path: str) -> int:
    """fd of a pinned map or program; ConnpubError when the pin does not exist."""
    fd = LIB.bpf_obj_get(path.encode())
    if fd < 0:
        code = -fd if fd != -1 else ctypes.get_errno()
        raise ConnpubError(f"cannot open pinned object {path}: {os.strerror(code)}")
    return fd


def obj_pin(fd: int, path: str) -> None:
    check(LIB.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(LIB.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


def prog_info(fd: int) -> BpfProgInfo:
    info = BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(LIB.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
    return info


def num_possible_cpus() -> int:
    return check(LIB.libbpf_num_possible_cpus(), "possible cpus")


# ---------------------------------------------------------------------------------------------
# kernel BTF: struct member offsets of the running kernel (its headers may be another version)

BTF_KIND_STRUCT, BTF_KIND_UNION = 4, 5


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32),
                ("size_or_type", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("offset", ctypes.c_uint32)]


def _btf_lib() -> ctypes.CDLL:
    vp = ctypes.c_void_p
    sigs = {
        "btf__load_vmlinux_btf": ([], vp),
        "btf__free": ([vp], None),
        "btf__find_by_name_kind": ([vp, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int),
        "btf__type_by_id": ([vp, ctypes.c_uint32], ctypes.POINTER(_BtfType)),
        "btf__name_by_offset": ([vp, ctypes.c_uint32], ctypes.c_char_p),
        "btf__resolve_type": ([vp, ctypes.c_uint32], ctypes.c_int),
    }
    for fn, (argtypes, restype) in sigs.items():
        func = getattr(LIB, fn)
        func.argtypes, func.restype = argtypes, restype
    return LIB


def _member_path(btf, type_id: int, name: str) -> tuple[int, int] | None:
    """(byte offset, member type id) of `name` in a struct/union, looking through anonymous
    struct/union members; None when absent."""
    lib = LIB
    t = lib.btf__type_by_id(btf, type_id).contents
    kind, vlen, kflag = (t.info >> 24) & 0x1F, t.info & 0xFFFF, t.info >> 31
    if kind not in (BTF_KIND_STRUCT, BTF_KIND_UNION):
        return None
    base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
    for i in range(vlen):
        m = _BtfMember.from_address(base + i * ctypes.sizeof(_BtfMember))
        bits = m.offset & 0xFFFFFF if kflag else m.offset
        member_name = (lib.btf__name_by_offset(btf, m.name_off) or b"").decode()
        member_type = lib.btf__resolve_type(btf, m.type)
        if member_name == name:
            return bits // 8, member_type
        if not member_name:
            inner = _member_path(btf, member_type, name)
            if inner is not None:
                return bits // 8 + inner[0], inner[1]
    return None


def kernel_member_offsets(wanted: dict[str, str]) -> dict[str, int]:
    """{define: byte offset} for {define: "struct.member.member"} from the running kernel's BTF
    (/sys/kernel/btf/vmlinux). Raises ConnpubError naming the first member not found."""
    lib = _btf_lib()
    btf = lib.btf__load_vmlinux_btf()
    if not btf:
        raise ConnpubError("cannot load the kernel's BTF (/sys/kernel/btf/vmlinux): the kernel "
                           "needs CONFIG_DEBUG_INFO_BTF")
    try:
        offsets = {}
        for define, path in wanted.items():
            struct, *members = path.split(".")
            type_id = lib.btf__find_by_name_kind(btf, struct.encode(), BTF_KIND_STRUCT)
            offset = 0
            for member in members:
                found = _member_path(btf, type_id, member) if type_id > 0 else None
                if found is None:
                    raise ConnpubError(f"the kernel's BTF has no {path} (at {member})")
                offset += found[0]
                type_id = found[1]
            offsets[define] = offset
        return offsets
    finally:
        lib.btf__free(btf)
