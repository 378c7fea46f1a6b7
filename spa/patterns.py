"""Pattern (kernel-shape) pruning: each convolution kernel keeps at most K of its positions, in one shape of a
small library, the rest exact zeros; whole kernels may go too (connectivity pruning, the empty pattern).

The library (`library`) for a kernel of shape (kh, kw) (1-D: (k,)) and K kept positions: every set of K positions
that contains the kernel's centre and is 4-connected (1-D: a run of K consecutive taps through the centre). For
3×3 that is 1, 4, 14, 28, 41, 40 shapes at K = 1..6 (K >= 9: the full kernel); 5×5 has 72 at K = 4 and 764 at
K = 6; a 1-D kernel of 5 taps has 2 at K = 4. A kernel of at most K positions is left dense.

Choice per kernel (`choose`): the pattern of the layer's allowed set (default: the whole library) that keeps the
most weight energy Σ w² (magnitude), or, given the inverse Hessian of the layer's input, the smallest OBS error
½ w_Qᵀ([H⁻¹]_QQ)⁻¹ w_Q of zeroing the rest Q of the kernel (each kernel on its own input channel's block).
Connectivity pruning then empties the share `connectivity` of each layer's kernels that keep the least.

Reconstruction (`refit_masked`) is OBSPA's ridge least squares restricted, per output channel, to the positions
its kernels keep: each output row has its own support S, solved with the input Gram restricted to S.

Storage (`sparse_storage`): ONNX's sparse_initializer loads in onnxruntime 1.32 but fails onnx.checker's full
check (shape inference does not see it) and stores one int64 index per non-zero (12 bytes per kept weight,
larger than dense at 4 of 9). Instead each patterned weight is written as its kept values (K per kernel,
float), one pattern id per kernel (uint8/uint16) and the library's table (int32, one per library), rebuilt at
load by Gather +
ScatterElements + Reshape (constant inputs only: onnxruntime folds them into the dense weight when the session
is created, so it runs the same dense kernels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import SpaError
from .obspa import damped, psd_inverse

LARGEST_PATTERN = 24  # --patterns K: a K beyond a 5×5 kernel's positions keeps everything


@dataclass(frozen=True)
class PatternLibrary:
    """The K-position shapes of one kernel shape: `masks` (P x positions, bool, row-major over the kernel)."""

    kernel: tuple
    k: int
    masks: np.ndarray

    @property
    def size(self) -> int:
        return len(self.masks)

    def table(self) -> np.ndarray:
        """Each pattern's kept positions (P x K, int64, ascending)."""
        return np.stack([np.flatnonzero(m) for m in self.masks]).astype(np.int64)


_LIBRARIES: dict[tuple, PatternLibrary] = {}


