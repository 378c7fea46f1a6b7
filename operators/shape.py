"""Layout operators: Reshape/Flatten (split and merge channel axes), Transpose, Squeeze/Unsqueeze, Expand,
Tile, Shape.

Reshape maps the labelled axis through the smallest block of input and output axes with equal products. Merging
(C,H,W)→C·H·W repeats each channel's atom H·W times; splitting d→(heads, head_dim) makes each outer slice one
removable unit (its atoms are unified), so whole heads go and the kept layout stays a product set. The target
shape's element for the labelled axis is rewritten by Apply.

Shape reads are followed as values (`follow_shape_values`): Shape -> Gather/Slice/Concat/Unsqueeze/Squeeze/Cast
carry each element as a constant, a read of a dim that pruning never changes (batch, sequence), or a read of a
labelled axis — the current channel count. Mul/Div by a positive integer constant keep a count a count, scaled
(Hugging Face's repeat_kv: `num_key_value_heads * n_rep`; `width // head_dim`), and Equal/Where with a decided
condition pass elements through (TorchScript's expand sizes: Where(sizes == -1, 1, sizes)). A count that lands
in a Reshape/Expand target or Resize sizes at the output axis whose size it is after every pruning (per unit,
the axis holds `scale` times the positions the read counts; divisions exact) is consistent, as is one on an axis
of the same width whose labelling is then unified with the read's; a count used anywhere else (other arithmetic,
another position, an unlabelled output, an axis it is not proven to size) freezes its channels — and the axis
it lands on. A run-time dim read is never Reshape's 0 (copy the input dim): it is 0 only for an empty tensor.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from spa.ir import attr
from spa.labels import DimRead, Labels, passthrough

from ._util import axes_of, norm_axis, picked_positions, prod, shape_element
from .registry import rule


def map_reshape(ctx, node, lab: Labels, s_in: tuple, s_out: tuple) -> Labels | None:
    """The labelling of a reshaped tensor, or None (atoms frozen) where it cannot be expressed."""
    pre_in = np.cumprod([1, *s_in])
    pre_out = np.cumprod([1, *s_out])
    k = lab.axis
    if s_in[k] == 1:  # a one-channel axis merges with its neighbours; a one-unit group is never pruned anyway
        ctx.freeze(lab, node, "reshape of a single-channel axis")
        return None
    i0 = max(i for i in range(k + 1) if pre_in[i] in pre_out)
    i1 = min((i for i in range(k + 1, len(s_in) + 1) if pre_in[i] in pre_out), default=None)
    if i1 is None:
        ctx.freeze(lab, node, "reshape does not preserve the channel block")
        return None
    j0 = max(j for j in range(len(pre_out)) if pre_out[j] == pre_in[i0])
    j1 = min((j for j in range(j0 + 1, len(pre_out)) if pre_out[j] == pre_in[i1]), default=None)
    if j1 is None:
        ctx.freeze(lab, node, "reshape does not preserve the channel block")
        return None
    block_in = tuple(s_in[i0:i1])
    shape = [1] * len(block_in)
    shape[k - i0] = s_in[k]
    arr = np.broadcast_to(lab.atoms.reshape(shape), block_in).reshape(tuple(s_out[j0:j1]))
    varying = [t for t in range(arr.ndim) if arr.shape[t] > 1 and not (arr == arr.take([0], axis=t)).all()]
    if not varying:
        ctx.freeze(lab, node, "reshape collapses the channel axis")
        return None
    # Split of a channel axis into several: one axis carries the labels and the others are unified, so a unit
    # is a whole slice and the kept set stays a product set. The innermost varying axis (head_dim) is never
    # the carrier; the next one in is: (heads, head_dim) -> heads; (3, heads, head_dim) -> heads, with q/k/v
    # of one head in one unit; (groups, C/groups) -> groups.
    t = varying[-2] if len(varying) > 1 else varying[0]
    rows = np.moveaxis(arr, t, 0).reshape(arr.shape[t], -1)
    if len(varying) > 1:
        has_none = (rows < 0).any(axis=1)
        if has_none.any() and (rows >= 0).any():
            ctx.freeze(rows[has_none].ravel(), node, "reshape splits channels together with unprunable positions")
        for r in rows[~has_none]:
            ctx.uf.union_all(np.unique(r))
    return Labels(j0 + t, rows[:, 0].copy())


@rule("Reshape")
def reshape(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    s_in, s_out = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if s_in is None or s_out is None:
        ctx.freeze(x, node, "reshape with unknown static shapes")
        return
    out = map_reshape(ctx, node, x, s_in, s_out)
    if out is None:
        return
    allowzero = attr(node, "allowzero", 0)
    # a 0 there would copy s_in[x.axis]: impossible with allowzero, with a run-time read (0 only for an empty
    # tensor) or where the static shapes show that dim changed
    if out.axis != x.axis and x.axis < len(s_out) and not allowzero and s_out[x.axis] == s_in[x.axis] \
            and target_element(ctx, node, 1, x.axis) in (0, None):
        ctx.freeze(out, node, "reshape target copies (0) a channel axis into another position")
        return
    current, setter = shape_element(ctx, node, 1, out.axis)
    if current == -1:
        pass  # inferred at run time
    elif current == 0 and out.axis == x.axis and s_in[x.axis] == s_out[out.axis] and not allowzero:
        pass  # copies the (pruned) input dim
    elif is_count(target_element(ctx, node, 1, out.axis)):
        pass  # the current channel count, read at run time: follow_shape_values unifies the two labellings
    elif setter is None or current in (0, None):
        ctx.freeze(out, node, "reshape target for the channel axis is computed at run time")
        return
    else:
        ctx.edit(lambda ap, setter=setter, atoms=out.atoms: setter(ap, ap.kept(atoms)))
    ctx.out(node, 0, out)


@rule("Flatten")
def flatten(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    s_in = ctx.shape(node.input[0])
    if s_in is None:
        ctx.freeze(x, node, "flatten of unknown static shape")
        return
    axis = norm_axis(int(attr(node, "axis", 1)), len(s_in))
    out = map_reshape(ctx, node, x, s_in, (prod(s_in[:axis]), prod(s_in[axis:])))
    ctx.out(node, 0, out)


@rule("Transpose")
def transpose(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    rank = len(ctx.shape(node.input[0]) or ())
    perm = list(attr(node, "perm", list(reversed(range(rank)))))
    ctx.out(node, 0, x.moved(perm.index(x.axis)))


@rule("Squeeze", "Unsqueeze")
def squeeze(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    axes, known = axes_of(ctx, node, 1)
    s_in, s_out = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if not known or s_in is None or s_out is None:
        ctx.freeze(x, node, f"{node.op_type} axes or shapes unknown")
        return
    if node.op_type == "Squeeze":
        axes = [norm_axis(a, len(s_in)) for a in axes] if axes else [i for i, d in enumerate(s_in) if d == 1]
        if x.axis in axes:
            ctx.freeze(x, node, "squeezes the channel axis")
            return
        ctx.out(node, 0, x.moved(x.axis - sum(a < x.axis for a in axes)))
    else:
        axes = sorted(norm_axis(a, len(s_out)) for a in axes)
        kept = [i for i in range(len(s_out)) if i not in axes]
        ctx.out(node, 0, x.moved(kept[x.axis]))


@rule("Expand")
def expand(ctx, node):
    x = ctx.inp(node, 0)
    s_in, s_out = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if x is None:
        if s_in is not None and s_out is not None:
            broadcast_to_count(ctx, node, s_in, s_out)
        return
    if s_in is None or s_out is None:
        ctx.freeze(x, node, "Expand with unknown shapes")
        return
    axis = x.axis + len(s_out) - len(s_in)
    shp = ctx.shape(node.input[1])
    pos = axis - (len(s_out) - shp[0]) if shp else -1
    current, setter = shape_element(ctx, node, 1, pos) if pos >= 0 else (1, None)
    if is_count(target_element(ctx, node, 1, pos)):
        pass  # the current channel count: follow_shape_values unifies it with the output's labelling
    elif current not in (1, -1):  # 1 broadcasts to the input's (pruned) size
        if setter is None:
            ctx.freeze(x, node, "Expand target for the channel axis is computed at run time")
            return
        ctx.edit(lambda ap, setter=setter, atoms=x.atoms: setter(ap, ap.kept(atoms)))
    ctx.out(node, 0, x.moved(axis))


def broadcast_to_count(ctx, node, s_in: tuple, s_out: tuple) -> None:
    """An unlabelled tensor broadcast (size 1) to a channel count read at run time: every channel holds the same
    values, so the output carries the read axis's labels (DETR/MobileViT expand a learned row to [B, C, ...])."""
    vals = shape_value(ctx, node.input[1])
    if vals is None:
        return
    offset = len(s_out) - len(vals)
    hits = [(p + offset, v.atoms) for p, v in enumerate(vals) if is_plain_count(v)]
    if len(hits) == 1:
        axis, atoms = hits[0]
        k = axis - (len(s_out) - len(s_in))
        if k < 0 or s_in[k] == 1:
            ctx.out(node, 0, Labels(axis, atoms.copy()))


