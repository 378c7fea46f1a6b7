"""Shared test helpers: tiny ONNX graph builders and a prune-and-check driver.

Everything random is seeded (per tensor name), so a graph built twice is bit-identical.

    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.conv("c2", y, 8, 4)
    b.output(y)
    model = b.model()
    res = prune_and_check(model, 0.5)
"""
from __future__ import annotations

import math
import signal
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10


# ---- random tensors ---------------------------------------------------------------------------------------------
def rng_for(name: str) -> np.random.Generator:
    """A generator seeded by the tensor name: fixed across runs and independent of build order."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def rand(name: str, shape, scale: float | None = None, positive: bool = False) -> np.ndarray:
    shape = tuple(int(d) for d in shape)
    r = rng_for(name)
    if positive:
        return r.uniform(0.5, 1.5, size=shape).astype(np.float32)
    if scale is None:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.0 / math.sqrt(max(fan_in, 1))
    return (r.standard_normal(shape) * scale).astype(np.float32)


def tensor(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


# ---- module-level builders (nodes + initializers) ---------------------------------------------------------------
def conv(name: str, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True, dims: int = 2,
         out: str | None = None, pads: bool = True, stride: int = 1):
    """A Conv node (1-D/2-D/3-D) with a seeded random weight (cout, cin/group, k...) and bias."""
    out = out or f"{name}_out"
    w = rand(f"{name}.weight", (cout, cin // group, *([k] * dims)))
    inits = [tensor(f"{name}.weight", w)]
    inputs = [x, f"{name}.weight"]
    if bias:
        inits.append(tensor(f"{name}.bias", rand(f"{name}.bias", (cout,), 0.1)))
        inputs.append(f"{name}.bias")
    attrs = {"kernel_shape": [k] * dims, "group": group, "strides": [stride] * dims}
    if pads:
        attrs["pads"] = [k // 2] * (2 * dims)
    return [helper.make_node("Conv", inputs, [out], name=name, **attrs)], inits


def make_model(nodes, inits, inputs, outputs, opset: int = OPSET, extra_opsets=None) -> onnx.ModelProto:
    """inputs: list of (name, shape[, elem_type]) or ValueInfoProto; outputs: names (or ValueInfoProtos)."""
    def vi_in(i):
        if isinstance(i, onnx.ValueInfoProto):
            return i
        name, shape, *t = i
        return helper.make_tensor_value_info(name, t[0] if t else TensorProto.FLOAT, list(shape))

    def vi_out(o):
        if isinstance(o, onnx.ValueInfoProto):
            return o
        if isinstance(o, tuple):
            return helper.make_tensor_value_info(o[0], o[1], None)
        return helper.make_tensor_value_info(o, TensorProto.FLOAT, None)

    graph = helper.make_graph(list(nodes), "g", [vi_in(i) for i in inputs], [vi_out(o) for o in outputs],
                              initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    m = helper.make_model(graph, opset_imports=opsets, producer_name="spa-tests")
    m.ir_version = IR_VERSION
    # give graph outputs their inferred types (the full checker wants a shape on every output)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        return m
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    missing = []
    for o in m.graph.output:
        v = known.get(o.name)
        if v is not None and v.type.tensor_type.HasField("shape"):
            o.type.CopyFrom(v.type)
        else:
            missing.append(o)
    if missing:  # ops onnx cannot infer (function ops, ...): take the shapes onnxruntime produces
        try:
            values = dict(zip([o.name for o in m.graph.output], run_model(m, feeds_for(m))))
        except Exception:
            return m
        for o in missing:
            shape = o.type.tensor_type.shape
            shape.Clear()
            for d in values[o.name].shape:
                shape.dim.add().dim_value = int(d)
    return m


class Builder:
    """Accumulates nodes and initializers; every method returns the name of its (first) output."""

    def __init__(self, opset: int = OPSET):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list = []
        self.outputs: list = []
        self.extra_opsets: dict = {}
        self._n = 0

    # plumbing
    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def input(self, name: str, shape, elem_type=TensorProto.FLOAT) -> str:
        self.inputs.append((name, list(shape), elem_type))
        return name

    def output(self, name: str, elem_type=TensorProto.FLOAT) -> str:
        self.outputs.append((name, elem_type))
        return name

    def const(self, name: str, arr) -> str:
        self.inits.append(tensor(name, arr))
        return name

    def weight(self, name: str, shape, scale=None, positive=False) -> str:
        return self.const(name, rand(name, shape, scale, positive))

    def add(self, nodes_inits) -> str:
        nodes, inits = nodes_inits
        self.nodes.extend(nodes)
        self.inits.extend(inits)
        return nodes[-1].output[0]

    def op(self, op_type: str, inputs, name: str | None = None, n_out: int = 1, domain: str = "", **attrs):
        """Add a node; returns its output name (or the list of names when n_out > 1)."""
        name = name or self._name(op_type.lower())
        outs = [f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    # layers
    def conv(self, name, x, cin, cout, k=3, group=1, bias=True, dims=2, stride=1) -> str:
        return self.add(conv(name, x, cin, cout, k=k, group=group, bias=bias, dims=dims, stride=stride))

    def conv_t(self, name, x, cin, cout, k=2, stride=2, group=1, bias=True) -> str:
        self.weight(f"{name}.weight", (cin, cout // group, k, k))
        ins = [x, f"{name}.weight"]
        if bias:
            ins.append(self.weight(f"{name}.bias", (cout,), 0.1))
        return self.op("ConvTranspose", ins, name=name, kernel_shape=[k, k], strides=[stride, stride], group=group)

    def bn(self, name, x, c, beta=None, mean=None) -> str:
        scale = self.weight(f"{name}.scale", (c,), positive=True)
        b = self.const(f"{name}.bias", rand(f"{name}.bias", (c,), 0.1) if beta is None else beta)
        m = self.const(f"{name}.mean", rand(f"{name}.mean", (c,), 0.1) if mean is None else mean)
        v = self.weight(f"{name}.var", (c,), positive=True)
        return self.op("BatchNormalization", [x, scale, b, m, v], name=name, epsilon=1e-5)

    def relu(self, x, name=None) -> str:
        return self.op("Relu", [x], name=name)

    def gemm(self, name, x, k, n, trans_b=0, bias=True) -> str:
        w = self.weight(f"{name}.weight", (n, k) if trans_b else (k, n), scale=1 / math.sqrt(k))
        ins = [x, w]
        if bias:
            ins.append(self.weight(f"{name}.bias", (n,), 0.1))
        return self.op("Gemm", ins, name=name, transB=trans_b)

    def matmul(self, name, x, k, n) -> str:
        w = self.weight(f"{name}.weight", (k, n), scale=1 / math.sqrt(k))
        return self.op("MatMul", [x, w], name=name)

    def linear(self, name, x, k, n) -> str:
        """MatMul + Add bias (how Linear layers arrive from the dynamo exporter)."""
        y = self.matmul(name, x, k, n)
        return self.op("Add", [y, self.weight(f"{name}.bias", (n,), 0.1)], name=f"{name}_bias")

    def i64(self, name, values) -> str:
        return self.const(name, np.array(values, dtype=np.int64))

    def model(self) -> onnx.ModelProto:
        return make_model(self.nodes, self.inits, self.inputs, self.outputs, self.opset, self.extra_opsets)


MS_DOMAIN = "com.microsoft"


def bert_as_onnxruntime_optimizes_it(seq: int = 6, d: int = 32, heads: int = 4, opset: int = 17) -> onnx.ModelProto:
    """A one-layer BERT as onnxruntime's transformer optimizer saves it: EmbedLayerNormalization (word, position
    and segment tables; the mask's row lengths as its second output), Attention reading those lengths,
    SkipLayerNormalization, an MLP with BiasGelu, and a second SkipLayerNormalization."""
    rng = np.random.default_rng(1)

    def table(name, *shape, scale=0.5):
        return b.const(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    b = Builder(opset=opset)
    b.extra_opsets[MS_DOMAIN] = 1
    ids, segments, mask = (b.input(n, [2, seq], TensorProto.INT32) for n in ("ids", "segments", "mask"))
    ones, zeros = b.const("ones", np.ones(d, np.float32)), b.const("zeros", np.zeros(d, np.float32))
    emb, lengths = b.op("EmbedLayerNormalization", [ids, segments, table("word", 50, d), table("position", 16, d),
                                                    table("segment", 2, d), ones, zeros, mask],
                        domain=MS_DOMAIN, n_out=2, epsilon=1e-12)
    att = b.op("Attention", [emb, table("qkv", d, 3 * d, scale=d ** -0.5), table("qkv_bias", 3 * d, scale=0.1),
                             lengths], domain=MS_DOMAIN, num_heads=heads,
             mask_filter_value=-3.4028234663852886e38)
    h = b.op("SkipLayerNormalization", [b.op("MatMul", [att, table("wo", d, d, scale=d ** -0.5)]), emb, ones, zeros,
                                        table("bo", d, scale=0.1)], domain=MS_DOMAIN, epsilon=1e-12)
    up = b.op("BiasGelu", [b.op("MatMul", [h, table("w1", d, 2 * d, scale=d ** -0.5)]), table("b1", 2 * d)],
              domain=MS_DOMAIN)
    b.output(b.op("SkipLayerNormalization", [b.op("MatMul", [up, table("w2", 2 * d, d, scale=(2 * d) ** -0.5)]), h,
                                             ones, zeros], domain=MS_DOMAIN, epsilon=1e-12))
    return b.model()


# ---- running and inspecting -------------------------------------------------------------------------------------
def feeds_for(model: onnx.ModelProto, seed: int = 0, shapes: dict | None = None) -> dict:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = (shapes or {}).get(vi.name) or [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[vi.name] = rng.integers(0, 2, size=dims).astype(dtype)
    return feeds


def run_model(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def analyse(model):
    """(Model, Analysis) of a ModelProto through the public load + analyse."""
    from spa import driver

    m = driver.load(model)
    return m, driver.analyse(m)


def group_table(analysis) -> list[tuple[int, int]]:
    """[(size, frozen units)] per coupled group, in the analysis's order."""
    return [(g.size, int(g.frozen.sum())) for g in analysis.groups]


