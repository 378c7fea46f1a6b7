"""Dynamic input dims, as real third-party files have them: the output keeps them, verification runs a second
batch size, and a dynamic dim the model cannot take at the default size gets a clear error."""
from __future__ import annotations

import onnx
import pytest

from spa import driver
from spa.errors import SpaError

torch = pytest.importorskip("torch")
models = pytest.importorskip("spa.models")


def export_dynamic(name, path, seq=False):
    model, x = models.build(name, small=True), models.example_inputs(name, small=True)
    names = models.input_names(name)
    axes = {names[0]: {0: "batch", 1: "seq"} if seq else {0: "batch"}, "output": {0: "batch"}}
    torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17, input_names=names,
                      output_names=["output"], dynamic_axes=axes)
    return path


def dims(model: onnx.ModelProto):
    return [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit_tiny"])
def test_dynamic_batch_is_kept(name, tmp_path):
    src = export_dynamic(name, tmp_path / "dyn.onnx")
    out = tmp_path / "out.onnx"
    rep = driver.prune(str(src), str(out), ratio=0.5).report
    assert rep["verification"]["status"] == "passed" and rep["verification"]["inputs"] == 2
    assert rep["groups"]["pruned"] >= 1
    assert dims(onnx.load(str(out)))[0] == "batch"


def test_dynamic_sequence_needs_a_size_the_model_accepts(tmp_path):
    src = export_dynamic("bert_layer", tmp_path / "bert.onnx", seq=True)
    with pytest.raises(SpaError, match="--input-shape"):
        driver.prune(str(src), None, ratio=0.5)  # default sequence 128 > the 16 positions this model has
    rep = driver.prune(str(src), str(tmp_path / "o.onnx"), ratio=0.5, input_shapes={"input_ids": (1, 16)}).report
    assert rep["groups"]["pruned"] == 5  # 2 x (heads, MLP) + pooler
    assert rep["macs"]["after"] < rep["macs"]["before"]
    assert dims(onnx.load(str(tmp_path / "o.onnx"))) == ["batch", "seq"]


class ChunkAttention(torch.nn.Module):
    """qkv split with chunk(): TorchScript computes the split sizes from Shape() when the batch is dynamic."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.h = heads
        self.qkv, self.proj, self.fc = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), torch.nn.Linear(d, 5)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.h, c // self.h).transpose(1, 2) for t in (q, k, v))
        a = (q @ k.transpose(-2, -1) * (c // self.h) ** -0.5).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(b, n, c)
        return self.fc(torch.relu(self.proj(y)).mean(1))


@pytest.mark.parametrize("dynamo", [False, True])
def test_chunked_qkv_heads_prune_with_dynamic_batch(dynamo, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "attn.onnx"
    axes = None if dynamo else {"x": {0: "b"}, "y": {0: "b"}}
    torch.onnx.export(ChunkAttention().eval(), (torch.randn(1, 6, 32),), str(path), dynamo=dynamo,
                      opset_version=18 if dynamo else 17, input_names=["x"], output_names=["y"], dynamic_axes=axes)
    analysis = driver.analyse(driver.load(str(path)))
    sizes = sorted(g.size for g in analysis.groups if g.prunable)
    assert sizes == [4, 32]  # 4 heads (q, k, v of a head in one unit), 32 MLP channels
    rep = driver.prune(str(path), None, ratio=0.5).report
    assert rep["groups"]["pruned"] == 2 and rep["verification"]["status"] == "passed"
