"""Timing with onnxruntime: sessions as latency is stated, medians of timed runs, random feeds at a batch size,
the machine a table depends on (see spa.latency for the whole picture)."""
from __future__ import annotations

import os
import platform
import time

import numpy as np
import onnx
from onnx import helper

from ..calib import input_specs
from ..errors import SpaError, one_line
from ..ir import read_model
from ..model import default_dim
from ..passes.verify import open_session

MIN_RUNS = 30


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
        return open_session(proto, opts)
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


def check_counts(batch: int, threads: int, runs: int, warmup: int, clock: str = "wall") -> None:
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
    path = str(proto_or_path)
    if not os.path.isfile(path):
        raise SpaError(f"input file not found: {path}")
    return read_model(path)[0]


def runnable(proto: onnx.ModelProto, batch: int, input_shapes: dict | None = None, seed: int = 0):
    """(model, random feeds) for timing at `batch`: the batch dim is made free when the model fixes another one;
    dynamic dims come from `input_shapes` or the documented defaults (spa.model.default_dim)."""
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
    check_counts(batch, threads, runs, warmup, clock)
    proto, feeds = runnable(_load_proto(proto_or_path), batch, input_shapes)
    stats = (timer or Timer(threads, runs, warmup, clock))(proto, feeds)
    return {**stats, "threads": int(threads), "batch": int(batch), "clock": clock}


def overhead_model() -> tuple[onnx.ModelProto, dict]:
    """A one-op model on one element: the fixed cost of a `run` call that every standalone layer pays."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "overhead", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, {"x": np.ones(1, np.float32)}


def free_batch_dim(proto, copy: bool = True):
    """The model with dim 0 of every graph input and output symbolic (value_info dropped)."""
    if copy:
        m = onnx.ModelProto()
        m.CopyFrom(proto)
        proto = m
    del proto.graph.value_info[:]
    for vi in list(proto.graph.input) + list(proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    return proto
