"""Quality by default (issue 16): what the command a user types first does, --fast, and the fidelity guard.

The defaults: OBS scoring, the measured allocation (uniform, or banded where both were refit and banded measured
closer) and least-squares reconstruction, data-free without --calib;
every verified run reports its fidelity on inputs no pass fitted to; --max-drop guards it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from spa import driver
from spa.errors import SpaError
from spa.options import PruneOptions
from tests.helpers import Builder, assert_one_line_error, conv_net, run_cli

pytest.importorskip("torch")


def classifier() -> onnx.ModelProto:
    """conv -> relu -> conv -> relu -> global pool -> gemm: 10 logits from a 1x3x12x12 image (groups of 16 and
    32 units, whose costs per unit differ: at 0.2 of the MACs the banded plan is not the uniform one)."""
    b = Builder()
    x = b.input("x", [1, 3, 12, 12])
    y = b.relu(b.conv("c1", x, 3, 16))
    y = b.relu(b.conv("c2", y, 16, 32))
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    b.output(b.gemm("fc", y, 32, 10))
    return b.model()


@pytest.fixture
def files(tmp_path):
    cls, fm = tmp_path / "cls.onnx", tmp_path / "fm.onnx"
    onnx.save(classifier(), cls)
    onnx.save(conv_net(), fm)
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((64, 3, 12, 12)).astype(np.float32))
    return cls, fm, calib


# ---- the options ---------------------------------------------------------------------------------------------
def test_default_mode_is_obs_measured_allocation_with_reconstruction():
    o = PruneOptions(target_flops=0.5).validated()
    assert (o.importance, o.allocation, o.reconstruct) == ("obspa", "auto", True)


def test_fast_is_magnitude_without_reconstruction():
    o = PruneOptions(target_flops=0.5, fast=True).validated()
    assert (o.importance, o.allocation, o.reconstruct) == ("l2", "uniform", False)
    assert not o.value_passes


def test_explicit_choices_win_over_the_defaults():
    o = PruneOptions(target_flops=0.5, importance="l1", allocation="global", reconstruct=False).validated()
    assert (o.importance, o.allocation, o.reconstruct) == ("l1", "global", False)
    assert PruneOptions(ratio=0.5, fast=True, importance="l1").validated().importance == "l1"


def test_the_options_know_which_criteria_read_data():
    """spa.options sits below spa.importance (it cannot import CRITERIA): its list of the criteria that read
    data, which --fast refuses and which need torch, must be the table's."""
    from spa.importance import CRITERIA
    from spa.options import DATA_CRITERIA

    assert set(DATA_CRITERIA) == {name for name, c in CRITERIA.items() if c.needs != "weights"}


@pytest.mark.parametrize("kw, fragment", [
    ({"fast": True, "importance": "obspa"}, "--fast ranks by weights only"),
    ({"fast": True, "reconstruct": True}, "--fast skips reconstruction"),
    ({"verify": False}, "add --fast"),
    ({"max_drop": -1}, "--max-drop"),
    ({"max_drop": float("nan")}, "--max-drop"),
    ({"fast": True, "verify": False, "max_drop": 1}, "--max-drop measures fidelity after verification"),
])
def test_contradictions_are_one_line_errors(kw, fragment):
    with pytest.raises(SpaError, match=fragment.replace("-", r"\-")):
        PruneOptions(ratio=0.5, **kw).validated()


# ---- what a default run does ---------------------------------------------------------------------------------
def test_default_run_scores_with_obs_reconstructs_and_reports_held_out_fidelity(files, tmp_path):
    cls, _, _ = files
    rep = driver.prune(str(cls), str(tmp_path / "o.onnx"), target_flops=0.5).report
    assert rep["importance"]["criterion"] == "obspa"
    assert rep["importance"]["data"] == "data-free (synthesized inputs)"
    assert [p["pass"] for p in rep["reconstruction"]["passes"]] == ["obspa-refit"]
    fid = rep["fidelity"]
    assert fid["on"] == "16 held-out synthesized samples (data-free)"
    assert fid["metric"] == "top-1 predictions changed"
    assert 0.0 <= fid["drop_pct"] <= 100.0
    assert fid["drop_pct"] == pytest.approx(100 * (1 - fid["outputs"][next(iter(fid["outputs"]))]["top1"]))
    assert rep["macs"]["ratio"] <= 0.5


