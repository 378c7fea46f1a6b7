"""The hostile-input fuzz campaign (issue 17): a seeded generator of CLI cases and a classifier.

Every case sets up a fresh folder (model files, calibration data, images, FIFOs, directories), runs
`spa.cli.main(argv)` in-process with stdout/stderr captured at the file-descriptor level, a wall-clock guard and
an address-space limit, and classifies the run:

    ok              exit 0; every ONNX output loads with onnx and onnxruntime; only the outputs asked for appear
    clean reject    exit 2; exactly one stderr line starting 'spa-prune: error:'; nothing new; inputs unchanged
    verify reject   exit 1; one stderr line 'spa-prune: verification failed...'; nothing new; inputs unchanged
    crash           anything else (an exception escaping main, a traceback, extra stderr lines, a stray or
                    missing file, a modified input, another exit code, the time or memory guard)

Cases come from three families: byte-level mutations of small valid models (bit flips, truncation, splices,
duplicated regions, two models concatenated), structure-level mutations made with the onnx API, and nonsense
options for every subcommand. `generate(n, seed)` is deterministic: case i depends only on (seed, i).

    python -m tests.fuzz_cases --cases 3000 --seed 1      # the big campaign, outside pytest
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import resource
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import Builder, bert_as_onnxruntime_optimizes_it  # noqa: E402

CASE_SECONDS = 30          # wall-clock guard per case
MEMORY_HEADROOM = 3 << 30  # address space a case may add to the process (bytes)
SECRET = b"SECRET-OUTSIDE-THE-MODEL-FOLDER"


# ---- the seed models ---------------------------------------------------------------------------------------------
def residual_net() -> onnx.ModelProto:
    """Conv/BN/ReLU with an Add residual, global pooling, Flatten and a Gemm head."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.bn("bn1", b.conv("c1", x, 3, 8), 8))
    z = b.relu(b.bn("bn2", b.conv("c2", y, 8, 8), 8))
    s = b.op("Add", [y, z], name="res")
    p = b.op("GlobalAveragePool", [s], name="gap")
    f = b.op("Flatten", [p], name="flat", axis=1)
    b.output(b.gemm("fc", f, 8, 5, trans_b=1))
    return b.model()


def concat_net() -> onnx.ModelProto:
    """Two conv branches concatenated on channels, a conv after."""
    b = Builder()
    x = b.input("x", [1, 3, 6, 6])
    a = b.relu(b.conv("ca", x, 3, 4))
    c = b.relu(b.conv("cb", x, 3, 6))
    y = b.op("Concat", [a, c], name="cat", axis=1)
    b.output(b.conv("cc", y, 10, 4))
    return b.model()


def reshape_mlp() -> onnx.ModelProto:
    """Gemm -> ReLU -> Reshape to (1, 4, 4) -> Reshape back -> Gemm."""
    b = Builder()
    x = b.input("x", [1, 12])
    h = b.relu(b.gemm("g1", x, 12, 16, trans_b=1))
    r = b.op("Reshape", [h, b.i64("shape1", [1, 4, 4])], name="r1")
    r = b.op("Reshape", [r, b.i64("shape2", [1, 16])], name="r2")
    b.output(b.gemm("g2", r, 16, 3, trans_b=1))
    return b.model()


def attention_net() -> onnx.ModelProto:
    """Single-head self attention: q/k/v projections, MatMul + Softmax, an output projection."""
    b = Builder()
    x = b.input("x", [1, 4, 8])
    q = b.linear("q", x, 8, 8)
    k = b.linear("k", x, 8, 8)
    v = b.linear("v", x, 8, 8)
    kt = b.op("Transpose", [k], name="kt", perm=[0, 2, 1])
    s = b.op("MatMul", [q, kt], name="qk")
    a = b.op("Softmax", [s], name="sm", axis=-1)
    o = b.op("MatMul", [a, v], name="av")
    b.output(b.linear("o", b.relu(o), 8, 8))
    return b.model()


