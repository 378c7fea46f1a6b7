"""Pattern (kernel-shape) pruning: the library, the per-kernel choice, the masked model against an independently
masked reference, the refit restricted to the kept positions, compact storage and the CLI."""
from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import Builder
from onnx import numpy_helper

from spa import driver, patterns
from spa.calib import Calib
from spa.cli import main
from spa.errors import SpaError


def connected(cells: set, width: int) -> bool:
    seen, todo = set(), [next(iter(cells))]
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        r, q = divmod(c, width)
        todo += [n for n in (c - width, c + width, c - 1 if q else -1, c + 1 if q < width - 1 else -1) if n in cells]
    return seen == cells


@pytest.mark.parametrize("kernel,k,size", [((3, 3), 1, 1), ((3, 3), 2, 4), ((3, 3), 3, 14), ((3, 3), 4, 28),
                                           ((3, 3), 5, 41), ((3, 3), 6, 40), ((3, 3), 9, 1), ((5,), 4, 2),
                                           ((3,), 2, 2), ((5, 5), 4, 72)])
def test_library_is_every_connected_k_subset_through_the_centre(kernel, k, size):
    lib = patterns.library(kernel, k)
    grid = kernel if len(kernel) == 2 else (1, kernel[0])
    n, centre = grid[0] * grid[1], (grid[0] // 2) * grid[1] + grid[1] // 2
    brute = {s for s in itertools.combinations(range(n), min(k, n))
             if centre in s and connected(set(s), grid[1])}
    assert lib.size == size == len(brute)
    assert {tuple(np.flatnonzero(m)) for m in lib.masks} == brute


def brute_choice(w: np.ndarray, lib) -> np.ndarray:
    """Per kernel, the library index keeping the most energy (first on ties), by a plain loop."""
    o, c = w.shape[:2]
    out = np.zeros((o, c), int)
    for i in range(o):
        for j in range(c):
            energy = [float((w[i, j].reshape(-1) ** 2)[m].sum()) for m in lib.masks]
            out[i, j] = int(np.argmax(energy))
    return out


def test_choice_by_magnitude_obs_with_identity_and_connectivity():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, 3, 3))
    lib = patterns.library((3, 3), 4)
    ids = patterns.choose(w, lib)
    assert (ids == brute_choice(w, lib)).all()
    # OBS error with H = I is half the energy zeroed: the same choice
    assert (patterns.choose(w, lib, hinv=np.repeat(np.eye(9)[None], 3, 0)) == ids).all()
    # a Hessian that makes position 0 costly to zero keeps it in every kernel
    h = np.repeat(np.eye(9)[None], 3, 0)
    h[:, 0, 0] = 1e-4                                   # H⁻¹ small at 0: zeroing it costs w0² / 1e-4
    kept0 = patterns.mask_of(patterns.choose(w, lib, hinv=h), lib, w.shape).reshape(5, 3, 9)[:, :, 0]
    assert kept0.all()
    # connectivity: exactly floor(F x kernels) emptied, the ones whose best pattern keeps the least
    empty = patterns.choose(w, lib, connectivity=0.4)
    assert (empty == -1).sum() == 6
    kept = np.array([[(w[i, j].reshape(-1) ** 2)[lib.masks[ids[i, j]]].sum() for j in range(3)] for i in range(5)])
    assert kept[empty == -1].max() <= kept[empty != -1].min()
    # a restricted allowed set is obeyed
    assert set(patterns.choose(w, lib, allowed=[3, 7]).ravel()) <= {3, 7}


def pattern_net():
    """3x3 conv (bias), depthwise 3x3, 1x1 conv (left dense), 5x5 conv: what patterns touch and what not."""
    b = Builder()
    x = b.input("x", [1, 3, 10, 10])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.relu(b.conv("dw", y, 8, 8, group=8))
    y = b.relu(b.conv("pw", y, 8, 8, k=1))
    y = b.relu(b.conv("c5", y, 8, 6, k=5))
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    b.output(b.gemm("fc", y, 6, 4, trans_b=1))
    return b.model()


def calib(model, n=96, seed=0):
    rng = np.random.default_rng(seed)
    return Calib({"x": rng.standard_normal((n, 3, 10, 10)).astype(np.float32)}, None, "test")


