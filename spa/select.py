"""Scoring and selection: which units of which coupled groups to remove.

Small interface on purpose: an importance function maps an Analysis to one score per unit (root atom); a
selector turns scores plus a budget into a PruningPlan. Later criteria (Taylor, OBS, ...) and RL policies plug
in at these two points.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import SpaError
from .groups import Analysis

AGGREGATIONS = ("sum", "mean", "max")
NORMALIZATIONS = ("none", "sum", "mean", "max", "standardize")


# ---- importance ----------------------------------------------------------------------------------------------
def magnitude_importance(an: Analysis, p: int = 2, aggregation: str = "sum", normalization: str = "mean") -> dict:
    """L1 (p=1) or L2 (p=2) norm of every parameter slice a unit owns (producer rows, biases, norm affine and
    statistics, consumer columns), aggregated over the group's members and normalized per group."""
    if aggregation not in AGGREGATIONS:
        raise SpaError(f"unknown aggregation '{aggregation}' (choose from {', '.join(AGGREGATIONS)})")
    if normalization not in NORMALIZATIONS:
        raise SpaError(f"unknown normalization '{normalization}' (choose from {', '.join(NORMALIZATIONS)})")
    roots = np.array(sorted(an.unit_group), dtype=np.int64)
    total = np.zeros(len(roots))
    count = np.zeros(len(roots))
    reduced: dict[str, np.ndarray] = {}
    for ps in an.ctx.params:
        if ps.role == "stat":
            continue
        name = ps.node.input[ps.input_index]
        w = an.ctx.g.const(name)
        if w is None or w.dtype.kind != "f" or w.ndim == 0:
            continue
        if w.ndim >= 3 and ps.axis < 2:  # conv weights: |w|^p over the kernel once, both channel axes read it
            if name not in reduced:
                reduced[name] = _kernel_power_sum(w, p)
            per_pos = reduced[name].sum(axis=1 - ps.axis)
        else:
            wf = np.abs(w.astype(np.float64)) if p == 1 else np.square(w.astype(np.float64))
            other = tuple(a for a in range(w.ndim) if a != ps.axis)
            per_pos = wf.sum(axis=other) if other else wf
        r = an.find(ps.atoms)
        ok = r >= 0
        idx = np.searchsorted(roots, r[ok])
        per_unit = np.bincount(idx, weights=per_pos[ok], minlength=len(roots))
        if p == 2:
            per_unit = np.sqrt(per_unit)
        touched = np.bincount(idx, minlength=len(roots)) > 0
        if aggregation == "max":
            total = np.maximum(total, per_unit)
        else:
            total += per_unit
        count += touched
    if aggregation == "mean":
        total = total / np.maximum(count, 1)
    scores = dict(zip(roots.tolist(), total.tolist()))
    return normalize_scores(an, scores, normalization)


def _kernel_power_sum(w: np.ndarray, p: int) -> np.ndarray:
    """(out, in) matrix of |w|^p summed over a conv weight's kernel dims, in float64."""
    w3 = w.astype(np.float32, copy=False).reshape(w.shape[0], w.shape[1], -1)
    if p == 2:
        return np.einsum("abk,abk->ab", w3, w3).astype(np.float64)  # no squared temporary
    return np.abs(w3).sum(axis=2, dtype=np.float64)


def random_importance(an: Analysis, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {u: float(rng.random()) for u in sorted(an.unit_group)}


def normalize_scores(an: Analysis, scores: dict, normalization: str) -> dict:
    if normalization == "none":
        return scores
    out = dict(scores)
    for g in an.groups:
        v = np.array([scores[int(u)] for u in g.units])
        if normalization == "standardize":
            v = (v - v.mean()) / (v.std() + 1e-12)
        else:
            d = {"sum": v.sum(), "mean": v.mean(), "max": v.max()}[normalization]
            v = v / (d + 1e-12)
        out.update(zip((int(u) for u in g.units), v.tolist()))
    return out


IMPORTANCE = {
    "l1": lambda an, agg, norm: magnitude_importance(an, 1, agg, norm),
    "l2": lambda an, agg, norm: magnitude_importance(an, 2, agg, norm),
    "random": lambda an, agg, norm: random_importance(an),
}


def score(an: Analysis, importance: str = "l2", aggregation: str = "sum", normalization: str = "mean") -> dict:
    fn = IMPORTANCE.get(importance)
    if fn is None:
        raise SpaError(f"unknown importance '{importance}' (choose from {', '.join(IMPORTANCE)})")
    return fn(an, aggregation, normalization)


# ---- the plan --------------------------------------------------------------------------------------------------
@dataclass
class PruningPlan:
    """Units to remove per group, by index into the group's sorted unit list (stable across runs)."""

    removed: dict[int, list[int]] = field(default_factory=dict)
    given_back: dict[int, int] = field(default_factory=dict)  # units restored so that no tensor empties

    def roots(self, an: Analysis) -> set[int]:
        out = set()
        for gid, idx in self.removed.items():
            out.update(int(an.groups[gid].units[i]) for i in idx)
        return out

    def to_json(self, an: Analysis) -> dict:
        return {"format": "spa-prune-plan/1", "groups": [
            {"id": gid, "name": an.groups[gid].name, "units": an.groups[gid].size, "removed": sorted(idx)}
            for gid, idx in sorted(self.removed.items()) if idx]}

    @classmethod
    def from_json(cls, data: dict, an: Analysis) -> "PruningPlan":
        if data.get("format") != "spa-prune-plan/1":
            raise SpaError("plan file is not a spa-prune plan (format spa-prune-plan/1)")
        removed = {}
        for entry in data.get("groups", []):
            gid = int(entry["id"])
            if gid >= len(an.groups) or an.groups[gid].name != entry["name"] or an.groups[gid].size != entry["units"]:
                raise SpaError(f"plan does not match this model: group {gid} '{entry.get('name')}' differs")
            g = an.groups[gid]
            idx = sorted(int(i) for i in entry["removed"])
            if any(i < 0 or i >= g.size or g.frozen[i] for i in idx):
                raise SpaError(f"plan removes a frozen or missing unit of group {gid} '{g.name}'")
            removed[gid] = idx
        plan = cls(removed)
        for gid, idx in removed.items():
            if len(idx) >= an.groups[gid].size:
                raise SpaError(f"plan removes every unit of group {gid} '{an.groups[gid].name}'")
        if an.emptied_tensors(plan.roots(an)):
            raise SpaError("plan removes every channel of a tensor (e.g. a concat or split piece)")
        return plan

    def save(self, path, an: Analysis) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(an), f, indent=1)


