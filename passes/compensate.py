"""Compensation after structural pruning: not equivalence-preserving by design, so it reports fidelity.

FoldRemovedConstants: a removed channel whose producing weights were zero would still carry a constant (its
bias, BN shift, activation of those) into its consumers. We measure that constant, per sink position, by running
the original with the removed units' source rows zeroed, average it over positions and inputs, and fold
`constant x consumer weights` into the consumers' biases. Only values of kept parameters change (asserted).

Fidelity compares a model with the original (not the disconnected reference): relative L2 error per output, and
top-1 agreement and KL divergence where an output looks like class logits (the metrics: passes.fidelity).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from spa import quant
from spa.errors import VerificationError
from spa.groups import Analysis
from spa.ir import Graph, attr

from . import Pass, verify
from . import fidelity as metrics

REPORT_KL_EPS = 1e-12   # the report's KL from probabilities (passes.fidelity.kl)


def fidelity(original: onnx.ModelProto, model: onnx.ModelProto, shapes: dict, seeds=(0, 1), feeds=None,
             reference=None) -> dict:
    """Mean over draws (random inputs, one per seed) or over the given list of feed batches. `reference`: the
    original's outputs on those draws, when already computed (reference_outputs)."""
    out: dict[str, dict] = {}
    draws = feeds if feeds is not None else [verify.random_inputs(original, shapes, seed) for seed in seeds]
    if reference is None:
        reference = verify.run_many(original, draws, "reference")
    for ref, new in zip(reference, verify.run_many(model, draws)):
        for o, a, b in zip(original.graph.output, ref, new):
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            d = out.setdefault(o.name, {"rel_l2": [], "top1": [], "kl": []})
            d["rel_l2"].append(metrics.rel_l2(a64, b64))
            if metrics.is_logits(a64):
                d["top1"].append(metrics.top1_agreement(a64, b64))
                d["kl"].append(metrics.kl(a64, b64, eps=REPORT_KL_EPS))
    return {k: {m: float(np.mean(v)) for m, v in d.items() if v} for k, d in out.items()}


