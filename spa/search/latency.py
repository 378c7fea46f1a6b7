"""Latency budgets: a measured per-layer cost table, a latency model over removal masks, end-to-end correction.

Latency is not MACs: small channel counts, depthwise convs and everything between the layers cost what they cost
on the deployment machine. So latency comes from measurements, made once per model and machine:

* **Cost table** (`profile`, CLI `spa-prune profile IN.onnx -o TABLE.json`): every MAC-carrying layer with a weight
  (Conv incl. grouped/depthwise, ConvTranspose, Gemm, MatMul with a constant 2-D operand) of the normalized model
  is timed alone - a one-node ONNX model with the layer's real input shape (batch set to the table's batch),
  attributes and random weights - on a grid of kept widths: {1/8, 1/4, 1/2, 3/4, 1} of its input and of its output
  channels (a 2-D grid; grouped/depthwise convs lose whole groups, so their grid is 1-D over kept groups; an axis
  that cannot shrink - the model input, a frozen classifier output - has one point). Conv channel counts above one
  block are rounded to whole blocks of `align` (8) channels: onnxruntime's blocked (NCHWc) CPU convolutions run a
  partial block at the cost of a full one or worse (measured on AVX-512: a 3x3 conv with 17-23 input channels is 1.5-3x
  slower than with 24 or 16). Layers with the same signature (op, shapes, attributes, grids) are measured once. The fixed cost of one `InferenceSession.run` call (a one-op
  model) is subtracted from every layer point, and each grid is made non-decreasing in both widths (each point
  becomes the smallest time of any wider configuration: timing noise only adds time, and the projector's
  bisection needs a monotone cost). The whole model is timed end to end in blocks of >= 30 runs spread over the
  profile (median of the block medians), so that layers and model see the same machine load on average.
* **Latency model** (`LatencyModel`): for a removed-unit mask, `CostModel.kept_fractions` gives each layer's kept
  input and output fraction (the same factors the MAC count uses), above one block rounded up to whole blocks of
  `align` channels on conv axes; the layer's time is the bilinear interpolation of its grid (below the smallest grid point: the
  smallest point's time). Monotone and stepped: growing a group inside its last block costs nothing, so the
  projector's greedy fill completes blocks by itself. The **rest** (activations, adds,
  pooling, copies: the end-to-end time minus the call overhead minus the layers at full width) is modelled as
  proportional to the kept fraction of the activations - the layers' output channels weighted by their output
  elements - and the call overhead as constant:

      predicted = overhead + scale * (sum_layers t_l(in_l, out_l) + rest * activation_fraction)

  `scale` calibrates: the prediction of the unpruned model equals the measured end-to-end median. It is 1 unless
  the standalone layers add up to more than the whole model (onnxruntime fuses activations into the layers; rest
  is then 0 and the layers are scaled down).
* **Budget**: `"latency"` is a third budget kind of `BudgetProjector`: the fraction kept of the table's
  end-to-end latency. `SearchProblem.build(target_latency=MS, latency_table=PATH)` converts milliseconds (at the
  table's batch and thread count) into that fraction.
* **End-to-end correction** (`fit_latency`): the chosen allocation is applied and timed for real (median of >= 30
  runs); if it is not within [0.9, 1.0] x the budget, the latency fraction handed to the projector is bisected -
  re-projecting the same desired ratios, i.e. the same allocation shape - until the measurement falls in the band
  or the step limit is reached. Every probe is reported.

Timings are wall-clock medians by default. On a machine shared with other work, a long run is preempted more
often than a short one, so medians inflate the whole model against its layers; `clock="cpu"` (one thread only)
times the calling thread's CPU time instead - the latency on an idle core - and the table records which clock
it used (the correction measures with the same one).

The table is JSON (format below, `LatencyTable.to_json`) with the machine (CPU model, core count), onnxruntime
version, thread count, batch and a fingerprint of the normalized model's structure. A table of another model is an
error; one from another machine or thread count loads with a warning (profile on the deployment machine, carry the
file, prune anywhere; the end-to-end correction is skipped when the table comes from another machine, since it
would measure this one).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import SpaError, one_line
from ..fileio import atomic_write_text

FORMAT = "spa-prune-latency/1"
GRID = (0.125, 0.25, 0.5, 0.75, 1.0)
ALIGN = 8           # conv channel counts are timed and predicted in whole blocks of this many (see LatencyModel)
BAND = (0.9, 1.0)
MIN_RUNS = 30


# ---- measuring -------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    """CPU model (from /proc/cpuinfo where there is one) and core count: what a table's timings depend on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count() or 1,
            "platform": platform.platform()}


def ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def session(proto: onnx.ModelProto, threads: int = 1):
    """A CPU session as latency is stated: `threads` intra-op threads, one inter-op thread, sequential."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4
    try:
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise SpaError(f"onnxruntime cannot load the model: {one_line(e, 300)}")


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_session(sess, feeds: dict, runs: int = MIN_RUNS, warmup: int = 5, clock: str = "wall") -> dict:
    """Median, 10th and 90th percentile (ms) of `runs` timed calls after `warmup` untimed ones. `clock`: "wall"
    (elapsed time: what latency is) or "cpu" (the calling thread's CPU time: with one intra-op thread onnxruntime
    computes on the calling thread, so this is the latency on an idle core, whatever else the machine runs)."""
    now = CLOCKS[clock]
    try:
        for _ in range(warmup):
            sess.run(None, feeds)
        t = np.empty(runs)
        for i in range(runs):
            t0 = now()
            sess.run(None, feeds)
            t[i] = now() - t0
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise SpaError(f"onnxruntime failed to run the model: {one_line(e, 300)}")
    ms = t * 1e3
    return {"median": float(np.median(ms)), "p10": float(np.percentile(ms, 10)),
            "p90": float(np.percentile(ms, 90)), "runs": int(runs)}


class Timer:
    """The default way a table and the correction time a model: a fresh session, `time_session`. Tests inject
    another callable with the same signature (proto, feeds) -> stats dict."""

    def __init__(self, threads: int = 1, runs: int = MIN_RUNS, warmup: int = 5, clock: str = "wall"):
        self.threads, self.runs, self.warmup, self.clock = threads, runs, warmup, clock

    def __call__(self, proto: onnx.ModelProto, feeds: dict) -> dict:
        return time_session(session(proto, self.threads), feeds, self.runs, self.warmup, self.clock)


def _check_counts(batch: int, threads: int, runs: int, warmup: int, clock: str = "wall") -> None:
    for name, v, low in (("batch", batch, 1), ("threads", threads, 1), ("runs", runs, 1), ("warmup", warmup, 0)):
        if not isinstance(v, (int, np.integer)) or v < low:
            raise SpaError(f"{name} must be an integer >= {low}, got {v!r}")
    if clock not in CLOCKS:
        raise SpaError(f"unknown clock '{clock}' (choose from {', '.join(CLOCKS)})")
    if clock == "cpu" and threads != 1:
        raise SpaError("the cpu clock needs threads=1 (other threads' work is not on the calling thread's clock)")


def _load_proto(proto_or_path) -> onnx.ModelProto:
    if isinstance(proto_or_path, onnx.ModelProto):
        return proto_or_path
    from ..ir import read_model
    path = str(proto_or_path)
    if not os.path.isfile(path):
        raise SpaError(f"input file not found: {path}")
    return read_model(path)[0]


def runnable(proto: onnx.ModelProto, batch: int, input_shapes: dict | None = None, seed: int = 0):
    """(model, random feeds) for timing at `batch`: the batch dim is made free when the model fixes another one;
    dynamic dims come from `input_shapes` or the documented defaults (spa.model.default_dim)."""
    from ..calib import input_specs
    from ..model import default_dim
    from .reward import free_batch_dim

    specs = input_specs(proto)
    input_shapes = input_shapes or {}
    rng = np.random.default_rng(seed)
    if any(shape and shape[0] != batch for shape, _ in specs.values()):
        proto = free_batch_dim(proto)
    feeds = {}
    for name, (shape, dtype) in specs.items():
        if name in input_shapes:
            dims = [int(d) for d in input_shapes[name]]
        elif shape is None:
            raise SpaError(f"input '{name}' has no declared shape; pass --input-shape {name}=...")
        else:
            dims = [d if d else default_dim(len(shape), i) for i, d in enumerate(shape)]
        if dims:
            dims[0] = batch
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        else:  # integer ids / masks / flags: zeros are valid for every embedding and index
            feeds[name] = np.zeros(dims, dtype=dtype)
    return proto, feeds


def measure_latency(proto_or_path, batch: int = 1, threads: int = 1, runs: int = MIN_RUNS, warmup: int = 5,
                    input_shapes: dict | None = None, timer=None, clock: str = "wall") -> dict:
    """End-to-end onnxruntime latency of a model on random inputs (ms): median, p10, p90, runs, threads, batch.
    `threads` intra-op threads, one inter-op thread, sequential execution; the batch dim is set to `batch`;
    `clock` as in `time_session`."""
    _check_counts(batch, threads, runs, warmup, clock)
    proto, feeds = runnable(_load_proto(proto_or_path), batch, input_shapes)
    stats = (timer or Timer(threads, runs, warmup, clock))(proto, feeds)
    return {**stats, "threads": int(threads), "batch": int(batch), "clock": clock}


def _overhead_model() -> tuple[onnx.ModelProto, dict]:
    """A one-op model on one element: the fixed cost of a `run` call that every standalone layer pays."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "overhead", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, {"x": np.ones(1, np.float32)}


