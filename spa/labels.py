"""Channels as atoms: union-find over atoms, per-tensor labellings, and the context operator rules write into.

Every prunable source axis of size C creates C atoms. A tensor axis that carries channels has a labelling: a 1-D
array mapping each position to an atom (or -1 for "no atom": input data, constants). Rules compute output
labellings from input labellings in one topological sweep and unify atoms where an op couples them; the
union-find classes are the removable units, and their connected components (units that share a tensor) are the
coupled groups. Every tensor carries at most one labelled axis: an op that would need two freezes instead.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import onnx

from . import quant
from .errors import SpaError
from .ir import Graph


@dataclass(frozen=True)
class Labels:
    """Which atom each position of one axis of a tensor carries (-1: none)."""

    axis: int
    atoms: np.ndarray

    def __len__(self) -> int:
        return len(self.atoms)

    def moved(self, axis: int) -> Labels:
        return Labels(axis, self.atoms)


class UnionFind:
    def __init__(self):
        self.parent = np.zeros(0, dtype=np.int64)

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a):
        """Roots of an atom or an array of atoms (-1 stays -1)."""
        a = np.asarray(a, dtype=np.int64)
        valid = a >= 0
        r = np.where(valid, a, 0)
        p = self.parent
        while True:
            nr = p[r]
            if (nr == r).all():
                break
            r = p[nr]  # two steps at a time
        if r.size:
            p[np.where(valid, a, 0)[valid]] = r[valid]  # path compression for the atoms asked about
        return np.where(valid, r, -1)

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union a[i] with b[i] for every i (both must be atoms)."""
        if len(a) == 0:
            return
        # Iterate to a fixed point with vectorised hooking: hook the larger root under the smaller one.
        while True:
            ra, rb = self.find(a), self.find(b)
            diff = ra != rb
            if not diff.any():
                return
            lo, hi = np.minimum(ra[diff], rb[diff]), np.maximum(ra[diff], rb[diff])
            self.parent[hi] = lo  # several writes to one hi keep one of them; the loop finishes the rest

    def union_all(self, atoms: np.ndarray) -> None:
        """One class of all the atoms: every root hooked straight under the smallest (a chain a[i]-a[i+1] made
        a path as long as the tensor, which `find` walks in time quadratic in it: 6.5 s for a 32000-way vocab)."""
        atoms = atoms[atoms >= 0]
        if len(atoms) > 1:
            roots = self.find(atoms)
            self.parent[roots] = roots.min()


@dataclass(frozen=True, eq=False)
class DimRead:
    """One element of a shape vector that a Shape node reads at run time. `atoms`: the channel labels of the axis
    it reads, when that axis carries them — the value is then the current channel count, which pruning lowers —
    else None (a batch, sequence or spatial dim, which pruning never changes). Integer arithmetic with constants
    on the way (Hugging Face's `num_key_value_heads * n_rep`) keeps a count a count: the value is `scale` times
    the number of kept positions of `atoms`, and every kept number must be a multiple of `divisor` for the
    integer divisions on the way to have been exact."""

    atoms: np.ndarray | None = None
    scale: Fraction = Fraction(1)
    divisor: int = 1


@dataclass
class ParamSlice:
    """A parameter axis whose positions follow an atom labelling: sliced by Apply.

    role "sink": the labels end here (Conv input channels, Gemm/MatMul contracted rows); the verification
    reference zeroes these slices ("disconnected at the sink"). role "source": the producing weight's output
    rows (compensation zeroes them to find the constant a removed channel carries). role "member": anything else
    that travels with the channel (biases, norm affine). role "stat": running statistics and quantization scales/zero points, cut but never scored
    (a variance near 1 says nothing about a channel's importance). Apply cuts all roles alike.
    """

    node: onnx.NodeProto
    input_index: int
    axis: int
    atoms: np.ndarray
    role: str


@dataclass
class MaskSink:
    """A contraction without a weight (activation x activation MatMul over a labelled axis): the reference
    model disconnects it by multiplying this input with a 0/1 mask along the axis."""

    node: onnx.NodeProto
    input_index: int
    axis: int
    atoms: np.ndarray


@dataclass
class NodeCost:
    """MACs of one node at full width, and the labellings whose kept fraction scales it (MACs are products of
    dims, so the pruned count is exact: macs * prod(kept/len for each factor))."""

    macs: int
    factors: list[np.ndarray]


@dataclass
class Source:
    node: str
    op_type: str
    weight: str
    atoms: np.ndarray


