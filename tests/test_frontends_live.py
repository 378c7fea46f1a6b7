"""Live front-end tests (pytest -m frontends): export with each framework's own converter now, prune with
spa-prune, and check the result against the framework's own outputs. Each test skips cleanly where its framework
is not installed.

    pip install -e ".[test,tf]"    # Keras 3 + tf2onnx, scikit-learn + skl2onnx
    pip install -e ".[test,jax]"   # Flax + jax2onnx (one venv with both extras works too)
    pytest -q -m frontends tests/test_frontends_live.py

The models are built by the fixture scripts' own functions (tests/fixtures/make_*.py); Paddle runs where
paddlepaddle and paddle2onnx are importable (they pin other versions: usually their own venv).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from spa import driver

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

pytestmark = pytest.mark.frontends
TOL = 1e-4  # |onnxruntime - framework| <= TOL * max|framework output|


def run(model, feeds: dict) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    s = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    ref = np.asarray(ref)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= TOL * float(np.abs(ref).max()), f"{what}: max|diff| {err:.3g} vs scale {np.abs(ref).max():.3g}"


def prune_and_compare(path: Path, feeds: dict, reference: dict, tmp_path: Path, **kw) -> dict:
    """The exported file in onnxruntime equals the framework; ratio 0 equals the framework; ratio 0.5 and
    target_flops 0.5 pass verification and onnx.checker's full check, run, and cut MACs. Returns the reports."""
    for name, ref in reference.items():
        close(run(path, feeds)[name], ref, f"{path.name} as exported")
    reports = {}
    for label, opts in (("ratio 0", {"ratio": 0.0}), ("ratio 0.5", {"ratio": 0.5}),
                        ("target_flops 0.5", {"target_flops": 0.5})):
        out = tmp_path / f"{path.stem}-{label.replace(' ', '')}.onnx"
        rep = driver.prune(str(path), str(out), **opts, **kw).report
        assert rep["verification"]["status"] == "passed", label
        model = onnx.load(str(out))
        onnx.checker.check_model(model, full_check=True)
        got = run(model, feeds)
        if label == "ratio 0":
            assert rep["macs"]["after"] == rep["macs"]["before"]
            for name, ref in reference.items():
                close(got[name], ref, f"{path.name} pruned with ratio 0")
        else:
            assert rep["macs"]["after"] <= (0.5 if label.startswith("target") else 0.75) * rep["macs"]["before"]
            assert rep["params"]["after"] < rep["params"]["before"]
            assert not rep["unruled_ops"]
            for name, ref in reference.items():
                assert got[name].shape == np.asarray(ref).shape and np.isfinite(got[name]).all()
        reports[label] = rep
    return reports


def frozen_reasons(rep: dict) -> list[str]:
    return [r["where"] for f in rep["frozen"] for r in f["reasons"]]


# ---- Keras 3 + tf2onnx ---------------------------------------------------------------------------------------------
def test_keras_cnn(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    pytest.importorskip("sklearn")
    import make_keras
    from frontend_data import digits_split

    x_train, y_train, x_test, _ = digits_split()
    model = make_keras.train_cnn(x_train, y_train, epochs=2)  # accuracy is the fixture tests' business
    x = x_test[:64].reshape(-1, 8, 8, 1)
    proto, out_name = make_keras.export(model, (8, 8, 1))
    path = tmp_path / "keras_cnn.onnx"
    onnx.save(proto, str(path))
    reps = prune_and_compare(path, {"image": x}, {out_name: model.predict(x, verbose=0)}, tmp_path)
    rep = reps["ratio 0.5"]
    assert rep["groups"]["total"] == 4 and rep["groups"]["frozen"] == 1  # the logits only
    assert frozen_reasons(rep) == [f"graph output '{out_name}'"]


def test_keras_mobilenet_v2(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import make_keras

    model = make_keras.mobilenet_v2()
    proto, out_name = make_keras.export(model, (96, 96, 3))
    path = tmp_path / "mobilenet_v2.onnx"
    onnx.save(proto, str(path))
    x = np.random.default_rng(0).standard_normal((2, 96, 96, 3)).astype(np.float32)
    reps = prune_and_compare(path, {"image": x}, {out_name: model.predict(x, verbose=0)}, tmp_path)
    rep = reps["ratio 0.5"]
    # 17 inverted-residual blocks: every expansion and every residual stream is a group; only the logits freeze
    assert rep["groups"]["total"] == 26 and rep["groups"]["pruned"] == 25 and rep["groups"]["frozen"] == 1
    assert frozen_reasons(rep) == [f"graph output '{out_name}'"]


# ---- scikit-learn + skl2onnx ---------------------------------------------------------------------------------------
def test_sklearn_mlp(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    import make_sklearn

    from spa.calib import Calib

    clf, proto, (x_train, y_train, x_test, y_test) = make_sklearn.build()
    path = tmp_path / "sklearn_mlp.onnx"
    onnx.save(proto, str(path))
    feeds = {"input": x_test}
    reps = prune_and_compare(path, feeds, {"probabilities": clf.predict_proba(x_test)}, tmp_path)
    assert reps["ratio 0.5"]["groups"]["total"] == 3 and reps["ratio 0.5"]["groups"]["pruned"] == 2
    assert (run(path, feeds)["label"] == clf.predict(x_test)).all()
    # OBSPA with calibration data from the training split, given as a Calib object
    pytest.importorskip("torch")
    out = tmp_path / "obspa.onnx"
    rep = driver.prune(str(path), str(out), ratio=0.5, importance="obspa", calib=Calib({"input": x_train}, y_train))
    assert rep.report["verification"]["status"] == "passed"
    before = (clf.predict(x_test) == y_test).mean()
    after = (run(out, feeds)["label"] == y_test).mean()
    assert after >= before - 0.03, (before, after)


# ---- JAX / Flax + jax2onnx -----------------------------------------------------------------------------------------
def test_flax_cnn(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    pytest.importorskip("jax2onnx")
    pytest.importorskip("sklearn")
    import make_jax
    from frontend_data import digits_split

    x_train, y_train, x_test, _ = digits_split()
    model = make_jax.train(make_jax.make_cnn(), x_train[:256], y_train[:256], epochs=1)
    x = x_test[:64].reshape(-1, 8, 8, 1)
    path = tmp_path / "jax_cnn.onnx"
    onnx.save(make_jax.export(model), str(path))
    reps = prune_and_compare(path, {"image": x}, {"logits": np.asarray(model(x))}, tmp_path)
    rep = reps["ratio 0.5"]
    assert rep["groups"]["total"] == 4 and rep["groups"]["frozen"] == 1
    assert frozen_reasons(rep) == ["graph output 'logits'"]


# ---- PaddlePaddle + paddle2onnx -------------------------------------------------------------------------------------
def test_paddle_cnn(tmp_path):
    pytest.importorskip("paddle")
    pytest.importorskip("paddle2onnx")
    import make_paddle
    import paddle

    model = make_paddle.make_cnn()
    path = tmp_path / "paddle_cnn.onnx"
    path.write_bytes(make_paddle.export(model))
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    out_name = onnx.load(str(path)).graph.output[0].name
    reps = prune_and_compare(path, {"image": x}, {out_name: model(paddle.to_tensor(x)).numpy()}, tmp_path)
    rep = reps["ratio 0.5"]
    assert rep["groups"]["total"] == 4 and rep["groups"]["frozen"] == 1
    assert rep["normalize"]["lifted_constants"] > 0 and rep["normalize"]["identities_removed"] > 0
