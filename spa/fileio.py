"""Writing files so that a reader never sees half of one: every output of spa-prune (models, reports, plans,
tables, calibration data, torch files, plots) goes through `atomic_write`: a temp file in the target's folder,
an optional check of the finished temp file, then one rename over the target. On any failure, interrupts
included, the temp file is removed and the target is left as it was."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import SpaError


def temp_path_beside(path: Path) -> Path:
    """A fresh, unique file name in `path`'s folder (created empty, so two writers never share one)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_write(path, write: Callable, *, check: Callable | None = None, binary: bool = True) -> None:
    """Write through `write(file)` into a temp file beside `path`, run `check(temp_path)` (which may raise:
    nothing is written then), and rename it over `path`. Missing parent folders are created."""
    p = Path(path)
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_beside(p)
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        if check is not None:
            check(tmp)
        os.replace(tmp, p)
        tmp = None
    except OSError as e:
        raise SpaError(f"cannot write {p}: {e.strerror or e}")
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))