def library(kernel: tuple, k: int) -> PatternLibrary:
    """Every K-subset of the kernel's positions that contains the centre and is 4-connected (grown cell by cell
    from the centre), in a fixed order (sorted position tuples). K >= the kernel's positions: the full kernel."""
    kernel = tuple(int(s) for s in kernel)
    key = (kernel, int(k))
    if key in _LIBRARIES:
        return _LIBRARIES[key]
    if len(kernel) not in (1, 2) or k < 1:
        raise SpaError(f"no pattern library for a {'x'.join(map(str, kernel))} kernel")
    grid = kernel if len(kernel) == 2 else (1, kernel[0])
    n = grid[0] * grid[1]
    centre = (grid[0] // 2) * grid[1] + grid[1] // 2
    if k >= n:
        masks = np.ones((1, n), bool)
    else:
        level = {frozenset([centre])}
        for _ in range(k - 1):
            grown = set()
            for shape in level:
                for p in shape:
                    r, c = divmod(p, grid[1])
                    for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < grid[0] and 0 <= cc < grid[1] and rr * grid[1] + cc not in shape:
                            grown.add(shape | {rr * grid[1] + cc})
            level = grown
        shapes = sorted(tuple(sorted(s)) for s in level)
        masks = np.zeros((len(shapes), n), bool)
        for i, s in enumerate(shapes):
            masks[i, list(s)] = True
    lib = _LIBRARIES[key] = PatternLibrary(kernel, int(k), masks)
    return lib


def patterned(w: np.ndarray, k: int) -> bool:
    """Whether a conv weight (O x C/g x kernel) gets patterns at K: a 1-D/2-D kernel of more than K positions."""
    return w.ndim in (3, 4) and math.prod(w.shape[2:]) > k


# ---- choosing one pattern per kernel ---------------------------------------------------------------------------------
def choose(w: np.ndarray, lib: PatternLibrary, *, allowed=None, hinv=None, connectivity: float = 0.0) -> np.ndarray:
    """The pattern index of each kernel of `w` (O x C/g x kernel), -1 for an emptied kernel.

    allowed: indices into the library the layer may use (default all). hinv: per input channel of the kernels,
    the inverse Hessian block over its positions (C/g x n x n): the choice then minimizes the OBS error of the
    zeroed positions instead of maximizing the kept energy. connectivity: the share of the layer's kernels
    emptied (those whose chosen pattern keeps the least energy / costs the most to empty)."""
    o, c = w.shape[:2]
    flat = np.asarray(w, np.float64).reshape(o, c, -1)
    idx = np.arange(lib.size) if allowed is None else np.asarray(sorted(set(int(a) for a in allowed)))
    if not len(idx) or idx.min() < 0 or idx.max() >= lib.size:
        raise SpaError(f"allowed patterns must be indices in [0, {lib.size}) of the {lib.size}-shape library")
    keep = lib.masks[idx].astype(np.float64)                                   # (P, n)
    if hinv is None:
        gain = np.einsum("ocn,pn->ocp", flat * flat, keep)                     # kept energy
        best = gain.argmax(axis=2)
        cost_empty = np.take_along_axis(gain, best[..., None], 2)[..., 0]     # what emptying loses
    else:
        err = np.stack([obs_errors(flat, hinv, 1.0 - keep[p]) for p in range(len(idx))], axis=2)   # (O, C, P)
        best = err.argmin(axis=2)
        cost_empty = obs_errors(flat, hinv, np.ones(flat.shape[2])) - np.take_along_axis(err, best[..., None], 2)[..., 0]
    ids = idx[best]
    drop = int(math.floor(connectivity * o * c + 1e-9))
    if drop > 0:
        order = np.argsort(cost_empty, axis=None, kind="stable")[:drop]
        ids.reshape(-1)[order] = -1
    return ids


def obs_errors(flat: np.ndarray, hinv: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """½ w_Qᵀ([H⁻¹]_QQ)⁻¹ w_Q per kernel (O x C), Q = the positions where `zero` is 1, H⁻¹ per input channel
    (C x n x n)."""
    q = np.flatnonzero(zero)
    if not len(q):
        return np.zeros(flat.shape[:2])
    inv = np.linalg.inv(hinv[:, q[:, None], q[None, :]])                       # (C, q, q)
    wq = flat[:, :, q]                                                         # (O, C, q)
    return 0.5 * np.einsum("ocq,cqr,ocr->oc", wq, inv, wq)


def mask_of(ids: np.ndarray, lib: PatternLibrary, shape: tuple) -> np.ndarray:
    """The weight-shaped keep mask of pattern indices `ids` (O x C/g; -1: empty)."""
    rows = np.concatenate([lib.masks, np.zeros((1, lib.masks.shape[1]), bool)])
    return rows[ids].reshape(shape)


# ---- a model's patterned convolutions -----------------------------------------------------------------------------
@dataclass
class LayerPattern:
    """One convolution's patterns: its node and weight, the library and the keep mask (weight-shaped)."""

    node: str
    weight: str
    lib: PatternLibrary
    mask: np.ndarray
    dense: np.ndarray | None = None      # the weight before masking (a refit may choose again, by OBS)
    allowed: object = None
    connectivity: float = 0.0


def pattern_layers(g, k: int) -> list:
    """(node, weight array) of every Conv whose constant 1-D/2-D weight has more than K positions per kernel (any
    group count: depthwise and grouped convolutions too). A weight shared by several nodes is left dense."""
    out = []
    for node in g.nodes:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        w = g.const(node.input[1])
        if w is None or w.dtype.kind != "f" or not patterned(w, k) or len(g.consumers.get(node.input[1], [])) > 1:
            continue
        out.append((node, w))
    return out


def apply_patterns(g, k: int, *, connectivity: float = 0.0, allowed: dict | None = None,
                   hinvs: dict | None = None, per_layer: dict | None = None) -> dict[str, LayerPattern]:
    """Choose and apply a pattern for every kernel of every patterned conv (weights zeroed outside the chosen
    shapes, in place in `g`). allowed / hinvs: per node name, as `choose`. per_layer: node name -> (K,
    connectivity) replacing `k` / `connectivity` for that conv (a searched assignment, spa.search.sculpt; a K
    of at least the kernel's positions keeps its kernels whole, emptying only the connectivity share). Returns
    node name -> LayerPattern."""
    layers = {}
    per_layer = per_layer or {}
    for node, w in pattern_layers(g, 1 if per_layer else k):
        k_l, conn = per_layer.get(node.name, (k, connectivity))
        k_l, conn = int(k_l), float(conn)
        if not patterned(w, k_l) and not (node.name in per_layer and conn > 0):
            continue
        lib = library(w.shape[2:], k_l)
        ids = choose(w, lib, allowed=(allowed or {}).get(node.name), hinv=(hinvs or {}).get(node.name),
                     connectivity=conn)
        mask = mask_of(ids, lib, w.shape)
        g.set_const(node.input[1], np.where(mask, w, 0).astype(w.dtype))
        layers[node.name] = LayerPattern(node.name, node.input[1], lib, mask, np.array(w),
                                         (allowed or {}).get(node.name), conn)
    return layers


def check_patterns(g, layers: dict[str, LayerPattern]) -> None:
    """Every patterned weight is exactly zero outside its mask, and each kernel's mask is one library shape or
    empty (a structural check: a violation is an internal error)."""
    for lp in layers.values():
        w = g.const(lp.weight)
        if w is None or w.shape != lp.mask.shape or np.any(w[~lp.mask] != 0):
            raise SpaError(f"internal: the pattern-pruned weight '{lp.weight}' has non-zeros outside its patterns")
        rows = lp.mask.reshape(-1, lp.mask[0, 0].size)
        known = {m.tobytes() for m in lp.lib.masks} | {np.zeros(rows.shape[1], bool).tobytes()}
        if any(r.tobytes() not in known for r in rows):
            raise SpaError(f"internal: a kernel of '{lp.weight}' is not one of the library's shapes")


def pattern_macs(g, layers: dict[str, LayerPattern]) -> tuple[int, int]:
    """(MACs the patterned convolutions skip outside their patterns, their dense MACs), from the static output
    shapes (output positions per channel x weights outside the masks); a conv without a static output shape
    counts 0."""
    skipped = dense = 0
    for node in g.nodes:
        lp = layers.get(node.name)
        shape = g.shapes.get(node.output[0]) if lp is not None else None
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            continue
        positions = shape[0] * math.prod(shape[2:])
        w = g.const(lp.weight)
        dense += positions * w.size
        skipped += positions * int(lp.mask.size - np.count_nonzero(lp.mask))
    return skipped, dense


def report_section(g, layers: dict[str, LayerPattern], k: int, connectivity: float, dense_macs: int,
                   original_macs: int) -> dict:
    """The report's patterns section: libraries, counts and pattern-aware MACs (what a kernel that skips the
    zeros would execute; onnxruntime itself runs the dense kernels)."""
    skipped, conv_dense = pattern_macs(g, layers)
    kernels = sum(lp.mask.shape[0] * lp.mask.shape[1] for lp in layers.values())
    empty = sum(int((~lp.mask.reshape(lp.mask.shape[0], lp.mask.shape[1], -1).any(axis=2)).sum())
                for lp in layers.values())
    weights = sum(lp.mask.size for lp in layers.values())
    libs = {"x".join(map(str, lp.lib.kernel)): lp.lib.size for lp in layers.values()}
    aware = dense_macs - skipped
    return {"k": k, "connectivity": connectivity, "libraries": libs, "layers": len(layers), "kernels": kernels,
            "kernels_emptied": empty, "weights": weights,
            "weights_kept": sum(int(lp.mask.sum()) for lp in layers.values()),
            "macs": {"original": original_macs, "dense": dense_macs, "pattern_aware": aware,
                     "pattern_aware_ratio": aware / max(original_macs, 1), "patterned_convs_dense": conv_dense}}


# ---- reconstruction restricted to the kept positions ----------------------------------------------------------------
def refit_masked(w_p: np.ndarray, gram, damp: float, support: np.ndarray) -> np.ndarray:
    """spa.obspa.refit with each output row's solution restricted to its support (O' x D bool; zeros elsewhere):
    per row o, (H_SS + λI) w_S = (XᵀY)_S,o / n + λ w_p[o, S], H = XᵀX / n dampened as in the unrestricted refit."""
    import torch

    h = gram.xx / gram.n
    hd, lam = damped(h, damp)
    hd = torch.from_numpy(np.asarray(hd, np.float64))
    xy = gram.xy.astype(np.float64) / gram.n
    new = np.zeros_like(w_p, dtype=np.float64)
    rows: dict[bytes, list[int]] = {}
    for o in range(w_p.shape[0]):          # output rows with the same support share one factorization
        rows.setdefault(support[o].tobytes(), []).append(o)
    for members in rows.values():
        s = np.flatnonzero(support[members[0]])
        if not len(s):
            continue
        a = hd[s[:, None], s[None, :]]
        rhs = xy[s][:, members] + lam * w_p[members][:, s].T
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            sol = torch.cholesky_solve(torch.from_numpy(np.ascontiguousarray(rhs)), chol).numpy()
        else:
            sol = np.linalg.lstsq(a.numpy(), rhs, rcond=None)[0]
        new[np.asarray(members)[:, None], s[None, :]] = sol.T
    return new


class GroupedGram:
    """spa.obspa.Gram for a grouped conv: one XᵀX / XᵀY per group, from full rows X (P x C·k) and outputs Y
    (P x O): group i's output rows see only its C/G input channels' columns (and a ones column per group for the
    bias)."""

    BLOCK_BYTES = 32 << 20   # the float64 copies of one block of groups (a depthwise conv has hundreds)

    def __init__(self, groups: int, bias: bool):
        self.groups, self.bias = groups, bias
        self.xx = self.xy = None
        self.n = 0

    def add(self, x, y):
        a = x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)
        b = y.detach().numpy() if hasattr(y, "detach") else np.asarray(y)
        p, gs = a.shape[0], self.groups
        xs, ys = a.reshape(p, gs, -1), b.reshape(p, gs, -1)
        i = xs.shape[2] + self.bias
        if self.xx is None:
            self.xx = np.zeros((gs, i, i))
            self.xy = np.zeros((gs, i, ys.shape[2]))
        step = max(1, self.BLOCK_BYTES // (8 * p * i))
        for g0 in range(0, gs, step):                     # (groups, P, i) per block: batched BLAS
            block = np.empty((min(step, gs - g0), p, i))
            block[:, :, :xs.shape[2]] = xs[:, g0:g0 + step].transpose(1, 0, 2)
            if self.bias:                                 # the ones column, once per group
                block[:, :, -1] = 1.0
            self.xx[g0:g0 + step] += block.transpose(0, 2, 1) @ block
            self.xy[g0:g0 + step] += block.transpose(0, 2, 1) @ ys[:, g0:g0 + step].transpose(1, 0, 2)
        self.n += p


def refit_grouped(w_p: np.ndarray, gram: GroupedGram, damp: float, support: np.ndarray) -> np.ndarray:
    """`refit_masked` per group of a grouped conv (w_p, support: O' x (C/G·k [+ 1]))."""
    per = w_p.shape[0] // gram.groups
    if support.all():
        return refit_groups_dense(w_p, gram, damp)
    new = np.zeros_like(w_p, dtype=np.float64)
    for i in range(gram.groups):
        rows = slice(i * per, (i + 1) * per)
        part = SimpleNamespace(xx=gram.xx[i], xy=gram.xy[i], n=gram.n)
        new[rows] = refit_masked(w_p[rows], part, damp, support[rows])
    return new


def refit_groups_dense(w_p: np.ndarray, gram: GroupedGram, damp: float) -> np.ndarray:
    """`refit_grouped` where every weight is free (a searched K that keeps whole kernels and empties none): all
    groups' dampened systems in one batched Cholesky solve instead of one factorization per group (a depthwise
    conv has one group per channel)."""
    import torch

    groups, i = gram.xx.shape[:2]
    h = np.asarray(gram.xx, np.float64) / gram.n                        # (G, i, i)
    lam = damp * np.maximum(np.einsum("gjj->gj", h).mean(1), 1e-12)     # spa.obspa.damped, per group
    diag = np.arange(i)
    h[:, diag, diag] += lam[:, None]
    w = np.asarray(w_p, np.float64).reshape(groups, -1, i)             # (G, rows per group, i)
    rhs = np.asarray(gram.xy, np.float64) / gram.n + lam[:, None, None] * w.transpose(0, 2, 1)
    chol, info = torch.linalg.cholesky_ex(torch.from_numpy(h))
    sol = torch.cholesky_solve(torch.from_numpy(np.ascontiguousarray(rhs)), chol).numpy()
    for g in np.flatnonzero(info.numpy()):                               # not positive definite: least squares
        sol[g] = np.linalg.lstsq(h[g], rhs[g], rcond=None)[0]
    return sol.transpose(0, 2, 1).reshape(w_p.shape)


def choose_by_obs(lp: LayerPattern, gram, damp: float) -> np.ndarray:
    """The layer's masks chosen again, by OBS error on the Hessian of its actual input (gram: spa.obspa.Gram of
    a group-1 conv, columns channel-major, a bias column last if any), from its dense weight; updates lp.mask."""
    h = gram.xx / gram.n
    hd, _ = damped(h, damp)
    hinv = psd_inverse(np.asarray(hd, np.float64))
    c, n = lp.dense.shape[1], math.prod(lp.dense.shape[2:])
    idx = np.arange(c * n).reshape(c, n)
    blocks = np.asarray(hinv, np.float64)[idx[:, :, None], idx[:, None, :]]
    ids = choose(lp.dense, lp.lib, allowed=lp.allowed, hinv=blocks, connectivity=lp.connectivity)
    lp.mask = mask_of(ids, lp.lib, lp.dense.shape)
    return lp.mask


def refit_support(view, mask: np.ndarray) -> np.ndarray:
    """The refit's support (O' x D, + a bias column when the layer has one) from a weight-shaped keep mask."""
    m = view.matrix(mask)
    return np.concatenate([m, np.ones((m.shape[0], 1), bool)], 1) if view.bias is not None else m


# ---- compact storage ------------------------------------------------------------------------------------------------
def sparse_storage(model: onnx.ModelProto, layers: dict[str, LayerPattern]) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` whose patterned weights are stored as (kept values, pattern id per kernel, a shared
    library table) and rebuilt at load (module docstring). Returns (model, {"weights": n, "bytes_dense": b,
    "bytes_compact": b'})."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise SpaError(f"--sparse-storage needs opset >= 13 (ScatterElements, Gather on int64); the model has {opset}")
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | graph_inputs
    new_nodes = []
    tables: dict[tuple, str] = {}   # one table per library, shared by its weights
    stats = {"weights": 0, "bytes_dense": 0, "bytes_compact": 0}
    for lp in layers.values():
        t = inits.get(lp.weight)
        if t is None or lp.weight in graph_inputs or t.data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(t)
        o, c = w.shape[:2]
        n = math.prod(w.shape[2:])
        rows = lp.mask.reshape(o * c, n)
        table = lp.lib.table()
        index = {m.tobytes(): i for i, m in enumerate(lp.lib.masks)}
        ids = np.array([index.get(r.tobytes(), 0) for r in rows], np.int64)     # empty kernels: pattern 0, zeros
        values = np.take_along_axis(w.reshape(o * c, n), table[ids], 1).astype(np.float32)
        values[~rows.any(axis=1)] = 0.0
        ids_dtype = np.uint8 if lp.lib.size <= 256 else np.uint16

        def fresh(base):
            name, i = base, 1
            while name in names:
                name, i = f"{base}_{i}", i + 1
            names.add(name)
            return name

        v, p, sh, pid, pos, zeros, flat = (fresh(f"{lp.weight}__{s}") for s in (
            "values", "pattern", "shape", "pattern_i64", "positions", "zeros", "dense"))
        key = (lp.lib.kernel, lp.lib.k)
        if key not in tables:
            tables[key] = fresh(f"pattern_table_{'x'.join(map(str, lp.lib.kernel))}_k{lp.lib.k}")
            graph.initializer.append(numpy_helper.from_array(table.astype(np.int32), tables[key]))
            stats["bytes_compact"] += table.size * 4
        tb = tables[key]
        graph.initializer.remove(t)
        graph.initializer.extend([numpy_helper.from_array(values, v), numpy_helper.from_array(ids.astype(ids_dtype), p),
                                  numpy_helper.from_array(np.array(w.shape, np.int64), sh)])
        new_nodes += [
            helper.make_node("Cast", [p], [pid], to=onnx.TensorProto.INT64, name=fresh(f"{lp.weight}__cast")),
            helper.make_node("Gather", [tb, pid], [pos], axis=0, name=fresh(f"{lp.weight}__gather")),
            helper.make_node("ConstantOfShape", [fresh_shape := fresh(f"{lp.weight}__rows_shape")], [zeros],
                             value=numpy_helper.from_array(np.zeros(1, np.float32)), name=fresh(f"{lp.weight}__zeros")),
            helper.make_node("ScatterElements", [zeros, pos, v], [flat], axis=1, name=fresh(f"{lp.weight}__scatter")),
            helper.make_node("Reshape", [flat, sh], [lp.weight], name=fresh(f"{lp.weight}__reshape")),
        ]
        graph.initializer.append(numpy_helper.from_array(np.array([o * c, n], np.int64), fresh_shape))
        stats["weights"] += 1
        stats["bytes_dense"] += w.nbytes
        stats["bytes_compact"] += values.nbytes + ids.size * np.dtype(ids_dtype).itemsize
    if new_nodes:
        rest = list(graph.node)
        del graph.node[:]
        graph.node.extend(new_nodes + rest)
    return out, stats


__all__ = ["LARGEST_PATTERN", "LayerPattern", "PatternLibrary", "apply_patterns", "check_patterns", "choose",
           "library", "mask_of", "pattern_layers", "pattern_macs", "patterned",
           "refit_masked", "refit_support", "report_section", "sparse_storage"]
