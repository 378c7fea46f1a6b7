"""Bookkeeping of tools/bench_default.py (no training, no pruning, no peers): MACs bisection and the tables."""
import json

import pytest

from tools import bench_default as bd
from tools import bench_quality as bq

FULL = 1_000_000


def stepped(p: float) -> int:
    """MACs that fall with the parameter in steps of 1/1024, like a channel count."""
    return int(FULL * (1 - int(p * 1024) / 1024))


@pytest.mark.parametrize("keep", [0.7, 0.5, 0.3])
def test_bisection_lands_within_tolerance(keep):
    m = bd.bisect_macs(stepped, keep * FULL, tol=0.01)
    assert m.param is not None and abs(m.macs - keep * FULL) <= 0.01 * keep * FULL
    assert m.macs == stepped(m.param)
    assert len(m.probes) < 16


def test_bisection_keeps_the_closest_probe_when_tolerance_is_unreachable():
    coarse = lambda p: FULL if p < 0.5 else FULL // 4  # noqa: E731 - two steps only
    m = bd.bisect_macs(coarse, 0.5 * FULL, tol=0.01, max_iter=8)
    assert m.macs == FULL // 4 and len(m.probes) == 8  # |0.25 - 0.5| < |1.0 - 0.5|


def test_bisection_treats_failures_as_over_pruned_and_reports_them():
    def fails_high(p):
        if p > 0.6:
            raise ValueError("layer emptied")
        return stepped(p)

    m = bd.bisect_macs(fails_high, 0.3 * FULL, tol=0.01)  # unreachable: best is just below the failure
    assert m.param <= 0.6 and m.error is None
    assert any(err and "layer emptied" in err for _, _, err in m.probes)
    none = bd.bisect_macs(lambda p: 1 / 0, 0.5 * FULL, max_iter=3)
    assert none.param is None and "ZeroDivisionError" in none.error


def rows():
    out = [{"model": "resnet20_digits", "seed": s, "method": "unpruned", "target": 1.0, "accuracy": 0.99,
            "macs_ratio": 1.0} for s in (0, 1, 2)]
    for s in (0, 1, 2):
        out.append({"model": "resnet20_digits", "seed": s, "method": "default-calib", "target": 0.5,
                    "accuracy": 0.10 + 0.01 * s, "macs_ratio": 0.496, "time_s": 3.0, "peak_rss_mb": 500.0,
                    "family": "ours"})
        out.append({"model": "resnet20_digits", "seed": s, "method": "uniform+obspa", "target": 0.5,
                    "accuracy": 0.99, "macs_ratio": 0.494, "time_s": 10.0, "family": "ours"})
        out.append({"model": "resnet20_digits", "seed": s, "method": "onnxsim-l2+ft", "target": 0.5,
                    "accuracy": 0.10, "macs_ratio": 0.5, "mac_error": 0.0001, "time_s": 1.0,
                    "search_time_s": 0.5, "family": "onnxsim"})
    out.append({"model": "resnet20_digits", "seed": 0, "method": "onnxsim-wanda+ft", "target": 0.5,
                "error": "n/a (ValueError: no chain)", "family": "onnxsim"})
    return out


def test_summary_and_markdown(tmp_path):
    res = bq.Results(tmp_path / "results.json", resume=False)
    res.runs.append({"command": "python tools/bench_default.py --quick", "date": "today", "versions": "v"})
    for r in rows():
        res.add(r)
    res.save()
    again = bq.Results(tmp_path / "results.json", resume=True)  # resumable: rows survive a reload
    assert again.done("resnet20_digits", 1, "uniform+obspa", 0.5)
    assert not again.done("resnet20_digits", 0, "onnxsim-wanda+ft", 0.5)  # errors are retried
    summ = bd.summarize(list(again.rows.values()))
    e = summ[("resnet20_digits", "default-calib", 0.5)]
    assert e["n"] == 3 and e["acc"] == pytest.approx(11.0) and e["std"] == pytest.approx(1.0)
    md = bd.markdown(again, 0.01)
    assert "python tools/bench_default.py --quick" in md
    assert "| default-calib | 11.00 ± 1.00 [0.496] | 3.00 | 500 |" in md
    assert "| onnxsim-l2+ft | 10.00 ± 0.00 [0.500] | 1.00 (0.5) | – |" in md
    assert "| onnxsim-wanda+ft | n/a [1] |" in md and "1. n/a (ValueError: no chain)" in md
    assert "MACs matching of onnxsim: 3/3 rows within 1 %" in md
    goals = md.split("accuracy goals")[1]
    assert "| resnet20_digits | default + 128 calib within 1 pt of unpruned at 50 % removed | 11.00 | 99.00 - 1 |" \
        " -87.00 | NO |" in goals
    assert "never > 0.3 pt below uniform+obspa, 128 calib (keep 0.5) | 11.00 | 99.00 - 0.3 | -87.70 | NO |" in goals
    json.loads((tmp_path / "results.json").read_text())


def test_cli_rows_are_what_a_user_types(tmp_path):
    s = type("S", (), {"onnx_path": tmp_path / "m.onnx", "calib_path": tmp_path / "calib.npz"})()
    argv = bd.cli_args("default-datafree", s, 0.5, tmp_path / "o.onnx", tmp_path / "r.json")
    assert argv[1:] == ["-m", "spa.cli", str(s.onnx_path), str(tmp_path / "o.onnx"), "--target-flops", "0.5",
                        "--report", str(tmp_path / "r.json")]
    argv = bd.cli_args("uniform+obspa", s, 0.3, tmp_path / "o.onnx", tmp_path / "r.json")
    assert argv[6:12] == ["0.3", "--importance", "obspa", "--allocation", "uniform", "--calib"]
    assert argv[12] == str(s.calib_path)