def ort_saved_net() -> onnx.ModelProto:
    """As onnxruntime's offline optimizer saves a small CNN: FusedConv (Conv + Relu), QuickGelu, a Conv, global
    pooling and a FusedGemm (Gemm + Tanh) head, all com.microsoft (written back as standard ops by normalize)."""
    b = Builder()
    b.extra_opsets["com.microsoft"] = 1
    x = b.input("x", [1, 3, 8, 8])
    b.weight("f1.weight", (8, 3, 3, 3))
    y = b.op("FusedConv", [x, "f1.weight", b.weight("f1.bias", (8,), 0.1)], name="f1", domain="com.microsoft",
             activation="Relu", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.op("QuickGelu", [b.conv("c2", y, 8, 8)], name="qg", domain="com.microsoft", alpha=1.702)
    f = b.op("Flatten", [b.op("GlobalAveragePool", [y], name="gap")], name="flat", axis=1)
    b.weight("fc.weight", (5, 8))
    b.output(b.op("FusedGemm", [f, "fc.weight", b.weight("fc.bias", (5,), 0.1)], name="fc", domain="com.microsoft",
                  activation="Tanh", transB=1))
    return b.model()


def quantized_net(dynamic: bool) -> onnx.ModelProto:
    """residual_net as onnxruntime's quantizer writes it: QOperator (QLinearConv, QLinearAdd, QGemm; calibrated
    on 4 fixed draws) or dynamic (DynamicQuantizeLinear -> ConvInteger / MatMulInteger): the default mode writes
    their layers in QDQ form (passes/qdq.py) before scoring and refitting them."""
    import logging

    from onnxruntime import quantization as qz

    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "float.onnx", Path(d) / "quantized.onnx"
        float_model = residual_net()
        float_model.opset_import[0].version = max(float_model.opset_import[0].version, 13)
        onnx.save(float_model, src)
        if dynamic:
            qz.quantize_dynamic(str(src), str(dst), weight_type=qz.QuantType.QInt8)
        else:
            draws = [{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)}
                     for i in range(4)]

            class Reader(qz.CalibrationDataReader):
                def __init__(self):
                    self.it = iter(draws)

                def get_next(self):
                    return next(self.it, None)

            qz.quantize_static(str(src), str(dst), Reader(), quant_format=qz.QuantFormat.QOperator, per_channel=True,
                               weight_type=qz.QuantType.QInt8, activation_type=qz.QuantType.QUInt8)
        return onnx.load(dst)


SEED_MODELS = {"residual": residual_net, "concat": concat_net, "mlp": reshape_mlp, "attention": attention_net,
               "ort_saved": ort_saved_net, "ort_bert": bert_as_onnxruntime_optimizes_it,
               "qoperator": lambda: quantized_net(False), "dynamic": lambda: quantized_net(True)}
_CACHE: dict = {}


def seed_model(name: str) -> onnx.ModelProto:
    if name not in _CACHE:
        _CACHE[name] = SEED_MODELS[name]()
    m = onnx.ModelProto()
    m.CopyFrom(_CACHE[name])
    return m


def seed_bytes(name: str) -> bytes:
    return seed_model(name).SerializeToString()


def calib_for(name: str, n: int = 4) -> dict:
    m = seed_model(name)
    vi = m.graph.input[0]
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {vi.name: np.random.default_rng(0).standard_normal([n, *dims[1:]]).astype(np.float32)}


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def png_bytes(seed: int, size=(10, 12)) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, size=(*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---- a case ------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """`files`: relative path -> bytes written before the run; `fifos`/`dirs`: relative paths made before it;
    `argv`: arguments with '{d}' standing for the case's folder; `outputs`: relative paths the run may create
    (those in `models` are checked as ONNX models)."""

    id: str
    family: str
    argv: list
    files: dict = field(default_factory=dict)
    fifos: tuple = ()
    dirs: tuple = ()
    outputs: tuple = ()
    models: tuple = ()


@dataclass
class Outcome:
    case: Case
    kind: str                 # ok | clean | verify | crash
    rc: object = None
    stderr: str = ""
    signature: str = ""       # crashes: what went wrong, and where


# ---- byte-level mutations ----------------------------------------------------------------------------------------
def mutate_bytes(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    d = bytearray(data)
    how = rng.choice(["flip", "flip", "flip", "truncate", "splice", "duplicate", "concat", "zero", "delete",
                      "byte"])
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(d))
            d[i] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        d = d[:rng.randrange(len(d))]
    elif how == "splice":
        other = seed_bytes(rng.choice(list(SEED_MODELS)))
        i, j = sorted(rng.randrange(len(d)) for _ in range(2))
        k = rng.randrange(len(other))
        d[i:j] = other[k:k + rng.randint(1, 200)]
    elif how == "duplicate":
        i = rng.randrange(len(d))
        j = min(len(d), i + rng.randint(1, 300))
        d[j:j] = d[i:j]
    elif how == "concat":
        d += seed_bytes(rng.choice(list(SEED_MODELS)))
    elif how == "zero":
        i = rng.randrange(len(d))
        d[i:i + rng.randint(1, 64)] = bytes(min(len(d) - i, 64))[:len(d[i:i + 64])]
    elif how == "delete":
        i = rng.randrange(len(d))
        del d[i:i + rng.randint(1, 64)]
    else:
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] = rng.randrange(256)
    return how, bytes(d)


# ---- structure-level mutations -----------------------------------------------------------------------------------
def _inits(m):
    return list(m.graph.initializer)


def _inline_inits(m):
    """Initializers whose data is in the model (an earlier mutation may have pointed one at external data that
    does not exist: decoding it would fail in the generator, not in spa-prune)."""
    return [t for t in m.graph.initializer if t.data_location != TensorProto.EXTERNAL] or [None]


def _pick_node(rng, m, op=None):
    nodes = [n for n in m.graph.node if op is None or n.op_type == op]
    return rng.choice(nodes) if nodes else None


def _s_drop_input(rng, m):
    del m.graph.input[0]


def _s_rename_input(rng, m):
    m.graph.input[0].name = rng.choice(["", "y", "x ", "ü", "a" * 300])


def _s_rename_node_input(rng, m):
    n = _pick_node(rng, m)
    n.input[rng.randrange(len(n.input))] = rng.choice(["", "nope", n.output[0]])