@rule("Tile")
def tile(ctx, node):
    x = ctx.inp(node, 0)
    if x is None:
        return
    reps = ctx.const(node.input[1])
    if reps is None or int(reps.reshape(-1)[x.axis]) != 1:
        ctx.freeze(x, node, "Tile repeats the channel axis")
        return
    passthrough(ctx, node)


@rule("Shape")
def shape(ctx, node):
    """The size of a channel axis read here is followed as a value (follow_shape_values), not frozen here."""
    x = ctx.inp(node, 0)
    if x is not None and ctx.shape(node.input[0]) is None:
        ctx.freeze(x, node, "Shape reads a tensor of unknown shape")


# ---- shape values ---------------------------------------------------------------------------------------------------
# where a shape operand sits: a channel count there is checked against the output's labelling
SHAPE_OPERANDS = {"Reshape": 1, "Expand": 1, "Resize": 3}
SAME_VALUES = ("Unsqueeze", "Squeeze", "Cast", "Identity")  # element values pass unchanged


def is_count(v) -> bool:
    return isinstance(v, DimRead) and v.atoms is not None


def is_plain_count(v) -> bool:
    """A count as read: one position per position of its atoms, no arithmetic on the way."""
    return is_count(v) and v.scale == 1 and v.divisor == 1


