"""Measured sensitivity of each coupled group: how much the network's output moves when the group is thinned.

For the 'sensitivity' allocation (spa.select): each group, on its own, loses its lowest-scored units at several
widths (the fractions FRACTIONS of its removable units, in the order the selection removes them); the model
runs on the calibration inputs (or the synthesized ones, data-free) with those units disconnected (every
parameter slice they own zeroed: producer rows, biases, consumer columns), and the distortion is the output's
squared error relative to its energy, Σ‖y' - y‖² / Σ‖y‖² over every graph output. No reconstruction: it ranks
how much each group matters to the network, which the per-unit scores (normalized per group) cannot say.
"""
from __future__ import annotations

import numpy as np

from spa.passes.apply import param_cuts

from .execution import batch_size_for, chunks, run_model
from .groups import Analysis
from .synthesis import model_data

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)   # of a group's removable units
MAX_SAMPLES = 128
PER_LAYER = [True]


def measure_sensitivity(analysis: Analysis, order: dict[int, list[int]], inputs) -> dict[int, tuple]:
    """group id -> (removed counts, distortions), both starting at (0, 0.0) and increasing in count, for every
    group with at least two removable units. `order`: per group the removable unit indices in removal order
    (spa.select.removal_order); `inputs`: a spa.importance.ScoreInputs (its data, or synthesized inputs)."""
    import torch

    from .torch_graph import TorchGraph  # torch: this module must import without it

    g = analysis.ctx.g
    feeds, n = model_data(inputs)
    n = min(n, MAX_SAMPLES)
    feeds = {k: v[:n] for k, v in feeds.items()}
    tg = TorchGraph(g)
    bs = batch_size_for(g, inputs.batch_size, feeds)
    batches = list(chunks(feeds, n, bs))

    def outputs() -> list[torch.Tensor]:
        with torch.no_grad():
            return [torch.cat([t.reshape(t.shape[0], -1).double() for t in run_model(tg, b).values()], dim=1)
                    for b in batches]

    reference = outputs()
    energy = max(sum(float((y ** 2).sum()) for y in reference), 1e-30)
    params = tg.param_names
    out: dict[int, tuple] = {}
    for grp in analysis.groups:
        removable = order.get(grp.id, [])
        top = min(len(removable), grp.size - 1)   # a group keeps at least one unit
        if top < 2:
            continue
        counts = sorted({max(1, min(top, round(f * len(removable)))) for f in FRACTIONS})
        dist = []
        for k in counts:
            roots = {int(grp.units[i]) for i in removable[:k]}
            saved = {}
            for name, entries in param_cuts(analysis, roots).items():
                slices = entries[0][2]
                if name not in params or all(m.all() for _, m in slices) or \
                        len({tuple((a, m.tobytes()) for a, m in sl) for _, _, sl in entries}) != 1:
                    continue
                p = params[name]
                keep = torch.ones(p.shape, dtype=torch.bool)
                for axis, m in slices:
                    shape = [1] * p.dim()
                    shape[axis] = len(m)
                    keep &= torch.from_numpy(np.asarray(m, dtype=bool)).reshape(shape)
                saved[name] = p.data.clone()
                p.data[~keep] = 0
            moved = outputs()
            for name, value in saved.items():
                params[name].data.copy_(value)
            dist.append(sum(float(((a - b) ** 2).sum()) for a, b in zip(moved, reference)) / energy)
        out[grp.id] = (np.array([0, *counts]), np.maximum.accumulate(np.array([0.0, *dist])))
    return out


def layer_errors(analysis: Analysis, order: dict[int, list[int]], inputs) -> dict[int, tuple]:
    """group id -> (removed counts, relative layer-wise error after the optimal (OBS) refit): for the first k
    units in removal order, Σ over the group's modelled consumers of ½ Σ_rows w_Qᵀ([H⁻¹]_QQ)⁻¹ w_Q (the joint
    OBS error of removing all their columns Q at once), over Σ ½ trace(W H Wᵀ) (the consumers' output energy)."""
    import torch

    from .obspa import DEFAULT_DAMP, DEFAULT_POSITIONS, Gram, damped, layer_view, obs_saliency, output_positions, \
        pick_rows, psd_inverse, sample_rows, with_ones
    from .torch_graph import TorchGraph

    g = analysis.ctx.g
    sinks = {}
    for ps in analysis.ctx.params:
        if ps.role == "sink" and ps.input_index == 1:
            view = layer_view(g, ps.node)
            if view is not None:
                sinks.setdefault(ps.node.name, (view, []))[1].append(ps)
    feeds, n = model_data(inputs)
    tg = TorchGraph(g)
    grams = {name: Gram() for name in sinks}
    gen = torch.Generator().manual_seed(inputs.seed)

    def hook(node, ins, outs):
        entry = sinks.get(node.name)
        if entry is None:
            return
        view = entry[0]
        x = ins[view.data_index].float()
        quota = max(1, round(DEFAULT_POSITIONS * x.shape[0] / n))
        rows = sample_rows(view, x, pick_rows(output_positions(view, x), quota, gen))
        grams[node.name].add(with_ones(rows) if view.bias is not None else rows)

    with torch.no_grad():
        for batch in chunks(feeds, n, batch_size_for(g, inputs.batch_size, feeds)):
            run_model(tg, batch, hook=hook)
    layers = {}   # node name -> (w, hinv, energy, pss)
    for name, (view, pss) in sinks.items():
        gram = grams[name]
        if gram.xx is None:
            continue
        h = gram.xx / gram.n
        hd, _ = damped(h, DEFAULT_DAMP)
        try:
            hinv = psd_inverse(hd)
        except np.linalg.LinAlgError:
            continue
        w = view.matrix(np.asarray(g.const(view.weight), dtype=np.float64))
        if view.bias is not None:
            w = np.concatenate([w, np.asarray(g.const(view.bias), dtype=np.float64).reshape(-1, 1)], axis=1)
        energy = 0.5 * float(np.einsum("od,de,oe->", w, h, w))
        layers[name] = (view, w, hinv, energy, pss)
    out = {}
    for grp in analysis.groups:
        removable = order.get(grp.id, [])
        top = min(len(removable), grp.size - 1)
        if top < 2:
            continue
        counts = sorted({max(1, min(top, round(f * len(removable)))) for f in FRACTIONS})
        uses = []   # (layer, per-position root array)
        for view, w, hinv, energy, pss in layers.values():
            for ps in pss:
                roots = analysis.find(ps.atoms)
                if np.isin(roots, np.asarray(grp.units)).any():
                    uses.append((view, w, hinv, energy, roots))
        if not uses:
            continue
        total = sum(u[3] for u in uses)
        dist = []
        for k in counts:
            rm = np.asarray([int(grp.units[i]) for i in removable[:k]])
            err = 0.0
            for view, w, hinv, energy, roots in uses:
                pos = np.flatnonzero(np.isin(roots, rm))
                cols = np.concatenate([np.arange(p * view.k, (p + 1) * view.k) for p in pos])
                e = float(obs_saliency(w, hinv, [cols])[0])
                err += e / max(energy, 1e-30) if PER_LAYER[0] else e / max(total, 1e-30)
            dist.append(err)
        out[grp.id] = (np.array([0, *counts]), np.maximum.accumulate(np.array([0.0, *dist])))
    return out
