"""Scoring and selection: which units of which coupled groups to remove.

Small interface on purpose: an importance criterion (spa.importance) maps an Analysis to one score per unit
(root atom); a selector turns scores plus a budget into a PruningPlan. RL policies plug in at the same point.
"""
from __future__ import annotations

import fnmatch
import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spa.passes.apply import param_cuts

from .errors import SpaError
from .fileio import atomic_write_text
from .groups import Analysis
from .options import MEASURED_ALLOCATION, ROUND_AUTO, check_selection

# ---- the plan --------------------------------------------------------------------------------------------------
PLAN_FORMAT = "spa-prune-plan/1"


@dataclass
class PruningPlan:
    """Units to remove per group, by index into the group's sorted unit list (stable across runs).

    The JSON form (format spa-prune-plan/1):

        {"format": "spa-prune-plan/1",
         "groups": [{"id": 3, "name": "conv1 (+2)", "units": 64, "removed": [0, 5, ...]}, ...],
         "tensors": {"layer1.0.conv1.weight": {"shape": [64, 64, 3, 3], "keep": {"0": [1, 2, ...]},
                                               "groups": {"0": [3]}}, ...}}

    "groups" is what re-applying a plan reads. "tensors" (written since the torch bridge, optional on input)
    lists every initializer of the normalized model that the plan cuts: its original shape, the kept indices
    per cut axis and the groups that cut each axis. It is derived from "groups" by the same slices Apply cuts
    (passes.apply.param_cuts), so code outside spa (spa.torch_plan.apply_plan_to_module) can cut the
    matching framework parameters without re-running the analysis. An initializer that uses cut differently
    (a shared weight) has "uses": [{"node", "input", "keep"}] instead of "keep".
    """

    removed: dict[int, list[int]] = field(default_factory=dict)
    given_back: dict[int, int] = field(default_factory=dict)  # units restored so that no tensor empties

    def roots(self, analysis: Analysis) -> set[int]:
        out = set()
        for gid, idx in self.removed.items():
            out.update(np.asarray(analysis.groups[gid].units)[np.asarray(idx, dtype=np.int64)].tolist())
        return out

    def same_cut(self, other: PruningPlan) -> bool:
        """Whether both plans remove exactly the same units."""
        def cut(plan):
            return {gid: sorted(idx) for gid, idx in plan.removed.items() if len(idx)}
        return cut(self) == cut(other)

    def to_json(self, analysis: Analysis, tensors: bool = True) -> dict:
        """The plan as JSON data. With `tensors`, call it before Apply runs (Apply rewrites the initializers)."""
        data = {"format": PLAN_FORMAT, "groups": [
            {"id": gid, "name": analysis.groups[gid].name, "units": analysis.groups[gid].size, "removed": sorted(idx)}
            for gid, idx in sorted(self.removed.items()) if idx]}
        if tensors:
            data["tensors"] = tensor_section(analysis, self.roots(analysis))
        return data

    @classmethod
    def from_json(cls, data: dict, analysis: Analysis) -> PruningPlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise SpaError(f"plan file is not a spa-prune plan (format {PLAN_FORMAT})")
        removed = {}
        try:
            for entry in data.get("groups", []):
                gid = int(entry["id"])
                if gid < 0 or gid >= len(analysis.groups) or analysis.groups[gid].name != entry["name"] \
                        or analysis.groups[gid].size != entry["units"]:
                    raise SpaError(f"plan does not match this model: group {gid} '{entry.get('name')}' differs")
                g = analysis.groups[gid]
                idx = sorted(int(i) for i in entry["removed"])
                if any(i < 0 or i >= g.size or g.frozen[i] for i in idx):
                    raise SpaError(f"plan removes a frozen or missing unit of group {gid} '{g.name}'")
                removed[gid] = idx
        except (KeyError, TypeError, ValueError) as e:
            raise SpaError(f"malformed plan file: group entry {e!r}")
        plan = cls(removed)
        for gid, idx in removed.items():
            if len(idx) >= analysis.groups[gid].size:
                raise SpaError(f"plan removes every unit of group {gid} '{analysis.groups[gid].name}'")
        if analysis.emptied_tensors(plan.roots(analysis)):
            raise SpaError("plan removes every channel of a tensor (e.g. a concat or split piece)")
        if "tensors" in data and data["tensors"] != tensor_section(analysis, plan.roots(analysis)):
            raise SpaError("plan does not match this model: its per-tensor section differs from the cuts its groups "
                           "give here (a different export of the model?)")
        return plan

    def save(self, path, analysis: Analysis) -> None:
        """Write the plan (call before Apply runs; see to_json)."""
        write_plan(self.to_json(analysis), path)