def shape_value(ctx, name: str) -> list | None:
    """The elements of a 0-D/1-D integer tensor: followed Shape reads, or a constant's ints; None otherwise."""
    vals = ctx.shape_values.get(name)
    if vals is not None:
        return vals
    c = ctx.const(name)
    if c is not None and np.asarray(c).dtype.kind in "iub" and np.ndim(c) <= 1:
        kind = bool if np.asarray(c).dtype.kind == "b" else int
        return [kind(v) for v in np.asarray(c).reshape(-1)]
    return None


def target_element(ctx, node, input_index: int, pos: int):
    """Element `pos` of a shape operand: an int, a DimRead, or None (computed otherwise or out of range)."""
    vals = shape_value(ctx, node.input[input_index]) if input_index < len(node.input) else None
    if vals is not None:
        return vals[pos] if 0 <= pos < len(vals) else None
    return shape_element(ctx, node, input_index, pos)[0] if pos >= 0 else None


def _followed(ctx, node) -> tuple[list | None, set]:
    """(the output's elements, the inputs they come from) for the ops that move shape elements around."""
    op, ins = node.op_type, list(node.input)
    if op == "Shape":
        dims = ctx.g.shapes.get(ins[0])
        if dims is None:
            return None, set()
        rank = len(dims)
        start = min(max(norm_axis(int(attr(node, "start", 0)), rank), 0), rank)
        end = attr(node, "end")
        end = rank if end is None else min(max(norm_axis(int(end), rank), 0), rank)
        lab = ctx.labels.get(ins[0])  # (the Shape of a shape vector reads its length, not its values: {0})
        return [DimRead(lab.atoms if lab is not None and lab.axis == i else None) for i in range(start, end)], {0}
    if not ins or not any(x in ctx.shape_values for x in ins):
        return None, set()
    if op in ELEMENTWISE:
        vals = ELEMENTWISE[op](ctx, node)
        return (None, set()) if vals is None else (vals, set(range(len(ins))))
    if op == "Concat" and int(attr(node, "axis", 0)) in (0, -1):
        parts = []
        for x in ins:
            vals = shape_value(ctx, x)
            if vals is None:
                s = ctx.shape(x)
                if s is None or len(s) != 1:
                    return None, set()
                vals = [None] * s[0]
            parts.extend(vals)
        return parts, set(range(len(ins)))
    if ins[0] not in ctx.shape_values:
        return None, set()
    if op in ("Gather", "Slice"):
        vals = ctx.shape_values[ins[0]]
        picked = picked_positions(ctx, node, len(vals))
        return (None, set()) if picked is None else ([vals[int(i)] for i in picked], {0})
    if op in SAME_VALUES or (op == "Reshape" and len(ctx.g.shapes.get(node.output[0]) or (0, 0)) <= 1):
        return list(ctx.shape_values[ins[0]]), {0}
    return None, set()


