"""Rewards for candidates, without test data.

An `Evaluator` maps a kept-count vector (one count per coupled group, see `budget.py`) to an `Evaluation`: a
reward and the metrics it came from. Results are cached by the kept-count tuple (the ratio vector rounded to the
unit granularity, which is all that distinguishes two candidates); the reward is recomputed from the cached
metrics on every call, so a policy may change `alpha`/`beta` (AutoSculpt's learnable alpha) without
invalidating the cache.

`CalibEvaluator` is the real one. Per candidate (fastest honest path, measured in docs/search.md):

1. the plan is applied to a fresh copy of the normalized model (copy + analysis + Apply, no verification: only
   the final plan goes through the driver's apply/verify path);
2. without re-calibration, one onnxruntime session runs the pruned model over the calibration batches; with
   `recalibrate`, one torch pass over the pruned model does what `passes.reconstruct.Reconstruct(recalibrate=True)`
   does (BN statistics re-estimated from the pruned inputs; per-channel affine correction of Conv/Gemm outputs not
   followed by BN towards the original's channel mean/std), but with the original's per-channel moments computed
   once instead of re-running the original per candidate, and the corrected outputs scored directly. A test checks
   it against `Reconstruct`. With `refit` (OBSPA least-squares), `Reconstruct` itself runs (slower, exact reuse);
3. the outputs are compared with the original's (the teacher, computed once):

   - `accuracy`: top-1 accuracy on the calibration labels (needs `labels` in the calibration data);
   - `agreement`: top-1 agreement with the teacher; `kl`: mean KL(teacher || pruned) of the softmax, for outputs
     that are class logits ([batch, classes]);
   - `rel_l2`: relative L2 error averaged over every output.

   quality = accuracy | agreement | exp(-kl) | exp(-rel_l2) (all in [0, 1], higher is better); metric "auto"
   picks accuracy when labels exist, else kl for logits, else rel_l2. With accuracy or agreement,
   `tiebreak` x exp(-kl) (or exp(-rel_l2)) separates candidates with the same count of correct samples.

reward = quality + alpha * (1 - flops kept) + beta * (1 - params kept)   (RL-Pruner's form; alpha = beta = 0 by
default: the projection puts every candidate at the budget already).

`score_split` holds out that fraction of the calibration samples for scoring: re-calibration statistics come from
the rest, so a candidate is not scored on the samples its statistics were matched to.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import SpaError
from .problem import SearchProblem

METRICS = ("auto", "accuracy", "agreement", "kl", "rel_l2")


@dataclass
class Evaluation:
    reward: float
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0     # time of the evaluation that produced the metrics (0 for a synthetic reward)
    cached: bool = False


class Evaluator:
    """Base class: `evaluator(kept) -> Evaluation`, cached by the kept-count tuple. Subclasses implement
    `measure(kept) -> dict` (metrics, computed once per candidate) and `reward_of(metrics) -> float`."""

    def __init__(self):
        self.cache: dict[tuple, dict] = {}
        self.calls = 0          # every request
        self.measured = 0       # requests that were not in the cache
        self.seconds = 0.0      # time spent measuring

    def __call__(self, kept) -> Evaluation:
        key = tuple(int(k) for k in np.asarray(kept).reshape(-1))
        self.calls += 1
        metrics = self.cache.get(key)
        if metrics is not None:
            return Evaluation(self.reward_of(metrics), metrics, metrics.get("seconds", 0.0), cached=True)
        t = time.perf_counter()
        metrics = dict(self.measure(np.asarray(key, dtype=np.int64)))
        dt = time.perf_counter() - t
        metrics.setdefault("seconds", dt)
        self.measured += 1
        self.seconds += dt
        self.cache[key] = metrics
        return Evaluation(self.reward_of(metrics), metrics, metrics["seconds"])

    def measure(self, kept: np.ndarray) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def reward_of(self, metrics: dict) -> float:
        return float(metrics["reward"])


class FunctionEvaluator(Evaluator):
    """A synthetic reward: `fn(keep_ratios) -> float` over all groups (kept / units). For tests and for
    checking that an agent finds a planted optimum without running any model."""

    def __init__(self, problem: SearchProblem, fn: Callable[[np.ndarray], float]):
        super().__init__()
        self.problem, self.fn = problem, fn

    def measure(self, kept: np.ndarray) -> dict:
        ratios = kept / np.maximum(self.problem.sizes, 1)
        return {"reward": float(self.fn(ratios)), "seconds": 0.0}


class CalibEvaluator(Evaluator):
    """Fidelity / calibration accuracy of the pruned candidate (see the module docstring)."""

    def __init__(self, problem: SearchProblem, calib=None, *, metric: str = "auto", recalibrate: bool = False,
                 refit: bool = False, alpha: float = 0.0, beta: float = 0.0, tiebreak: float = 1e-3,
                 samples: int | None = None, score_split: float | None = None, batch_size: int = 64,
                 threads: int | None = None, fast_recalibration: bool = True, seed: int = 0):
        super().__init__()
        if metric not in METRICS:
            raise SpaError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
        if score_split is not None and not 0.0 < score_split < 1.0:
            raise SpaError(f"score_split must be in (0, 1), got {score_split}")
        self.problem = problem
        self.recalibrate, self.refit = recalibrate, refit
        self.alpha, self.beta, self.tiebreak = alpha, beta, tiebreak
        self.threads, self.seed = threads, seed
        self.fast = fast_recalibration
        feeds, labels = self._data(calib if calib is not None else problem.calib, samples)
        from ..obspa import batch_size_for
        n = int(next(iter(feeds.values())).shape[0])
        bs, fixed = batch_size_for(problem.model.graph, batch_size, feeds)
        if fixed:  # a fixed batch dim: whole batches only
            n -= n % bs
            if n == 0:
                raise SpaError(f"fewer calibration samples than the model's fixed batch size {bs}")
        n_score = n if score_split is None else max(bs if fixed else 1, round(n * score_split))
        if fixed:
            n_score -= n_score % bs
        n_stats = n if score_split is None else n - n_score
        if n_stats <= 0:
            raise SpaError("score_split leaves no samples for the re-calibration statistics")
        self.batch_size, self.fixed_batch = bs, fixed
        # an export with a static batch dim that computes per sample (probed above) runs in onnxruntime with
        # the dim freed (inputs/outputs only), instead of one session run per sample
        from ..calib import input_specs
        declared = [s[0][0] for s in input_specs(problem.original_proto()).values() if s[0]]
        self._free_batch = not fixed and any(isinstance(d, int) and d != bs for d in declared)
        self.feeds = {k: np.ascontiguousarray(v[:n]) for k, v in feeds.items()}
        self.stats_slice = slice(0, n_stats)
        self.score_slice = slice(n - n_score, n)
        self.labels = None if labels is None else np.asarray(labels[:n])[self.score_slice]
        self.n_stats, self.n_score = n_stats, n_score
        self._teacher: list[np.ndarray] | None = None
        self._moments: dict | None = None
        self.metric = self._resolve_metric(metric)

    # ---- data ----------------------------------------------------------------------------------------------------
    def _data(self, calib, samples):
        if calib is not None:
            data = calib.subset(samples, self.seed) if samples else calib
            return data.inputs, data.labels
        from ..importance import ScoreInputs
        from ..obspa import model_data

        feeds, _ = model_data(ScoreInputs(self.problem.an, None, samples=samples or 64, seed=self.seed))
        return feeds, None

    def _slice(self, sl: slice) -> dict[str, np.ndarray]:
        return {k: v[sl] for k, v in self.feeds.items()}

    def _batches(self, sl: slice) -> list[dict[str, np.ndarray]]:
        start, stop = sl.start, sl.stop
        return [{k: v[i:min(i + self.batch_size, stop)] for k, v in self.feeds.items()}
                for i in range(start, stop, self.batch_size)]

    def _resolve_metric(self, metric: str) -> str:
        logits = self._logits_index(self.teacher())
        if metric == "auto":
            return "accuracy" if self.labels is not None and logits is not None else \
                ("kl" if logits is not None else "rel_l2")
        if metric == "accuracy" and (self.labels is None or logits is None):
            raise SpaError("metric 'accuracy' needs calibration labels and a [batch, classes] output")
        if metric in ("agreement", "kl") and logits is None:
            raise SpaError(f"metric '{metric}' needs an output of class logits ([batch, classes])")
        return metric

    @staticmethod
    def _logits_index(outputs) -> int | None:
        for i, o in enumerate(outputs):
            if o.ndim == 2 and o.shape[1] > 1 and np.issubdtype(o.dtype, np.floating):
                return i
        return None

    # ---- teacher -------------------------------------------------------------------------------------------------
    def teacher(self) -> list[np.ndarray]:
        """The original's outputs on the scoring samples (computed once)."""
        if self._teacher is None:
            if self.recalibrate and self.fast and not self.refit:
                self._original_pass()
            else:
                self._teacher = self._run_ort(self.problem.original_proto(), self.score_slice)
        return self._teacher

    def _session(self, proto):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def _run_ort(self, proto, sl: slice, own: bool = False) -> list[np.ndarray]:
        """Outputs over the batches of slice `sl`; `own`: the proto may be changed (a candidate's copy)."""
        if self._free_batch:
            proto = free_batch_dim(proto, copy=not own)
        sess = self._session(proto)
        parts = [sess.run(None, b) for b in self._batches(sl)]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    # ---- one candidate -------------------------------------------------------------------------------------------
    def measure(self, kept: np.ndarray) -> dict:
        teacher = self.teacher()
        t0 = time.perf_counter()
        model, _, _, rows = self.problem.apply(kept, rows=self.recalibrate or self.refit)
        t1 = time.perf_counter()
        if self.refit or (self.recalibrate and not self.fast):
            outputs = self._reconstruct(model, rows)
        elif self.recalibrate:
            outputs = self._fast_recalibrate(model, rows)
        else:
            outputs = self._run_ort(model.graph.to_model(), self.score_slice, own=True)
        t2 = time.perf_counter()
        metrics = compare(teacher, outputs, self.labels)
        costs = self.problem.projector.costs(kept)
        metrics.update({"flops": costs["flops"], "params": costs["params"], "apply_s": t1 - t0, "run_s": t2 - t1,
                        "seconds": t2 - t0})
        return metrics

    def reward_of(self, m: dict) -> float:
        fid = math.exp(-m["kl"]) if "kl" in m else math.exp(-m["rel_l2"])
        if self.metric == "accuracy":
            q = m["accuracy"] + self.tiebreak * fid
        elif self.metric == "agreement":
            q = m["agreement"] + self.tiebreak * fid
        elif self.metric == "kl":
            q = math.exp(-m["kl"])
        else:
            q = math.exp(-m["rel_l2"])
        return float(q + self.alpha * (1.0 - m["flops"]) + self.beta * (1.0 - m["params"]))

    # ---- re-calibration / reconstruction -------------------------------------------------------------------------
    def _reconstruct(self, model, rows) -> list[np.ndarray]:
        """passes.reconstruct.Reconstruct on the candidate (refit and/or re-calibration), then onnxruntime."""
        from passes.reconstruct import Reconstruct

        Reconstruct(self.problem.original_proto(), rows, self._slice(self.stats_slice), refit=self.refit,
                    recalibrate=self.recalibrate, seed=self.seed).run(model)
        return self._run_ort(model.graph.to_model(), self.score_slice, own=True)

    def _chunks(self, sl: slice):
        from ..obspa import chunks

        feeds = self._slice(sl)
        n = sl.stop - sl.start
        return list(chunks(feeds, n, (self.batch_size, self.fixed_batch)))

    def _original_pass(self) -> None:
        """Once: the original's per-channel output moments of every weight layer on the statistics samples
        (what Reconstruct's affine correction matches) and its outputs on the scoring samples."""
        import torch

        from passes.reconstruct import _channel_moments, release

        from ..torch_graph import TorchGraph

        tg = TorchGraph(self.problem.original_proto())
        outputs = set(tg.output_names)
        envs = [tg.initial_env(c) for c in self._chunks(self.stats_slice)]
        moments = {}
        with torch.no_grad():
            for pos, node in enumerate(tg.nodes):
                for env in envs:
                    tg.step(node, env)
                if node.op_type in ("Conv", "Gemm", "MatMul") and node.output and node.output[0] in envs[0]:
                    ys = [env[node.output[0]] for env in envs]
                    ch = 1 if node.op_type == "Conv" else ys[0].dim() - 1
                    moments[node.name] = (ch, *_channel_moments(ys, ch))
                for env in envs:
                    release(env, tg, pos, outputs)
            if self.score_slice == self.stats_slice:
                outs = [[env[o] for o in tg.output_names] for env in envs]
            else:
                outs = [list(tg.run(c).values()) for c in self._chunks(self.score_slice)]
        self._moments = moments
        self._teacher = [np.concatenate([o[i].float().numpy() for o in outs]) for i in range(len(tg.output_names))]

    def _fast_recalibrate(self, model, rows) -> list[np.ndarray]:
        """Reconstruct(recalibrate=True, refit=False) in one torch pass over the pruned model, with the
        original's moments from `_original_pass`; returns the corrected outputs on the scoring samples."""
        import torch

        from passes.reconstruct import _channel_moments, release

        from ..obspa import layer_view
        from ..torch_graph import TorchGraph

        g = model.graph
        tg = TorchGraph(g)
        outputs = set(g.output_names)
        envs = [tg.initial_env(c) for c in self._chunks(self.stats_slice)]
        nodes = list(tg.nodes)
        followed_by_bn = {n.input[0] for n in nodes if n.op_type == "BatchNormalization"}

        def write(name, value):
            tg.param(name).data.copy_(torch.from_numpy(np.array(value)))

        with torch.no_grad():
            for pos, node in enumerate(nodes):
                if node.op_type == "BatchNormalization":
                    mean_name, var_name = node.input[3], node.input[4]
                    if len(g.consumers.get(mean_name, [])) <= 1 and len(g.consumers.get(var_name, [])) <= 1:
                        mean, var = _channel_moments([env[node.input[0]] for env in envs], 1)
                        write(mean_name, mean.astype(np.asarray(g.const(mean_name)).dtype))
                        write(var_name, var.astype(np.asarray(g.const(var_name)).dtype))
                for env in envs:
                    tg.step(node, env)
                if node.name in rows and node.output[0] not in followed_by_bn:
                    self._affine(node, g, tg, envs, rows, layer_view, write)
                for env in envs:
                    release(env, tg, pos, outputs)
            if self.score_slice == self.stats_slice:
                outs = [[env[o] for o in tg.output_names] for env in envs]
            else:
                outs = [list(tg.run(c).values()) for c in self._chunks(self.score_slice)]
        return [np.concatenate([o[i].float().numpy() for o in outs]) for i in range(len(tg.output_names))]

    def _affine(self, node, g, tg, envs, rows, layer_view, write) -> None:
        """Reconstruct._affine with the original's moments looked up instead of recomputed."""
        import torch

        from passes.reconstruct import fold_affine

        view = layer_view(g, node)
        weight = node.input[1]
        grouped = node.op_type == "Conv" and view is None and g.const(weight) is not None
        stats = self._moments.get(node.name)
        if (view is None and not grouped) or stats is None or len(g.consumers.get(weight, [])) > 1:
            return
        ys_p = [env[node.output[0]] for env in envs]
        keep = np.flatnonzero(rows[node.name])
        _, mean_o, var_o = stats
        ch = 1 if node.op_type == "Conv" else ys_p[0].dim() - 1
        scale, shift = fold_affine(g, node, view, mean_o[keep], var_o[keep], ys_p, ch, write)
        view_shape = [1] * ys_p[0].dim()
        view_shape[ch] = -1
        sc = torch.from_numpy(scale).view(view_shape)
        sh = torch.from_numpy(shift).view(view_shape)
        for env, y in zip(envs, ys_p):  # in the tensor's own precision (Reconstruct: float64, then cast back)
            env[node.output[0]] = torch.addcmul(sh.to(y.dtype), y, sc.to(y.dtype))


