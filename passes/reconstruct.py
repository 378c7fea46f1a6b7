"""Reconstruction after structural pruning: change values of kept parameters so the pruned model's layers
reproduce the original's, measured on calibration (or synthesized) inputs.

The pruned model runs beside the original node by node, in topological order, on the whole calibration set; the
original advances lazily to the tensors the pruned side asks for. Before a layer of the pruned model runs, its
weights are updated from what its input actually is now (so the errors of the layers before it are compensated):

- `obspa`: every Conv (group 1) / Gemm / MatMul-with-weight is refit by ridge least squares towards the original
  layer's output (see spa.obspa; the OBS update when nothing upstream changed);
- `recalibrate`: BatchNormalization nodes get the running mean/variance of their pruned input (BN
  re-estimation); a Conv/Gemm not followed by BN gets a per-channel affine correction, folded into its weight and
  bias, that gives its output the original's per-channel mean and standard deviation (the exporter folded BN).

Both only write values of initializers that already exist, with their shapes unchanged (asserted).
"""
from __future__ import annotations

import time

import numpy as np
import onnx

from spa import obspa as O
from spa.errors import SpaError
from spa.ir import Graph

from . import Pass


def _signature(model: onnx.ModelProto):
    return ([(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node],
            {t.name: tuple(t.dims) for t in model.graph.initializer})


class Lockstep:
    """The original and the pruned model executed side by side on the same inputs (torch, no gradients)."""

    def __init__(self, original: onnx.ModelProto, pruned: Graph, feeds: dict[str, np.ndarray]):
        import torch

        from spa.torch_graph import TorchGraph

        self.torch = torch
        self.orig_graph = Graph(original)
        self.t_orig = TorchGraph(original)
        self.t_pruned = TorchGraph(pruned)
        self.pruned = pruned
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        self.env_o, self.env_p = self.t_orig.initial_env(tensors), self.t_pruned.initial_env(tensors)
        self.orig_nodes = list(self.t_orig.nodes)
        self.orig_pos = 0
        self._last_o = _last_uses(self.orig_nodes, {o.name for o in original.graph.output})
        self._pending: set[str] = set()
        self.forward_s = 0.0

    def original(self, name: str):
        """The original model's tensor `name` (advancing the original up to its producer), or None."""
        t0 = time.perf_counter()
        while name not in self.env_o and self.orig_pos < len(self.orig_nodes):
            node = self.orig_nodes[self.orig_pos]
            self.t_orig.step(node, self.env_o)
            self.orig_pos += 1
            self._free(self.env_o, self._last_o, self.orig_pos - 1, keep=self._pending)
        self.forward_s += time.perf_counter() - t0
        return self.env_o.get(name)

    def hold(self, name: str) -> None:
        """Keep an original tensor alive until release() (it is needed after its own consumers ran)."""
        self._pending.add(name)

    def release(self, name: str) -> None:
        self._pending.discard(name)

    @staticmethod
    def _free(env, last, pos, keep=()):
        for name in last.get(pos, ()):
            if name not in keep:
                env.pop(name, None)


def _last_uses(nodes, outputs) -> dict[int, list[str]]:
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            if x:
                last[x] = i
    out: dict[int, list[str]] = {}
    for name, i in last.items():
        if name not in outputs:
            out.setdefault(i, []).append(name)
    return out


class Reconstruct(Pass):
    name = "reconstruct"

    def __init__(self, original: onnx.ModelProto, out_rows: dict[str, np.ndarray], feeds: dict[str, np.ndarray], *,
                 refit: bool = True, recalibrate: bool = False, positions: int = O.DEFAULT_POSITIONS,
                 damp: float = O.DEFAULT_DAMP, seed: int = 0, progress=None):
        """out_rows: for each weight-carrying node (by name), the kept output rows of its original weight."""
        self.original, self.out_rows, self.feeds = original, out_rows, feeds
        self.refit, self.recalibrate = refit, recalibrate
        self.positions, self.damp, self.seed = positions, damp, seed
        self.progress = progress or (lambda s: None)

    def run(self, model) -> dict:
        import torch

        g = model.graph
        before = _signature(g.to_model())
        ls = Lockstep(self.original, g, self.feeds)
        gen = torch.Generator().manual_seed(self.seed)
        stats = {"layers_refit": 0, "bn_reestimated": 0, "affine_corrected": 0, "skipped": [],
                 "positions_per_layer": self.positions, "samples": int(next(iter(self.feeds.values())).shape[0])}
        timing = {"forward_s": 0.0, "hessian_s": 0.0, "solve_s": 0.0}
        nodes = list(ls.t_pruned.nodes)
        last_p = _last_uses(nodes, set(g.output_names))
        followed_by_bn = {n.input[0] for n in nodes if n.op_type == "BatchNormalization"}
        with torch.no_grad():
            for pos, node in enumerate(nodes):
                if self.refit and node.name in self.out_rows:
                    self._refit(node, g, ls, gen, stats, timing)
                if self.recalibrate and node.op_type == "BatchNormalization":
                    self._reestimate_bn(node, g, ls, stats)
                t = time.perf_counter()
                ls.t_pruned.step(node, ls.env_p)
                timing["forward_s"] += time.perf_counter() - t
                if self.recalibrate and node.name in self.out_rows and node.output[0] not in followed_by_bn:
                    self._affine(node, g, ls, stats)
                Lockstep._free(ls.env_p, last_p, pos)
                if pos % 20 == 0:
                    self.progress(f"reconstruct: {pos + 1}/{len(nodes)} nodes")
        timing["forward_s"] += ls.forward_s
        after = _signature(g.to_model())
        if before != after:
            raise SpaError("internal: reconstruction changed the model's structure (it may only change values)")
        stats["timings_s"] = {k: round(v, 3) for k, v in timing.items()}
        return stats

    # ---- least-squares refit ---------------------------------------------------------------------------------
    def _refit(self, node, g, ls, gen, stats, timing):
        view = O.layer_view(g, node)
        orig_node = _orig_node(ls, node)
        if view is None or orig_node is None:
            return
        ov = O.layer_view(ls.orig_graph, orig_node)
        if ov is None or ov.kind != view.kind or (ov.bias is None) != (view.bias is None):
            stats["skipped"].append(f"{node.name}: original and pruned layers differ in kind")
            return
        if len(g.consumers.get(view.weight, [])) > 1 or (view.bias and len(g.consumers.get(view.bias, [])) > 1):
            stats["skipped"].append(f"{node.name}: weight shared by several nodes")
            return
        x_p = ls.env_p.get(node.input[view.data_index])
        x_o = ls.original(orig_node.input[ov.data_index])
        if x_p is None or x_o is None:
            stats["skipped"].append(f"{node.name}: input not available")
            return
        t = time.perf_counter()
        x_p, x_o = x_p.float(), x_o.float()
        total = O.output_positions(view, x_p)
        if total != O.output_positions(ov, x_o):
            stats["skipped"].append(f"{node.name}: positions differ")
            return
        rows = O.pick_rows(total, self.positions, gen)
        a, b = O.sample_rows(view, x_p, rows), O.sample_rows(ov, x_o, rows)
        w_p_full = np.asarray(g.const(view.weight))
        w_o_full = np.asarray(ls.orig_graph.const(ov.weight))
        keep = self.out_rows[node.name]
        w_p = view.matrix(w_p_full).astype(np.float64)
        w_o = ov.matrix(w_o_full)[keep].astype(np.float64)
        if view.bias is not None:
            a, b = O.with_ones(a), O.with_ones(b)
            w_p = np.concatenate([w_p, np.asarray(g.const(view.bias), np.float64)[:, None]], 1)
            w_o = np.concatenate([w_o, np.asarray(ls.orig_graph.const(ov.bias), np.float64)[keep][:, None]], 1)
        gram = O.Gram()
        gram.add(a, b)
        timing["hessian_s"] += time.perf_counter() - t
        t = time.perf_counter()
        new, _ = O.refit(w_o, w_p, gram, self.damp)
        timing["solve_s"] += time.perf_counter() - t
        if not np.isfinite(new).all():
            stats["skipped"].append(f"{node.name}: non-finite solution")
            return
        dtype = w_p_full.dtype
        if view.bias is not None:
            self._write(g, ls, view.bias, new[:, -1].astype(dtype))
            new = new[:, :-1]
        self._write(g, ls, view.weight, view.unmatrix(new, w_p_full.shape).astype(dtype))
        stats["layers_refit"] += 1

    # ---- re-calibration ---------------------------------------------------------------------------------------
    def _reestimate_bn(self, node, g, ls, stats):
        x = ls.env_p.get(node.input[0])
        mean_name, var_name = node.input[3], node.input[4]
        if x is None or len(g.consumers.get(mean_name, [])) > 1 or len(g.consumers.get(var_name, [])) > 1:
            return
        dims = [0, *range(2, x.dim())]
        dtype = np.asarray(g.const(mean_name)).dtype
        self._write(g, ls, mean_name, x.double().mean(dims).numpy().astype(dtype))
        self._write(g, ls, var_name, x.double().var(dims, unbiased=False).numpy().astype(dtype))
        stats["bn_reestimated"] += 1

    def _affine(self, node, g, ls, stats):
        view = O.layer_view(g, node)
        grouped = node.op_type == "Conv" and view is None and g.const(node.input[1]) is not None
        if view is None and not grouped:
            return
        weight = node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        orig_node = _orig_node(ls, node)
        y_p = ls.env_p.get(node.output[0])
        y_o = ls.original(orig_node.output[0]) if orig_node is not None else None
        if y_p is None or y_o is None or len(g.consumers.get(weight, [])) > 1:
            return
        keep = self.out_rows[node.name]
        ch = 1 if node.op_type == "Conv" else y_p.dim() - 1
        dims = [d for d in range(y_p.dim()) if d != ch]
        yo = y_o.double().index_select(ch, ls.torch.from_numpy(np.flatnonzero(keep)))
        yp = y_p.double()
        s_o, s_p = yo.std(dims), yp.std(dims)
        scale = (s_o / s_p.clamp_min(1e-8)).clamp(0.0, 10.0).where(s_p > 1e-8, ls.torch.ones_like(s_p))
        shift = yo.mean(dims) - scale * yp.mean(dims)
        w = np.asarray(g.const(weight))
        out_axis = 1 if (view is not None and view.trans) else 0
        shape = [1] * w.ndim
        shape[out_axis] = -1
        self._write(g, ls, weight, (w * scale.numpy().reshape(shape)).astype(w.dtype))
        if bias is not None and len(g.consumers.get(bias, [])) == 1:
            b = np.asarray(g.const(bias))
            self._write(g, ls, bias, (b * scale.numpy() + shift.numpy()).astype(b.dtype))
            bshift = shift
        else:
            bshift = ls.torch.zeros_like(shift)
        view_shape = [1] * y_p.dim()
        view_shape[ch] = -1
        ls.env_p[node.output[0]] = (yp * scale.view(view_shape) + bshift.view(view_shape)).to(y_p.dtype)
        stats["affine_corrected"] += 1

    @staticmethod
    def _write(g, ls, name, value):
        g.set_const(name, value)
        ls.t_pruned.param(name).data.copy_(ls.torch.from_numpy(np.array(value)))


def _orig_node(ls: Lockstep, node):
    index = getattr(ls, "_by_name", None)
    if index is None:
        index = ls._by_name = {n.name: n for n in ls.orig_nodes}
    return index.get(node.name)


def output_rows(an, removed) -> dict[str, np.ndarray]:
    """For every node whose weight has a 'source' slice: the kept output rows of its original weight."""
    keep = an.keep_mask(removed)
    out: dict[str, np.ndarray] = {}
    for node in an.nodes:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            w = an.ctx.g.const(node.input[1])
            if w is None:
                continue
            view = O.layer_view(an.ctx.g, node)
            axis = 1 if (view is not None and view.trans) else 0
            out[node.name] = np.ones(w.shape[axis], bool)
    for ps in an.ctx.params:
        if ps.role == "source" and ps.node.name in out and ps.input_index == 1:
            view = O.layer_view(an.ctx.g, ps.node)
            axis = 1 if (view is not None and view.trans) else 0
            if ps.axis == axis:
                out[ps.node.name] &= keep(ps.atoms)
    return out