def test_calibration_samples_are_split_into_fit_and_held_out(files, tmp_path):
    cls, _, calib = files
    rep = driver.prune(str(cls), str(tmp_path / "o.onnx"), target_flops=0.5, calib=str(calib)).report
    assert rep["importance"]["data"] == "calibration (56 samples)"   # 64 - 64 // 8
    assert rep["fidelity"]["on"] == "8 held-out calibration samples"
    assert rep["reconstruction"]["fidelity_on"] == "8 held-out calibration samples"


def test_default_reconstruction_beats_fast_on_the_same_cut(files, tmp_path):
    cls, _, calib = files
    default = driver.prune(str(cls), None, target_flops=0.5, calib=str(calib)).report
    fast = driver.prune(str(cls), None, target_flops=0.5, calib=str(calib), fast=True).report
    assert fast["importance"]["criterion"] == "l2" and fast["reconstruction"] is None
    err = {name: r["fidelity"]["outputs"]["fc_out"]["rel_l2"] for name, r in (("default", default), ("fast", fast))}
    assert err["default"] < 0.5 * err["fast"], err


def test_non_classifier_fidelity_is_relative_l2(files, tmp_path):
    _, fm, _ = files
    rep = driver.prune(str(fm), str(tmp_path / "o.onnx"), ratio=0.5).report
    assert rep["fidelity"]["metric"] == "relative L2 error of the outputs"
    (out,) = rep["fidelity"]["outputs"].values()
    assert rep["fidelity"]["drop_pct"] == pytest.approx(100 * out["rel_l2"], abs=1e-3)


# ---- the measured allocation (--allocation auto, the default) --------------------------------------------------
def kept(report) -> list[int]:
    return [g["kept"] for g in report["per_group"]]


def test_auto_at_a_mild_cut_is_the_uniform_plan_itself(files, tmp_path):
    cls, _, _ = files
    auto = driver.prune(str(cls), str(tmp_path / "a.onnx"), target_flops=0.5).report
    uniform = driver.prune(str(cls), str(tmp_path / "u.onnx"), target_flops=0.5, allocation="uniform").report
    assert auto["allocation"] == {"requested": "auto", "chosen": "uniform",
                                  "why": "the banded plan is the uniform one at this cut"}
    assert uniform["allocation"] == {"requested": "uniform", "chosen": "uniform"}
    assert "allocation check" not in auto["timings_s"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "u.onnx").read_bytes()


def test_auto_refits_both_plans_at_a_deep_cut_and_keeps_the_closer(files, tmp_path):
    cls, _, calib = files
    rep = driver.prune(str(cls), str(tmp_path / "a.onnx"), target_flops=0.2, calib=str(calib)).report
    alloc = rep["allocation"]
    errors = {name: c["error"] for name, c in alloc["candidates"].items()}
    assert set(errors) == {"uniform", "banded"} and alloc["metric"] == "KL divergence of the class probabilities"
    assert alloc["on"] == rep["fidelity"]["on"] == "8 held-out calibration samples"
    closer = "banded" if errors["banded"] < errors["uniform"] else "uniform"
    assert alloc["chosen"] == closer
    assert rep["fidelity"]["outputs"]["fc_out"]["kl"] == pytest.approx(errors[closer])
    assert rep["verification"]["status"] == "passed" and "allocation check" in rep["timings_s"]
    plans = {name: kept(driver.prune(str(cls), None, target_flops=0.2, calib=str(calib), allocation=name).report)
             for name in errors}
    assert plans["uniform"] != plans["banded"]
    assert kept(rep) == plans[closer]
    onnx.checker.check_model(onnx.load(tmp_path / "a.onnx"), full_check=True)


