"""refit="fast" / "oneshot": least-squares refits inside the search's one-pass reward (see reward.py).

`LayerRefit` selects the original's layers it models (`views`), caches their statistics in the pass over the
original (`layer_stats`) and refits a candidate's layer before it runs: `lockstep` (fast: from the pruned model's
actual input, against the original layer's output at positions sampled once) or `oneshot` (one-shot OBS from the
original's input Gram matrices alone). `input_columns` gives the kept input columns oneshot needs.
"""
from __future__ import annotations

import time

import numpy as np

from .. import obspa

REFIT_MODES = ("fast", "oneshot")
# output positions sampled per layer: "fast" forms the pruned input's Gram matrix on them per candidate (cost
# ~ positions x columns^2 per layer; Reconstruct uses 8192), "oneshot" the original's once
REFIT_POSITIONS = {"fast": 2048, "oneshot": 32768}
REFIT_MAX_COLUMNS = 4096    # a layer with more input columns (+1 for a bias) is not refit by fast/oneshot


class LayerRefit:
    """The fast/oneshot refit of one evaluator: `mode` ("fast", "oneshot" or None: no refit), `positions` sampled
    per layer, layers with more than `max_columns` input columns left alone, the ridge `damp`
    (spa.obspa.DEFAULT_DAMP when None). `layers`: node -> cached statistics of the original (None until the
    original's pass); `skipped`: the layers left as they are, and why."""

    def __init__(self, mode: str | None, positions: int, max_columns: int, damp: float | None):
        self.mode, self.positions, self.max_columns, self.damp = mode, positions, max_columns, damp
        self.layers: dict | None = None
        self.skipped: list[str] = []

    def views(self, g, nodes) -> dict:
        """The original's layers the fast/oneshot refit models in the original's graph `g` (what `Reconstruct`
        refits: spa.obspa.layer_view, weight not shared), with the ones left out noted in `skipped`."""
        views, self.skipped = {}, []
        for node in nodes:
            if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or g.const(node.input[1]) is None:
                continue
            view = obspa.layer_view(g, node)
            if view is None:
                self.skipped.append(f"{node.name}: not a plain Conv/Gemm/MatMul layer (grouped or depthwise "
                                          "conv, ...): Reconstruct does not refit it either")
                continue
            if view.data_index != 0 or len(g.consumers.get(view.weight, [])) > 1 or \
                    (view.bias is not None and len(g.consumers.get(view.bias, [])) > 1):
                self.skipped.append(f"{node.name}: weight shared by several nodes")
                continue
            cols = view.matrix(np.asarray(g.const(view.weight))).shape[1] + (view.bias is not None)
            if cols > self.max_columns:
                self.skipped.append(f"{node.name}: {cols} input columns > refit_max_columns "
                                          f"{self.max_columns}: not refit")
                continue
            views[node.name] = view
        return views

    def layer_stats(self, g, view, xs, n: int, gen) -> dict:
        """One layer of the original (graph `g`) at `positions` output positions sampled over the statistics samples
        (all of them when there are fewer; the same seeded draws as `Reconstruct`'s, so with 8192 positions
        refit="fast" reproduces its refit). U = the unfolded input rows there (conv patches in the weight's
        column order, a ones column for a bias). "fast" keeps the positions and the layer's output U [W_o | b_o]ᵀ
        there (the refit's target, positions x O floats); "oneshot" keeps H = UᵀU/rows and H [W_o | b_o]ᵀ
        (every candidate's right-hand side is a slice of it)."""
        import torch

        w = view.matrix(np.asarray(g.const(view.weight), np.float64))
        if view.bias is not None:
            w = np.concatenate([w, np.asarray(g.const(view.bias), np.float64)[:, None]], 1)
        in_axis = 0 if view.trans else 1
        layer = {"bias": view.bias is not None, "k": view.k, "in_axis": in_axis,
                 "in_len": int(np.asarray(g.const(view.weight)).shape[in_axis]), "rows": [], "y": [], "total": []}
        gram = obspa.Gram()
        wt = torch.from_numpy(w.T.astype(np.float32))
        for x in xs:
            x = x.float()
            quota = max(1, round(self.positions * x.shape[0] / max(n, 1)))
            total = obspa.output_positions(view, x)
            rows = obspa.pick_rows(total, quota, gen)
            a = obspa.sample_rows(view, x, rows)
            a = obspa.with_ones(a) if view.bias is not None else a
            if self.mode == "oneshot":
                gram.add(a)
            else:  # the original layer's output at the sampled positions: the refit's target
                layer["rows"].append(rows)
                layer["y"].append(a @ wt)
                layer["total"].append(total)
        if self.mode == "oneshot":
            h = gram.xx / max(gram.n, 1)
            layer.update(h=h, hw=h @ w.T)
        return layer

    def oneshot(self, node, g, tg, rows, keep_cols: np.ndarray, info: dict) -> None:
        """One-shot OBS refit of one layer whose input lost columns, before it runs.

        `Reconstruct` refits W' = argmin ||X_p W'ᵀ - X_o W_oᵀ||² + λ||W' - W_p||² with X_p the PRUNED model's
        actual input (so upstream errors are compensated) and X_o the original's, both recomputed per candidate.
        Here X_p is taken to be the original's input restricted to the kept columns K (exact when nothing
        upstream changed), so only the original's H = X_oᵀX_o/n is needed, computed once:

            W'ᵀ = (H_KK + λI)⁻¹ (H_K: W_oᵀ + λ W_pᵀ),   λ = damp · mean(diag H_KK)   (as spa.obspa.refit)

        for the kept output rows of [W_o | b_o]; W_p is the pruned weight (the original's kept rows and columns),
        so with damp 0 it is the least-squares W' = W_o H_:K H_KK⁻¹. The cost is one |K| x |K| Cholesky solve."""
        layer = self.layers[node.name]
        view = obspa.layer_view(g, node)
        if view is None or len(g.consumers.get(view.weight, [])) > 1:
            return
        t = time.perf_counter()
        w_full = np.asarray(g.const(view.weight))
        w_p = view.matrix(w_full).astype(np.float64)
        if layer["bias"]:
            if view.bias is None:
                return
            w_p = np.concatenate([w_p, np.asarray(g.const(view.bias), np.float64)[:, None]], 1)
        cols = np.flatnonzero(keep_cols)
        if layer["bias"]:
            cols = np.append(cols, layer["h"].shape[0] - 1)
        out = np.flatnonzero(rows[node.name]) if node.name in rows else np.arange(layer["hw"].shape[1])
        if w_p.shape != (len(out), len(cols)):
            return
        damp = obspa.DEFAULT_DAMP if self.damp is None else self.damp
        hd, lam = obspa.damped(layer["h"][np.ix_(cols, cols)], damp)
        rhs = layer["hw"][np.ix_(cols, out)] + lam * w_p.T          # H_K: W_oᵀ: H W_oᵀ is computed once
        write_refit(g, tg, view, w_full, obspa._solve_psd(hd, rhs).T, info, t)

    def lockstep(self, node, g, tg, envs, rows, info: dict) -> None:
        """Reconstruct's refit of one layer from the pruned model's actual input, against the original layer's
        output at the positions sampled once (cached by `layer_stats`): no second model runs."""
        import torch

        layer = self.layers[node.name]
        view = obspa.layer_view(g, node)
        if view is None or len(g.consumers.get(view.weight, [])) > 1 or (view.bias is not None) != layer["bias"]:
            return
        t = time.perf_counter()
        out = torch.from_numpy(np.flatnonzero(rows[node.name])) if node.name in rows else None
        xx = xy = None
        count = 0
        for env, r, y, total in zip(envs, layer["rows"], layer["y"], layer["total"]):
            x = env[node.input[0]].float()
            if obspa.output_positions(view, x) != total:
                return
            a = obspa.sample_rows(view, x, r)
            if view.bias is not None:
                a = obspa.with_ones(a)
            yk = y if out is None else y.index_select(1, out)
            if a.shape[1] <= 64:  # as spa.obspa.Gram: float64 products for narrow layers, float32 otherwise
                a, yk = a.double(), yk.double()
            gxx, gxy = (a.T @ a).double(), (a.T @ yk).double()
            xx = gxx if xx is None else xx + gxx
            xy = gxy if xy is None else xy + gxy
            count += a.shape[0]
        w_full = np.asarray(g.const(view.weight))
        w_p = view.matrix(w_full).astype(np.float64)
        if view.bias is not None:
            w_p = np.concatenate([w_p, np.asarray(g.const(view.bias), np.float64)[:, None]], 1)
        if xx is None or xy.shape != (w_p.shape[1], w_p.shape[0]):
            return
        damp = obspa.DEFAULT_DAMP if self.damp is None else self.damp
        new = self.solve(node.name, view, xx.numpy() / count, xy.numpy() / count, w_p, damp)
        write_refit(g, tg, view, w_full, new, info, t)

    def solve(self, name: str, view, h: np.ndarray, xy: np.ndarray, w_p: np.ndarray, damp: float) -> np.ndarray:
        """The refit [W | b] of layer `name` from its input Gram h = XᵀX/n and XᵀY/n (ridge towards w_p);
        a subclass may restrict it (spa.search.sculpt: to each output row's kept pattern positions)."""
        hd, lam = obspa.damped(h, damp)
        return obspa._solve_psd(hd, xy + lam * w_p.T).T