def _operands(ctx, node) -> list[list] | None:
    """The inputs' elements broadcast to one length (shape vectors are 0-D or 1-D), or None."""
    vals = [shape_value(ctx, x) if x else None for x in node.input]
    if any(v is None for v in vals):
        return None
    n = max(len(v) for v in vals)
    if any(len(v) not in (1, n) for v in vals):
        return None
    return [v * n if len(v) == 1 else v for v in vals]


def _scaled(v, factor: Fraction):
    """A dim read times a positive constant factor: a count stays a count (its scale changes, and a division
    must come out exact for every pruned count); a read that pruning never changes stays one if it cannot
    become 0 (Reshape reads a 0 as "copy the input dim"); None where nothing is proven."""
    if not isinstance(v, DimRead) or factor <= 0:
        return None
    if v.atoms is None:
        return v if factor.denominator == 1 else None
    scale = v.scale * factor
    return DimRead(v.atoms, scale, math.lcm(v.divisor, scale.denominator))


def _mul_div(ctx, node) -> list | None:
    """Mul/Div of shape elements by integer constants, element by element; None (not followed, the channel
    counts in it freeze) where a count meets anything else."""
    ops = _operands(ctx, node)
    if ops is None:
        return None
    out = []
    for a, b in zip(*ops):
        if isinstance(a, int) and isinstance(b, int):
            if node.op_type == "Mul":
                out.append(a * b)
            elif b == 0:
                return None
            else:
                q = abs(a) // abs(b)  # integer Div truncates toward zero
                out.append(q if (a >= 0) == (b > 0) else -q)
        elif node.op_type == "Mul" and isinstance(a, int) != isinstance(b, int):
            v, k = (b, a) if isinstance(a, int) else (a, b)
            out.append(_scaled(v, Fraction(k)))
        elif node.op_type == "Div" and isinstance(b, int) and b != 0:
            out.append(_scaled(a, Fraction(1, b)))
        else:
            out.append(None)
        if out[-1] is None and (is_count(a) or is_count(b)):
            return None
    return out


