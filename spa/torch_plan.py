"""A saved pruning plan applied to the PyTorch module the ONNX file was exported from (route 2 back to
PyTorch; route 1, ONNX -> torch without the original code, is spa/torch_bridge.py):

    spa.prune("model.onnx", "pruned.onnx", target_flops=0.5, save_plan="plan.json")

    from spa.torch_plan import apply_plan_to_module
    pruned = apply_plan_to_module(net, "plan.json", "model.onnx", example_inputs)   # a pruned deep copy

The plan's per-initializer section (what is cut, on which axis) is matched to the module's parameters by value:
exact copies (MatMul weights transposed, size-1 axes ignored), or, for weights the exporter folded a BatchNorm
into, equal up to one scale per output channel; the dynamo exporter's parameter names break ties. A BatchNorm
that was folded away gets the output-channel cut of the Conv/Linear that feeds it (found by running the module
once with forward hooks and following the tensors). Module attributes follow the new shapes (Conv
in/out_channels and groups, Linear in/out_features, BatchNorm num_features, LayerNorm normalized_shape,
Embedding sizes, PReLU num_parameters) and attention modules get their head count updated (an integer
attribute named heads / num_heads / num_attention_heads / n_heads / n_head / nhead on the module that owns the
projection whose output heads are removed; head pruning is refused with the group named when there is none).
The result is checked: the original module against the ONNX model, then the pruned module against the pruned
ONNX model, both in onnxruntime on the example inputs.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from spa.operators.weights import BIAS_INPUT
from spa.passes import PassManager, verify
from spa.passes.apply import Apply

from .driver import analyse, load
from .errors import SpaError, VerificationError
from .select import PruningPlan, tensor_section
from .torch_bridge import flat_outputs, rel_error, run_eval

HEAD_ATTRS = ("heads", "num_heads", "num_attention_heads", "n_heads", "n_head", "nhead")
HEAD_SIZE_ATTRS = ("all_head_size", "inner_dim")  # scaled with the head count where present


# ---- matching torch tensors to ONNX initializers by value -----------------------------------------------------------
_OUT_AXIS = {nn.Linear: 0, nn.Conv1d: 0, nn.Conv2d: 0, nn.Conv3d: 0,
             nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 1, nn.ConvTranspose3d: 1}


def _out_axis(module: nn.Module) -> int | None:
    for cls, axis in _OUT_AXIS.items():
        if isinstance(module, cls):
            return axis
    return None


class _Tensor:
    """One torch parameter or buffer (possibly shared by several modules), with the cuts decided for it."""

    def __init__(self, tensor, owners, order):
        self.tensor = tensor
        self.owners = owners  # [(qualified module name, module, attribute)]
        self.order = order    # first call of the owning module in the traced run (tie-break)
        self.keep: dict[int, np.ndarray] = {}
        self.why: dict[int, str] = {}
        self.groups: dict[int, set[int]] = {}  # axis -> plan groups that cut it

    @property
    def name(self) -> str:
        mod, _, attr = self.owners[0]
        return f"{mod}.{attr}" if mod else attr

    def cut(self, axis: int, keep: np.ndarray, why: str) -> None:
        keep = np.asarray(keep, dtype=np.int64)
        if axis in self.keep:
            if not np.array_equal(self.keep[axis], keep):
                raise SpaError(f"conflicting cuts for torch tensor '{self.name}' axis {axis}: from {self.why[axis]} "
                               f"and from {why}")
            return
        if len(keep) != self.tensor.shape[axis]:
            self.keep[axis], self.why[axis] = keep, why


def _scale_match(a: np.ndarray, b: np.ndarray, axis: int) -> bool:
    """a == s * b with one scale s per index along `axis` (a BatchNorm folded into the weight b)."""
    a2 = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).astype(np.float64)
    b2 = np.moveaxis(b, axis, 0).reshape(b.shape[axis], -1).astype(np.float64)
    bb = (b2 * b2).sum(1)
    s = np.where(bb > 0, (a2 * b2).sum(1) / np.where(bb > 0, bb, 1), 0.0)
    resid = np.abs(a2 - s[:, None] * b2).max(1)
    return bool((resid <= 1e-5 * np.abs(a2).max(1) + 1e-30).all())


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=1e-7 * float(np.abs(a).max(initial=0.0)))


def _squeezed_axes(shape) -> list[int]:
    return [i for i, d in enumerate(shape) if d != 1]


class _Matcher:
    """ONNX initializers -> torch tensors by value (see the module docstring)."""

    def __init__(self, module: nn.Module, order: dict[int, int]):
        self.tensors: dict[int, _Tensor] = {}
        for mname, mod in module.named_modules(remove_duplicate=False):
            for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                if t is None or not t.is_floating_point():
                    continue
                entry = self.tensors.get(id(t))
                if entry is None:
                    self.tensors[id(t)] = _Tensor(t, [(mname, mod, attr)], order.get(id(mod), 1 << 30))
                elif all(m is not mod or a != attr for _, m, a in entry.owners):
                    entry.owners.append((mname, mod, attr))
                    entry.order = min(entry.order, order.get(id(mod), 1 << 30))
        self.by_squeezed: dict[tuple, list[_Tensor]] = {}
        for e in self.tensors.values():
            shape = tuple(e.tensor.shape)
            self.by_squeezed.setdefault(tuple(d for d in shape if d != 1), []).append(e)
        self._np: dict[int, np.ndarray] = {}

    def _value(self, e: _Tensor) -> np.ndarray:
        v = self._np.get(id(e.tensor))
        if v is None:
            v = e.tensor.detach().cpu().float().numpy()
            self._np[id(e.tensor)] = v
        return v

    def find(self, name: str, value: np.ndarray) -> tuple[_Tensor, dict[int, int]] | None:
        """The torch tensor holding `value` and the map ONNX axis -> torch axis; None if nothing matches."""
        value = np.asarray(value, dtype=np.float32)
        found = []
        sq = tuple(d for d in value.shape if d != 1)
        for e in self.by_squeezed.get(sq, []):  # an exact copy, size-1 axes aside
            t = self._value(e)
            if t.size == value.size and _equal(t.reshape(sq), value.reshape(sq)):
                found.append((e, dict(zip(_squeezed_axes(value.shape), _squeezed_axes(t.shape)))))
        if value.ndim == 2:  # a MatMul weight: the Linear weight transposed
            for e in self.by_squeezed.get(value.shape[::-1], []):
                t = self._value(e)
                if t.ndim == 2 and _equal(t.T, value):
                    found.append((e, {0: 1, 1: 0}))
        if not found and value.ndim >= 2:  # a weight with a BatchNorm folded in: one scale per output channel
            pool = self.by_squeezed.get(sq, []) + (self.by_squeezed.get(value.shape[::-1], []) if value.ndim == 2
                                                   else [])
            for e in dict.fromkeys(pool):
                layer = next((m for _, m, a in e.owners if a == "weight" and _out_axis(m) is not None), None)
                if layer is None:
                    continue
                t, axis = self._value(e), _out_axis(layer)
                if t.shape == value.shape and _scale_match(value, t, axis):
                    found.append((e, {i: i for i in range(value.ndim)}))
                elif value.ndim == 2 and t.shape == value.shape[::-1] and _scale_match(value.T, t, axis):
                    found.append((e, {0: 1, 1: 0}))
        if not found:
            return None
        # ties (equal tensors): the dynamo exporter's name, then the module that runs first
        found.sort(key=lambda f: (f[0].name != name, f[0].order))
        return found[0]


# ---- running the module once --------------------------------------------------------------------------------------
def _trace(module: nn.Module, args) -> tuple[list, dict[int, int], object]:
    """Run once with forward hooks on every leaf module: [(module, input tensor ids, output tensor ids)] in
    call order, the first call index per module, and the outputs. Tensors are kept alive so ids stay unique."""
    calls, order, alive, handles = [], {}, [], []

    def hook(mod, inputs, output):
        ins = [t for t in flat_outputs(list(inputs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in flat_outputs(output) if isinstance(t, torch.Tensor)]
        alive.extend(ins + outs)
        order.setdefault(id(mod), len(calls))
        calls.append((mod, [id(t) for t in ins], [id(t) for t in outs]))

    for mod in module.modules():
        if not list(mod.children()):
            handles.append(mod.register_forward_hook(hook))
    try:
        out = run_eval(module, args)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise SpaError(f"the module does not run on the example inputs: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        for h in handles:
            h.remove()
    return calls, order, out


def _as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise SpaError("example_inputs must be a tensor or a tuple of tensors (the module's forward arguments)")


def _feeds(proto: onnx.ModelProto, args: tuple) -> dict:
    inits = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in inits]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if len(tensors) != len(names):
        raise SpaError(f"{len(tensors)} example input tensor(s) for an ONNX model with {len(names)} input(s) "
                       f"({', '.join(names)}); pass the forward arguments the model was exported with")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def _head_groups(analysis) -> set[int]:
    """Groups whose units span several output positions of one Gemm/MatMul weight (attention heads)."""
    out = set()
    for s in analysis.ctx.sources:
        if s.op_type in ("Gemm", "MatMul"):  # linear weight layers only: a conv output channel is never a head
            roots = analysis.find(s.atoms)
            _, counts = np.unique(roots[roots >= 0], return_counts=True)
            if len(counts) and counts.max() > 1:
                out.update(analysis.unit_group[int(r)] for r in np.unique(roots[roots >= 0]))
    return out


def apply_plan_to_module(module: nn.Module, plan, onnx_model, example_inputs, *, inplace: bool = False,
                         check: bool = True, rtol: float = 1e-4, input_shapes: dict | None = None,
                         report: dict | None = None) -> nn.Module:
    """Apply a pruning plan (a --save-plan JSON file, its parsed dict, or a spa PruningPlan) to the PyTorch
    module the ONNX model was exported from, so it can be trained further in your own code.

    onnx_model: the unpruned ONNX model the plan was made for (path, 'zoo:...', or ModelProto).
    example_inputs: the module's forward arguments (a tensor or a tuple), matching the ONNX inputs in order;
        the module runs once on them (in eval mode, without gradients) to see which modules feed which.
    inplace: False (default) returns a pruned deep copy and leaves `module` untouched; True prunes `module`
        itself (its Parameters are replaced: build optimizers after this call) and returns it.
    check: compare the module with the ONNX model in onnxruntime on the example inputs before pruning (a
        mismatch above rtol raises SpaError: the module must be what the ONNX file was exported from) and
        after (the pruned module against the ONNX model pruned by the same plan: VerificationError).
    report: a dict to fill with what was done: "tensors_cut" (torch names), "modules_changed",
        "max_rel_error" (the check after pruning; None without check).
    Raises SpaError where the plan cannot be carried over (see docs/torch.md: limitations)."""
    args = _as_args(example_inputs)
    model = load(onnx_model if not isinstance(onnx_model, (str, os.PathLike)) else str(onnx_model), input_shapes)
    analysis = analyse(model)
    removed = _read_plan(plan, analysis).roots(analysis)
    tensors = tensor_section(analysis, removed)
    target = module if inplace else copy.deepcopy(module)

    g = model.graph
    feeds = _feeds(g.model, args)
    calls, order, out_before = _trace(target, args)
    if check:
        _check_before(g, feeds, out_before, rtol)

    matcher = _Matcher(target, order)
    head_groups = _head_groups(analysis)
    _match_initializers(matcher, tensors, g)
    _follow_layers(matcher, calls)
    _check_heads(target, matcher, analysis, head_groups)

    # cut, then bring the module attributes in line with the new shapes
    changed, old_shapes = _cut(matcher)
    names = {id(m): n for n, m in target.named_modules(remove_duplicate=False)}
    for mod in changed.values():
        _update_attributes(mod, names.get(id(mod), ""), old_shapes)
    _update_heads(target, changed, old_shapes, analysis, head_groups, matcher)

    err = _check_after(model, analysis, removed, target, args, feeds, rtol) if check else None
    if report is not None:
        report.update(tensors_cut=sorted(e.name for e in matcher.tensors.values() if e.keep),
                      modules_changed=sorted(names.get(k, "") for k in changed), max_rel_error=err)
    return target


def _read_plan(plan, analysis) -> PruningPlan:
    """The plan as a PruningPlan: given as one, or as its JSON (a file path or the parsed dict)."""
    if isinstance(plan, PruningPlan):
        return plan
    data = plan
    if isinstance(plan, (str, os.PathLike)):
        try:
            data = json.loads(Path(plan).read_text())
        except (OSError, ValueError) as e:
            raise SpaError(f"cannot read plan {plan}: {e}")
    return PruningPlan.from_json(data, analysis)


def _check_before(g, feeds: dict, out_before, rtol: float) -> None:
    """The unpruned module must reproduce the ONNX model it is said to be exported from."""
    err = rel_error(verify.run(g.to_model(), feeds, "reference"), flat_outputs(out_before))
    if not err <= rtol:
        raise SpaError(f"the module does not reproduce the ONNX model on the example inputs (max rel. error "
                       f"{err:.3g} > {rtol:g}): pass the ONNX file exported from this module and its inputs")


# ---- mapping the plan's ONNX initializers to torch tensors -------------------------------------------------------
def _match_initializers(matcher: _Matcher, tensors: dict, g) -> None:
    """Record the plan's cuts on the torch tensors holding the ONNX initializers it cuts; an initializer with
    no match must be a bias the exporter folded into a Conv/Gemm/ConvTranspose whose weight matched."""
    weight_of: dict[int, _Tensor] = {}  # id(ONNX node) -> matched torch tensor of its weight
    pending = []
    for name, entry in tensors.items():
        if "uses" in entry:
            raise SpaError(f"ONNX initializer '{name}' is shared by nodes that are cut differently (tied or "
                           "exporter-merged tensors); one torch tensor cannot be cut two ways")
        hit = matcher.find(name, g.const(name))
        if hit is None:
            pending.append(name)
            continue
        e, axes = hit
        for axis, kept in entry["keep"].items():
            e.cut(axes[int(axis)], np.asarray(kept), f"ONNX initializer '{name}'")
        for node, idx in g.consumers.get(name, []):
            if idx == 1:
                weight_of[id(node)] = e
        for axis, gids in entry["groups"].items():
            e.groups.setdefault(axes[int(axis)], set()).update(gids)
    for name in pending:  # a folded bias: the Conv/Gemm/ConvTranspose whose weight matched carries it
        uses = g.consumers.get(name, [])
        if not uses or not all(BIAS_INPUT.get(n.op_type) == i and id(n) in weight_of
                               for n, i in uses):
            shape = "x".join(map(str, g.const_info(name)[0]))
            raise SpaError(f"no torch parameter or buffer matches ONNX initializer '{name}' ({shape}), which the plan "
                           "cuts; was the ONNX file exported from this module (same weights)?")


def _follow_layers(matcher: _Matcher, calls: list) -> None:
    """Module rules: biases and folded BatchNorms follow their layer's output channels."""
    produced_by: dict[int, nn.Module] = {}
    for mod, _, outs in calls:
        for o in outs:
            produced_by.setdefault(o, mod)
    for e in list(matcher.tensors.values()):
        for mname, mod, attr in e.owners:
            axis = _out_axis(mod)
            if attr != "weight" or axis is None or axis not in e.keep:
                continue
            keep, why = e.keep[axis], f"the output channels of '{mname}'"
            if mod.bias is not None:
                matcher.tensors[id(mod.bias)].cut(0, keep, why)
            for bn, ins, _ in calls:
                if isinstance(bn, nn.modules.batchnorm._BatchNorm) and ins and produced_by.get(ins[0]) is mod:
                    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                        if t is not None:
                            matcher.tensors[id(t)].cut(0, keep, why)


