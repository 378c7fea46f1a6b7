"""The driver's pass pipeline and its options: the order is checked before any work, rewriting passes drop
cached analyses, every option's domain is checked once with the same message for the CLI and the Python API,
and the report is assembled from the passes' results."""
from __future__ import annotations

import itertools

import onnx
import pytest
from helpers import conv_net

from spa import driver
from spa.cli import main
from spa.errors import SpaError
from spa.options import PruneOptions
from spa.passes import Pass, PassManager, PassResult


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "in.onnx"
    onnx.save(conv_net(), str(p))
    return p


class Target:
    def __init__(self):
        self.analyses = {"analyse": "stale"}
        self.log = []


def make_pass(name, requires=(), provides=(), rewrites=False):
    class P(Pass):
        def run(self, target):
            target.log.append((self.name, dict(target.analyses)))
            return PassResult(modified=rewrites)
    P.name, P.requires, P.provides, P.rewrites = name, requires, provides, rewrites
    return P()


def test_a_pass_that_needs_what_no_earlier_pass_provides_fails_before_any_work():
    target = Target()
    manager = PassManager([make_pass("a"), make_pass("b", requires=("plan",)), make_pass("c", provides=("plan",))])
    with pytest.raises(RuntimeError, match="pass 'b' requires \\['plan'\\]"):
        manager.run(target)
    assert target.log == []  # nothing ran


def test_the_manager_drops_cached_analyses_after_a_rewriting_pass_and_times_every_pass():
    target = Target()
    manager = PassManager([make_pass("reader"), make_pass("rewriter", rewrites=True), make_pass("after")])
    manager.run(target)
    assert [seen for _, seen in target.log] == [{"analyse": "stale"}, {"analyse": "stale"}, {}]
    assert set(manager.timings) == {"reader", "rewriter", "after"}


@pytest.mark.parametrize("verify,fold,reconstruct", list(itertools.product([True, False], repeat=3)))
def test_every_pipeline_the_driver_builds_is_in_a_valid_order(verify, fold, reconstruct):
    options = PruneOptions(ratio=0.5, verify=verify, fold_constants=fold, reconstruct=reconstruct)
    passes = driver.passes_for(options)
    PassManager(passes).check_order()
    names = [p.name for p in passes]
    assert names[:4] == ["load+normalize", "analyse", "score+select", "apply"] and names[-1] == "save"
    assert ("verify" in names) == verify and ("compensate" in names) == fold
    assert ("reconstruct" in names) == reconstruct


