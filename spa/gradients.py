"""Gradient criteria (taylor, snip, grasp, crop) from the ONNX file alone, through our torch lowering.

Loss (ScoreInputs.loss):
- `ce`: cross-entropy to the calibration labels;
- `pseudo`: cross-entropy to the original model's own top-1 predictions (label-free);
- `fisher`: cross-entropy to labels sampled from the model's own softmax (empirical Fisher; label-free);
- `auto`: `ce` when the calibration data has labels, else `pseudo`.
Class logits are a 2-D output [batch, classes]. Any other output (hidden states, segmentation maps) uses a
Gaussian version of the Fisher loss: ½‖y − (y + ε)‖² with ε ~ N(0, std(y)²) sampled per step, whose gradient is
not zero at the unpruned model (KL or MSE to the model's own output would be).

Per parameter slice (every member of a group, as for magnitude):
- taylor: |Σ_slice w·g| (first-order change of the loss when the slice is zeroed), g the mean gradient;
- snip:   Σ_slice |w·g| (connection sensitivity);
- grasp:  Σ_slice w·(Hg) (GraSP's −S: large means removing it would reduce gradient flow; kept);
- crop:   Σ_slice |w·(Hg)| (gradient-flow preservation),
with g the mini-batch gradient and Hg the Hessian-gradient product (double backward, g held constant), averaged
over the mini-batches (a model exported with a fixed batch dim runs batches of exactly that size).
"""
from __future__ import annotations

import time

import numpy as np

from .errors import SpaError
from .execution import batch_size_for, chunks
from .importance import Member, weight_members
from .synthesis import model_data


def _loss(torch, out, kind: str, labels, original, gen):
    f = torch.nn.functional
    if out.dim() == 2 and out.shape[1] > 1 and out.dtype.is_floating_point:
        if kind == "ce":
            return f.cross_entropy(out, labels)
        if kind == "pseudo":
            return f.cross_entropy(out, original.argmax(1))
        probs = torch.softmax(original.double(), 1).float()
        return f.cross_entropy(out, torch.multinomial(probs, 1, generator=gen).squeeze(1))
    noise = torch.randn(out.shape, generator=gen) * original.float().std().clamp_min(1e-6)
    return 0.5 * ((out.float() - (original.float() + noise)) ** 2).mean()


def gradient_products(inputs, hessian: bool) -> dict[str, dict[str, np.ndarray]]:
    """Per float initializer: sums over mini-batches of w·g, |w·g| (and w·Hg, |w·Hg| when `hessian`)."""
    import torch

    from .torch_graph import TorchGraph  # torch: this module must import without it (spa.importance loads it)

    key = ("grad", hessian)
    if key in inputs.cache:
        return inputs.cache[key]
    analysis = inputs.analysis
    feeds, n = model_data(inputs)
    kind = inputs.loss
    labels = getattr(inputs.calib, "labels", None) if inputs.calib is not None else None
    if kind == "auto":
        kind = "ce" if labels is not None else "pseudo"
    if kind == "ce" and labels is None:
        raise SpaError("--loss ce needs labels in the calibration file (a 'labels' array); use --loss pseudo "
                       "or --loss fisher for label-free gradients")
    inputs.notes.append(f"gradients: loss {kind} on {n} {'calibration' if inputs.calib is not None else 'synthesized'}"
                        " samples")
    t0 = time.perf_counter()
    tg = TorchGraph(analysis.ctx.g)
    names = {ps.node.input[ps.input_index] for ps in analysis.ctx.params}
    params = {k: tg.param(k) for k in names if k in tg.param_names}
    for p in tg.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    acc: dict[str, dict[str, np.ndarray]] = {k: {} for k in params}
    gen = torch.Generator().manual_seed(inputs.seed)
    bs = batch_size_for(analysis.ctx.g, inputs.batch_size, feeds)
    keys = list(params)
    batches = 0
    for step, batch in enumerate(chunks(feeds, n, bs)):
        start = step * bs[0]
        out = tg(**batch)
        out = out[0] if isinstance(out, tuple) else out
        y = None if labels is None else torch.from_numpy(np.asarray(labels[start:start + bs[0]], dtype=np.int64))
        loss = _loss(torch, out, kind, y, out.detach(), gen)
        grads = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=hessian, allow_unused=True)
        hgs = [None] * len(keys)
        if hessian:
            used = [(i, gr) for i, gr in enumerate(grads) if gr is not None]
            z = sum((gr * gr.detach()).sum() for _, gr in used)
            hv = torch.autograd.grad(z, [params[keys[i]] for i, _ in used], allow_unused=True)
            for (i, _), h in zip(used, hv):
                hgs[i] = h
        for k, gr, hg in zip(keys, grads, hgs):
            if gr is None:
                continue
            w = params[k].detach()
            wg = (w * gr.detach()).numpy().astype(np.float64)
            a = acc[k]
            a["wg"] = a.get("wg", 0) + wg
            a["abs_wg"] = a.get("abs_wg", 0) + np.abs(wg)
            if hg is not None:
                whg = (w * hg.detach()).numpy().astype(np.float64)
                a["whg"] = a.get("whg", 0) + whg
                a["abs_whg"] = a.get("abs_whg", 0) + np.abs(whg)
        inputs.progress(f"gradients: {min(start + bs[0], n)}/{n} samples")
        batches = step + 1
    for a in acc.values():  # mean over batches: equal to the full-batch product for taylor whatever the chunking
        for k in a:
            a[k] = a[k] / max(batches, 1)
    inputs.cache.setdefault("timings", {})["gradients_s"] = round(time.perf_counter() - t0, 3)
    inputs.cache[key] = acc
    return acc


def _members(inputs, hessian: bool, field: str, absolute: bool) -> list[Member]:
    acc = gradient_products(inputs, hessian)

    def values(name, w, ps):
        v = acc.get(name, {}).get(field)
        return None if v is None or np.isscalar(v) else v

    members = weight_members(inputs.analysis, values)
    if absolute:
        for m in members:
            m.values = np.abs(m.values)
    return members


def taylor_members(inputs):
    return _members(inputs, False, "wg", True)


def snip_members(inputs):
    return _members(inputs, False, "abs_wg", False)


def grasp_members(inputs):
    return _members(inputs, True, "whg", False)


def crop_members(inputs):
    return _members(inputs, True, "abs_whg", False)
