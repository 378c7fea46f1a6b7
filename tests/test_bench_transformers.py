"""tools/bench_transformers.py end to end on tiny, barely trained transformers (seconds, no real training)."""
import argparse

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("onnxsim")
pytest.importorskip("torch_pruning")

from tools import bench_transformers as bt  # noqa: E402
from tools import train_transformers as tt  # noqa: E402

TINY = {"vit_digits": tt.VitConfig(dim=16, depth=1, heads=4, mlp_dim=32, epochs=1, batch=256),
        "char_lm": tt.LmConfig(dim=32, layers=1, heads=4, kv_heads=2, mlp_dim=64, context=16, steps=2, batch=4)}


def args(out, models, methods):
    return argparse.Namespace(models=models, seeds=[0], removed=[0.5], methods=methods, mac_tol=0.01,
                              eval_windows=32, resume=False, out=out, argv=["--test"])


@pytest.mark.parametrize("model", ["vit_digits", "char_lm"])
def test_rows_and_equal_macs(tmp_path, model):
    methods = ["spa-calib", "onnxsim-l2+ft", "tp-l2"]
    res = bt.bench(args(tmp_path / "out", [model], methods), configs=TINY, cache=tmp_path / "cache")
    rows = {r["method"]: r for r in res.rows.values()}
    assert set(rows) == {"unpruned", *methods}
    base = rows["unpruned"]
    assert base["macs"] - base["block_macs"] == bt.fixed_macs(model, TINY[model])
    ours = rows["spa-calib"]
    assert "error" not in ours, ours
    assert ours["block_removed"] == pytest.approx(0.5, abs=0.05)
    for method in ("onnxsim-l2+ft", "tp-l2"):  # a peer either fails with a reason or matches our MACs
        r = rows[method]
        if r.get("error"):
            assert r["error"].startswith("n/a (")
        else:
            assert abs(r["macs"] - ours["macs"]) <= 0.08 * ours["macs"], (method, r["macs"], ours["macs"])
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"### {model}" in md and "| spa-calib |" in md and "50 % removed" in md
    assert "python tools/bench_transformers.py --test" in md
