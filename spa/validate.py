"""The input model, checked before anything decodes or analyses it (issue 17, hostile input).

- **External data** is read only from inside the model's folder: a location that is absolute, has a `..` part,
  or resolves (symlinks included) outside the folder is refused, for every tensor that can carry external data —
  initializers, Constant-node and other attribute tensors, sparse initializers, in subgraphs and functions too.
  The bytes are read here, once, so no later decode can resolve a location against the current directory.
- **Every tensor** is checked against its header before it is decoded: a known data type, non-negative dims, at
  most `MAX_TENSOR_ELEMENTS` elements, and exactly the bytes (or typed values) its dims declare.
- **The graph**: non-empty unique names, no duplicate initializers or node outputs (what protobuf makes of two
  models concatenated), every graph output produced and none of them an input, then `onnx.checker` (schema,
  attribute types, topological order, opset) on the input, so a broken input is exit 2 naming its defect, never
  "the pruned model failed verification".
- **Parameters** of the prunable operators (after normalization lifted Constant weights): weight rank, no empty
  axis, `group` dividing the channels, bias length.

Every refusal is a one-line SpaError naming the tensor or node.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from .errors import SpaError, one_line
from .memory import DEFAULT_MEMORY_LIMIT_GB, GB

# Stored tensors (weights, constants): declared elements above this are refused before any byte is read.
MAX_TENSOR_ELEMENTS = 2 ** 31
# Activations the analysis and verification materialise (declared or --input-shape input shapes, inferred
# shapes, folded constants): elements per tensor above this are refused before allocating, which keeps a run on a
# small model well under 2 GB. A CLI flag may raise it later (pass `limit=` to the checks that take one).
def analysis_elements(memory_limit_gb: float) -> int:
    """Elements one analysed tensor may have under a memory limit: the whole limit in float32. A coarse guard
    that keeps shape inference and folding from materialising absurd shapes; what a run will really hold
    (verification's inputs and activations, data, Hessians) is estimated precisely where it is allocated."""
    return int(memory_limit_gb * GB / 4)


MAX_ANALYSIS_ELEMENTS = analysis_elements(DEFAULT_MEMORY_LIMIT_GB)   # 1e9 elements
# Above this (bytes of the loaded protobuf) onnx.checker needs the path form; the structural checks still run.
CHECKER_MAX_BYTES = 1_800_000_000

_SUB_BYTE_BITS = {TensorProto.UINT4: 4, TensorProto.INT4: 4, TensorProto.FLOAT4E2M1: 4}
for _name, _bits in (("UINT2", 2), ("INT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)):
    if hasattr(TensorProto, _name):
        _SUB_BYTE_BITS[getattr(TensorProto, _name)] = _bits
KNOWN_DTYPES = frozenset(d for d in helper.get_all_tensor_dtypes() if d != TensorProto.UNDEFINED)


# ---- walking every tensor ------------------------------------------------------------------------------------------
def _graph_tensors(graph: onnx.GraphProto, scope: str, initializers: bool = True
                   ) -> Iterator[tuple[str, TensorProto]]:
    for t in graph.initializer if initializers else ():
        yield f"initializer '{t.name}'{scope}", t
    for s in graph.sparse_initializer:
        yield f"sparse initializer '{s.values.name}'{scope} (values)", s.values
        yield f"sparse initializer '{s.values.name}'{scope} (indices)", s.indices
    for node in graph.node:
        yield from _node_tensors(node, scope)


def _node_tensors(node: onnx.NodeProto, scope: str) -> Iterator[tuple[str, TensorProto]]:
    label = f"node '{node.name or node.output[0] if node.output else node.name}' ({node.op_type})"
    for a in node.attribute:
        where = f"{label} attribute '{a.name}'{scope}"
        if a.HasField("t"):
            yield f"tensor '{a.t.name or (node.output[0] if node.output else '')}' of {where}", a.t
        for t in a.tensors:
            yield f"tensor '{t.name}' of {where}", t
        if a.HasField("sparse_tensor"):
            yield f"sparse tensor of {where}", a.sparse_tensor.values
            yield f"sparse tensor indices of {where}", a.sparse_tensor.indices
        for s in a.sparse_tensors:
            yield f"sparse tensor of {where}", s.values
            yield f"sparse tensor indices of {where}", s.indices
        inner = f" in a subgraph of {label}"
        if a.HasField("g"):
            yield from _graph_tensors(a.g, inner)
        for g in a.graphs:
            yield from _graph_tensors(g, inner)


def all_tensors(model: onnx.ModelProto, main_initializers: bool = True) -> Iterator[tuple[str, TensorProto]]:
    """(where, tensor) for every tensor the model holds: main graph, subgraphs, functions."""
    yield from _graph_tensors(model.graph, "", main_initializers)
    for f in model.functions:
        for node in f.node:
            yield from _node_tensors(node, f" in function '{f.name}'")


# ---- external data -------------------------------------------------------------------------------------------------
def load_external_data(model: onnx.ModelProto, folder: str | os.PathLike) -> bool:
    """Check every tensor's external data (inside `folder`, as long as its dims declare). The main graph's
    initializers keep their bytes in the file: their location becomes the resolved absolute path, which
    `spa.ir` maps read-only (a 4 GB model is never copied into memory); other tensors (attributes, subgraphs)
    are read into their raw_data. Returns whether any tensor had external data."""
    root = os.path.realpath(folder)
    found = False
    main = [(f"initializer '{t.name}'", t, True) for t in model.graph.initializer]
    others = [(where, t, False) for where, t in all_tensors(model, main_initializers=False)]
    for where, t, mappable in main + others:
        if t.data_location == TensorProto.EXTERNAL:
            found = True
            path, offset, length = _locate_external(t, where, root)
            del t.external_data[:]
            if mappable and t.data_type != TensorProto.STRING and t.data_type not in _SUB_BYTE_BITS:
                for key, value in (("location", path), ("offset", str(offset)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = key, value
                continue
            t.raw_data = _read_bytes(path, offset, length, where)
            t.data_location = TensorProto.DEFAULT
    return found


def _location(t: TensorProto) -> str:
    return next((e.value for e in t.external_data if e.key == "location"), "")


def _read_bytes(path: str, offset: int, length: int, where: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise SpaError(f"{where}: external data '{path}' is shorter than the tensor")
    return data


def _locate_external(t: TensorProto, where: str, root: str) -> tuple[str, int, int]:
    """The resolved file, offset and length of a tensor's external data, every check passed."""
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if not location:
        raise SpaError(f"{where}: external data without a location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise SpaError(f"{where}: external data location '{location}' is an absolute path (only files inside "
                       f"the model's folder are read)")
    if ".." in Path(location.replace("\\", "/")).parts:
        raise SpaError(f"{where}: external data location '{location}' contains '..' (only files inside the "
                       f"model's folder are read)")
    path = os.path.realpath(os.path.join(root, location))
    if os.path.commonpath([root, path]) != root:
        raise SpaError(f"{where}: external data location '{location}' resolves outside the model's folder "
                       f"(a symlink?); only files inside it are read")
    if not os.path.isfile(path):
        raise SpaError(f"{where}: external data file '{location}' "
                       f"{'is not a regular file' if os.path.exists(path) else 'not found beside the model'}")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise SpaError(f"{where}: external data offset/length are not integers: {info}")
    expected = expected_bytes(t, where)
    size = os.path.getsize(path)
    if offset < 0 or (length is not None and length < 0):
        raise SpaError(f"{where}: negative external data offset or length")
    if length is None:
        length = expected if expected is not None else size - offset
    if expected is not None and length != expected:
        raise SpaError(f"{where}: external data length {length} does not match the {expected} bytes its dims "
                       f"{list(t.dims)} declare")
    if offset + length > size:
        raise SpaError(f"{where}: external data '{location}' is shorter than the tensor ({size} bytes, the tensor "
                       f"needs {length} from offset {offset})")
    return path, offset, length


# ---- tensors -------------------------------------------------------------------------------------------------------
def element_count(t: TensorProto, where: str) -> int:
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        raise SpaError(f"{where}: negative dim in {dims}")
    n = math.prod(dims)
    if n > MAX_TENSOR_ELEMENTS:
        raise SpaError(f"{where}: declares {n} elements ({dims}), more than the limit of {MAX_TENSOR_ELEMENTS}")
    return n


def expected_bytes(t: TensorProto, where: str) -> int | None:
    """Raw bytes the header declares (None for strings, which have no fixed size)."""
    if t.data_type not in KNOWN_DTYPES:
        raise SpaError(f"{where}: unknown data type {t.data_type}" + (" (UNDEFINED)" if t.data_type == 0 else ""))
    n = element_count(t, where)
    if t.data_type == TensorProto.STRING:
        return None
    bits = _SUB_BYTE_BITS.get(t.data_type)
    if bits is not None:
        return (n * bits + 7) // 8
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def check_tensor(t: TensorProto, where: str, raw_size: int | None = None) -> None:
    """A tensor's header agrees with its data (external data must have been loaded already). `raw_size`: the
    length of its raw data read off the file's wire format (reading `t.raw_data` copies the bytes)."""
    expected = expected_bytes(t, where)
    if t.data_location == TensorProto.EXTERNAL:
        length = next((e.value for e in t.external_data if e.key == "length"), None)
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        if not os.path.isabs(location) or length is None:   # mapped (load_external_data checked it) or unread
            raise SpaError(f"{where}: external data that was not loaded")
        if int(length) != expected:
            raise SpaError(f"{where}: external data length {length} does not match the {expected} bytes its dims "
                           f"{list(t.dims)} declare")
        return
    n = element_count(t, where)
    if t.data_type == TensorProto.STRING:
        if len(t.string_data) != n:
            raise SpaError(f"{where}: {len(t.string_data)} strings for dims {list(t.dims)} ({n} elements)")
        return
    nbytes = raw_size if raw_size is not None else (len(t.raw_data) if t.HasField("raw_data") else 0)
    if nbytes:
        if nbytes != expected:
            raise SpaError(f"{where}: {nbytes} bytes of raw data, but dims {list(t.dims)} of "
                           f"{helper.tensor_dtype_to_string(t.data_type)} need {expected}")
        return
    field = helper.tensor_dtype_to_field(t.data_type)
    have = len(getattr(t, field))
    if t.data_type in _SUB_BYTE_BITS:
        ok = have in (n, expected, (expected + 3) // 4)  # one value per int32, or packed
    else:
        ok = have == n * (2 if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1)
    if not ok:
        raise SpaError(f"{where}: {have} values in {field}, but dims {list(t.dims)} declare {n} elements")


def check_tensors(model: onnx.ModelProto, raw_sizes: dict | None = None) -> None:
    """Every tensor; `raw_sizes` (initializer name -> raw bytes, from the file) spares copying the weights."""
    sizes = raw_sizes or {}
    for t in model.graph.initializer:
        check_tensor(t, f"initializer '{t.name}'", sizes.get(t.name))
    for where, t in all_tensors(model, main_initializers=False):
        check_tensor(t, where)


def check_utf8(message) -> None:
    """Decode every string field once (protobuf decodes them lazily: a name of invalid UTF-8 would raise
    UnicodeDecodeError wherever it is first read, or come back as bytes). Bytes fields (weight data) are not
    read: reading one copies it."""
    for fd in message.DESCRIPTOR.fields:
        if fd.type == fd.TYPE_STRING:
            value = getattr(message, fd.name)
            for v in ((value,) if isinstance(value, (str, bytes)) else value):
                if not isinstance(v, str):
                    raise SpaError(f"the input model is invalid: field '{fd.name}' holds {bytes(v[:40])!r}, "
                                   f"which is not valid UTF-8")
        elif fd.type == fd.TYPE_MESSAGE:
            if fd.is_repeated:
                for v in getattr(message, fd.name):
                    check_utf8(v)
            elif message.HasField(fd.name):  # an unset field reads as a default message: do not recurse into it
                check_utf8(getattr(message, fd.name))


# ---- the graph -----------------------------------------------------------------------------------------------------
def check_structure(model: onnx.ModelProto) -> None:
    """Names and wiring of the main graph that onnx.checker misses or reports less clearly."""
    g = model.graph
    if not g.node:
        raise SpaError("the model has no graph nodes (truncated or not an ONNX model?)")
    seen: dict[str, str] = {}

    def define(name: str, what: str) -> None:
        if not name:
            raise SpaError(f"the input model is invalid: {what} has an empty name")
        if name in seen:
            raise SpaError(f"the input model is invalid: duplicate name '{name}' ({seen[name]} and {what}); "
                           f"two models concatenated into one file?")
        seen[name] = what

    inits = set()
    for t in g.initializer:
        define(t.name, "an initializer")
        inits.add(t.name)
    for s in g.sparse_initializer:
        define(s.values.name, "a sparse initializer")
    inputs = set()
    for vi in g.input:
        if vi.name in inits:  # IR 3: initializers listed as inputs
            continue
        define(vi.name, "a graph input")
        inputs.add(vi.name)
    for n in g.node:  # a node name used twice is legal (normalization renames it): only tensor names must differ
        label = f"node '{n.name}' ({n.op_type})" if n.name else f"a {n.op_type} node"
        for o in n.output:
            if o:
                define(o, f"an output of {label}")
    for vi in g.output:
        if not vi.name:
            raise SpaError("the input model is invalid: a graph output has an empty name")
        if vi.name in inputs:
            raise SpaError(f"the input model is invalid: graph output '{vi.name}' is a graph input (nothing to "
                           f"compute)")
        if vi.name not in seen:
            raise SpaError(f"the input model is invalid: graph output '{vi.name}' is not produced by any node")
    if len({vi.name for vi in g.output}) != len(g.output):
        raise SpaError("the input model is invalid: a graph output is listed twice")


# onnx.checker verdicts that are no defect for pruning: with a custom-domain opset it demands a shape on every
# graph output (onnxruntime and the passes do not need one)
BENIGN_CHECKER_ERRORS = ("Field 'shape' of 'type' is required but missing",)


def run_checker(model: onnx.ModelProto | bytes) -> None:
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as e:  # noqa: BLE001 - ValidationError, or anything the C++ checker raises
        if not any(str(e).startswith(b) for b in BENIGN_CHECKER_ERRORS):
            raise SpaError(f"the input model is invalid: {one_line(e, 400)}")


def check_input(model: onnx.ModelProto, folder: str | os.PathLike | None = None,
                raw_sizes: dict | None = None, mapped: frozenset = frozenset()) -> bool:
    """Everything above, in order; external data (from `folder` only) is loaded into the model. `mapped`: the
    files this process already maps weights from (spa.ir.MappedWeights), which a ModelProto this process made
    (a progressive step's model) may name; any other external data in a ModelProto is refused. onnx.checker
    runs later, on normalization's light copy (no weight bytes: `passes.normalize.infer_shapes`), which costs a
    fraction of checking the whole model (0.3 s on ResNet-50). Returns whether external data was loaded."""
    try:
        check_utf8(model)
        check_structure(model)
        external = load_external_data(model, folder) if folder is not None else any(
            t.data_location == TensorProto.EXTERNAL and _location(t) not in mapped for _, t in all_tensors(model))
        if external and folder is None:
            raise SpaError("the model refers to external data, which is only read for a model loaded from a file")
        check_tensors(model, raw_sizes)
    except UnicodeDecodeError as e:
        raise SpaError(f"the input model is invalid: a name or string in it is not valid UTF-8 ({one_line(e, 120)})")
    return external


# ---- parameters of the prunable operators --------------------------------------------------------------------------
def check_parameters(g) -> None:
    """Weights and biases of Conv/ConvTranspose/Gemm/MatMul/BatchNormalization that are constants: the rank,
    sizes and `group` the rules rely on. `g` is a spa.ir.Graph (after Constant weights were lifted); nodes of
    subgraphs too (the rules run inside If/Loop/Scan bodies)."""
    for n in _all_nodes(g.model.graph):
        if n.domain not in ("", "ai.onnx"):
            continue
        label = f"node '{n.name or n.output[0]}' ({n.op_type})"
        if n.op_type in ("Conv", "ConvTranspose"):
            _check_conv(g, n, label)
        elif n.op_type in ("Gemm", "MatMul") and len(n.input) >= 2:
            for x in n.input[:3]:
                if x and g.is_const(x):
                    shape, _ = g.const_info(x)
                    if 0 in shape:
                        raise SpaError(f"{label}: parameter '{x}' has an empty axis {list(shape)}")
            if n.op_type == "Gemm":
                for x in n.input[:2]:
                    if x and g.is_const(x) and len(g.const_info(x)[0]) != 2:
                        raise SpaError(f"{label}: '{x}' has rank {len(g.const_info(x)[0])}, Gemm needs 2")
        elif n.op_type == "BatchNormalization" and len(n.input) >= 5:
            shapes = [g.const_info(x)[0] for x in n.input[1:5] if x and g.is_const(x)]
            if any(len(s) != 1 for s in shapes) or len({s for s in shapes}) > 1:
                raise SpaError(f"{label}: scale/bias/mean/var must be vectors of one length, got "
                               f"{[list(s) for s in shapes]}")


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for n in graph.node:
        yield n
        for a in n.attribute:
            for b in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_nodes(b)


def _check_conv(g, n, label: str) -> None:
    if len(n.input) < 2 or not n.input[0] or not n.input[1]:
        raise SpaError(f"{label}: needs an input and a weight")
    group = _int_attr(n, "group", 1, label)
    if group < 1:
        raise SpaError(f"{label}: group {group} is not a positive integer")
    if not g.is_const(n.input[1]):
        return
    shape, _ = g.const_info(n.input[1])
    if len(shape) < 3:
        raise SpaError(f"{label}: weight '{n.input[1]}' has rank {len(shape)} {list(shape)}; a convolution "
                       f"weight has rank 3 or more")
    if 0 in shape:
        raise SpaError(f"{label}: weight '{n.input[1]}' has an empty axis {list(shape)}")
    transposed = n.op_type == "ConvTranspose"
    c_out = shape[1] * group if transposed else shape[0]
    if (shape[0] if transposed else c_out) % group:
        raise SpaError(f"{label}: group {group} does not divide the weight's {'input' if transposed else 'output'} "
                       f"channels {list(shape)}")
    ks = _ints_attr(n, "kernel_shape", label)
    if ks is not None and list(ks) != list(shape[2:]):
        raise SpaError(f"{label}: kernel_shape {list(ks)} does not match the weight {list(shape)}")
    for name in ("strides", "dilations"):
        v = _ints_attr(n, name, label)
        if v is not None and (len(v) != len(shape) - 2 or any(x < 1 for x in v)):
            raise SpaError(f"{label}: {name} {list(v)} do not fit a {len(shape) - 2}-D convolution")
    pads = _ints_attr(n, "pads", label)
    if pads is not None and (len(pads) != 2 * (len(shape) - 2) or any(p < 0 for p in pads)):
        raise SpaError(f"{label}: pads {list(pads)} do not fit a {len(shape) - 2}-D convolution")
    if len(n.input) > 2 and n.input[2] and g.is_const(n.input[2]):
        b, _ = g.const_info(n.input[2])
        if tuple(b) != (c_out,):
            raise SpaError(f"{label}: bias '{n.input[2]}' has shape {list(b)}, the weight has {c_out} output "
                           f"channels")


def _int_attr(n, name: str, default: int, label: str) -> int:
    for a in n.attribute:
        if a.name == name:
            if a.type != onnx.AttributeProto.INT:
                raise SpaError(f"{label}: attribute '{name}' is not an integer")
            return a.i
    return default


def _ints_attr(n, name: str, label: str):
    for a in n.attribute:
        if a.name == name:
            if a.type != onnx.AttributeProto.INTS:
                raise SpaError(f"{label}: attribute '{name}' is not a list of integers")
            return list(a.ints)
    return None


def check_elements(shape, what: str, limit: int = MAX_ANALYSIS_ELEMENTS) -> None:
    """Refuse a static shape with more elements than `limit` (before anything of that size is allocated)."""
    dims = [d for d in shape if isinstance(d, int)]
    if any(d < 0 for d in dims):
        raise SpaError(f"{what}: negative dim in {list(shape)}")
    n = math.prod(dims)
    if n > limit:
        raise SpaError(f"{what}: shape {list(shape)} has {n} elements, more than the {limit} that the memory limit "
                       f"allows (~{n * 4 / GB:.1f} GB in float32); raise it with --memory-limit GB if this is meant")
