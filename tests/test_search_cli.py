"""The allocation search from the command line (issue 4, item 5): `spa-prune IN OUT --policy NAME ...` searches,
then prunes with the best plan through the driver's apply/verify path; the report gains a "search" section, the
summary a search line; PNGs are drawn; progress is one updating line on a terminal and a line per 10 % otherwise;
every bad combination is one line on stderr, exit 2, before any search (nothing written)."""
from __future__ import annotations

import functools
import inspect
import io
import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import labeled_noise_calib

pytest.importorskip("gymnasium")
models = pytest.importorskip("spa.models")

import spa.search
from spa.cli import command_parser, main
from spa.cli import prune as prune_cli
from spa.cli import search as search_cli
from spa.cli import summary as summary_cli
from spa.cli.search import SearchProgress
from spa.errors import SpaError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def resnet18():
    return str(models.zoo_path("resnet18", small=True))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return labeled_noise_calib(tmp_path_factory.mktemp("calib"))


def run(argv, capsys) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exits (--help)
        rc = e.code
    return rc, capsys.readouterr().err


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000, path


def kept_by_group(report) -> list[int]:
    return [row["kept"] for row in sorted(report["per_group"], key=lambda r: r["id"])]


# ---- end to end ---------------------------------------------------------------------------------------------------
def test_search_end_to_end(resnet18, calib_file, tmp_path, capsys):
    out, rep, curve, bars = (tmp_path / n for n in ("out.onnx", "rep.json", "plots/curve.png", "bars.png"))
    rc, err = run([resnet18, out, "--policy", "dist", "--target-flops", 0.5, "--calib", calib_file, "--evals", 6,
                   "--policy-option", "samples=3", "--policy-option", "variance=0.02", "--report", rep,
                   "--search-curve", curve, "--sparsity-plot", bars, "--seed", 3], capsys)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    s = report["search"]
    for key in ("policy", "budgets", "evaluations", "best_reward", "best_index", "history", "metrics", "costs",
                "kept", "units", "action_groups", "seed", "setup_s", "search_s", "curve", "sparsity_plot"):
        assert key in s, key
    assert s["policy"] == "dist" and s["budgets"] == {"flops": 0.5} and s["seed"] == 3
    assert s["evaluations"] == 6 and len(s["history"]) == 6
    assert [row[0] for row in s["history"]] == list(range(6))
    rewards, best = [r for _, r, _ in s["history"]], [b for _, _, b in s["history"]]
    assert best == list(np.maximum.accumulate(rewards)) and s["best_reward"] == max(rewards)
    assert s["history"][s["best_index"]][1] == s["best_reward"]
    assert s["policy_options"] == {"samples": 3, "variance": 0.02}
    # labels present; the default reconstructs, so candidates are scored after the fast refit, not re-calibrated
    assert s["metric"] == "accuracy" and s["refit"] == "fast" and s["recalibrate"] is False
    assert s["curve"] == str(curve) and s["sparsity_plot"] == str(bars) and s["feasible"] is True
    # the applied model is the searched plan, under the budget, verified, valid ONNX
    assert report["verification"]["status"] == "passed"
    assert kept_by_group(report) == s["kept"]
    assert report["macs"]["ratio"] <= 0.5
    assert report["macs"]["ratio"] == pytest.approx(s["costs"]["flops"], abs=1e-12)
    assert report["params"]["ratio"] == pytest.approx(s["costs"]["params"], abs=1e-12)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert_png(curve)
    assert_png(bars)
    # the summary's search line; not a tty: progress lines (6 evaluations -> one per evaluation)
    assert "search        dist: 6 evaluations" in err and "(accuracy)" in err
    assert [line for line in err.splitlines() if line.startswith("search dist  ")][-1].startswith(
        "search dist  6/6  best reward")


def test_target_params_without_policy_uses_global(resnet18, tmp_path, capsys):
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    rc, err = run([resnet18, out, "--target-params", 0.4, "--target-flops", 0.6, "--report", rep, "-q"], capsys)
    assert rc == 0 and err == "", err
    report = json.loads(rep.read_text())
    s = report["search"]
    assert s["policy"] == "global" and s["evaluations"] == 1 and s["budgets"] == {"flops": 0.6, "params": 0.4}
    assert s["metric"] == "kl" and s["recalibrate"] is False   # data-free: logits without labels
    assert report["params"]["ratio"] <= 0.4 and report["macs"]["ratio"] <= 0.6
    assert report["params"]["ratio"] == pytest.approx(s["costs"]["params"], abs=1e-12)


