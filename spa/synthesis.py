"""The inputs the data-driven passes run on: the calibration data, or, data-free, inputs synthesized from the
model alone: noise shaped to the input, then optimized (model inversion, within a compute budget) until a
classifier answers it confidently with every class and surviving BatchNormalization nodes see their running
statistics; other models, and models too big for the budget, keep the noise."""
from __future__ import annotations

import time

import numpy as np

from .calib import input_specs
from .errors import SpaError
from .execution import batch_size_for, run_model
from .memory import GB, array_bytes, check_memory, memory_limit_gb


def synthesize(specs: dict, shapes: dict, n: int, seed: int, g=None) -> dict[str, np.ndarray]:
    """Data-free inputs: for float inputs, half white Gaussian noise and half smooth noise (white noise blurred
    over the spatial axes and rescaled to unit variance), both in the model's own (normalized) input space;
    integer inputs (token ids) are drawn uniformly below the size of the first table they index, else 0."""
    # made one sample at a time into the array kept (the same draws, in the same order, as drawing the whole
    # batch at once): a float input costs its float32 array once, plus its cast for another float type
    need = sum(array_bytes((n, *shapes[name][1:]), np.float32) * (1 if np.dtype(dtype) == np.float32 else 2)
               for name, (_, dtype) in specs.items())
    check_memory(need, f"{n} synthesized samples (--synth-samples) at " + ", ".join(
        f"{name}={'x'.join(map(str, shapes[name][1:]))}" for name in specs))
    rng = np.random.default_rng(seed)
    out = {}
    for name, (_, dtype) in specs.items():
        shape = (n, *shapes[name][1:])
        if np.dtype(dtype).kind == "f":
            x = np.empty(shape, np.float32)
            for i in range(n):
                x[i] = rng.standard_normal(shape[1:])
            if len(shape) >= 3:  # the second half: smooth noise at unit variance, drawn after the first
                for i in range(n // 2, n):
                    smooth = _blur(rng.standard_normal((1, *shape[1:])).astype(np.float32), 3)
                    x[i] = smooth[0] / (smooth.std() + 1e-6)
            out[name] = x if np.dtype(dtype) == np.float32 else x.astype(dtype)
        else:
            high = _table_rows(g, name) if g is not None else 1
            out[name] = rng.integers(0, max(high, 1), size=shape).astype(dtype)
    return out


# ---- the inversion: inputs optimized so that the model reacts to them as to data --------------------------------
# Measured on the digits/mnist1d nets (tools/bench_datafree.py): per-sample unit std, a spread of smoothness
# weights over the batch and ~80 Adam steps bring data-free OBS + reconstruction within a few points of
# calibration data at 50 % MACs removed, where noise lost 15-45; the compute budget bounds the cost on big models
# (ResNet-50 at 224x224 stays on noise).
INVERSION_STEPS = 80            # Adam steps at most; 40 lost 3-4 points at 50 % removed on mobilenetv2_digits
INVERSION_MIN_STEPS = 8         # fewer steps than this would not shape the inputs: they stay noise
INVERSION_BUDGET_MACS = 6e11    # forward-equivalent MACs for the whole optimization (a step costs ~3 forwards)
INVERSION_BUDGET_ELEMENTS = 3.2e10  # and activation elements: a step's time follows the tensors it writes as much
                                    # as its MACs (~5 us per element, sample and step here): PaddleOCR's 16 M-MAC
                                    # direction classifier, 3.3 M elements per sample, ran 80 steps in 60-72 s where
                                    # MobileNetV2-digits' 0.9 M took 26 s. Set so that the benchmark nets and the
                                    # MAC-capped models keep their steps (~45 s of inversion here at most)
INVERSION_LR = 0.1              # at INVERSION_STEPS; fewer steps take proportionally larger ones (up to 0.25)
SMOOTHNESS = (1.0, 30.0)        # total-variation weights, spread geometrically over the batch: the smoothness
                                # of the data is unknown (1-D signals preferred 1, images 30)


def classifier_logits(g) -> str | None:
    """The tensor holding class scores [N, C] (C >= 2): the first graph output, or the input of the Softmax /
    LogSoftmax producing it; None for other outputs (dense maps, boxes, embeddings of other shapes, scalars) and
    when N is not the inputs' dim 0 (a sequence-first recurrent net: samples are not its rows)."""
    out = g.model.graph.output[0].name
    shape = g.shapes.get(out)
    if shape is None or len(shape) < 2 or shape[1] < 2 or any(d != 1 for d in shape[2:]):
        return None
    firsts = {(g.shapes.get(i) or (None,))[0] for i in g.input_names}
    if firsts != {shape[0]}:
        return None
    node = g.producer.get(out)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        return node.input[0]
    return out


def _bn_targets(g) -> dict:
    import torch

    targets = {}
    for node in g.model.graph.node:
        if node.op_type == "BatchNormalization" and len(node.input) >= 5:
            mean, var = g.const(node.input[3]), g.const(node.input[4])
            if mean is not None and var is not None:
                targets[node.name] = (torch.from_numpy(np.array(mean, np.float32)),
                                      torch.from_numpy(np.array(var, np.float32)))
    return targets


def inversion_steps(macs_per_sample: float, n: int, steps: int | None = None, budget: float | None = None,
                    elements_per_sample: float = 0.0) -> int:
    """Adam steps the compute budget allows for n samples (0: below INVERSION_MIN_STEPS, not worth running): within
    INVERSION_BUDGET_MACS and INVERSION_BUDGET_ELEMENTS (the activation elements a sample's forward writes).
    `steps` / `budget` replace INVERSION_STEPS / the budgets (a caller's options; 0 steps: noise; a budget given
    in MACs lifts the elements' cap too)."""
    most = INVERSION_STEPS if steps is None else int(steps)
    if budget is None:
        most = min(most, int(INVERSION_BUDGET_ELEMENTS // max(3.0 * elements_per_sample * n, 1.0)))
    budget = INVERSION_BUDGET_MACS if budget is None else float(budget)
    steps = min(most, int(budget // max(3.0 * macs_per_sample * n, 1.0)))
    return steps if steps >= INVERSION_MIN_STEPS else 0


def inversion_bytes_per_sample(g) -> int:
    """The graph's tensors at one sample, kept for the backward pass, with their gradients (x3 in the check);
    a tensor whose dims inference left symbolic (Swin's window reshapes) is not counted."""
    return sum(array_bytes(g.shapes[o][1:], np.float32) for node in g.model.graph.node for o in node.output
               if g.shapes.get(o) and all(isinstance(d, int) for d in g.shapes[o][1:]))


def invert_in_parts(g, feeds: dict[str, np.ndarray], inputs, steps: int):
    """`invert` on as many samples at once as the memory limit allows: more samples than fit are inverted in
    parts, each its own optimization (the objectives are per sample, except BN statistics, matched per part)."""
    n = int(next(iter(feeds.values())).shape[0])
    fit = int(memory_limit_gb() * GB // max(3 * inversion_bytes_per_sample(g), 1))
    size, fixed = batch_size_for(g, n, feeds)
    if fixed:
        fit = fit // size * size
    if fit >= n or fit < 1:
        return invert(g, feeds, inputs, steps)   # all at once, or refused by invert's own memory check
    parts = [invert(g, {k: v[start:start + fit] for k, v in feeds.items()}, inputs, steps)
             for start in range(0, n, fit)]
    inputs.notes.append(f"data-free: inverted in {len(parts)} parts of at most {fit} samples (--memory-limit)")
    return {k: np.concatenate([p[k] for p in parts]) for k in feeds}


def invert(g, feeds: dict[str, np.ndarray], inputs, steps: int):
    """Optimize the float inputs (Adam, through TorchGraph) so that the model treats them like data:
    * a classifier (see `classifier_logits`) answers each sample confidently with an assigned class, the classes
      spread evenly over the batch (model inversion, as in DeepInversion);
    * BatchNormalization nodes that survived the export see their running mean and variance per channel
      (ZeroQ-style; each node's loss normalized by its variance);
    * priors: each sample keeps unit standard deviation (the model's input space is taken to be standardized,
      as the noise it starts from), is smooth (total variation over its spatial axes, a weight per sample from
      SMOOTHNESS) and is shifted by a random jitter at every step so that no pixel pattern is fitted.
    Without a classifier output and BN nodes there is nothing to aim at: the inputs are returned unchanged.
    Integer inputs (token ids) are never changed. Deterministic for a given seed."""
    import torch
    import torch.nn.functional as F

    from .torch_graph import TorchGraph  # torch: this module must import without it

    logits = classifier_logits(g)
    bn = _bn_targets(g)
    if steps <= 0 or not any(np.dtype(v.dtype).kind == "f" for v in feeds.values()):
        return feeds
    if logits is None and not bn:
        inputs.notes.append("data-free: noise inputs, not inverted (the first output holds no class scores "
                            "and no BatchNormalization statistics survived: nothing to aim the inputs at)")
        return feeds
    t0 = time.perf_counter()
    n = int(next(iter(feeds.values())).shape[0])
    check_memory(3 * n * inversion_bytes_per_sample(g), f"the data-free inversion ({n} synthesized samples, "
                                                        f"activations kept for the gradient; fewer with --synth-samples)")
    tg = TorchGraph(g)
    for p in tg.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng([inputs.seed, 1])
    xs = {k: torch.tensor(v, requires_grad=np.dtype(v.dtype).kind == "f") for k, v in feeds.items()}
    lr = min(0.25, INVERSION_LR * INVERSION_STEPS / steps)
    opt = torch.optim.Adam([x for x in xs.values() if x.requires_grad], lr=lr)
    size, fixed = batch_size_for(g, n, feeds)
    classes = None
    first = last = None
    shown = time.perf_counter()
    for it in range(steps):
        shaped = {}
        for k, x in xs.items():
            if x.requires_grad:
                x = _unit_std(x)
                if x.dim() >= 3:
                    reach = [max(1, d // 16) for d in x.shape[2:]]
                    shift = [int(rng.integers(-r, r + 1)) for r in reach]
                    x = torch.roll(x, shift, dims=list(range(2, x.dim())))
            shaped[k] = x
        found: dict = {}
        sums: dict[str, list] = {}  # BN node -> [sum x, sum x^2, count] over the chunks

        def hook(node, ins, outs, found=found, sums=sums):
            if logits is not None and logits in node.output:
                found.setdefault("y", []).append(outs[list(node.output).index(logits)])
            if node.name in bn:
                x = ins[0]
                dims = [0, *range(2, x.dim())]
                acc = sums.setdefault(node.name, [0.0, 0.0, 0])
                acc[0] = acc[0] + x.sum(dims)
                acc[1] = acc[1] + (x * x).sum(dims)
                acc[2] += x.numel() // x.shape[1]

        opt.zero_grad()
        used = 0
        for start in range(0, n - size + 1 if fixed else n, size):
            run_model(tg, {k: v[start:start + size] for k, v in shaped.items()}, hook=hook)
            used = start + size if fixed else min(n, start + size)
        losses = []
        if found:
            y = torch.cat(found["y"]).reshape(used, -1).float()
            if classes is None:
                order = rng.permutation(y.shape[1])  # every class once before any twice, in random order
                classes = torch.from_numpy(order[np.arange(n) % y.shape[1]][:used])
            losses.append(F.cross_entropy(y, classes[:used]))
        if sums:
            parts = []
            for name, (s1, s2, count) in sums.items():
                mean, var = bn[name]
                m = s1 / count
                v = s2 / count - m * m
                scale = var.clamp_min(1e-6)
                parts.append(((m - mean) ** 2 / scale).mean() + ((v - var) ** 2 / scale ** 2).mean())
            losses.append(torch.stack(parts).mean())
        for x in shaped.values():
            if x.requires_grad and x.dim() >= 3:
                weight = torch.from_numpy(np.geomspace(*SMOOTHNESS, n).astype(np.float32))
                tv = sum((x.diff(dim=d) ** 2).flatten(1).mean(1) for d in range(2, x.dim()))
                losses.append((weight * tv).mean())
        loss = torch.stack(losses).sum()
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if first is None else first
        if time.perf_counter() - shown > 1.0:
            inputs.progress(f"data-free: inverting the model {it + 1}/{steps}")
            shown = time.perf_counter()
    with torch.no_grad():
        out = {k: (_unit_std(x) if x.requires_grad else x).detach().numpy() for k, x in xs.items()}
    aims = (["confident, evenly assigned classes"] if logits is not None else []) + \
        ([f"{len(bn)} BatchNormalization nodes' running statistics"] if bn else [])
    inputs.notes.append(f"data-free: {n} inputs optimized towards {' and '.join(aims)} "
                        f"(noise start, unit std, smoothness and jitter priors; loss {first:.3g} -> {last:.3g}, "
                        f"{steps} Adam steps, {time.perf_counter() - t0:.1f} s)")
    return out


def _unit_std(x):
    dims = list(range(1, x.dim()))
    mean = x.mean(dims, keepdim=True)
    return (x - mean) / (x.std(dims, keepdim=True) + 1e-6) + mean


def _blur(x: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        for ax in range(2, x.ndim):
            x = (np.roll(x, 1, ax) + 2 * x + np.roll(x, -1, ax)) / 4
    return x


def _table_rows(g, name: str) -> int:
    for node, i in g.consumers.get(name, []):
        if node.op_type == "Gather" and i == 1:
            t = g.const(node.input[0])
            if t is not None:
                return t.shape[0]
    return 1


def model_data(inputs) -> tuple[dict[str, np.ndarray], int]:
    """The calibration inputs, or synthesized ones (data-free), as numpy arrays keyed by input name."""
    if inputs.calib is not None:
        return inputs.calib.inputs, inputs.calib.n
    g = inputs.analysis.ctx.g
    cached = inputs.cache.get("synthesized")
    if cached is None:
        specs = input_specs(g.model)
        shapes = {k: g.shapes.get(k) for k in specs}
        if any(s is None for s in shapes.values()):
            raise SpaError("data-free mode needs static input shapes; pass --input-shape")
        cached = synthesize(specs, shapes, inputs.samples, inputs.seed, g)
        macs = float(getattr(inputs.analysis, "total_macs", 0) or 0)
        opts = inputs.cache.get("synthesis_options", {})  # {"steps": N, "budget": MACs}, from the caller's options
        elements = inversion_bytes_per_sample(g) / 4
        steps = inversion_steps(macs, inputs.samples, opts.get("steps"), opts.get("budget"), elements)
        if steps:
            cached = invert_in_parts(g, cached, inputs, steps)
        elif opts.get("steps") == 0:
            inputs.notes.append("data-free: noise inputs (the inversion is switched off)")
        else:
            budget = opts.get("budget", INVERSION_BUDGET_MACS)
            inputs.notes.append(f"data-free: noise inputs, not inverted (the inversion budget of {budget:.3g} "
                                f"MACs and {INVERSION_BUDGET_ELEMENTS:.3g} activation elements allows fewer than "
                                f"{INVERSION_MIN_STEPS} steps over {inputs.samples} samples of {macs:.3g} MACs, "
                                f"{elements:.3g} elements)")
        inputs.cache["synthesized"] = cached
    return cached, inputs.samples
