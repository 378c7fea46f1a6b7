"""The memory limit of a run (`--memory-limit GB`): what any step may allocate for analysis, verification and
data is estimated before it is allocated and refused, with the size it would need, above this limit. The CLI sets
it for every command, `driver.prune` from `PruneOptions.memory_limit_gb`; the steps read it from here."""
from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np

from .errors import SpaError

DEFAULT_MEMORY_LIMIT_GB = 1.2  # the process itself takes ~0.3-0.5 GB more: a run stays under 2 GB by default
GB = 10**9                     # the unit of --memory-limit

_MEMORY_LIMIT_GB = contextvars.ContextVar("spa_memory_limit_gb", default=DEFAULT_MEMORY_LIMIT_GB)


@contextlib.contextmanager
def memory_limit(gb: float | None):
    """The limit (GB) that `check_memory` applies inside the block; None keeps it. The CLI sets it from
    --memory-limit for every command, and driver.prune from PruneOptions.memory_limit_gb for API callers."""
    token = _MEMORY_LIMIT_GB.set(float(gb)) if gb is not None else None
    try:
        yield
    finally:
        if token is not None:
            _MEMORY_LIMIT_GB.reset(token)


def memory_limit_gb(value: float | None = None) -> float:
    return _MEMORY_LIMIT_GB.get() if value is None else float(value)


def array_bytes(shape, dtype) -> int:
    """Bytes of an array of `shape` (exact Python ints: a dim of 2**40 does not overflow)."""
    return math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize


def check_memory(nbytes: int, what: str, limit_gb: float | None = None) -> None:
    """Refuse, before allocating, `nbytes` over the memory limit with a line that says how to raise it."""
    limit = memory_limit_gb(limit_gb)
    if nbytes > limit * GB:
        raise SpaError(f"{what} needs ~{nbytes / GB:.3g} GB, over the {limit:g} GB limit; raise it with "
                       f"--memory-limit")