# ---- slicing ------------------------------------------------------------------------------------------------------
def _cut(matcher: _Matcher) -> tuple[dict[int, nn.Module], dict[tuple[int, str], tuple]]:
    """Replace every tensor with a cut by its kept slices (a Parameter stays a Parameter); returns the modules
    changed (by id) and the old shape of each (id(module), attribute) replaced."""
    changed: dict[int, nn.Module] = {}
    old_shapes: dict[tuple[int, str], tuple] = {}
    for e in matcher.tensors.values():
        if not e.keep:
            continue
        t = e.tensor.detach()
        for axis, keep in sorted(e.keep.items()):
            t = t.index_select(axis, torch.as_tensor(keep, device=t.device))
        t = t.contiguous()
        new = nn.Parameter(t, requires_grad=e.tensor.requires_grad) if isinstance(e.tensor, nn.Parameter) else t
        for _, mod, attr in e.owners:
            old_shapes[(id(mod), attr)] = tuple(e.tensor.shape)
            if attr in mod._parameters:
                mod._parameters[attr] = new
            else:
                mod._buffers[attr] = new
            changed[id(mod)] = mod
    return changed, old_shapes


def _check_after(model, analysis, removed: set[int], target: nn.Module, args: tuple, feeds: dict,
                 rtol: float) -> float:
    """Prune the ONNX model by the same plan (in place) and compare the pruned module with it: the max rel. error."""
    PassManager([Apply(analysis, removed)]).run(model)  # the manager drops the now stale analyses
    pruned = model.graph.to_model()
    try:
        got = run_eval(target, args)
    except RuntimeError as ex:
        raise VerificationError(f"the pruned module does not run: {str(ex).splitlines()[0][:300]}")
    err = rel_error(verify.run(pruned, feeds), flat_outputs(got))
    if not err <= rtol:
        raise VerificationError(f"the pruned module differs from the pruned ONNX model: max rel. error {err:.3g} "
                                f"> {rtol:g}")
    return err