def group_of(analysis, source: str):
    """The coupled group whose sources include the node `source`."""
    hits = [g for g in analysis.groups if source in g.sources]
    assert len(hits) == 1, f"{source}: {[(g.name, g.sources) for g in analysis.groups]}"
    return hits[0]


def reasons_text(g) -> str:
    return " | ".join(f"{w}: {r}" for w, r in g.reasons)


def removed_count(n: int, ratio: float) -> int:
    """Units a ratio removes from a group of n (the CLI's documented rule)."""
    return int(math.floor(ratio * n + 0.5))


def param_shapes(model: onnx.ModelProto) -> dict[tuple[str, int], tuple]:
    """(node name, input index) -> shape of every initializer a node reads."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            if x in inits:
                out[(n.name, i)] = inits[x]
    return out


def param_value(model: onnx.ModelProto, node_name: str, i: int) -> np.ndarray:
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(inits[node.input[i]])


def node_attr(model: onnx.ModelProto, node_name: str, attr_name: str):
    node = next(n for n in model.graph.node if n.name == node_name)
    for a in node.attribute:
        if a.name == attr_name:
            return helper.get_attribute_value(a)
    return None


def prune_and_check(model: onnx.ModelProto, ratio: float | None = None, *, target_flops: float | None = None,
                    equal_original: bool = False, rtol: float = 1e-5, seeds=(0, 1), check_macs: bool = True,
                    **kw):
    """Prune through the public pipeline with verification, then check on our own:
    - the pruned model passes onnx.checker full_check and runs in onnxruntime;
    - every output keeps the original's shape and stays finite;
    - with `equal_original` (the removed channels are dead in the original), the pruned outputs equal the
      ORIGINAL model's outputs within `rtol` of each output's scale;
    - with `check_macs`, the report's MACs before/after equal an independent count (count_macs).
    Returns the driver's Result."""
    from spa import driver

    if ratio is None and target_flops is None and "plan_file" not in kw:
        ratio = 0.5
    if not {"importance", "reconstruct", "recalibrate", "compensate", "fast"} & set(kw):
        kw["fast"] = True  # a structural check: the instant path, so that `equal_original` holds (no value pass)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    res = driver.prune(model, None, ratio=ratio, target_flops=target_flops, verify=True, **kw)
    assert res.report["verification"]["status"] == "passed"
    pruned = res.model.graph.to_model()
    onnx.checker.check_model(pruned, full_check=True)
    assert model == original, "prune() must not modify the caller's ModelProto"
    for seed in seeds:
        feeds = feeds_for(original, seed)
        ref, got = run_model(original, feeds), run_model(pruned, feeds)
        assert len(ref) == len(got)
        for a, b in zip(ref, got):
            assert a.shape == b.shape
            assert np.isfinite(a).all(), "the test model itself produces non-finite outputs"
            assert np.isfinite(b).all()
            if equal_original:
                scale = max(float(np.abs(a).max()), 1e-12)
                err = float(np.abs(a.astype(np.float64) - b).max()) / scale
                assert err <= rtol, f"pruned differs from the original: rel err {err:.3g} > {rtol:g}"
    if check_macs:  # the report's MACs against an independent count from onnx shape inference
        assert res.report["macs"]["before"] == count_macs(original), (res.report["macs"], count_macs(original))
        assert res.report["macs"]["after"] == count_macs(pruned), (res.report["macs"], count_macs(pruned))
    res.pruned = pruned
    return res


