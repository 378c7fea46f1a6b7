"""The inputs the data-driven passes run on: the calibration data, or, data-free, inputs synthesized from the
model alone: noise shaped to the input at the range its first layer reads (see `input_range`), then optimized
(model inversion, within a compute budget) until a classifier answers it confidently with every class and
surviving BatchNormalization nodes see their running statistics; other models, and models too big for the
budget, keep the noise."""
from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import numpy_helper

from .calib import input_specs
from .errors import SpaError, one_line
from .execution import batch_free_polymorphic, batch_size_for, data_pass_batch, run_model, sample_bytes
from .ir import attr
from .memory import GB, array_bytes, check_memory, memory_limit_gb

# The noise the two halves of the synthesized samples start from, by the number of spatial axes. Images (two or
# more): 1/f noise, the spectrum of natural images, in both halves; measured against white + blurred on the three
# digits nets (tools/bench_datafree.py, inversion-pink, 3-seed means) at 50 / 70 % MACs removed: resnet20
# +0.3 / +2.2 points, resnet56 +1.9 / +2.0, MobileNetV2 +2.7 / +10.5. Signals (one axis): white + blurred, which 1/f
# lost to on mnist1d (-0.5 / -4.2).
NOISE = ("white", "smooth")
IMAGE_NOISE = ("pink", "pink")


def _noise(rng, kind: str, shape: tuple, axes: tuple) -> np.ndarray:
    """One sample of `shape`: white noise, or noise smooth / 1/f over `axes` (of the sample with a batch axis)."""
    if kind == "white":
        return rng.standard_normal(shape)
    if kind == "pink":
        return pink_noise(rng, 1, shape, axes)[0]
    smooth = _blur(rng.standard_normal((1, *shape)).astype(np.float32), 3, axes)
    return smooth[0] / (smooth.std() + 1e-6)


