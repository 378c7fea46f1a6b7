"""Scoring and selection: which units of which coupled groups to remove.

Small interface on purpose: an importance criterion (spa.importance) maps an Analysis to one score per unit
(root atom); a selector turns scores plus a budget into a PruningPlan. RL policies plug in at the same point.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import SpaError
from .groups import Analysis


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
    def from_json(cls, data: dict, an: Analysis) -> PruningPlan:
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
           max_ratio: float = 1.0, allocation: str = "global") -> PruningPlan:
    """allocation (with target_flops): 'global' ranks every unit by importance per MAC across groups;
    'uniform' removes the same fraction of every group (the smallest fraction that meets the budget, found by
    bisection) and uses the importance only inside each group."""
    if (ratio is None) == (target_flops is None):
        raise SpaError("give exactly one of --ratio and --target-flops")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise SpaError(f"--ratio must be in [0, 1), got {ratio}")
    if target_flops is not None and not 0.0 < target_flops <= 1.0:
        raise SpaError(f"--target-flops must be in (0, 1], got {target_flops}")
    if not 0.0 < max_ratio <= 1.0:
        raise SpaError(f"--max-ratio must be in (0, 1], got {max_ratio}")
    if allocation not in ("global", "uniform"):
        raise SpaError(f"unknown allocation '{allocation}' (choose from global, uniform)")
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
            want = g.size - min(counts.get(g.id, 0), math.floor(max_ratio * g.size))
            kept = _kept_count(g.size, int(fixed[g.id].sum()), want, min_channels, round_to)
            k = g.size - kept
            if k > 0:
                removed[g.id] = sorted(order[g.id][:k])
        return PruningPlan(removed)

    def uniform(r: float) -> PruningPlan:
        return keep_every_tensor(an, plan_for({g.id: math.floor(r * g.size + 0.5) for g in an.groups}), scores)

    if ratio is not None:
        return uniform(ratio)
    if allocation == "uniform":
        goal = target_flops * an.total_macs
        lo, hi = 0.0, 1.0
        if an.macs_after(uniform(hi).roots(an)) > goal:
            return uniform(hi)  # the budget cannot be met: prune as far as the constraints allow
        for _ in range(40):
            mid = (lo + hi) / 2
            if an.macs_after(uniform(mid).roots(an)) <= goal:
                hi = mid
            else:
                lo = mid
        return uniform(hi)
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
