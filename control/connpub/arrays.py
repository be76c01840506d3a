"""Vectorised helpers over numpy structured arrays: whole records as sortable bytes, and joins."""

from __future__ import annotations

import numpy as np


def void_view(array: np.ndarray) -> np.ndarray:
    """Every record of a structured array as one opaque, comparable and sortable value."""
    array = np.ascontiguousarray(array)
    return array.view(np.dtype((np.void, array.dtype.itemsize))).reshape(-1)


def join(table_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, row of table_keys) for every key of the same dtype (sort + searchsorted)."""
    if len(table_keys) == 0 or len(keys) == 0:
        return np.zeros(len(keys), bool), np.zeros(len(keys), np.int64)
    table = void_view(table_keys)
    order = np.argsort(table, kind="stable")
    sorted_table = table[order]
    query = void_view(keys)
    position = np.minimum(np.searchsorted(sorted_table, query), len(sorted_table) - 1)
    return sorted_table[position] == query, order[position]