def write_refit(g, tg, view, w_full, new, info, t0) -> None:
    """Store a refit layer [W | b] in the candidate's graph and its torch twin (nothing when not finite)."""
    import torch

    if not np.isfinite(new).all():
        return

    def write(name, value):
        g.set_const(name, value)
        tg.param(name).data.copy_(torch.from_numpy(np.array(value)))

    if view.bias is not None:
        write(view.bias, new[:, -1].astype(np.asarray(g.const(view.bias)).dtype))
        new = new[:, :-1]
    write(view.weight, view.unmatrix(new, w_full.shape).astype(w_full.dtype))
    info["layers"] = info.get("layers", 0) + 1
    info["seconds"] = info.get("seconds", 0.0) + time.perf_counter() - t0


def input_columns(analysis, removed, layers: dict | None) -> dict[str, np.ndarray]:
    """For every layer refit="oneshot" models whose input lost units: the kept input columns of its original weight matrix
    (a conv's input channel repeated over its kernel positions), from the 'sink' slices of the analysis."""
    if not layers:
        return {}
    keep = analysis.keep_mask(removed)
    masks = {name: np.ones(lay["in_len"], bool) for name, lay in layers.items()}
    for ps in analysis.ctx.params:
        lay = layers.get(ps.node.name)
        if ps.role != "sink" or lay is None or ps.input_index != 1 or ps.axis != lay["in_axis"]:
            continue
        if len(ps.atoms) != lay["in_len"]:
            masks.pop(ps.node.name, None)   # a slice of the axis we cannot place: leave the layer as it is
            layers = {k: v for k, v in layers.items() if k != ps.node.name}
            continue
        masks[ps.node.name] &= keep(ps.atoms)
    return {name: np.repeat(m, layers[name]["k"]) for name, m in masks.items() if not m.all()}