def test_metric_recalibration_and_constraints(resnet18, calib_file, tmp_path, capsys):
    """--metric alias, --no-search-recalibrate, --round-to/--min-channels reach the search and the driver."""
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    rc, err = run([resnet18, out, "--policy", "random", "--target-flops", 0.4, "--calib", calib_file,
                   "--calib-samples", 8, "--evals", 4, "--metric", "top1", "--no-search-recalibrate",
                   "--round-to", 4, "--min-channels", 4, "--exclude", "/layer1/*", "--report", rep, "-q"], capsys)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    s = report["search"]
    assert s["metric"] == "agreement" and s["recalibrate"] is False and len(s["history"]) == 4
    assert report["macs"]["ratio"] <= 0.4
    for g in s["action_groups"]:
        kept = s["kept"][g]
        assert kept >= 4 and (kept % 4 == 0 or kept == s["units"][g])


def test_rl_policy_with_options_and_threads(resnet18, tmp_path, capsys):
    """An RL agent through the CLI; true/false and ints parsed; --threads passed to the evaluator."""
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    rc, err = run([resnet18, out, "--policy", "ppo-gnn", "--target-flops", 0.5, "--evals", 4, "--threads", 1,
                   "--policy-option", "hidden=16", "--policy-option", "batch=2", "--policy-option", "epochs=1",
                   "--policy-option", "multi_stage=true", "--report", rep, "-q"], capsys)
    assert rc == 0, err
    s = json.loads(rep.read_text())["search"]
    assert s["policy"] == "ppo-gnn" and len(s["history"]) == 4
    assert s["policy_options"] == {"hidden": 16, "batch": 2, "epochs": 1, "multi_stage": True}


def test_obspa_reconstruction_path(resnet18, calib_file, tmp_path, capsys):
    """The searched plan goes through the driver's reconstruction path (--importance obspa refits by default)."""
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    rc, err = run([resnet18, out, "--policy", "uniform", "--target-flops", 0.5, "--importance", "obspa",
                   "--calib", calib_file, "--positions", 512, "--report", rep], capsys)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    assert [p["pass"] for p in report["reconstruction"]["passes"]] == ["obspa-refit"]
    assert report["search"]["policy"] == "uniform" and report["importance"]["criterion"] == "obspa"
    assert "search        uniform: 1 evaluation," in err and "reconstruct" in err
    # the reward anticipates the final reconstruction: a fast refit per candidate, no re-calibration on top
    assert report["search"]["refit"] == "fast" and report["search"]["recalibrate"] is False


def test_search_refit_choice_reaches_the_evaluator(resnet18, calib_file, tmp_path, capsys, monkeypatch):
    """--search-refit none/full map to CalibEvaluator's refit False/True; auto is fast when the written model is
    reconstructed (the default) and none without reconstruction (--fast)."""
    import spa.search as S
    seen = []
    real = S.search

    def spy(*a, **kw):
        seen.append(kw.get("reconstruct"))
        return real(*a, **kw)

    monkeypatch.setattr(S, "search", spy)
    for k, (flag, extra) in enumerate((("none", []), ("full", []), ("auto", []), ("auto", ["--fast"]))):
        out = tmp_path / f"{k}.onnx"
        rc, err = run([resnet18, out, "--policy", "uniform", "--target-flops", 0.5, "--calib", calib_file,
                       "--calib-samples", 8, "--search-refit", flag, "-q", *extra], capsys)
        assert rc == 0, err
    assert seen == [False, True, "fast", False]


def test_unreachable_budget_is_a_warning(resnet18, tmp_path, capsys):
    """As the driver's selection: prune as far as the constraints allow, but say so (report and summary)."""
    rep = tmp_path / "rep.json"
    rc, err = run([resnet18, tmp_path / "out.onnx", "--policy", "random", "--evals", 2, "--target-flops", 0.05,
                   "--min-channels", 8, "--report", rep], capsys)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    assert report["search"]["feasible"] is False
    assert any(w.startswith("the budget cannot be met") for w in report["warnings"])
    assert "warning       the budget cannot be met: the smallest model" in err
    assert report["macs"]["ratio"] > 0.05 and min(report["search"]["kept"][:-1]) == 8