def synthesize(specs: dict, shapes: dict, n: int, seed: int, g=None) -> dict[str, np.ndarray]:
    """Data-free inputs: for float inputs, standardized noise (see NOISE): images 1/f noise over their spatial
    axes (`spatial_axes`), signals half white and half smooth (blurred, rescaled to unit variance), others white;
    integer inputs are drawn uniformly below the size of the first table they index (token ids), over their whole
    range when they are bytes cast to float (uint8 pixels), else 0."""
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
            axes = spatial_axes(g, name, len(shape))
            kinds = IMAGE_NOISE if len(axes) >= 2 else NOISE
            x = np.empty(shape, np.float32)
            for i in range(n):
                if axes and i >= n // 2:  # replaced by the second half below: its draws only, not its transform
                    rng.standard_normal(shape[1:])
                else:
                    x[i] = _noise(rng, kinds[0] if axes else "white", shape[1:], axes)
            if axes:  # the second half: smooth noise at unit variance, drawn after the first
                for i in range(n // 2, n):
                    x[i] = _noise(rng, kinds[1], shape[1:], axes)
            out[name] = x if np.dtype(dtype) == np.float32 else x.astype(dtype)
        else:
            low, high = _integer_range(g, name, dtype) if g is not None else (0, 1)
            out[name] = rng.integers(low, max(high, low + 1), size=shape).astype(dtype)
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
    return sum(sample_bytes(g, o) for node in g.model.graph.node for o in node.output if o)


def invert_in_parts(g, feeds: dict[str, np.ndarray], inputs, steps: int, ranges: dict | None = None):
    """`invert` on as many samples at once as the memory limit allows: more samples than fit are inverted in
    parts, each its own optimization (the objectives are per sample, except BN statistics, matched per part)."""
    n = int(next(iter(feeds.values())).shape[0])
    fit = int(memory_limit_gb() * GB // max(3 * inversion_bytes_per_sample(g), 1))
    size, fixed = batch_size_for(g, n, feeds)
    if fixed:
        fit = fit // size * size
    if fit >= n or fit < 1:
        return invert(g, feeds, inputs, steps, ranges)  # all at once, or refused by invert's own memory check
    parts = [invert(g, {k: v[start:start + fit] for k, v in feeds.items()}, inputs, steps, ranges)
             for start in range(0, n, fit)]
    inputs.notes.append(f"data-free: inverted in {len(parts)} parts of at most {fit} samples (--memory-limit)")
    return {k: np.concatenate([p[k] for p in parts]) for k in feeds}


def invert(g, feeds: dict[str, np.ndarray], inputs, steps: int, ranges: dict | None = None):
    """Optimize the float inputs (Adam, through TorchGraph) so that the model treats them like data:
    * a classifier (see `classifier_logits`) answers each sample confidently with an assigned class, the classes
      spread evenly over the batch (model inversion, as in DeepInversion);
    * BatchNormalization nodes that survived the export see their running mean and variance per channel
      (ZeroQ-style; each node's loss normalized by its variance);
    * priors: each sample keeps unit standard deviation in standardized units (the model sees mean + std x of
      `ranges`, see `input_range`; unmapped inputs are taken to be standardized, as the noise they start from),
      is smooth (total variation over its spatial axes, a weight per sample from SMOOTHNESS) and is shifted by a
      random jitter at every step so that no pixel pattern is fitted.
    Without a classifier output and BN nodes there is nothing to aim at: the inputs are returned unchanged.
    Integer inputs (token ids) are never changed. Deterministic for a given seed. Feeds and result are in
    standardized units (`to_model_range` maps them)."""
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
    size, fixed = data_pass_batch(g, n, feeds)   # a Reshape baking batch 1 does not make it one run per sample
    tg = TorchGraph(g, batch_free=batch_free_polymorphic(g, feeds))
    for p in tg.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng([inputs.seed, 1])
    ranges = ranges or {}
    axes = {k: spatial_axes(g, k, v.ndim) for k, v in feeds.items()}
    # float inputs are optimized in float32 whatever their dtype (Adam's steps and state underflow in half
    # precision: a float16 model's inversion stopped at its second step on a non-finite loss)
    xs = {k: torch.tensor(v.astype(np.float32), requires_grad=True) if np.dtype(v.dtype).kind == "f"
          else torch.tensor(v) for k, v in feeds.items()}
    lr = min(0.25, INVERSION_LR * INVERSION_STEPS / steps)
    opt = torch.optim.Adam([x for x in xs.values() if x.requires_grad], lr=lr)
    classes = None
    first = last = None
    shown = time.perf_counter()
    for it in range(steps):
        shaped = {}
        for k, x in xs.items():
            if x.requires_grad:
                x = to_model_range(_unit_std(x), ranges.get(k))
                if axes[k]:
                    reach = [max(1, x.shape[d] // 16) for d in axes[k]]
                    shift = [int(rng.integers(-r, r + 1)) for r in reach]
                    x = torch.roll(x, shift, dims=list(axes[k]))
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
        for k, x in shaped.items():
            smooth = [d for d in axes[k] if x.shape[d] > 1]  # a length-1 axis has no neighbours (its mean: NaN)
            if x.requires_grad and smooth:
                weight = torch.from_numpy(np.geomspace(*SMOOTHNESS, n).astype(np.float32))
                tv = sum((x.diff(dim=d) ** 2).flatten(1).mean(1) for d in smooth)
                if k in ranges:  # in standardized units: the same weights whatever the input's range
                    tv = tv / ranges[k][1] ** 2
                losses.append((weight * tv).mean())
        loss = torch.stack(losses).sum()
        if not torch.isfinite(loss):  # overflowing logits or statistics: the noise is kept rather than NaNs
            inputs.notes.append(f"data-free: noise inputs, the inversion stopped at step {it + 1} of {steps} "
                                f"(its loss was not finite)")
            return feeds
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if first is None else first
        if time.perf_counter() - shown > 1.0:
            inputs.progress(f"data-free: inverting the model {it + 1}/{steps}")
            shown = time.perf_counter()
    with torch.no_grad():
        out = {k: (_unit_std(x) if x.requires_grad else x).detach().numpy().astype(feeds[k].dtype)
               for k, x in xs.items()}
    aims = (["confident, evenly assigned classes"] if logits is not None else []) + \
        ([f"{len(bn)} BatchNormalization nodes' running statistics"] if bn else [])
    inputs.notes.append(f"data-free: {n} inputs optimized towards {' and '.join(aims)} "
                        f"(noise start, unit std, smoothness and jitter priors; loss {first:.3g} -> {last:.3g}, "
                        f"{steps} Adam steps, {time.perf_counter() - t0:.1f} s)")
    return out


# ---- the input's range, read from the first layer ---------------------------------------------------------------
# Exporters fold a BatchNormalization into the Conv before it: over the training data that layer's outputs then have
# per-channel mean beta and std gamma, which start at 0 and 1. beta stays near 0 (mean |channel mean| 0.02-0.13 on
# the nine trained nets measured), so the first layer's bias tells the inputs' mean (a channel summing its weights
# to S reads mean*S + bias, near 0) well; gamma varies more (median 0.54-1.0), so its weights tell the inputs' scale
# within ~2x (outputs of unit std); a surviving BatchNormalization tells both from its running statistics.
# Measured against the data (per-sample mean/std): nets taking [0, 1] pixels (0.31/0.32) read 0.30-0.32/0.29-0.39,
# standardized ones (0.00/0.95-1.28) read -0.07..0.04/0.91-1.9. The standardized prior is kept unless the reading
# departs from it clearly (STANDARDIZED): noise at unit std fed to a [0, 1]-pixel net cost 45-60 points at 50 % MACs
# removed, but a reading 2x off would cost the standardized nets what it gains.
ELEMENTWISE_OPS = {"Identity", "Cast", "Sub", "Add", "Mul", "Div"}
AFFINE_OPS = ELEMENTWISE_OPS | {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
FIRST_LAYERS = {"Conv": 1, "Gemm": 1, "MatMul": -1}  # op -> the axis of its output's channels
RANGE_SAMPLES = 16           # stand-in samples the first layer reads (plus an all-zeros and an all-ones one), fewer
RANGE_ELEMENTS = 2 ** 19     # for large inputs: about this many input elements in all (ResNet-50 at 224^2: 3)
STANDARDIZED = (0.5, 2.5)    # a reading whose mean is within half its std of 0, and whose std is within 2.5x of 1,
                             # keeps the standardized prior


def first_layer(g, name: str):
    """The first Conv / Gemm / MatMul with constant weights that graph input `name` reaches through affine
    one-tensor operators only (a normalization the export kept, reshapes, casts), else None."""
    return _first_layer_reached(g, name, g.rank(name) or 0)[0]


def spatial_axes(g, name: str, rank: int) -> tuple[int, ...]:
    """The axes of input `name` (of `rank`, batch first) its first layer convolves over: 2.. for a channels-first
    input; through the Transposes in front of the first Conv for another layout (a Keras export's NHWC input:
    1..rank-2); 2.. where no Conv is found or a reshape hides the layout (without g: 2..)."""
    if g is None:
        return tuple(range(2, rank))
    return _convolved_axes(*_first_layer_reached(g, name, rank), rank)


def _first_layer_reached(g, name: str, rank: int) -> tuple:
    """(`first_layer`, and which axis of the input each axis of that layer's input is: None where a reshape hides
    it). One walk in graph order from the input through the one-tensor affine operators."""
    axes_of = {name: list(range(rank))}  # tensor reached -> input axis of each of its axes, or None
    for node in g.nodes:
        live = [i for i in node.input if i and not g.is_const(i)]
        if len(live) != 1 or live[0] not in axes_of:
            continue
        axes = axes_of[live[0]]
        if node.op_type in FIRST_LAYERS and node.input[0] == live[0]:
            return (None, None) if node.op_type == "Gemm" and attr(node, "transA", 0) else (node, axes)
        if node.op_type not in AFFINE_OPS:
            continue
        if node.op_type == "Transpose" and axes is not None:
            order = attr(node, "perm", list(range(len(axes)))[::-1])
            axes = [axes[p] for p in order] if len(order) == len(axes) else None
        elif node.op_type not in ELEMENTWISE_OPS:   # a reshape: which axis is which is not followed
            axes = None
        axes_of.update((o, axes) for o in node.output if o)
    return None, None


def _convolved_axes(node, axes, rank: int) -> tuple[int, ...]:
    """The input axes a first Conv convolves over (see spatial_axes)."""
    if node is not None and node.op_type == "Conv" and axes is not None and len(axes) == rank:
        return tuple(axes[2:])
    return tuple(range(2, rank))


def pink_noise(rng, n: int, shape: tuple, axes: tuple) -> np.ndarray:
    """n samples of `shape` with a 1/f amplitude spectrum over `axes` (of the batch; white without any), each at
    zero mean and unit std: the spectrum of natural images, which decides how strongly a first layer's edge-like
    filters answer (white noise made the range readings 0.7-2x off on the nets measured)."""
    x = rng.standard_normal((n, *shape))
    if axes:  # real transforms: the spectrum of real noise is symmetric, half of it is enough (2x faster)
        last = axes[-1]
        radius = np.zeros([(x.shape[a] // 2 + 1 if a == last else x.shape[a]) if a in axes else 1
                           for a in range(x.ndim)])
        for a in axes:
            freq = np.fft.rfftfreq(x.shape[a]) if a == last else np.fft.fftfreq(x.shape[a])
            radius = radius + freq.reshape([-1 if b == a else 1 for b in range(x.ndim)]) ** 2
        radius = np.sqrt(radius)
        radius[(0,) * x.ndim] = 1.0
        x = np.fft.irfftn(np.fft.rfftn(x, axes=axes) / radius, s=[x.shape[a] for a in axes], axes=axes)
    dims = tuple(range(1, x.ndim))
    x = (x - x.mean(dims, keepdims=True)) / (x.std(dims, keepdims=True) + 1e-12)
    return x.astype(np.float32)


def input_range(g, feeds: dict[str, np.ndarray], name: str, seed: int) -> tuple[float, float, str] | None:
    """(mean, std, how it was read) of graph input `name` per sample, read from the first layer it reaches (see
    above); None where no such layer is found or the reading is degenerate. `feeds` (standardized noise) supplies
    the other inputs; the layer runs on RANGE_SAMPLES 1/f-noise samples (fewer for large inputs), an all-zeros and
    an all-ones one."""
    import torch

    from .torch_graph import TorchGraph  # torch: this module must import without it

    rank = feeds[name].ndim
    node, axes = _first_layer_reached(g, name, rank)
    if node is None or np.dtype(feeds[name].dtype).kind != "f":
        return None
    elements = int(np.prod(feeds[name].shape[1:]))
    samples = int(np.clip(RANGE_ELEMENTS // max(elements, 1), 2, RANGE_SAMPLES))
    z = pink_noise(np.random.default_rng([seed, 2]), samples, feeds[name].shape[1:],
                   _convolved_axes(node, axes, rank))
    batch = np.concatenate([np.zeros_like(z[:1]), np.ones_like(z[:1]), z]).astype(feeds[name].dtype)
    size, fixed = batch_size_for(g, len(batch), feeds)
    tg = TorchGraph(_prefix_model(g, node.output[0]))
    outs = []
    with torch.no_grad():
        for start in range(0, len(batch), size):
            part = {k: v[:1].repeat(min(size, len(batch) - start), 0) for k, v in feeds.items()}
            part[name] = batch[start:start + size]
            if fixed and len(part[name]) < size:  # a fixed batch: pad with zeros, cut after
                part = {k: np.concatenate([v, np.zeros((size - len(v), *v.shape[1:]), v.dtype)])
                        for k, v in part.items()}
            env = tg.initial_env(part)
            for i, n in enumerate(tg.nodes):
                tg.step(i, env)
                if n.output[0] == node.output[0]:
                    break
            outs.append(env[node.output[0]].float().numpy()[:min(size, len(batch) - start)])
    y = np.moveaxis(np.concatenate(outs), FIRST_LAYERS[node.op_type], 1)
    y = y.reshape(len(y), y.shape[1], -1).astype(np.float64)
    base = y[0].mean(1)
    gain = y[1].mean(1) - base                               # the response to a constant 1 per channel
    spread = (y[2:] - y[:1]).transpose(1, 0, 2).reshape(y.shape[1], -1).std(1)  # to unit-std noise
    bn = [c for c, _ in g.consumers.get(node.output[0], [])]
    if len(bn) == 1 and bn[0].op_type == "BatchNormalization" and g.const(bn[0].input[3]) is not None \
            and g.const(bn[0].input[4]) is not None:
        mean = np.asarray(g.const(bn[0].input[3]), np.float64).ravel()
        std = np.sqrt(np.maximum(np.asarray(g.const(bn[0].input[4]), np.float64).ravel(), 0))
        how = f"the running statistics of the BatchNormalization after the first {node.op_type}"
    else:
        mean, std = np.zeros_like(base), np.ones_like(base)
        how = f"the first {node.op_type}'s bias and weights, taken to hold a folded BatchNormalization"
    if mean.shape != base.shape:
        return None
    live = spread > 1e-9 * max(float(spread.max()), 1e-30)
    if not live.any():
        return None
    scale = float(np.median(std[live] / spread[live]))
    denom = float((gain * gain).sum())
    shift = float(((mean - base) * gain).sum() / denom) if denom > 1e-12 * max(float(np.abs(base).max()), 1.0) else 0.0
    if not (np.isfinite(scale) and np.isfinite(shift) and scale > 0):
        return None
    return shift, scale, how


def _prefix_model(g, output: str):
    """The nodes `output` depends on, with their weights and graph inputs, as a model of their own: the first
    layer runs without copying (or supporting) the rest of the network."""
    needed, stack = set(), [output]
    while stack:
        name = stack.pop()
        node = g.producer.get(name)
        if name in needed or node is None:
            continue
        needed.add(name)
        stack.extend(i for i in node.input if i)
    nodes = [n for n in g.nodes if any(o in needed for o in n.output)]
    used = {i for n in nodes for i in n.input if i}
    weights = [numpy_helper.from_array(np.asarray(g.const(i)), i) for i in sorted(used) if g.is_const(i)]
    inputs = [i for i in g.model.graph.input if i.name in used and not g.is_const(i.name)]
    graph = onnx.helper.make_graph(nodes, "first_layer", inputs,
                                   [onnx.helper.make_value_info(output, onnx.TypeProto())], weights)
    return onnx.helper.make_model(graph, opset_imports=g.model.opset_import, ir_version=g.model.ir_version)


def input_ranges(g, feeds: dict[str, np.ndarray], seed: int, notes: list,
                 given: tuple = ()) -> dict[str, tuple[float, float]]:
    """input name -> (mean, std) for the float inputs whose first layer reads as other than standardized; a note
    for each input read, mapped or not. The inputs in `given` (--input-range) are not read, but still feed the
    others' first layers."""
    ranges = {}
    for name in (k for k in feeds if k not in given):
        try:
            found = input_range(g, feeds, name, seed)
        except (SpaError, RuntimeError, ValueError, IndexError, TypeError) as e:  # a first layer torch cannot
            # run: the data passes will say so
            notes.append(f"data-free: input '{name}' taken as standardized (its first layer did not run: "
                         f"{one_line(e, 200)})")
            continue
        if found is None:
            continue
        shift, scale, how = found
        if abs(shift) <= STANDARDIZED[0] * scale and 1 / STANDARDIZED[1] <= scale <= STANDARDIZED[1]:
            notes.append(f"data-free: input '{name}' taken as standardized (mean 0, std 1): read from {how} as "
                         f"mean {shift:.3g}, std {scale:.3g}, close enough")
            continue
        ranges[name] = (shift, scale)
        notes.append(f"data-free: input '{name}' synthesized at mean {shift:.3g}, std {scale:.3g} per sample, "
                     f"read from {how}")
    return ranges


def given_ranges(feeds: dict[str, np.ndarray], given: dict, notes: list) -> dict[str, tuple[float, float]]:
    """--input-range: the (mean, std) the caller gave for each float input ('*': every one), with a note each;
    a name that is not a float input of the model is an error (a typo would otherwise be ignored)."""
    floats = [k for k, v in feeds.items() if v.dtype.kind == "f"]
    unknown = sorted(set(given) - {"*", *floats})
    if unknown:
        raise SpaError(f"--input-range names '{unknown[0]}', which is not a float input of the model (float inputs: "
                       f"{', '.join(floats) or 'none'})")
    ranges = {}
    for name in floats:
        value = given.get(name, given.get("*"))
        if value is not None:
            ranges[name] = (float(value[0]), float(value[1]))
            notes.append(f"data-free: input '{name}' synthesized at mean {ranges[name][0]:.3g}, std "
                         f"{ranges[name][1]:.3g} per sample (--input-range)")
    return ranges


def to_model_range(x, found: tuple[float, float] | None):
    """Standardized samples (numpy or torch) at an input's (mean, std); unchanged without one."""
    return x if found is None else found[0] + found[1] * x


def _unit_std(x):
    dims = list(range(1, x.dim()))
    mean = x.mean(dims, keepdim=True)
    return (x - mean) / (x.std(dims, keepdim=True) + 1e-6) + mean


def _blur(x: np.ndarray, passes: int, axes: tuple) -> np.ndarray:
    for _ in range(passes):
        for ax in axes:
            x = (np.roll(x, 1, ax) + 2 * x + np.roll(x, -1, ax)) / 4
    return x


def _integer_range(g, name: str, dtype) -> tuple[int, int]:
    """[low, high) to draw integer input `name` from: below the rows of the first table it indexes (token ids);
    a byte input cast to float (an image pipeline taking uint8 pixels) over its whole range; else 0."""
    for node, i in g.consumers.get(name, []):
        if node.op_type == "Gather" and i == 1:
            t = g.const(node.input[0])
            if t is not None:
                return 0, t.shape[0]
    if np.dtype(dtype).kind not in "iu":  # bool
        return 0, 1
    info = np.iinfo(dtype)
    if info.bits == 8 and any(node.op_type == "Cast" for node, _ in g.consumers.get(name, [])):
        return int(info.min), int(info.max) + 1
    return 0, 1


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
        # {"steps": N, "budget": MACs, "ranges": {name: (mean, std)}}, from the caller's options
        opts = inputs.cache.get("synthesis_options", {})
        ranges = given_ranges(cached, opts.get("ranges") or {}, inputs.notes)
        ranges.update(input_ranges(g, cached, inputs.seed, inputs.notes, given=tuple(ranges)))
        macs = float(getattr(inputs.analysis, "total_macs", 0) or 0)
        elements = inversion_bytes_per_sample(g) / 4
        steps = inversion_steps(macs, inputs.samples, opts.get("steps"), opts.get("budget"), elements)
        if steps:
            cached = invert_in_parts(g, cached, inputs, steps, ranges)
        elif opts.get("steps") == 0:
            inputs.notes.append("data-free: noise inputs (the inversion is switched off)")
        else:
            budget = opts.get("budget", INVERSION_BUDGET_MACS)
            inputs.notes.append(f"data-free: noise inputs, not inverted (the inversion budget of {budget:.3g} "
                                f"MACs and {INVERSION_BUDGET_ELEMENTS:.3g} activation elements allows fewer than "
                                f"{INVERSION_MIN_STEPS} steps over {inputs.samples} samples of {macs:.3g} MACs, "
                                f"{elements:.3g} elements)")
        cached = {k: to_model_range(v, ranges.get(k)) for k, v in cached.items()}
        inputs.cache["synthesized"] = cached
    return cached, inputs.samples
