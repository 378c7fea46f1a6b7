"""Writing files so that a reader never sees half of one: every output of spa-prune (models, reports, plans,
tables, calibration data, torch files, plots) is written to a temp file in the target's folder and renamed over
the target, alone (`atomic_write`, with an optional check of the finished temp file) or together with the run's
other outputs (`StagedOutputs`). On any failure, interrupts included, the temp files are removed and the targets
are left as they were."""
from __future__ import annotations

import os
import signal
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
    with StagedOutputs() as outputs:
        temp = outputs.stage(path, write, binary=binary)
        if check is not None:
            check(temp)
        outputs.commit()


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


class StagedOutputs:
    """Every file a run writes, committed together at its very end: each is written to a temp file beside its
    target as soon as it is ready (`stage`), and `commit` renames them all in one go with Ctrl-C and SIGTERM held
    back, so a run that fails or is interrupted before the commit leaves no file of its outputs and one that
    commits leaves all of them. Use as a context manager: leaving it by an exception discards what was staged."""

    def __init__(self):
        self.staged: list[tuple[Path, Path]] = []   # (temp file, target)
        self.made: list[Path] = []                   # folders stage() created, removed again on discard

    def stage(self, path, write: Callable, *, binary: bool = True) -> Path:
        """Write through `write(file)` into a temp file beside `path`; returns the temp file's path."""
        p = Path(path)
        try:
            missing = [d for d in (p.parent, *p.parent.parents) if not d.exists()]
            p.parent.mkdir(parents=True, exist_ok=True)
            self.made.extend(missing)   # deepest first
            tmp = temp_path_beside(p)
            self.staged.append((tmp, p))
            with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
                write(f)
        except OSError as e:
            raise SpaError(f"cannot write {p}: {e.strerror or e}")
        return tmp

    def commit(self) -> None:
        held = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            for tmp, target in self.staged:
                os.replace(tmp, target)
            self.staged, self.made = [], []
        except OSError as e:
            raise SpaError(f"cannot write {target}: {e.strerror or e}")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            self.discard()

    def discard(self) -> None:
        """Remove the temp files and the folders staging created (a failed run leaves nothing new)."""
        for tmp, _ in self.staged:
            if tmp.exists():
                tmp.unlink()
        self.staged = []
        for folder in self.made:
            try:
                folder.rmdir()   # only while empty: another writer's files stay
            except OSError:
                pass
        self.made = []

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.discard()


def same_file(a, b) -> bool:
    """Whether two paths name the same file (the same inode, through links too), or the same path."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve(strict=False) == pb.resolve(strict=False)


def check_outputs(outputs: dict, inputs: tuple = ()) -> None:
    """Refuse, before any work, every output path (flag -> path) that would lose or corrupt a file: one that is an
    input or another output, a directory, an existing special file (device, FIFO, socket: replacing /dev/null as
    root would be a disaster), a name ending in '/', or an empty name; and one whose folder cannot be written."""
    given = [(flag, path) for flag, path in outputs.items() if path is not None]
    for flag, path in given:
        try:
            _check_output(flag, path, inputs)
        except OSError as e:  # a path the OS refuses to even look at (too long, a bad byte, a loop of links)
            raise SpaError(f"{flag}: cannot use {os.fspath(path)[:80]!r} as an output: {e.strerror or e}")
    for i, (flag, path) in enumerate(given):
        for other_flag, other in given[i + 1:]:
            if same_file(path, other):
                raise SpaError(f"{flag} and {other_flag} name the same file {os.fspath(path)}")


def _check_output(flag: str, path, inputs: tuple) -> None:
    text = os.fspath(path)
    if not text:
        raise SpaError(f"{flag}: the output path is empty")
    p = Path(text)
    if len(p.name.encode()) > 255 or len(text.encode()) > 4095:
        raise SpaError(f"{flag}: the file name is longer than the system allows (255 bytes a name, 4095 a path)")
    if text.endswith(("/", os.sep)) or p.is_dir():
        raise SpaError(f"{flag} {text} is a directory; give a file name")
    if p.exists() and not p.is_file():
        raise SpaError(f"{flag} {text} exists and is not a regular file (a device, FIFO or socket); "
                       "refusing to replace it")
    for source in inputs:
        if source is not None and same_file(source, p):
            raise SpaError(f"{flag} {text} is an input file of this run ({os.fspath(source)}); refusing to "
                           "overwrite the input")
    writable_folder(flag, p)


def writable_folder(flag: str, p: Path) -> None:
    """The nearest existing folder above `p` is a folder we may write into (missing ones are created later)."""
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SpaError(f"{flag}: cannot create {p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise SpaError(f"{flag}: cannot write into {parent}")