# ---- progress -----------------------------------------------------------------------------------------------------
class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _feed(progress, n):
    best = -1.0
    for i in range(n):
        best = max(best, -1.0 / (i + 1))
        progress(i, -1.0 / (i + 1), best)
    progress.close()


def test_progress_not_a_tty_prints_every_tenth():
    stream = _Stream(tty=False)
    _feed(SearchProgress("random", 300, quiet=False, stream=stream), 300)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in stream.getvalue()
    assert lines[0].startswith("search random  30/300  best reward -0.03333  (")
    assert lines[-1].startswith("search random  300/300  best reward -0.00333")


def test_progress_tty_updates_one_line_and_quiet_is_silent():
    stream = _Stream(tty=True)
    _feed(SearchProgress("sac", 7, quiet=False, stream=stream), 7)
    text = stream.getvalue()
    assert text.count("\rsearch sac  ") == 7 and "\n" not in text   # 7 updates of one line
    assert text.endswith(" \r")   # cleared at the end: the summary's search line follows
    assert "search sac  7/7  best reward -0.14286" in text
    quiet = _Stream(tty=False)
    _feed(SearchProgress("sac", 7, quiet=True, stream=quiet), 7)
    assert quiet.getvalue() == ""


def test_progress_final_line_when_a_policy_stops_early():
    stream = _Stream(tty=False)
    _feed(SearchProgress("dist", 100, quiet=False, stream=stream), 25)
    assert stream.getvalue().splitlines()[-1].startswith("search dist  25/100")


# ---- bad input: one line, exit 2, before any search, nothing written -----------------------------------------------
BAD = [
    (["--policy", "dist", "--ratio", 0.5], "does not combine with --ratio"),
    (["--policy", "dist", "--target-flops", 0.5, "--steps", 2], "does not combine with --steps"),
    (["--policy", "dist"], "needs a budget"),
    (["--policy", "dist", "--target-flops", 1.5], "--target-flops must be in (0, 1]"),
    (["--policy", "dist", "--target-flops", 0.5, "--target-params", 0], "--target-params must be in (0, 1]"),
    (["--policy", "dist", "--target-flops", 0.5, "--evals", 0], "--evals must be at least 1"),
    (["--policy", "dist", "--target-flops", 0.5, "--round-to", 0], "--round-to must be at least 1"),
    (["--policy", "dist", "--target-flops", 0.5, "--search-curve", "{tmp}/curve.jpg"], "give FILE.png"),
    (["--policy", "dist", "--target-flops", 0.5, "--sparsity-plot", "{tmp}"], "is a directory"),
    (["--policy", "dist", "--target-flops", 0.5, "--report", "{tmp}"], "is a directory"),
    (["--policy", "dist", "--target-flops", 0.5, "--policy-option", "sample=3"], "has no option 'sample'"),
    (["--policy", "dist", "--target-flops", 0.5, "--policy-option", "samples=0"], "dist needs samples >= 1"),
    (["--policy", "dist", "--target-flops", 0.5, "--policy-option", "samples"], "expected KEY=VALUE"),
    (["--policy", "sac", "--target-flops", 0.5, "--policy-option", "batch=many"], "bad --policy-option for 'sac'"),
    (["--policy", "nope", "--target-flops", 0.5], "invalid choice: 'nope'"),
    (["--policy", "dist", "--target-flops", 0.5, "--metric", "nope"], "invalid choice: 'nope'"),
    (["--policy", "dist", "--target-flops", 0.5, "--allocation", "uniform"], "--policy global or uniform"),
    (["--policy", "dist", "--target-flops", 0.5, "--search-recalibrate"], "--search-recalibrate needs calibration"),
    (["--policy", "dist", "--target-flops", 0.5, "--metric", "accuracy"], "accuracy needs calibration"),
    (["--policy", "dist", "--target-flops", 0.5, "--recalibrate"], "--recalibrate needs calibration"),
    (["--policy", "dist", "--target-flops", 0.5, "--fold-constants", "--no-verify"], "drop --no-verify"),
    (["--policy", "dist", "--target-flops", 0.5, "--positions", 0], "--positions must be at least 1"),
    (["--target-params", 0.5, "--ratio", 0.5], "does not combine with --ratio"),
    (["--target-flops", 0.5, "--evals", 10], "--evals needs --policy"),
    (["--ratio", 0.5, "--search-curve", "c.png"], "--search-curve needs --policy"),
    (["--ratio", 0.5, "--metric", "kl"], "--metric needs --policy"),
    (["--ratio", 0.5, "--threads", 2], "--threads needs --policy"),
    (["--ratio", 0.5, "--search-refit", "fast"], "--search-refit needs --policy"),
    (["--policy", "dist", "--target-flops", 0.5, "--search-refit", "some"], "invalid choice: 'some'"),
]


