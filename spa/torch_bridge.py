"""Back to PyTorch: a (pruned) ONNX model as a trainable torch module, or a saved plan applied to your own module.

Route 1, ONNX -> torch (no original PyTorch code needed):

    spa-prune to-torch pruned.onnx pruned.pt          # checks the reloaded module against onnxruntime

    from spa.torch_bridge import load_torch, to_torch, save_torch
    net = load_torch("pruned.pt")                     # a torch.nn.Module (spa.torch_graph.TorchGraph)
    y = net(x)                                        # graph inputs positionally or by name
    net = to_torch("pruned.onnx"); save_torch(net, "pruned.pt")   # the same from Python

The file is a plain torch.save dict: {"format": "spa-prune-torch/1", "onnx": the model's ONNX bytes with the
float initializers' data stripped (the structure), "params": ONNX initializer name -> state-dict key,
"state_dict": the module's state dict, "upcast_half": bool}; load_torch rebuilds the module from the structure
and fills it from the state dict (torch.load with weights_only=True: no code is unpickled). Every float
initializer is an nn.Parameter (`net.param("conv1.weight")`, `net.state_dict_onnx()` by ONNX name), so the
module trains with any optimizer; `save_torch` writes it back after fine-tuning.

Route 2, a saved plan applied to the PyTorch module the ONNX file was exported from:

    spa.prune("model.onnx", "pruned.onnx", target_flops=0.5, save_plan="plan.json")
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
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from spa.operators.weights import BIAS_INPUT

from .errors import SpaError, VerificationError
from .fileio import atomic_write
from .torch_graph import TorchGraph

FORMAT = "spa-prune-torch/1"
HEAD_ATTRS = ("heads", "num_heads", "num_attention_heads", "n_heads", "n_head", "nhead")
HEAD_SIZE_ATTRS = ("all_head_size", "inner_dim")  # scaled with the head count where present


# ==== route 1: ONNX -> torch ========================================================================================
class OnnxModule(TorchGraph):
    """A TorchGraph that keeps its ONNX structure, so it can be saved (save_torch) and rebuilt (load_torch)."""

    def __init__(self, model, *, upcast_half: bool = True, structure: bytes | None = None):
        super().__init__(model, upcast_half=upcast_half)
        if structure is None:
            structure = _structure(_proto_of(model), set(self._param_key))
        self.onnx_structure = structure

    def save(self, path) -> None:
        save_torch(self, path)


def _proto_of(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    graph = getattr(model_or_path, "graph", None)
    if hasattr(graph, "to_model"):  # spa.model.Model
        return graph.to_model()
    if hasattr(model_or_path, "to_model"):  # spa.ir.Graph
        return model_or_path.to_model()
    path = str(model_or_path)
    if path.startswith("zoo:"):
        from .driver import resolve_input
        path = resolve_input(path)
    from .ir import load_model
    return load_model(path)  # one-line SpaError for missing or bad files


def to_torch(model_or_path, *, upcast_half: bool = True) -> OnnxModule:
    """An ONNX model (path, 'zoo:NAME[:small][:dynamo]', onnx.ModelProto, spa Model/Graph) as a trainable
    torch.nn.Module (a TorchGraph subclass) that reproduces its outputs. The graph is taken as it is (not
    normalized); SpaError names the operators without a torch lowering."""
    return OnnxModule(_proto_of(model_or_path), upcast_half=upcast_half)


def _structure(proto: onnx.ModelProto, params: set[str]) -> bytes:
    """The model's bytes with the data of the given (float) initializers left out: their names, dtypes and
    shapes stay, the values travel in the state dict."""
    out = onnx.ModelProto()
    _copy_fields(proto, out, skip="graph")
    _copy_fields(proto.graph, out.graph, skip="initializer")
    for t in proto.graph.initializer:
        if t.name in params and t.data_type != onnx.TensorProto.BFLOAT16:
            s = out.graph.initializer.add()
            s.name, s.data_type = t.name, t.data_type
            s.dims.extend(t.dims)
        else:
            out.graph.initializer.add().CopyFrom(t)
    return out.SerializeToString()


def _copy_fields(src, dst, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def save_torch(module: TorchGraph, path, onnx_model=None) -> None:
    """Write `module` (from to_torch / load_torch, or any TorchGraph together with the onnx_model it was
    built from) as a self-describing torch.save file, atomically (temp file + os.replace). Load it with
    `spa.torch_bridge.load_torch(path)`."""
    atomic_write(path, _writer(module, onnx_model))


def _writer(module: TorchGraph, onnx_model=None):
    if not isinstance(module, TorchGraph):
        raise SpaError(f"save_torch needs a TorchGraph (from to_torch or load_torch), got {type(module).__name__}")
    structure = getattr(module, "onnx_structure", None)
    if onnx_model is not None:
        structure = _structure(_proto_of(onnx_model), set(module._param_key))
    if structure is None:
        raise SpaError("save_torch: this TorchGraph does not know its ONNX structure; pass onnx_model=")
    data = {"format": FORMAT, "onnx": structure, "params": dict(module._param_key),
            "upcast_half": bool(module.upcast_half), "state_dict": module.state_dict()}
    return lambda f: torch.save(data, f)


def load_torch(path, map_location="cpu") -> OnnxModule:
    """The loader for files written by `spa-prune to-torch` / save_torch:

        from spa.torch_bridge import load_torch
        net = load_torch("pruned.pt")        # torch.nn.Module; net(x), net.parameters(), net.state_dict() ...

    Needs spa-prune (and onnx) importable; no code is unpickled (torch.load weights_only=True)."""
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise SpaError(f"no such file: {path}")
    except Exception as e:  # noqa: BLE001 - unpickling errors of every kind mean: not our file
        raise SpaError(f"cannot read {path} as a spa-prune torch file: {str(e).splitlines()[0][:200]}")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SpaError(f"{path} is not a spa-prune torch file (format {FORMAT})")
    proto = onnx.load_from_string(data["onnx"])
    sd, keys = data["state_dict"], data["params"]
    dtypes = {t.name: t.data_type for t in proto.graph.initializer}

    def const(name):
        key = keys.get(name)
        if key is None or f"_params.{key}" not in sd:
            return None  # full data in the structure (integer constants, bfloat16)
        want = helper.tensor_dtype_to_np_dtype(dtypes[name])
        return sd[f"_params.{key}"].detach().cpu().numpy().astype(want, copy=False)

    module = OnnxModule(SimpleNamespace(model=proto, const=const), upcast_half=data.get("upcast_half", True),
                        structure=data["onnx"])
    module.load_state_dict(sd)
    return module.to(map_location) if isinstance(map_location, (str, torch.device)) else module


# ---- checking against onnxruntime ------------------------------------------------------------------------------
def _flat_outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_outputs(o)]
    return [out]


def rel_error(ref: list, got: list) -> float:
    """Max over outputs of max|ref - got| / max|ref| (integer outputs must be equal: 0 or inf)."""
    if len(ref) != len(got):
        raise VerificationError(f"{len(got)} outputs where onnxruntime gives {len(ref)}")
    worst = 0.0
    for r, g in zip(ref, got):
        g = g.detach().cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        r = np.asarray(r)
        if r.shape != g.shape:
            raise VerificationError(f"output shape {g.shape} where onnxruntime gives {r.shape}")
        if r.dtype.kind in "fc":
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            if not np.array_equal(np.isnan(r64), np.isnan(g64)):
                return float("inf")
            r64, g64 = np.nan_to_num(r64, nan=0.0), np.nan_to_num(g64, nan=0.0)
            scale = max(float(np.abs(r64).max(initial=0.0)), 1e-12)
            worst = max(worst, float(np.abs(r64 - g64).max(initial=0.0)) / scale)
        elif not np.array_equal(r, g):
            return float("inf")
    return worst


def _run_torch(module: nn.Module, args, kwargs=None):
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            return module(*args, **(kwargs or {}))
    finally:
        for m, t in modes.items():
            m.training = t


def check_against_onnxruntime(module: TorchGraph, proto: onnx.ModelProto, input_shapes: dict | None = None,
                              seeds=(0, 1)) -> float:
    """Max relative error of `module` against onnxruntime running `proto` on random inputs (integer inputs
    drawn within the tables they index)."""
    from spa.passes import verify
    from spa.passes.normalize import analysis_input_shapes

    from .ir import Graph
    shapes, _ = analysis_input_shapes(Graph(proto), input_shapes or {})
    worst = 0.0
    for seed in seeds:
        feeds = verify.random_inputs(proto, shapes, seed)
        ref = verify.run(proto, feeds, "reference")
        got = _run_torch(module, (), {k: torch.from_numpy(v) for k, v in feeds.items()})
        worst = max(worst, rel_error(ref, _flat_outputs(got)))
    return worst








# ==== route 2: a saved plan applied to the original torch module ===================================================
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


def _trace(module: nn.Module, args) -> tuple[list, dict[int, int], object]:
    """Run once with forward hooks on every leaf module: [(module, input tensor ids, output tensor ids)] in
    call order, the first call index per module, and the outputs. Tensors are kept alive so ids stay unique."""
    calls, order, alive, handles = [], {}, [], []

    def hook(mod, inputs, output):
        ins = [t for t in _flat_outputs(list(inputs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in _flat_outputs(output) if isinstance(t, torch.Tensor)]
        alive.extend(ins + outs)
        order.setdefault(id(mod), len(calls))
        calls.append((mod, [id(t) for t in ins], [id(t) for t in outs]))

    for mod in module.modules():
        if not list(mod.children()):
            handles.append(mod.register_forward_hook(hook))
    try:
        out = _run_torch(module, args)
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
    from spa.passes.apply import Apply

    from .driver import analyse, load
    from .select import PruningPlan, tensor_section

    args = _as_args(example_inputs)
    model = load(onnx_model if not isinstance(onnx_model, (str, os.PathLike)) else str(onnx_model), input_shapes)
    analysis = analyse(model)
    if isinstance(plan, PruningPlan):
        chosen = plan
    else:
        data = plan
        if isinstance(plan, (str, os.PathLike)):
            import json
            try:
                data = json.loads(Path(plan).read_text())
            except (OSError, ValueError) as e:
                raise SpaError(f"cannot read plan {plan}: {e}")
        chosen = PruningPlan.from_json(data, analysis)
    removed = chosen.roots(analysis)
    tensors = tensor_section(analysis, removed)
    target = module if inplace else copy.deepcopy(module)

    g = model.graph
    feeds = _feeds(g.model, args)
    calls, order, out_before = _trace(target, args)
    if check:
        from spa.passes import verify
        err = rel_error(verify.run(g.to_model(), feeds, "reference"), _flat_outputs(out_before))
        if not err <= rtol:
            raise SpaError(f"the module does not reproduce the ONNX model on the example inputs (max rel. error "
                           f"{err:.3g} > {rtol:g}): pass the ONNX file exported from this module and its inputs")

    matcher = _Matcher(target, order)
    head_groups = _head_groups(analysis)
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

    # module rules: biases and folded BatchNorms follow their layer's output channels
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
    _check_heads(target, matcher, analysis, head_groups)

    # cut, then bring the module attributes in line with the new shapes
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
    names = {id(m): n for n, m in target.named_modules(remove_duplicate=False)}
    for mod in changed.values():
        _update_attributes(mod, names.get(id(mod), ""), old_shapes)
    _update_heads(target, changed, old_shapes, analysis, head_groups, matcher)

    err = None
    if check:
        from spa.passes import verify
        Apply(analysis, removed).run(model)
        pruned = model.graph.to_model()
        try:
            got = _run_torch(target, args)
        except RuntimeError as ex:
            raise VerificationError(f"the pruned module does not run: {str(ex).splitlines()[0][:300]}")
        err = rel_error(verify.run(pruned, feeds), _flat_outputs(got))
        if not err <= rtol:
            raise VerificationError(f"the pruned module differs from the pruned ONNX model: max rel. error {err:.3g} "
                                    f"> {rtol:g}")
    if report is not None:
        report.update(tensors_cut=sorted(e.name for e in matcher.tensors.values() if e.keep),
                      modules_changed=sorted(names.get(k, "") for k in changed), max_rel_error=err)
    return target


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


__all__ = ["FORMAT", "OnnxModule", "apply_plan_to_module", "check_against_onnxruntime", "load_torch", "save_torch",
           "to_torch"]