# ---- attention heads and module attributes -----------------------------------------------------------------------
def _check_heads(target, matcher, analysis, head_groups) -> None:
    """A projection whose output loses whole heads needs a head-count attribute on its owner module."""
    names = dict(target.named_modules(remove_duplicate=False))
    for e in matcher.tensors.values():
        groups = e.groups.get(0, set()) & head_groups
        if not groups:
            continue
        for mname, mod, attr in e.owners:
            if isinstance(mod, nn.MultiheadAttention):
                g = analysis.groups[min(groups)]
                raise SpaError(f"group {g.id} '{g.name}' removes attention heads of nn.MultiheadAttention "
                               f"'{mname}', whose embed_dim is also the width of its input and output; head pruning "
                               "is not supported there (exclude the group with --exclude)")
            if not isinstance(mod, nn.Linear) or attr != "weight" or 0 not in e.keep:
                continue
            parent = names.get(mname.rpartition(".")[0]) if "." in mname else target
            if parent is None or not any(isinstance(getattr(parent, a, None), int) for a in HEAD_ATTRS):
                g = analysis.groups[min(groups)]
                raise SpaError(f"group {g.id} '{g.name}' removes whole attention heads, but '{mname}''s owner "
                               f"module has no head-count attribute ({', '.join(HEAD_ATTRS)}) to update; exclude the "
                               "group with --exclude or use the ONNX route (spa-prune to-torch)")


