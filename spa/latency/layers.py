"""The layers a cost table times (MAC-carrying layers with a weight), their width grids and one-node models,
and the fingerprint of a model's structure (see spa.latency)."""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ir import attr

GRID = (0.125, 0.25, 0.5, 0.75, 1.0)
ALIGN = 8           # conv channel counts are timed and predicted in whole blocks of this many (see LatencyModel)


def _attr_value(a: onnx.AttributeProto):
    v = helper.get_attribute_value(a)
    if isinstance(v, onnx.TensorProto):
        return ["tensor", list(v.dims), int(v.data_type)]
    if isinstance(v, onnx.GraphProto):
        return ["graph", len(v.node)]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list):
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else
                ["graph", len(x.node)] if isinstance(x, onnx.GraphProto) else
                ["tensor", list(x.dims)] if isinstance(x, onnx.TensorProto) else x for x in v]
    return v


def fingerprint(model) -> str:
    """Structure of the normalized model (input shapes, nodes with names, op types, attributes and input shapes;
    no weight values): a table measured for it fits exactly the models with the same fingerprint."""
    g = model.graph
    items: list = [sorted((k, list(v)) for k, v in model.input_shapes.items())]
    for n in g.nodes:
        attrs = sorted((a.name, _attr_value(a)) for a in n.attribute)
        shapes = [list(g.shapes.get(x) or []) if x else None for x in n.input]
        items.append([n.name, n.domain, n.op_type, attrs, shapes])
    blob = json.dumps(items, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---- layers ----------------------------------------------------------------------------------------------------
@dataclass
class LayerSpec:
    """One MAC-carrying layer with a weight, as the table times it. Counts on the `in`/`out` axes are kept
    positions of the layer's input factor / output channels; a grouped conv (`groups` > 1) counts kept groups on
    `out` and has a single `in` point (its input is tied to its output)."""

    node: onnx.NodeProto
    op: str
    data_first: bool            # the activation is input 0 (False: MatMul with the weight on the left)
    data_shape: list[int]       # at the table's batch
    weight_shape: list[int]
    bias_shape: list[int] | None
    in_axis: int                # axis of the data input carrying the input factor
    in_size: int
    out_size: int               # output channels, or conv groups when groups > 1
    groups: int
    in_counts: list[int]
    out_counts: list[int]
    in_align: int               # the axis is timed and predicted in whole blocks of this many (1: exact counts)
    out_align: int
    out_elems: int              # output elements at full width (weight of the layer in the activation fraction)
    dtype: str

    def signature(self) -> tuple[str, dict]:
        """(key, description): layers with equal descriptions are measured once."""
        desc = {"op": self.op, "data_first": self.data_first, "data_shape": self.data_shape,
                "weight_shape": self.weight_shape, "bias_shape": self.bias_shape, "in_axis": self.in_axis,
                "in_size": self.in_size, "out_size": self.out_size, "groups": self.groups,
                "in_counts": self.in_counts, "out_counts": self.out_counts, "in_align": self.in_align,
                "out_align": self.out_align, "dtype": self.dtype,
                "attrs": sorted((a.name, _attr_value(a)) for a in self.node.attribute)}
        blob = json.dumps(desc, default=str, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12], desc

    # ---- a standalone model at kept widths ----------------------------------------------------------------------
    def shapes_at(self, ik: int, ok: int) -> tuple[list[int], list[int], list[int] | None, int]:
        """(data shape, weight shape, bias shape, group attribute) with `ik` input / `ok` output kept."""
        data, w = list(self.data_shape), list(self.weight_shape)
        bias = list(self.bias_shape) if self.bias_shape is not None else None
        group = self.groups
        if self.op in ("Conv", "ConvTranspose"):
            if self.groups > 1:  # ok kept groups; per-group widths unchanged
                per_in = self.data_shape[1] // self.groups
                data[1] = per_in * ok
                w[0] = w[0] // self.groups * ok
                group = ok
                c_out = w[0] if self.op == "Conv" else w[1] * ok
            else:
                data[1] = ik
                w[0], w[1] = (ok, ik) if self.op == "Conv" else (ik, ok)
                c_out = ok
            if bias is not None:
                bias = [c_out]
            return data, w, bias, group
        data[self.in_axis] = ik
        if self.op == "Gemm":
            w = [ok, ik] if attr(self.node, "transB", 0) else [ik, ok]
        else:
            w = [ik, ok] if self.data_first else [ok, ik]
        if bias is not None and len(bias) and bias[-1] == self.out_size and self.out_size > 1:
            bias[-1] = ok
        return data, w, bias, group

    def model(self, ik: int, ok: int, seed: int = 0) -> tuple[onnx.ModelProto, dict]:
        """A one-node model of this layer at kept widths, random weights (constant, so onnxruntime pre-packs them
        as it does in the whole model), and a random input."""
        rng = np.random.default_rng(seed)
        dt = np.dtype(self.dtype)
        data, w, bias, group = self.shapes_at(ik, ok)
        inits = [numpy_helper.from_array((0.1 * rng.standard_normal(w)).astype(dt), "W")]
        inputs = ["X", "W"] if self.data_first else ["W", "X"]
        if bias is not None:
            inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(bias)).astype(dt), "B"))
            inputs.append("B")
        node = helper.make_node(self.op, inputs, ["Y"], name="layer")
        for a in self.node.attribute:
            if a.name == "group":
                continue
            if a.name == "output_shape":  # full-rank output_shape (batch, channels, ...): follow the widths
                continue
            node.attribute.append(copy.deepcopy(a))
        if self.op in ("Conv", "ConvTranspose") and group != 1:
            node.attribute.append(helper.make_attribute("group", int(group)))
        out_shape = attr(self.node, "output_shape", None)
        if out_shape is not None:
            spatial = list(out_shape)[-(len(data) - 2):]
            node.attribute.append(helper.make_attribute("output_shape", spatial))
        elem = helper.np_dtype_to_tensor_dtype(dt)
        graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("X", elem, data)],
                                  [helper.make_tensor_value_info("Y", elem, None)], inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m, {"X": rng.standard_normal(data).astype(dt)}


