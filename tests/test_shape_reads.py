"""Shape reads as exporters write them (issue 15, item 2): GPT-2's Conv1D reshape, a Shape of [B, H, S, D] of which
only B and S are used, and channel counts read at run time by flatten(2)/reshape(B, C, H, W)/Resize sizes.

Each pattern is a small torch module exported by both torch.onnx exporters (TorchScript and dynamo) with dynamic
dims; the groups are counted exactly and a pruned model is verified (checker, onnxruntime at two batch sizes,
the disconnected-channels reference)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import Builder, analyse, group_of, make_model, param_shapes, prune_and_check, reasons_text, zeroed
from onnx import TensorProto, helper

from spa import driver

torch = pytest.importorskip("torch")
F = torch.nn.functional

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


def export(module, example, path, dynamo: bool, axes: dict) -> onnx.ModelProto:
    """The single input `x` with the dims in `axes` ({index: name}) dynamic; IR <= 10, opset 17/18."""
    module.eval()
    if dynamo:
        dims = {i: torch.export.Dim(n, min=2, max=64) for i, n in axes.items()}
        torch.onnx.export(module, (example,), dynamo=True, opset_version=18, input_names=["x"], output_names=["y"],
                          dynamic_shapes=(dims,)).save(str(path))
    else:
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": axes})
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 10)
    return m


def sizes(analysis) -> list[tuple[int, int]]:
    """[(units, prunable units)] of every group, sorted."""
    return sorted((g.size, g.prunable) for g in analysis.groups)


def weight_shapes(model: onnx.ModelProto) -> list[tuple]:
    return sorted(s for s in param_shapes(model).values() if len(s) >= 2)


# ---- GPT-2's Conv1D: view(-1, nx) -> Gemm -> view(*shape[:-1], nf) -------------------------------------------------
class Conv1D(torch.nn.Module):
    """transformers' Conv1D: a Linear with a transposed weight applied to the flattened leading dims."""

    def __init__(self, nx, nf):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * nx ** -0.5)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(16, 32), Conv1D(32, 16)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_gpt2_conv1d_prunes(dynamo, tmp_path):
    """view(*shape[:-1], nf) puts the run-time sequence length where the Gemm's channel axis was: a dim read at run
    time is not Reshape's 0 (copy the input dim) — it is 0 only for an empty tensor — and dynamo's allowzero=1
    never copies. The 32 hidden channels prune; the target's nf is rewritten."""
    torch.manual_seed(0)
    m = export(GPT2MLP(), torch.randn(2, 5, 16), tmp_path / "mlp.onnx", dynamo, {0: "batch", 1: "seq"})
    _, analysis = analyse(m)
    assert sizes(analysis) == [(16, 0), (32, 32)]
    res = prune_and_check(m, 0.5, input_shapes={"x": (2, 5, 16)}, check_macs=False)
    assert res.report["macs"] == {"before": 2 * 10 * 16 * 32, "after": 2 * 10 * 16 * 16, "ratio": 0.5}
    assert weight_shapes(res.pruned) == [(16, 16), (16, 16)]


