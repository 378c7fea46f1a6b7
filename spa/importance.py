"""Importance criteria: one score per unit, combined from scores of every member of its coupled group.

A criterion scores *members*: every parameter slice a unit owns (producer rows, biases, norm parameters, consumer
columns) gets a value per position along its sliced axis. The positions of one unit inside one member are reduced
(summed; the l2 criterion takes the root of the summed squares), the members are combined per unit with an
AGGREGATION, and units are normalized per group with a NORMALIZATION so that one global ranking can compare
groups (SPA's AGG/NORM). A criterion that scores no member of some group leaves that group to the l2 magnitude
and says so in the notes; a criterion that cannot apply to the model at all raises a SpaError naming the
alternatives.

Criteria that need torch (gradients) or activations (OBS) live in their own modules and are imported only when
asked for, so the core pruner runs without torch.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import quant
from .errors import SpaError
from .groups import Analysis
from .ir import release
from .labels import ParamSlice

AGGREGATIONS = ("sum", "mean", "max", "prod", "median", "first")
NORMALIZATIONS = ("none", "sum", "mean", "max", "standardize", "gaussian")


@dataclass
class Member:
    """Per-position values of one member (a parameter slice) of a group; `root` 2 makes the per-unit value the
    square root of the summed values (an L2 norm when the values are squares)."""

    ps: ParamSlice
    values: np.ndarray
    root: int = 1


LOSSES = ("auto", "ce", "pseudo", "fisher")   # ScoreInputs.loss; the CLI's --loss choices list the same


@dataclass
class ScoreInputs:
    """What a criterion may read besides the analysis: calibration data, the loss for gradient criteria, and
    a place to leave notes for the report."""

    analysis: Analysis
    calib: object | None = None     # spa.calib.Calib, or None: data-free
    loss: str = "auto"              # ce | pseudo | fisher | auto (ce when labels exist, else pseudo)
    samples: int = 64               # synthesized samples in data-free mode
    batch_size: int = 32
    seed: int = 0
    progress: Callable[[str], None] = lambda s: None
    notes: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # shared between criteria and later passes (e.g. Hessians)

    def __post_init__(self):
        # checked here, for the API callers too: an unknown loss would otherwise fall through to another one
        if self.loss not in LOSSES:
            raise SpaError(f"unknown loss '{self.loss}' (choose from {', '.join(LOSSES)})")
        if int(self.samples) < 1:
            raise SpaError(f"samples must be at least 1, got {self.samples}")


# ---- registry ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Criterion:
    name: str
    target: str      # "module:function" returning list[Member] (or a dict unit -> score when `unit_level`)
    needs: str       # weights | gradients | activations
    doc: str
    unit_level: bool = False

    def load(self) -> Callable:
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module, __package__), fn)


CRITERIA: dict[str, Criterion] = {c.name: c for c in [
    Criterion("l1", ".importance:l1_members", "weights", "sum of |w| over every slice a unit owns"),
    Criterion("l2", ".importance:l2_members", "weights", "L2 norm of every slice a unit owns"),
    Criterion("random", ".importance:random_scores", "weights", "uniform random (a baseline)", unit_level=True),
    Criterion("bn-scale", ".importance:bn_scale_members", "weights",
              "|gamma| of the BatchNormalization nodes in the group (needs BN nodes in the export)"),
    Criterion("lamp", ".importance:lamp_scores", "weights",
              "LAMP: squared magnitude over the sum of the squared magnitudes not smaller, per group",
              unit_level=True),
    Criterion("fpgm", ".importance:fpgm_members", "weights",
              "FPGM: summed distance of a producer's filter to the other filters of the layer"),
    Criterion("taylor", ".gradients:taylor_members", "gradients", "|sum of w*dL/dw| per slice (first order)"),
    Criterion("snip", ".gradients:snip_members", "gradients", "sum of |w*dL/dw| per slice (connection sensitivity)"),
    Criterion("grasp", ".gradients:grasp_members", "gradients",
              "sum of w*(Hg) per slice (GraSP: keeps what preserves gradient flow)"),
    Criterion("crop", ".gradients:crop_members", "gradients", "sum of |w*(Hg)| per slice (gradient-flow preservation)"),
    Criterion("obs", ".obspa:obs_members", "activations",
              "OBS saliency of each consumer's input channels from its layer-wise Hessian (no reconstruction)"),
    Criterion("obspa", ".obspa:obs_members", "activations",
              "OBS saliencies, then layer-by-layer least-squares reconstruction of the kept weights (no fine-tuning)"),
]}


def score(analysis: Analysis, importance: str = "l2", aggregation: str = "sum", normalization: str = "mean",
          inputs: ScoreInputs | None = None) -> dict[int, float]:
    """Scores per unit (root atom) for `importance`; higher means keep."""
    crit = CRITERIA.get(importance)
    if crit is None:
        raise SpaError(f"unknown importance '{importance}' (choose from {', '.join(CRITERIA)})")
    if aggregation not in AGGREGATIONS:
        raise SpaError(f"unknown aggregation '{aggregation}' (choose from {', '.join(AGGREGATIONS)})")
    if normalization not in NORMALIZATIONS:
        raise SpaError(f"unknown normalization '{normalization}' (choose from {', '.join(NORMALIZATIONS)})")
    inputs = inputs or ScoreInputs(analysis)
    result = crit.load()(inputs)
    if crit.unit_level:
        scores = result
    else:
        scores = aggregate(analysis, result, aggregation, inputs, importance)
    return normalize_scores(analysis, scores, normalization)


# ---- combining members ------------------------------------------------------------------------------------------
def aggregate(analysis: Analysis, members: list[Member], aggregation: str, inputs: ScoreInputs | None = None,
              name: str = "") -> dict[int, float]:
    """Per-unit scores: reduce each member's positions per unit, then combine members with `aggregation`.
    Units no member scored fall back to the l2 magnitude (noted)."""
    roots = np.array(sorted(analysis.unit_group), dtype=np.int64)
    us, ms, vs = [], [], []
    for k, m in enumerate(members):
        r = analysis.find(m.ps.atoms)
        ok = r >= 0
        if not ok.any():
            continue
        idx = np.searchsorted(roots, r[ok])
        per_unit = np.bincount(idx, weights=np.asarray(m.values, dtype=np.float64)[ok], minlength=len(roots))
        touched = np.flatnonzero(np.bincount(idx, minlength=len(roots)))
        v = per_unit[touched]
        if m.root == 2:
            v = np.sqrt(np.maximum(v, 0.0))
        us.append(touched)
        ms.append(np.full(len(touched), k))
        vs.append(v)
    n = len(roots)
    if us:
        u, mi, v = np.concatenate(us), np.concatenate(ms), np.concatenate(vs)
    else:
        u, mi, v = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    count = np.bincount(u, minlength=n)
    if aggregation in ("sum", "mean"):
        total = np.bincount(u, weights=v, minlength=n)
        if aggregation == "mean":
            total = total / np.maximum(count, 1)
    elif aggregation == "max":
        total = np.full(n, -np.inf)
        np.maximum.at(total, u, v)
    elif aggregation == "prod":
        total = np.ones(n)
        np.multiply.at(total, u, v)
    else:  # median / first: per-unit lists, sorted by unit then by value / member order
        total = np.zeros(n)
        key = v if aggregation == "median" else mi
        order = np.lexsort((key, u))
        us_, vs_ = u[order], v[order]
        starts = np.searchsorted(us_, np.arange(n))
        has = count > 0
        if aggregation == "first":
            total[has] = vs_[starts[has]]
        else:
            lo = starts + (count - 1) // 2
            hi = starts + count // 2
            total[has] = 0.5 * (vs_[lo[has]] + vs_[hi[has]])
    scores = dict(zip(roots.tolist(), np.where(count > 0, total, 0.0).tolist()))
    missing = roots[count == 0]
    prunable = {int(r) for g in analysis.groups for r, f in zip(g.units, g.frozen) if not f}
    missing = [int(r) for r in missing if int(r) in prunable]
    if missing:
        fallback = aggregate(analysis, l2_members(inputs or ScoreInputs(analysis)), "sum")
        groups = sorted({analysis.groups[analysis.unit_group[r]].name for r in missing})
        for r in missing:
            scores[r] = fallback[r]
        if inputs is not None:
            inputs.notes.append(f"{name or 'criterion'}: no member scored in {len(groups)} group(s) "
                                f"({', '.join(groups[:3])}{', ...' if len(groups) > 3 else ''}); "
                                "they use the l2 magnitude")
    return scores


def normalize_scores(analysis: Analysis, scores: dict, normalization: str) -> dict:
    """Per-group normalization: sum/mean/max divide, standardize rescales to [0, 1] (min-max), gaussian is
    the z-score."""
    if normalization == "none":
        return scores
    out = dict(scores)
    for g in analysis.groups:
        v = np.array([scores[int(u)] for u in g.units], dtype=np.float64)
        if normalization == "gaussian":
            v = (v - v.mean()) / (v.std() + 1e-12)
        elif normalization == "standardize":
            v = (v - v.min()) / (v.max() - v.min() + 1e-12)
        else:
            d = {"sum": v.sum(), "mean": v.mean(), "max": v.max()}[normalization]
            v = v / (d + 1e-12) if d > 0 else v
        out.update(zip((int(u) for u in g.units), v.tolist()))
    return out


# ---- weight-only criteria ---------------------------------------------------------------------------------------
def weight_members(analysis: Analysis, fn: Callable[[str, np.ndarray, ParamSlice], np.ndarray | None],
                   roles=("sink", "source", "member"), elementwise: bool = False) -> list[Member]:
    """Members from a per-element function of each float parameter (values summed over the non-sliced axes).
    Conv weights are reduced over the kernel once per function and weight (both channel axes read it).
    `elementwise`: fn maps each element on its own (l1, l2), so a matrix is reduced in blocks of rows and no
    temporary as large as the weight is made (a 2 GB Llama MLP weight would be allocated, faulted in, dropped)."""
    members, reduced = [], {}
    for ps in analysis.ctx.params:
        if ps.role not in roles:
            continue
        name = ps.node.input[ps.input_index]
        w = quant.float_value(analysis.ctx.g, ps.node, ps.input_index)  # quantized weights: dequantized
        if w is None or w.dtype.kind != "f" or w.ndim == 0:
            continue
        if w.ndim >= 3 and ps.axis < 2:
            if name not in reduced:
                e = fn(name, w, ps)
                reduced[name] = None if e is None else e.reshape(w.shape[0], w.shape[1], -1).sum(axis=2, dtype=np.float64)
            if reduced[name] is None:
                continue
            per_pos = reduced[name].sum(axis=1 - ps.axis)
        elif elementwise and w.ndim == 2:
            per_pos = _blockwise_sums(fn, name, w, ps)
        else:
            e = fn(name, w, ps)
            if e is None:
                continue
            other = tuple(a for a in range(w.ndim) if a != ps.axis)
            per_pos = e.sum(axis=other, dtype=np.float64) if other else e.astype(np.float64)
        members.append(Member(ps, per_pos))
        release(w)  # a mapped weight's pages: one at a time in memory
    return members


BLOCK_BYTES = 4 << 20  # rows per block of an elementwise reduction: reused heap memory, not a fresh mapping


def _blockwise_sums(fn, name: str, w: np.ndarray, ps: ParamSlice) -> np.ndarray:
    """fn(w) summed over the axis that is not ps.axis, in blocks of rows."""
    rows = max(1, BLOCK_BYTES // max(w.shape[1] * w.itemsize, 1))
    parts = [fn(name, w[i:i + rows], ps).sum(axis=1 - ps.axis, dtype=np.float64) for i in range(0, w.shape[0], rows)]
    return np.concatenate(parts) if ps.axis == 0 else np.sum(parts, axis=0)


def l1_members(inputs: ScoreInputs) -> list[Member]:
    return weight_members(inputs.analysis, lambda n, w, ps: np.abs(w), elementwise=True)


def l2_members(inputs: ScoreInputs) -> list[Member]:
    members = weight_members(inputs.analysis, lambda n, w, ps: np.square(w), elementwise=True)
    for m in members:
        m.root = 2
    return members


def random_scores(inputs: ScoreInputs) -> dict[int, float]:
    rng = np.random.default_rng(inputs.seed)
    return {u: float(rng.random()) for u in sorted(inputs.analysis.unit_group)}


def bn_scale_members(inputs: ScoreInputs) -> list[Member]:
    """|gamma| of BatchNormalization scale slices. Exporters that fold BN into the convolutions (torch's do by
    default) leave nothing to read: say so and name the criteria that work on such a file."""
    analysis = inputs.analysis
    members = []
    for ps in analysis.ctx.params:
        if ps.node.op_type == "BatchNormalization" and ps.input_index == 1:
            w = analysis.ctx.g.const(ps.node.input[1])
            if w is not None:
                members.append(Member(ps, np.abs(w.astype(np.float64))))
    if not members:
        raise SpaError("importance 'bn-scale' needs BatchNormalization nodes, and this model has none on a "
                       "prunable channel (the exporter folded BN into the convolutions); use l1, l2, lamp, "
                       "fpgm, taylor, obs or obspa instead")
    return members


def lamp_scores(inputs: ScoreInputs) -> dict[int, float]:
    """LAMP at channel level: a unit's squared L2 magnitude divided by the sum of the squared magnitudes of the
    units of its group that are not smaller (so the weakest unit of every group scores lowest relative to what
    remains, making groups comparable)."""
    analysis = inputs.analysis
    sq = aggregate(analysis, weight_members(analysis, lambda n, w, ps: np.square(w, dtype=np.float64),
                                                   elementwise=True), "sum", inputs, "lamp")
    out = {}
    for g in analysis.groups:
        v = np.array([sq[int(u)] for u in g.units])
        order = np.argsort(v, kind="stable")
        tail = np.cumsum(v[order][::-1])[::-1]  # sum of the values from this rank upwards
        lamp = np.empty_like(v)
        lamp[order] = v[order] / np.maximum(tail, 1e-300)
        out.update(zip((int(u) for u in g.units), lamp.tolist()))
    return out


def fpgm_members(inputs: ScoreInputs) -> list[Member]:
    """FPGM: a filter close to the layer's geometric median is replaceable by the others. Scored on producer
    rows (each filter's summed Euclidean distance to every filter of the same weight)."""
    analysis = inputs.analysis
    members = []
    for ps in analysis.ctx.params:
        if ps.role != "source":
            continue
        w = quant.float_value(analysis.ctx.g, ps.node, ps.input_index)
        if w is None or w.dtype.kind != "f" or w.ndim < 2:
            continue
        f = np.moveaxis(w.astype(np.float32), ps.axis, 0).reshape(w.shape[ps.axis], -1)
        sq = np.einsum("ij,ij->i", f, f).astype(np.float64)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (f @ f.T).astype(np.float64), 0.0)
        members.append(Member(ps, np.sqrt(d2).sum(axis=1)))
    return members