def _update_heads(target, changed, old_shapes, analysis, head_groups, matcher) -> None:
    names = dict(target.named_modules(remove_duplicate=False))
    ratios: dict[int, tuple[nn.Module, set]] = {}
    for e in matcher.tensors.values():
        if not e.groups.get(0, set()) & head_groups:
            continue
        for mname, mod, attr in e.owners:
            if isinstance(mod, nn.Linear) and attr == "weight":
                parent = names.get(mname.rpartition(".")[0]) if "." in mname else target
                old = old_shapes[(id(mod), "weight")][0]
                ratios.setdefault(id(parent), (parent, set()))[1].add((mod.out_features, old))
    for parent, fracs in ratios.values():
        if len({new * 1.0 / old for new, old in fracs}) != 1:
            raise SpaError(f"the projections of attention module {type(parent).__name__} lose different fractions "
                           "of their heads")
        new, old = next(iter(fracs))
        for a in HEAD_ATTRS + HEAD_SIZE_ATTRS:
            v = getattr(parent, a, None)
            if isinstance(v, int) and not isinstance(v, bool):
                if (v * new) % old:
                    raise SpaError(f"{type(parent).__name__}.{a} = {v} cannot shrink by {new}/{old}")
                setattr(parent, a, v * new // old)


def _update_attributes(mod: nn.Module, name: str, old_shapes) -> None:
    w = mod._parameters.get("weight")
    if isinstance(mod, nn.modules.conv._ConvNd):
        if mod.transposed:
            old_in = old_shapes.get((id(mod), "weight"), w.shape)[0]
            groups = mod.groups * w.shape[0] // old_in if mod.groups > 1 else 1
            if mod.groups > 1 and (mod.groups * w.shape[0]) % old_in:
                raise SpaError(f"ConvTranspose '{name}': the cut removes part of a conv group")
            mod.groups, mod.in_channels, mod.out_channels = groups, w.shape[0], w.shape[1] * groups
        else:
            old_out = old_shapes.get((id(mod), "weight"), w.shape)[0]
            if mod.groups > 1 and (mod.groups * w.shape[0]) % old_out:
                raise SpaError(f"Conv '{name}': the cut removes part of a conv group")
            groups = mod.groups * w.shape[0] // old_out if mod.groups > 1 else 1
            mod.groups, mod.out_channels, mod.in_channels = groups, w.shape[0], w.shape[1] * groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = w.shape
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else mod._buffers.get("running_mean")
        mod.num_features = ref.shape[0]
    elif isinstance(mod, nn.LayerNorm):
        mod.normalized_shape = tuple(w.shape) if w is not None else mod.normalized_shape
    elif isinstance(mod, nn.GroupNorm):
        raise SpaError(f"GroupNorm '{name}' would lose channels; not supported")
    elif isinstance(mod, nn.Embedding):
        mod.num_embeddings, mod.embedding_dim = w.shape
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = w.numel()
    elif isinstance(mod, nn.MultiheadAttention):
        raise SpaError(f"nn.MultiheadAttention '{name}' would lose channels; not supported")


__all__ = ["apply_plan_to_module"]