# ---- [B, H, S, D]: a Shape read of B and S only ------------------------------------------------------------------
class HeadsReadBatchAndSequence(torch.nn.Module):
    """q/k/v split with view(*x.shape[:-1], -1, D): the head count is unknown to shape inference until the input
    sizes are fixed, so Normalize's split of Shape(o) keeps one read Shape(0, 3) over B, H and S; the merge reads
    only B and S from it."""

    def __init__(self, d=32, hd=8):
        super().__init__()
        self.hd = hd
        self.q, self.k, self.v, self.proj = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = (m(x).view(*x.shape[:-1], -1, self.hd).transpose(1, 2) for m in (self.q, self.k, self.v))
        o = torch.softmax(q @ k.transpose(-1, -2) * self.hd ** -0.5, -1) @ v
        return self.proj(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_heads_survive_a_shape_read_of_batch_and_sequence(dynamo, tmp_path):
    torch.manual_seed(0)
    m = export(HeadsReadBatchAndSequence(), torch.randn(2, 5, 32), tmp_path / "attn.onnx", dynamo,
               {0: "batch", 1: "seq"})
    model, analysis = analyse(m)
    if not dynamo:  # the artefact is there: a Shape read spanning the head axis ...
        g = model.graph
        spans = [n for n in g.model.graph.node if n.op_type == "Shape" and g.shapes[n.input[0]][1] == 4
                 and any(a.name == "end" and a.i == 3 for a in n.attribute)]
        assert spans
    assert sizes(analysis) == [(4, 4), (32, 0)]  # ... and the 4 heads stay prunable
    res = prune_and_check(m, 0.5, input_shapes={"x": (2, 5, 32)}, check_macs=False)
    assert res.report["groups"]["pruned"] == 1
    assert weight_shapes(res.pruned) == [(16, 32), (32, 16), (32, 16), (32, 16)]


# ---- channel counts read at run time: flatten(2), reshape(B, C, H, W), Resize sizes ------------------------------
class RuntimeChannels(torch.nn.Module):
    """Conv -> flatten(2).transpose -> Linear -> reshape(B, H, W, -1).permute (channels unknown to shape inference
    from here on) -> interpolate(size=...) (Resize sizes from Shape) -> reshape(B, C, -1) with C read at run time
    -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.lin, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        b, _, h, w = y.shape
        t = torch.relu(self.lin(y.flatten(2).transpose(1, 2)))
        z = t.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        z = F.interpolate(z, size=(h * 2, w * 2), mode="nearest")
        return self.fc(z.reshape(z.shape[0], z.shape[1], -1).mean(-1))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_channel_counts_read_at_run_time_prune(dynamo, tmp_path):
    """Both 8-channel groups prune: the static count behind TorchScript's Slice of Normalize's split Concat (and
    dynamo's nested Concat) is rewritten; the count read at run time reads the pruned width."""
    torch.manual_seed(0)
    m = export(RuntimeChannels(), torch.randn(2, 3, 6, 6), tmp_path / "rt.onnx", dynamo, {0: "batch"})
    _, analysis = analyse(m)
    assert sizes(analysis) == [(5, 0), (8, 8), (8, 8)]
    res = prune_and_check(m, 0.5, check_macs=False)
    assert res.report["groups"]["pruned"] == 2
    assert weight_shapes(res.pruned) == [(4, 3, 3, 3), (4, 4), (5, 4)]


# ---- what still freezes -------------------------------------------------------------------------------------------
def tokens(b: Builder, y: str, name: str = "tokens") -> str:
    """(N, C, 4, 4) -> (N, 16, C) by Transpose and Reshape(0, 16, -1): shape inference knows C only once the
    batch is fixed, so Normalize cannot fold a read of it (the MobileViT/Swin way of unfolding patches), the
    target as TorchScript writes view(B, 16, -1): the batch read at run time."""
    y = b.op("Transpose", [y], perm=[0, 2, 3, 1])
    batch = b.op("Shape", [y], start=0, end=1)
    return b.op("Reshape", [y, b.op("Concat", [batch, b.i64(name, [16, -1])], axis=0)])


def count_arithmetic_model(use: str) -> onnx.ModelProto:
    """Conv (8 channels) -> tokens t (N, 16, C) -> Reshape to a target built from Shape(t): 'mul' flattens with
    16*C computed from the read count (Mul), 'add' with C + 120, 'moved' reshapes to (N, C, 16), the count on
    an axis that does not carry t's channels, 'other' reshapes another conv's tokens (N, 16, 16) to (N, 16, 2·C)."""
    b = Builder()
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]))
    t = tokens(b, b.relu(b.conv("c1", "x", 3, 8)))
    shape = b.op("Shape", [t], name="shape")
    n = b.op("Slice", [shape, b.i64("s0", [0]), b.i64("s1", [1]), b.i64("ax", [0])])
    c = b.op("Slice", [shape, b.i64("c0", [2]), b.i64("c1e", [3]), b.i64("ax1", [0])])
    if use in ("mul", "add"):
        target = b.op("Concat", [n, b.op(use.title(), [c, b.i64("sixteen", [16 if use == "mul" else 120])])],
                      axis=0)
        y = b.matmul("fc", b.op("Reshape", [t, target]), 128, 5)
    elif use == "other":  # 2·C of c1 sizes the axis of c2's 16 channels
        t2 = tokens(b, b.relu(b.conv("c2", "x", 3, 16)), "tokens2")
        target = b.op("Concat", [n, b.i64("sixteen2", [16]), b.op("Mul", [c, b.i64("two", [2])])], axis=0)
        y = b.op("ReduceMean", [b.op("Reshape", [t2, target])], axes=[1], keepdims=0)
        y = b.op("Add", [b.matmul("fc", y, 16, 5),
                         b.matmul("fc1", b.op("ReduceMean", [t], axes=[1], keepdims=0), 8, 5)])
    else:
        target = b.op("Concat", [n, c, b.i64("sixteen", [16])], axis=0)
        y = b.op("ReduceMean", [b.op("Reshape", [t, target])], axes=[1], keepdims=0)
        y = b.matmul("fc", y, 16, 5)
    return make_model(b.nodes, b.inits, b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)])


