"""Maglev consistent hashing (Eisenbud et al., NSDI'16 §3.4) and the LB program's flow hash.

`build_table` fills a lookup table of prime size M from the backends' permutations; each
backend owns floor(M/N) or ceil(M/N) slots. `flow_hash` is the same fasthash64 the XDP
program computes (bpf/lb/lb.c), so tests and tools can predict which slot a tuple reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from connpub.datapath.abi import FLOW_KEY_DTYPE, VIP_F_HASH_CLIENT_ONLY  # noqa: F401 - re-exported
from connpub.errors import ConnpubError

DEFAULT_SIZE = 65537  # prime; the BPF default MAGLEV_SIZE
EMPTY = -1  # table slot without a backend (no backends at all)
FLOW_HASH_SEED = 0x5BD1E9955BD1E995  # FLOW_HASH_SEED of bpf/lb/lb_consts.h

_M64 = np.uint64(0x880355F21E6D1957)
_MIX = np.uint64(0x2127599BF4325C37)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    limit = int(n**0.5)
    return all(n % d for d in range(3, limit + 1, 2))


def _seeded_hash(name: bytes, seed: int, salt: bytes) -> int:
    digest = hashlib.blake2b(name, digest_size=8, key=seed.to_bytes(8, "little"), person=salt)
    return int.from_bytes(digest.digest(), "little")


def permutation_params(names: Sequence[str | bytes], size: int = DEFAULT_SIZE,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(offset, skip) per backend: its preference list is (offset + j*skip) mod size."""
    raw = [n.encode() if isinstance(n, str) else bytes(n) for n in names]
    offset = np.array([_seeded_hash(n, seed, b"maglev-offset") % size for n in raw], np.int64)
    skip = np.array([_seeded_hash(n, seed, b"maglev-skip") % (size - 1) + 1 for n in raw], np.int64)
    return offset, skip


def build_table(names: Sequence[str | bytes], size: int = DEFAULT_SIZE,
                seed: int = 0) -> np.ndarray:
    """The Maglev lookup table: int32 array of `size` backend indices (into `names`), or all
    EMPTY when there are no backends. Names identify backends (e.g. their address): the same
    name keeps the same preferences across rebuilds. Names must be distinct; size prime.

    Backends take turns claiming their next preferred free slot until the table is full. The
    preference lists are computed with numpy; the turn-taking is inherently sequential, so it
    runs as a plain loop (about 0.1 s for M = 65537)."""
    if not is_prime(size):
        raise ConnpubError(f"Maglev table size {size} is not prime: use a prime such as 65537")
    if len(set(names)) != len(names):
        raise ConnpubError("duplicate backend names in a Maglev table: each backend needs its own")
    table = np.full(size, EMPTY, dtype=np.int32)
    count = len(names)
    if count == 0:
        return table
    if count > size:
        raise ConnpubError(f"{count} backends do not fit a Maglev table of {size} slots")
    offset, skip = permutation_params(names, size, seed)
    offsets, skips = offset.tolist(), skip.tolist()
    entry = [EMPTY] * size
    next_index = [0] * count
    filled = 0
    while True:
        for i in range(count):
            j = next_index[i]
            slot = (offsets[i] + j * skips[i]) % size
            while entry[slot] != EMPTY:
                j += 1
                slot = (offsets[i] + j * skips[i]) % size
            entry[slot] = i
            next_index[i] = j + 1
            filled += 1
            if filled == size:
                table[:] = entry
                return table


def _mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(23))
    h = h * _MIX
    return h ^ (h >> np.uint64(47))


def flow_hash(keys: np.ndarray, vip_flags: int | np.ndarray = 0,
              seed: int = FLOW_HASH_SEED) -> np.ndarray:
    """fasthash64 of each FLOW_KEY_DTYPE key over its five little-endian 64-bit words, exactly
    as flow_hash() in bpf/lb/lb.c (with VIP_F_HASH_CLIENT_ONLY: the client address only)."""
    keys = np.ascontiguousarray(np.asarray(keys, dtype=FLOW_KEY_DTYPE).reshape(-1))
    words = keys.view(np.uint8).reshape(-1, 40).view("<u8").astype(np.uint64)
    client_only = (np.asarray(vip_flags, dtype=np.uint64) & np.uint64(VIP_F_HASH_CLIENT_ONLY)) != 0
    words[:, 2:] = np.where(np.broadcast_to(client_only, (len(words),))[:, None], 0, words[:, 2:])
    with np.errstate(over="ignore"):
        h = np.full(len(words), np.uint64(seed) ^ (np.uint64(40) * _M64), dtype=np.uint64)
        for i in range(5):
            h = (h ^ _mix(words[:, i])) * _M64
        return _mix(h)


def slots_of(keys: np.ndarray, size: int = DEFAULT_SIZE,
             vip_flags: int | np.ndarray = 0) -> np.ndarray:
    """Maglev slot each flow reads (flow_hash mod size), as the XDP program computes it."""
    return (flow_hash(keys, vip_flags) % np.uint64(size)).astype(np.int64)