def read_plan(path, analysis: Analysis) -> PruningPlan:
    """A plan written by --save-plan, checked against this model's analysis."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SpaError(f"cannot read plan {path}: {e}")
    return PruningPlan.from_json(data, analysis)


def write_plan(data: dict, path) -> None:
    """Write plan JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=1))


def tensor_section(analysis: Analysis, removed_roots: set[int]) -> dict:
    """initializer name -> {"shape", "keep": {axis: kept indices}, "groups": {axis: group ids}} for every
    initializer the removal cuts, from the rules' parameter slices (passes.apply.param_cuts). JSON-ready (axis keys are strings)."""
    g = analysis.ctx.g
    rm = np.asarray(sorted(removed_roots), dtype=np.int64)
    cutters: dict[str, dict[int, set[int]]] = {}
    for ps in analysis.ctx.params:
        roots = analysis.find(ps.atoms)
        hit = np.unique(roots[np.isin(roots, rm)])
        if len(hit):
            cutters.setdefault(ps.node.input[ps.input_index], {}).setdefault(ps.axis, set()).update(
                analysis.unit_group[int(r)] for r in hit)
    out = {}
    for name, entries in param_cuts(analysis, removed_roots).items():
        if all(m.all() for _, _, sl in entries for _, m in sl):
            continue
        shape = list(g.const_info(name)[0])
        for _, _, sl in entries:
            for axis, m in sl:
                if shape[axis] != len(m):
                    raise RuntimeError(f"plan tensors: '{name}' axis {axis} has {shape[axis]} positions but its "
                                       f"labelling {len(m)}; compute the plan JSON before Apply runs")

        def kept(sl):
            return {str(axis): np.flatnonzero(m).tolist() for axis, m in sl if not m.all()}

        signatures = {tuple((a, m.tobytes()) for a, m in sl) for _, _, sl in entries}
        entry = {"shape": shape}
        if len(signatures) == 1 and len(g.consumers.get(name, [])) == len(entries):
            entry["keep"] = kept(entries[0][2])
        else:
            entry["uses"] = [{"node": node.name, "input": idx, "keep": kept(sl)} for node, idx, sl in entries]
        entry["groups"] = {str(axis): sorted(gids) for axis, gids in sorted(cutters.get(name, {}).items())}
        out[name] = entry
    return out