@pytest.mark.parametrize("use, why", [("add", "Add computes with a channel count read at run time"),
                                      ("moved", "on an axis that does not carry those channels"),
                                      ("other", "is not proven to size the axis it lands on after pruning (computed: 2 x")])
def test_channel_count_used_otherwise_freezes(use, why):
    """A count plus a constant is no count; one moved to an axis of other channels, or scaled onto an axis
    whose channels come from another source, is not proven to follow pruning: frozen, with the reason."""
    _, analysis = analyse(count_arithmetic_model(use))
    g = group_of(analysis, "c1")
    assert (g.size, g.prunable) == (8, 0) and why in reasons_text(g), reasons_text(g)
    if use == "other":  # the axis the count lands on freezes too: its size would not follow
        g = group_of(analysis, "c2")
        assert (g.size, g.prunable) == (16, 0) and why in reasons_text(g), reasons_text(g)


def test_channel_count_times_a_constant_prunes():
    """flatten to (N, 16·C) with 16·C computed as Mul(C read at run time, 16): the merged axis holds every
    channel 16 times, so after pruning the product is still its size. The 8 channels prune; the output equals
    the original's with the removed channels dead."""
    m = count_arithmetic_model("mul")
    _, analysis = analyse(m)
    g = group_of(analysis, "c1")
    assert (g.size, g.prunable) == (8, 8), reasons_text(g)
    dead = [1, 2, 5, 6]
    m = zeroed(m, {"c1.weight": (0, dead), "c1.bias": (0, dead),
                   "fc.weight": (0, [8 * i + c for i in range(16) for c in dead])})
    res = prune_and_check(m, 0.5, equal_original=True, check_macs=False)
    assert weight_shapes(res.pruned) == [(4, 3, 3, 3), (64, 5)]


def test_broadcast_to_a_read_count_carries_its_channels():
    """Expand of an unlabelled [1, 1, H, W] tensor to (N, C, H, W) with C read from y at run time: every channel
    holds the same values, so the expanded tensor carries y's channels and the sum with y stays prunable."""
    b = Builder()
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]))
    y = b.relu(b.conv("c1", "x", 3, 8))
    y = b.op("Transpose", [tokens(b, y)], perm=[0, 2, 1])
    y = b.op("Reshape", [y, b.i64("nchw", [0, 0, 4, 4])])
    target = b.op("Shape", [y], name="shape")
    bias = b.op("Expand", [b.const("row", np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)), target])
    y = b.op("GlobalAveragePool", [b.op("Add", [y, bias])])
    y = b.matmul("fc", b.op("Flatten", [y]), 8, 5)
    m = make_model(b.nodes, b.inits, b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)])
    _, analysis = analyse(m)
    assert sorted((g.size, g.prunable) for g in analysis.groups) == [(5, 0), (8, 8)]
    prune_and_check(m, 0.5, check_macs=False)


