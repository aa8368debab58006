"""Alignment and split-read planning: the byte arithmetic both the converter and the runtime use."""

from __future__ import annotations

DEFAULT_ALIGNMENT = 16384
MIN_ALIGNMENT = 4096
MAX_SPLIT = 8


def check_alignment(alignment: int) -> int:
    """Return ``alignment`` if it is a power of two >= 4 KiB, else raise ValueError."""
    if alignment < MIN_ALIGNMENT or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two >= {MIN_ALIGNMENT}, got {alignment}")
    return alignment


def round_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def record_size(expert_bytes: int, alignment: int) -> int:
    """Bytes one expert record occupies in a layer file: the expert's bytes rounded up."""
    return round_up(expert_bytes, alignment)


def split_plan(expert_bytes: int, alignment: int, n: int) -> list[tuple[int, int]]:
    """Byte ranges ``(start, end)`` of one record that a read split ``n`` ways uses.

    The record's pages (``ceil(expert_bytes / alignment)`` of them) are dealt into
    ``m = min(n, pages)`` runs: chunk ``i`` starts at page ``floor(i * pages / m)``.
    Every chunk starts on an ``alignment`` boundary; the last one ends at
    ``expert_bytes`` (the padding after it is never needed).
    """
    if not 1 <= n <= MAX_SPLIT:
        raise ValueError(f"split count must be in 1..{MAX_SPLIT}, got {n}")
    pages = -(-expert_bytes // alignment)
    m = min(n, pages)
    bounds = [(i * pages // m) * alignment for i in range(m)] + [expert_bytes]
    return [(bounds[i], bounds[i + 1]) for i in range(m)]


def all_split_plans(expert_bytes: int, alignment: int) -> dict[str, list[list[int]]]:
    """The plans for split counts 1..8, in the JSON shape the index stores."""
    return {
        str(n): [[a, b] for a, b in split_plan(expert_bytes, alignment, n)]
        for n in range(1, MAX_SPLIT + 1)
    }
