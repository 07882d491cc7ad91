"""Kaggle run-length encoding for TGS Salt.

Column-major order (top to bottom, then left to right), 1-indexed start, pairs of
``start length``, runs sorted and non-overlapping; an empty mask is the empty string.
"""

from __future__ import annotations

import re

import numpy as np

SHAPE = (101, 101)
_DIGITS = re.compile(r"[0-9]+")


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D boolean mask; vectorised, no Python loop over pixels."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {mask.shape}")
    flat = mask.astype(bool).ravel(order="F")
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1]) + 1
    if changes.size == 0:
        return ""
    changes[1::2] -= changes[::2]
    return " ".join(map(str, changes.tolist()))


def rle_problems(rle: str, shape: tuple[int, int] = SHAPE) -> list[str]:
    """Return what is wrong with an RLE string (empty list when it is well-formed)."""
    if rle is None:
        return []
    text = str(rle).strip()
    if not text:
        return []
    tokens = text.split()
    # ASCII digits only: Python's int() also takes "+1", "1_0" and other scripts' digits, Kaggle does not
    bad = next((t for t in tokens if not _DIGITS.fullmatch(t)), None)
    if bad is not None:
        return [f"token {bad[:30]!r} is not a non-negative integer"]
    big = next((t for t in tokens if len(t) > 12), None)
    if big is not None:
        return [f"number {big[:30]}{'...' if len(big) > 30 else ''} is far past the {shape[0]}x{shape[1]} image"]
    values = np.array([int(t) for t in tokens], dtype=np.int64)
    if values.size % 2:
        return [f"odd number of values ({values.size}): RLE is pairs of start and length"]
    starts, lengths = values[0::2], values[1::2]
    n = shape[0] * shape[1]
    problems = []
    if (starts < 1).any():
        problems.append(f"start {int(starts[starts < 1][0])} < 1 (RLE is 1-indexed)")
    if (lengths < 1).any():
        problems.append(f"run length {int(lengths[lengths < 1][0])} < 1")
    ends = starts + lengths - 1
    if (ends > n).any():
        problems.append(f"run ends at pixel {int(ends[ends > n][0])}, past the {shape[0]}x{shape[1]} image ({n})")
    if starts.size > 1:
        if (np.diff(starts) <= 0).any():
            problems.append("runs are not sorted by start")
        elif (starts[1:] <= ends[:-1]).any():
            i = int(np.flatnonzero(starts[1:] <= ends[:-1])[0])
            problems.append(f"runs overlap (run at {int(starts[i])} and run at {int(starts[i + 1])})")
    return problems


def rle_decode(rle: str, shape: tuple[int, int] = SHAPE, check: bool = True) -> np.ndarray:
    """Decode an RLE string into a boolean mask of ``shape``."""
    mask = np.zeros(shape[0] * shape[1], dtype=bool)
    if rle is None or not str(rle).strip():
        return mask.reshape(shape, order="F")
    if check:
        problems = rle_problems(rle, shape)
        if problems:
            raise ValueError("; ".join(problems))
    values = np.asarray(str(rle).split(), dtype=np.int64)
    starts, lengths = values[0::2] - 1, values[1::2]
    # Vectorised fill: +1 at each start, -1 after each end, cumulative sum > 0.
    delta = np.zeros(mask.size + 1, dtype=np.int32)
    np.add.at(delta, starts, 1)
    np.add.at(delta, starts + lengths, -1)
    mask = np.cumsum(delta[:-1]) > 0
    return mask.reshape(shape, order="F")