def _s_attr_type(rng, m):
    n = _pick_node(rng, m)
    if not n.attribute:
        n.attribute.append(helper.make_attribute("axis", "garbage"))
        return
    a = rng.choice(list(n.attribute))
    new = rng.choice([helper.make_attribute(a.name, "garbage"), helper.make_attribute(a.name, 1.5),
                      helper.make_attribute(a.name, [1.0, 2.0]), helper.make_attribute(a.name, -7),
                      helper.make_attribute(a.name, 2**62), helper.make_attribute(a.name, [2**40, -3]),
                      helper.make_attribute(a.name, b"\xff\xfe")])
    a.CopyFrom(new)


def _s_init_dtype(rng, m):
    t = rng.choice(_inits(m))
    t.data_type = rng.choice([0, 7, 8, 10, 11, 16, 99, TensorProto.BOOL])


def _s_init_dims(rng, m):
    t = rng.choice(_inits(m))
    choice = rng.randrange(5)
    if choice == 0:
        t.dims.append(rng.choice([0, 2, 3]))
    elif choice == 1 and len(t.dims):
        del t.dims[-1]
    elif choice == 2 and len(t.dims):
        t.dims[0] = rng.choice([0, 2**40, 2**62, -1])
    else:
        del t.dims[:]
        t.dims.extend([rng.randint(0, 5) for _ in range(rng.randint(0, 5))])


def _s_raw_length(rng, m):
    t = rng.choice(_inits(m))
    if t.raw_data:
        t.raw_data = t.raw_data[:rng.randrange(len(t.raw_data))] if rng.random() < 0.6 else t.raw_data + b"\0" * 8
    else:
        t.raw_data = b"\1\2\3"


def _s_duplicate_node(rng, m):
    n = _pick_node(rng, m)
    m.graph.node.append(n)


def _s_duplicate_output_name(rng, m):
    a, b = rng.sample(list(m.graph.node), 2)
    b.output[0] = a.output[0]


def _s_duplicate_init(rng, m):
    m.graph.initializer.append(rng.choice(_inits(m)))


def _s_dangling_output(rng, m):
    m.graph.output.append(helper.make_tensor_value_info("ghost", TensorProto.FLOAT, [1]))


def _s_output_is_input(rng, m):
    m.graph.output[0].name = m.graph.input[0].name


def _s_remove_node(rng, m):
    nodes = list(m.graph.node)
    i = rng.randrange(len(nodes))
    del m.graph.node[i]


def _s_cycle(rng, m):
    nodes = list(m.graph.node)
    if len(nodes) > 2:
        nodes[1].input[0] = nodes[-1].output[0]


def _s_input_dtype(rng, m):
    m.graph.input[0].type.tensor_type.elem_type = rng.choice([TensorProto.INT64, TensorProto.STRING, 0,
                                                              TensorProto.FLOAT16, TensorProto.BOOL])


def _s_input_dims(rng, m):
    dims = m.graph.input[0].type.tensor_type.shape.dim
    d = rng.choice(list(dims))
    choice = rng.randrange(5)
    if choice == 0:
        d.dim_value = rng.choice([0, 2**40, 2**31, 7])
    elif choice == 1:
        d.dim_param = rng.choice(["N", "", "ü"])
    elif choice == 2:
        d.Clear()
    elif choice == 3:
        dims.add().dim_value = 2
    else:
        m.graph.input[0].type.tensor_type.ClearField("shape")


def _s_missing_inputs(rng, m):
    n = _pick_node(rng, m)
    del n.input[rng.randrange(len(n.input)):]


def _s_unknown_op(rng, m):
    n = _pick_node(rng, m)
    if rng.random() < 0.5:
        n.op_type = rng.choice(["Frobnicate", "conv", "", "Relu6"])
    else:
        n.domain = rng.choice(["com.evil", "ai.onnx.ml", "com.microsoft"])


def _s_opset(rng, m):
    m.opset_import[0].version = rng.choice([0, 1, 6, 999, -1])


def _s_ir_version(rng, m):
    m.ir_version = rng.choice([0, 1, 3, 99, 2**40])


def _s_empty_tensor_name(rng, m):
    t = rng.choice(_inits(m))
    old = t.name
    t.name = ""
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = ""


def _s_constant_node(rng, m):
    """Turn an initializer into a Constant node, sometimes with a broken value."""
    t = rng.choice(_inits(m))
    m.graph.initializer.remove(t)
    value = onnx.TensorProto()
    value.CopyFrom(t)
    choice = rng.randrange(4)
    if choice == 1:
        value.raw_data = value.raw_data[: len(value.raw_data) // 2]
    elif choice == 2:
        value.data_type = 8   # string
    elif choice == 3:
        del value.dims[:]
    node = helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=value)
    m.graph.node.insert(0, node)