# ---- selection -------------------------------------------------------------------------------------------------
def protected_units(analysis: Analysis, patterns: list[str]) -> set[int]:
    """Units touching a node or initializer whose name matches one of the --exclude patterns."""
    if not patterns:
        return set()

    def hit(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    out: set[int] = set()
    for ps in analysis.ctx.params:
        if hit(ps.node.name) or hit(ps.node.input[ps.input_index]):
            out.update(int(r) for r in np.unique(analysis.find(ps.atoms)) if r >= 0)
    for s in analysis.ctx.sources:
        if hit(s.node) or hit(s.weight):
            out.update(int(r) for r in np.unique(analysis.find(s.atoms)))
    return out


def _kept_count(n: int, n_fixed: int, want_kept: int, min_channels: int, round_to: int, up: bool = True) -> int:
    lower = max(min(min_channels, n), n_fixed, 1)
    kept = max(want_kept, lower)
    if round_to > 1 and kept < n:  # a multiple of round_to (or the full width) that respects the minimum
        if up:
            kept = min(n, int(math.ceil(kept / round_to) * round_to))
        else:
            kept = min(n, max(kept // round_to * round_to, int(math.ceil(lower / round_to) * round_to)))
    return kept


def constrained_kept(n: int, n_fixed: int, removed: int, *, min_channels: int = 1, round_to: int = 1,
                     max_ratio: float = 1.0, up: bool = True) -> int:
    """Units a group of n (n_fixed of them frozen or protected) keeps when `removed` are asked for, after
    --max-ratio (remove at most floor(R*n)), --min-channels and --round-to (the multiple above, or with
    up=False the one below, never under the minimum)."""
    return _kept_count(n, n_fixed, n - min(removed, math.floor(max_ratio * n)), min_channels, round_to, up)


# ---- --round-to auto: widths that suit the kernels -------------------------------------------------------------
KERNEL_BLOCK = 16   # onnxruntime's NCHWc block on AVX-512 (8 on AVX2, 4 on NEON: 16 is a multiple of each)
CHANNEL_ALIGN = 4   # a convolution whose channel count is not a multiple of 4 leaves the NCHWc layout
STEPS_PER_GROUP = 8  # a group is rounded to a multiple m only when it is at least this many m wide


def unit_channels(analysis: Analysis) -> dict[int, int]:
    """Per group: the channels one unit spans in the producers' outputs (1 for a channel; head_dim for an
    attention head; the group width for a conv group)."""
    width: dict[int, int] = {}
    for s in analysis.ctx.sources:
        roots, counts = np.unique(analysis.find(s.atoms), return_counts=True)
        for r, c in zip(roots.tolist(), counts.tolist()):
            gid = analysis.unit_group.get(r)
            if gid is not None and c > width.get(gid, 1):
                width[gid] = c
    return width


def kernel_steps(analysis: Analysis) -> dict[int, int]:
    """--round-to auto: per group, the multiple its kept units are rounded to. onnxruntime's CPU convolutions
    run in a blocked layout (NCHWc) that pads output channels to the block and runs a convolution whose
    channel count is not a multiple of 4, and pools whose count is not a multiple of the block, in plain NCHW
    with layout conversions around them (measured on ResNet-50: BENCHMARKS.md, "Real speed of the default
    plan"). So channel units go by KERNEL_BLOCK in groups at least STEPS_PER_GROUP blocks wide (128), by
    CHANNEL_ALIGN in groups at least 32 wide; narrower groups are not rounded (a step of a quarter of a
    16-wide group cost accuracy on resnet20), nor are units that span several channels (attention heads,
    conv groups). A step is at most an eighth of the group."""
    width = unit_channels(analysis)
    steps = {}
    for g in analysis.groups:
        steps[g.id] = 1
        if width.get(g.id, 1) == 1:
            steps[g.id] = next((m for m in (KERNEL_BLOCK, CHANNEL_ALIGN) if g.size >= STEPS_PER_GROUP * m), 1)
    return steps


def group_steps(analysis: Analysis, round_to) -> dict[int, int]:
    """round_to as a multiple per group: an int N for every group, or kernel_steps for ROUND_AUTO."""
    if round_to == ROUND_AUTO:
        return kernel_steps(analysis)
    return {g.id: int(round_to) for g in analysis.groups}


def removal_order(analysis: Analysis, scores: dict, exclude: list[str] | None = None) -> tuple[dict, dict]:
    """Per group: a bool mask of units that may not be removed (frozen, or protected by --exclude) and the
    other units' indices sorted by ascending score (the order in which they are removed)."""
    protect = protected_units(analysis, exclude or [])
    fixed = {g.id: np.array([bool(f) or int(u) in protect for u, f in zip(g.units, g.frozen)]) for g in analysis.groups}
    order = {g.id: sorted((i for i in range(g.size) if not fixed[g.id][i]), key=lambda i: scores[int(g.units[i])])
             for g in analysis.groups}
    return fixed, order


def plan_from_counts(analysis: Analysis, fixed: dict, order: dict, removed: dict[int, int], *, min_channels: int = 1,
                     round_to: int | dict[int, int] = 1, max_ratio: float = 1.0, up: bool = True) -> PruningPlan:
    """Remove removed[g] units of every group g (after the constraints of `constrained_kept`; round_to an int
    for every group or a multiple per group id), lowest-ranked first. No tensor-emptying check: wrap in
    keep_every_tensor."""
    plan = {}
    for g in analysis.groups:
        step = round_to.get(g.id, 1) if isinstance(round_to, dict) else round_to
        kept = constrained_kept(g.size, int(fixed[g.id].sum()), removed.get(g.id, 0), min_channels=min_channels,
                                round_to=step, max_ratio=max_ratio, up=up)
        if g.size - kept > 0:
            plan[g.id] = sorted(order[g.id][:g.size - kept])
    return PruningPlan(plan)


BAND = 0.05         # the banded allocation: each group removes within ±band of the uniform fraction r, where
BAND_OPENS = 0.4    # band = min(BAND, r - BAND_OPENS): none while the uniform cut takes at most 40 % of every group


def band_width(r_uniform: float) -> float:
    """The banded allocation's trust band at the uniform fraction r: closed (the uniform plan itself) while the
    uniform cut removes at most BAND_OPENS of every group, then opening with the cut up to ±BAND. Measured on the
    quality-benchmark CNNs, 3 seeds (BENCHMARKS.md, "Allocation", ninth session): with a fixed band the trade
    moved the plans at 30 and 50 % of the MACs removed (uniform fractions ~0.16 and ~0.3) by a unit or two per
    group and the accuracy by a few test images either way; at 70 % removed (~0.45) it gains 1.4-2.0 points
    data-free on two nets and loses 1.2 on the Conv1d net, so it is an option, not the default."""
    return min(BAND, max(0.0, r_uniform - BAND_OPENS))


def select(analysis: Analysis, scores: dict, *, ratio: float | None = None, target_flops: float | None = None,
           min_channels: int = 1, round_to: int | str = 1, exclude: list[str] | None = None,
           max_ratio: float = 1.0, allocation: str = "global") -> PruningPlan:
    """allocation (with target_flops): 'global' ranks every unit by importance per MAC across groups;
    'uniform' removes the same fraction of every group (the smallest fraction that meets the budget, found by
    bisection) and uses the importance only inside each group; 'banded' ranks by importance per MAC like
    'global', but every group stays within a band around the uniform fraction (band_width, _banded), and is the
    uniform allocation where the band is closed. 'auto' (the measured choice between those two, made by
    spa.driver after refitting both) gives its first candidate here, the uniform plan.
    round_to: kept units a multiple of N, or ROUND_AUTO: kernel_steps per group where a budget sets the widths
    (target_flops; a ratio is an exact count per group); when the kernel-friendly widths cannot meet the
    budget, the widths are not rounded."""
    check_selection(ratio=ratio, target_flops=target_flops, max_ratio=max_ratio, allocation=allocation,
                    min_channels=min_channels, round_to=round_to)
    if allocation == MEASURED_ALLOCATION:
        allocation = "uniform"
    if round_to == ROUND_AUTO and target_flops is None:
        round_to = 1
    steps = group_steps(analysis, round_to)
    plan = _select(analysis, scores, ratio, target_flops, min_channels, steps, exclude, max_ratio, allocation)
    if round_to == ROUND_AUTO and target_flops is not None \
            and analysis.macs_after(plan.roots(analysis)) > target_flops * analysis.total_macs:
        plan = _select(analysis, scores, ratio, target_flops, min_channels, group_steps(analysis, 1), exclude,
                       max_ratio, allocation)
    return plan


def _select(analysis, scores, ratio, target_flops, min_channels, steps, exclude, max_ratio, allocation):
    fixed, order = removal_order(analysis, scores, exclude)
    unrounded = {g.id: 1 for g in analysis.groups}

    def plan_for(counts: dict[int, int], up: bool = True, round_to: dict[int, int] = steps) -> PruningPlan:
        # --max-ratio: a budget search may not empty a group below (1 - R) of its units
        return plan_from_counts(analysis, fixed, order, counts, min_channels=min_channels, round_to=round_to,
                                max_ratio=max_ratio, up=up)

    def exact(r: float) -> dict[int, int]:  # --ratio: the same fraction of every group, to the nearest unit
        return {g.id: math.floor(r * g.size + 0.5) for g in analysis.groups}

    if ratio is not None:
        return keep_every_tensor(analysis, plan_for(exact(ratio)), scores)
    counts, lo, t_max = exact, 0.0, 1.0

    def uniform(r: float, up: bool = True, round_to: dict[int, int] = steps) -> PruningPlan:
        return keep_every_tensor(analysis, plan_for(counts(r), up, round_to), scores)

    if allocation in ("uniform", "banded"):
        goal = target_flops * analysis.total_macs

        def meets(r: float, up: bool = True, round_to: dict[int, int] = steps) -> bool:
            return analysis.macs_after(uniform(r, up, round_to).roots(analysis)) <= goal

        def fewest(up: bool = True) -> PruningPlan:
            # the budget cannot be met: the smallest uniform fraction that reaches the fewest MACs the constraints
            # allow; a group whose units count no MACs (in an If/Loop body that shape inference does not reach)
            # is not emptied for nothing
            def plain(r: float) -> PruningPlan:
                return keep_every_tensor(analysis, plan_for(exact(r), up), scores)
            floor = analysis.macs_after(plain(1.0).roots(analysis))
            return plain(smallest_fraction(lambda r: analysis.macs_after(plain(r).roots(analysis)) <= floor))

        if allocation == "banded":
            # the trust band is centred on the plain uniform fraction; closed (below), the plan is uniform's.
            # Models with coarse groups (attention heads) keep the uniform family, which spares those groups
            # (measured on trained transformers; the band was measured on CNNs only)
            if not meets(1.0):
                return fewest()
            hi = smallest_fraction(meets)
            band = band_width(hi)
            if band > 0 and not any(analysis.groups[gid].prunable for gid in coarse_groups(analysis)):
                return _banded(analysis, scores, order, plan_for, goal, hi, band, steps) or uniform(hi)
        # 'uniform': coarse groups spared first (uniform_family); the fraction bisected without rounding;
        # _round_within rounds each group down or up. Where the minimum width or --min-channels keep a group above
        # the multiple below, bisect the rounded widths
        counts, lo, t_max = uniform_family(analysis, lambda c: analysis.macs_after(keep_every_tensor(
            analysis, plan_for(c, round_to=unrounded), scores).roots(analysis)) <= goal)
        if not meets(t_max, up=False):
            return fewest(up=False)
        hi = smallest_fraction(lambda r: meets(r, round_to=unrounded), lo=lo, hi=t_max)
        if not meets(hi, up=False):
            hi = smallest_fraction(lambda r: meets(r, up=False), lo=hi, hi=t_max)
        return _round_within(analysis, scores, plan_for, counts(hi), steps, goal, hi)
    return _budget(analysis, scores, order, plan_for, target_flops)  # its plans are already give-back checked


def coarse_groups(analysis: Analysis) -> set[int]:
    """Groups of fewer than STEPS_PER_GROUP units (the heads of a layer, its KV-head units): one unit is more
    than an eighth of the group, so a uniform fraction lands on them in large steps (0.3 of 2 KV heads is 1)."""
    return {g.id for g in analysis.groups if g.size < STEPS_PER_GROUP}


SPARED_FINE_LIMIT = 0.8  # the share of every finer group a budget may take while the coarse groups are spared


def uniform_family(analysis: Analysis, feasible) -> tuple:
    """The uniform allocation under a budget as (counts(r): units removed per group, lo, hi): the bisection finds
    the smallest r in [lo, hi] that meets the budget. Coarse groups are spared while the finer groups meet it
    taking at most SPARED_FINE_LIMIT of their units each; otherwise the coarse groups lose the fewest units that
    make the budget reachable at that limit, and the finer groups' share is bisected again (so they get back
    what a coarse unit's large step over-delivered); past that, coarse groups at their minimum, the finer ones
    go on. Measured on the trained ViT and char LM (BENCHMARKS.md, "Coarse groups"): one of a layer's 4 heads
    or 2 KV-head units costs far more than the same MACs taken from the MLP, up to three quarters of it; the
    limit keeps any layer from being thinned to near nothing first. `feasible(counts)` says whether the
    unrounded plan of those counts meets the budget. Without coarse groups this is the plain uniform fraction."""
    def at(fine: float, coarse_share: float) -> dict[int, int]:
        return {g.id: math.floor((coarse_share if g.id in coarse else fine) * g.size + 0.5) for g in analysis.groups}

    coarse = coarse_groups(analysis)
    if not coarse or len(coarse) == len(analysis.groups):
        return (lambda r: at(r, r)), 0.0, 1.0
    limit = SPARED_FINE_LIMIT
    if feasible(at(limit, 0.0)):
        return (lambda r: at(r, 0.0)), 0.0, limit
    if feasible(at(limit, 1.0)):
        needed = smallest_fraction(lambda c: feasible(at(limit, c)))
        return (lambda r: at(r, needed)), 0.0, limit
    return (lambda r: at(r, 1.0)), limit, 1.0


def smallest_fraction(meets, lo: float = 0.0, hi: float = 1.0) -> float:
    """The smallest r in [lo, hi] (to 2**-40) with meets(r), for a meets that holds at hi and stays true as r
    grows: a bisection."""
    for _ in range(40):
        mid = (lo + hi) / 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _round_within(analysis, scores, plan_for, counts: dict[int, int], steps: dict[int, int],
                  goal: float, fraction: float) -> PruningPlan:
    """The uniform plan (`counts`, bisected without rounding at `fraction`) with every rounded group at the
    multiple below its width, then groups raised while the budget holds, those that rounding took the largest
    fraction of their width from first: a rounded group to the multiple above, a group of step 1 (not a
    coarse one) by one unit. Every group ends within one step of the uniform width, and the MACs just under
    the budget; rounding every group the same way and bisecting on that instead moves all groups of one width
    at once (ResNet-50 at 16: 0.478 of the MACs for a budget of 0.5, 0.646 for 0.7; the zoo's small GoogLeNet,
    whose two stem groups of 8 units cross from 3 to 4 removed at the same fraction: 0.422 for 0.5 without
    the one-unit step)."""
    below, above = plan_for(counts, up=False), plan_for(counts, up=True)
    kept_below = {g.id: g.size - len(below.removed.get(g.id, [])) for g in analysis.groups}
    raise_to = {g.id: g.size - len(above.removed.get(g.id, [])) for g in analysis.groups
                if steps.get(g.id, 1) > 1 and g.size - len(above.removed.get(g.id, [])) > kept_below[g.id]}
    coarse = coarse_groups(analysis)
    raise_to.update({g.id: kept_below[g.id] + 1 for g in analysis.groups
                     if steps.get(g.id, 1) == 1 and g.id not in coarse and counts[g.id] > 0
                     and len(below.removed.get(g.id, [])) == counts[g.id]})

    def lost(gid: int) -> float:  # the fraction of the group's width that rounding took off
        n = analysis.groups[gid].size
        return ((n - fraction * n) - kept_below[gid]) / n if steps.get(gid, 1) == 1 else \
            ((n - counts[gid]) - kept_below[gid]) / n

    counts = dict(counts)
    for gid in sorted(raise_to, key=lambda g: (-lost(g), g)):
        trial = {**counts, gid: analysis.groups[gid].size - raise_to[gid]}
        if analysis.macs_after(keep_every_tensor(analysis, plan_for(trial, up=False), scores).roots(analysis)) <= goal:
            counts = trial
    return keep_every_tensor(analysis, plan_for(counts, up=False), scores)


def _banded(analysis, scores, order, plan_for, goal, r_uniform, band, steps) -> PruningPlan | None:
    """The global ranking by importance per MAC inside a trust band around the uniform allocation r: group g
    removes between round((r - band) n) and round((r + band) n) of its n units, the ones below a common
    importance-per-MAC threshold (the lowest that meets the budget, by binary search). Units that cost many
    MACs go first, so more units stay for the same MACs, but no group is thinned far beyond the uniform
    fraction: per-group normalized scores cannot say that a layer may go (the unbounded ranking collapses
    layers at high compression); then units are given back while the budget holds (fill_budget). None when the
    widest band still misses the budget."""
    per_mac, bounds = {}, {}
    for g in analysis.groups:
        n_free = len(order[g.id])
        per_mac[g.id] = np.array([scores[int(g.units[i])] / max(analysis.unit_macs.get(int(g.units[i]), 0.0), 1e-9)
                                  for i in order[g.id]])
        bounds[g.id] = (min(math.floor(max(r_uniform - band, 0.0) * g.size + 0.5), n_free),
                        min(math.floor(min(r_uniform + band, 1.0) * g.size + 0.5), n_free))
    thresholds = np.unique(np.concatenate([-np.inf * np.ones(1), *per_mac.values()]))

    def counts_at(j: int) -> dict[int, int]:
        return {gid: int(np.clip(np.count_nonzero(v <= thresholds[j]), *bounds[gid])) for gid, v in per_mac.items()}

    def plan_at(j: int) -> PruningPlan:
        return keep_every_tensor(analysis, plan_for(counts_at(j)), scores)  # measured as it will be applied

    if analysis.macs_after(plan_at(len(thresholds) - 1).roots(analysis)) > goal:
        return None
    counts = counts_at(first_within(analysis, plan_at, len(thresholds) - 1, goal))
    return fill_budget(analysis, scores, plan_for, counts, per_mac, steps, goal)


def fill_budget(analysis, scores, plan_for, counts: dict[int, int], per_mac: dict, steps: dict[int, int],
                goal: float) -> PruningPlan:
    """Give units back while the budget holds, the most important per MAC first. A threshold over importance
    per MAC stops at the first plan within the budget, and its last step may be a wide one (a step of a
    residual-coupled group spans every layer of a stage: resnet56 at 0.5 of the MACs kept 0.486, with most
    groups at their band's edge), so the plan would be compared with others at fewer MACs than they use. The
    order is the ranking's own (a group the ranking thinned gets back last: giving back by the fraction removed
    instead undid the band's trade), equal values the group that lost the largest fraction first; a group may
    end up keeping more than its band (giving back thins no group). counts: units removed per group (the
    units in per_mac's order, ascending); a group that one step no longer fits is not tried again (its next
    step costs as much)."""
    counts = dict(counts)

    def step_of(gid: int) -> int:
        return min(steps.get(gid, 1), counts[gid])

    def key(gid: int) -> tuple:  # the mean importance per MAC of the units one step gives back
        value = float(np.mean(per_mac[gid][counts[gid] - step_of(gid):counts[gid]]))
        return -value, -counts[gid] / analysis.groups[gid].size, gid

    heap = [key(g) for g in counts if step_of(g) > 0]
    heapq.heapify(heap)
    while heap:
        gid = heapq.heappop(heap)[-1]
        trial = {**counts, gid: counts[gid] - step_of(gid)}
        if analysis.macs_after(keep_every_tensor(analysis, plan_for(trial), scores).roots(analysis)) <= goal:
            counts = trial
            if step_of(gid) > 0:
                heapq.heappush(heap, key(gid))
    return keep_every_tensor(analysis, plan_for(counts), scores)


def _budget(analysis, scores, order, plan_for, target) -> PruningPlan:
    """Global ranking by importance per MAC; the largest prefix that meets the MAC budget (binary search)."""
    ranked = []
    for g in analysis.groups:
        for i in order[g.id]:
            u = int(g.units[i])
            ranked.append((scores[u] / max(analysis.unit_macs.get(u, 0.0), 1e-9), g.id))
    ranked.sort()
    goal = target * analysis.total_macs

    def plan_at(t: int) -> PruningPlan:
        counts: dict[int, int] = {}
        for _, gid in ranked[:t]:
            counts[gid] = counts.get(gid, 0) + 1
        return keep_every_tensor(analysis, plan_for(counts), scores)  # measured as it will be applied

    floor = analysis.macs_after(plan_at(len(ranked)).roots(analysis))
    if floor > goal:  # the budget cannot be met: the shortest prefix that reaches the fewest MACs possible (units
        goal = floor  # that count no MACs rank last and stay)
    return plan_at(first_within(analysis, plan_at, len(ranked), goal))


def first_within(analysis: Analysis, plan_at, hi: int, goal: float) -> int:
    """The smallest j in [0, hi] whose plan_at(j) keeps at most `goal` MACs (plans remove more as j grows, and
    plan_at(hi) is within the goal): a binary search."""
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if analysis.macs_after(plan_at(mid).roots(analysis)) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return lo


def keep_every_tensor(analysis: Analysis, plan: PruningPlan, scores: dict) -> PruningPlan:
    """No tensor may lose all its positions (a Split piece, a Concat operand): give back its best unit."""
    removed = plan.roots(analysis)
    given_back: dict[int, int] = {}
    while removed:
        emptied = analysis.emptied_tensors(removed)
        if not emptied:
            break
        best = max(emptied[0].tolist(), key=lambda u: scores[u])
        removed.discard(best)
        gid = analysis.unit_group[best]
        given_back[gid] = given_back.get(gid, 0) + 1
    out: dict[int, list[int]] = {}
    mask = analysis.removed_mask(removed)
    for g in analysis.groups:
        idx = np.flatnonzero(mask[g.units]).tolist()
        if idx:
            out[g.id] = idx
    return PruningPlan(out, given_back)
