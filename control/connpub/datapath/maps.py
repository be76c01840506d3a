"""Pinned BPF maps opened from any process, read and written in batches straight into numpy."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import numpy as np

from connpub.datapath import libbpf
from connpub.errors import ConnpubError

BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
MAP_TYPE_NAMES = {
    1: "hash",
    2: "array",
    5: "percpu_hash",
    6: "percpu_array",
    9: "lru_hash",
    10: "lru_percpu_hash",
    3: "prog_array",
    12: "array_of_maps",
    13: "hash_of_maps",
}

BATCH_ENTRIES = 65536  # entries asked for per lookup/update syscall


def _ptr(array: np.ndarray) -> int:
    return array.ctypes.data


class PinnedMap:
    """One pinned map. Keys and values are numpy structured arrays of the given dtypes.

    Per-CPU maps return values shaped (n, ncpus); `sum_cpus` folds them."""

    def __init__(self, path: str | Path, key_dtype: np.dtype, value_dtype: np.dtype):
        self.path = str(path)
        self.fd = libbpf.obj_get(self.path)
        info = libbpf.map_info(self.fd)
        self.name = info.name.decode()
        self.map_type = info.type
        self.max_entries = info.max_entries
        self.key_dtype = np.dtype(key_dtype)
        self.value_dtype = np.dtype(value_dtype)
        self.percpu = info.type in PERCPU_TYPES
        self.ncpus = libbpf.num_possible_cpus() if self.percpu else 1
        if info.key_size != self.key_dtype.itemsize or info.value_size != self.value_dtype.itemsize:
            os.close(self.fd)
            raise ConnpubError(
                f"map {self.path} has key/value sizes {info.key_size}/{info.value_size}, "
                f"expected {self.key_dtype.itemsize}/{self.value_dtype.itemsize}: "
                "program and control plane are from different builds (re-attach)"
            )
        # Per-CPU values are rounded up to 8 bytes per CPU by the kernel.
        self._slot = (
            (self.value_dtype.itemsize + 7) // 8 * 8 if self.percpu else self.value_dtype.itemsize
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedMap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _value_buffer(self, count: int) -> np.ndarray:
        return np.zeros(count * self.ncpus * self._slot, dtype=np.uint8)

    def _decode_values(self, raw: np.ndarray, count: int) -> np.ndarray:
        if not self.percpu:
            return raw[: count * self._slot].view(self.value_dtype).copy()
        per_cpu = raw[: count * self.ncpus * self._slot].reshape(count * self.ncpus, self._slot)
        values = per_cpu[:, : self.value_dtype.itemsize].copy().view(self.value_dtype)
        return values.reshape(count, self.ncpus)

    def lookup(self, key: np.ndarray) -> np.ndarray | None:
        """The value of one key (a 0-d or 1-element array of key_dtype), or None."""
        key_buf = np.ascontiguousarray(np.asarray(key, dtype=self.key_dtype).reshape(1))
        raw = self._value_buffer(1)
        ret = libbpf.LIB.bpf_map_lookup_elem(self.fd, _ptr(key_buf), _ptr(raw))
        if ret == -errno.ENOENT:
            return None
        libbpf.check(ret, f"lookup in {self.name}")
        return self._decode_values(raw, 1)[0]

    def lookup_many(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, values) of each key, one lookup syscall per key (a hash map has no batched
        lookup by key): for a few keys, where reading the whole table would cost more."""
        keys = np.ascontiguousarray(np.asarray(keys, dtype=self.key_dtype))
        found = np.zeros(len(keys), bool)
        raw = self._value_buffer(len(keys))
        slot = self.ncpus * self._slot
        lookup = libbpf.LIB.bpf_map_lookup_elem
        key_base, value_base, key_size = keys.ctypes.data, raw.ctypes.data, keys.dtype.itemsize
        for i in range(len(keys)):
            ret = lookup(self.fd, key_base + i * key_size, value_base + i * slot)
            if ret == 0:
                found[i] = True
            elif ret != -errno.ENOENT:
                libbpf.check(ret, f"lookup in {self.name}")
        return found, self._decode_values(raw, len(keys))

    def update(self, key: np.ndarray, value: np.ndarray, flags: int = libbpf.BPF_ANY) -> None:
        key_buf = np.ascontiguousarray(np.asarray(key, dtype=self.key_dtype).reshape(1))
        value_buf = self._encode_values(np.asarray(value, dtype=self.value_dtype).reshape(1))
        libbpf.check(
            libbpf.LIB.bpf_map_update_elem(self.fd, _ptr(key_buf), _ptr(value_buf), flags),
            f"update {self.name}",
        )

    def _encode_values(self, values: np.ndarray) -> np.ndarray:
        if not self.percpu:
            return np.ascontiguousarray(values)
        count = values.shape[0]
        raw = np.zeros((count * self.ncpus, self._slot), dtype=np.uint8)
        per_cpu = np.broadcast_to(values.reshape(count, -1), (count, self.ncpus)).reshape(-1)
        raw[:, : self.value_dtype.itemsize] = (
            np.ascontiguousarray(per_cpu)
            .view(np.uint8)
            .reshape(count * self.ncpus, self.value_dtype.itemsize)
        )
        return raw

    def items(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every (key, value) pair, read with batched syscalls. Arrays may be reused by nobody."""
        cap = self.max_entries if limit is None else min(limit, self.max_entries)
        keys = np.zeros(cap, dtype=self.key_dtype)
        raw = self._value_buffer(cap)
        token_size = max(self.key_dtype.itemsize, 8)
        in_batch = np.zeros(token_size, dtype=np.uint8)
        out_batch = np.zeros(token_size, dtype=np.uint8)
        opts = libbpf.BpfMapBatchOpts(sz=ctypes.sizeof(libbpf.BpfMapBatchOpts))
        filled = 0
        first = True
        while filled < cap:
            want = min(BATCH_ENTRIES, cap - filled)
            count = ctypes.c_uint32(want)
            ret = libbpf.LIB.bpf_map_lookup_batch(
                self.fd,
                None if first else _ptr(in_batch),
                _ptr(out_batch),
                _ptr(keys) + filled * self.key_dtype.itemsize,
                _ptr(raw) + filled * self.ncpus * self._slot,
                ctypes.byref(count),
                ctypes.byref(opts),
            )
            filled += count.value
            if ret == -errno.ENOENT:
                break
            if ret == -errno.ENOSPC and count.value == 0:
                # a hash bucket holds more entries than `want`: the caller's cap is too small
                break
            libbpf.check(ret, f"batched lookup in {self.name}")
            in_batch[:] = out_batch
            first = False
        return keys[:filled], self._decode_values(raw, filled)

    def keys(self, limit: int | None = None) -> np.ndarray:
        return self.items(limit)[0]

    def update_batch(
        self, keys: np.ndarray, values: np.ndarray, flags: int = libbpf.BPF_ANY
    ) -> int:
        """Write many entries; returns how many were written."""
        keys = np.ascontiguousarray(keys, dtype=self.key_dtype)
        values = self._encode_values(np.asarray(values, dtype=self.value_dtype))
        opts = libbpf.BpfMapBatchOpts(sz=ctypes.sizeof(libbpf.BpfMapBatchOpts), elem_flags=flags)
        done = 0
        step_value = self.ncpus * self._slot
        while done < keys.shape[0]:
            count = ctypes.c_uint32(min(BATCH_ENTRIES, keys.shape[0] - done))
            ret = libbpf.LIB.bpf_map_update_batch(
                self.fd,
                _ptr(keys) + done * self.key_dtype.itemsize,
                _ptr(values) + done * step_value,
                ctypes.byref(count),
                ctypes.byref(opts),
            )
            done += count.value
            libbpf.check(ret, f"batched update of {self.name}")
        return done

    def insert_batch(self, keys: np.ndarray, values: np.ndarray) -> int:
        """Write the entries whose key is absent (BPF_NOEXIST; present keys keep their value).
        One syscall per entry: the kernel's batched update takes no BPF_NOEXIST. Returns how
        many were written."""
        keys = np.ascontiguousarray(keys, dtype=self.key_dtype)
        values = self._encode_values(np.asarray(values, dtype=self.value_dtype))
        update = libbpf.LIB.bpf_map_update_elem
        key_ptr, value_ptr = _ptr(keys), _ptr(values)
        key_size, value_size = self.key_dtype.itemsize, self.ncpus * self._slot
        written = 0
        for i in range(keys.shape[0]):
            ret = update(self.fd, key_ptr + i * key_size, value_ptr + i * value_size,
                         libbpf.BPF_NOEXIST)
            if ret == 0:
                written += 1
            elif ret != -errno.EEXIST:
                libbpf.check(ret, f"insert into {self.name}")
        return written

    def delete_batch(self, keys: np.ndarray) -> int:
        """Delete many keys; keys already gone are skipped. Returns how many were deleted."""
        keys = np.ascontiguousarray(keys, dtype=self.key_dtype)
        opts = libbpf.BpfMapBatchOpts(sz=ctypes.sizeof(libbpf.BpfMapBatchOpts))
        done = deleted = 0
        while done < keys.shape[0]:
            count = ctypes.c_uint32(min(BATCH_ENTRIES, keys.shape[0] - done))
            ret = libbpf.LIB.bpf_map_delete_batch(
                self.fd,
                _ptr(keys) + done * self.key_dtype.itemsize,
                ctypes.byref(count),
                ctypes.byref(opts),
            )
            deleted += count.value
            if ret == -errno.ENOENT:
                # stopped at a missing key: skip it and go on
                done += count.value + 1
                continue
            libbpf.check(ret, f"batched delete in {self.name}")
            done += count.value
        return deleted

    def delete(self, key: np.ndarray) -> bool:
        key_buf = np.ascontiguousarray(np.asarray(key, dtype=self.key_dtype).reshape(1))
        ret = libbpf.LIB.bpf_map_delete_elem(self.fd, _ptr(key_buf))
        if ret == -errno.ENOENT:
            return False
        libbpf.check(ret, f"delete in {self.name}")
        return True

    def clear(self) -> int:
        return self.delete_batch(self.keys()) if self.map_type not in (2, 6) else 0


def fold_cpus(values: np.ndarray) -> np.ndarray:
    """Fold per-CPU values (n, ncpus) into (n,): counters add up, timestamps (fields ending in
    _ns) take the latest CPU's. Plain integer dtypes just add up."""
    if values.ndim == 1:
        return values
    if values.dtype.names is None:
        return values.sum(axis=1)
    folded = np.zeros(values.shape[0], dtype=values.dtype)
    for name in values.dtype.names:
        column = values[name]
        folded[name] = column.max(axis=1) if name.endswith("_ns") else column.sum(axis=1)
    return folded