def _s_external_data(rng, m):
    """An initializer (or a Constant node's tensor) stored externally at a hostile location."""
    t = rng.choice(_inits(m))
    t.ClearField("raw_data")
    del t.float_data[:]
    del t.int64_data[:]
    t.data_location = TensorProto.EXTERNAL
    loc = rng.choice(["../outside.bin", "/etc/hostname", "missing.bin", "cwd_secret.bin", "sub/../../x.bin",
                      "weights.bin"])
    for key, value in (("location", loc), ("offset", str(rng.choice([0, 4, 2**40]))),
                       ("length", str(rng.choice([4, 16, 2**40])))):
        e = t.external_data.add()
        e.key, e.value = key, value
    if rng.random() < 0.5:  # the Constant-node path, which onnx's loader does not check
        m.graph.initializer.remove(t)
        m.graph.node.insert(0, helper.make_node("Constant", [], [t.name], name=f"ext_{t.name}", value=t))


def _s_reshape_target(rng, m):
    for t in m.graph.initializer:
        if t.data_type == TensorProto.INT64:
            arr = rng.choice([[0, 0], [-1, -1], [2**40, 1], [], [1, 0, 3], [-5]])
            t.CopyFrom(numpy_helper.from_array(np.array(arr, dtype=np.int64), t.name))
            return
    _s_init_dims(rng, m)


def _s_transpose_perm(rng, m):
    n = _pick_node(rng, m, "Transpose")
    if n is None:
        n = _pick_node(rng, m)
    perm = rng.choice([[0, 0, 1], [5, 1, 0], [], [0, 1], [-1, 0, 2]])
    for a in list(n.attribute):
        if a.name == "perm":
            n.attribute.remove(a)
    n.attribute.append(helper.make_attribute("perm", perm))


def _s_subgraph(rng, m):
    """An If node whose branches compute part of the graph (or an unknown graph attribute on a node)."""
    n = _pick_node(rng, m)
    if rng.random() < 0.5:
        body = helper.make_graph([helper.make_node("Identity", [n.output[0]], ["sub_out"])], "body", [],
                                 [helper.make_tensor_value_info("sub_out", TensorProto.FLOAT, None)])
        n.attribute.append(helper.make_attribute("body", body))
        return
    cond = numpy_helper.from_array(np.array(True), "cond")
    m.graph.initializer.append(cond)
    then = helper.make_graph([helper.make_node("Identity", [n.output[0]], ["then_out"])], "then", [],
                             [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", [n.output[0]], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    out = n.output[0] + "_if"
    if_node = helper.make_node("If", ["cond"], [out], name="if", then_branch=then, else_branch=other)
    idx = list(m.graph.node).index(n)
    m.graph.node.insert(idx + 1, if_node)
    for c in list(m.graph.node)[idx + 2:]:
        for i, x in enumerate(c.input):
            if x == n.output[0]:
                c.input[i] = out


def _s_weight_rank(rng, m):
    for t in _inline_inits(m):
        if t.name.endswith(".weight") or t.name.endswith(".bias"):
            arr = numpy_helper.to_array(t)
            new = rng.choice([arr.reshape(-1), arr[..., :1], np.zeros((0,) + arr.shape[1:], arr.dtype),
                              np.concatenate([arr, arr]), arr.reshape(1, *arr.shape)])
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), t.name))
            if rng.random() < 0.5:
                return


def _s_float_data(rng, m):
    t = rng.choice(_inline_inits(m))
    if t is not None and t.data_type == TensorProto.FLOAT:
        arr = numpy_helper.to_array(t)
        t.ClearField("raw_data")
        t.float_data.extend(arr.ravel().tolist()[: max(0, arr.size - rng.randint(0, 2))])


def _s_nan_weights(rng, m):
    t = rng.choice(_inline_inits(m))
    arr = numpy_helper.to_array(t).copy() if t is not None else np.zeros(0)
    if arr.dtype.kind == "f" and arr.size:
        arr.ravel()[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, -np.inf, 3e38])
        t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _s_no_outputs(rng, m):
    del m.graph.output[:]


def _s_no_nodes(rng, m):
    del m.graph.node[:]


def _s_node_name(rng, m):
    for n in m.graph.node:
        n.name = rng.choice(["", "same", "\x00", "a/b", "ü" * 20])


STRUCTURE = [v for k, v in sorted(globals().items()) if k.startswith("_s_")]


def mutate_structure(rng: random.Random, m: onnx.ModelProto) -> str:
    names = []
    for _ in range(1 if rng.random() < 0.8 else 2):
        f = rng.choice(STRUCTURE)
        try:
            f(rng, m)
        except (IndexError, ValueError, TypeError, AttributeError):
            pass
        names.append(f.__name__[3:])
    return "+".join(names)


# ---- option cases ------------------------------------------------------------------------------------------------
BAD_NUMBERS = ["-1", "0", "nan", "inf", "-inf", "1e400", "10**30", str(2**64), "-0", "abc", "", "1e-300", "0.5",
               "2", "1" * 40, "0x10"]
PRUNE_NUMERIC = ["--ratio", "--target-flops", "--max-ratio", "--min-channels", "--round-to", "--rtol", "--seed",
                 "--damp", "--positions", "--synth-samples", "--calib-samples", "--steps", "--finetune-epochs",
                 "--finetune-lr"]
SEARCH_NUMERIC = ["--evals", "--target-params", "--target-latency", "--latency-batch", "--threads"]


