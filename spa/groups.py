"""Coupled groups: what the propagation sweep found, in the terms selection and reports use.

A *unit* is a union-find class of atoms (one channel, one attention head, one conv group): removing it removes
every position labelled by any of its atoms. A *coupled group* is a set of units that share tensors (they were
laid end to end or side by side somewhere), so a ratio or a budget applies to the group as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .labels import Context, UnionFind


@dataclass
class CoupledGroup:
    id: int
    name: str
    units: np.ndarray          # root atom ids, sorted
    frozen: np.ndarray         # bool per unit
    sources: list[str]         # producer nodes whose output channels are in the group
    reasons: list[tuple[str, str]] = field(default_factory=list)  # (where, why) for frozen units
    macs: float = 0.0          # MACs that scale with the group's width (first order)

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> int:
        return int((~self.frozen).sum())

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "units": self.size, "frozen_units": int(self.frozen.sum()),
                "sources": self.sources, "macs": int(self.macs),
                "frozen_reasons": [{"where": w, "why": r} for w, r in self.reasons]}


@dataclass
class Analysis:
    ctx: Context
    groups: list[CoupledGroup]
    unit_group: dict[int, int]      # root -> group id
    unit_macs: dict[int, float]     # root -> MACs removed with it (first order)
    total_macs: int
    node_count: int
    unruled_ops: dict[str, int]     # op type -> count of nodes with no rule that froze channels
    nodes: list = field(default_factory=list)          # the swept nodes (kept alive: node_index uses id())
    node_index: dict[int, int] = field(default_factory=dict)  # id(node) -> position in walk_nodes order
    walked: list = field(default_factory=list)         # every node, bodies' too, in walk_nodes order (kept alive)

    @cached_property
    def _root_table(self) -> np.ndarray:
        return root_table(self.ctx.uf)

    def find(self, atoms: np.ndarray) -> np.ndarray:
        """Roots of atoms (-1 stays -1); the sweep is over, so a lookup table replaces the union-find walk."""
        return lookup(self._root_table, atoms)

    @cached_property
    def _cost_roots(self) -> list[tuple[float, list[np.ndarray]]]:
        return [(float(c.macs), [self.find(f) for f in c.factors]) for c in self.ctx.costs.values()]

    @cached_property
    def _label_root_sets(self) -> list[np.ndarray]:
        """The distinct root sets of every labelling (tensors and parameter slices)."""
        seen, sets = set(), []
        for arr in self.labelled_arrays():
            r = np.unique(self.find(arr))
            r = r[r >= 0]
            if len(r) and r.tobytes() not in seen:
                seen.add(r.tobytes())
                sets.append(r)
        return sets

    def removed_mask(self, removed) -> np.ndarray:
        """A bool per root id, True where removed: membership by indexing, not by np.isin (the budget searches
        ask this of many plans). The extra last entry answers for -1 ("no atom"), never removed."""
        mask = np.zeros(len(self._root_table) + 1, dtype=bool)
        mask[np.asarray(sorted(removed), dtype=np.int64)] = True
        mask[-1] = False
        return mask

    def emptied_tensors(self, removed) -> list[np.ndarray]:
        """Root sets of labellings that would lose every position (such a plan is invalid)."""
        mask = self.removed_mask(removed)
        return [r for r in self._label_root_sets if mask[r].all()]

    def keep_mask(self, removed: set[int] | np.ndarray):
        """A function atoms -> bool mask of kept positions, for a set of removed roots."""
        mask = self.removed_mask(removed)   # a table lookup: np.isin sorted the removed set on every call

        def keep(atoms: np.ndarray) -> np.ndarray:
            return ~mask[self.find(atoms)]   # "no atom" (-1) reads the table's last entry, never removed

        return keep

    def macs_after(self, removed) -> int:
        mask = self.removed_mask(removed)
        total = 0.0
        for macs, factors in self._cost_roots:
            m = macs
            for r in factors:
                m *= np.count_nonzero(~mask[r]) / len(r)
            total += m
        return round(total)

    def labelled_arrays(self):
        """Every labelling that must keep at least one position (tensors, parameter slices)."""
        yield from (lab.atoms for lab in self.ctx.labels.values())
        yield from (p.atoms for p in self.ctx.params)


def root_table(uf: UnionFind) -> np.ndarray:
    return uf.find(np.arange(len(uf.parent))) if len(uf.parent) else np.zeros(1, dtype=np.int64)


def lookup(table: np.ndarray, atoms) -> np.ndarray:
    """Roots of atoms through a root table (-1, "no atom", stays -1)."""
    atoms = np.asarray(atoms, dtype=np.int64)
    return np.where(atoms >= 0, table[np.maximum(atoms, 0)], -1)


def build_groups(ctx: Context) -> tuple[list[CoupledGroup], dict[int, int], dict[int, float]]:
    """Units (union-find roots), their groups (roots joined through shared labellings), frozen units with
    reasons, and the first-order MACs each unit carries. Vectorised: ResNet-50 has ~27k atoms."""
    n_atoms = len(ctx.uf.parent)
    if n_atoms == 0:  # no prunable source in the main graph (weights only inside an If, say): no group at all
        return [], {}, {}
    table = root_table(ctx.uf)

    def find(a):  # the sweep is over: roots by table lookup
        return lookup(table, a)

    roots = np.unique(table[:n_atoms])
    # join the roots that share a labelling (a second union-find over root ids)
    gu = UnionFind()
    gu.add(n_atoms)
    for arr in [lab.atoms for lab in ctx.labels.values()] + [p.atoms for p in ctx.params]:
        gu.union_all(np.unique(find(arr[arr >= 0])))
    group_of_root = gu.find(roots)

    frozen_set = np.unique(find(np.concatenate([a for a, _, _ in ctx.frozen]))) if ctx.frozen else \
        np.zeros(0, dtype=np.int64)

    unit_macs_arr = np.zeros(len(roots))
    for c in ctx.costs.values():
        for f in c.factors:
            r = find(f)
            ok = r >= 0
            unit_macs_arr += np.bincount(np.searchsorted(roots, r[ok]), minlength=len(roots)) * (c.macs / len(f))
    unit_macs = dict(zip(roots.tolist(), unit_macs_arr.tolist()))

    # groups ordered by their smallest root; units sorted within
    order = np.lexsort((roots, group_of_root))
    g_sorted, r_sorted = group_of_root[order], roots[order]
    cuts = np.flatnonzero(np.diff(g_sorted)) + 1
    unit_lists = sorted(np.split(r_sorted, cuts), key=lambda u: int(u[0]))
    gid_of_group = {int(group_of_root[np.searchsorted(roots, u[0])]): i for i, u in enumerate(unit_lists)}
    gid_of_root = np.array([gid_of_group[int(g)] for g in group_of_root], dtype=np.int64)

    def gids(atoms: np.ndarray) -> np.ndarray:
        r = find(atoms)
        return np.unique(gid_of_root[np.searchsorted(roots, r[r >= 0])])

    sources: list[list[str]] = [[] for _ in unit_lists]
    for s in ctx.sources:
        for gid in gids(s.atoms):
            if s.node not in sources[gid]:
                sources[gid].append(s.node)
    reasons: list[list[tuple[str, str]]] = [[] for _ in unit_lists]
    for atoms, where, why in ctx.frozen:
        for gid in gids(atoms):
            if (where, why) not in reasons[gid] and len(reasons[gid]) < 20:
                reasons[gid].append((where, why))

    groups = []
    for gid, units in enumerate(unit_lists):
        src = sources[gid]
        name = src[0] + (f" (+{len(src) - 1})" if len(src) > 1 else "") if src else f"group{gid}"
        macs = float(unit_macs_arr[np.searchsorted(roots, units)].sum())
        groups.append(CoupledGroup(gid, name, units, np.isin(units, frozen_set), src, reasons[gid], macs=macs))
    unit_group = dict(zip(roots.tolist(), gid_of_root.tolist()))
    return groups, unit_group, unit_macs