def structure(model: onnx.ModelProto):
    """Nodes (op, inputs, outputs) and initializer shapes: what a values-only pass must leave unchanged."""
    return ([(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node],
            {t.name: tuple(t.dims) for t in model.graph.initializer})


class FoldRemovedConstants(Pass):
    name = "fold-constants"

    def __init__(self, analysis: Analysis, removed: set[int], original: onnx.ModelProto, input_shapes: dict):
        self.analysis, self.removed, self.original, self.shapes = analysis, removed, original, input_shapes
        self._orig = Graph(original)

    def run(self, model) -> dict:
        analysis, keep = self.analysis, self.analysis.keep_mask(self.removed)
        sinks = [ps for ps in analysis.ctx.params if ps.role == "sink" and (~keep(ps.atoms)).any()]
        if not sinks:
            return {"folded_sinks": 0, "skipped_sinks": 0}
        means = self._removed_channel_means(sinks, keep)
        g = model.graph
        before = structure(g.to_model())
        folded, skipped = 0, []
        for ps, mean in zip(sinks, means):
            done = self._fold(g, ps, mean, keep)
            if done:
                folded += 1
            else:
                skipped.append(f"{ps.node.op_type} '{ps.node.name}'")
        if structure(g.to_model()) != before:
            raise VerificationError("compensation changed the graph or a shape (it may only change values)")
        return {"folded_sinks": folded, "skipped_sinks": len(skipped), "skipped": skipped[:10]}

    def _removed_channel_means(self, sinks, keep) -> list[np.ndarray]:
        """Mean value, per position of each sink's labelled input axis, when removed units produce nothing."""
        probe = onnx.ModelProto()
        probe.CopyFrom(self.original)
        pg = Graph(probe)
        nodes = list(probe.graph.node)
        for ps in self.analysis.ctx.params:
            gone = ~keep(ps.atoms)
            if ps.role != "source" or not gone.any():
                continue
            node = nodes[self.analysis.node_index[id(ps.node)]]
            w = quant.zeroed(pg, node, ps.input_index, ps.axis, gone)
            node.input[ps.input_index] = pg.add_const(w, node.input[ps.input_index] + "_probe")
        data_inputs = []
        for ps in sinks:
            node = nodes[self.analysis.node_index[id(ps.node)]]
            x = node.input[1 if ps.input_index == 0 and ps.node.op_type == "MatMul" else 0]
            data_inputs.append(x)
        existing = {o.name for o in probe.graph.output}
        for x in dict.fromkeys(data_inputs):
            if x not in existing:
                probe.graph.output.append(helper.make_empty_tensor_value_info(x))
        pg.to_model()
        names = [o.name for o in probe.graph.output]
        sums: dict[str, np.ndarray] = {}
        seeds = (0, 1)
        for seed in seeds:
            res = verify.run(probe, verify.random_inputs(probe, self.shapes, seed), "reference")
            for n, r in zip(names, res):
                sums[n] = sums.get(n, 0) + np.asarray(r, np.float64)
        out = []
        for ps, x in zip(sinks, data_inputs):
            t = sums[x] / len(seeds)
            axis = self._data_axis(ps, t.ndim)
            other = tuple(a for a in range(t.ndim) if a != axis)
            out.append(t.mean(axis=other) if other else t)
        return out

    @staticmethod
    def _data_axis(ps, rank: int) -> int:
        n = ps.node
        if n.op_type == "Conv" or n.op_type == "ConvTranspose":
            return 1
        if n.op_type == "Gemm":
            return 0 if attr(n, "transA", 0) else 1
        return rank - 2 if ps.input_index == 0 else rank - 1  # MatMul: weight left reads rows of B

    def _fold(self, g: Graph, ps, mean: np.ndarray, keep) -> bool:
        node, analysis = ps.node, self.analysis
        gone = ~keep(ps.atoms)
        w_orig = self._orig.const(self.original.graph.node[analysis.node_index[id(node)]].input[ps.input_index])
        c = np.where(gone, mean, 0.0)
        if node.op_type == "Conv" and int(attr(node, "group", 1)) == 1 and ps.axis == 1:
            w = w_orig.astype(np.float64)
            delta = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2) @ c  # borders ignored: approximate
            bias_index, out_axis_len = 2, w_orig.shape[0]
        elif node.op_type == "Gemm" and ps.input_index == 1:
            delta = np.tensordot(c, w_orig.astype(np.float64), axes=([0], [ps.axis]))  # over B's contracted axis
            bias_index, out_axis_len = 2, delta.shape[0]
        elif node.op_type == "MatMul" and ps.input_index == 1 and w_orig.ndim == 2:
            delta = c @ w_orig.astype(np.float64)
            return self._fold_into_add(g, node, delta, keep)
        else:
            return False
        if bias_index >= len(node.input) or not node.input[bias_index] or not g.is_const(node.input[bias_index]):
            return False
        if len(g.consumers.get(node.input[bias_index], [])) != 1:
            return False  # a shared bias: never edit in place
        out_keep = self._out_keep(node, out_axis_len, keep)
        bias = g.const(node.input[bias_index])
        if bias.ndim != 1 or bias.shape[0] != int(out_keep.sum()):
            return False
        g.set_const(node.input[bias_index], (bias.astype(np.float64) + delta[out_keep]).astype(bias.dtype))
        return True

    def _out_keep(self, node, n: int, keep) -> np.ndarray:
        for s in self.analysis.ctx.sources:
            if s.node == node.name and len(s.atoms) == n:
                return keep(s.atoms)
        return np.ones(n, dtype=bool)

    def _fold_into_add(self, g: Graph, node, delta, keep) -> bool:
        readers = g.consumers.get(node.output[0], [])
        if len(readers) != 1 or readers[0][0].op_type != "Add":
            return False
        add = readers[0][0]
        other = add.input[1 - readers[0][1]]
        b = g.const(other)
        if b is None or b.ndim != 1 or len(g.consumers.get(other, [])) != 1:
            return False
        out_keep = self._out_keep(node, len(delta), keep)
        if b.shape[0] != int(out_keep.sum()):
            return False
        g.set_const(other, (b.astype(np.float64) + delta[out_keep]).astype(b.dtype))
        return True