def _path_choice(rng: random.Random, role: str) -> tuple[str, tuple, tuple, tuple]:
    """A hostile output path: (argv text, fifos, dirs, allowed outputs)."""
    kind = rng.choice(["in", "dir", "fifo", "empty", "slash", "long", "deep", "odd", "calib", "plain", "dot",
                       "file_parent"])
    if kind == "in":
        return "{d}/in.onnx", (), (), ()
    if kind == "dir":
        return "{d}/adir", (), ("adir",), ()
    if kind == "fifo":
        return "{d}/fifo", ("fifo",), (), ()
    if kind == "empty":
        return "", (), (), ()
    if kind == "slash":
        return "{d}/" + role + "/", (), (), ()
    if kind == "long":
        return "{d}/" + "x" * rng.choice([255, 256, 300, 5000]) + ".onnx", (), (), ()
    if kind == "deep":
        return "{d}/a/b/c/" + role + ".onnx", (), (), (f"a/b/c/{role}.onnx",)
    if kind == "odd":
        name = rng.choice(["-o", " ", "ü.onnx", "a\nb.onnx", "..", ".", "~"])
        return "{d}/" + name, (), (), (name,)
    if kind == "calib":  # an input when --calib names it, else a file the run may replace
        return "{d}/calib.npz", (), (), ("calib.npz",)
    if kind == "dot":
        return "{d}/.", (), (), ()
    if kind == "file_parent":
        return "{d}/in.onnx/x.onnx", (), (), ()
    return "{d}/" + role + ".json", (), (), (role + ".json",)


def option_case(rng: random.Random, cid: str) -> Case:
    model = rng.choice(list(SEED_MODELS))
    files = {"in.onnx": seed_bytes(model), "calib.npz": npz_bytes(calib_for(model))}
    sub = rng.choice(["prune", "prune", "prune", "prune-paths", "analyse", "profile", "finetune", "to-torch",
                      "make-calib", "search"])
    fifos, dirs, outputs = [], [], ["out.onnx"]
    argv: list = []
    if sub == "prune":
        argv = ["{d}/in.onnx", "{d}/out.onnx", "--ratio", "0.5", "-q",
                *(["--fast"] if rng.random() < 0.75 else ["--synth-samples", "4", "--synth-steps", "8", "--positions", "64"])]
        for _ in range(rng.randint(1, 3)):
            flag = rng.choice(PRUNE_NUMERIC)
            if flag in ("--ratio", "--target-flops"):
                argv = [a for a in argv if a not in ("--ratio", "0.5")]
            argv += [flag, rng.choice(BAD_NUMBERS)]
        if rng.random() < 0.3:
            argv += rng.choice([["--calib", "{d}/calib.npz"], ["--importance", "obspa", "--calib", "{d}/calib.npz"],
                                ["--input-shape", "x=" + rng.choice(["-1,3,8,8", "4000000,3,6,6", "1,3,8",
                                                                     f"{2**40},3,8,8", "0,3,8,8", "a,b"])],
                                ["--plan", "{d}/calib.npz"], ["--exclude", "["], ["--dbscan", "nan,2"],
                                ["--compensate", "similarity", "--dbscan", rng.choice(["0.3,0", "-1,2", "x"])]])
        outputs.append("out.onnx")
    elif sub == "prune-paths":
        out, f1, d1, o1 = _path_choice(rng, "out")
        argv = ["{d}/in.onnx", out, "--ratio", "0.5", "-q", "--fast"]
        fifos += f1
        dirs += d1
        outputs += o1
        if out.endswith("out.onnx") or rng.random() < 0.5:
            for flag in rng.sample(["--report", "--save-plan"], rng.randint(1, 2)):
                p, f2, d2, o2 = (out, (), (), ()) if rng.random() < 0.3 else _path_choice(rng, flag.strip("-"))
                argv += [flag, p]
                fifos += f2
                dirs += d2
                outputs += o2
        if rng.random() < 0.3:
            argv += ["--calib", "{d}/calib.npz"]
    elif sub == "analyse":
        argv = ["analyse", "{d}/in.onnx"]
        if rng.random() < 0.8:
            p, f1, d1, o1 = _path_choice(rng, "report")
            argv += ["--report", p]
            fifos += f1
            dirs += d1
            outputs += o1
        if rng.random() < 0.3:
            argv += ["--input-shape", "x=" + rng.choice(["1,3,8,8", "-1", "99999999999999999999", "1x3x8"])]
    elif sub == "profile":
        p, f1, d1, o1 = _path_choice(rng, "table") if rng.random() < 0.6 else ("{d}/table.json", (), (),
                                                                               ("table.json",))
        argv = ["profile", "{d}/in.onnx", "-o", p, "-q"]
        fifos += f1
        dirs += d1
        outputs += o1
        flag = rng.choice(["--runs", "--batch", "--threads", "--align"])
        argv += [flag, rng.choice(["0", "-1", "nan", str(2**64), "1e3", "abc", "1"])]
        if "--runs" not in argv:
            argv += ["--runs", "1"]
    elif sub == "finetune":
        p, f1, d1, o1 = _path_choice(rng, "tuned") if rng.random() < 0.5 else ("{d}/tuned.onnx", (), (),
                                                                               ("tuned.onnx",))
        argv = ["finetune", "{d}/in.onnx", p, "--data", "{d}/calib.npz", "--no-curve", "-q", "--epochs", "1"]
        fifos += f1
        dirs += d1
        outputs += o1
        for _ in range(rng.randint(1, 2)):
            flag = rng.choice(["--epochs", "--lr", "--batch-size", "--weight-decay", "--momentum", "--kd-alpha",
                               "--kd-temperature", "--val-split", "--seed", "--threads"])
            argv += [flag, rng.choice(BAD_NUMBERS)]
        if rng.random() < 0.2:
            argv += ["--teacher", rng.choice(["{d}/in.onnx", "{d}/calib.npz", "{d}/nope.onnx"])]
    elif sub == "to-torch":
        p, f1, d1, o1 = _path_choice(rng, "m") if rng.random() < 0.5 else ("{d}/m.pt", (), (), ("m.pt",))
        argv = ["to-torch", "{d}/in.onnx", p, "-q", "--rtol", rng.choice(BAD_NUMBERS)]
        fifos += f1
        dirs += d1
        outputs += o1
    elif sub == "make-calib":
        files["imgs/a.png"] = png_bytes(1)
        files["imgs/b.png"] = png_bytes(2)
        files["imgs/c.png"] = b"\x89PNG not really"
        p, f1, d1, o1 = rng.choice([("{d}/imgs/a.png", (), (), ()), ("{d}/c.npz", (), (), ("c.npz",)),
                                    _path_choice(rng, "c")])
        argv = ["make-calib", "{d}/imgs", "-o", p]
        fifos += f1
        dirs += d1
        outputs += o1
        flag = rng.choice(["--limit", "--size", "--mean", "--std", "--seed", "--channels"])
        argv += [flag, rng.choice(BAD_NUMBERS + ["8", "8,8", "0,0,0"])]
        if "--size" not in argv:
            argv += ["--size", "8"]
        if rng.random() < 0.3:
            argv += ["--model", rng.choice(["{d}/in.onnx", "{d}/calib.npz", "{d}/imgs"])]
        elif p == "{d}/in.onnx":  # not an input of this run: a file it may replace
            outputs.append("in.onnx")
    else:
        argv = ["{d}/in.onnx", "{d}/out.onnx", "-q", "--policy", rng.choice(["uniform", "global", "lamp", "nope"]),
                "--target-flops", "0.6", "--evals", "1"]
        flag = rng.choice(SEARCH_NUMERIC + ["--policy-option"])
        if flag == "--policy-option":
            argv += [flag, rng.choice(["bogus=1", "=3", "x", "batch=-1", "seed=nan", "lr=1e400", "a=b=c"])]
        else:
            argv += [flag, rng.choice(BAD_NUMBERS)]
    models = ()
    if sub in ("prune", "prune-paths", "search", "finetune"):
        out = argv[2] if sub == "finetune" else argv[1]
        if out.startswith("{d}/"):
            models = (out[4:],)
    return Case(cid, f"options-{sub}", argv, files, tuple(fifos), tuple(dirs), tuple(outputs), models)


