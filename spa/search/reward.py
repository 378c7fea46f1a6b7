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
   it against `Reconstruct`. With `refit=True` (OBSPA least-squares), `Reconstruct` itself runs (slower, exact
   reuse). With `refit="fast"`, the same torch pass first refits every weight layer as `Reconstruct` does (ridge
   least squares from the pruned model's actual input towards the original layer's output), but against the
   original's outputs at positions sampled once in `_original_pass` instead of re-running the original per
   candidate (`_lockstep_refit`); `refit="oneshot"` refits only the layers whose input lost columns, from the
   original's input Gram matrices alone (`_oneshot_refit`: one-shot OBS, ignores upstream errors). Both
   re-calibrate afterwards when `recalibrate` is on;
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

from spa.passes.fidelity import compare
from spa.passes.reconstruct import affine_layer, channel_axis, correct_affine, reestimate_bn

from ..errors import SpaError
from ..latency import free_batch_dim
from ..obspa import DEFAULT_POSITIONS
from .problem import SearchProblem

METRICS = ("auto", "accuracy", "agreement", "kl", "rel_l2")
REFIT_MODES = ("fast", "oneshot")
# output positions sampled per layer: "fast" forms the pruned input's Gram matrix on them per candidate (cost
# ~ positions x columns^2 per layer; Reconstruct uses 8192), "oneshot" the original's once
REFIT_POSITIONS = {"fast": 2048, "oneshot": 32768}
REFIT_MAX_COLUMNS = 4096    # a layer with more input columns (+1 for a bias) is not refit by fast/oneshot


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
                 refit: bool | str = False, alpha: float = 0.0, beta: float = 0.0, tiebreak: float = 1e-3,
                 samples: int | None = None, score_split: float | None = None, batch_size: int = 64,
                 threads: int | None = None, fast_recalibration: bool = True, seed: int = 0,
                 damp: float | None = None, refit_positions: int | None = None,
                 refit_max_columns: int = REFIT_MAX_COLUMNS):
        """refit: False; True (`Reconstruct` per candidate); "fast" (the same refit in the one-pass torch path,
        against the original's layer outputs cached at `refit_positions` sampled positions per layer, default
        2048); "oneshot" (one-shot OBS from the original's input Gram matrices over `refit_positions` positions,
        default 32768, computed once). damp: the refit's ridge (spa.obspa.DEFAULT_DAMP when None, as
        `Reconstruct`; with refit=True, damp and refit_positions go to `Reconstruct` when given);
        refit_max_columns: layers with more input columns (+1 for a bias) are left as they are by "fast" and
        "oneshot" (listed in `refit_skipped`)."""
        super().__init__()
        if metric not in METRICS:
            raise SpaError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
        if score_split is not None and not 0.0 < score_split < 1.0:
            raise SpaError(f"score_split must be in (0, 1), got {score_split}")
        if isinstance(refit, str) and refit not in REFIT_MODES:
            raise SpaError(f"refit must be False, True, 'fast' or 'oneshot', got {refit!r}")
        if isinstance(refit, str) and not fast_recalibration:
            raise SpaError(f"refit={refit!r} runs in the one-pass torch path: it cannot be combined with "
                           "fast_recalibration=False (use refit=True for Reconstruct)")
        if damp is not None and not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
            raise SpaError(f"damp must be a finite number >= 0, got {damp!r}")
        if refit_positions is not None and (not isinstance(refit_positions, (int, np.integer))
                                            or isinstance(refit_positions, bool) or refit_positions < 1):
            raise SpaError(f"refit_positions must be a positive integer, got {refit_positions!r}")
        if not isinstance(refit_max_columns, (int, np.integer)) or isinstance(refit_max_columns, bool) or \
                refit_max_columns < 1:
            raise SpaError(f"refit_max_columns must be a positive integer, got {refit_max_columns!r}")
        self.problem = problem
        self.recalibrate = recalibrate
        self.fast_refit = refit if isinstance(refit, str) else None    # "fast" | "oneshot" | None
        self.refit = refit if self.fast_refit else bool(refit)
        self._exact_refit = self.refit is True           # Reconstruct per candidate
        self.damp = damp
        self._positions_given = refit_positions is not None   # refit=True passes it (and damp) to Reconstruct
        if refit_positions is None:
            refit_positions = REFIT_POSITIONS.get(self.fast_refit, DEFAULT_POSITIONS)
        self.refit_positions, self.refit_max_columns = int(refit_positions), int(refit_max_columns)
        self._refit_layers: dict | None = None          # fast/oneshot: node -> cached statistics of the original
        self.refit_skipped: list[str] = []              # fast/oneshot: layers left as they are, and why
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

        feeds, _ = model_data(ScoreInputs(self.problem.analysis, None, samples=samples or 64, seed=self.seed))
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
            if (self.recalibrate and self.fast and not self._exact_refit) or self.fast_refit:
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
        model, analysis, removed, rows = self.problem.apply(kept, rows=self.recalibrate or bool(self.refit))
        t1 = time.perf_counter()
        refit_info = None
        if self._exact_refit or (self.recalibrate and not self.fast):
            outputs = self._reconstruct(model, rows)
        elif self.recalibrate or self.fast_refit:
            cols = input_columns(analysis, removed, self._refit_layers) if self.fast_refit == "oneshot" else None
            refit_info = {} if self.fast_refit else None
            outputs = self._fast_recalibrate(model, rows, cols, refit_info)
        else:
            outputs = self._run_ort(model.graph.to_model(), self.score_slice, own=True)
        t2 = time.perf_counter()
        metrics = compare(teacher, outputs, self.labels)
        if refit_info is not None:
            metrics.update(refit_layers=refit_info.get("layers", 0), refit_s=refit_info.get("seconds", 0.0))
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
        from spa.passes.reconstruct import Reconstruct

        kw = {} if self.damp is None else {"damp": self.damp}
        if self._positions_given:
            kw["positions"] = self.refit_positions
        Reconstruct(self.problem.original_proto(), rows, self._slice(self.stats_slice), refit=self.refit,
                    recalibrate=self.recalibrate, seed=self.seed, **kw).run(model)
        return self._run_ort(model.graph.to_model(), self.score_slice, own=True)

    def _chunks(self, sl: slice):
        from ..obspa import chunks

        feeds = self._slice(sl)
        n = sl.stop - sl.start
        return list(chunks(feeds, n, (self.batch_size, self.fixed_batch)))

    def _original_pass(self) -> None:
        """Once: the original's per-channel output moments of every weight layer on the statistics samples
        (what Reconstruct's affine correction matches), its outputs on the scoring samples, and with
        refit="fast"/"oneshot" the statistics of every layer the refit models (`_layer_stats`)."""
        import torch

        from spa.passes.reconstruct import channel_moments, release

        from ..torch_graph import TorchGraph

        tg = TorchGraph(self.problem.original_proto())
        outputs = set(tg.output_names)
        parts = self._chunks(self.stats_slice)
        envs = [tg.initial_env(c) for c in parts]
        moments = {}
        views = self._refit_views(list(tg.nodes)) if self.fast_refit else {}
        layers = {}
        gen = torch.Generator().manual_seed(self.seed)
        n = sum(int(next(iter(c.values())).shape[0]) for c in parts)
        with torch.no_grad():
            for pos, node in enumerate(tg.nodes):
                if node.name in views:
                    layers[node.name] = self._layer_stats(views[node.name], [env[node.input[0]] for env in envs],
                                                         n, gen)
                for env in envs:
                    tg.step(node, env)
                if node.op_type in ("Conv", "Gemm", "MatMul") and node.output and node.output[0] in envs[0]:
                    ys = [env[node.output[0]] for env in envs]
                    ch = channel_axis(node, ys[0])
                    moments[node.name] = (ch, *channel_moments(ys, ch))
                for env in envs:
                    release(env, tg, pos, outputs)
            if self.score_slice == self.stats_slice:
                outs = [[env[o] for o in tg.output_names] for env in envs]
            else:
                outs = [list(tg.run(c).values()) for c in self._chunks(self.score_slice)]
        self._moments = moments
        self._refit_layers = layers
        self._teacher = [np.concatenate([o[i].float().numpy() for o in outs]) for i in range(len(tg.output_names))]

    # ---- refit="fast" / "oneshot" --------------------------------------------------------------------------------
    def _refit_views(self, nodes) -> dict:
        """The original's layers the fast/oneshot refit models (what `Reconstruct` refits: spa.obspa.layer_view, weight
        not shared), with the ones left out noted in `refit_skipped`."""
        from ..obspa import layer_view

        g = self.problem.model.graph
        views, self.refit_skipped = {}, []
        for node in nodes:
            if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or g.const(node.input[1]) is None:
                continue
            view = layer_view(g, node)
            if view is None:
                self.refit_skipped.append(f"{node.name}: not a plain Conv/Gemm/MatMul layer (grouped or depthwise "
                                          "conv, ...): Reconstruct does not refit it either")
                continue
            if view.data_index != 0 or len(g.consumers.get(view.weight, [])) > 1 or \
                    (view.bias is not None and len(g.consumers.get(view.bias, [])) > 1):
                self.refit_skipped.append(f"{node.name}: weight shared by several nodes")
                continue
            cols = view.matrix(np.asarray(g.const(view.weight))).shape[1] + (view.bias is not None)
            if cols > self.refit_max_columns:
                self.refit_skipped.append(f"{node.name}: {cols} input columns > refit_max_columns "
                                          f"{self.refit_max_columns}: not refit")
                continue
            views[node.name] = view
        return views

    def _layer_stats(self, view, xs, n: int, gen) -> dict:
        """One layer of the original at `refit_positions` output positions sampled over the statistics samples
        (all of them when there are fewer; the same seeded draws as `Reconstruct`'s, so with 8192 positions
        refit="fast" reproduces its refit). U = the unfolded input rows there (conv patches in the weight's
        column order, a ones column for a bias). "fast" keeps the positions and the layer's output U [W_o | b_o]ᵀ
        there (the refit's target, positions x O floats); "oneshot" keeps H = UᵀU/rows and H [W_o | b_o]ᵀ
        (every candidate's right-hand side is a slice of it)."""
        import torch

        from .. import obspa

        g = self.problem.model.graph
        w = view.matrix(np.asarray(g.const(view.weight), np.float64))
        if view.bias is not None:
            w = np.concatenate([w, np.asarray(g.const(view.bias), np.float64)[:, None]], 1)
        in_axis = 0 if view.trans else 1
        layer = {"bias": view.bias is not None, "k": view.k, "in_axis": in_axis,
                 "in_len": int(np.asarray(g.const(view.weight)).shape[in_axis]), "rows": [], "y": [], "total": []}
        gram = obspa.Gram()
        wt = torch.from_numpy(w.T.astype(np.float32))
        for x in xs:
            x = x.float()
            quota = max(1, round(self.refit_positions * x.shape[0] / max(n, 1)))
            total = obspa.output_positions(view, x)
            rows = obspa.pick_rows(total, quota, gen)
            a = obspa.sample_rows(view, x, rows)
            a = obspa.with_ones(a) if view.bias is not None else a
            if self.fast_refit == "oneshot":
                gram.add(a)
            else:  # the original layer's output at the sampled positions: the refit's target
                layer["rows"].append(rows)
                layer["y"].append(a @ wt)
                layer["total"].append(total)
        if self.fast_refit == "oneshot":
            h = gram.xx / max(gram.n, 1)
            layer.update(h=h, hw=h @ w.T)
        return layer

    def _oneshot_refit(self, node, g, tg, rows, keep_cols: np.ndarray, info: dict) -> None:
        """One-shot OBS refit of one layer whose input lost columns, before it runs.

        `Reconstruct` refits W' = argmin ||X_p W'ᵀ - X_o W_oᵀ||² + λ||W' - W_p||² with X_p the PRUNED model's
        actual input (so upstream errors are compensated) and X_o the original's, both recomputed per candidate.
        Here X_p is taken to be the original's input restricted to the kept columns K (exact when nothing
        upstream changed), so only the original's H = X_oᵀX_o/n is needed, computed once:

            W'ᵀ = (H_KK + λI)⁻¹ (H_K: W_oᵀ + λ W_pᵀ),   λ = damp · mean(diag H_KK)   (as spa.obspa.refit)

        for the kept output rows of [W_o | b_o]; W_p is the pruned weight (the original's kept rows and columns),
        so with damp 0 it is the least-squares W' = W_o H_:K H_KK⁻¹. The cost is one |K| x |K| Cholesky solve."""
        from .. import obspa

        layer = self._refit_layers[node.name]
        view = obspa.layer_view(g, node)
        if view is None or len(g.consumers.get(view.weight, [])) > 1:
            return
        t = time.perf_counter()
        w_full = np.asarray(g.const(view.weight))
        w_p = view.matrix(w_full).astype(np.float64)
        if layer["bias"]:
            if view.bias is None:
                return
            w_p = np.concatenate([w_p, np.asarray(g.const(view.bias), np.float64)[:, None]], 1)
        cols = np.flatnonzero(keep_cols)
        if layer["bias"]:
            cols = np.append(cols, layer["h"].shape[0] - 1)
        out = np.flatnonzero(rows[node.name]) if node.name in rows else np.arange(layer["hw"].shape[1])
        if w_p.shape != (len(out), len(cols)):
            return
        damp = obspa.DEFAULT_DAMP if self.damp is None else self.damp
        hd, lam = obspa.damped(layer["h"][np.ix_(cols, cols)], damp)
        rhs = layer["hw"][np.ix_(cols, out)] + lam * w_p.T          # H_K: W_oᵀ: H W_oᵀ is computed once
        self._write_refit(g, tg, view, w_full, obspa._solve_psd(hd, rhs).T, info, t)

    def _lockstep_refit(self, node, g, tg, envs, rows, info: dict) -> None:
        """Reconstruct's refit of one layer from the pruned model's actual input, against the original layer's
        output at the positions sampled once (cached by `_original_pass`): no second model runs."""
        import torch

        from .. import obspa

        layer = self._refit_layers[node.name]
        view = obspa.layer_view(g, node)
        if view is None or len(g.consumers.get(view.weight, [])) > 1 or (view.bias is not None) != layer["bias"]:
            return
        t = time.perf_counter()
        out = torch.from_numpy(np.flatnonzero(rows[node.name])) if node.name in rows else None
        xx = xy = None
        count = 0
        for env, r, y, total in zip(envs, layer["rows"], layer["y"], layer["total"]):
            x = env[node.input[0]].float()
            if obspa.output_positions(view, x) != total:
                return
            a = obspa.sample_rows(view, x, r)
            if view.bias is not None:
                a = obspa.with_ones(a)
            yk = y if out is None else y.index_select(1, out)
            if a.shape[1] <= 64:  # as spa.obspa.Gram: float64 products for narrow layers, float32 otherwise
                a, yk = a.double(), yk.double()
            gxx, gxy = (a.T @ a).double(), (a.T @ yk).double()
            xx = gxx if xx is None else xx + gxx
            xy = gxy if xy is None else xy + gxy
            count += a.shape[0]
        w_full = np.asarray(g.const(view.weight))
        w_p = view.matrix(w_full).astype(np.float64)
        if view.bias is not None:
            w_p = np.concatenate([w_p, np.asarray(g.const(view.bias), np.float64)[:, None]], 1)
        if xx is None or xy.shape != (w_p.shape[1], w_p.shape[0]):
            return
        damp = obspa.DEFAULT_DAMP if self.damp is None else self.damp
        hd, lam = obspa.damped(xx.numpy() / count, damp)
        new = obspa._solve_psd(hd, xy.numpy() / count + lam * w_p.T).T
        self._write_refit(g, tg, view, w_full, new, info, t)

    def _write_refit(self, g, tg, view, w_full, new, info, t0) -> None:
        import torch

        if not np.isfinite(new).all():
            return

        def write(name, value):
            g.set_const(name, value)
            tg.param(name).data.copy_(torch.from_numpy(np.array(value)))

        if view.bias is not None:
            write(view.bias, new[:, -1].astype(np.asarray(g.const(view.bias)).dtype))
            new = new[:, :-1]
        write(view.weight, view.unmatrix(new, w_full.shape).astype(w_full.dtype))
        info["layers"] = info.get("layers", 0) + 1
        info["seconds"] = info.get("seconds", 0.0) + time.perf_counter() - t0

    def _fast_recalibrate(self, model, rows, cols: dict | None = None, refit_info: dict | None = None
                          ) -> list[np.ndarray]:
        """Reconstruct(recalibrate=True, refit=False) in one torch pass over the pruned model, with the
        original's moments from `_original_pass`; returns the corrected outputs on the scoring samples. With
        refit="fast" every modelled layer is refit by `_lockstep_refit` before it runs; with `cols` (refit=
        "oneshot": the kept input columns of the layers that lost some) those layers by `_oneshot_refit`.
        BN/affine re-calibration only with `recalibrate`."""
        import torch

        from spa.passes.reconstruct import release

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
                if cols is not None and node.name in cols:
                    self._oneshot_refit(node, g, tg, rows, cols[node.name], refit_info)
                elif self.fast_refit == "fast" and node.name in self._refit_layers:
                    self._lockstep_refit(node, g, tg, envs, rows, refit_info)
                if self.recalibrate and node.op_type == "BatchNormalization":
                    reestimate_bn(g, node, [env[node.input[0]] for env in envs], write)
                for env in envs:
                    tg.step(node, env)
                if self.recalibrate and node.name in rows and node.output[0] not in followed_by_bn:
                    self._affine(node, g, envs, rows, write)
                for env in envs:
                    release(env, tg, pos, outputs)
            if self.score_slice == self.stats_slice:
                outs = [[env[o] for o in tg.output_names] for env in envs]
            else:
                outs = [list(tg.run(c).values()) for c in self._chunks(self.score_slice)]
        return [np.concatenate([o[i].float().numpy() for o in outs]) for i in range(len(tg.output_names))]

    def _affine(self, node, g, envs, rows, write) -> None:
        """Reconstruct._affine with the original's moments looked up instead of recomputed, the outputs corrected
        in their own precision (Reconstruct: float64, then cast back)."""
        view, applies = affine_layer(g, node)
        stats = self._moments.get(node.name)
        if not applies or stats is None or len(g.consumers.get(node.input[1], [])) > 1:
            return
        ys_p = [env[node.output[0]] for env in envs]
        keep = np.flatnonzero(rows[node.name])
        _, mean_o, var_o = stats
        ch = channel_axis(node, ys_p[0])
        correct_affine(g, node, view, mean_o[keep], var_o[keep], envs, ys_p, ch, write, float64=False)

def input_columns(analysis, removed, layers: dict | None) -> dict[str, np.ndarray]:
    """For every layer refit="oneshot" models whose input lost units: the kept input columns of its original weight matrix
    (a conv's input channel repeated over its kernel positions), from the 'sink' slices of the analysis."""
    if not layers:
        return {}
    keep = analysis.keep_mask(removed)
    masks = {name: np.ones(lay["in_len"], bool) for name, lay in layers.items()}
    for ps in analysis.ctx.params:
        lay = layers.get(ps.node.name)
        if ps.role != "sink" or lay is None or ps.input_index != 1 or ps.axis != lay["in_axis"]:
            continue
        if len(ps.atoms) != lay["in_len"]:
            masks.pop(ps.node.name, None)   # a slice of the axis we cannot place: leave the layer as it is
            layers = {k: v for k, v in layers.items() if k != ps.node.name}
            continue
        masks[ps.node.name] &= keep(ps.atoms)
    return {name: np.repeat(m, layers[name]["k"]) for name, m in masks.items() if not m.all()}
