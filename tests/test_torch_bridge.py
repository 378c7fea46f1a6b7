"""spa/torch_bridge.py and spa/torch_plan.py: back to PyTorch.

Route 1 (ONNX -> torch): `to_torch` + `save_torch` + `load_torch` reproduce onnxruntime within 1e-5 of the output
scale, on zoo models as exported and as pruned (both exporters); the reloaded module trains and saves again; the
`spa-prune to-torch` CLI contract (exit codes, one-line errors, atomic output, input untouched).
Route 2 (a saved plan on the original torch module): `apply_plan_to_module` on the zoo's own torch modules matches
the ONNX model pruned by the same plan, run in onnxruntime, within 1e-5 (ratio and target-flops plans, both
exporters, attention heads included); the plan's per-tensor section; refusals.
docs/torch.md: every python block runs.
Default: a representative subset of small zoo models; the full zoo (every model, small and full size) is `slow`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
from torch import nn

from spa import driver, models
from spa.cli import main
from spa.errors import SpaError
from spa.passes import verify
from spa.select import PruningPlan
from spa.torch_bridge import (
    FORMAT,
    check_against_onnxruntime,
    load_torch,
    rel_error,
    save_torch,
    to_torch,
)
from spa.torch_plan import apply_plan_to_module

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]
EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]
BUDGETS = [pytest.param({"ratio": 0.5}, id="ratio0.5"), pytest.param({"target_flops": 0.5}, id="flops0.5")]
ROUTE1_SUBSET = ["resnet18", "mobilenet_v2", "unet", "vit_tiny", "bert_layer"]  # + densenet & co. in route 2
ROUTE2_SUBSET = ["resnet18", "mobilenet_v2", "densenet121", "conv1d_net", "googlenet"]
SIZES = [pytest.param(True, id="small"), pytest.param(False, id="full")]


def zoo(name, dynamo, small=True) -> str:
    return str(models.zoo_path(name, dynamo=dynamo, small=small))


def torch_out(module, *args):
    module.eval()
    with torch.no_grad():
        out = module(*args)
    return list(out) if isinstance(out, tuple) else [out]


# ==== route 1: ONNX -> torch ========================================================================================
def roundtrip_error(onnx_path, tmp_path) -> float:
    pt = tmp_path / "model.pt"
    save_torch(to_torch(onnx_path), pt)
    module = load_torch(pt)
    return check_against_onnxruntime(module, onnx.load(str(onnx_path)))


def check_route1(name, dynamo, small, tmp_path):
    src = zoo(name, dynamo, small)
    assert roundtrip_error(src, tmp_path) <= TOL
    pruned = tmp_path / "pruned.onnx"
    driver.prune(src, str(pruned), ratio=0.5, fast=True)
    assert roundtrip_error(pruned, tmp_path) <= TOL


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", ROUTE1_SUBSET)
def test_to_torch_reproduces_onnxruntime(name, dynamo, tmp_path):
    """Exported and pruned zoo models, saved and reloaded, match onnxruntime within 1e-5."""
    check_route1(name, dynamo, True, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("small", SIZES)
@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_to_torch_reproduces_onnxruntime_full_zoo(name, dynamo, small, tmp_path):
    check_route1(name, dynamo, small, tmp_path)


def test_reloaded_module_trains_and_saves_again(tmp_path):
    src = zoo("resnet18", False)
    module = load_torch(_saved(to_torch(src), tmp_path / "a.pt"))
    assert all(p.requires_grad for p in module.parameters())
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    before = {k: v.copy() for k, v in module.state_dict_onnx().items()}  # arrays share the parameters' memory
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = (module(x) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = module.state_dict_onnx()
    assert set(after) == set(before) and any(not np.array_equal(before[k], after[k]) for k in before)
    again = load_torch(_saved(module, tmp_path / "b.pt"))
    for a, b in zip(torch_out(module, x), torch_out(again, x)):
        assert torch.equal(a, b)
    for k, v in again.state_dict_onnx().items():
        np.testing.assert_array_equal(v, after[k])


def _saved(module, path):
    save_torch(module, path)
    return path


def test_file_format_is_self_describing(tmp_path):
    path = _saved(to_torch(zoo("conv1d_net", True)), tmp_path / "m.pt")
    data = torch.load(path, weights_only=True)
    assert data["format"] == FORMAT
    structure = onnx.load_from_string(data["onnx"])
    assert structure.graph.node  # the graph, without the float weights
    floats = [t for t in structure.graph.initializer if t.name in data["params"]]
    assert floats and all(not t.raw_data and not t.float_data for t in floats)
    assert all(f"_params.{k}" in data["state_dict"] for k in data["params"].values())


def test_plain_torchgraph_saves_with_its_onnx_model(tmp_path):
    from spa.torch_graph import TorchGraph
    src = zoo("conv1d_net", False)
    tg = TorchGraph(onnx.load(src))
    with pytest.raises(SpaError, match="onnx_model"):
        save_torch(tg, tmp_path / "x.pt")
    save_torch(tg, tmp_path / "x.pt", onnx_model=src)
    assert check_against_onnxruntime(load_torch(tmp_path / "x.pt"), onnx.load(src)) <= TOL


def half_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float16), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float16), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_half_model_keeps_its_dtypes_through_a_save(tmp_path):
    model = half_model()
    module = load_torch(_saved(to_torch(model), tmp_path / "h.pt"))
    assert module.param("w").dtype == torch.float32  # upcast to run on CPU
    assert module.state_dict_onnx()["w"].dtype == np.float16
    np.testing.assert_array_equal(module.state_dict_onnx()["w"], numpy_helper.to_array(model.graph.initializer[0]))
    assert check_against_onnxruntime(module, model) <= 2e-3


# ---- the CLI ---------------------------------------------------------------------------------------------------
def cli(argv, capsys):
    try:
        rc = main(["to-torch", *map(str, argv)])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *fragments):
    assert rc == 2, (rc, err)
    assert err.count("\n") == 1 and err.startswith("spa-prune: error:"), err
    for f in fragments:
        assert f in err, err


def test_cli_checks_a_half_model_at_the_half_precision_tolerance(tmp_path, capsys):
    """onnxruntime sums float16 outputs in float16, the upcast module in float32: the reload check holds them
    to the tolerance the pruning's verification uses for float16 outputs (it refused a pruned float16
    ResNet-18 at 2.4e-4 > 1e-4); float32 models keep --rtol."""
    src = tmp_path / "half.onnx"
    onnx.save(half_model(), str(src))
    rc, _, err = cli([src, tmp_path / "h.pt"], capsys)
    assert rc == 0, err
    assert "(<= 0.002, 2 random inputs)" in err
    err_half = check_against_onnxruntime(load_torch(tmp_path / "h.pt"), half_model())
    assert 1e-4 < err_half <= 2e-3   # what the float32 tolerance would have refused


@pytest.fixture(scope="module")
def pruned_resnet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pruned")
    out, plan = folder / "pruned.onnx", folder / "plan.json"
    driver.prune(zoo("resnet18", False), str(out), ratio=0.5, save_plan=str(plan), fast=True)
    return out, plan


def test_cli_writes_a_checked_module(pruned_resnet, tmp_path, capsys):
    src, _ = pruned_resnet
    before = src.read_bytes()
    out = tmp_path / "sub" / "pruned.pt"
    rc, _, err = cli([src, out], capsys)
    assert rc == 0, err
    assert err.count("\n") == 1 and "to-torch: wrote" in err and "max rel. error vs onnxruntime" in err, err
    assert float(re.search(r"error vs onnxruntime ([0-9.e+-]+)", err).group(1)) <= TOL
    assert src.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.pt"]  # no temp file left
    assert check_against_onnxruntime(load_torch(out), onnx.load(str(src))) <= TOL
    rc, _, err = cli([src, out, "-q", "--no-check"], capsys)
    assert rc == 0 and err == ""


def test_cli_errors_are_one_line(pruned_resnet, tmp_path, capsys):
    src, plan = pruned_resnet
    one_line_error(*cli([tmp_path / "missing.onnx", tmp_path / "o.pt"], capsys)[::2], "not found")
    one_line_error(*cli([src, src], capsys)[::2], "input file")
    one_line_error(*cli([plan, tmp_path / "o.pt"], capsys)[::2], "cannot read")
    one_line_error(*cli([src, tmp_path / "o.pt", "--rtol", "0"], capsys)[::2], "--rtol")
    one_line_error(*cli([src], capsys)[::2], "see spa-prune to-torch --help")
    custom = helper.make_model(helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="my.ops")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])
    onnx.save(custom, str(tmp_path / "custom.onnx"))
    one_line_error(*cli([tmp_path / "custom.onnx", tmp_path / "o.pt"], capsys)[::2], "Frobnicate")
    assert not (tmp_path / "o.pt").exists()


def test_cli_failed_check_writes_nothing(pruned_resnet, tmp_path, capsys, monkeypatch):
    import spa.torch_bridge as tb
    src, _ = pruned_resnet
    out = tmp_path / "o.pt"
    out.write_bytes(b"old")
    monkeypatch.setattr(tb, "check_against_onnxruntime", lambda *a, **k: 0.5)
    rc, _, err = cli([src, out], capsys)
    assert rc == 1 and "nothing written" in err and err.count("\n") == 1, err
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["o.pt"]


def test_load_torch_refuses_other_files(pruned_resnet, tmp_path):
    _, plan = pruned_resnet
    with pytest.raises(SpaError, match="cannot read"):
        load_torch(plan)
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(SpaError, match="not a spa-prune torch file"):
        load_torch(tmp_path / "other.pt")
    with pytest.raises(SpaError, match="no such file"):
        load_torch(tmp_path / "missing.pt")


# ==== route 2: a saved plan on the original torch module ===========================================================
def check_route2(name, dynamo, budget, small, tmp_path, **kw):
    """Prune the export with --save-plan, apply the plan to the zoo's torch module, compare with the pruned
    ONNX model in onnxruntime (the example input and a random one)."""
    src = zoo(name, dynamo, small)
    out, plan = tmp_path / "pruned.onnx", tmp_path / "plan.json"
    driver.prune(src, str(out), save_plan=str(plan), **budget, fast=True)
    module = models.build(name, small)
    args = models.example_inputs(name, small)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    report = {}
    pruned = apply_plan_to_module(module, str(plan), src, args, report=report, **kw)
    if not kw.get("inplace"):
        assert pruned is not module
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # untouched
    assert report["max_rel_error"] <= TOL
    proto = onnx.load(str(out))
    feeds = [{proto.graph.input[0].name: args[0].numpy()}]
    feeds.append(verify.random_inputs(proto, {k: v.shape for k, v in feeds[0].items()}, 3))
    for f, ref in zip(feeds, verify.run_many(proto, feeds)):
        err = rel_error(ref, torch_out(pruned, torch.from_numpy(next(iter(f.values())))))
        assert err <= TOL, err
    return module, pruned, report, plan


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", ROUTE2_SUBSET)
def test_plan_on_torch_module_matches_pruned_onnx(name, dynamo, budget, tmp_path):
    report = check_route2(name, dynamo, budget, True, tmp_path)[2]
    assert report["tensors_cut"] and report["modules_changed"]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", ["vit_tiny", "bert_layer"])
def test_attention_heads_follow_the_plan(name, dynamo, tmp_path):
    from spa.models.transformer import Attention
    module, pruned, _, plan = check_route2(name, dynamo, {"ratio": 0.5}, True, tmp_path)
    heads = [(a.heads, b.heads) for a, b in zip(module.modules(), pruned.modules()) if isinstance(a, Attention)]
    assert heads and all(new < old for old, new in heads), heads
    assert any(g["units"] == 2 for g in json.loads(plan.read_text())["groups"])  # head groups were in the plan


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_plan_on_torch_module_full_zoo_small(name, dynamo, budget, tmp_path):
    check_route2(name, dynamo, budget, True, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_plan_on_torch_module_full_zoo_full_size(name, dynamo, tmp_path):
    check_route2(name, dynamo, {"ratio": 0.5}, False, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", models.ZOO_NAMES)
def test_random_plans_on_torch_modules(name, dynamo):
    """Random removals in every group (as test_zoo_pruning's random plans) carry over to the torch module."""
    from helpers import random_plan
    src = zoo(name, dynamo)
    analysis = driver.analyse(driver.load(src))
    plan = random_plan(analysis, np.random.default_rng(sum(map(ord, name)) + dynamo))
    report = {}
    apply_plan_to_module(models.build(name, True), plan.to_json(analysis), src, models.example_inputs(name, True),
                         report=report)
    assert report["max_rel_error"] <= TOL


def test_inplace_prunes_the_given_module_and_it_trains(tmp_path):
    module, pruned, _, _ = check_route2("mobilenet_v2", True, {"ratio": 0.5}, True, tmp_path, inplace=True)
    assert pruned is module
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(pruned(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters() if p.requires_grad)
    opt.step()


def test_plan_tensor_section_is_what_apply_cuts(pruned_resnet):
    out, plan = pruned_resnet
    data = json.loads(plan.read_text())
    assert data["format"] == "spa-prune-plan/1" and data["tensors"]
    pruned = {t.name: tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    for name, entry in data["tensors"].items():
        want = list(entry["shape"])
        for axis, kept in entry["keep"].items():
            assert kept == sorted(set(kept)) and all(0 <= i < entry["shape"][int(axis)] for i in kept)
            want[int(axis)] = len(kept)
        assert pruned[name] == tuple(want), name
        assert set(entry["groups"]) == set(entry["keep"]) and all(entry["groups"].values())


def test_old_plans_without_tensor_section_still_apply(pruned_resnet, tmp_path):
    out, plan = pruned_resnet
    data = json.loads(plan.read_text())
    del data["tensors"]
    src, (x,) = zoo("resnet18", False), models.example_inputs("resnet18", True)
    report = {}
    pruned = apply_plan_to_module(models.build("resnet18", True), data, src, (x,), report=report)
    assert report["max_rel_error"] <= TOL
    assert rel_error(verify.run(onnx.load(str(out)), {"input": x.numpy()}), torch_out(pruned, x)) <= TOL
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    assert driver.prune(src, None, plan_file=str(old), fast=True).report["verification"]["status"] == "passed"


def test_tampered_tensor_section_is_refused(pruned_resnet, tmp_path):
    _, plan = pruned_resnet
    data = json.loads(plan.read_text())
    entry = next(iter(data["tensors"].values()))
    kept = next(iter(entry["keep"].values()))
    kept[0] = kept[0] + 1 if kept[0] + 1 not in kept else kept[0] - 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    src = zoo("resnet18", False)
    with pytest.raises(SpaError, match="per-tensor section"):
        driver.prune(src, None, plan_file=str(bad), fast=True)
    with pytest.raises(SpaError, match="per-tensor section"):
        apply_plan_to_module(models.build("resnet18", True), data, src, models.example_inputs("resnet18", True))


def test_plan_object_and_dict_are_accepted(pruned_resnet):
    _, plan = pruned_resnet
    src = zoo("resnet18", False)
    analysis = driver.analyse(driver.load(src))
    obj = PruningPlan.from_json(json.loads(plan.read_text()), analysis)
    args = models.example_inputs("resnet18", True)
    a = apply_plan_to_module(models.build("resnet18", True), obj, src, args, check=False)
    b = apply_plan_to_module(models.build("resnet18", True), Path(plan), src, args, check=False)
    for x, y in zip(torch_out(a, *args), torch_out(b, *args)):
        assert torch.equal(x, y)


def test_a_module_with_other_weights_is_refused(pruned_resnet):
    _, plan = pruned_resnet
    src = zoo("resnet18", False)
    other = models.build("resnet18", True)
    with torch.no_grad():
        other.stem[0][0].weight.mul_(1.5).add_(0.01)
    args = models.example_inputs("resnet18", True)
    with pytest.raises(SpaError, match="does not reproduce the ONNX model"):
        apply_plan_to_module(other, plan, src, args)
    with pytest.raises(SpaError, match="no torch parameter or buffer matches"):
        apply_plan_to_module(other, plan, src, args, check=False)


def test_wrong_example_inputs_are_refused(pruned_resnet):
    _, plan = pruned_resnet
    with pytest.raises(SpaError, match="example input"):
        apply_plan_to_module(models.build("resnet18", True), plan, zoo("resnet18", False), (), check=True)
    with pytest.raises(SpaError, match="tensor or a tuple"):
        apply_plan_to_module(models.build("resnet18", True), plan, zoo("resnet18", False), "x")


class FixedHeadsAttention(nn.Module):
    """Attention whose head count is a module constant: nothing to update when heads go."""

    HEADS = 2

    def __init__(self, dim):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.HEADS, C // self.HEADS).permute(2, 0, 3, 1, 4)
        out = ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class TinyTransformer(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn = FixedHeadsAttention(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.attn(h))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_head_pruning_without_a_head_attribute_is_refused(tmp_path):
    torch.manual_seed(0)
    net, x = TinyTransformer().eval(), torch.randn(1, 5, 8)
    src, plan = tmp_path / "t.onnx", tmp_path / "plan.json"
    torch.onnx.export(net, (x,), str(src), input_names=["x"], dynamo=False)
    driver.prune(str(src), None, ratio=0.5, save_plan=str(plan), fast=True)
    groups = json.loads(plan.read_text())["groups"]
    assert any(g["units"] == 2 and g["removed"] for g in groups)  # a head was removed
    with pytest.raises(SpaError, match=r"group \d+ '.*' removes whole attention heads.*head-count attribute"):
        apply_plan_to_module(net, plan, src, (x,))


class HFSelfAttention(nn.Module):
    """Hugging Face style: num_attention_heads / attention_head_size / all_head_size, shapes from x.size()."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, dim // heads
        self.all_head_size = heads * self.attention_head_size
        self.query, self.key, self.value = (nn.Linear(dim, self.all_head_size) for _ in range(3))

    def split(self, x):
        return x.view(x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)).permute(0, 2, 1, 3)

    def forward(self, x):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = (q @ k.transpose(-1, -2)) / self.attention_head_size ** 0.5
        ctx = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (self.all_head_size,))


class HFLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attention = nn.Linear(8, 32), HFSelfAttention()
        self.dense, self.head = nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.dense(self.attention(h)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_hugging_face_style_attention_sizes_follow_the_heads(tmp_path):
    torch.manual_seed(0)
    net, x = HFLayer().eval(), torch.randn(1, 6, 8)
    src, out, plan = tmp_path / "t.onnx", tmp_path / "p.onnx", tmp_path / "plan.json"
    torch.onnx.export(net, (x,), str(src), input_names=["x"], dynamo=False)
    driver.prune(str(src), str(out), ratio=0.5, save_plan=str(plan), fast=True)
    report = {}
    pruned = apply_plan_to_module(net, plan, src, (x,), report=report)
    a = pruned.attention
    assert (a.num_attention_heads, a.attention_head_size, a.all_head_size) == (2, 8, 16)
    assert pruned.dense.in_features == 16 and net.attention.num_attention_heads == 4
    assert rel_error(verify.run(onnx.load(str(out)), {"x": x.numpy()}), torch_out(pruned, x)) <= TOL


# ==== docs/torch.md ================================================================================================
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_docs_examples_run(tmp_path, monkeypatch, capsys):
    text = (REPO / "docs" / "torch.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(blocks), "docs/torch.md", "exec"), {"__name__": "docs_torch_md"})  # noqa: S102 - our own docs
    out = capsys.readouterr().out
    assert "matches the pruned ONNX model within" in out
    assert (tmp_path / "finetuned.pt").exists() and (tmp_path / "plan.json").exists()



def test_to_torch_accepts_spa_models_and_protos():
    src = zoo("conv1d_net", True)
    for model in (driver.load(src), driver.load(src).graph, onnx.load(src)):
        module = to_torch(model)
        assert check_against_onnxruntime(module, onnx.load(src)) <= TOL
        assert onnx.load_from_string(module.onnx_structure).graph.node