# ---- model structure -------------------------------------------------------------------------------------------
def _attr_value(a: onnx.AttributeProto):
    v = helper.get_attribute_value(a)
    if isinstance(v, onnx.TensorProto):
        return ["tensor", list(v.dims), int(v.data_type)]
    if isinstance(v, onnx.GraphProto):
        return ["graph", len(v.node)]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list):
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else
                ["graph", len(x.node)] if isinstance(x, onnx.GraphProto) else
                ["tensor", list(x.dims)] if isinstance(x, onnx.TensorProto) else x for x in v]
    return v


def fingerprint(model) -> str:
    """Structure of the normalized model (input shapes, nodes with names, op types, attributes and input shapes;
    no weight values): a table measured for it fits exactly the models with the same fingerprint."""
    g = model.graph
    items: list = [sorted((k, list(v)) for k, v in model.input_shapes.items())]
    for n in g.nodes:
        attrs = sorted((a.name, _attr_value(a)) for a in n.attribute)
        shapes = [list(g.shapes.get(x) or []) if x else None for x in n.input]
        items.append([n.name, n.domain, n.op_type, attrs, shapes])
    blob = json.dumps(items, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---- layers ----------------------------------------------------------------------------------------------------
@dataclass
class LayerSpec:
    """One MAC-carrying layer with a weight, as the table times it. Counts on the `in`/`out` axes are kept
    positions of the layer's input factor / output channels; a grouped conv (`groups` > 1) counts kept groups on
    `out` and has a single `in` point (its input is tied to its output)."""

    node: onnx.NodeProto
    op: str
    data_first: bool            # the activation is input 0 (False: MatMul with the weight on the left)
    data_shape: list[int]       # at the table's batch
    weight_shape: list[int]
    bias_shape: list[int] | None
    in_axis: int                # axis of the data input carrying the input factor
    in_size: int
    out_size: int               # output channels, or conv groups when groups > 1
    groups: int
    in_counts: list[int]
    out_counts: list[int]
    in_align: int               # the axis is timed and predicted in whole blocks of this many (1: exact counts)
    out_align: int
    out_elems: int              # output elements at full width (weight of the layer in the activation fraction)
    dtype: str

    def signature(self) -> tuple[str, dict]:
        """(key, description): layers with equal descriptions are measured once."""
        desc = {"op": self.op, "data_first": self.data_first, "data_shape": self.data_shape,
                "weight_shape": self.weight_shape, "bias_shape": self.bias_shape, "in_axis": self.in_axis,
                "in_size": self.in_size, "out_size": self.out_size, "groups": self.groups,
                "in_counts": self.in_counts, "out_counts": self.out_counts, "in_align": self.in_align,
                "out_align": self.out_align, "dtype": self.dtype,
                "attrs": sorted((a.name, _attr_value(a)) for a in self.node.attribute)}
        blob = json.dumps(desc, default=str, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12], desc

    # ---- a standalone model at kept widths ----------------------------------------------------------------------
    def shapes_at(self, ik: int, ok: int) -> tuple[list[int], list[int], list[int] | None, int]:
        """(data shape, weight shape, bias shape, group attribute) with `ik` input / `ok` output kept."""
        data, w = list(self.data_shape), list(self.weight_shape)
        bias = list(self.bias_shape) if self.bias_shape is not None else None
        group = self.groups
        if self.op in ("Conv", "ConvTranspose"):
            if self.groups > 1:  # ok kept groups; per-group widths unchanged
                per_in = self.data_shape[1] // self.groups
                data[1] = per_in * ok
                w[0] = w[0] // self.groups * ok
                group = ok
                c_out = w[0] if self.op == "Conv" else w[1] * ok
            else:
                data[1] = ik
                w[0], w[1] = (ok, ik) if self.op == "Conv" else (ik, ok)
                c_out = ok
            if bias is not None:
                bias = [c_out]
            return data, w, bias, group
        data[self.in_axis] = ik
        if self.op == "Gemm":
            w = [ok, ik] if _attr(self.node, "transB", 0) else [ik, ok]
        else:
            w = [ik, ok] if self.data_first else [ok, ik]
        if bias is not None and len(bias) and bias[-1] == self.out_size and self.out_size > 1:
            bias[-1] = ok
        return data, w, bias, group

    def model(self, ik: int, ok: int, seed: int = 0) -> tuple[onnx.ModelProto, dict]:
        """A one-node model of this layer at kept widths, random weights (constant, so onnxruntime pre-packs them
        as it does in the whole model), and a random input."""
        rng = np.random.default_rng(seed)
        dt = np.dtype(self.dtype)
        data, w, bias, group = self.shapes_at(ik, ok)
        inits = [numpy_helper.from_array((0.1 * rng.standard_normal(w)).astype(dt), "W")]
        inputs = ["X", "W"] if self.data_first else ["W", "X"]
        if bias is not None:
            inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(bias)).astype(dt), "B"))
            inputs.append("B")
        node = helper.make_node(self.op, inputs, ["Y"], name="layer")
        for a in self.node.attribute:
            if a.name == "group":
                continue
            if a.name == "output_shape":  # full-rank output_shape (batch, channels, ...): follow the widths
                continue
            node.attribute.append(copy.deepcopy(a))
        if self.op in ("Conv", "ConvTranspose") and group != 1:
            node.attribute.append(helper.make_attribute("group", int(group)))
        out_shape = _attr(self.node, "output_shape", None)
        if out_shape is not None:
            spatial = list(out_shape)[-(len(data) - 2):]
            node.attribute.append(helper.make_attribute("output_shape", spatial))
        elem = helper.np_dtype_to_tensor_dtype(dt)
        graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("X", elem, data)],
                                  [helper.make_tensor_value_info("Y", elem, None)], inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m, {"X": rng.standard_normal(data).astype(dt)}