@pytest.mark.parametrize("argv, fragment", BAD, ids=[" ".join(map(str, a)) for a, _ in BAD])
def test_bad_combinations_are_one_line(resnet18, tmp_path, capsys, argv, fragment):
    out = tmp_path / "out.onnx"
    t0 = time.perf_counter()
    rc, err = run([resnet18, out, *(str(a).replace("{tmp}", str(tmp_path)) for a in argv)], capsys)
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("spa-prune: error:"), err
    assert fragment in err, err
    assert not out.exists() and time.perf_counter() - t0 < 5.0   # refused before any search


def test_output_is_the_input(resnet18, tmp_path, capsys):
    copy = tmp_path / "in.onnx"
    copy.write_bytes(Path(resnet18).read_bytes())
    rc, err = run([copy, copy, "--policy", "dist", "--target-flops", 0.5], capsys)
    assert rc == 2 and "refusing to overwrite the input" in err and err.count("\n") == 1


LATENCY = ["--target-latency", 2.5, "--latency-table", "t.json", "--latency-batch", 4, "--threads", 2]


def test_latency_flags_reach_the_problem(resnet18, tmp_path, capsys, monkeypatch):
    """--target-latency/--latency-table/--latency-batch/--threads reach SearchProblem.build once search() takes
    them (the CLI builds the problem); until then they are a clear one-line error."""
    takes = inspect.signature(spa.search.search).parameters
    argv = [resnet18, tmp_path / "o.onnx", "--policy", "dist", "--target-flops", 0.5, *LATENCY]
    if "target_latency" not in takes:
        rc, err = run(argv, capsys)
        assert rc == 2 and "not available yet" in err and err.count("\n") == 1
        return
    seen = {}
    build = spa.search.SearchProblem.build

    @functools.wraps(build)   # keeps the signature the CLI inspects
    def spy(source, **kwargs):
        seen.update(kwargs)
        raise SpaError("stopped by the test")

    monkeypatch.setattr(spa.search.SearchProblem, "build", spy)
    rc, err = run(argv, capsys)
    assert rc == 2 and "stopped by the test" in err
    assert {k: seen[k] for k in ("target_latency", "latency_table", "latency_batch", "threads")} == \
        {"target_latency": 2.5, "latency_table": "t.json", "latency_batch": 4, "threads": 2}


def test_latency_summary_line():
    measured = {"budget_ms": 5.0, "measured_ms": 4.7123, "batch": 1, "threads": 2}
    assert summary_cli._latency_line(measured) == ("latency       4.712 ms measured (median) for a 5.000 ms budget, "
                                           "batch 1, 2 thread(s)")
    skipped = {"budget_ms": 5.0, "search_predicted_ms": 4.9, "batch": 8, "threads": 1, "fit": "skipped: elsewhere"}
    assert summary_cli._latency_line(skipped).endswith("4.900 ms predicted for a 5.000 ms budget, batch 8, 1 thread(s); "
                                               "skipped: elsewhere")


# ---- pieces -------------------------------------------------------------------------------------------------------
def test_option_values_are_typed():
    assert [prune_cli._option_value(t) for t in ("3", "-2", "0.5", "1e-3", "true", "False", "none", "logit")] == \
        [3, -2, 0.5, 1e-3, True, False, None, "logit"]
    assert prune_cli._policy_option("eval-mean=false") == ("eval_mean", False)


def test_metric_choices_match_the_evaluator():
    from spa.search.reward import METRICS

    assert search_cli.REWARD_METRICS == METRICS
    assert set(search_cli.METRIC_ALIASES.values()) <= set(METRICS)


def test_help_lists_every_policy(capsys):
    rc, _ = run(["--help"], capsys)
    # --help prints to stdout; read it again through the parser to get the text
    text = command_parser("prune").format_help()
    assert rc == 0
    for name in spa.search.POLICIES:
        assert any(line.strip().startswith(f"{name} ") for line in text.splitlines()), name