def zeroed(model: onnx.ModelProto, spec: dict) -> onnx.ModelProto:
    """A copy of `model` in which slices of initializers are set to zero.
    spec: {initializer name: [(axis, indices), ...]} (a single (axis, indices) pair is accepted too)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name not in spec:
            continue
        entries = spec[t.name]
        if isinstance(entries, tuple):
            entries = [entries]
        arr = numpy_helper.to_array(t).copy()
        for axis, idx in entries:
            index = [slice(None)] * arr.ndim
            index[axis] = list(idx)
            arr[tuple(index)] = 0
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return m


def count_macs(model: onnx.ModelProto) -> int:
    """MACs of Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU/RNN from onnx shape inference (DESIGN.md's definition), computed
    independently of the library's cost model."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    total = 0
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv":
            w, y = shapes[n.input[1]], shapes[n.output[0]]
            total += int(np.prod(y)) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            w, x = shapes[n.input[1]], shapes[n.input[0]]
            total += int(np.prod(x)) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            a, y = shapes[n.input[0]], shapes[n.output[0]]
            k = a[0] if attrs.get("transA", 0) else a[1]
            total += int(np.prod(y)) * k
        elif n.op_type == "MatMul":
            a, y = shapes[n.input[0]], shapes[n.output[0]]
            total += int(np.prod(y)) * a[-1]
        elif n.op_type in ("LSTM", "GRU", "RNN"):  # per step and direction: W·x_t and R·h_t
            x, w, r = shapes[n.input[0]], shapes[n.input[1]], shapes[n.input[2]]
            total += x[0] * x[1] * w[0] * w[1] * (w[2] + r[2])
    return total


def random_plan(analysis, rng: np.random.Generator):
    """Random removals in every group (never a whole group, never a frozen unit), random unit scores for the
    give-backs, then keep_every_tensor: the random plans the zoo sweeps prune with."""
    from spa.select import PruningPlan, keep_every_tensor
    removed = {}
    for g in analysis.groups:
        free = [i for i in range(g.size) if not g.frozen[i]]
        k = min(len(free), g.size - 1, int(rng.integers(0, g.size)))
        if k > 0:
            removed[g.id] = sorted(rng.choice(free, size=k, replace=False).tolist())
    return keep_every_tensor(analysis, PruningPlan(removed), {u: float(rng.random()) for u in analysis.unit_group})


def conv_net() -> onnx.ModelProto:
    """Conv -> BN -> ReLU -> Conv on a 1x3x8x8 input: the smallest model with one prunable group."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.bn("bn1", b.conv("c1", x, 3, 8), 8))
    b.output(b.conv("c2", y, 8, 4))
    return b.model()


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """spa.cli.main in-process: (exit code, stdout, stderr)."""
    from spa.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's --help exits by itself
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments) -> None:
    """The CLI's contract for bad input: exit 2, ONE stderr line starting 'spa-prune: error:', with `fragments`."""
    assert rc == 2, (rc, err)
    assert err.count("\n") == 1 and err.endswith("\n"), f"expected one line on stderr, got:\n{err}"
    assert err.startswith("spa-prune: error:"), err
    for f in fragments:
        assert f in err, err


def labeled_noise_calib(folder) -> str:
    """A calibration file of 16 random 3x32x32 images with labels (the small zoo ResNet-18's input): enough for
    a search to score candidates, small enough to be quick."""
    rng = np.random.default_rng(0)
    path = folder / "calib.npz"
    np.savez(path, input=rng.standard_normal((16, 3, 32, 32)).astype(np.float32),
             labels=rng.integers(0, 10, 16).astype(np.int64))
    return str(path)


def as_from_a_terminal() -> None:
    """preexec_fn for a spa-prune child process: SIGINT/SIGTERM at their defaults and unblocked, as a command typed
    in a shell starts. A test worker's own dispositions (an ignored SIGINT is inherited, and Python then never
    installs its Ctrl-C handler) must not decide what the child does with the signal."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
