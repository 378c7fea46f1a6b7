"""Similarity compensation (AutoDFP / neuron merging; data-free): a removed channel that is nearly a positive
multiple of a kept channel of the same group is merged into it.

For every removed unit r, the most similar kept unit k of its group by

    sim(r, k) = cos(f_r, f_k) - beta * |s_r - s_k|

where f is the unit's producer filters (every source slice of the group, concatenated) and s its shift (biases,
norm shifts) divided by the filter norm and standardized over the group. When sim > `threshold` and the projection
scale a = f_r·f_k / |f_k|² is positive, the consumers' columns of r, times a, are added onto the columns of k:
with a positively homogeneous activation, r's output ≈ a · k's output, so the consumers keep seeing it.

Optionally DBSCAN (scikit-learn) clusters the normalized features of each group; a removed unit is then merged
only into a kept unit of its own cluster, and noise units are not merged. Only values of kept parameters change.
"""
from __future__ import annotations

import numpy as np
import onnx

from spa.errors import SpaError, VerificationError
from spa.groups import Analysis
from spa.ir import Graph

from . import Pass
from .compensate import structure


class SimilarityCompensation(Pass):
    name = "similarity"

    def __init__(self, analysis: Analysis, removed: set[int], original: onnx.ModelProto, *, beta: float = 0.5,
                 threshold: float = 0.0, dbscan: tuple[float, int] | None = None):
        self.analysis, self.removed = analysis, removed
        self.orig = Graph(original)
        self.orig_nodes = list(original.graph.node)
        self.beta, self.threshold, self.dbscan = beta, threshold, dbscan
        self._slices: dict[tuple[int, int], list] = {}
        for ps in analysis.ctx.params:
            self._slices.setdefault((id(ps.node), ps.input_index), []).append((ps.axis, ps.atoms))

    def _orig_const(self, ps):
        node = self.orig_nodes[self.analysis.node_index[id(ps.node)]]
        return self.orig.const(node.input[ps.input_index])

    def run(self, model) -> dict:
        analysis = self.analysis
        keep = analysis.keep_mask(self.removed)
        g = model.graph
        before = structure(g.to_model())
        by_group: dict[int, list] = {}
        for ps in analysis.ctx.params:
            r = analysis.find(ps.atoms)
            r = r[r >= 0]
            if len(r):
                by_group.setdefault(analysis.unit_group[int(r[0])], []).append(ps)
        merged, pairs, clusters = 0, 0, 0
        for gid, members in by_group.items():
            group = analysis.groups[gid]
            units = np.asarray(group.units)
            gone = np.isin(units, np.fromiter(self.removed, np.int64, len(self.removed)))
            if not gone.any():
                continue
            feats, shift = self._features(members, units)
            if feats is None:
                continue
            norms = np.linalg.norm(feats, axis=1)
            unit_f = feats / np.maximum(norms[:, None], 1e-12)
            s = shift / np.maximum(norms, 1e-12)
            s = (s - s.mean()) / (s.std() + 1e-12)
            label = None
            if self.dbscan is not None:
                label = _dbscan(np.concatenate([unit_f, self.beta * s[:, None]], 1), *self.dbscan)
                clusters += len(set(label.tolist()) - {-1})
            kept_idx = np.flatnonzero(~gone)
            sim = unit_f[gone] @ unit_f[kept_idx].T - self.beta * np.abs(s[gone][:, None] - s[kept_idx][None, :])
            if label is not None:
                same = label[gone][:, None] == label[kept_idx][None, :]
                sim = np.where(same & (label[gone][:, None] >= 0), sim, -np.inf)
            best = sim.argmax(1)
            for row, r_i in enumerate(np.flatnonzero(gone)):
                k_i = kept_idx[best[row]]
                if not sim[row, best[row]] > self.threshold:
                    continue
                a = float(feats[r_i] @ feats[k_i] / max(norms[k_i] ** 2, 1e-24))
                if a <= 0:
                    continue
                pairs += 1
                merged += self._merge(g, members, int(units[r_i]), int(units[k_i]), a, keep)
        if structure(g.to_model()) != before:
            raise VerificationError("similarity compensation changed the graph or a shape (values only)")
        return {"pairs_merged": pairs, "sink_updates": merged, "dbscan_clusters": clusters if self.dbscan else None}

    def _features(self, members, units):
        """Per-unit filter vectors (source rows) and shift (1-D members: biases, norm shifts)."""
        cols, shift = [], np.zeros(len(units))
        for ps in members:
            w = self._orig_const(ps)
            if w is None or w.dtype.kind != "f":
                continue
            roots = self.analysis.find(ps.atoms)
            if ps.role == "source":
                rows = np.moveaxis(np.asarray(w, np.float64), ps.axis, 0).reshape(w.shape[ps.axis], -1)
                block = np.zeros((len(units), rows.shape[1]))
                ok = roots >= 0
                idx = np.searchsorted(units, roots[ok])
                np.add.at(block, idx, rows[ok])
                cols.append(block)
            elif ps.role == "member" and w.ndim == 1 and ps.node.op_type != "BatchNormalization" \
                    or (ps.node.op_type == "BatchNormalization" and ps.input_index == 2):
                ok = roots >= 0
                np.add.at(shift, np.searchsorted(units, roots[ok]), np.asarray(w, np.float64)[ok])
        if not cols:
            return None, None
        return np.concatenate(cols, 1), shift

    def _merge(self, g: Graph, members, r: int, k: int, a: float, keep) -> int:
        done = 0
        for ps in members:
            if ps.role != "sink":
                continue
            name = ps.node.input[ps.input_index]
            if len(g.consumers.get(name, [])) != 1:
                continue
            roots = self.analysis.find(ps.atoms)
            pr, pk = np.flatnonzero(roots == r), np.flatnonzero(roots == k)
            if len(pr) != len(pk) or not len(pr):
                continue
            kept = keep(ps.atoms)
            new_pos = np.cumsum(kept) - 1
            src = np.asarray(self._orig_const(ps), np.float64)
            for axis, atoms in self._slices.get((id(ps.node), ps.input_index), []):
                if axis != ps.axis:  # the same cuts Apply made on the other axes (e.g. the consumer's rows)
                    src = np.compress(keep(atoms), src, axis=axis)
            w_orig = np.moveaxis(src, ps.axis, 0)
            w = np.moveaxis(np.array(g.const(name), dtype=np.float64), ps.axis, 0)
            if w.shape[0] != int(kept.sum()):
                continue
            w[new_pos[pk]] += a * w_orig[pr]
            g.set_const(name, np.moveaxis(w, 0, ps.axis).astype(g.const(name).dtype))
            done += 1
        return done


def _dbscan(x: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    try:
        from sklearn.cluster import DBSCAN
    except ImportError as e:
        raise SpaError(f"--dbscan needs scikit-learn (pip install scikit-learn): {e}")
    return DBSCAN(eps=eps, min_samples=min_samples).fit(x).labels_