def _attr(node, name, default):
    from ..ir import attr
    return attr(node, name, default)


def _counts(size: int, prunable: bool, grid=GRID, align: int = 1) -> list[int]:
    """Kept widths to time: the grid's fractions of `size`; above one block of `align`, whole blocks."""
    if not prunable or size <= 1:
        return [int(size)]
    counts = {max(1, math.floor(f * size + 0.5)) for f in grid}
    counts = {n if n <= align else min(size, align * math.floor(n / align + 0.5)) for n in counts}
    return sorted(counts | {int(size)})


def _prunable(analysis, atoms) -> bool:
    """Whether some unit on these positions may be removed (not frozen)."""
    if atoms is None:
        return False
    roots = analysis.find(np.asarray(atoms, np.int64))
    roots = np.unique(roots[roots >= 0])
    return any(not _frozen_units(analysis).get(int(r), True) for r in roots)


def _frozen_units(analysis) -> dict:
    cache = analysis.__dict__.get("_latency_frozen")
    if cache is None:
        cache = {int(u): bool(f) for grp in analysis.groups for u, f in zip(grp.units, grp.frozen)}
        analysis.__dict__["_latency_frozen"] = cache
    return cache


def layer_specs(model, analysis, batch: int = 1, grid=GRID, align: int = ALIGN) -> list[LayerSpec]:
    """The MAC-carrying layers with a weight, in graph order, with the table's batch. Layers whose input shape is
    not static, and activation x activation MatMuls, are left to the rest term."""
    g = model.graph
    base = next(iter(model.input_shapes.values()), (1,))
    base = int(base[0]) if len(base) else 1
    by_name = {n.name: n for n in g.nodes}
    specs = []
    for name, cost in analysis.ctx.costs.items():
        node = by_name.get(name)
        if node is None or not cost.factors:
            continue
        spec = _spec(node, cost, g, analysis, base, batch, grid, align)
        if spec is not None:
            specs.append(spec)
    order = {n.name: i for i, n in enumerate(g.nodes)}
    return sorted(specs, key=lambda s: order[s.node.name])