def free_batch_dim(proto, copy: bool = True):
    """The model with dim 0 of every graph input and output symbolic (value_info dropped)."""
    import onnx

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


def compare(teacher: list[np.ndarray], outputs: list[np.ndarray], labels: np.ndarray | None) -> dict:
    """rel_l2 averaged over outputs; agreement, kl (and accuracy with labels) on the first logits output."""
    rel = []
    out: dict = {}
    logits_done = False
    for a, b in zip(teacher, outputs):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rel.append(float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(a64), 1e-12)))
        if not logits_done and a64.ndim == 2 and a64.shape[1] > 1:
            logits_done = True
            out["agreement"] = float((a64.argmax(1) == b64.argmax(1)).mean())
            la = a64 - a64.max(1, keepdims=True)
            lb = b64 - b64.max(1, keepdims=True)
            la -= np.log(np.exp(la).sum(1, keepdims=True))
            lb -= np.log(np.exp(lb).sum(1, keepdims=True))
            out["kl"] = float((np.exp(la) * (la - lb)).sum(1).mean())
            if labels is not None:
                out["accuracy"] = float((b64.argmax(1) == labels).mean())
                out["teacher_accuracy"] = float((a64.argmax(1) == labels).mean())
    out["rel_l2"] = float(np.mean(rel)) if rel else 0.0
    return out
