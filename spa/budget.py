"""Budgets and the action adapter: raw per-group preferences -> kept counts that meet the budget exactly.

A candidate of the search is a vector of **kept counts**, one per coupled group (`kept[g]` units of group g stay;
the lowest-ranked units by the importance criterion go, exactly as `spa.select` removes them). Everything a
policy proposes goes through `BudgetProjector.project`, so every candidate is feasible and sits as close under the
budget as the granularity allows:

1. desired keep ratios rho[g] in [0, 1] (from the policy's raw actions);
2. a common shift t moves every group along the same path, x_g(t) = n_g * sigmoid(logit(rho_g) + t) kept units
   (mode "logit"; mode "scale" uses x_g(t) = n_g * min(1, rho_g * e^t)); the desired count is round(x_g) and
   select's constraints (`--max-ratio`, `--min-channels`, `--round-to`, frozen and `--exclude`d units) turn it
   into a kept count. The largest t whose counts meet every budget is found by bisection;
3. a greedy fill then walks on along the same path: groups are offered their next allowed count in the order in
   which the path would reach it, and take it when the budget still holds, until no group can grow by one step.
   The result is maximal: no group can keep one more step of units without breaking a budget.

Budgets are fractions kept of the unpruned model: `flops` (MACs, DESIGN.md's one definition) and `params`
(float initializer elements and quantized weights' integers, `spa.loading.param_count`). Both are evaluated by `CostModel` from a removed-unit mask,
exactly: MACs are products of kept fractions of the labellings each Conv/Gemm/MatMul's cost scales with (the
same formula as `Analysis.macs_after`); a parameter tensor keeps the product of the kept fractions of its sliced
axes (the way `passes.apply.Apply` cuts it, including the per-use copies of a shared initializer cut differently).
The third kind, `latency`, is a prediction, not an exact count: the fraction kept of the measured end-to-end
latency, predicted from a measured cost table by `spa.latency.LatencyModel` over the same kept fractions (attached with
`CostModel.attach_latency`; see `spa.latency`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import SpaError
from .groups import Analysis
from .loading import is_parameter, param_count
from .select import (
    PruningPlan,
    constrained_kept,
    keep_every_tensor,
    plan_from_counts,
    removal_order,
)

BUDGET_KINDS = ("flops", "params", "latency")
MODES = ("logit", "scale")
_EPS = 1e-4          # desired ratios are clipped into [EPS, 1 - EPS] (logit mode)
_SPAN = 60.0         # shift range [-SPAN, SPAN]: far beyond any clipped logit


# ---- cost model ------------------------------------------------------------------------------------------------
class CostModel:
    """MACs and parameter count of the pruned model as a function of which units are removed.

    Units are indexed globally (`unit_roots`, sorted root atom ids; `unit_index(roots)` maps roots to indices).
    A *factor* is one labelling (an array of atoms): its kept fraction is the share of its positions whose unit
    stays. A *term* is weight x product of the kept fractions of its factors: one per MAC-carrying node, one per
    sliced parameter tensor; terms without factors are constants. Evaluation is vectorised over all factors.
    """

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.unit_roots = np.array(sorted(analysis.unit_group), dtype=np.int64)
        self.n_units = len(self.unit_roots)
        self._factor_ids: dict[bytes, int] = {}
        self._pos_unit: list[np.ndarray] = []
        self._pos_factor: list[np.ndarray] = []
        self._factor_len: list[int] = []
        self.macs_terms = self._macs_terms()
        self.params_total = param_count(analysis.ctx.g)
        self.params_terms, self._shared = self._params_terms()
        self.pos_unit = np.concatenate(self._pos_unit) if self._pos_unit else np.zeros(0, np.int64)
        self.pos_factor = np.concatenate(self._pos_factor) if self._pos_factor else np.zeros(0, np.int64)
        self.factor_len = np.asarray(self._factor_len, dtype=np.float64)
        self.factor_start = np.concatenate([[0], np.cumsum([len(p) for p in self._pos_unit])]).astype(np.int64)
        self.totals = {"flops": float(analysis.total_macs), "params": float(self.params_total)}
        self.latency = None  # a latency.LatencyModel once attached: costs() then predicts "latency" (ms) too

    def attach_latency(self, model) -> None:
        """Add the latency kind: `model.predict(kept fractions)` in ms, `model.full_ms` its unpruned value."""
        self.latency = model
        self.totals["latency"] = float(model.full_ms)

    def factor_id(self, atoms) -> int | None:
        """Index of the factor of this labelling (None when no MAC/parameter term uses it)."""
        return self._factor_ids.get(np.asarray(atoms, dtype=np.int64).tobytes())

    # ---- construction ----------------------------------------------------------------------------------------
    def unit_index(self, roots: np.ndarray) -> np.ndarray:
        """Global unit index of each root; -1 ("no atom") maps to n_units, a sentinel that is always kept."""
        roots = np.asarray(roots, dtype=np.int64)
        idx = np.searchsorted(self.unit_roots, np.maximum(roots, 0))
        return np.where(roots >= 0, idx, self.n_units)

    def _factor(self, atoms: np.ndarray) -> int:
        atoms = np.asarray(atoms, dtype=np.int64)
        key = atoms.tobytes()
        fid = self._factor_ids.get(key)
        if fid is None:
            fid = self._factor_ids[key] = len(self._factor_len)
            self._pos_unit.append(self.unit_index(self.analysis.find(atoms)))
            self._pos_factor.append(np.full(len(atoms), fid, dtype=np.int64))
            self._factor_len.append(max(len(atoms), 1))
        return fid

    def _terms(self, items) -> dict:
        const, weights, flat, starts = 0.0, [], [], []
        for w, factors in items:
            if not factors:
                const += w
                continue
            starts.append(len(flat))
            weights.append(w)
            flat.extend(self._factor(f) for f in factors)
        return {"const": const, "w": np.asarray(weights, dtype=np.float64), "flat": np.asarray(flat, np.int64),
                "starts": np.asarray(starts, np.int64)}

    def _macs_terms(self) -> dict:
        return self._terms((float(c.macs), list(c.factors)) for c in self.analysis.ctx.costs.values())

    def _params_terms(self):
        """One term per sliced parameter tensor (`is_parameter`); initializers shared by uses that cut them
        differently are kept aside and counted per plan the way Apply copies them. Unsliced ones are a constant."""
        g = self.analysis.ctx.g
        uses: dict[tuple[int, int], list] = {}
        nodes: dict[int, object] = {}
        for ps in self.analysis.ctx.params:
            uses.setdefault((id(ps.node), ps.input_index), []).append((ps.axis, ps.atoms))
            nodes[id(ps.node)] = ps.node
        by_name: dict[str, list] = {}
        for (nid, idx), sl in uses.items():
            by_name.setdefault(nodes[nid].input[idx], []).append(sorted(sl, key=lambda s: s[0]))
        items, shared, sliced = [], [], 0
        for name, entries in by_name.items():
            if not g.is_const(name):
                continue
            shape, _ = g.const_info(name)
            if not is_parameter(g, name):
                continue
            size = float(np.prod(shape))
            sliced += size
            all_uses = len(g.consumers.get(name, [])) == len(entries)
            same = all(len(e) == len(entries[0]) and all(a == b and np.array_equal(x, y)
                                                          for (a, x), (b, y) in zip(e, entries[0]))
                       for e in entries)
            if all_uses and same:  # one cut under every plan
                items.append((size, [atoms for _, atoms in entries[0]]))
            else:  # cut per use when the cuts differ (and the original stays while some use needs it)
                shared.append((size, all_uses, [[(self._factor(a), len(a)) for _, a in e] for e in entries]))
        items.append((float(self.params_total) - sliced, []))
        return self._terms(items), shared

    # ---- evaluation ------------------------------------------------------------------------------------------
    def kept_fractions(self, removed: np.ndarray) -> np.ndarray:
        """Kept fraction of every factor for a bool mask over units (True: removed)."""
        keep = np.append(~np.asarray(removed, dtype=bool), True)
        kept = np.bincount(self.pos_factor, weights=keep[self.pos_unit], minlength=len(self.factor_len))
        return kept / self.factor_len

    @staticmethod
    def _value(terms: dict, frac: np.ndarray) -> float:
        if not len(terms["w"]):
            return terms["const"]
        prod = np.multiply.reduceat(frac[terms["flat"]], terms["starts"])
        return float(terms["const"] + terms["w"] @ prod)

    def costs(self, removed: np.ndarray) -> dict[str, float]:
        """Absolute MACs ('flops') and parameters ('params') of the model with these units removed, and its
        predicted latency in ms ('latency') when a latency model is attached."""
        frac = self.kept_fractions(removed)
        params = self._value(self.params_terms, frac)
        for size, all_uses, entries in self._shared:
            sigs = [tuple(frac[f] for f, _ in e) for e in entries]
            cut = [any(s < 1.0 for s in sig) for sig in sigs]
            if all_uses and len(set(sigs)) == 1 and not self._masks_differ(entries, removed):
                params += size * float(np.prod(sigs[0]))
                continue
            params += sum(size * float(np.prod(s)) for s, c in zip(sigs, cut) if c)
            if not all_uses or not all(cut):
                params += size  # the original stays for the uses that do not cut it
        out = {"flops": self._value(self.macs_terms, frac), "params": params}
        if self.latency is not None:
            out["latency"] = self.latency.predict(frac)
        return out

    def fraction(self, kind: str, value: float) -> float:
        """An absolute cost as the fraction kept of the unpruned model (latency totals may be below 1 ms)."""
        total = self.totals[kind]
        return value / (total if kind == "latency" else max(total, 1.0))

    def _masks_differ(self, entries, removed) -> bool:
        """Whether uses of a shared tensor cut different positions (Apply then copies it per use)."""
        keep = np.append(~np.asarray(removed, dtype=bool), True)
        masks = set()
        for e in entries:
            masks.add(tuple(keep[self.pos_unit[self.factor_start[f]:self.factor_start[f + 1]]].tobytes()
                            for f, _ in e))
        return len(masks) > 1

    def removed_mask(self, analysis: Analysis, plan: PruningPlan) -> np.ndarray:
        removed = np.zeros(self.n_units, dtype=bool)
        roots = np.fromiter(plan.roots(analysis), dtype=np.int64)
        removed[self.unit_index(roots)] = True
        return removed


# ---- the projector ---------------------------------------------------------------------------------------------
def _check_budgets(budgets: dict) -> None:
    if not budgets:
        raise SpaError("a search needs a budget: target_flops, target_params and/or target_latency")
    for kind, f in budgets.items():
        if kind not in BUDGET_KINDS:
            raise SpaError(f"unknown budget '{kind}' (choose from {', '.join(BUDGET_KINDS)})")
        if not 0.0 < f <= 1.0:
            raise SpaError(f"target_{kind} must be in (0, 1], got {f}")


@dataclass
class Projection:
    """A feasible candidate: kept units per group (index = group id), the shift that produced it and its cost
    as fractions kept of the unpruned model. `feasible` is False only when the budget cannot be met at all
    (then `kept` is the smallest model the constraints allow)."""

    kept: np.ndarray
    shift: float
    costs: dict[str, float]
    feasible: bool = True
    fill_steps: int = 0


@dataclass
class BudgetProjector:
    """Maps desired keep ratios of the prunable groups to kept counts that meet `budgets` exactly.

    budgets: {"flops": F, "params": P, "latency": L} fractions kept (any of them; latency needs a cost model with
    a latency model attached). `exclude` takes --exclude patterns.
    `action_groups` lists the group ids a policy controls (groups with more than one allowed kept count).
    """

    analysis: Analysis
    scores: dict
    budgets: dict[str, float]
    min_channels: int = 1
    round_to: int = 1
    max_ratio: float = 1.0
    exclude: list[str] | None = None
    mode: str = "logit"
    cost_model: CostModel | None = None
    fixed: dict = field(init=False, repr=False)
    order: dict = field(init=False, repr=False)

    def __post_init__(self):
        _check_budgets(self.budgets)
        if self.mode not in MODES:
            raise SpaError(f"unknown projection mode '{self.mode}' (choose from {', '.join(MODES)})")
        if self.min_channels < 1 or self.round_to < 1:
            raise SpaError("min_channels and round_to must be >= 1")
        if not 0.0 < self.max_ratio <= 1.0:
            raise SpaError(f"max_ratio must be in (0, 1], got {self.max_ratio}")
        analysis = self.analysis
        self.cost_model = self.cost_model or CostModel(analysis)
        cm = self.cost_model
        if "latency" in self.budgets and cm.latency is None:
            raise SpaError("a latency budget needs a latency table (SearchProblem.build(target_latency=MS, "
                           "latency_table=...))")
        self.fixed, self.order = removal_order(analysis, self.scores, self.exclude)
        self.sizes = np.array([g.size for g in analysis.groups], dtype=np.int64)
        n_groups, width = len(analysis.groups), int(self.sizes.max(initial=0)) + 1
        # table[g, r]: kept count when r removals are asked for (select's constraints); padded with the minimum
        self.table = np.zeros((n_groups, width), dtype=np.int64)
        for g in analysis.groups:
            nf = int(self.fixed[g.id].sum())
            row = [constrained_kept(g.size, nf, r, min_channels=self.min_channels, round_to=self.round_to,
                                    max_ratio=self.max_ratio) for r in range(g.size + 1)]
            self.table[g.id, :g.size + 1] = row
            self.table[g.id, g.size + 1:] = row[-1]
        self.min_kept = self.table[np.arange(n_groups), self.sizes]
        self.max_kept = self.table[:, 0].copy()
        self.action_groups = np.flatnonzero(self.min_kept < self.max_kept)
        # each unit's rank in its group's removal order (fixed units never go) and its group
        self.unit_rank = np.full(cm.n_units, np.iinfo(np.int64).max, dtype=np.int64)
        self.unit_group = np.zeros(cm.n_units, dtype=np.int64)
        for g in analysis.groups:
            idx = cm.unit_index(g.units)
            self.unit_group[idx] = g.id
            order = self.order[g.id]
            self.unit_rank[idx[order]] = np.arange(len(order))
        # labellings that a prefix removal could empty (keep_every_tensor then gives a unit back): their group
        # and the largest removal rank among their units
        # (in Analysis order, which keep_every_tensor follows), their units, their group and their largest
        # removal rank; the unit each would get back is its best-scored one (ties: the smallest root)
        risky_g, risky_r, self._risky_units = [], [], []
        for roots in analysis._label_root_sets:
            idx = cm.unit_index(roots)
            ranks = self.unit_rank[idx]
            if ranks.max() < np.iinfo(np.int64).max and len(roots) < self.sizes[self.unit_group[idx[0]]]:
                risky_g.append(self.unit_group[idx[0]])
                risky_r.append(int(ranks.max()))
                self._risky_units.append(idx)
        self._risky_group = np.asarray(risky_g, dtype=np.int64)
        self._risky_rank = np.asarray(risky_r, dtype=np.int64)
        unit_score = np.array([self.scores[int(r)] for r in cm.unit_roots], dtype=np.float64)
        self._risky_best = np.array([idx[np.argmax(unit_score[idx])] for idx in self._risky_units], np.int64)
        self._risky_flat = np.concatenate(self._risky_units) if self._risky_units else np.zeros(0, np.int64)
        self._risky_len = np.array([len(i) for i in self._risky_units], dtype=np.float64)
        self._risky_of = np.repeat(np.arange(len(self._risky_units)), self._risky_len.astype(np.int64))
        self.goals = {k: f * cm.totals[k] for k, f in self.budgets.items()}
        self._allowed = {int(g): np.unique(self.table[g, :self.sizes[g] + 1]) for g in self.action_groups}

    # ---- costs -----------------------------------------------------------------------------------------------
    def removed(self, kept: np.ndarray) -> np.ndarray:
        """Removed-unit mask of the plan that keeps `kept` units per group (give-backs included)."""
        request = self.sizes - np.asarray(kept, dtype=np.int64)
        removed = self.unit_rank < request[self.unit_group]
        if len(self._risky_group) and (self._risky_rank < request[self._risky_group]).any():
            self._give_back(removed)
        return removed

    def _give_back(self, removed: np.ndarray) -> None:
        """keep_every_tensor on the mask: while some labelling lost every unit, the first such (in Analysis
        order) gets its best-scored unit back (first maximum: the smallest root, as max() picks). A give-back
        only refills labellings, so one ordered pass over the initially emptied ones, re-checking each, takes the
        same steps as keep_every_tensor's rescans. Tested to equal the mask of `plan(kept)`."""
        hit = np.bincount(self._risky_of, weights=removed[self._risky_flat], minlength=len(self._risky_len))
        for s in np.flatnonzero(hit == self._risky_len):
            if removed[self._risky_units[s]].all():
                removed[self._risky_best[s]] = False

    def costs(self, kept: np.ndarray) -> dict[str, float]:
        """Fractions kept of every budget kind (flops and params; latency when the cost model predicts it) for a
        kept-count vector."""
        c = self.cost_model.costs(self.removed(kept))
        return {k: self.cost_model.fraction(k, v) for k, v in c.items()}

    def with_budgets(self, **fractions: float) -> BudgetProjector:
        """A copy with some budget fractions changed (tables shared): `fit_latency` re-projects the same ratios
        at another latency fraction."""
        budgets = {**self.budgets, **fractions}
        _check_budgets(budgets)
        new = copy.copy(self)
        new.budgets = budgets
        new.goals = {k: f * self.cost_model.totals[k] for k, f in budgets.items()}
        return new

    def feasible(self, kept: np.ndarray) -> bool:
        c = self.cost_model.costs(self.removed(kept))
        return all(c[k] <= goal for k, goal in self.goals.items())

    # ---- plans -----------------------------------------------------------------------------------------------
    def plan(self, kept: np.ndarray) -> PruningPlan:
        """The PruningPlan of a kept-count vector: select's plan construction, then keep_every_tensor."""
        removed = {int(g): int(self.sizes[g] - k) for g, k in enumerate(np.asarray(kept)) if k < self.sizes[g]}
        plan = plan_from_counts(self.analysis, self.fixed, self.order, removed, min_channels=self.min_channels,
                                round_to=self.round_to, max_ratio=self.max_ratio)
        return keep_every_tensor(self.analysis, plan, self.scores)

    def kept_of_plan(self, plan: PruningPlan) -> np.ndarray:
        return self.sizes - np.array([len(plan.removed.get(g.id, [])) for g in self.analysis.groups], dtype=np.int64)

    def full(self) -> np.ndarray:
        return self.max_kept.copy()

    def minimum(self) -> np.ndarray:
        """Every action group at its smallest allowed count (the rest unpruned)."""
        kept = self.max_kept.copy()
        kept[self.action_groups] = self.min_kept[self.action_groups]
        return kept

    def count(self, g: int, x: float) -> int:
        """Kept count of group g when x units (continuous) are wanted."""
        want = min(max(math.floor(x + 0.5), 0), int(self.sizes[g]))
        return int(self.table[g, self.sizes[g] - want])

    def counts_for_ratios(self, rho: np.ndarray) -> np.ndarray:
        """Kept counts for desired keep ratios of the action groups, before any projection."""
        kept = self.full()
        for g, r in zip(self.action_groups, np.asarray(rho, dtype=np.float64)):
            kept[g] = self.count(int(g), float(r) * self.sizes[g])
        return kept

    # ---- projection ------------------------------------------------------------------------------------------
    def _shift_coordinate(self, rho: np.ndarray) -> np.ndarray:
        """Keep ratios mapped to the axis the common shift t moves along (logit or log of the ratio)."""
        rho = np.clip(np.nan_to_num(np.asarray(rho, dtype=np.float64), nan=0.5), _EPS, 1.0 if self.mode == "scale"
                      else 1.0 - _EPS)
        return np.log(rho / (1.0 - rho)) if self.mode == "logit" else np.log(rho)

    def _wanted_units(self, z: np.ndarray, t: float, n: np.ndarray) -> np.ndarray:
        """Units wanted per group (continuous) at shift t: the inverse of _shift_coordinate, times the sizes."""
        if self.mode == "logit":
            return n / (1.0 + np.exp(-(z + t)))
        return n * np.minimum(1.0, np.exp(np.minimum(z + t, 0.0)))

    def _kept_at(self, z, t, groups, base) -> np.ndarray:
        kept = base.copy()
        n = self.sizes[groups]
        want = np.clip(np.floor(self._wanted_units(z, t, n) + 0.5).astype(np.int64), 0, n)
        kept[groups] = self.table[groups, n - want]
        return kept

    def project(self, rho, pinned: dict[int, int] | None = None) -> Projection:
        """Kept counts closest to desired keep ratios `rho` (one per action group, in `action_groups` order)
        along the common-shift path that meet every budget, then filled greedily (see the module docstring).
        `pinned` fixes the kept counts of some groups (sequential episodes: groups already decided)."""
        rho = np.asarray(rho, dtype=np.float64).reshape(-1)
        if len(rho) != len(self.action_groups):
            raise SpaError(f"expected {len(self.action_groups)} ratios (one per prunable group), got {len(rho)}")
        pinned = {int(g): int(k) for g, k in (pinned or {}).items()}
        base = self.full()
        for g, k in pinned.items():
            base[g] = k
        free = np.array([i for i, g in enumerate(self.action_groups) if int(g) not in pinned], dtype=np.int64)
        groups = self.action_groups[free]
        z = self._shift_coordinate(rho)[free]
        lo_k = self._kept_at(z, -_SPAN, groups, base)
        if not self.feasible(lo_k):
            return Projection(lo_k, -_SPAN, self.costs(lo_k), feasible=False)
        hi_k = self._kept_at(z, _SPAN, groups, base)
        if self.feasible(hi_k):
            return Projection(hi_k, _SPAN, self.costs(hi_k))
        lo, hi = -_SPAN, _SPAN
        for _ in range(80):
            if hi - lo < 1e-9 or np.array_equal(lo_k, hi_k):
                break
            mid = 0.5 * (lo + hi)
            k = self._kept_at(z, mid, groups, base)
            if self.feasible(k):
                lo, lo_k = mid, k
            else:
                hi, hi_k = mid, k
        kept, steps = self._fill(lo_k, z, lo, groups)
        return Projection(kept, lo, self.costs(kept), fill_steps=steps)

    def growable(self, kept: np.ndarray, cap: np.ndarray | None = None) -> list[int]:
        """Action groups that could take their next allowed count (not above `cap`, when given) and still meet
        every budget; empty for a maximal candidate, which every projection returns."""
        out = []
        for g in self.action_groups:
            nxt = self._next(int(g), int(kept[g]))
            if nxt is None or (cap is not None and nxt > cap[g]):
                continue
            trial = np.array(kept, dtype=np.int64, copy=True)
            trial[g] = nxt
            if self.feasible(trial):
                out.append(int(g))
        return out

    def _next(self, g: int, k: int) -> int | None:
        allowed = self._allowed[g]
        i = np.searchsorted(allowed, k, side="right")
        return int(allowed[i]) if i < len(allowed) else None

    def _fill(self, kept: np.ndarray, z: np.ndarray, t: float, groups: np.ndarray) -> tuple[np.ndarray, int]:
        """Offer each group its next allowed count in the order the shift path reaches it; accept what fits."""
        kept = kept.copy()
        steps = 0
        zmap = dict(zip(groups.tolist(), z.tolist()))
        while True:
            offers = []
            for g in groups.tolist():
                nxt = self._next(g, int(kept[g]))
                if nxt is not None:
                    offers.append((self._event(g, nxt, zmap[g]), g, nxt))
            changed = False
            for _, g, nxt in sorted(offers):
                old = kept[g]
                kept[g] = nxt
                if self.feasible(kept):
                    steps += 1
                    changed = True
                else:
                    kept[g] = old
            if not changed:
                return kept, steps

    def _event(self, g: int, k_next: int, z: float) -> float:
        """The shift at which group g's count reaches k_next on the path."""
        n = int(self.sizes[g])
        r = int(np.flatnonzero(self.table[g, :n + 1] >= k_next).max())  # most removals that still keep k_next
        x = (n - r - 0.5) / n   # round(x * n) >= n - r
        if x <= 0:
            return -math.inf
        if self.mode == "logit":
            return math.log(x / (1.0 - x)) - z
        return math.log(x) - z

    def clip_step(self, kept: np.ndarray, g: int, k: int, undecided) -> int:
        """Sequential episodes: the largest allowed count <= k for group g such that the budget can still be met
        with the groups in `undecided` at their minimum (AMC's constraint on the current layer)."""
        trial = np.asarray(kept, dtype=np.int64).copy()
        for u in undecided:
            trial[u] = self.min_kept[u]
        allowed = self._allowed[g]
        allowed = allowed[allowed <= k]
        if not len(allowed):
            return int(self.min_kept[g])
        lo, hi = 0, len(allowed) - 1
        trial[g] = allowed[hi]
        if self.feasible(trial):
            return int(allowed[hi])
        trial[g] = allowed[0]
        if not self.feasible(trial):
            return int(allowed[0])  # the budget is out of reach: the minimum
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial[g] = allowed[mid]
            if self.feasible(trial):
                lo = mid
            else:
                hi = mid
        return int(allowed[lo])