def _spec(node, cost, g, analysis, base: int, batch: int, grid, align: int) -> LayerSpec | None:
    op = node.op_type
    consts = [x for x in node.input[:2] if x and g.is_const(x)]
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(consts) != 1:
        return None
    data_first = not g.is_const(node.input[0])
    data_name = node.input[0] if data_first else node.input[1]
    shape = g.shapes.get(data_name)
    w = g.const(consts[0])
    if shape is None or any(not isinstance(d, int) for d in shape) or w is None or (op == "MatMul" and w.ndim != 2):
        return None
    shape = list(shape)
    bias_shape = None
    if len(node.input) > 2 and node.input[2]:
        if not g.is_const(node.input[2]):
            return None
        bias_shape = list(g.const_info(node.input[2])[0])
    groups = int(_attr(node, "group", 1)) if op in ("Conv", "ConvTranspose") else 1
    if op in ("Conv", "ConvTranspose"):
        in_axis, batch_axis = 1, 0
    elif op == "Gemm":
        in_axis = 0 if _attr(node, "transA", 0) else 1
        batch_axis = 1 - in_axis
    else:
        in_axis = len(shape) - 1 if data_first else len(shape) - 2
        batch_axis = 0 if in_axis != 0 else None
    if batch_axis is not None and shape[batch_axis] % max(base, 1) == 0:
        shape[batch_axis] = shape[batch_axis] // max(base, 1) * batch
    out_atoms = cost.factors[0]
    in_atoms = cost.factors[1] if len(cost.factors) > 1 else None
    conv = op in ("Conv", "ConvTranspose")
    if groups > 1:  # kept groups; blocks of channels only where a group is one channel (depthwise)
        in_size, in_counts, in_align = 1, [1], 1
        out_size = groups
        out_align = align if conv and len(out_atoms) == groups and shape[1] == groups else 1
        out_counts = _counts(groups, _prunable(analysis, out_atoms), grid, out_align)
    else:
        in_size, out_size = shape[in_axis], len(out_atoms)
        in_align = out_align = align if conv else 1
        in_counts = _counts(in_size, _prunable(analysis, in_atoms), grid, in_align)
        out_counts = _counts(out_size, _prunable(analysis, out_atoms), grid, out_align)
    out = g.shapes.get(node.output[0])
    out_elems = int(np.prod(out)) if out and all(isinstance(d, int) for d in out) else out_size
    return LayerSpec(node, op, data_first, shape, list(w.shape), bias_shape, in_axis, int(in_size), int(out_size),
                     groups, in_counts, out_counts, in_align, out_align, out_elems, str(w.dtype))


# ---- the table -------------------------------------------------------------------------------------------------
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
    from .. import driver

    _check_counts(batch, threads, runs, warmup, clock)
    t0 = time.perf_counter()
    analysis = analysis or driver.analyse(model)
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
    overhead = float(layer_timer(*_overhead_model())["median"])
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


