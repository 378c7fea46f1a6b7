"""Fine-tuning with distillation (spa/finetune.py) and progressive pruning (spa/progressive.py), on a small conv net
trained here on sklearn's digits: which initializers train, the training-time BatchNorm folds back exactly, the
written model keeps its interface and agrees with torch, distillation moves the student toward the teacher, and
progressive steps land on the budget with every step verified."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from spa import driver
from spa.errors import SpaError
from spa.finetune import finetune, trainable_initializers
from spa.progressive import prune_progressive, step_targets
from spa.train_batchnorm import conv_sites

SPA_PRUNE = Path(sys.executable).parent / "spa-prune"


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A trained SmallNet exported with BN folded, train/test .npz files, in a temp folder."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images[:, None].astype(np.float32) / 16.0 - 0.5) / 0.5
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    tr, te = order[:1200], order[1200:]
    torch.manual_seed(0)
    net = SmallNet()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    for _epoch in range(12):
        for i in range(0, len(tr), 64):
            loss = nn.functional.cross_entropy(net(xt[i:i + 64]), yt[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    root = tmp_path_factory.mktemp("ft")
    path = root / "teacher.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17)
    np.savez(root / "train.npz", input=x[tr], labels=y[tr])
    np.savez(root / "test.npz", input=x[te], labels=y[te])
    np.savez(root / "unlabelled.npz", input=x[tr])
    return root


def run(path_or_model, x):
    m = path_or_model if isinstance(path_or_model, (str, Path)) else path_or_model.SerializeToString()
    sess = ort.InferenceSession(str(m) if isinstance(m, Path) else m, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def accuracy(model, npz) -> float:
    d = np.load(npz)
    return float((run(model, d["input"]).argmax(1) == d["labels"]).mean())


# ---- what trains -------------------------------------------------------------------------------------------------
def test_trainable_initializers_are_weights_not_constants():
    """Conv/Gemm weights, BN scale/bias, a bias Add and a MatMul weight train; BN running statistics, a scalar
    exponent and the pre-processing constant applied to the raw input do not."""
    f = np.float32
    inits = {
        "mean": np.full((1, 2, 1, 1), 0.5, f), "w": np.ones((3, 2, 1, 1), f), "b": np.zeros(3, f),
        "s": np.ones(3, f), "t": np.zeros(3, f), "rm": np.zeros(3, f), "rv": np.ones(3, f),
        "two": np.array(2.0, f), "wm": np.ones((3, 4), f), "bias": np.zeros(4, f),
    }
    nodes = [helper.make_node("Sub", ["x", "mean"], ["x0"]),
             helper.make_node("Conv", ["x0", "w", "b"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "t", "rm", "rv"], ["n"]),
             helper.make_node("Pow", ["n", "two"], ["p"]),
             helper.make_node("ReduceMean", ["p"], ["r"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["r", "wm"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert trainable_initializers(model) == ["w", "b", "s", "t", "wm", "bias"]
    assert set(trainable_initializers(model, "all")) == set(inits) - {"two"}
    assert conv_sites(model, trainable_initializers(model)) == []  # a BN reads the conv: no training BN
    with pytest.raises(SpaError, match="unknown trainable set"):
        trainable_initializers(model, "some")


# ---- finetune ----------------------------------------------------------------------------------------------------
def test_zero_epochs_is_the_same_function_with_the_same_interface(digits):
    """The training-time BatchNorms start as the identity and fold back exactly: 0 epochs changes nothing
    measurable; inputs, outputs and node count stay, a conv without a bias gains one."""
    x = np.load(digits / "test.npz")["input"][:64]
    teacher = onnx.load(digits / "teacher.onnx")
    res = finetune(teacher, digits / "same.onnx", data=digits / "train.npz", epochs=0)
    out = onnx.load(digits / "same.onnx")
    assert res.report["training_batchnorms"] == 2
    assert [i.name for i in out.graph.input] == [i.name for i in teacher.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in teacher.graph.output]
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in teacher.graph.node]
    a, b = run(digits / "teacher.onnx", x), run(digits / "same.onnx", x)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    assert res.report["export_check"]["onnxruntime_vs_torch_max_rel_error"] < 1e-5


def test_distillation_recovers_a_pruned_model_and_writes_a_checked_model(digits):
    """Prune half the channels (l1, no reconstruction: accuracy near chance), then 4 epochs of CE+KD: accuracy and agreement with the
    teacher rise, the written model is what torch trained (ONNX vs torch within 1e-5), the curve is drawn."""
    pruned = digits / "pruned.onnx"
    driver.prune(str(digits / "teacher.onnx"), pruned, ratio=0.5, importance="l1", fast=True)
    before = accuracy(pruned, digits / "test.npz")
    res = finetune(pruned, digits / "tuned.onnx", data=digits / "train.npz", val=digits / "test.npz",
                   teacher=digits / "teacher.onnx", epochs=4, lr=0.1, batch_size=32, curve=digits / "curve.png",
                   keep_best=False)
    after = accuracy(digits / "tuned.onnx", digits / "test.npz")
    teacher_acc = accuracy(digits / "teacher.onnx", digits / "test.npz")
    assert after > before + 0.5 and after >= teacher_acc - 0.1, (before, after, teacher_acc)
    h = res.history
    assert h[-1]["val_accuracy"] == pytest.approx(after, abs=1e-9)
    assert h[-1]["val_agreement"] > h[0]["val_agreement"]
    assert res.report["loss"] == "ce+kd" and res.report["kd_temperature"] == 0.75
    assert res.report["export_check"]["onnxruntime_vs_torch_max_rel_error"] < 1e-5
    onnx.checker.check_model(onnx.load(digits / "tuned.onnx"), full_check=True)
    assert (digits / "curve.png").stat().st_size > 1000


def test_keep_best_never_returns_a_worse_model_on_validation(digits, tmp_path):
    """A harmful run (lr 3 on a trained net) with a held-out split: the best validation epoch is epoch 0, so the
    written model is the input's function; without --keep-best the same run does measurably worse."""
    teacher = digits / "teacher.onnx"
    kw = {"data": digits / "train.npz", "epochs": 2, "lr": 3.0, "batch_size": 32, "val_split": 0.25, "seed": 1}
    res = finetune(teacher, tmp_path / "kept.onnx", **kw)
    assert res.report["keep_best"] and res.report["best_epoch"] == 0
    assert res.report["val_samples"] + res.report["samples"] == 1200
    assert abs(res.report["val_samples"] - 300) <= 10  # 25 % per class, rounded per class
    assert res.history[-1]["val_accuracy"] < res.history[0]["val_accuracy"]
    x = np.load(digits / "test.npz")["input"]
    a, b = run(teacher, x), run(tmp_path / "kept.onnx", x)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    worse = finetune(teacher, tmp_path / "last.onnx", keep_best=False, **kw)
    assert worse.report["best_epoch"] == 2
    assert accuracy(tmp_path / "last.onnx", digits / "test.npz") < accuracy(teacher, digits / "test.npz") - 0.02
    with pytest.raises(SpaError, match="either validation data"):
        finetune(teacher, None, val=digits / "test.npz", **kw)
    with pytest.raises(SpaError, match="needs validation data"):
        finetune(teacher, None, data=digits / "train.npz", epochs=1, keep_best=True)
    with pytest.raises(SpaError, match="--val-split"):
        finetune(teacher, None, data=digits / "train.npz", epochs=1, val_split=1.0)