def _equal(ctx, node) -> list | None:
    """Equal of shape elements whose every element is decided: a dim read never equals a negative constant
    (TorchScript's expand sizes test for -1). The booleans feed a Where."""
    ops = _operands(ctx, node)
    if ops is None:
        return None
    out = []
    for a, b in zip(*ops):
        if isinstance(a, int) and isinstance(b, int):
            out.append(a == b)
        elif isinstance(a, DimRead) and isinstance(b, int) and b < 0 or \
                isinstance(b, DimRead) and isinstance(a, int) and a < 0:
            out.append(False)
        else:
            return None
    return out


def _where(ctx, node) -> list | None:
    """Where with a decided condition picks its elements from either branch."""
    ops = _operands(ctx, node)
    if ops is None or not all(isinstance(c, bool) for c in ops[0]):
        return None
    return [x if c else y for c, x, y in zip(*ops)]


# integer elementwise ops on shape vectors: the output's elements, or None (not followed)
ELEMENTWISE = {"Mul": _mul_div, "Div": _mul_div, "Equal": _equal, "Where": _where}


def follow_shape_values(ctx, node, implicit=()) -> None:
    """After a node's rule: follow the shape elements it moves, and settle the channel counts it consumes — unified
    with the output's labelling where a shape operand puts them on the axis of the same width, else frozen."""
    vals, passed = _followed(ctx, node)
    if vals is not None and node.output and node.output[0]:
        ctx.shape_values[node.output[0]] = vals
    operand = SHAPE_OPERANDS.get(node.op_type)
    for i, name in [*enumerate(node.input), *((-1, x) for x in implicit)]:
        if i in passed or not any(is_count(v) for v in ctx.shape_values.get(name, ())):
            continue
        if i == operand:
            _settle_counts(ctx, node, ctx.shape_values[name])
            continue
        for v in ctx.shape_values[name]:
            if is_count(v):
                ctx.freeze(v.atoms, node, f"{node.op_type} computes with a channel count read at run time (Shape)")


def _settle_counts(ctx, node, vals: list) -> None:
    out = ctx.labels.get(node.output[0])
    rank = len(ctx.g.shapes.get(node.output[0]) or ())
    axes = attr(node, "axes") if node.op_type == "Resize" else None
    for p, v in enumerate(vals):
        if not is_count(v):
            continue
        if node.op_type == "Expand":
            axis = p + rank - len(vals)
        else:
            axis = norm_axis(int(axes[p]), rank) if axes else p
        if out is None or out.axis != axis:
            ctx.freeze(v.atoms, node, f"{node.op_type} puts a channel count read at run time (Shape) on an axis "
                                      "that does not carry those channels")
        elif counts_agree(ctx, v, out.atoms):
            pass  # every pruning keeps the two equal
        elif is_plain_count(v) and len(out.atoms) == len(v.atoms):
            ctx.unify(out.atoms, v.atoms, node, "a channel count read at run time meets unprunable positions")
        else:
            why = "a channel count read at run time (Shape) is not proven to size the axis it lands on after " \
                  "pruning" + ("" if is_plain_count(v) else f" (computed: {v.scale} x the count)")
            ctx.freeze(v.atoms, node, why)
            ctx.freeze(out.atoms, node, why)


def counts_agree(ctx, v: DimRead, atoms: np.ndarray) -> bool:
    """Whether `v` (scale × the kept positions of its atoms) equals the kept positions of `atoms` for every
    pruning: per unit (union-find root; -1 = positions never removed), the axis holds `scale` times the read's
    positions, and the read's positions of each unit are a multiple of its divisor (exact divisions)."""
    mine, theirs = (dict(zip(*np.unique(ctx.uf.find(a), return_counts=True))) for a in (v.atoms, atoms))
    if mine.keys() != theirs.keys():
        return False
    return all(n % v.divisor == 0 and v.scale * int(n) == int(theirs[r]) for r, n in mine.items())
