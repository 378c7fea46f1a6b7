"""Zoo models: every architecture exports with both exporters, is valid ONNX and matches torch.

Small variants run by default; full-size ones are marked `slow` (deselected by the
pyproject addopts; run them with `pytest -m slow`, vgg16_bn alone writes ~550 MB per exporter).
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from spa import models
from spa.models.counting import torch_macs_params

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]

# Op types proving the architectural feature survived export (both exporters).
FEATURE_OPS = {
    "vgg16_bn": {"Conv", "Relu", "MaxPool", "Gemm"},
    "resnet18": {"Conv", "Add"}, "resnet50": {"Conv", "Add"}, "resnet56": {"Conv", "Add"},
    "mobilenet_v2": {"Conv", "Clip", "Add"},
    "mobilenet_v3_small": {"HardSwish", "HardSigmoid", "Mul", "Add"},
    "densenet121": {"Concat", "AveragePool", "BatchNormalization"},
    "googlenet": {"Concat", "MaxPool"},
    "resnext": {"Conv", "Add"},
    "efficientnet_b0": {"Sigmoid", "Mul", "Add"},
    "unet": {"ConvTranspose", "Concat"},
    "vit_tiny": {"MatMul", "Softmax", "LayerNormalization", "Erf", "Concat"},
    "bert_layer": {"Gather", "MatMul", "Softmax", "LayerNormalization", "Tanh"},
    "conv1d_net": {"Conv", "MaxPool"},
}
GROUPED = {"mobilenet_v2", "mobilenet_v3_small", "resnext", "efficientnet_b0"}  # Conv with group > 1


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def check_export(name, dynamo, small, cache):
    path = models.zoo_path(name, dynamo=dynamo, small=small, cache_dir=cache)
    model = onnx.load(str(path))
    assert model.ir_version <= 10
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert FEATURE_OPS[name] <= ops, FEATURE_OPS[name] - ops
    if name in GROUPED:
        assert any(a.name == "group" and a.i > 1 for n in model.graph.node if n.op_type == "Conv" for a in n.attribute)

    inputs = models.example_inputs(name, small)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == models.input_names(name)
    (got,) = sess.run(["output"], {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})
    with torch.no_grad():
        ref = models.build(name, small)(*inputs).numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_export_small(name, dynamo, cache):
    check_export(name, dynamo, True, cache)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_export_full(name, dynamo, cache):
    check_export(name, dynamo, False, cache)


def test_names():
    assert models.ZOO_NAMES == ["vgg16_bn", "resnet18", "resnet50", "resnet56", "mobilenet_v2", "mobilenet_v3_small",
                                "densenet121", "googlenet", "resnext", "efficientnet_b0", "unet", "vit_tiny",
                                "bert_layer", "conv1d_net"]
    with pytest.raises(KeyError):
        models.build("nope")


@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_build_deterministic(name):
    a, b = models.build(name, small=True), models.build(name, small=True)
    assert not a.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x1, x2 = models.example_inputs(name, True), models.example_inputs(name, True)
    assert all(torch.equal(p, q) for p, q in zip(x1, x2))
    for m in a.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # non-trivial stats, so BN folding is testable
            assert m.running_mean.abs().max() > 0 and not torch.allclose(m.running_var, torch.ones_like(m.running_var))
            assert 0.5 <= m.weight.min() and m.weight.max() <= 1.5


def test_build_keeps_global_rng():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    models.build("resnet18", small=True)
    assert torch.equal(torch.rand(3), expected)


def test_bert_inputs_in_range():
    for small, vocab in ((True, 100), (False, 1000)):
        (ids,) = models.example_inputs("bert_layer", small)
        assert ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < vocab


def test_zoo_path_cached_and_atomic(tmp_path):
    p = models.zoo_path("conv1d_net", small=True, cache_dir=tmp_path)
    mtime = p.stat().st_mtime_ns
    assert models.zoo_path("conv1d_net", small=True, cache_dir=tmp_path) == p and p.stat().st_mtime_ns == mtime
    q = models.zoo_path("conv1d_net", small=True, dynamo=True, cache_dir=tmp_path)
    assert q != p and "small" in p.name and "dynamo" in q.name
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([p.name, q.name])  # no temp files left


def test_zoo_path_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPA_ZOO_CACHE", str(tmp_path))
    assert models.zoo_path("conv1d_net", small=True).parent == tmp_path


# ---------------------------------------------------------------------- counting.py

def test_counting_toy():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)               # 8*8*8 outputs * 3*9
            self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=4)      # 8*3*3 outputs * 2*9
            self.up = nn.ConvTranspose2d(8, 4, 2, 2)              # 8*3*3 inputs * 4*4
            self.c1d = nn.Conv1d(4, 6, 5)                         # 6*32 outputs * 4*5
            self.fc = nn.Linear(32, 5)                            # 6*5 outputs * 32

        def forward(self, x):
            y = self.up(self.c2(self.c1(x)))                      # 1x4x6x6
            return self.fc(self.c1d(y.reshape(1, 4, 36)))

    model = Toy()
    macs, params = torch_macs_params(model, (torch.randn(1, 3, 8, 8),))
    assert macs == 512 * 27 + 72 * 18 + 72 * 16 + 192 * 20 + 30 * 32
    assert params == sum(p.numel() for p in model.parameters())


def test_counting_attention_bert_small():
    cfg = dict(models.transformer.BERT_SMALL)
    n, d, f, L = 16, cfg["dim"], cfg["ffn"], cfg["layers"]
    per_layer = 4 * n * d * d + 2 * n * d * f + 2 * n * n * d  # q,k,v,out + FFN + q@k^T, attn@v
    expected = L * per_layer + d * d + d * 2                    # + pooler and classifier on token 0
    assert torch_macs_params(models.build("bert_layer", True), models.example_inputs("bert_layer", True))[0] == expected


# torchvision / paper reference parameter counts (exact) and MACs in G (torchvision "GFLOPS", rounded)
REFERENCE = {
    "vgg16_bn": (138_365_992, 15.47), "resnet18": (11_689_512, 1.81), "resnet50": (25_557_032, 4.09),
    "resnet56": (855_770, 0.126), "mobilenet_v2": (3_504_872, 0.30), "mobilenet_v3_small": (2_542_856, 0.06),
    "densenet121": (7_978_856, 2.83), "googlenet": (6_624_904, 1.50), "resnext": (25_028_904, 4.23),
    "efficientnet_b0": (5_288_548, 0.39), "vit_tiny": (5_717_416, 1.25),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", REFERENCE)
def test_full_size_matches_reference(name):
    params, gmacs = REFERENCE[name]
    macs, got_params = torch_macs_params(models.build(name), models.example_inputs(name))
    assert got_params == params
    assert abs(macs / 1e9 - gmacs) <= 0.005 + 0.005 * gmacs


def test_counting_vit_small_closed_form():
    c = models.transformer.VIT_SMALL
    n, d, h, L = (c["img"] // c["patch"]) ** 2 + 1, c["dim"], c["mlp_dim"], c["depth"]
    block = 4 * n * d * d + 2 * n * d * h + 2 * n * n * d
    patch = (n - 1) * d * 3 * c["patch"] ** 2
    expected = patch + L * block + d * c["num_classes"]
    assert torch_macs_params(models.build("vit_tiny", True), models.example_inputs("vit_tiny", True))[0] == expected