@dataclass
class Context:
    """What operator rules read and write during the propagation sweep."""

    g: Graph
    uf: UnionFind = field(default_factory=UnionFind)
    labels: dict[str, Labels] = field(default_factory=dict)
    frozen: list[tuple[np.ndarray, str, str]] = field(default_factory=list)  # (atoms, node name/op, reason)
    params: list[ParamSlice] = field(default_factory=list)
    mask_sinks: list[MaskSink] = field(default_factory=list)
    edits: list[Callable] = field(default_factory=list)
    costs: dict[str, NodeCost] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    # integer vectors computed from Shape reads (Shape -> Gather/Slice/Concat/Unsqueeze -> a Reshape target):
    # per element an int (constant), a DimRead, or None (computed otherwise); see operators/shape.py
    shape_values: dict[str, list] = field(default_factory=dict)
    dequantized: dict[str, np.ndarray] = field(default_factory=dict)  # QDQ weights' float values, read once
    unruled: dict[str, int] = field(default_factory=dict)  # op type -> nodes without a rule that froze channels

    # ---- reading ---------------------------------------------------------------------------------------------
    def inp(self, node: onnx.NodeProto, i: int) -> Labels | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        return self.labels.get(node.input[i])

    def shape(self, name: str) -> tuple | None:
        s = self.g.shapes.get(name)
        if s is None or any(not isinstance(d, int) for d in s):
            return None
        return s

    def const(self, name: str) -> np.ndarray | None:
        """An initializer's value, or the float value of a DequantizeLinear of constants (a QDQ weight), which
        the rules treat as the constant it is (spa.quant); None for run-time tensors."""
        c = self.g.const(name)
        if c is not None or not name:
            return c
        if name not in self.dequantized:
            qt = quant.dequantize_linear_of(self.g, name)
            if qt is None:
                return None
            v = quant.value(self.g, qt)
            v.setflags(write=False)
            self.dequantized[name] = v
        return self.dequantized[name]

    def is_const(self, name: str) -> bool:
        """An initializer, or a QDQ weight (a DequantizeLinear of constants), which slice_param can cut."""
        return self.g.is_const(name) or quant.dequantize_linear_of(self.g, name) is not None

    def labelled_inputs(self, node: onnx.NodeProto) -> list[tuple[int, Labels]]:
        return [(i, self.labels[x]) for i, x in enumerate(node.input) if x in self.labels]

    # ---- writing ---------------------------------------------------------------------------------------------
    def out(self, node: onnx.NodeProto, i: int, labels: Labels | None) -> None:
        if labels is not None and i < len(node.output) and node.output[i]:
            if (labels.atoms >= 0).any():
                self.labels[node.output[i]] = labels

    def new_atoms(self, node: onnx.NodeProto, n: int, weight: str) -> np.ndarray:
        atoms = self.uf.add(n)
        self.sources.append(Source(node.name, node.op_type, weight, atoms))
        return atoms

    def freeze(self, atoms: np.ndarray | Labels | None, node: onnx.NodeProto | str, reason: str) -> None:
        if atoms is None:
            return
        if isinstance(atoms, Labels):
            atoms = atoms.atoms
        atoms = atoms[atoms >= 0]
        if len(atoms):
            where = node if isinstance(node, str) else f"{node.op_type} '{node.name}'"
            self.frozen.append((atoms, where, reason))

    def freeze_inputs(self, node: onnx.NodeProto, reason: str) -> None:
        for _, lab in self.labelled_inputs(node):
            self.freeze(lab, node, reason)
        for x in getattr(node, "_implicit", ()):
            self.freeze(self.labels.get(x), node, reason)

    def unify(self, a: np.ndarray, b: np.ndarray, node: onnx.NodeProto, why: str = "") -> np.ndarray:
        """Couple two labellings position by position; an atom facing an unlabelled position is frozen."""
        both = (a >= 0) & (b >= 0)
        self.uf.union_arrays(a[both], b[both])
        lone = (a >= 0) ^ (b >= 0)
        if lone.any():
            self.freeze(np.where(a >= 0, a, b)[lone], node, why or "channel meets an unprunable tensor position")
        return np.where(a >= 0, a, b)

    def slice_param(self, node, i: int, axis: int, atoms: np.ndarray, role: str = "member") -> bool:
        """Declare that input i (an initializer) is cut along `axis` by `atoms`. A runtime tensor there cannot
        be cut: its atoms are frozen and False is returned."""
        name = node.input[i] if i < len(node.input) else ""
        if not name:
            return True
        if not self.g.is_const(name):
            dq = quant.dequantize_linear_of(self.g, name)
            if dq is None:
                self.freeze(atoms, node, f"per-channel operand '{name}' is computed at run time")
                return False
            if len(self.g.consumers.get(name, [])) > 1:  # one DequantizeLinear, several cuts: not sliced per use
                self.freeze(atoms, node, f"quantized weight '{name}' is read by several nodes")
                return False
            return self.slice_param(dq.node, dq.q, axis, atoms, role)  # the integers, with their scales
        shape = self.g.const_info(name)[0]
        have = shape[axis] if -len(shape) <= axis < len(shape) else None
        if have != len(atoms):  # a broadcast operand cannot be cut; any other size cannot run at all
            if have == 1:
                self.freeze(atoms, node, f"operand '{name}' broadcasts one value over the channels")
                return False
            raise SpaError(f"the input model is invalid: {node.op_type} node '{node.name}' input '{name}' has "
                           f"{have} entries along axis {axis}, but the tensor it applies to has {len(atoms)}")
        qt = quant.reader(self.g, node, i)
        cuts = quant.operand_cuts(self.g, qt, axis % len(shape)) if qt is not None else []
        if isinstance(cuts, str):
            self.freeze(atoms, node, cuts)
            return False
        self.params.append(ParamSlice(node, i, axis, atoms, role))
        for slot, operand_axis in cuts:  # per-channel scale / zero point: cut with the channels, never scored
            self.slice_param(node, slot, operand_axis, atoms, "stat")
        return True

    def edit(self, fn: Callable) -> None:
        """Register a rewrite that Apply runs once the removed units are known: fn(apply_context)."""
        self.edits.append(fn)

    def cost(self, node: onnx.NodeProto, macs: int, factors: list[np.ndarray], term: str = "") -> None:
        """MACs of a node; a node whose MACs are a sum of products of different factors (a recurrent unit's
        input and recurrence projections) records each product as its own `term` ("<node>/<term>")."""
        key = f"{node.name}/{term}" if term else node.name
        self.costs[key] = NodeCost(int(macs), [f for f in factors if f is not None])


def passthrough(ctx: Context, node: onnx.NodeProto, src: int = 0, dst: int = 0) -> None:
    """Output `dst` carries input `src`'s labelling unchanged (element-wise ops, pooling, ...)."""
    ctx.out(node, dst, ctx.inp(node, src))