# ---- prediction ------------------------------------------------------------------------------------------------
def interpolate(gx: np.ndarray, gy: np.ndarray, ms: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation per layer: grids gx (L, K), gy (L, K) increasing (padded beyond 1 with larger
    values), values ms (L, K, K), queries x, y (L,) in (0, 1]. Below the first grid point: the first point's value."""
    n = gx.shape[1]
    i = np.clip((gx <= x[:, None]).sum(1) - 1, 0, n - 2)
    j = np.clip((gy <= y[:, None]).sum(1) - 1, 0, n - 2)
    rows = np.arange(len(x))
    x0, x1 = gx[rows, i], gx[rows, i + 1]
    y0, y1 = gy[rows, j], gy[rows, j + 1]
    tx = np.clip((x - x0) / (x1 - x0), 0.0, 1.0)
    ty = np.clip((y - y0) / (y1 - y0), 0.0, 1.0)
    return ((1 - tx) * (1 - ty) * ms[rows, i, j] + tx * (1 - ty) * ms[rows, i + 1, j]
            + (1 - tx) * ty * ms[rows, i, j + 1] + tx * ty * ms[rows, i + 1, j + 1])


def _padded(counts: list[int], size: int, k: int) -> np.ndarray:
    f = [c / max(size, 1) for c in counts]
    return np.asarray(f + [f[-1] + 1.0 + t for t in range(k - len(f))])


class LatencyModel:
    """Predicted latency (ms) of a removal mask from a table (see the module docstring for the formula).

    Each table layer is bound to the kept-fraction factors `CostModel` already tracks: its output factor and its
    input factor (none for a grouped conv, whose input is tied to its output, or for an input that carries no
    labels); `predict(frac)` takes `CostModel.kept_fractions(removed)`."""

    def __init__(self, table: LatencyTable, cost_model, analysis):
        self.table, self.cost_model, self.analysis = table, cost_model, analysis
        n_fac = len(cost_model.factor_len)
        costs = analysis.ctx.costs
        k = max([2] + [len(s[a]) for s in table.signatures.values() for a in ("in_counts", "out_counts")])
        gx, gy, ms, fin, fout, weight, names, blocks = [], [], [], [], [], [], [], []
        for layer in table.layers:
            cost = costs.get(layer["node"])
            if cost is None or not cost.factors:
                raise SpaError(f"the latency table names layer '{layer['node']}', which this model does not have")
            sig = table.signatures[layer["signature"]]
            out_id = cost_model.factor_id(cost.factors[0])
            in_id = cost_model.factor_id(cost.factors[1]) if len(cost.factors) > 1 and not layer["tied"] else None
            fout.append(n_fac if out_id is None or not layer["out_prunable"] else out_id)
            fin.append(n_fac if in_id is None or not layer["in_prunable"] else in_id)
            gx.append(_padded(sig["in_counts"], sig["in_size"], k))
            gy.append(_padded(sig["out_counts"], sig["out_size"], k))
            v = np.asarray(sig["ms"], dtype=np.float64)
            ms.append(np.pad(v, ((0, k - v.shape[0]), (0, k - v.shape[1])), mode="edge"))
            weight.append(float(layer["out_elems"]))
            names.append(layer["node"])
            blocks.append((sig["in_size"], sig.get("in_align", 1), sig["out_size"], sig.get("out_align", 1)))
        self.names = names
        self.gx = np.asarray(gx).reshape(-1, k)
        self.gy = np.asarray(gy).reshape(-1, k)
        self.ms = np.asarray(ms).reshape(-1, k, k)
        self.fin, self.fout = np.asarray(fin, np.int64), np.asarray(fout, np.int64)
        b = np.asarray(blocks, dtype=np.float64).reshape(-1, 4)
        self.in_size, self.in_align, self.out_size, self.out_align = b.T
        w = np.asarray(weight)
        self.act_weight = w / w.sum() if w.sum() > 0 else w
        self.overhead = min(float(table.overhead_ms), table.full_ms)
        self.layers_full = float(self._layer_ms(np.ones(n_fac)).sum())
        self.rest = max(table.full_ms - self.overhead - self.layers_full, 0.0)
        body = self.layers_full + self.rest
        self.scale = (table.full_ms - self.overhead) / body if body > 0 else 1.0

    @property
    def full_ms(self) -> float:
        return self.table.full_ms

    @staticmethod
    def _blocks(f: np.ndarray, size: np.ndarray, align: np.ndarray) -> np.ndarray:
        """Kept fractions above one block of `align` channels rounded up to whole blocks (onnxruntime's blocked
        convolutions cost a partial block like a full one, or more; below one block, time scales with width)."""
        n = f * size
        whole = np.minimum(np.ceil(n / align - 1e-9) * align / np.maximum(size, 1), 1.0)
        return np.where((align > 1) & (n > align + 1e-9), whole, f)

    def _kept(self, frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input, output) kept fraction of every layer, in whole blocks."""
        f = np.append(np.asarray(frac, dtype=np.float64), 1.0)
        return (self._blocks(f[self.fin], self.in_size, self.in_align),
                self._blocks(f[self.fout], self.out_size, self.out_align))

    def _layer_ms(self, frac: np.ndarray) -> np.ndarray:
        return interpolate(self.gx, self.gy, self.ms, *self._kept(frac))

    def layer_ms(self, frac: np.ndarray) -> np.ndarray:
        """Each table layer's calibrated time (ms) at these factor fractions."""
        return self.scale * self._layer_ms(frac)

    def predict(self, frac: np.ndarray) -> float:
        """Predicted latency (ms) from kept fractions of every CostModel factor."""
        f = np.append(np.asarray(frac, dtype=np.float64), 1.0)
        layers = interpolate(self.gx, self.gy, self.ms, *self._kept(frac)).sum()
        act = float(self.act_weight @ f[self.fout]) if len(self.fout) else 1.0
        return float(self.overhead + self.scale * (layers + self.rest * act))

    def predict_removed(self, removed: np.ndarray) -> float:
        return self.predict(self.cost_model.kept_fractions(removed))

    def fraction_of(self, ms: float) -> float:
        """A budget in milliseconds as the fraction kept of the table's end-to-end latency."""
        if not ms > 0:
            raise SpaError(f"target_latency must be > 0 ms, got {ms}")
        f = float(ms) / self.full_ms
        if f > 1.0:
            raise SpaError(f"target_latency {ms:g} ms is not below the unpruned model's measured {self.full_ms:.3f} ms "
                           f"(batch {self.table.batch}, {self.table.threads} thread(s)): nothing to prune for it")
        return f

    def group_share(self) -> np.ndarray:
        """Per coupled group: the full-width time of the layers whose input or output factor it labels (split by
        positions, like flops_share: a layer counts for its input and its output group) over the end-to-end time."""
        cm, analysis = self.cost_model, self.analysis
        group_of_unit = np.append(np.array([analysis.unit_group[int(r)] for r in cm.unit_roots], dtype=np.int64), -1)
        share = np.zeros(len(analysis.groups))
        full = self.layer_ms(np.ones(len(cm.factor_len)))
        for t, fids in zip(full, zip(self.fin, self.fout)):
            for fid in {int(x) for x in fids}:
                if fid >= len(cm.factor_len):
                    continue
                units = cm.pos_unit[cm.factor_start[fid]:cm.factor_start[fid + 1]]
                gids = group_of_unit[units]
                gids = gids[gids >= 0]
                if len(gids):
                    share += np.bincount(gids, minlength=len(share)) * (t / (cm.factor_len[fid]))
        return share / max(self.full_ms, 1e-12)

    def summary(self) -> dict:
        return {"full_ms": round(self.full_ms, 4), "overhead_ms": round(self.overhead, 4),
                "layers_ms": round(self.layers_full, 4), "rest_ms": round(self.rest, 4),
                "scale": round(self.scale, 4), "layers": len(self.names),
                "signatures": len(self.table.signatures)}


# ---- end-to-end correction -------------------------------------------------------------------------------------
@dataclass
class Probe:
    fraction: float       # latency budget fraction given to the projector
    predicted_ms: float
    measured_ms: float
    kept: list[int]
    feasible: bool = True  # False: no allocation meets the fraction (kept is the smallest model allowed)
    repeats: list[float] | None = None  # every measurement when it was confirmed (measured_ms: their median)

    def to_json(self) -> dict:
        out = {"fraction": round(self.fraction, 6), "predicted_ms": round(self.predicted_ms, 4),
               "measured_ms": round(self.measured_ms, 4), "feasible": self.feasible}
        if self.repeats:
            out["repeats_ms"] = [round(m, 4) for m in self.repeats]
        return out


@dataclass
class LatencyFit:
    """The corrected allocation: kept counts, plan, the final probe's numbers and every probe."""

    kept: np.ndarray
    plan: object
    budget_ms: float
    fraction: float
    predicted_ms: float
    measured_ms: float
    converged: bool
    probes: list[Probe]
    band: tuple = BAND

    def to_json(self) -> dict:
        return {"budget_ms": round(self.budget_ms, 4), "measured_ms": round(self.measured_ms, 4),
                "predicted_ms": round(self.predicted_ms, 4), "fraction": round(self.fraction, 6),
                "measured_over_budget": round(self.measured_ms / self.budget_ms, 4), "converged": self.converged,
                "band": list(self.band), "probes": [p.to_json() for p in self.probes]}


def plan_timer(problem, runs: int = MIN_RUNS, warmup: int = 5):
    """kept -> measured median (ms) of the applied candidate, at the table's batch, thread count and clock."""
    table = problem.latency.table

    def measure(kept) -> float:
        model, *_ = problem.apply(np.asarray(kept))
        return measure_latency(model.graph.to_model(), table.batch, table.threads, runs, warmup,
                               input_shapes=problem.model.input_shapes, clock=table.clock)["median"]

    return measure


def fit_latency(problem, kept, budget_ms: float | None = None, *, measure=None, runs: int = MIN_RUNS,
                warmup: int = 5, band: tuple = BAND, max_steps: int = 8, confirm: int = 2,
                settle: float = 0.025, log=None) -> LatencyFit:
    """Measure the allocation `kept` for real and, when the median is outside [band[0], band[1]] x budget, bisect
    the latency fraction given to the projector (re-projecting the same desired ratios) until it is inside or
    `max_steps` probes were made. Each step first tries the proportional guess (the probe's prediction scaled by
    budget / measured) and falls back to the middle of the bracket when the guess leaves it (or to the whole
    model, fraction 1, when the guess lies beyond it and it was not measured yet). A probe that lands in the
    band is measured `confirm` more times and judged by the median of all its measurements: on a shared machine
    one median of 30 runs can land in the band during a quiet or a busy second and be 10-25 % off a moment
    later. The fit aims at the band's middle: it stops on a confirmed probe within `settle` x budget of it and
    otherwise goes on bisecting (until `max_steps`), so that a result is not left at the band's edge where the
    next reading falls out. `measure(kept) -> ms` replaces the real measurement (tests). Returns the in-band
    probe nearest the middle, else the largest measurement under the budget, else the smallest one."""
    lm = problem.latency
    if lm is None:
        raise SpaError("fit_latency needs a problem built with a latency table (target_latency / latency_table)")
    budget_ms = float(budget_ms if budget_ms is not None else problem.options.get("latency", {}).get("target_ms"))
    lo_ms, hi_ms = band[0] * budget_ms, band[1] * budget_ms
    target = 0.5 * (lo_ms + hi_ms)
    pj = problem.projector
    kept = np.asarray(kept, dtype=np.int64)
    ag = pj.action_groups
    rho = kept[ag] / np.maximum(pj.sizes[ag], 1)
    measure = measure or plan_timer(problem, runs, warmup)
    log = log or (lambda msg: None)
    measured: dict[bytes, float] = {}
    repeats: dict[bytes, list[float]] = {}   # the confirmed allocations' measurements
    probes: list[Probe] = []

    def probe(fraction: float, k: np.ndarray | None = None) -> Probe:
        feasible = True
        if k is None:
            proj = pj.with_budgets(latency=fraction).project(rho)
            k, feasible = proj.kept, proj.feasible
        k = np.asarray(k, dtype=np.int64)
        key = k.tobytes()
        if key not in measured:
            measured[key] = float(measure(k))
        p = Probe(fraction, pj.costs(k)["latency"] * lm.full_ms, measured[key], k.tolist(), feasible,
                  repeats.get(key))
        probes.append(p)
        log(f"latency probe {len(probes)}: fraction {fraction:.4f}, predicted {p.predicted_ms:.3f} ms, "
            f"measured {p.measured_ms:.3f} ms (budget {budget_ms:.3f} ms)")
        return p

    def inside(p: Probe) -> bool:
        return lo_ms <= p.measured_ms <= hi_ms

    def confirmed(p: Probe) -> Probe:
        """An in-band probe measured `confirm` more times: its median decides (a later visit reuses it)."""
        if confirm < 1 or not inside(p) or p.repeats:
            return p
        k = np.asarray(p.kept, dtype=np.int64)
        p.repeats = repeats[k.tobytes()] = [p.measured_ms, *(float(measure(k)) for _ in range(confirm))]
        p.measured_ms = measured[k.tobytes()] = float(np.median(p.repeats))
        log(f"latency probe {len(probes)} confirmed: {', '.join(f'{m:.3f}' for m in p.repeats)} ms, median "
            f"{p.measured_ms:.3f} ms")
        return p

    def settled(p: Probe) -> bool:
        return inside(p) and abs(p.measured_ms - target) <= settle * budget_ms

    p = confirmed(probe(pj.budgets.get("latency", min(budget_ms / lm.full_ms, 1.0)), kept))
    lo, hi = 0.0, 1.0      # bracket of fractions: measurements below the band's middle at lo, above it at hi
    while not settled(p) and len(probes) < max_steps:
        if p.measured_ms > target:
            if p.measured_ms > hi_ms and (not p.feasible or p.kept == pj.minimum().tolist()):
                break       # the smallest model the constraints allow is still over the band
            hi = min(hi, p.fraction)
        else:
            if p.fraction >= 1.0:
                break       # the whole model is under the middle: nothing left to give back
            lo = max(lo, p.fraction)
        if hi - lo < 1e-6:
            break
        guess = p.predicted_ms * target / max(p.measured_ms, 1e-12) / lm.full_ms
        repeat = sum(q.kept == p.kept for q in probes) > 1
        if lo < guess < hi and not repeat:
            nxt = guess
        elif guess >= hi == 1.0 and not any(q.fraction >= 1.0 for q in probes):
            nxt = 1.0       # the whole model first: if even it is under the band, the search is over
        else:
            nxt = 0.5 * (lo + hi)
        p = confirmed(probe(nxt))
    best = min((q for q in probes if inside(q)), key=lambda q: abs(q.measured_ms - target), default=None)
    converged = best is not None
    if best is None:
        under = [q for q in probes if q.measured_ms <= hi_ms]
        best = max(under, key=lambda q: q.measured_ms) if under else min(probes, key=lambda q: q.measured_ms)
    final = np.asarray(best.kept, dtype=np.int64)
    return LatencyFit(final, pj.plan(final), budget_ms, best.fraction, best.predicted_ms, best.measured_ms,
                      converged, probes, tuple(band))




