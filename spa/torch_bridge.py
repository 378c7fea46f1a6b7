"""Back to PyTorch: a (pruned) ONNX model as a trainable torch module (route 1; a saved plan applied to your
own module is route 2, spa/torch_plan.py).

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

Route 2, a saved plan applied to the PyTorch module the ONNX file was exported from, is spa/torch_plan.py
(apply_plan_to_module); it checks with this module's rel_error, flat_outputs and run_eval.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from spa.passes import verify
from spa.passes.normalize import analysis_input_shapes

from .driver import resolve_input
from .errors import SpaError, VerificationError
from .fileio import atomic_write
from .ir import Graph, load_model
from .torch_graph import TorchGraph

FORMAT = "spa-prune-torch/1"


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
        path = resolve_input(path)
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
def flat_outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_outputs(o)]
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


def run_eval(module: nn.Module, args, kwargs=None):
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
    shapes, _ = analysis_input_shapes(Graph(proto), input_shapes or {})
    worst = 0.0
    for seed in seeds:
        feeds = verify.random_inputs(proto, shapes, seed)
        ref = verify.run(proto, feeds, "reference")
        got = run_eval(module, (), {k: torch.from_numpy(v) for k, v in feeds.items()})
        worst = max(worst, rel_error(ref, flat_outputs(got)))
    return worst


__all__ = ["FORMAT", "OnnxModule", "check_against_onnxruntime", "load_torch", "save_torch", "to_torch"]