# ---- grouped-query attention with head counts computed from Shape reads (Hugging Face's repeat_kv) -------------
HD, KV, REP, SEQ = 4, 2, 2, 5  # head_dim, KV heads, query heads per KV head, sequence


def heads_from_reads_model() -> onnx.ModelProto:
    """x (N, 5, 16) -> grouped-query attention whose head counts are computed at run time: Q's heads as
    Shape(q)[2] // head_dim (Div), K/V's with -1, and repeat_kv as Hugging Face writes it and TorchScript exports
    it: Expand(Unsqueeze(k, 2), (b, kv, n_rep, s, d)) with Where(sizes == -1, 1, sizes) around the sizes, then
    Reshape to (b, kv * n_rep, s, d), kv read by Shape -> Gather and multiplied by the constant n_rep."""
    b = Builder(opset=18)
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, 16]))
    unsq = lambda v: b.op("Unsqueeze", [v, b.i64(b._name("axis0"), [0])])  # noqa: E731
    pick = lambda shape, i: b.op("Gather", [shape, b.const(b._name("i"), np.array(i, np.int64))])  # noqa: E731
    lead = b.op("Shape", ["x"], start=0, end=2)

    def heads(name, width, count=None):
        y = b.matmul(name, "x", 16, width)
        if count == "div":
            n = unsq(b.op("Div", [pick(b.op("Shape", [y]), 2), b.const(b._name("hd"), np.array(HD, np.int64))]))
            target = b.op("Concat", [lead, n, b.i64(b._name("hd"), [HD])], axis=0)
        else:
            target = b.op("Concat", [lead, b.i64(b._name("rest"), [-1, HD])], axis=0)
        return b.op("Transpose", [b.op("Reshape", [y, target])], perm=[0, 2, 1, 3])

    def repeat_kv(t):
        shape = b.op("Shape", [t])
        dims = [pick(shape, i) for i in range(4)]
        sizes = b.op("Concat", [unsq(dims[0]), unsq(dims[1]), b.i64(b._name("rep"), [REP]), unsq(dims[2]),
                                unsq(dims[3])], axis=0)
        sizes = b.op("Where", [b.op("Equal", [sizes, b.i64(b._name("neg"), [-1] * 5)]),
                               b.i64(b._name("ones"), [1] * 5), sizes])
        e = b.op("Expand", [b.op("Unsqueeze", [t, b.i64(b._name("axis2"), [2])]), sizes])
        n = b.op("Mul", [dims[1], b.const(b._name("nrep"), np.array(REP, np.int64))])
        return b.op("Reshape", [e, b.op("Concat", [unsq(dims[0]), unsq(n), unsq(dims[2]), unsq(dims[3])], axis=0)])

    q, k, v = heads("q", KV * REP * HD, "div"), repeat_kv(heads("k", KV * HD)), repeat_kv(heads("v", KV * HD))
    p = b.op("Softmax", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1)
    o = b.op("Transpose", [b.op("MatMul", [p, v])], perm=[0, 2, 1, 3])
    o = b.op("Reshape", [o, b.op("Concat", [lead, b.i64("minus1", [-1])], axis=0)])
    y = b.matmul("o", o, KV * REP * HD, 16)
    return make_model(b.nodes, b.inits, b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
                      opset=18)


