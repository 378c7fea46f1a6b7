"""Shape reads as exporters write them (issue 15, item 2): GPT-2's Conv1D reshape, a Shape of [B, H, S, D] of which
only B and S are used, and channel counts read at run time by flatten(2)/reshape(B, C, H, W)/Resize sizes.

Each pattern is a small torch module exported by both torch.onnx exporters (TorchScript and dynamo) with dynamic
dims; the groups are counted exactly and a pruned model is verified (checker, onnxruntime at two batch sizes,
the disconnected-channels reference)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import Builder, analyse, group_of, make_model, param_shapes, prune_and_check, reasons_text
from onnx import TensorProto, helper

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
def tokens(b: Builder, y: str) -> str:
    """(N, C, 4, 4) -> (N, 16, C) by Transpose and Reshape(0, 16, -1): shape inference knows C only once the
    batch is fixed, so Normalize cannot fold a read of it (the MobileViT/Swin way of unfolding patches), the
    target as TorchScript writes view(B, 16, -1): the batch read at run time."""
    y = b.op("Transpose", [y], perm=[0, 2, 3, 1])
    batch = b.op("Shape", [y], start=0, end=1)
    return b.op("Reshape", [y, b.op("Concat", [batch, b.i64("tokens", [16, -1])], axis=0)])


def count_arithmetic_model(use: str) -> onnx.ModelProto:
    """Conv (8 channels) -> tokens t (N, 16, C) -> Reshape to a target built from Shape(t): 'mul' flattens with
    16*C computed from the read count (Mul), 'moved' reshapes to (N, C, 16), the count on an axis that does not
    carry t's channels."""
    b = Builder()
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]))
    t = tokens(b, b.relu(b.conv("c1", "x", 3, 8)))
    shape = b.op("Shape", [t], name="shape")
    n = b.op("Slice", [shape, b.i64("s0", [0]), b.i64("s1", [1]), b.i64("ax", [0])])
    c = b.op("Slice", [shape, b.i64("c0", [2]), b.i64("c1e", [3]), b.i64("ax1", [0])])
    if use == "mul":
        target = b.op("Concat", [n, b.op("Mul", [c, b.i64("sixteen", [16])])], axis=0)
        y = b.matmul("fc", b.op("Reshape", [t, target]), 128, 5)
    else:
        target = b.op("Concat", [n, c, b.i64("sixteen", [16])], axis=0)
        y = b.op("ReduceMean", [b.op("Reshape", [t, target])], axes=[1], keepdims=0)
        y = b.matmul("fc", y, 16, 5)
    return make_model(b.nodes, b.inits, b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)])


@pytest.mark.parametrize("use, why", [("mul", "Mul computes with a channel count read at run time"),
                                      ("moved", "on an axis that does not carry those channels")])
def test_channel_count_used_otherwise_freezes(use, why):
    _, analysis = analyse(count_arithmetic_model(use))
    g = group_of(analysis, "c1")
    assert (g.size, g.prunable) == (8, 0) and why in reasons_text(g), reasons_text(g)


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
