"""The search's one-pass torch scoring (see reward.py): once, a pass over the original (per-channel output moments
of every weight layer, the teacher outputs, the refit's layer statistics); per candidate, one pass over the pruned
model that refits (refit="fast"/"oneshot") and re-calibrates its layers as `passes.reconstruct.Reconstruct` would,
against the original's statistics cached by the first pass instead of re-running the original.

torch is imported inside the functions: spa.search imports without it (only these passes need it).
"""
from __future__ import annotations

import numpy as np

from spa.passes.reconstruct import affine_layer, channel_axis, channel_moments, correct_affine, reestimate_bn, release

from .refit import LayerRefit
from .samples import CalibSamples


def original_pass(proto, g_orig, samples: CalibSamples, refit: LayerRefit, seed: int
                  ) -> tuple[dict, list[np.ndarray]]:
    """(moments, teacher): the original's per-channel output moments of every weight layer on the statistics
    samples (what Reconstruct's affine correction matches: node -> (channel axis, mean, variance)) and its outputs
    on the scoring samples. With refit.mode set, the statistics of every layer the refit models go to
    `refit.layers` (`LayerRefit.layer_stats`, in the original's graph `g_orig`)."""
    import torch

    from ..torch_graph import TorchGraph  # torch

    tg = TorchGraph(proto)
    outputs = set(tg.output_names)
    parts = samples.chunks(samples.stats_slice)
    envs = [tg.initial_env(c) for c in parts]
    moments = {}
    views = refit.views(g_orig, list(tg.nodes)) if refit.mode else {}
    layers = {}
    gen = torch.Generator().manual_seed(seed)
    n = sum(int(next(iter(c.values())).shape[0]) for c in parts)
    with torch.no_grad():
        for pos, node in enumerate(tg.nodes):
            if node.name in views:
                layers[node.name] = refit.layer_stats(g_orig, views[node.name], [env[node.input[0]] for env in envs],
                                                      n, gen)
            for env in envs:
                tg.step(node, env)
            if node.op_type in ("Conv", "Gemm", "MatMul") and node.output and node.output[0] in envs[0]:
                ys = [env[node.output[0]] for env in envs]
                ch = channel_axis(node, ys[0])
                moments[node.name] = (ch, *channel_moments(ys, ch))
            for env in envs:
                release(env, tg, pos, outputs)
        teacher = _score_outputs(tg, envs, samples)
    refit.layers = layers
    return moments, teacher


def candidate_pass(model, rows, samples: CalibSamples, moments: dict | None, refit: LayerRefit, *,
                   recalibrate: bool, cols: dict | None = None, refit_info: dict | None = None) -> list[np.ndarray]:
    """Reconstruct(recalibrate=True, refit=False) in one torch pass over the pruned model, with the original's
    moments from `original_pass`; returns the corrected outputs on the scoring samples. With refit.mode "fast"
    every modelled layer is refit by `LayerRefit.lockstep` before it runs; with `cols` (refit="oneshot": the
    kept input columns of the layers that lost some) those layers by `LayerRefit.oneshot`. BN/affine
    re-calibration only with `recalibrate`."""
    import torch

    from ..torch_graph import TorchGraph  # torch

    g = model.graph
    tg = TorchGraph(g)
    outputs = set(g.output_names)
    envs = [tg.initial_env(c) for c in samples.chunks(samples.stats_slice)]
    nodes = list(tg.nodes)
    followed_by_bn = {n.input[0] for n in nodes if n.op_type == "BatchNormalization"}

    def write(name, value):
        tg.param(name).data.copy_(torch.from_numpy(np.array(value)))

    with torch.no_grad():
        for pos, node in enumerate(nodes):
            if cols is not None and node.name in cols:
                refit.oneshot(node, g, tg, rows, cols[node.name], refit_info)
            elif refit.mode == "fast" and node.name in refit.layers:
                refit.lockstep(node, g, tg, envs, rows, refit_info)
            if recalibrate and node.op_type == "BatchNormalization":
                reestimate_bn(g, node, [env[node.input[0]] for env in envs], write)
            for env in envs:
                tg.step(node, env)
            if recalibrate and node.name in rows and node.output[0] not in followed_by_bn:
                _affine(node, g, envs, rows, moments, write)
            for env in envs:
                release(env, tg, pos, outputs)
        return _score_outputs(tg, envs, samples)


def _score_outputs(tg, envs, samples: CalibSamples) -> list[np.ndarray]:
    """The model's outputs on the scoring samples: those of the pass when it ran on them, else a plain run."""
    if samples.score_slice == samples.stats_slice:
        outs = [[env[o] for o in tg.output_names] for env in envs]
    else:
        outs = [list(tg.run(c).values()) for c in samples.chunks(samples.score_slice)]
    return [np.concatenate([o[i].float().numpy() for o in outs]) for i in range(len(tg.output_names))]


def _affine(node, g, envs, rows, moments: dict, write) -> None:
    """Reconstruct._affine with the original's moments looked up instead of recomputed, the outputs corrected in
    their own precision (Reconstruct: float64, then cast back)."""
    view, applies = affine_layer(g, node)
    stats = moments.get(node.name)
    if not applies or stats is None or len(g.consumers.get(node.input[1], [])) > 1:
        return
    ys_p = [env[node.output[0]] for env in envs]
    keep = np.flatnonzero(rows[node.name])
    _, mean_o, var_o = stats
    ch = channel_axis(node, ys_p[0])
    correct_affine(g, node, view, mean_o[keep], var_o[keep], envs, ys_p, ch, write, float64=False)
