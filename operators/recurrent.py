"""LSTM, GRU and RNN: the hidden size is one coupled group.

One unit is hidden unit j: its rows in every gate block of W `[dirs, gates·H, I]` and R `[dirs, gates·H, H]`
(sources), its column of R (the recurrence reads h_j: a sink), its entries in B `[dirs, 2·gates·H]`, in the
initial states `[dirs, B, H]` / `[B, dirs, H]` and in the peepholes P `[dirs, 3H]` (members), in every direction
at once (one `hidden_size` serves both directions of a bidirectional op, and Y stacks them as `[.., dirs, .., H]`,
which exporters merge to dirs·H: the consumer sees unit j twice, once per direction). Y, Y_h and Y_c carry the
unit's labels on their last axis. The input size I (X's last axis) is a sink of the upstream group: W's last axis.

Initial states that are graph inputs freeze the group: their shape is the caller's contract. A state computed in
the graph from labelled tensors (a decoder started from an encoder's state) couples that group with this one.
"""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from spa.ir import attr, set_attr
from spa.labels import Labels

from ._util import prod
from .registry import rule

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
INITIAL_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}  # initial_h (and initial_c) inputs
PEEPHOLE_INPUT = 7  # LSTM's P: [dirs, 3H] (input, output, forget)


@rule("LSTM", "GRU", "RNN")
def recurrent(ctx, node):
    w, r = ctx.const(node.input[1]), ctx.const(node.input[2])
    x = ctx.inp(node, 0)
    if w is None or r is None:
        ctx.freeze_inputs(node, f"{node.op_type} weights computed at run time")
        return
    gates = GATES[node.op_type]
    dirs, _, in_size = w.shape
    hidden = r.shape[2]

    if x is not None and x.axis != 2:
        ctx.freeze(x, node, f"channels on the sequence or batch axis of a {node.op_type} input")
        x = None
    if x is not None:
        ctx.slice_param(node, 1, 2, x.atoms, "sink")

    h = ctx.new_atoms(node, hidden, node.input[1])
    per_gate = np.tile(h, gates)
    ctx.slice_param(node, 1, 1, per_gate, "source")
    ctx.slice_param(node, 2, 1, per_gate, "source")
    ctx.slice_param(node, 2, 2, h, "sink")
    if _given(node, 3):
        ctx.slice_param(node, 3, 1, np.tile(h, 2 * gates), "member")
    for i in INITIAL_STATES[node.op_type]:
        if _given(node, i):
            _initial_state(ctx, node, i, h)
    if node.op_type == "LSTM" and _given(node, PEEPHOLE_INPUT):
        ctx.slice_param(node, PEEPHOLE_INPUT, 1, np.tile(h, 3), "member")

    ctx.edit(lambda ap, node=node, h=h: set_attr(node, "hidden_size", ap.kept(h)))

    # per time step and direction: gates·H·I for the input projection, gates·H·H for the recurrence
    xs = ctx.shape(node.input[0])
    steps = prod(xs[:2]) if xs is not None else 0  # sequence x batch, in either layout
    base = steps * dirs * gates * hidden
    ctx.cost(node, base * in_size, [h, x.atoms if x is not None else None])
    ctx.cost(node, base * hidden, [h, h], term="recurrence")

    ctx.out(node, 0, Labels(3, h))  # Y: [S, dirs, B, H] (layout 0) or [B, S, dirs, H] (layout 1)
    for i in range(1, len(node.output)):
        ctx.out(node, i, Labels(2, h))  # Y_h, Y_c: [dirs, B, H] or [B, dirs, H]


def _given(node, i: int) -> bool:
    return i < len(node.input) and bool(node.input[i])


def _initial_state(ctx, node, i: int, h: np.ndarray) -> None:
    """initial_h / initial_c (hidden axis 2 in both layouts): a constant is cut with the unit, zeros made at run
    time are dropped (ONNX's default state), a graph input freezes it (the caller feeds that shape), a labelled
    tensor computed in the graph couples its group."""
    name = node.input[i]
    role = "initial_c" if i == 6 else "initial_h"
    if ctx.g.is_const(name):
        ctx.slice_param(node, i, 2, h, "member")
        return
    if _zeros(ctx, name):  # an exporter's zero state sized at run time (dynamic batch): the absent input is zeros
        ctx.edit(lambda ap, node=node, i=i: _drop_input(node, i))
        return
    if name in ctx.g.input_names:
        ctx.freeze(h, node, f"{role} '{name}' is a graph input: its hidden size is the caller's contract")
        return
    lab = ctx.inp(node, i)
    if lab is not None and lab.axis == 2 and len(lab) == len(h):
        ctx.unify(h, lab.atoms, node, f"{role} computed from unprunable positions")
        return
    ctx.freeze(lab, node, f"{role} '{name}' labelled on an axis other than the hidden one")
    ctx.freeze(h, node, f"{role} '{name}' is computed at run time")


ZERO_PRESERVING = {"Slice", "Expand", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast", "Tile"}


def _zeros(ctx, name: str) -> bool:
    """Whether a run-time tensor is all zeros: ConstantOfShape of 0 (its default), or an all-zero constant,
    through ops that only move or repeat values (TorchScript's dynamic-batch LSTM state: Slice(ConstantOfShape))."""
    node = ctx.g.producer.get(name)
    while node is not None and node.op_type in ZERO_PRESERVING:
        value = ctx.const(node.input[0])
        if value is not None:
            return not np.any(value)
        node = ctx.g.producer.get(node.input[0])
    if node is None or node.op_type != "ConstantOfShape":
        return False
    value = attr(node, "value")
    return value is None or not np.any(numpy_helper.to_array(value))


def _drop_input(node, i: int) -> None:
    node.input[i] = ""
    while node.input and not node.input[-1]:
        node.input.pop()