def test_auto_without_held_out_samples_keeps_uniform(files, tmp_path):
    cls, _, _ = files
    few = tmp_path / "few.npz"   # 16 samples: too few to hold some out, fidelity falls back to random inputs
    np.savez(few, x=np.random.default_rng(1).standard_normal((16, 3, 12, 12)).astype(np.float32))
    rep = driver.prune(str(cls), None, target_flops=0.2, calib=str(few)).report
    assert rep["allocation"] == {"requested": "auto", "chosen": "uniform", "why": "no held-out samples to compare "
                                 "plans on (--calib with fewer than 32 samples)"}
    assert kept(rep) == kept(driver.prune(str(cls), None, target_flops=0.2, calib=str(few),
                                          allocation="uniform").report)


@pytest.mark.parametrize("prefer", ["uniform", "banded"])
def test_auto_writes_the_candidate_that_measures_closer(files, tmp_path, monkeypatch, prefer):
    cls, _, _ = files
    calls = []

    def rigged(outputs):   # the first call measures the uniform candidate, the second the banded one
        calls.append(outputs)
        return (0.0 if (len(calls) == 1) == (prefer == "uniform") else 1.0), "rigged"

    monkeypatch.setattr(driver, "selection_error", rigged)
    out = tmp_path / "o.onnx"
    rep = driver.prune(str(cls), str(out), target_flops=0.2).report
    assert rep["allocation"]["chosen"] == prefer and len(calls) == 2
    assert kept(rep) == kept(driver.prune(str(cls), None, target_flops=0.2, allocation=prefer).report)
    assert rep["verification"]["status"] == "passed" and rep["macs"]["ratio"] <= 0.2
    written = {t.name: tuple(t.dims) for t in onnx.load(out).graph.initializer}
    alone = tmp_path / "alone.onnx"
    driver.prune(str(cls), str(alone), target_flops=0.2, allocation=prefer)
    assert written == {t.name: tuple(t.dims) for t in onnx.load(alone).graph.initializer}


@pytest.mark.parametrize("fails", [("uniform",), ("banded",), ("uniform", "banded")])
def test_auto_under_the_guard_takes_the_candidate_within_it(files, tmp_path, monkeypatch, fails):
    """--max-drop with two candidates at the requested cut: one outside the guard, the other is written; both
    outside: the guard tries a smaller cut (where the band closes: one plan)."""
    from spa import pipeline

    cls, _, _ = files
    calls = []
    real = pipeline.fidelity_drop

    def rigged(outputs):   # the first two measurements are the two candidates at the requested cut
        calls.append(outputs)
        drop, metric = real(outputs)
        if len(calls) <= 2 and ("uniform", "banded")[len(calls) - 1] in fails:
            return 50.0, metric
        return 0.0, metric

    monkeypatch.setattr(pipeline, "fidelity_drop", rigged)
    rep = driver.prune(str(cls), str(tmp_path / "o.onnx"), target_flops=0.2, max_drop=10).report
    guard = rep["fidelity"]["guard"]
    if len(fails) == 1:
        kept_plan = "banded" if fails == ("uniform",) else "uniform"
        assert guard["met_at_requested_budget"] and rep["allocation"]["chosen"] == kept_plan
        assert rep["allocation"]["candidates"][fails[0]]["within_guard"] is False
        assert "within_guard" not in rep["allocation"]["candidates"][kept_plan]
    else:
        assert not guard["met_at_requested_budget"] and guard["tried"][0]["drop_pct"] == 50.0
        assert rep["macs"]["ratio"] > 0.2 and (tmp_path / "o.onnx").exists()


def test_auto_under_the_guard_reports_both(files, tmp_path):
    cls, _, _ = files
    rep = driver.prune(str(cls), str(tmp_path / "o.onnx"), target_flops=0.2, max_drop=100).report
    assert rep["fidelity"]["guard"]["met_at_requested_budget"]
    assert set(rep["allocation"]["candidates"]) == {"uniform", "banded"}


