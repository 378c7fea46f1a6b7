"""Running the input model on sample batches (torch): whole batches when the export fixed the batch size, and a
model that cannot run is one line of bad input, not a traceback. Shared by OBS scoring, gradient criteria,
data-free synthesis, reconstruction, fine-tuning and the search's sample sets."""
from __future__ import annotations

import importlib
import math
import sys
import threading

import numpy as np

from .calib import input_specs
from .errors import SpaError, one_line
from .memory import array_bytes


def import_torch_in_background() -> None:
    """Start importing torch in a daemon thread: the data passes need it once the model is loaded, normalized and
    analysed, and its 1.2-1.5 s of mostly single-threaded start-up (ResNet-50's default run: a tenth of it)
    then overlaps that work. A failure is left to the passes' own import, which says what is wrong."""
    if "torch" in sys.modules:
        return

    def work() -> None:
        try:
            importlib.import_module("torch")
        except BaseException:  # noqa: BLE001 - the passes' own import raises it again, where it is handled
            pass

    threading.Thread(target=work, name="spa-import-torch", daemon=True).start()


def run_model(tg, feeds, hook=None):
    """One torch run of the input model; a model that cannot run (a malformed input the loader let through) is
    bad input, one line, not a traceback."""
    try:
        return tg.run(feeds, hook=hook)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise SpaError(f"the input model does not run on the calibration/synthesized inputs (are the input shapes "
                       f"right? --input-shape sets them): {one_line(e, 300)}")


def run_layerwise(tg, batches: list[dict], hook, progress=None) -> None:
    """Run the input model over every batch node by node: each node on all batches, then
    `hook(node, k, inputs, outputs)` for each batch k, before the next node. A layer's statistics over all samples
    are then complete right after it ran (and can be used and freed: one layer's at a time), at the memory of all
    batches' live activations (as one large batch). Errors as in `run_model`."""
    envs = [tg.initial_env(b) for b in batches]
    nodes = list(tg.nodes)
    outputs = set(tg.output_names)
    try:
        for i, node in enumerate(nodes):
            dying = set(tg.free_after(i)) - outputs   # a Relu/Add may write into these (the hooks copy what they keep)
            for k, env in enumerate(envs):
                outs = tg.step(i, env, reuse=dying)
                hook(node, k, [env.get(x) if x else None for x in node.input], outs)
                for name in tg.free_after(i):
                    env.pop(name, None)
            if progress is not None and i % 10 == 0:
                progress(f"{i + 1}/{len(nodes)} nodes")
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise SpaError(f"the input model does not run on the calibration/synthesized inputs (are the input shapes "
                       f"right? --input-shape sets them): {one_line(e, 300)}")


