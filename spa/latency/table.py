"""The cost table: `profile` measures it, `LatencyTable` holds, saves and checks it, `table_for` finds or makes
the table of a model (see spa.latency)."""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from spa.passes.analyse import Analyse

from ..errors import SpaError, one_line
from ..fileio import atomic_write_text
from .layers import ALIGN, GRID, LayerSpec, fingerprint, layer_specs
from .timing import MIN_RUNS, Timer, check_counts, machine_info, ort_version, overhead_model, runnable

FORMAT = "spa-prune-latency/1"


@dataclass
class LatencyTable:
    """Measured latencies of one model on one machine. `signatures[key]` holds a layer signature's grid:
    `in_counts` x `out_counts` kept widths (of `in_size` / `out_size`) and `ms[i][j]` (overhead subtracted,
    monotone) next to `raw_ms` (medians as measured); `layers` maps each layer (node name) to its signature,
    whether its input/output can shrink, whether it is grouped (`tied`) and its output elements."""

    fingerprint: str
    batch: int
    threads: int
    full: dict                  # end-to-end: median, p10, p90, runs (ms)
    overhead_ms: float
    signatures: dict
    layers: list[dict]
    machine: dict = field(default_factory=machine_info)
    onnxruntime: str = ""
    runs: int = MIN_RUNS
    warmup: int = 5
    grid: list = field(default_factory=lambda: list(GRID))
    clock: str = "wall"
    align: int = ALIGN
    source: str = ""
    created: str = ""
    profile_s: float = 0.0

    @property
    def full_ms(self) -> float:
        return float(self.full["median"])

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, d, where: str = "latency table") -> LatencyTable:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise SpaError(f"{where} is not a spa-prune latency table (expected format '{FORMAT}')")
        try:
            fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            table = cls(**fields)
            float(table.full["median"])
            for sig in table.signatures.values():
                ms = np.asarray(sig["ms"], dtype=np.float64)
                if ms.shape != (len(sig["in_counts"]), len(sig["out_counts"])):
                    raise ValueError("grid shape")
            missing = [la["node"] for la in table.layers if la["signature"] not in table.signatures]
            if missing:
                raise KeyError(f"no signature for layer '{missing[0]}'")
        except (KeyError, TypeError, ValueError) as e:
            raise SpaError(f"{where} is not a valid latency table ({one_line(e, 300)})")
        return table

    def save(self, path) -> None:
        """Write atomically."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path) -> LatencyTable:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise SpaError(f"latency table not found: {path}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SpaError(f"cannot read latency table {path}: {one_line(e, 300)}")
        return cls.from_json(d, where=f"latency table {path}")

    def same_machine(self) -> bool:
        here = machine_info()
        return (self.machine.get("cpu"), self.machine.get("cores")) == (here["cpu"], here["cores"])

    def check(self, fp: str, batch: int | None = None, threads: int | None = None, where: str = "") -> None:
        """A table of another model or batch is an error; another machine, onnxruntime or thread count a warning
        (carrying a table from the deployment machine is the point)."""
        where = where or "the latency table"
        if self.fingerprint != fp:
            raise SpaError(f"{where} was made for another model (fingerprint {self.fingerprint}, this model "
                           f"{fp}); profile this model: spa-prune profile MODEL -o TABLE.json")
        if batch is not None and int(batch) != self.batch:
            raise SpaError(f"{where} was measured at batch {self.batch}, not {batch}; profile with --batch {batch}")
        here = machine_info()
        notes = []
        if not self.same_machine():
            notes.append(f"machine {self.machine.get('cpu')} x{self.machine.get('cores')} (this one: "
                         f"{here['cpu']} x{here['cores']})")
        if self.onnxruntime and self.onnxruntime != ort_version():
            notes.append(f"onnxruntime {self.onnxruntime} (here {ort_version()})")
        if threads is not None and int(threads) != self.threads:
            notes.append(f"{self.threads} thread(s), not {threads}: the table's thread count applies")
        if notes:
            warnings.warn(f"{where} was measured on another setup: {'; '.join(notes)}", stacklevel=3)


def _monotone(ms: np.ndarray) -> np.ndarray:
    """Non-decreasing in both kept widths: each point becomes the smallest time of any configuration at least as
    wide (a reverse running minimum). Timing noise only ever adds time, so a slow outlier is pulled down by its
    wider neighbours instead of being carried up to them."""
    rev = np.minimum.accumulate(np.minimum.accumulate(ms[::-1, ::-1], axis=0), axis=1)
    return rev[::-1, ::-1]


FULL_BLOCKS = 5     # the end-to-end time is measured in blocks spread over the profile


def _pooled(blocks: list[dict]) -> dict:
    """One end-to-end figure from blocks measured at different moments: the median of the block medians (a block
    hit by a burst of load on the machine does not move it), p10/p90 likewise."""
    return {"median": float(np.median([b["median"] for b in blocks])),
            "p10": float(np.median([b["p10"] for b in blocks])), "p90": float(np.median([b["p90"] for b in blocks])),
            "runs": int(sum(b["runs"] for b in blocks)), "blocks": [round(float(b["median"]), 5) for b in blocks]}


def profile(model, analysis=None, *, batch: int = 1, threads: int = 1, runs: int = MIN_RUNS, warmup: int = 5,
            grid=GRID, timer=None, log=None, clock: str = "wall", align: int = ALIGN) -> LatencyTable:
    """Measure the cost table of a normalized model (`spa.driver.load`): the end-to-end latency (FULL_BLOCKS
    blocks of at least 30 runs, before, between and after the layers, pooled by `_pooled`: the layers and the
    whole model then see the same machine load on average), the call overhead, and every distinct layer
    signature on its width grid. `timer(proto, feeds) -> {"median", "p10", "p90", "runs"}` replaces onnxruntime
    timing (tests); `log(str)` gets progress; `clock` as in `time_session` (the table remembers it and the
    end-to-end correction measures with it)."""
    check_counts(batch, threads, runs, warmup, clock)
    t0 = time.perf_counter()
    analysis = analysis or Analyse().run(model)
    log = log or (lambda msg: None)
    layer_timer = timer or Timer(threads, runs, warmup, clock)
    full_timer = timer or Timer(threads, max(runs, MIN_RUNS), warmup, clock)
    if not isinstance(align, (int, np.integer)) or align < 1:
        raise SpaError(f"align must be an integer >= 1, got {align!r}")
    specs = layer_specs(model, analysis, batch, grid, align)
    keys = [s.signature() for s in specs]
    distinct = {key: (s, desc) for s, (key, desc) in zip(specs, keys)}
    proto, feeds = runnable(model.graph.to_model(), batch, model.input_shapes)
    blocks = [full_timer(proto, feeds)]
    log(f"end to end: {blocks[0]['median']:.3f} ms (batch {batch}, {threads} thread(s)); "
        f"{len(specs)} layers, {len(distinct)} distinct signatures")
    overhead = float(layer_timer(*overhead_model())["median"])
    checkpoints = {len(distinct) * k // (FULL_BLOCKS - 1) for k in range(1, FULL_BLOCKS - 1)}
    signatures: dict = {}
    for i, (key, (s, desc)) in enumerate(distinct.items()):
        if i in checkpoints:
            blocks.append(full_timer(proto, feeds))
        signatures[key] = _measure_grid(s, desc, layer_timer, overhead)
        log(f"[{i + 1}/{len(distinct)}] {s.op} {'x'.join(map(str, s.data_shape))} -> {s.out_size}"
            f"{f' groups={s.groups}' if s.groups > 1 else ''}: {len(s.in_counts)}x{len(s.out_counts)} widths, "
            f"{signatures[key]['ms'][-1][-1]:.4f} ms at full width")
    while len(blocks) < FULL_BLOCKS:
        blocks.append(full_timer(proto, feeds))
    full = _pooled(blocks)
    log(f"end to end: {full['median']:.3f} ms (median of {len(blocks)} blocks {full['blocks']})")
    layers = [{"node": s.node.name, "op": s.op, "signature": key, "tied": s.groups > 1,
               "in_prunable": len(s.in_counts) > 1, "out_prunable": len(s.out_counts) > 1, "out_elems": s.out_elems}
              for s, (key, _) in zip(specs, keys)]
    return LatencyTable(fingerprint(model), int(batch), int(threads), full, overhead, signatures, layers,
                        onnxruntime=ort_version(), runs=int(runs), warmup=int(warmup), grid=list(grid),
                        clock=clock, align=int(align), source=str(model.source), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        profile_s=round(time.perf_counter() - t0, 3))


def _measure_grid(spec: LayerSpec, desc: dict, timer, overhead: float) -> dict:
    raw = np.zeros((len(spec.in_counts), len(spec.out_counts)))
    for i, ik in enumerate(spec.in_counts):
        for j, ok in enumerate(spec.out_counts):
            raw[i, j] = timer(*spec.model(ik, ok))["median"]
    ms = _monotone(np.maximum(raw - overhead, 0.0))
    return {**{k: desc[k] for k in ("op", "data_shape", "weight_shape", "groups")},
            "in_size": spec.in_size, "out_size": spec.out_size, "in_counts": spec.in_counts,
            "out_counts": spec.out_counts, "in_align": spec.in_align, "out_align": spec.out_align, "ms": ms.tolist(),
            "raw_ms": raw.tolist()}


def cache_path(fp: str, batch: int, threads: int) -> Path:
    root = os.environ.get("SPA_LATENCY_CACHE") or Path.home() / ".cache/spa-prune/latency"
    return Path(root) / f"{fp}-b{batch}-t{threads}.json"


def table_for(model, analysis, table=None, *, batch: int = 1, threads: int | None = 1, log=None) -> LatencyTable:
    """The table of `model`: `table` (a LatencyTable or a path), checked against the model; without one, the cached
    table of this model, batch and thread count (~/.cache/spa-prune/latency/<fingerprint>-b<B>-t<T>.json,
    $SPA_LATENCY_CACHE overrides the folder), profiled and cached on first use."""
    fp = fingerprint(model)
    if table is not None:
        where = f"latency table {table}" if not isinstance(table, LatencyTable) else "the latency table"
        table = table if isinstance(table, LatencyTable) else LatencyTable.load(table)
        table.check(fp, batch, threads, where)
        return table
    threads = 1 if threads is None else threads
    path = cache_path(fp, batch, threads)
    if path.exists():
        try:
            cached = LatencyTable.load(path)
            cached.check(fp, batch, threads, f"cached latency table {path}")
            return cached
        except SpaError:
            pass  # a broken or stale cache entry is measured again
    table = profile(model, analysis, batch=batch, threads=threads, log=log)
    table.save(path)
    return table