@pytest.mark.parametrize("flags,keywords,message", [
    (["--rtol", "-1"], {"rtol": -1.0}, "--rtol must be a finite number > 0"),
    (["--rtol", "nan"], {"rtol": float("nan")}, "--rtol must be a finite number > 0"),
    (["--rtol", "0"], {"rtol": 0.0}, "--rtol must be a finite number > 0"),
    (["--seed", "-1"], {"seed": -1}, "--seed must be at least 0"),
    (["--seed", str(2**64)], {"seed": 2**64}, "--seed must be a whole number in [0, 4294967295]"),
    (["--damp", "inf"], {"damp": float("inf")}, "--damp must be >= 0"),
    (["--round-to", str(10**30)], {"round_to": 10**30}, "--round-to must be a whole number in [1, 2147483647]"),
    (["--positions", "0"], {"positions": 0}, "--positions must be at least 1"),
    (["--synth-samples", "0"], {"samples": 0}, "--synth-samples must be at least 1"),
    (["--max-ratio", "nan"], {"max_ratio": float("nan")}, "--max-ratio must be in (0, 1]"),
    (["--recalibrate"], {"recalibrate": True}, "--recalibrate needs calibration data"),
    (["--importance", "obspa", "--no-verify"], {"importance": "obspa", "verify": False},
     "reconstruction and compensation need verification"),
])
def test_options_are_checked_once_with_the_same_message_for_cli_and_api(model_file, tmp_path, capsys, flags,
                                                                          keywords, message):
    out = tmp_path / "out.onnx"
    rc = main([str(model_file), str(out), "--ratio", "0.5", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    with pytest.raises(SpaError) as api:
        driver.prune(str(model_file), str(out), ratio=0.5, **keywords)
    assert message in str(api.value)
    assert not out.exists()


def test_an_unknown_keyword_is_a_type_error_as_for_any_function(model_file):
    with pytest.raises(TypeError, match="unexpected keyword argument 'ratoi'"):
        driver.prune(str(model_file), None, ratoi=0.5)


def test_options_object_and_keywords_give_the_same_model_and_report(model_file):
    by_keywords = driver.prune(str(model_file), None, ratio=0.5, importance="l1", fast=True)
    by_object = driver.prune(str(model_file), None, PruneOptions(ratio=0.5, importance="l1", fast=True))
    assert by_keywords.model.graph.to_model().SerializeToString() == \
        by_object.model.graph.to_model().SerializeToString()
    a, b = by_keywords.report, by_object.report
    a.pop("timings_s"), b.pop("timings_s")
    assert a == b


def test_the_report_is_assembled_from_every_pass(model_file):
    report = driver.prune(str(model_file), None, ratio=0.5, fast=True).report
    assert set(report["timings_s"]) == {"load+normalize", "analyse", "score+select", "apply", "verify", "fidelity",
                                        "save", "total"}
    assert report["verification"]["status"] == "passed"
    assert report["macs"]["after"] < report["macs"]["before"]
    assert report["groups"]["total"] == len(report["per_group"])
    assert report["compensation"] is None and report["reconstruction"] is None
    skipped = driver.prune(str(model_file), None, ratio=0.5, verify=False, fast=True).report
    assert skipped["verification"] == {"status": "skipped (--no-verify)"} and "verify" not in skipped["timings_s"]
    assert skipped["fidelity"] is None
    default = driver.prune(str(model_file), None, ratio=0.5).report
    assert set(default["timings_s"]) == set(report["timings_s"]) | {"reconstruct"}


def test_staged_outputs_are_written_together_or_not_at_all(tmp_path):
    from spa.fileio import StagedOutputs

    a, b = tmp_path / "a.json", tmp_path / "sub" / "b.onnx"
    with pytest.raises(RuntimeError):
        with StagedOutputs() as outputs:
            outputs.stage(a, lambda f: f.write("{}"), binary=False)
            outputs.stage(b, lambda f: f.write(b"x"))
            raise RuntimeError("a later pass failed")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []   # no target, no temp file
    with StagedOutputs() as outputs:
        outputs.stage(a, lambda f: f.write("{}"), binary=False)
        outputs.stage(b, lambda f: f.write(b"x"))
        assert not a.exists() and not b.exists()   # staged, not yet committed
        outputs.commit()
    assert a.read_text() == "{}" and b.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.json", "b.onnx"]


def test_a_run_that_fails_after_staging_writes_none_of_its_outputs(model_file, tmp_path, capsys, monkeypatch):
    """The model and the plan are staged before the report; a failure in between leaves none of the three."""
    from spa.cli import common

    def failing_report(report, path):
        raise SpaError("cannot write the report")
    monkeypatch.setattr(common.StagedOutputs, "commit", lambda self: failing_report(None, None))
    out, plan, report = tmp_path / "out.onnx", tmp_path / "plan.json", tmp_path / "r.json"
    rc = main([str(model_file), str(out), "--ratio", "0.5", "--save-plan", str(plan), "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot write the report" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]   # no OUT, no plan, no temp file


def test_the_memory_limit_bounds_analysed_tensors_and_can_be_raised(tmp_path):
    from spa.loading import load
    from spa.validate import MAX_ANALYSIS_ELEMENTS, analysis_elements

    proto = conv_net()
    for vi in (proto.graph.input[0], proto.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"   # a dynamic batch --input-shape may fix
    model_file = tmp_path / "dynamic.onnx"
    onnx.save(proto, str(model_file))
    assert analysis_elements(4.0) == 1_000_000_000 and MAX_ANALYSIS_ELEMENTS == analysis_elements(1.2)
    big = {"x": (1_000_000, 3, 8, 8)}   # the largest tensor (c1 out, 8 channels): 512 M elements: 2 GB < 4 GB
    with pytest.raises(SpaError, match="raise it with --memory-limit"):
        load(str(model_file), big, memory_limit_gb=2.0)
    assert load(str(model_file), big, memory_limit_gb=4.0).input_shapes["x"] == (1_000_000, 3, 8, 8)
    with pytest.raises(SpaError, match="--memory-limit must be a finite number > 0"):
        PruneOptions(ratio=0.5, memory_limit_gb=float("nan")).validated()


def test_calibration_data_that_nothing_uses_is_reported_not_silently_ignored(model_file, tmp_path):
    import numpy as np

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    unused = driver.prune(str(model_file), None, ratio=0.5, calib=str(calib), fast=True).report["warnings"]
    assert any(w.startswith("--calib is not used for pruning: --importance l2") for w in unused), unused
    used = driver.prune(str(model_file), None, ratio=0.5, calib=str(calib), recalibrate=True,
                        importance="l2").report["warnings"]
    assert not any(w.startswith("--calib is not used") for w in used), used