# ---- the generator -----------------------------------------------------------------------------------------------
def model_argv(rng: random.Random) -> tuple[list, tuple]:
    """What to run a (mutated) model through: prune by ratio/FLOPs (verified), analyse, sometimes with data."""
    choice = rng.random()
    if choice < 0.15:
        return ["analyse", "{d}/in.onnx", "--report", "{d}/report.json"], ("report.json",)
    argv = ["{d}/in.onnx", "{d}/out.onnx", "-q"]
    argv += ["--ratio", "0.5"] if rng.random() < 0.6 else ["--target-flops", "0.6"]
    outputs = ("out.onnx",)
    if rng.random() < 0.3:
        argv += ["--report", "{d}/report.json", "--save-plan", "{d}/plan.json"]
        outputs += ("report.json", "plan.json")
    if rng.random() < 0.25:  # the default mode (OBS + reconstruction, data-free), kept small
        argv += ["--synth-samples", "4", "--synth-steps", "8", "--positions", "64"]
    else:                    # the instant path: most cases test the structure, cheaply
        argv += ["--fast"]
    return argv, outputs


def generate(n: int, seed: int = 0) -> list[Case]:
    cases = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        cid = f"s{seed}-{i}"
        family = rng.choices(["bytes", "structure", "options", "valid"], weights=[35, 40, 23, 2])[0]
        if family == "options":
            cases.append(option_case(rng, cid))
            continue
        name = rng.choice(list(SEED_MODELS))
        argv, outputs = model_argv(rng)
        files = {"weights.bin": bytes(range(256)) * 4}
        if family == "valid":
            data, what = seed_bytes(name), "valid"
        elif family == "bytes":
            what, data = mutate_bytes(rng, seed_bytes(name))
        else:
            m = seed_model(name)
            what = mutate_structure(rng, m)
            data = m.SerializeToString()
        files["in.onnx"] = data
        models = ("out.onnx",) if "{d}/out.onnx" in argv else ()
        cases.append(Case(cid, f"{family}-{name}-{what}", argv, files, outputs=outputs, models=models))
    return cases