def weights(path_or_model) -> dict:
    m = onnx.load(path_or_model) if isinstance(path_or_model, str) else path_or_model
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def ort_run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def test_masked_model_equals_the_independently_masked_reference(tmp_path):
    model = pattern_net()
    out = tmp_path / "p.onnx"
    rep = driver.prune(model, str(out), patterns=4, fast=True).report
    orig, pruned = weights(model), weights(str(out))
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for name, k in (("c1.weight", (3, 3)), ("dw.weight", (3, 3)), ("c5.weight", (5, 5))):
        lib = patterns.library(k, 4)
        ids = brute_choice(orig[name], lib)
        mask = lib.masks[ids].reshape(orig[name].shape)
        assert (pruned[name] == np.where(mask, orig[name], 0)).all()
        assert (np.count_nonzero(pruned[name].reshape(*ids.shape, -1), axis=2) == 4).all()
        t = next(t for t in reference.graph.initializer if t.name == name)
        t.CopyFrom(numpy_helper.from_array(np.where(mask, orig[name], 0).astype(np.float32), name))
    assert (pruned["pw.weight"] == orig["pw.weight"]).all()               # 1x1: nothing to pattern
    x = np.random.default_rng(1).standard_normal((1, 3, 10, 10)).astype(np.float32)
    assert np.array_equal(ort_run(onnx.load(str(out)), x), ort_run(reference, x))
    p = rep["patterns"]
    assert (p["layers"], p["kernels"], p["kernels_emptied"]) == (3, 8 * 3 + 8 + 6 * 8, 0)
    assert p["weights_kept"] == 4 * p["kernels"]
    assert p["libraries"] == {"3x3": 28, "5x5": 72}
    skipped = 100 * (8 * 3 * 5 + 8 * 5) + 100 * 6 * 8 * 21     # output positions x zeroed weights
    assert p["macs"]["pattern_aware"] == p["macs"]["dense"] - skipped == rep["macs"]["before"] - skipped


def test_grouped_convs_keep_their_cut_weights_unless_patterned():
    """The channel refit leaves the depthwise conv as cut (refit per group it helped MobileNetV2 and hurt
    PP-OCRv4's detector: BENCHMARKS.md); the pattern path refits it per group, on targets the scoring pass kept."""
    model = pattern_net()
    data = calib(model, n=128)
    rep = driver.prune(model, None, ratio=0.5, calib=data, allocation="uniform")
    refit = rep.report["reconstruction"]["passes"][0]
    assert refit["layers_refit"] == refit["targets_from_scoring"] == 4            # c1, pw, c5 and fc
    kept, original = weights(rep.model.graph.to_model())["dw.weight"], weights(model)["dw.weight"]
    assert kept.shape == (4, 1, 3, 3)                                             # each kernel as it was
    assert all(any(np.array_equal(k, o) for o in original) for k in kept)
    refit = driver.prune(model, None, ratio=0.5, calib=data, allocation="uniform",
                         patterns=4).report["reconstruction"]["passes"][0]
    assert refit["layers_refit"] == refit["targets_from_scoring"] == 5            # and dw, per group


def test_refit_keeps_the_zeros_and_improves_fidelity_grouped_convs_too():
    model = pattern_net()
    rep = driver.prune(model, None, patterns=3, calib=calib(model), damp=1e-4).report
    rec = rep["reconstruction"]
    assert rec["passes"][0]["layers_refit"] == 5                      # the depthwise conv included
    out = model.graph.output[0].name
    assert rec["fidelity_after"][out]["rel_l2"] < 0.5 * rec["fidelity_before"][out]["rel_l2"]
    w = weights(driver.prune(model, None, patterns=3, calib=calib(model)).model.graph.to_model())
    for name in ("c1.weight", "dw.weight", "c5.weight"):
        rows = w[name].reshape(w[name].shape[0] * w[name].shape[1], -1)
        assert (np.count_nonzero(rows, axis=1) <= 3).all()


def test_masked_refit_is_the_per_row_least_squares_on_its_support():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((400, 6)), rng.standard_normal((400, 3))
    gram = type("G", (), {"xx": x.T @ x, "xy": x.T @ y, "n": 400})()
    support = np.array([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0]], bool)
    new = patterns.refit_masked(np.zeros((3, 6)), gram, 0.0, support)
    for o in range(3):
        s = np.flatnonzero(support[o])
        expect = np.linalg.lstsq(x[:, s], y[:, o], rcond=None)[0]
        assert np.allclose(new[o, s], expect, atol=1e-9) and (new[o, ~support[o]] == 0).all()


def test_sparse_storage_is_smaller_and_gives_the_dense_outputs(tmp_path):
    b = Builder()
    x = b.input("x", [1, 3, 10, 10])
    y = b.relu(b.conv("c1", x, 3, 32))
    y = b.relu(b.conv("c2", y, 32, 32))
    b.output(b.conv("c3", y, 32, 32))
    model = b.model()
    dense, compact = tmp_path / "d.onnx", tmp_path / "c.onnx"
    driver.prune(model, str(dense), patterns=4, fast=True)
    rep = driver.prune(model, str(compact), patterns=4, fast=True, sparse_storage=True).report
    st = rep["storage"]
    kernels = 32 * 3 + 32 * 32 * 2
    assert st["bytes_dense"] == kernels * 9 * 4
    assert st["bytes_compact"] == kernels * (4 * 4 + 1) + 28 * 4 * 4      # values, ids, one int32 table
    assert st["file_bytes"] == compact.stat().st_size and st["file_bytes_dense"] == dense.stat().st_size
    assert compact.stat().st_size <= 0.55 * dense.stat().st_size
    onnx.checker.check_model(onnx.load(str(compact)), full_check=True)
    xin = np.random.default_rng(3).standard_normal((1, 3, 10, 10)).astype(np.float32)
    assert np.array_equal(ort_run(onnx.load(str(compact)), xin), ort_run(onnx.load(str(dense)), xin))