def test_kv_heads_counted_by_shape_arithmetic_prune():
    """The KV-head count read at run time times n_rep sizes the repeated K/V (their axis holds each KV head n_rep
    times), and the query-head count is the q width read at run time divided by head_dim: both stay counts, so
    the unit (one KV head with its n_rep query heads) prunes — before, the Mul and Equal froze every head. With
    KV head 1 dead in the original the pruned model equals it; MACs are exact."""
    m = heads_from_reads_model()
    _, analysis = analyse(m)
    assert sizes(analysis) == [(2, 2), (16, 0)], [reasons_text(g) for g in analysis.groups]
    gone = list(range(HD, 2 * HD))  # KV head 1: its K/V columns, query heads 2 and 3, their o rows
    qgone = list(range(REP * HD, 2 * REP * HD))
    m = zeroed(m, {"k.weight": (1, gone), "v.weight": (1, gone), "q.weight": (1, qgone), "o.weight": (0, qgone)})
    res = prune_and_check(m, 0.5, equal_original=True, check_macs=False, input_shapes={"x": (1, SEQ, 16)})
    assert weight_shapes(res.pruned) == [(8, 16), (16, 4), (16, 4), (16, 8)]
    proj = lambda heads, kv: SEQ * 16 * HD * (heads + 2 * kv) + SEQ * heads * HD * 16  # noqa: E731
    assert res.report["macs"]["before"] == proj(4, 2) + 2 * 4 * SEQ * SEQ * HD
    assert res.report["macs"]["after"] == proj(2, 1) + 2 * 2 * SEQ * SEQ * HD


# ---- Slice bounds read at run time on other axes (TorchScript's chunk / rotate_half of a fused projection) ------
def half_slice_model(axes: bool) -> onnx.ModelProto:
    """conv c1 (8 channels) -> the first half of the width (dynamic), its end (Shape(y)[3] + 1) // 2 -> conv c2.
    With `axes` the Slice names axis 3; without, its two starts/ends cut the leading axes (N, and the channels
    to the first 4)."""
    b = Builder()
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]))
    y = b.relu(b.conv("c1", "x", 3, 8))
    width = b.op("Gather", [b.op("Shape", [y]), b.const("three", np.array(3, np.int64))])
    width = b.op("Add", [width, b.const("one", np.array(1, np.int64))])
    half = b.op("Unsqueeze", [b.op("Div", [width, b.const("two", np.array(2, np.int64))]), b.i64("ax0", [0])])
    if axes:
        y = b.op("Slice", [y, b.i64("start", [0]), half, b.i64("axes", [3])], name="half")
    else:
        ends = b.op("Concat", [b.i64("big", [2 ** 62]), half], axis=0)
        y = b.op("Slice", [y, b.i64("starts", [0, 0]), ends], name="half")
    y = b.matmul("fc", b.op("Flatten", [b.op("GlobalAveragePool", [b.relu(b.conv("c2", y, 8 if axes else 4, 6))])]),
                 6, 5)
    return make_model(b.nodes, b.inits, b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)])


def test_slice_bounds_read_at_run_time_on_another_axis_pass_channels():
    """GPT-NeoX's and Phi-3's fused QKV exported by TorchScript: chunk/rotate_half slice the head_dim axis with
    bounds computed from Shape() at run time. Before, every such Slice froze the heads ("Slice bounds computed
    at run time"); bounds on other axes never touch the channels. A Slice whose bounds may cut the channel axis
    (no axes: the leading ones) still freezes."""
    shapes = {"x": (1, 3, 8, 8)}
    analysis = driver.analyse(driver.load(half_slice_model(axes=True), input_shapes=shapes))
    assert sizes(analysis) == [(5, 0), (6, 6), (8, 8)]
    res = prune_and_check(half_slice_model(axes=True), 0.5, check_macs=False, input_shapes=shapes)
    assert weight_shapes(res.pruned) == [(3, 4, 3, 3), (3, 5), (4, 3, 3, 3)]
    analysis = driver.analyse(driver.load(half_slice_model(axes=False), input_shapes=shapes))
    g = group_of(analysis, "c1")
    assert g.prunable == 0 and "Slice bounds computed at run time" in reasons_text(g), reasons_text(g)