def test_teacher_only_distillation_without_labels(digits):
    pruned = digits / "pruned_kd.onnx"
    driver.prune(str(digits / "teacher.onnx"), pruned, ratio=0.5, importance="l1", fast=True)
    res = finetune(pruned, None, data=digits / "unlabelled.npz", teacher=digits / "teacher.onnx", epochs=2,
                   lr=0.05, val=digits / "test.npz")
    assert res.report["loss"] == "kd"
    assert res.history[-1]["val_agreement"] > res.history[0]["val_agreement"]


def test_finetune_errors_are_one_line(digits, tmp_path):
    with pytest.raises(SpaError, match="labels in the training data or a teacher"):
        finetune(digits / "teacher.onnx", None, data=digits / "unlabelled.npz", epochs=1)
    np.savez(tmp_path / "bad.npz", input=np.zeros((4, 1, 8, 8), np.float32), labels=np.array([0, 1, 2, 12]))
    with pytest.raises(SpaError, match="out of range for 10 classes"):
        finetune(digits / "teacher.onnx", None, data=tmp_path / "bad.npz", epochs=1)
    with pytest.raises(SpaError, match="--epochs"):
        finetune(digits / "teacher.onnx", None, data=digits / "train.npz", epochs=-1)
    with pytest.raises(SpaError, match="--kd-alpha"):
        finetune(digits / "teacher.onnx", None, data=digits / "train.npz", kd_alpha=2.0)
    out = tmp_path / "never.onnx"
    proc = subprocess.run([str(SPA_PRUNE), "finetune", str(digits / "teacher.onnx"), str(out), "--data",
                           str(tmp_path / "missing.npz")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_finetune_cli(digits, tmp_path):
    out = tmp_path / "cli.onnx"
    proc = subprocess.run([str(SPA_PRUNE), "finetune", str(digits / "teacher.onnx"), str(out), "--data",
                           str(digits / "train.npz"), "--teacher", str(digits / "teacher.onnx"), "--epochs", "1",
                           "--val", str(digits / "test.npz"), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stderr and "checked in onnxruntime" in proc.stderr
    assert (tmp_path / "cli.curve.png").exists() and (tmp_path / "r.json").exists()


# ---- progressive -------------------------------------------------------------------------------------------------
def test_step_targets():
    assert step_targets(3, None, 0.125) == pytest.approx([0.5, 0.25, 0.125])
    r = step_targets(2, 0.75, None)
    assert r == pytest.approx([0.5, 0.5])


def test_progressive_reaches_the_budget_with_every_step_verified(digits):
    one = driver.prune(str(digits / "teacher.onnx"), digits / "oneshot.onnx", target_flops=0.5, importance="l1",
                       allocation="uniform", fast=True).report
    res = prune_progressive(str(digits / "teacher.onnx"), digits / "prog.onnx", steps=3, target_flops=0.5,
                            importance="l1", allocation="uniform", fast=True, finetune_data=digits / "train.npz",
                            finetune_epochs=1, finetune_options={"lr": 0.1, "batch_size": 32})
    rep = res.report
    assert rep["macs"]["before"] == one["macs"]["before"]
    assert rep["macs"]["after"] <= 0.5 * rep["macs"]["before"]
    steps = rep["progressive"]["per_step"]
    assert len(steps) == 3 and all(s["verification"] == "passed" for s in steps)
    assert steps[0]["macs_after"] > steps[1]["macs_after"] > steps[2]["macs_after"]
    assert [t["after_step"] for t in rep["progressive"]["finetune"]] == [1, 2]
    # fine-tuning between steps leaves the last step less to destroy than one shot
    assert accuracy(digits / "prog.onnx", digits / "test.npz") > accuracy(digits / "oneshot.onnx",
                                                                          digits / "test.npz") + 0.1
    with pytest.raises(SpaError, match="cannot be combined with --steps"):
        prune_progressive(str(digits / "teacher.onnx"), None, steps=2, target_flops=0.5, save_plan="p.json")


def test_progressive_cli_errors(digits, tmp_path):
    proc = subprocess.run([str(SPA_PRUNE), str(digits / "teacher.onnx"), str(tmp_path / "o.onnx"), "--ratio",
                           "0.5", "--finetune-data", str(digits / "train.npz")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--steps" in proc.stderr


def test_anytime_example_runs_every_route(tmp_path):
    """tools/example_anytime.py (the documented example) through the CLI, short: every route ends in a model
    onnxruntime runs, and fine-tuning with distillation improves on the l1-pruned model."""
    from tools.example_anytime import main as example
    res = example(["--workdir", str(tmp_path), "--epochs", "2"])
    assert len(res) == 5 and all(0.0 <= v <= 1.0 for v in res.values())
    assert res["unpruned, trained"] > 0.8
    assert res["after training, l1 + KD fine-tuning"] >= res["after training, l1, no fine-tuning"]
    assert res["before training (snip, then train)"] > 0.5


def test_bad_paths_fail_before_any_work(digits, tmp_path):
    """An unwritable curve path and a missing between-step data file are one-line errors up front."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpaError, match="not a directory"):
        finetune(digits / "teacher.onnx", None, data=digits / "train.npz", epochs=1, curve=blocker / "c.png")
    with pytest.raises(SpaError, match="not found"):
        prune_progressive(str(digits / "teacher.onnx"), None, steps=2, ratio=0.3,
                          finetune_data=tmp_path / "missing.npz")