# ---- running and classifying --------------------------------------------------------------------------------------
class CaseTimeout(BaseException):
    pass


def _snapshot(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_fifo():
            out[rel] = "fifo"
        elif p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
        else:
            out[rel] = "other"
    return out


def _where(tb) -> str:
    """The innermost frame in the project (spa/, passes/, operators/), else the innermost frame."""
    frames = traceback.extract_tb(tb)
    root = Path(__file__).resolve().parents[1]
    mine = [f for f in frames if f.filename.startswith(str(root)) and "/tests/" not in f.filename
            and "/.venv/" not in f.filename and "site-packages" not in f.filename]
    f = (mine or frames or [None])[-1]
    if f is None:
        return "?"
    name = f.filename[len(str(root)) + 1:] if f.filename.startswith(str(root)) else Path(f.filename).name
    return f"{name}:{f.lineno}"


@contextlib.contextmanager
def _captured_fds():
    """stdout and stderr, Python's and the file descriptors' (onnxruntime logs at the C level)."""
    holder = {"err": "", "out": ""}
    with tempfile.TemporaryFile() as ferr, tempfile.TemporaryFile() as fout:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(fout.fileno(), 1)
        os.dup2(ferr.fileno(), 2)
        py_err, py_out = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(py_err), contextlib.redirect_stdout(py_out):
                yield holder
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            ferr.seek(0)
            fout.seek(0)
            holder["err"] = py_err.getvalue() + ferr.read().decode("utf-8", "replace")
            holder["out"] = py_out.getvalue() + fout.read().decode("utf-8", "replace")


@contextlib.contextmanager
def _guards(seconds: float, headroom: int):
    """A wall-clock alarm (main thread only) and an address-space limit of the current size + headroom."""
    main = threading.current_thread() is threading.main_thread()
    old_handler = None
    if main and seconds:
        def on_alarm(signum, frame):
            raise CaseTimeout(f"over {seconds} s")
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    if headroom:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        hard = old_limit[1]
        soft = size + headroom if hard == resource.RLIM_INFINITY else min(hard, size + headroom)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    try:
        yield
    finally:
        if headroom:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)
        if main and seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_case(case: Case, base: Path, *, seconds: float = CASE_SECONDS, headroom: int = MEMORY_HEADROOM) -> Outcome:
    from spa.cli import main

    folder = Path(tempfile.mkdtemp(prefix=case.id + "-", dir=base))
    for rel, data in case.files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    for rel in case.dirs:
        (folder / rel).mkdir(parents=True, exist_ok=True)
    for rel in case.fifos:
        if not (folder / rel).exists():
            os.mkfifo(folder / rel)
    argv = [a.replace("{d}", str(folder)) for a in case.argv]
    rc, error = None, None
    # bytes outside the model's folder that a loader must never copy into an output: one in the working
    # directory (a relative external-data location resolved against the cwd finds it), one in the parent
    (folder / "cwd").mkdir()
    (folder / "cwd" / "cwd_secret.bin").write_bytes(SECRET * 64)
    if not (base / "outside.bin").exists():
        (base / "outside.bin").write_bytes(SECRET * 64)
    before = _snapshot(folder)
    cwd = os.getcwd()
    os.chdir(folder / "cwd")
    try:
        with _captured_fds() as io_, warnings.catch_warnings():
            warnings.resetwarnings()
            warnings.simplefilter("always")   # a fresh process shows every warning once
            warnings.showwarning = _show_warning
            try:
                with _guards(seconds, headroom):
                    rc = main(argv)
            except SystemExit as e:
                rc, error = e.code, ("SystemExit", e.code, None)
            except BaseException as e:  # noqa: B036 - every escape is a crash to classify
                error = (type(e).__name__, one_line_of(e), _where(e.__traceback__))
    finally:
        os.chdir(cwd)
    after = _snapshot(folder)
    return classify(case, folder, rc, error, io_["err"], before, after)


def one_line_of(e) -> str:
    return " ".join(str(e).split())[:160]


