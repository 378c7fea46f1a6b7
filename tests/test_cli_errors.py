"""The CLI's contract: bad input or a bad option exits 2 with ONE line on stderr starting with "spa-prune: error:",
nothing is written on failure, the output is replaced atomically (no temp file left), the input is never
overwritten; --report and `analyse` work; --no-verify never imports onnxruntime or torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import Builder, analyse, conv_net, make_model
from onnx import TensorProto, helper

from spa.cli import main

REPO = Path(__file__).resolve().parents[1]
SPA_PRUNE = Path(sys.executable).parent / "spa-prune"


@pytest.fixture
def model_file(tmp_path) -> Path:
    p = tmp_path / "in.onnx"
    onnx.save(conv_net(), str(p))
    return p


def cli(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse exits by itself
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments):
    assert rc == 2, (rc, err)
    assert err.count("\n") == 1 and err.endswith("\n"), f"expected one line on stderr, got:\n{err}"
    assert err.startswith("spa-prune: error:"), err
    for f in fragments:
        assert f in err, err


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- unreadable inputs ----------------------------------------------------------------------------------------------
def test_missing_file(tmp_path, capsys):
    rc, _, err = cli([tmp_path / "nope.onnx", tmp_path / "out.onnx", "--ratio", "0.5"], capsys)
    assert_one_line_error(rc, err, "not found")
    assert listing(tmp_path) == []


def test_empty_file(tmp_path, capsys):
    (tmp_path / "in.onnx").write_bytes(b"")
    rc, _, err = cli([tmp_path / "in.onnx", tmp_path / "out.onnx", "--ratio", "0.5"], capsys)
    assert_one_line_error(rc, err, "empty")
    assert listing(tmp_path) == ["in.onnx"]


def test_truncated_file(tmp_path, model_file, capsys):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    rc, _, err = cli([model_file, tmp_path / "out.onnx", "--ratio", "0.5"], capsys)
    assert_one_line_error(rc, err)
    assert listing(tmp_path) == ["in.onnx"]


def test_text_file(tmp_path, capsys):
    p = tmp_path / "in.onnx"
    p.write_text("this is not an ONNX model\nbut a text file\n")
    rc, _, err = cli([p, tmp_path / "out.onnx", "--ratio", "0.5"], capsys)
    assert_one_line_error(rc, err)
    assert listing(tmp_path) == ["in.onnx"]


def test_directory(tmp_path, capsys):
    d = tmp_path / "dir.onnx"
    d.mkdir()
    rc, _, err = cli([d, tmp_path / "out.onnx", "--ratio", "0.5"], capsys)
    assert_one_line_error(rc, err, "directory")
    assert listing(tmp_path) == ["dir.onnx"]


@pytest.mark.parametrize("spelling", ["same", "dot", "symlink"])
def test_output_equal_to_input_refused(tmp_path, model_file, capsys, spelling, monkeypatch):
    before = model_file.read_bytes()
    mtime = model_file.stat().st_mtime_ns
    if spelling == "same":
        out = model_file
    elif spelling == "dot":
        monkeypatch.chdir(tmp_path)
        out = Path(".") / "sub" / ".." / "in.onnx"
        (tmp_path / "sub").mkdir()
    else:
        out = tmp_path / "link.onnx"
        out.symlink_to(model_file)
    rc, _, err = cli([model_file, out, "--ratio", "0.5"], capsys)
    assert_one_line_error(rc, err)
    assert model_file.read_bytes() == before
    assert model_file.stat().st_mtime_ns == mtime
    assert not [n for n in listing(tmp_path) if "tmp" in n]


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
def test_unwritable_output(tmp_path, model_file, capsys, where):
    if where == "directory":
        out = tmp_path / "outdir"
        out.mkdir()
    else:
        out = model_file / "out.onnx"
    before = listing(tmp_path)
    rc, _, err = _cli_catching([model_file, out, "--ratio", "0.5", "-q"], capsys)
    assert listing(tmp_path) == before  # no temp file left either way
    assert_one_line_error(rc, err)


def _cli_catching(argv, capsys):
    """Like cli(), but an escaping exception counts as a failure of the contract, not of the test."""
    try:
        return cli(argv, capsys)
    except Exception as e:  # what the user would see: a traceback and exit status 1
        out, err = capsys.readouterr()
        return 1, out, err + f"Traceback ... {type(e).__name__}: {e}\n"


# ---- bad options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,fragment", [
    (["--ratio", "1.5"], "--ratio"),
    (["--ratio", "-1"], "--ratio"),
    (["--target-flops", "0"], "--target-flops"),
    (["--target-flops", "1.5"], "--target-flops"),
    ([], "--ratio"),
])
def test_bad_budget(tmp_path, model_file, capsys, opts, fragment):
    out = tmp_path / "out.onnx"
    rc, _, err = cli([model_file, out, *opts], capsys)
    assert_one_line_error(rc, err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("opts", [["--ratio", "0.5", "--target-flops", "0.5"], ["--ratio", "half"]])
def test_argparse_errors_one_line(tmp_path, model_file, capsys, opts):
    out = tmp_path / "out.onnx"
    rc, _, err = cli([model_file, out, *opts], capsys)
    assert not out.exists()
    assert_one_line_error(rc, err)


def test_both_budgets_exit_2_nothing_written(tmp_path, model_file, capsys):
    out = tmp_path / "out.onnx"
    rc, _, err = cli([model_file, out, "--ratio", "0.5", "--target-flops", "0.5"], capsys)
    assert rc == 2 and "spa-prune: error:" in err
    assert not out.exists()


@pytest.mark.parametrize("shape,fragment", [("y=1,3,8,8", "not a model input"), ("x=1,3,9,9", "does not match")])
def test_bad_input_shape(tmp_path, model_file, capsys, shape, fragment):
    out = tmp_path / "out.onnx"
    rc, _, err = cli([model_file, out, "--ratio", "0.5", "--input-shape", shape], capsys)
    assert_one_line_error(rc, err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("opts", [["--min-channels", "0"], ["--round-to", "0"], ["--round-to", "fast"],
                                  ["--round-to", "auto"], ["--importance", "l1"], ["--aggregation", "max"],
                                  ["--normalization", "none"]])
def test_other_options(tmp_path, model_file, capsys, opts):
    out = tmp_path / "out.onnx"
    rc, _, err = cli([model_file, out, "--ratio", "0.5", "-q", *opts], capsys)
    if opts[1] == "0":
        assert_one_line_error(rc, err, "--min-channels and --round-to")
        assert not out.exists()
    elif opts[1] == "fast":
        assert_one_line_error(rc, err, "--round-to", "expected a whole number or 'auto', got 'fast'")
        assert not out.exists()
    else:
        assert rc == 0, err
        assert out.exists()


def test_strict_accepts_a_plain_conv_net(tmp_path, model_file, capsys):
    rc, _, err = cli([model_file, tmp_path / "out.onnx", "--ratio", "0.5", "--strict", "-q"], capsys)
    assert rc == 0, err


def test_strict_rejects_a_frozen_operator(tmp_path, capsys):
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Softmax", [b.relu(b.conv("c1", x, 3, 8))], name="sm", axis=1)
    b.output(b.conv("c2", y, 8, 4))
    p = tmp_path / "in.onnx"
    onnx.save(b.model(), str(p))
    rc, _, err = cli([p, tmp_path / "out.onnx", "--ratio", "0.5", "--strict"], capsys)
    assert_one_line_error(rc, err, "--strict")
    assert not (tmp_path / "out.onnx").exists()


# ---- models that cannot be pruned -----------------------------------------------------------------------------------
def integer_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "k"], ["y"], name="add")]
    inits = [onnx.numpy_helper.from_array(np.arange(4, dtype=np.int64), "k")]
    return make_model(nodes, inits, [("x", [1, 4], TensorProto.INT64)], [("y", TensorProto.INT64)])


def relu_model() -> onnx.ModelProto:
    b = Builder()
    b.output(b.relu(b.input("x", [1, 3, 8, 8])))
    return b.model()


def gemm_model() -> onnx.ModelProto:
    b = Builder()
    b.output(b.gemm("g", b.input("x", [1, 16]), 16, 4))
    return b.model()


@pytest.mark.parametrize("build,fragment", [(integer_model, "floating-point"), (relu_model, "prun"),
                                            (gemm_model, "no prunable group")])
def test_nothing_to_prune(tmp_path, capsys, build, fragment):
    p = tmp_path / "in.onnx"
    onnx.save(build(), str(p))
    out = tmp_path / "out.onnx"
    rc, _, err = cli([p, out, "--ratio", "0.5"], capsys)
    assert_one_line_error(rc, err, fragment)
    assert not out.exists()


def test_gemm_model_groups_are_frozen():
    _, analysis = analyse(gemm_model())
    assert [(g.size, int(g.frozen.sum())) for g in analysis.groups] == [(4, 4)]


# ---- plans --------------------------------------------------------------------------------------------------------
def concat_net() -> onnx.ModelProto:
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    a, c = b.relu(b.conv("ca", x, 3, 1)), b.relu(b.conv("cb", x, 3, 7))
    b.output(b.conv("c3", b.op("Concat", [a, c], axis=1), 8, 4))
    return b.model()


@pytest.mark.parametrize("removed", [[0], list(range(8))])
def test_plan_that_empties_a_tensor_is_rejected(tmp_path, capsys, removed):
    p = tmp_path / "in.onnx"
    onnx.save(concat_net(), str(p))
    _, analysis = analyse(concat_net())
    g = analysis.groups[0]
    assert g.sources == ["ca", "cb"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "spa-prune-plan/1", "groups": [
        {"id": g.id, "name": g.name, "units": g.size, "removed": removed}]}))
    out = tmp_path / "out.onnx"
    rc, _, err = cli([p, out, "--plan", plan, "--no-verify", "--fast"], capsys)
    assert not out.exists()
    assert_one_line_error(rc, err, "plan")


def test_plan_round_trip(tmp_path, model_file, capsys):
    plan, out1, out2 = tmp_path / "plan.json", tmp_path / "a.onnx", tmp_path / "b.onnx"
    rc, _, err = cli([model_file, out1, "--ratio", "0.5", "--save-plan", plan, "-q"], capsys)
    assert rc == 0, err
    data = json.loads(plan.read_text())
    assert data["format"] == "spa-prune-plan/1" and data["groups"][0]["removed"]
    rc, _, err = cli([model_file, out2, "--plan", plan, "-q"], capsys)
    assert rc == 0, err
    assert out1.read_bytes() == out2.read_bytes()


def test_plan_for_another_model(tmp_path, model_file, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "spa-prune-plan/1", "groups": [
        {"id": 0, "name": "not-a-node", "units": 8, "removed": [0]}]}))
    rc, _, err = cli([model_file, tmp_path / "out.onnx", "--plan", plan], capsys)
    assert_one_line_error(rc, err, "plan")


@pytest.mark.parametrize("text", ["", "{not json", '{"format": "other"}'])
def test_bad_plan_file(tmp_path, model_file, capsys, text):
    plan = tmp_path / "plan.json"
    plan.write_text(text)
    rc, _, err = cli([model_file, tmp_path / "out.onnx", "--plan", plan], capsys)
    assert_one_line_error(rc, err, "plan")


# ---- success paths ------------------------------------------------------------------------------------------------
def test_existing_output_replaced_no_temp_left(tmp_path, model_file, capsys):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old content")
    rc, _, err = cli([model_file, out, "--ratio", "0.5", "-q"], capsys)
    assert rc == 0, err
    assert err == ""
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    shapes = {t.name: tuple(t.dims) for t in m.graph.initializer}
    assert shapes["c1.weight"] == (4, 3, 3, 3) and shapes["c2.weight"] == (4, 4, 3, 3)
    assert listing(tmp_path) == ["in.onnx", "out.onnx"]


def test_output_in_new_folder(tmp_path, model_file, capsys):
    out = tmp_path / "a" / "b" / "out.onnx"
    rc, _, err = cli([model_file, out, "--ratio", "0.5", "-q"], capsys)
    assert rc == 0, err
    assert listing(out.parent) == ["out.onnx"]


def test_summary_on_stderr(tmp_path, model_file, capsys):
    rc, out, err = cli([model_file, tmp_path / "out.onnx", "--ratio", "0.5"], capsys)
    assert rc == 0
    assert out == ""
    assert "verification  passed" in err and "MACs" in err


def test_report_json(tmp_path, model_file, capsys):
    report = tmp_path / "report.json"
    rc, _, err = cli([model_file, tmp_path / "out.onnx", "--ratio", "0.5", "--report", report, "-q"], capsys)
    assert rc == 0, err
    rep = json.loads(report.read_text())
    for key in ("macs", "params", "groups", "verification"):
        assert key in rep
    assert rep["verification"]["status"] == "passed"
    assert rep["macs"]["before"] == 8 * 3 * 9 * 64 + 4 * 8 * 9 * 64
    assert rep["macs"]["after"] == 4 * 3 * 9 * 64 + 4 * 4 * 9 * 64
    assert rep["groups"]["total"] == 2 and rep["groups"]["frozen"] == 1
    assert rep["params"]["after"] < rep["params"]["before"]


def test_analyse_lists_groups(model_file, capsys):
    rc, out, err = cli(["analyse", model_file], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("2 coupled groups")
    assert any(line.split()[-1] == "c1" and line.split()[1] == "8" for line in lines)
    assert "frozen (1 groups)" in out and "graph output" in out


def test_analyse_report(tmp_path, model_file, capsys):
    report = tmp_path / "an.json"
    rc, _, err = cli(["analyse", model_file, "--report", report], capsys)
    assert rc == 0, err
    rep = json.loads(report.read_text())
    assert [g["units"] for g in rep["groups"]] == [8, 4]


def test_analyse_missing_file(tmp_path, capsys):
    rc, _, err = cli(["analyse", tmp_path / "nope.onnx"], capsys)
    assert_one_line_error(rc, err, "not found")


# ---- the real executable -------------------------------------------------------------------------------------------
def test_executable_exit_codes(tmp_path, model_file):
    r = subprocess.run([str(SPA_PRUNE), str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx"), "--ratio", "0.5"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("spa-prune: error:")
    r = subprocess.run([str(SPA_PRUNE), str(model_file), str(tmp_path / "o.onnx"), "--ratio", "0.5", "-q"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.onnx").exists()


def test_no_verify_imports_neither_onnxruntime_nor_torch(tmp_path, model_file):
    code = ("import sys; from spa.cli import main; "
            f"rc = main([{str(model_file)!r}, {str(tmp_path / 'o.onnx')!r}, '--ratio', '0.5', '--no-verify', '--fast', '-q']); "
            "print(rc, 'onnxruntime' in sys.modules, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "False", "False"]
    assert (tmp_path / "o.onnx").exists()
