"""Coupled groups: what the propagation sweep found, in the terms selection and reports use.

A *unit* is a union-find class of atoms (one channel, one attention head, one conv group): removing it removes
every position labelled by any of its atoms. A *coupled group* is a set of units that share tensors (they were
laid end to end or side by side somewhere), so a ratio or a budget applies to the group as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .labels import Context


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
    node_index: dict[int, int] = field(default_factory=dict)

    def find(self, atoms: np.ndarray) -> np.ndarray:
        return self.ctx.uf.find(atoms)

    def keep_mask(self, removed: set[int] | np.ndarray):
        """A function atoms -> bool mask of kept positions, for a set of removed roots."""
        removed = np.asarray(sorted(removed), dtype=np.int64)

        def keep(atoms: np.ndarray) -> np.ndarray:
            roots = self.find(atoms)
            return (roots < 0) | ~np.isin(roots, removed)

        return keep

    def macs_after(self, removed) -> int:
        keep = self.keep_mask(removed)
        total = 0.0
        for c in self.ctx.costs.values():
            m = float(c.macs)
            for f in c.factors:
                m *= keep(f).sum() / len(f)
            total += m
        return int(round(total))

    def labelled_arrays(self):
        """Every labelling that must keep at least one position (tensors, parameter slices)."""
        yield from (lab.atoms for lab in self.ctx.labels.values())
        yield from (p.atoms for p in self.ctx.params)


def build_groups(ctx: Context) -> tuple[list[CoupledGroup], dict[int, int], dict[int, float]]:
    uf = ctx.uf
    n_atoms = len(uf.parent)
    roots_all = uf.find(np.arange(n_atoms))
    # group = connected component of roots through shared labellings
    parent = {int(r): int(r) for r in np.unique(roots_all)}

    def gfind(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    arrays = [lab.atoms for lab in ctx.labels.values()] + [p.atoms for p in ctx.params]
    for arr in arrays:
        r = np.unique(uf.find(arr[arr >= 0]))
        if len(r) > 1:
            base = gfind(int(r[0]))
            for x in r[1:]:
                xr = gfind(int(x))
                if xr != base:
                    parent[xr] = base
    members: dict[int, list[int]] = {}
    for r in parent:
        members.setdefault(gfind(r), []).append(r)

    frozen_roots: dict[int, list[tuple[str, str]]] = {}
    for atoms, where, why in ctx.frozen:
        for r in np.unique(uf.find(atoms)):
            frozen_roots.setdefault(int(r), []).append((where, why))

    unit_macs: dict[int, float] = {}
    for c in ctx.costs.values():
        for f in c.factors:
            r, counts = np.unique(uf.find(f), return_counts=True)
            for root, cnt in zip(r, counts):
                if root >= 0:
                    unit_macs[int(root)] = unit_macs.get(int(root), 0.0) + c.macs * cnt / len(f)

    src_of_root: dict[int, list[str]] = {}
    for s in ctx.sources:
        for r in np.unique(uf.find(s.atoms)):
            lst = src_of_root.setdefault(int(r), [])
            if s.node not in lst:
                lst.append(s.node)

    groups, unit_group = [], {}
    order = sorted(members.values(), key=lambda m: min(m))
    for gid, units in enumerate(order):
        units = np.array(sorted(units), dtype=np.int64)
        frozen = np.array([int(u) in frozen_roots for u in units])
        sources: list[str] = []
        for u in units:
            for s in src_of_root.get(int(u), []):
                if s not in sources:
                    sources.append(s)
        reasons: list[tuple[str, str]] = []
        for u in units[frozen]:
            for wr in frozen_roots[int(u)]:
                if wr not in reasons:
                    reasons.append(wr)
        name = sources[0] + (f" (+{len(sources) - 1})" if len(sources) > 1 else "") if sources else f"group{gid}"
        g = CoupledGroup(gid, name, units, frozen, sources, reasons[:20],
                         macs=sum(unit_macs.get(int(u), 0.0) for u in units))
        groups.append(g)
        for u in units:
            unit_group[int(u)] = gid
    return groups, unit_group, unit_macs