def fast_layout(tg):
    """`tg` (a TorchGraph) with its 4-D weights in channels_last memory layout: its convolutions then run (and
    their outputs stay) channels_last, same values up to rounding, ~1.4x less CPU on ResNet-50 here. Only 4-D
    tensors are laid out so (Module.to would also reach 5-D ones, for which channels_last does not exist: a
    transformer's folded 5-D constant raised a traceback)."""
    import torch

    with torch.no_grad():
        for t in (*tg.parameters(), *tg.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return tg


def batch_size_for(g, default: int, feeds: dict[str, np.ndarray] | None = None) -> tuple[int, bool]:
    """Samples per run, and whether that size is fixed. A model exported with a fixed batch dim (often 1) may
    have the batch baked into Reshape constants; it is probed once: when a run on two samples gives exactly the
    two single-sample results, any batch size is used, else batches of the exported size."""
    fixed = None
    for shape, _ in input_specs(g.model).values():
        if shape and isinstance(shape[0], int) and shape[0] > 0:
            fixed = shape[0]
            break
    if fixed is None:
        return default, False
    if fixed != 1 or feeds is None or min(v.shape[0] for v in feeds.values()) < 2:
        return fixed, True
    cached = getattr(g, "_batch_probe", None)
    if cached is None:
        cached = g._batch_probe = _batch_polymorphic(g, feeds)
    return (default, False) if cached else (fixed, True)


def batch_free_polymorphic(g, feeds) -> bool:
    """Whether a model exported at batch 1 that `batch_size_for` keeps at batch 1 (a Reshape bakes the batch:
    torch.onnx's dynamo exports) runs several samples at once as TorchGraph(g, batch_free=True), each sample's
    result its own (the same probe as batch_size_for's)."""
    size, fixed = batch_size_for(g, 2, feeds)
    if not fixed or size != 1 or feeds is None or min(v.shape[0] for v in feeds.values()) < 2:
        return False
    cached = getattr(g, "_batch_free_probe", None)
    if cached is None:
        cached = g._batch_free_probe = _batch_polymorphic(g, feeds, batch_free=True)
    return cached


def _batch_polymorphic(g, feeds, batch_free: bool = False) -> bool:
    import torch

    from .torch_graph import TorchGraph  # torch: this module must import without it

    tg = TorchGraph(g, batch_free=batch_free)
    try:
        with torch.no_grad():
            pair = tg.run({k: torch.from_numpy(np.ascontiguousarray(v[:2])) for k, v in feeds.items()})
            singles = [tg.run({k: torch.from_numpy(np.ascontiguousarray(v[i:i + 1])) for k, v in feeds.items()})
                       for i in range(2)]
    except Exception:  # noqa: BLE001 - any failure means: keep the exported batch size
        return False
    for name, t in pair.items():
        if t.dim() == 0 or t.shape[0] != 2:
            return False
        ref = torch.cat([s[name] for s in singles]).float()
        scale = float(ref.nan_to_num(0.0, 0.0, 0.0).abs().max()) if ref.numel() else 0.0
        if ref.shape != t.shape or not torch.allclose(t.float(), ref, rtol=1e-4, atol=1e-5 * scale + 1e-6,
                                                       equal_nan=True):
            return False
    return True


MMAP_CAP_BYTES = 32 << 20  # glibc never serves a block above this from its heap (its dynamic mmap threshold's cap)


def data_pass_batch(g, default: int, feeds: dict[str, np.ndarray] | None = None) -> tuple[int, bool]:
    """`batch_size_for` for the torch data passes: a baked batch of 1 that `batch_free_polymorphic` lifts is a
    free batch there (the pass then builds its TorchGraph with batch_free=True)."""
    size, fixed = batch_size_for(g, default, feeds)
    return (default, False) if fixed and batch_free_polymorphic(g, feeds) else (size, fixed)


def layerwise_batch(g, default: int, feeds: dict[str, np.ndarray] | None = None) -> tuple[int, bool]:
    """`data_pass_batch`, and for a free batch dim at most as many samples as keep one chunk's widest activation
    under glibc's 32 MiB mmap cap. Larger blocks are fresh mmaps, zero-filled page by page at every node and
    returned at every free: ResNet-50 at 224² spent 2.9 s of system time per pass over 64 samples in chunks of
    64, 0.5-0.7 s in chunks of 7-10 (same user time). For the passes that sum statistics over chunks."""
    size, fixed = data_pass_batch(g, default, feeds)
    if fixed:
        return size, fixed
    widest = max((math.prod(s[1:]) for name, s in g.shapes.items()
                  if len(s) >= 2 and not g.is_const(name) and all(isinstance(d, int) and d > 0 for d in s)),
                 default=0) * 4
    return (max(1, min(size, (MMAP_CAP_BYTES - 1) // widest)) if widest else size), False


def sample_bytes(g, name: str) -> int:
    """Bytes of one sample of tensor `name` at its inferred shape (float32, batch dim dropped); 0 where the
    shape is unknown or a dim after the batch is symbolic (Swin's window reshapes)."""
    shape = g.shapes.get(name)
    if not shape or not all(isinstance(d, int) for d in shape[1:]):
        return 0
    return array_bytes(shape[1:], np.float32)


def activation_bytes_per_sample(g) -> int:
    """The most bytes of activations alive at once when the model runs node by node at its inferred shapes,
    per sample (`sample_bytes`). The layer-wise passes (scoring, refit) hold every sample's activations at each
    node, so their memory is this times the samples."""
    nodes = list(g.model.graph.node)
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in [*node.input, *node.output]:
            if name and not g.is_const(name):
                last[name] = i
    live = peak = sum(sample_bytes(g, name) for name in g.input_names if name in last)
    for i, node in enumerate(nodes):
        live += sum(sample_bytes(g, o) for o in node.output if o)
        peak = max(peak, live)
        live -= sum(sample_bytes(g, x) for x in set(node.input) | set(node.output) if x and last.get(x) == i)
    return peak


def input_bytes_per_sample(g) -> int:
    """Bytes of one sample of the graph's inputs (`sample_bytes`)."""
    return sum(sample_bytes(g, name) for name in g.input_names)


def chunk_count(n: int, size: tuple[int, bool]) -> int:
    """How many batches `chunks` yields for n samples."""
    size, fixed = size
    return len(range(0, n - size + 1 if fixed else n, size))


def chunks(feeds: dict[str, np.ndarray], n: int, size: tuple[int, bool]):
    """Batches of `size[0]` samples; with a fixed batch size a short last batch is dropped."""
    import torch

    size, fixed = size
    for start in range(0, n - size + 1 if fixed else n, size):
        yield {k: torch.from_numpy(np.ascontiguousarray(v[start:start + size])) for k, v in feeds.items()}
