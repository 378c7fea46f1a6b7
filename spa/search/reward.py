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
   original's outputs at positions sampled once in `onepass.original_pass` instead of re-running the original per
   candidate (`refit.LayerRefit.lockstep`); `refit="oneshot"` refits only the layers whose input lost columns,
   from the original's input Gram matrices alone (`LayerRefit.oneshot`: one-shot OBS, ignores upstream errors).
   Both re-calibrate afterwards when `recalibrate` is on (the torch passes: onepass.py);
3. the outputs are compared with the original's (the teacher, computed once; spa.passes.fidelity.compare):

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
from spa.passes.reconstruct import Reconstruct

from ..errors import SpaError
from ..obspa import DEFAULT_POSITIONS
from .onepass import candidate_pass, original_pass
from .problem import SearchProblem
from .refit import REFIT_MAX_COLUMNS, REFIT_MODES, REFIT_POSITIONS, LayerRefit, input_columns
from .samples import CalibSamples

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
        key = self.key(kept)
        hit = self.lookup(key)
        if hit is not None:
            return hit
        t = time.perf_counter()
        metrics = dict(self.measure(np.asarray(key, dtype=np.int64)))
        return self.record(key, metrics, time.perf_counter() - t)

    # the call split in its bookkeeping halves, for executors that measure elsewhere (executor.py)
    @staticmethod
    def key(kept) -> tuple:
        """The cache key of a kept-count vector."""
        return tuple(int(k) for k in np.asarray(kept).reshape(-1))

    def lookup(self, key: tuple) -> Evaluation | None:
        """Count a request; its cached evaluation, or None when it must be measured."""
        self.calls += 1
        metrics = self.cache.get(key)
        if metrics is None:
            return None
        return Evaluation(self.reward_of(metrics), metrics, metrics.get("seconds", 0.0), cached=True)

    def record(self, key: tuple, metrics: dict, seconds: float) -> Evaluation:
        """Cache the metrics `measure` returned for `key` (measured in `seconds`) and evaluate them."""
        metrics.setdefault("seconds", seconds)
        self.measured += 1
        self.seconds += seconds
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
    """Fidelity / calibration accuracy of the pruned candidate (see the module docstring). The pieces: the samples
    (`samples.CalibSamples`), the one-pass torch scoring (`onepass`), the fast/oneshot refit (`refit.LayerRefit`),
    the metrics (`spa.passes.fidelity.compare`) and the reward (`reward_of`)."""

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
        check_options(metric, score_split, refit, fast_recalibration, damp, refit_positions, refit_max_columns)
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
        self._layer_refit = LayerRefit(self.fast_refit, self.refit_positions, self.refit_max_columns, damp)
        self.alpha, self.beta, self.tiebreak = alpha, beta, tiebreak
        self.threads, self.seed = threads, seed
        self.fast = fast_recalibration
        self.samples = CalibSamples(problem, calib if calib is not None else problem.calib, samples, seed,
                                    batch_size, score_split)
        s = self.samples
        self.batch_size, self.fixed_batch, self.feeds, self.labels = s.batch_size, s.fixed_batch, s.feeds, s.labels
        self.stats_slice, self.score_slice, self.n_stats, self.n_score = (s.stats_slice, s.score_slice, s.n_stats,
                                                                          s.n_score)
        self._teacher: list[np.ndarray] | None = None
        self._moments: dict | None = None
        self.metric = resolve_metric(metric, self.teacher(), self.labels)

    @property
    def refit_skipped(self) -> list[str]:
        """fast/oneshot: the layers left as they are, and why."""
        return self._layer_refit.skipped

    @property
    def _refit_layers(self) -> dict | None:
        """fast/oneshot: node -> cached statistics of the original (None before the original's pass)."""
        return self._layer_refit.layers

    # ---- teacher -------------------------------------------------------------------------------------------------
    def teacher(self) -> list[np.ndarray]:
        """The original's outputs on the scoring samples (computed once)."""
        if self._teacher is None:
            if (self.recalibrate and self.fast and not self._exact_refit) or self.fast_refit:
                self._moments, self._teacher = original_pass(self.problem.original_proto(), self.problem.model.graph,
                                                             self.samples, self._layer_refit, self.seed)
            else:
                self._teacher = self._run_ort(self.problem.original_proto(), self.score_slice)
        return self._teacher

    def _run_ort(self, proto, sl: slice, own: bool = False) -> list[np.ndarray]:
        """Outputs over the batches of slice `sl`; `own`: the proto may be changed (a candidate's copy)."""
        return self.samples.run_ort(proto, sl, self.threads, own)

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
            outputs = candidate_pass(model, rows, self.samples, self._moments, self._layer_refit,
                                     recalibrate=self.recalibrate, cols=cols, refit_info=refit_info)
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
        q = quality(m, self.metric, self.tiebreak)
        return float(q + self.alpha * (1.0 - m["flops"]) + self.beta * (1.0 - m["params"]))

    def _reconstruct(self, model, rows) -> list[np.ndarray]:
        """passes.reconstruct.Reconstruct on the candidate (refit and/or re-calibration), then onnxruntime."""
        kw = {} if self.damp is None else {"damp": self.damp}
        if self._positions_given:
            kw["positions"] = self.refit_positions
        Reconstruct(self.problem.original_proto(), rows, self.samples.slice(self.stats_slice), refit=self.refit,
                    recalibrate=self.recalibrate, seed=self.seed, **kw).run(model)
        return self._run_ort(model.graph.to_model(), self.score_slice, own=True)


def check_options(metric, score_split, refit, fast_recalibration, damp, refit_positions, refit_max_columns) -> None:
    """CalibEvaluator's option checks, in the order they are reported."""
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


def logits_index(outputs) -> int | None:
    """The first output that looks like float class logits ([batch, classes]), or None."""
    for i, o in enumerate(outputs):
        if o.ndim == 2 and o.shape[1] > 1 and np.issubdtype(o.dtype, np.floating):
            return i
    return None


def resolve_metric(metric: str, teacher, labels) -> str:
    """The metric the reward uses: "auto" resolved (accuracy with labels and logits, else kl with logits, else
    rel_l2), the others checked against the outputs and labels."""
    logits = logits_index(teacher)
    if metric == "auto":
        return "accuracy" if labels is not None and logits is not None else \
            ("kl" if logits is not None else "rel_l2")
    if metric == "accuracy" and (labels is None or logits is None):
        raise SpaError("metric 'accuracy' needs calibration labels and a [batch, classes] output")
    if metric in ("agreement", "kl") and logits is None:
        raise SpaError(f"metric '{metric}' needs an output of class logits ([batch, classes])")
    return metric


def quality(m: dict, metric: str, tiebreak: float) -> float:
    """The quality term of the reward (in [0, 1], higher is better; see the module docstring)."""
    fid = math.exp(-m["kl"]) if "kl" in m else math.exp(-m["rel_l2"])
    if metric == "accuracy":
        return m["accuracy"] + tiebreak * fid
    if metric == "agreement":
        return m["agreement"] + tiebreak * fid
    if metric == "kl":
        return math.exp(-m["kl"])
    return math.exp(-m["rel_l2"])
