"""Reconstruction after structural pruning: change values of kept parameters so the pruned model's layers
reproduce the original's, measured on calibration (or synthesized) inputs.

The pruned model runs node by node, in topological order, on the whole calibration set. The original layers'
outputs come from the OBS scoring pass, which kept them at its sampled positions (`targets`); for a layer without
them the original runs beside it and advances lazily to the tensors the pruned side asks for. Before a layer of the pruned model runs, its
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

from spa import execution, obspa, patterns, quant
from spa.errors import SpaError
from spa.ir import Graph
from spa.operators.recurrent import GATES as RECURRENT
from spa.operators.registry import canonical_domain

from . import Pass
from .compensate import structure

PATTERN_CHOICE = "obs"  # patterned group-1 convs choose their shapes again on their input's Hessian ("magnitude")


class Lockstep:
    """The original and the pruned model executed side by side on the same inputs (torch, no gradients), in
    chunks of samples (a model with a fixed batch dim gets exactly that many per run). Statistics are summed
    over the chunks before a layer is updated, so the result does not depend on the chunking."""

    def __init__(self, original: onnx.ModelProto, pruned: Graph, feeds: dict[str, np.ndarray], chunk=(64, False)):
        import torch

        from spa.torch_graph import TorchGraph  # torch: an optional dependency

        self.torch = torch
        self.original_proto = original
        self.orig_graph = Graph(original)
        self.shapes = pruned.shapes   # dim 0 at batch 1, what batch_free reads, is the original's too
        self.orig_nodes = list(self.orig_graph.model.graph.node)
        self.batch_free = execution.batch_free_polymorphic(pruned, feeds)   # as layerwise_batch chunked them
        self.t_pruned = execution.fast_layout(TorchGraph(pruned, batch_free=self.batch_free))
        n = int(next(iter(feeds.values())).shape[0])
        self.parts = list(execution.chunks(feeds, n, chunk))
        if not self.parts:
            raise SpaError(f"{n} samples are fewer than the model's fixed batch size {chunk[0]}")
        self.env_p = [self.t_pruned.initial_env(c) for c in self.parts]
        self.n = sum(int(next(iter(c.values())).shape[0]) for c in self.parts)
        self.t_orig = self.env_o = None   # the original runs only when a layer's target was not kept (`original`)
        self.orig_pos = 0
        self._outputs_o = {o.name for o in original.graph.output}
        self.forward_s = 0.0

    def original(self, name: str):
        """The original model's tensor `name` per chunk (advancing the original up to its producer), or None."""
        t0 = time.perf_counter()
        if self.t_orig is None:
            from spa.torch_graph import TorchGraph

            self.t_orig = execution.fast_layout(TorchGraph(self.original_proto, batch_free=self.batch_free,
                                                           shapes=self.shapes))
            self.orig_nodes = list(self.t_orig.nodes)
            self.env_o = [self.t_orig.initial_env(c) for c in self.parts]
        while name not in self.env_o[0] and self.orig_pos < len(self.orig_nodes):
            node = self.orig_nodes[self.orig_pos]
            for env in self.env_o:
                self.t_orig.step(node, env)
                release(env, self.t_orig, self.orig_pos, self._outputs_o)
            self.orig_pos += 1
        self.forward_s += time.perf_counter() - t0
        if name not in self.env_o[0]:
            return None
        return [env[name] for env in self.env_o]

    def pruned_value(self, name: str):
        if name not in self.env_p[0]:
            return None
        return [env[name] for env in self.env_p]



def release(env: dict, tg, pos: int, protect: set[str]) -> None:
    """Drop the tensors TorchGraph says are dead after node `pos` (graph outputs are kept: the original's are
    asked for after they were produced)."""
    for name in tg.free_after(pos):
        if name not in protect:
            env.pop(name, None)