def classify(case: Case, folder: Path, rc, error, err: str, before: dict, after: dict) -> Outcome:
    def crash(sig):
        return Outcome(case, "crash", rc, err, sig)

    if error is not None and error[0] != "SystemExit":
        return crash(f"{error[0]} at {error[2]}: {error[1]}")
    if error is not None:
        return crash(f"SystemExit({error[1]}) escaped main")
    # a file named only as an output may be replaced; one the argv names twice (an input too) may not
    replaceable = {k for k in case.outputs if sum(a == "{d}/" + k for a in case.argv) == 1}
    changed = [k for k, v in before.items() if k in after and after[k] != v and k not in replaceable]
    gone = [k for k in before if k not in after]
    new = [k for k in after if k not in before]
    if changed or gone:
        return crash(f"input changed or removed: {sorted(changed + gone)} (exit {rc})")
    lines = err.splitlines()
    if "out of memory" in err:
        return crash(f"out of memory (exit {rc}): the run allocated past the {MEMORY_HEADROOM >> 30} GiB guard")
    if "Traceback" in err:
        return crash(f"traceback on stderr (exit {rc}): {lines[-1] if lines else ''}")
    if rc == 0:
        # a model read with external data is written with its weights in OUT.data (spa.ir.save_model): expected
        allowed = set(case.outputs) | {f"{m}.data" for m in case.models
                                       if b"weights.bin" in case.files.get("in.onnx", b"")}
        stray = [k for k in new if k not in allowed and not any(a.startswith(k + "/") for a in allowed)]
        if stray:
            return crash(f"exit 0 with stray files {stray}")
        for k in new:
            if (folder / k).is_file() and SECRET in (folder / k).read_bytes():
                return crash(f"exit 0 but {k} holds bytes read from outside the model's folder")
            if k in case.models and (folder / k).is_file():
                why = _check_onnx(folder / k)
                if why:
                    return crash(f"exit 0 but {k} is not a valid model: {why}")
        bad = [ln for ln in lines if ln.startswith(("spa-prune: error", "Warning", "warnings.warn")) or
               "Warning:" in ln or ln.startswith("[W:") or "onnxruntime" in ln.lower()]
        if bad:
            return crash(f"exit 0 with warning/log lines on stderr: {bad[0][:120]}")
        return Outcome(case, "ok", rc, err)
    if rc in (1, 2):
        prefix = "spa-prune: error:" if rc == 2 else "spa-prune: verification failed"
        if new:
            return crash(f"exit {rc} with files written: {sorted(new)}")
        if len(lines) != 1 or not err.endswith("\n"):
            return crash(f"exit {rc} with {len(lines)} stderr lines: {' | '.join(ln[:80] for ln in lines[:3])}")
        if not lines[0].startswith(prefix):
            return crash(f"exit {rc} with a line not starting '{prefix}': {lines[0][:100]}")
        return Outcome(case, "clean" if rc == 2 else "verify", rc, err)
    return crash(f"exit code {rc!r}: {lines[-1][:120] if lines else ''}")


def _check_onnx(path: Path) -> str | None:
    try:
        import onnxruntime as ort

        m = onnx.load_model(str(path), format="protobuf")   # whatever the name's extension says
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        return f"{type(e).__name__}: {one_line_of(e)[:100]}"
    return None


def signature_key(o: Outcome) -> str:
    """A crash's signature without the message details: exception type + where, or the reason's first words."""
    sig = o.signature
    if " at " in sig and ":" in sig.split(" at ", 1)[1]:
        kind, rest = sig.split(" at ", 1)
        return f"{kind} at {rest.split(': ', 1)[0]}"
    return sig.split(":")[0][:90]


def campaign(n: int, seed: int, base: Path, *, progress=None) -> list[Outcome]:
    outcomes = []
    for i, case in enumerate(generate(n, seed)):
        outcomes.append(run_case(case, base))
        if progress and (i + 1) % 100 == 0:
            progress(i + 1, outcomes)
    return outcomes


def report(outcomes: list[Outcome]) -> str:
    kinds = Counter(o.kind for o in outcomes)
    crashes = [o for o in outcomes if o.kind == "crash"]
    sigs = Counter(signature_key(o) for o in crashes)
    lines = [f"{len(outcomes)} cases: " + ", ".join(f"{k} {kinds.get(k, 0)}" for k in ("ok", "clean", "verify",
                                                                                          "crash")),
             f"{len(sigs)} distinct crash signatures"]
    for sig, count in sigs.most_common():
        first = next(o for o in crashes if signature_key(o) == sig)
        lines.append(f"  {count:4d} x {sig}")
        argv = [a if len(a) <= 60 else a[:40] + f"...({len(a)} chars)" for a in first.case.argv]
        lines.append(f"         e.g. {first.case.id} {first.case.family} argv={argv}")
        lines.append(f"         {first.signature[:200]}")
    return "\n".join(lines)


def reproduce(case_id: str, base: Path | None = None) -> Outcome:
    """Re-run one case by its id ('s<seed>-<index>')."""
    seed, index = case_id[1:].split("-")
    case = generate(int(index) + 1, int(seed))[int(index)]
    base = base or Path(tempfile.mkdtemp(prefix="fuzz-"))
    return run_case(case, base)


if __name__ == "__main__":
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write every crash as JSON lines here")
    ap.add_argument("--case", help="re-run one case id and print its outcome")
    a = ap.parse_args()
    if a.case:
        o = reproduce(a.case)
        print(o.kind, o.rc, o.signature, o.case.argv, o.stderr, sep="\n")
        sys.exit(0)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        res = campaign(a.cases, a.seed, Path(tmp),
                       progress=lambda i, out: print(f"{i} cases, {sum(o.kind == 'crash' for o in out)} crashes, "
                                                     f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True))
    print(report(res))
    print(f"{time.time() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            for o in res:
                if o.kind == "crash":
                    f.write(json.dumps({"id": o.case.id, "family": o.case.family, "argv": o.case.argv,
                                        "signature": o.signature, "stderr": o.stderr[-2000:]}) + "\n")