# ---- the fidelity guard --------------------------------------------------------------------------------------
def test_guard_met_is_reported(files, tmp_path, capsys):
    cls, _, _ = files
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    rc, _, err = run_cli([cls, out, "--target-flops", "0.5", "--max-drop", "100", "--report", report], capsys)
    assert rc == 0, err
    guard = json.loads(report.read_text())["fidelity"]["guard"]
    assert guard["met_at_requested_budget"] and len(guard["tried"]) == 1
    assert "--max-drop 100 %: the requested budget is within the guard" in err
    # data-free: the summary says the held-out synthesized samples only estimate it; with data it does not
    assert "without data this is only an estimate: --calib measures it on your inputs" in err
    _, _, calib = files
    rc, _, err = run_cli([cls, tmp_path / "c.onnx", "--target-flops", "0.5", "--calib", calib], capsys)
    assert rc == 0 and "fidelity " in err and "only an estimate" not in err, err


def test_guard_that_no_cut_meets_exits_1_and_writes_nothing(files, tmp_path, capsys):
    _, fm, _ = files   # a feature-map output: the relative L2 error of any cut is > 0
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    rc, _, err = run_cli([fm, out, "--ratio", "0.9", "--max-drop", "0", "--report", report], capsys)
    assert rc == 1, err
    assert err.count("\n") == 1 and err.startswith("spa-prune: fidelity guard: --max-drop 0: even the smallest cut")
    assert not out.exists() and not report.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_guard_backs_off_to_a_smaller_cut_within_it(files, tmp_path):
    _, fm, _ = files
    full = driver.prune(str(fm), None, target_flops=0.3).report["fidelity"]["drop_pct"]
    assert full > 0
    rep = driver.prune(str(fm), str(tmp_path / "o.onnx"), target_flops=0.3, max_drop=full / 2).report
    guard = rep["fidelity"]["guard"]
    assert not guard["met_at_requested_budget"] and guard["tried"][0]["drop_pct"] == pytest.approx(full)
    chosen = max((t for t in guard["tried"] if t["met"]), key=lambda t: t["share_of_cut"])
    assert rep["fidelity"]["drop_pct"] <= full / 2
    assert rep["macs"]["ratio"] > 0.3 and chosen["target_flops"] > 0.3
    assert "pruned less than asked" in guard["outcome"]
    assert (tmp_path / "o.onnx").exists()


def test_fast_and_max_drop_without_torch_ask_for_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SpaError, match=r"needs torch: pip install 'spa-prune\[criteria\]' \(or add --fast"):
        PruneOptions(ratio=0.5).validated()
    assert PruneOptions(ratio=0.5, fast=True).validated().importance == "l2"


def test_nan_weights_are_one_line_in_the_default_mode(tmp_path, capsys):
    m = conv_net()
    for t in m.graph.initializer:
        if t.name == "c1.weight":
            w = onnx.numpy_helper.to_array(t).copy()
            w[0, 0, 0, 0] = np.nan
            t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    p = tmp_path / "nan.onnx"
    onnx.save(m, p)
    rc, _, err = run_cli([p, tmp_path / "o.onnx", "--ratio", "0.5"], capsys)
    assert_one_line_error(rc, err, "c1.weight", "NaN/inf", "--fast")



def test_reconstruction_fidelity_with_fewer_samples_than_a_batch(tmp_path):
    """10 calibration samples on a model with a free batch dim: too few to hold any out, and fewer than one batch
    of 64; the refit's before/after fidelity is still measured on them (a short batch), not left empty."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from spa import driver

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    src, calib = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    np.savez(calib, x=rng.standard_normal((10, 6)).astype(np.float32))
    rep = driver.prune(str(src), str(tmp_path / "out.onnx"), target_flops=0.6, calib=str(calib)).report
    rec = rep["reconstruction"]
    assert rec["fidelity_on"] == "calibration data" and rec["fidelity_before"] and rec["fidelity_after"]
    assert rep["fidelity"]["on"].startswith("random inputs (10 calibration samples are too few to hold some out")