def _counts(size: int, prunable: bool, grid=GRID, align: int = 1) -> list[int]:
    """Kept widths to time: the grid's fractions of `size`; above one block of `align`, whole blocks."""
    if not prunable or size <= 1:
        return [int(size)]
    counts = {max(1, math.floor(f * size + 0.5)) for f in grid}
    counts = {n if n <= align else min(size, align * math.floor(n / align + 0.5)) for n in counts}
    return sorted(counts | {int(size)})


def _prunable(analysis, atoms) -> bool:
    """Whether some unit on these positions may be removed (not frozen)."""
    if atoms is None:
        return False
    roots = analysis.find(np.asarray(atoms, np.int64))
    roots = np.unique(roots[roots >= 0])
    return any(not _frozen_units(analysis).get(int(r), True) for r in roots)


def _frozen_units(analysis) -> dict:
    cache = analysis.__dict__.get("_latency_frozen")
    if cache is None:
        cache = {int(u): bool(f) for grp in analysis.groups for u, f in zip(grp.units, grp.frozen)}
        analysis.__dict__["_latency_frozen"] = cache
    return cache


def layer_specs(model, analysis, batch: int = 1, grid=GRID, align: int = ALIGN) -> list[LayerSpec]:
    """The MAC-carrying layers with a weight, in graph order, with the table's batch. Layers whose input shape is
    not static, and activation x activation MatMuls, are left to the rest term."""
    g = model.graph
    base = next(iter(model.input_shapes.values()), (1,))
    base = int(base[0]) if len(base) else 1
    by_name = {n.name: n for n in g.nodes}
    specs = []
    for name, cost in analysis.ctx.costs.items():
        node = by_name.get(name)
        if node is None or not cost.factors:
            continue
        spec = _spec(node, cost, g, analysis, base, batch, grid, align)
        if spec is not None:
            specs.append(spec)
    order = {n.name: i for i, n in enumerate(g.nodes)}
    return sorted(specs, key=lambda s: order[s.node.name])


def _spec(node, cost, g, analysis, base: int, batch: int, grid, align: int) -> LayerSpec | None:
    op = node.op_type
    consts = [x for x in node.input[:2] if x and g.is_const(x)]
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(consts) != 1:
        return None
    data_first = not g.is_const(node.input[0])
    data_name = node.input[0] if data_first else node.input[1]
    shape = g.shapes.get(data_name)
    w = g.const(consts[0])
    if shape is None or any(not isinstance(d, int) for d in shape) or w is None or (op == "MatMul" and w.ndim != 2):
        return None
    shape = list(shape)
    bias_shape = None
    if len(node.input) > 2 and node.input[2]:
        if not g.is_const(node.input[2]):
            return None
        bias_shape = list(g.const_info(node.input[2])[0])
    groups = int(attr(node, "group", 1)) if op in ("Conv", "ConvTranspose") else 1
    if op in ("Conv", "ConvTranspose"):
        in_axis, batch_axis = 1, 0
    elif op == "Gemm":
        in_axis = 0 if attr(node, "transA", 0) else 1
        batch_axis = 1 - in_axis
    else:
        in_axis = len(shape) - 1 if data_first else len(shape) - 2
        batch_axis = 0 if in_axis != 0 else None
    if batch_axis is not None and shape[batch_axis] % max(base, 1) == 0:
        shape[batch_axis] = shape[batch_axis] // max(base, 1) * batch
    out_atoms = cost.factors[0]
    in_atoms = cost.factors[1] if len(cost.factors) > 1 else None
    conv = op in ("Conv", "ConvTranspose")
    if groups > 1:  # kept groups; blocks of channels only where a group is one channel (depthwise)
        in_size, in_counts, in_align = 1, [1], 1
        out_size = groups
        out_align = align if conv and len(out_atoms) == groups and shape[1] == groups else 1
        out_counts = _counts(groups, _prunable(analysis, out_atoms), grid, out_align)
    else:
        in_size, out_size = shape[in_axis], len(out_atoms)
        in_align = out_align = align if conv else 1
        in_counts = _counts(in_size, _prunable(analysis, in_atoms), grid, in_align)
        out_counts = _counts(out_size, _prunable(analysis, out_atoms), grid, out_align)
    out = g.shapes.get(node.output[0])
    out_elems = int(np.prod(out)) if out and all(isinstance(d, int) for d in out) else out_size
    return LayerSpec(node, op, data_first, shape, list(w.shape), bias_shape, in_axis, int(in_size), int(out_size),
                     groups, in_counts, out_counts, in_align, out_align, out_elems, str(w.dtype))
