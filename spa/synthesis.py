"""The inputs the data-driven passes run on: the calibration data, or, data-free, inputs synthesized from the
model alone (noise shaped to the input, then optimized towards the statistics the model itself records, where
it records any)."""
from __future__ import annotations

import time

import numpy as np

from .calib import input_specs
from .errors import SpaError
from .execution import batch_size_for, run_model
from .memory import array_bytes, check_memory


def synthesize(specs: dict, shapes: dict, n: int, seed: int, g=None) -> dict[str, np.ndarray]:
    """Data-free inputs: for float inputs, half white Gaussian noise and half smooth noise (white noise blurred
    over the spatial axes and rescaled to unit variance), both in the model's own (normalized) input space;
    integer inputs (token ids) are drawn uniformly below the size of the first table they index, else 0."""
    # the float arrays live three times over while they are made (noise, smooth noise, the cast)
    need = sum(array_bytes((n, *shapes[name][1:]), np.float32) * (3 if np.dtype(dtype).kind == "f" else 1)
               for name, (_, dtype) in specs.items())
    check_memory(need, f"{n} synthesized samples (--synth-samples) at " + ", ".join(
        f"{name}={'x'.join(map(str, shapes[name][1:]))}" for name in specs))
    rng = np.random.default_rng(seed)
    out = {}
    for name, (_, dtype) in specs.items():
        shape = (n, *shapes[name][1:])
        if np.dtype(dtype).kind == "f":
            x = rng.standard_normal(shape).astype(np.float32)
            if len(shape) >= 3:
                half = n // 2
                smooth = _blur(rng.standard_normal((n - half, *shape[1:])).astype(np.float32), 3)
                smooth /= smooth.std(axis=tuple(range(1, len(shape))), keepdims=True) + 1e-6
                x[half:] = smooth
            out[name] = x.astype(dtype)
        else:
            high = _table_rows(g, name) if g is not None else 1
            out[name] = rng.integers(0, max(high, 1), size=shape).astype(dtype)
    return out


def match_bn_statistics(g, feeds: dict[str, np.ndarray], inputs, steps: int = 60, lr: float = 0.1):
    """Where BatchNormalization nodes survived the export, their running statistics describe the training data:
    optimize the synthesized float inputs (Adam) so that every BN node's input has, per channel, the running
    mean and variance (ZeroQ-style distilled data). Each BN node's loss is normalized by its variance."""
    import torch

    from .torch_graph import TorchGraph  # torch: this module must import without it

    t0 = time.perf_counter()
    tg = TorchGraph(g)
    for p in tg.parameters():
        p.requires_grad_(False)
    targets = {}
    for node in tg.nodes:
        if node.op_type == "BatchNormalization" and len(node.input) >= 5:
            mean, var = g.const(node.input[3]), g.const(node.input[4])
            if mean is not None and var is not None:
                targets[node.name] = (torch.from_numpy(np.array(mean, np.float32)),
                                      torch.from_numpy(np.array(var, np.float32)))
    xs = {k: torch.tensor(v, requires_grad=np.dtype(v.dtype).kind == "f") for k, v in feeds.items()}
    n = int(next(iter(feeds.values())).shape[0])
    size, fixed = batch_size_for(g, n, feeds)
    opt = torch.optim.Adam([x for x in xs.values() if x.requires_grad], lr=lr)
    first = last = None
    for it in range(steps):
        sums: dict[str, list] = {}  # BN node -> [sum x, sum x^2, count] over the chunks (a fixed batch runs in parts)

        def hook(node, ins, outs, sums=sums):
            if node.name not in targets:
                return
            x = ins[0]
            dims = [0, *range(2, x.dim())]
            acc = sums.setdefault(node.name, [0.0, 0.0, 0])
            acc[0] = acc[0] + x.sum(dims)
            acc[1] = acc[1] + (x * x).sum(dims)
            acc[2] += x.numel() // x.shape[1]

        opt.zero_grad()
        for start in range(0, n - size + 1 if fixed else n, size):
            run_model(tg, {k: v[start:start + size] for k, v in xs.items()}, hook=hook)
        losses = []
        for name, (s1, s2, count) in sums.items():
            mean, var = targets[name]
            m = s1 / count
            v = s2 / count - m * m
            scale = var.clamp_min(1e-6)
            losses.append(((m - mean) ** 2 / scale).mean() + ((v - var) ** 2 / scale ** 2).mean())
        if not losses:
            break
        loss = torch.stack(losses).mean()
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if first is None else first
        if it % 20 == 0:
            inputs.progress(f"data-free: matching BN statistics {it}/{steps}")
    inputs.notes.append(f"data-free: inputs optimized to match {len(targets)} BatchNormalization nodes' running "
                        f"statistics (loss {first:.3g} -> {last:.3g}, {steps} Adam steps, "
                        f"{time.perf_counter() - t0:.1f} s)")
    return {k: x.detach().numpy() for k, x in xs.items()}


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
        if any(n.op_type == "BatchNormalization" for n in g.model.graph.node):
            cached = match_bn_statistics(g, cached, inputs)
        inputs.cache["synthesized"] = cached
    return cached, inputs.samples