def test_channels_then_patterns_on_the_kept_channels():
    model = pattern_net()
    rep = driver.prune(model, None, target_flops=0.6, patterns=4, fast=True).report
    assert rep["macs"]["after"] < rep["macs"]["before"]
    p = rep["patterns"]["macs"]
    assert p["dense"] == rep["macs"]["after"] and p["pattern_aware"] < p["dense"]
    assert rep["patterns"]["kernels"] < 8 * 3 + 8 + 6 * 8


@pytest.mark.parametrize("kw,msg", [({"patterns": 0}, "--patterns must be"),
                                    ({"sparse_storage": True, "ratio": 0.3}, "need --patterns"),
                                    ({"patterns": 4, "connectivity": 1.0}, "--connectivity must be"),
                                    ({"patterns": 4, "max_drop": 1.0}, "--max-drop does not scale")])
def test_pattern_options_are_one_line_errors(kw, msg):
    with pytest.raises(SpaError, match=msg):
        driver.prune(pattern_net(), None, **kw)


def test_cli_patterns_with_sparse_storage(tmp_path, capsys):
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(pattern_net(), str(src))
    assert main([str(src), str(out), "--patterns", "4", "--sparse-storage", "--fast", "--report", str(report)]) == 0
    err = capsys.readouterr().err
    assert "MACs pattern" in err and "storage       sparse" in err
    rep = json.loads(report.read_text())
    assert rep["patterns"]["k"] == 4 and rep["storage"]["outputs_equal_dense"]
    assert main([str(src), str(tmp_path / "o2.onnx")]) != 0          # neither a budget nor --patterns
    assert "give one of --ratio, --target-flops, --plan or --patterns" in capsys.readouterr().err


def test_refit_rechoice_by_obs_on_a_white_input_is_the_magnitude_choice():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 3, 3, 3))
    lib = patterns.library((3, 3), 4)
    lp = patterns.LayerPattern("c", "c.weight", lib, np.zeros(w.shape, bool), w)
    gram = type("G", (), {"xx": 50.0 * np.eye(27), "n": 50})()
    mask = patterns.choose_by_obs(lp, gram, 0.0)
    assert (mask == patterns.mask_of(brute_choice(w, lib), lib, w.shape)).all() and lp.mask is mask


@pytest.mark.parametrize("bias,per", [(True, 1), (False, 2)])
def test_grouped_gram_and_batched_refit_match_the_per_group_solves(monkeypatch, bias, per):
    """GroupedGram (float64 sums in blocks of groups) equals each group's XᵀX / XᵀY; the batched solve of a
    grouped conv without a pattern equals refit_masked group by group."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    groups, k, p = 12, 9, 300
    x = rng.standard_normal((p, groups * k)).astype(np.float32)
    y = rng.standard_normal((p, groups * per)).astype(np.float32)
    monkeypatch.setattr(patterns.GroupedGram, "BLOCK_BYTES", 8 * p * (k + 1) * 5)   # blocks of 5 groups
    gram = patterns.GroupedGram(groups, bias)
    gram.add(x[:100], y[:100])
    gram.add(x[100:], y[100:])
    for g in range(groups):
        xg = x[:, g * k:(g + 1) * k].astype(np.float64)
        if bias:
            xg = np.concatenate([xg, np.ones((p, 1))], 1)
        np.testing.assert_allclose(gram.xx[g], xg.T @ xg, rtol=1e-10)
        np.testing.assert_allclose(gram.xy[g], xg.T @ y[:, g * per:(g + 1) * per], rtol=1e-10)
    w = rng.standard_normal((groups * per, k + bias))
    full = np.ones(w.shape, bool)
    batched = patterns.refit_grouped(w, gram, 0.01, full)
    looped = np.concatenate([patterns.refit_masked(w[g * per:(g + 1) * per], type("G", (), {
        "xx": gram.xx[g], "xy": gram.xy[g], "n": gram.n})(), 0.01, full[g * per:(g + 1) * per]) for g in range(groups)])
    np.testing.assert_allclose(batched, looped, rtol=1e-8, atol=1e-10)