class Reconstruct(Pass):
    name = "reconstruct"

    def __init__(self, original: onnx.ModelProto, out_rows: dict[str, np.ndarray], feeds: dict[str, np.ndarray], *,
                 refit: bool = True, recalibrate: bool = False, positions: int = obspa.DEFAULT_POSITIONS,
                 damp: float = obspa.DEFAULT_DAMP, seed: int = 0, progress=None,
                 targets: dict[str, obspa.LayerTargets] | None = None, patterns: dict | None = None,
                 pattern_choice: str | None = None):
        """out_rows: for each weight-carrying node (by name), the kept output rows of its original weight.
        targets: the original layers' outputs at sampled positions, kept by the OBS scoring pass on the same
        `feeds` (restricted to the kept output rows): those layers are refit without running the original.
        patterns: node name -> spa.patterns.LayerPattern: those layers are refit on their kept positions only
        (each output channel on its own support), their zeros stay exact."""
        self.original, self.out_rows, self.feeds = original, out_rows, feeds
        self.patterns = patterns or {}
        self.pattern_choice = pattern_choice or PATTERN_CHOICE
        self.targets = targets or {}
        self.refit, self.recalibrate = refit, recalibrate
        self.positions, self.damp, self.seed = positions, damp, seed
        self.progress = progress or (lambda s: None)

    def run(self, model) -> dict:
        import torch

        g = model.graph
        before = structure(g.to_model())
        ls = Lockstep(self.original, g, self.feeds, execution.layerwise_batch(g, 64, self.feeds))
        gen = torch.Generator().manual_seed(self.seed)
        stats = {"layers_refit": 0, "targets_from_scoring": 0, "bn_reestimated": 0, "affine_corrected": 0,
                 "scales_widened": 0, "skipped": [], "positions_per_layer": self.positions, "samples": ls.n}
        timing = {"forward_s": 0.0, "hessian_s": 0.0, "solve_s": 0.0}
        nodes = list(ls.t_pruned.nodes)
        outputs = set(g.output_names)
        followed_by_bn = {n.input[0] for n in nodes if n.op_type == "BatchNormalization"}
        with torch.no_grad():
            for pos, node in enumerate(nodes):
                if self.refit and node.name in self.out_rows:
                    self._refit(node, g, ls, gen, stats, timing)
                elif self.refit and node.op_type in RECURRENT:
                    stats["skipped"].append(f"{node.name}: a recurrent layer is not refit (pruned by its score only)")
                if self.recalibrate and node.op_type == "BatchNormalization":
                    self._reestimate_bn(node, g, ls, stats)
                t = time.perf_counter()
                dying = set(ls.t_pruned.free_after(pos)) - outputs   # a Relu/Add may write into these
                for env in ls.env_p:
                    ls.t_pruned.step(node, env, reuse=dying)
                timing["forward_s"] += time.perf_counter() - t
                if self.recalibrate and node.name in self.out_rows and node.output[0] not in followed_by_bn:
                    self._affine(node, g, ls, stats)
                for env in ls.env_p:
                    release(env, ls.t_pruned, pos, outputs)
                if pos % 20 == 0:
                    self.progress(f"reconstruct: {pos + 1}/{len(nodes)} nodes")
        timing["forward_s"] += ls.forward_s
        integer = [n.op_type for n in nodes if (canonical_domain(n.domain), n.op_type) in quant.QOPERATOR]
        if self.refit and integer:
            count, integer = len(integer), sorted(set(integer))
            stats["skipped"].append(f"{count} layer(s) with integer kernels ({', '.join(integer)}): not refit")
            model.warnings.append(
                f"{count} quantized layer(s) with integer kernels ({', '.join(integer)}) are ranked by weight "
                f"magnitude and not refit, so a deep cut can lose much of the accuracy (the fidelity line says how "
                f"much): the same model quantized in QDQ form (onnxruntime's quantize_static default) is scored "
                f"and refit, or prune the float model and quantize it afterwards")
        after = structure(g.to_model())
        patterns.check_patterns(g, self.patterns)
        if before != after:
            raise SpaError("internal: reconstruction changed the model's structure (it may only change values)")
        stats["timings_s"] = {k: round(v, 3) for k, v in timing.items()}
        return stats

    # ---- least-squares refit ---------------------------------------------------------------------------------
    def _refit(self, node, g, ls, gen, stats, timing):
        lp = self.patterns.get(node.name)
        # a patterned grouped conv (depthwise: one kernel per channel) is refit per group on its kept positions.
        # Without a pattern a grouped conv keeps its cut weights: refit per group too, it brought MobileNetV2 on
        # digits +2.2 points data-free at 70 % of the MACs removed but cost PP-OCRv4's detector 0.02 / 0.05 of
        # text IoU on held-out natural images (BENCHMARKS.md, "Depthwise convs in the channel refit")
        view = obspa.refit_view(g, node) if lp is not None else obspa.layer_view(g, node)
        orig_node = _orig_node(ls, node)
        if view is None or orig_node is None:
            return
        grouped = view.kind == "conv" and view.conv["group"] > 1
        ov = obspa.refit_view(ls.orig_graph, orig_node)
        if ov is None or ov.kind != view.kind or (ov.bias is None) != (view.bias is None):
            stats["skipped"].append(f"{node.name}: original and pruned layers differ in kind")
            return
        if len(g.consumers.get(view.weight, [])) > 1 or (view.bias and len(g.consumers.get(view.bias, [])) > 1):
            stats["skipped"].append(f"{node.name}: weight shared by several nodes")
            return
        xs_p = ls.pruned_value(node.input[view.data_index])
        if xs_p is None:
            stats["skipped"].append(f"{node.name}: input not available")
            return
        target = self.targets.pop(node.name, None)
        totals = [obspa.output_positions(view, x_p) for x_p in xs_p]
        if target is not None and target.total != sum(totals):
            target = None   # not the positions the scoring pass saw: read the original instead
        ys_o = None if target is not None else ls.original(orig_node.output[0])   # the refit's target
        if target is None and ys_o is None:
            stats["skipped"].append(f"{node.name}: input not available")
            return
        t = time.perf_counter()
        keep = self.out_rows[node.name]
        kept = ls.torch.from_numpy(np.flatnonzero(keep)) if not keep.all() else None
        gram = patterns.GroupedGram(view.conv["group"], view.bias is not None) if grouped \
            else obspa.Gram(ones=view.bias is not None)
        start = 0
        for k, x_p in enumerate(xs_p):
            x_p = x_p.float()
            total = totals[k]
            if target is not None:   # the original layer's output at the positions the scoring pass sampled
                rows, y_rows = target.between(start, start + total)
                start += total
            else:
                y_o = ys_o[k]
                if total != y_o.numel() // y_o.shape[1 if view.kind == "conv" else -1]:
                    stats["skipped"].append(f"{node.name}: positions differ")
                    return
                quota = max(1, round(self.positions * x_p.shape[0] / ls.n))
                rows = obspa.pick_rows(total, quota, gen)
                y_rows = obspa.sample_outputs(view, y_o.float(), rows, kept)
            if not len(rows):
                continue
            gram.add(obspa.sample_rows(view, x_p, rows), y_rows)   # both Grams add the bias's ones column
        if gram.xy is None:
            stats["skipped"].append(f"{node.name}: no sampled positions")
            return
        w_p_full = np.asarray(quant.weight(g, view.weight))
        w_p = view.matrix(w_p_full).astype(np.float64)
        if view.bias is not None:
            w_p = np.concatenate([w_p, np.asarray(quant.weight(g, view.bias), np.float64)[:, None]], 1)
        if not grouped and gram.xy.shape != (w_p.shape[1], w_p.shape[0]):
            stats["skipped"].append(f"{node.name}: kept output rows do not match the pruned weight")
            return
        timing["hessian_s"] += time.perf_counter() - t
        t = time.perf_counter()
        if lp is not None and not grouped and self.pattern_choice == "obs" and lp.dense is not None:
            mask = patterns.choose_by_obs(lp, gram, self.damp)       # from the dense weight, on this input
            w_p[:, :mask[0].size] = view.matrix(np.where(mask, lp.dense, 0))
        if grouped:   # only a patterned one (refit_view)
            new = patterns.refit_grouped(w_p, gram, self.damp, patterns.refit_support(view, lp.mask))
        elif lp is not None:
            new = patterns.refit_masked(w_p, gram, self.damp, patterns.refit_support(view, lp.mask))
        else:
            new, _ = obspa.refit(w_p, gram, self.damp)
        timing["solve_s"] += time.perf_counter() - t
        if not np.isfinite(new).all():
            stats["skipped"].append(f"{node.name}: non-finite solution")
            return
        dtype = w_p_full.dtype
        qt = quant.dequantize_linear_of(g, view.weight)
        if qt is not None and not self._fit_scales(g, ls, view, qt, new, w_p_full, stats, node.name):
            return
        if view.bias is not None:
            self._write(g, ls, view.bias, new[:, -1].astype(dtype))
            new = new[:, :-1]
        self._write(g, ls, view.weight, view.unmatrix(new, w_p_full.shape).astype(dtype))
        stats["layers_refit"] += 1
        stats["targets_from_scoring"] += target is not None

    def _fit_scales(self, g, ls, view, qt, new, w_p_full, stats, name) -> bool:
        """A QDQ weight's refit values as its integers can hold them: its scales widened, channel by channel, where
        values would saturate (a pruned layer's refit often leaves the range its scales were calibrated for, and
        a clipped refit is worse than none), and a quantized bias's scale by the same factor, which keeps
        bias scale = input scale x weight scale (onnxruntime's fused integer kernels read the bias so). False, with
        a line, where the scales cannot be changed: the layer keeps its pruned weights."""
        w_new = view.unmatrix(new[:, :w_p_full.size // new.shape[0]], w_p_full.shape)
        _, clipped = quant.quantize(g, qt, w_new)
        if clipped == 0:
            return True
        scale = quant.widened_scale(g, qt, w_new)
        bias_qt = quant.dequantize_linear_of(g, view.bias) if view.bias is not None else None
        old = np.asarray(g.const(qt.node.input[qt.scale])) if scale is not None else None
        bias_scale = None
        if bias_qt is not None and scale is not None:
            b_name = bias_qt.node.input[bias_qt.scale] if bias_qt.scale is not None else ""
            b_old = np.asarray(g.const(b_name)) if b_name else None
            if (b_old is None or len(g.consumers.get(b_name, [])) != 1
                    or (b_old.size != old.size and old.size != 1)):
                scale = None
            else:
                factor = scale.astype(np.float64) / old.astype(np.float64)
                bias_scale = (b_old.astype(np.float64) * factor.reshape(-1)[:b_old.size].reshape(b_old.shape)
                              if b_old.size == old.size else b_old * float(factor.reshape(-1)[0]))
        if scale is None:
            stats["skipped"].append(f"{name}: quantized weight, {clipped:.1%} of the refit values fall outside the "
                                    f"range of its scales, which cannot be widened here (kept as pruned)")
            return False
        self._set(g, ls, qt.node.input[qt.scale], scale)
        if bias_scale is not None:
            self._set(g, ls, bias_qt.node.input[bias_qt.scale], np.asarray(bias_scale).astype(b_old.dtype))
        stats["scales_widened"] += 1
        return True

    # ---- re-calibration ---------------------------------------------------------------------------------------
    def _reestimate_bn(self, node, g, ls, stats):
        xs = ls.pruned_value(node.input[0])
        if xs is not None and reestimate_bn(g, node, xs, lambda name, value: self._write(g, ls, name, value)):
            stats["bn_reestimated"] += 1

    def _affine(self, node, g, ls, stats):
        view, applies = affine_layer(g, node)
        if not applies:
            return
        orig_node = _orig_node(ls, node)
        ys_p = ls.pruned_value(node.output[0])
        ys_o = ls.original(orig_node.output[0]) if orig_node is not None else None
        if ys_p is None or ys_o is None or len(g.consumers.get(node.input[1], [])) > 1:
            return
        keep = ls.torch.from_numpy(np.flatnonzero(self.out_rows[node.name]))
        ch = channel_axis(node, ys_p[0])
        m_o, v_o = channel_moments([y.index_select(ch, keep) for y in ys_o], ch)
        correct_affine(g, node, view, m_o, v_o, ls.env_p, ys_p, ch,
                       lambda name, value: self._write(g, ls, name, value), float64=True)
        stats["affine_corrected"] += 1

    @staticmethod
    def _write(g, ls, name, value):
        qt = quant.dequantize_linear_of(g, name)
        if qt is not None:  # a QDQ weight: the refit values requantized with its own (sliced) scales
            name, value = qt.node.input[qt.q], quant.quantize(g, qt, value)[0]
        Reconstruct._set(g, ls, name, value)

    @staticmethod
    def _set(g, ls, name, value):
        """Write a constant in the graph and in the pruned torch model. A DequantizeLinear that reads it (a QDQ
        weight's integers or scale) ran earlier in the node order than the layer being refit: its output is
        computed again, or the layer and everything after it would run on the weight from before the refit,
        and the later layers' refits would fit a model other than the one written."""
        g.set_const(name, value)
        ls.t_pruned.static(name).data.copy_(ls.torch.from_numpy(np.array(value)))
        for node, _ in g.consumers.get(name, []):
            if node.op_type == "DequantizeLinear" and node.output[0] in ls.env_p[0]:
                for env in ls.env_p:   # its inputs are the statics just updated in place
                    ls.t_pruned.step(node, env)


# ---- re-calibration, shared with the search's one-pass reward (spa.search) ----------------------------------------
def channel_axis(node, y) -> int:
    """The channel axis of a weight layer's output `y`: 1 for a Conv, the last one for Gemm/MatMul."""
    return 1 if node.op_type == "Conv" else y.dim() - 1


def reestimate_bn(g, node, xs, write) -> bool:
    """BN re-estimation: the BatchNormalization `node` gets the per-channel mean and variance of its input chunks
    `xs` (the pruned model's) as running statistics, through `write(name, value)`. False (nothing written) when
    the statistics are shared with another node."""
    mean_name, var_name = node.input[3], node.input[4]
    if len(g.consumers.get(mean_name, [])) > 1 or len(g.consumers.get(var_name, [])) > 1:
        return False
    mean, var = channel_moments(xs, 1)
    write(mean_name, mean.astype(np.asarray(g.const(mean_name)).dtype))
    write(var_name, var.astype(np.asarray(g.const(var_name)).dtype))
    return True


def affine_layer(g, node) -> tuple[object, bool]:
    """(spa.obspa.layer_view of `node` or None, whether the affine correction handles it: a plain Conv/Gemm/
    MatMul layer, or a grouped Conv with a constant weight)."""
    view = obspa.layer_view(g, node)
    grouped = node.op_type == "Conv" and view is None and g.const(node.input[1]) is not None
    return view, view is not None or grouped


def correct_affine(g, node, view, m_o, v_o, envs, ys_p, ch: int, write, *, float64: bool) -> None:
    """The affine correction of one layer: `fold_affine` into its weight and bias, and the same scale and shift
    applied to its outputs already computed (`ys_p`, one per chunk; replaced in `envs`). float64: the outputs
    are corrected in float64 and cast back (Reconstruct); else in their own precision (the search's one-pass
    re-calibration: one fused multiply-add per element)."""
    import torch

    scale, shift = fold_affine(g, node, view, m_o, v_o, ys_p, ch, write)
    view_shape = [1] * ys_p[0].dim()
    view_shape[ch] = -1
    sc = torch.from_numpy(scale).view(view_shape)
    sh = torch.from_numpy(shift).view(view_shape)
    for env, y in zip(envs, ys_p):
        if float64:
            env[node.output[0]] = (y.double() * sc + sh).to(y.dtype)
        else:
            env[node.output[0]] = torch.addcmul(sh.to(y.dtype), y, sc.to(y.dtype))


def fold_affine(g, node, view, m_o, v_o, ys_p, ch: int, write) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel scale and shift that give the pruned layer's outputs `ys_p` the original's moments
    (m_o, v_o), folded into the layer's weight and, where the layer owns its bias, the bias (`write(name,
    value)` stores a new initializer value). Returns (scale, shift) for the outputs already computed; shift is 0
    where no bias could absorb it."""
    weight = node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    m_p, v_p = channel_moments(ys_p, ch)
    s_o, s_p = np.sqrt(v_o), np.sqrt(v_p)
    scale = np.where(s_p > 1e-8, np.clip(s_o / np.maximum(s_p, 1e-8), 0.0, 10.0), 1.0)
    shift = m_o - scale * m_p
    w = np.asarray(g.const(weight))
    shape = [1] * w.ndim
    shape[1 if (view is not None and view.trans) else 0] = -1
    write(weight, (w * scale.reshape(shape)).astype(w.dtype))
    if bias is not None and len(g.consumers.get(bias, [])) == 1:
        b = np.asarray(g.const(bias))
        write(bias, (b * scale + shift).astype(b.dtype))
    else:
        shift = np.zeros_like(shift)
    return scale, shift


def channel_moments(tensors, ch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) variance over every other axis of a list of chunks."""
    total, sq, count = 0.0, 0.0, 0
    for t in tensors:
        dims = [d for d in range(t.dim()) if d != ch]
        t = t.double()
        total = total + t.sum(dims)
        sq = sq + (t * t).sum(dims)
        count += t.numel() // t.shape[ch]
    mean = (total / count).numpy()
    return mean, np.maximum((sq / count).numpy() - mean * mean, 0.0)


def _orig_node(ls: Lockstep, node):
    index = getattr(ls, "_by_name", None)
    if index is None:
        index = ls._by_name = {n.name: n for n in ls.orig_nodes}
    return index.get(node.name)


def output_rows(analysis, removed) -> dict[str, np.ndarray]:
    """For every node whose weight has a 'source' slice: the kept output rows of its original weight."""
    keep = analysis.keep_mask(removed)
    out: dict[str, np.ndarray] = {}
    out_axis: dict[str, int] = {}
    for node in analysis.nodes:
        # not spa.operators.is_weight_layer: OBSPA views read input 1 only and ConvTranspose has its out axis at 1
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            w = quant.weight(analysis.ctx.g, node.input[1])
            if w is None:
                continue
            view = obspa.layer_view(analysis.ctx.g, node)
            out_axis[node.name] = 1 if (view is not None and view.trans) else 0
            out[node.name] = np.ones(w.shape[out_axis[node.name]], bool)
    for ps in analysis.ctx.params:
        node, slot = quant.weight_use(analysis.ctx.g, ps.node, ps.input_index)
        if ps.role == "source" and node.name in out and slot == 1 and ps.axis == out_axis[node.name]:
            out[node.name] &= keep(ps.atoms)
    return out
