"""The latency model: predicted latency of a removal mask from a cost table (see spa.latency)."""
from __future__ import annotations

import numpy as np

from ..errors import SpaError
from .table import LatencyTable


def interpolate(gx: np.ndarray, gy: np.ndarray, ms: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation per layer: grids gx (L, K), gy (L, K) increasing (padded beyond 1 with larger
    values), values ms (L, K, K), queries x, y (L,) in (0, 1]. Below the first grid point: the first point's value."""
    n = gx.shape[1]
    i = np.clip((gx <= x[:, None]).sum(1) - 1, 0, n - 2)
    j = np.clip((gy <= y[:, None]).sum(1) - 1, 0, n - 2)
    rows = np.arange(len(x))
    x0, x1 = gx[rows, i], gx[rows, i + 1]
    y0, y1 = gy[rows, j], gy[rows, j + 1]
    tx = np.clip((x - x0) / (x1 - x0), 0.0, 1.0)
    ty = np.clip((y - y0) / (y1 - y0), 0.0, 1.0)
    return ((1 - tx) * (1 - ty) * ms[rows, i, j] + tx * (1 - ty) * ms[rows, i + 1, j]
            + (1 - tx) * ty * ms[rows, i, j + 1] + tx * ty * ms[rows, i + 1, j + 1])


def _padded(counts: list[int], size: int, k: int) -> np.ndarray:
    f = [c / max(size, 1) for c in counts]
    return np.asarray(f + [f[-1] + 1.0 + t for t in range(k - len(f))])


class LatencyModel:
    """Predicted latency (ms) of a removal mask from a table (see the module docstring for the formula).

    Each table layer is bound to the kept-fraction factors `CostModel` already tracks: its output factor and its
    input factor (none for a grouped conv, whose input is tied to its output, or for an input that carries no
    labels); `predict(frac)` takes `CostModel.kept_fractions(removed)`."""

    def __init__(self, table: LatencyTable, cost_model, analysis):
        self.table, self.cost_model, self.analysis = table, cost_model, analysis
        n_fac = len(cost_model.factor_len)
        costs = analysis.ctx.costs
        k = max([2] + [len(s[a]) for s in table.signatures.values() for a in ("in_counts", "out_counts")])
        gx, gy, ms, fin, fout, weight, names, blocks = [], [], [], [], [], [], [], []
        for layer in table.layers:
            cost = costs.get(layer["node"])
            if cost is None or not cost.factors:
                raise SpaError(f"the latency table names layer '{layer['node']}', which this model does not have")
            sig = table.signatures[layer["signature"]]
            out_id = cost_model.factor_id(cost.factors[0])
            in_id = cost_model.factor_id(cost.factors[1]) if len(cost.factors) > 1 and not layer["tied"] else None
            fout.append(n_fac if out_id is None or not layer["out_prunable"] else out_id)
            fin.append(n_fac if in_id is None or not layer["in_prunable"] else in_id)
            gx.append(_padded(sig["in_counts"], sig["in_size"], k))
            gy.append(_padded(sig["out_counts"], sig["out_size"], k))
            v = np.asarray(sig["ms"], dtype=np.float64)
            ms.append(np.pad(v, ((0, k - v.shape[0]), (0, k - v.shape[1])), mode="edge"))
            weight.append(float(layer["out_elems"]))
            names.append(layer["node"])
            blocks.append((sig["in_size"], sig.get("in_align", 1), sig["out_size"], sig.get("out_align", 1)))
        self.names = names
        self.gx = np.asarray(gx).reshape(-1, k)
        self.gy = np.asarray(gy).reshape(-1, k)
        self.ms = np.asarray(ms).reshape(-1, k, k)
        self.fin, self.fout = np.asarray(fin, np.int64), np.asarray(fout, np.int64)
        b = np.asarray(blocks, dtype=np.float64).reshape(-1, 4)
        self.in_size, self.in_align, self.out_size, self.out_align = b.T
        w = np.asarray(weight)
        self.act_weight = w / w.sum() if w.sum() > 0 else w
        self.overhead = min(float(table.overhead_ms), table.full_ms)
        self.layers_full = float(self._layer_ms(np.ones(n_fac)).sum())
        self.rest = max(table.full_ms - self.overhead - self.layers_full, 0.0)
        body = self.layers_full + self.rest
        self.scale = (table.full_ms - self.overhead) / body if body > 0 else 1.0

    @property
    def full_ms(self) -> float:
        return self.table.full_ms

    @staticmethod
    def _blocks(f: np.ndarray, size: np.ndarray, align: np.ndarray) -> np.ndarray:
        """Kept fractions above one block of `align` channels rounded up to whole blocks (onnxruntime's blocked
        convolutions cost a partial block like a full one, or more; below one block, time scales with width)."""
        n = f * size
        whole = np.minimum(np.ceil(n / align - 1e-9) * align / np.maximum(size, 1), 1.0)
        return np.where((align > 1) & (n > align + 1e-9), whole, f)

    def _kept(self, frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input, output) kept fraction of every layer, in whole blocks."""
        f = np.append(np.asarray(frac, dtype=np.float64), 1.0)
        return (self._blocks(f[self.fin], self.in_size, self.in_align),
                self._blocks(f[self.fout], self.out_size, self.out_align))

    def _layer_ms(self, frac: np.ndarray) -> np.ndarray:
        return interpolate(self.gx, self.gy, self.ms, *self._kept(frac))

    def layer_ms(self, frac: np.ndarray) -> np.ndarray:
        """Each table layer's calibrated time (ms) at these factor fractions."""
        return self.scale * self._layer_ms(frac)

    def predict(self, frac: np.ndarray) -> float:
        """Predicted latency (ms) from kept fractions of every CostModel factor."""
        f = np.append(np.asarray(frac, dtype=np.float64), 1.0)
        layers = interpolate(self.gx, self.gy, self.ms, *self._kept(frac)).sum()
        act = float(self.act_weight @ f[self.fout]) if len(self.fout) else 1.0
        return float(self.overhead + self.scale * (layers + self.rest * act))

    def predict_removed(self, removed: np.ndarray) -> float:
        return self.predict(self.cost_model.kept_fractions(removed))

    def fraction_of(self, ms: float) -> float:
        """A budget in milliseconds as the fraction kept of the table's end-to-end latency."""
        if not ms > 0:
            raise SpaError(f"target_latency must be > 0 ms, got {ms}")
        f = float(ms) / self.full_ms
        if f > 1.0:
            raise SpaError(f"target_latency {ms:g} ms is not below the unpruned model's measured {self.full_ms:.3f} ms "
                           f"(batch {self.table.batch}, {self.table.threads} thread(s)): nothing to prune for it")
        return f

    def group_share(self) -> np.ndarray:
        """Per coupled group: the full-width time of the layers whose input or output factor it labels (split by
        positions, like flops_share: a layer counts for its input and its output group) over the end-to-end time."""
        cm, analysis = self.cost_model, self.analysis
        group_of_unit = np.append(np.array([analysis.unit_group[int(r)] for r in cm.unit_roots], dtype=np.int64), -1)
        share = np.zeros(len(analysis.groups))
        full = self.layer_ms(np.ones(len(cm.factor_len)))
        for t, fids in zip(full, zip(self.fin, self.fout)):
            for fid in {int(x) for x in fids}:
                if fid >= len(cm.factor_len):
                    continue
                units = cm.pos_unit[cm.factor_start[fid]:cm.factor_start[fid + 1]]
                gids = group_of_unit[units]
                gids = gids[gids >= 0]
                if len(gids):
                    share += np.bincount(gids, minlength=len(share)) * (t / (cm.factor_len[fid]))
        return share / max(self.full_ms, 1e-12)

    def summary(self) -> dict:
        return {"full_ms": round(self.full_ms, 4), "overhead_ms": round(self.overhead, 4),
                "layers_ms": round(self.layers_full, 4), "rest_ms": round(self.rest, 4),
                "scale": round(self.scale, 4), "layers": len(self.names),
                "signatures": len(self.table.signatures)}