# ---- selection -------------------------------------------------------------------------------------------------
def protected_units(an: Analysis, patterns: list[str]) -> set[int]:
    """Units touching a node or initializer whose name matches one of the --exclude patterns."""
    if not patterns:
        return set()

    def hit(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    out: set[int] = set()
    for ps in an.ctx.params:
        if hit(ps.node.name) or hit(ps.node.input[ps.input_index]):
            out.update(int(r) for r in np.unique(an.find(ps.atoms)) if r >= 0)
    for s in an.ctx.sources:
        if hit(s.node) or hit(s.weight):
            out.update(int(r) for r in np.unique(an.find(s.atoms)))
    return out


def _kept_count(n: int, n_fixed: int, want_kept: int, min_channels: int, round_to: int) -> int:
    kept = max(want_kept, min(min_channels, n), n_fixed, 1)
    if round_to > 1:  # round up: both the minimum and the multiple hold (capped at the full width)
        kept = min(n, int(math.ceil(kept / round_to) * round_to))
    return kept


def select(an: Analysis, scores: dict, *, ratio: float | None = None, target_flops: float | None = None,
           min_channels: int = 1, round_to: int = 1, exclude: list[str] | None = None,
           max_ratio: float = 1.0) -> PruningPlan:
    if (ratio is None) == (target_flops is None):
        raise SpaError("give exactly one of --ratio and --target-flops")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise SpaError(f"--ratio must be in [0, 1), got {ratio}")
    if target_flops is not None and not 0.0 < target_flops <= 1.0:
        raise SpaError(f"--target-flops must be in (0, 1], got {target_flops}")
    if not 0.0 < max_ratio <= 1.0:
        raise SpaError(f"--max-ratio must be in (0, 1], got {max_ratio}")
    if min_channels < 1 or round_to < 1:
        raise SpaError("--min-channels and --round-to must be >= 1")
    protect = protected_units(an, exclude or [])
    fixed = {g.id: np.array([bool(f) or int(u) in protect for u, f in zip(g.units, g.frozen)]) for g in an.groups}
    order = {g.id: sorted((i for i in range(g.size) if not fixed[g.id][i]), key=lambda i: scores[int(g.units[i])])
             for g in an.groups}

    def plan_for(counts: dict[int, int]) -> PruningPlan:
        removed = {}
        for g in an.groups:
            # --max-ratio: a budget search may not empty a group below (1 - R) of its units
            want = g.size - min(counts.get(g.id, 0), int(math.floor(max_ratio * g.size)))
            kept = _kept_count(g.size, int(fixed[g.id].sum()), want, min_channels, round_to)
            k = g.size - kept
            if k > 0:
                removed[g.id] = sorted(order[g.id][:k])
        return PruningPlan(removed)

    if ratio is not None:
        return keep_every_tensor(an, plan_for({g.id: int(math.floor(ratio * g.size + 0.5)) for g in an.groups}),
                                 scores)
    return _budget(an, scores, order, plan_for, target_flops)  # its plans are already give-back checked


def _budget(an, scores, order, plan_for, target) -> PruningPlan:
    """Global ranking by importance per MAC; the largest prefix that meets the MAC budget (binary search)."""
    ranked = []
    for g in an.groups:
        for i in order[g.id]:
            u = int(g.units[i])
            ranked.append((scores[u] / max(an.unit_macs.get(u, 0.0), 1e-9), g.id))
    ranked.sort()
    goal = target * an.total_macs

    def plan_at(t: int) -> PruningPlan:
        counts: dict[int, int] = {}
        for _, gid in ranked[:t]:
            counts[gid] = counts.get(gid, 0) + 1
        return keep_every_tensor(an, plan_for(counts), scores)  # measured as it will be applied

    lo, hi = 0, len(ranked)
    if an.macs_after(plan_at(hi).roots(an)) > goal:
        return plan_at(hi)  # the budget cannot be met: prune as far as the constraints allow
    while lo < hi:
        mid = (lo + hi) // 2
        if an.macs_after(plan_at(mid).roots(an)) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return plan_at(lo)


def keep_every_tensor(an: Analysis, plan: PruningPlan, scores: dict) -> PruningPlan:
    """No tensor may lose all its positions (a Split piece, a Concat operand): give back its best unit."""
    removed = plan.roots(an)
    given_back: dict[int, int] = {}
    while removed:
        emptied = an.emptied_tensors(removed)
        if not emptied:
            break
        best = max(emptied[0].tolist(), key=lambda u: scores[u])
        removed.discard(best)
        gid = an.unit_group[best]
        given_back[gid] = given_back.get(gid, 0) + 1
    out: dict[int, list[int]] = {}
    for g in an.groups:
        idx = [i for i, u in enumerate(g.units) if int(u) in removed]
        if idx:
            out[g.id] = idx
    return PruningPlan(out, given_back)
