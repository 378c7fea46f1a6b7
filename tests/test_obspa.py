"""OBS saliency and reconstruction against closed forms, patch sampling against torch's unfold, and end-to-end
reconstruction / re-calibration / compensation on small graphs (values only, fidelity reported)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import Builder

torch = pytest.importorskip("torch")

from spa import driver, obspa
from spa.calib import Calib


def _gram(xp, yo):
    g = obspa.Gram()
    g.add(torch.from_numpy(xp).float(), torch.from_numpy(yo).float())
    return g


def test_refit_is_the_obs_update_and_the_closed_form_least_squares():
    rng = np.random.default_rng(0)
    n, d, o = 400, 6, 3
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    w = rng.standard_normal((o, d))
    keep = np.array([True, False, True, True, False, True])
    damp = 1e-3
    new, lam = obspa.refit(w[:, keep], _gram(x[:, keep], x @ w.T), damp)
    # OBS: W_K - W_Q ([H^-1]_QQ)^-1 [H^-1]_QK with the same dampened H
    h = x.astype(np.float32).astype(np.float64)
    h = h.T @ h / n
    hd = h + lam * np.eye(d)
    hinv = np.linalg.inv(hd)
    q = ~keep
    obs = w[:, keep] - w[:, q] @ np.linalg.solve(hinv[np.ix_(q, q)], hinv[np.ix_(q, keep)])
    np.testing.assert_allclose(new, obs, rtol=1e-4, atol=1e-6)
    # without dampening: ordinary least squares  min ||X_K W'^T - X W^T||
    ls = np.linalg.lstsq(x[:, keep], x @ w.T, rcond=None)[0].T
    plain, _ = obspa.refit(w[:, keep], _gram(x[:, keep], x @ w.T), 1e-9)
    np.testing.assert_allclose(plain, ls, rtol=1e-3, atol=1e-5)


def test_obs_saliency_is_the_output_error_left_after_the_best_compensation():
    rng = np.random.default_rng(1)
    n, d, o = 500, 5, 2
    x = rng.standard_normal((n, d)) + 0.5
    w = rng.standard_normal((o, d))
    h = x.T @ x / n
    rows = obspa.inverse_rows(h)
    for q in ([1], [0, 3]):
        sal = obspa.obs_saliency(w, rows, [np.array(q)])[0]
        keep = np.setdiff1d(np.arange(d), q)
        best = np.linalg.lstsq(x[:, keep], x @ w.T, rcond=None)[0].T
        err = np.square(x[:, keep] @ best.T - x @ w.T).sum() / n
        assert sal == pytest.approx(0.5 * err, rel=1e-6)


@pytest.mark.parametrize("stride,pad,dil", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_conv_patches_match_unfold(stride, pad, dil):
    b = Builder()
    x = b.input("x", [2, 3, 9, 7])
    b.output(b.op("Conv", [x, b.weight("w", (4, 3, 3, 3))], name="c", strides=[stride, stride],
                  pads=[pad] * 4, dilations=[dil, dil], kernel_shape=[3, 3]))
    m = driver.load(b.model())
    view = obspa.layer_view(m.graph, m.graph.model.graph.node[0])
    xt = torch.randn(2, 3, 9, 7)
    total = obspa.output_positions(view, xt)
    rows = obspa.sample_rows(view, xt, torch.arange(total))
    ref = torch.nn.functional.unfold(xt, 3, dilation=dil, padding=pad, stride=stride)  # (N, C*9, L)
    torch.testing.assert_close(rows, ref.permute(0, 2, 1).reshape(total, -1))
    by_position = obspa.sample_rows(view, xt, torch.arange(total), by_position=True)   # P x 9 x C
    torch.testing.assert_close(by_position.permute(0, 2, 1).reshape(total, -1), rows)
    w = torch.from_numpy(np.array(m.graph.const("w")))
    y = torch.nn.functional.conv2d(xt, w, stride=stride, padding=pad, dilation=dil)
    torch.testing.assert_close(rows @ w.reshape(4, -1).T, y.permute(0, 2, 3, 1).reshape(total, -1),
                               rtol=1e-5, atol=1e-5)
    picked = torch.tensor([0, 3, total - 1])
    torch.testing.assert_close(obspa.sample_outputs(view, y, picked, torch.tensor([2, 0])),
                               (obspa.sample_rows(view, xt, picked) @ w.reshape(4, -1).T)[:, [2, 0]],
                               rtol=1e-5, atol=1e-5)


def test_conv1d_patches_match_conv1d():
    b = Builder()
    x = b.input("x", [2, 3, 11])
    b.output(b.conv("c", x, 3, 4, k=3, dims=1, stride=2))
    m = driver.load(b.model())
    node = m.graph.model.graph.node[0]
    view = obspa.layer_view(m.graph, node)
    xt = torch.randn(2, 3, 11)
    rows = obspa.sample_rows(view, xt, torch.arange(obspa.output_positions(view, xt)))
    w, bias = (torch.from_numpy(np.array(m.graph.const(node.input[i]))) for i in (1, 2))
    y = torch.nn.functional.conv1d(xt, w, bias, stride=2, padding=1)
    torch.testing.assert_close(rows @ w.reshape(4, -1).T + bias, y.permute(0, 2, 1).reshape(-1, 4),
                               rtol=1e-5, atol=1e-5)


def linear_pair():
    """x[N,4] -> Gemm(4->6) -> Gemm(6->3): the hidden layer has rank 4, so removing two of its six channels
    can be undone exactly by refitting the second layer (and its bias absorbs the removed channels' means)."""
    b = Builder()
    x = b.input("x", ["N", 4])
    h = b.gemm("g1", x, 4, 6, trans_b=1)
    b.output(b.gemm("g2", h, 6, 3, trans_b=1))
    return b.model()


def calib_for(model, n=256, seed=0):
    rng = np.random.default_rng(seed)
    name = model.graph.input[0].name
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    shape[0] = n
    return Calib({name: rng.standard_normal(shape).astype(np.float32)}, None, "test")


def test_obspa_undoes_a_removal_that_the_kept_channels_span():
    model = linear_pair()
    rep = driver.prune(model, None, ratio=0.3, importance="obspa", calib=calib_for(model), damp=1e-7).report
    rec = rep["reconstruction"]
    assert rep["verification"]["status"] == "passed"          # structure checked before any value changed
    assert rec["fidelity_before"]["g2_out"]["rel_l2"] > 0.05
    assert rec["fidelity_after"]["g2_out"]["rel_l2"] < 1e-3
    assert rec["passes"][0]["layers_refit"] >= 1
    assert rep["params"]["after"] == 4 * 4 + 4 + 3 * 4 + 3     # shapes as pruned, nothing added


def conv_net(bn: bool):
    b = Builder()
    x = b.input("x", [1, 3, 12, 12])
    y = b.conv("c1", x, 3, 16)
    if bn:
        y = b.bn("bn1", y, 16)
    y = b.relu(y)
    y = b.conv("c2", y, 16, 16)
    if bn:
        y = b.bn("bn2", y, 16)
    y = b.relu(y)
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    b.output(b.gemm("fc", y, 16, 10, trans_b=1))
    return b.model()


@pytest.mark.parametrize("bn", [False, True])
def test_data_free_obspa_improves_fidelity_with_and_without_bn_nodes(bn):
    model = conv_net(bn)
    rep = driver.prune(model, None, target_flops=0.5, importance="obspa").report
    rec = rep["reconstruction"]
    out = model.graph.output[0].name
    assert rep["importance"]["data"] == "data-free (synthesized inputs)"
    assert rec["fidelity_on"] == "16 held-out synthesized samples (data-free)"
    assert rec["fidelity_after"][out]["rel_l2"] < rec["fidelity_before"][out]["rel_l2"]


@pytest.mark.parametrize("bn", [False, True])
def test_recalibrate_matches_statistics_and_needs_data(bn):
    model = conv_net(bn)
    rep = driver.prune(model, None, target_flops=0.5, importance="l1", recalibrate=True,
                       reconstruct=False, calib=calib_for(model, 64)).report
    p = rep["reconstruction"]["passes"][0]
    assert (p["bn_reestimated"] > 0) == bn and p["affine_corrected"] > 0
    with pytest.raises(Exception, match="--recalibrate needs calibration data"):
        driver.prune(model, None, target_flops=0.5, recalibrate=True)


def duplicated_channels():
    """Conv whose filters 8..15 are 2x filters 0..7 (and biases), then ReLU and a 1x1 conv: removing the
    duplicates and merging them into their originals is exact."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    bias = np.random.default_rng(1).standard_normal(8).astype(np.float32)
    wc = b.const("c1.weight", np.concatenate([w, 2 * w]))
    bc = b.const("c1.bias", np.concatenate([bias, 2 * bias]))
    y = b.relu(b.op("Conv", [x, wc, bc], name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    b.output(b.conv("c2", y, 16, 4, k=1))
    return b.model()


def test_similarity_compensation_merges_scaled_duplicates_exactly():
    model = duplicated_channels()
    analysis = driver.analyse(driver.load(model))
    g = max(analysis.groups, key=lambda g: g.size)
    plan = {"format": "spa-prune-plan/1", "groups": [{"id": g.id, "name": g.name, "units": g.size,
                                                      "removed": list(range(8, 16))}]}
    import json
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(plan, f)
    rep = driver.prune(model, None, plan_file=f.name, compensate="similarity").report
    rec = rep["reconstruction"]
    assert rec["passes"][0]["pairs_merged"] == 8
    assert rec["fidelity_before"]["c2_out"]["rel_l2"] > 0.1
    assert rec["fidelity_after"]["c2_out"]["rel_l2"] < 1e-5
    rep = driver.prune(model, None, plan_file=f.name, compensate="similarity", dbscan=(0.05, 2)).report
    p = rep["reconstruction"]["passes"][0]
    assert p["dbscan_clusters"] == 8 and p["pairs_merged"] == 8


@pytest.mark.parametrize("kw,msg", [(dict(positions=0), "--positions must be at least 1"),
                                    (dict(damp=-1.0), "--damp must be >= 0"),
                                    (dict(samples=0), "--synth-samples must be at least 1"),
                                    (dict(compensate="similarity", dbscan=(0.3, 0)), "--dbscan needs"),
                                    (dict(compensate="similarity", dbscan=(-1.0, 2)), "--dbscan needs")])
def test_bad_numbers_for_data_passes_are_clear_errors(kw, msg, tmp_path):
    from spa.errors import SpaError

    out = tmp_path / "out.onnx"
    with pytest.raises(SpaError, match=msg):
        driver.prune(conv_net(False), str(out), target_flops=0.5, importance="obspa", **kw)
    assert not out.exists()


@pytest.mark.parametrize("samples", [48, 64])
def test_refit_from_the_scoring_pass_outputs_equals_rerunning_the_original(samples, monkeypatch):
    """The scoring pass keeps the original layers' outputs at its sampled positions and the refit reads them
    instead of running the original again: with every position sampled (so both ways see the same rows), the
    refit weights are the same, also when the scoring pass batches the samples differently (32 per batch there,
    all at once in the refit)."""
    model = conv_net(False)
    kw = dict(target_flops=0.5, importance="obspa", calib=calib_for(model, samples), positions=10**6)
    shared = driver.prune(model, None, **kw)
    monkeypatch.setattr(obspa, "targets_bytes", lambda *a: 10**15)   # never fits: the refit reruns the original
    rerun = driver.prune(model, None, **kw)
    p_shared, p_rerun = shared.report["reconstruction"]["passes"][0], rerun.report["reconstruction"]["passes"][0]
    assert p_shared["targets_from_scoring"] == p_shared["layers_refit"] == 3
    assert p_rerun["targets_from_scoring"] == 0 and p_rerun["layers_refit"] == 3
    assert any("runs the original model again" in n for n in rerun.report["importance"]["notes"])
    a, b = shared.model.graph, rerun.model.graph
    for init in a.model.graph.initializer:
        np.testing.assert_allclose(a.const(init.name), b.const(init.name), rtol=2e-4, atol=2e-5)
    out = model.graph.output[0].name
    assert shared.report["fidelity"]["outputs"][out]["rel_l2"] == pytest.approx(
        rerun.report["fidelity"]["outputs"][out]["rel_l2"], rel=1e-3)


def _exact_saliency(rows, w, units, k, damp, ones=False):
    g = obspa.Gram()
    g.add(obspa.with_ones(torch.from_numpy(rows)) if ones else torch.from_numpy(rows))
    return obspa.exact_scorer(g, damp, k)(w, units)


def _kron_saliency(rows, w, units, k, damp, centered=False):
    kg = obspa.KroneckerGram(k, centered)
    half = len(rows) // 2
    patches = torch.from_numpy(rows.reshape(len(rows), -1, k).transpose(0, 2, 1).copy())   # P x k x C
    kg.add(patches[:half])   # two chunks: the sums must add up
    kg.add(patches[half:])
    return kg.scorer(damp)(w, units)


def test_kronecker_score_is_exact_when_the_hessian_is_a_kronecker_product():
    """Rows u_i ⊗ v_j over every pair (i, j) have H = (Σ u uᵀ) ⊗ (Σ v vᵀ) / n exactly: the factored score then
    equals the exact OBS saliency, for one channel and for a unit of two channels."""
    rng = np.random.default_rng(2)
    c, k, o = 5, 9, 3
    u = rng.standard_normal((40, c)) @ rng.standard_normal((c, c))
    v = rng.standard_normal((30, k)) @ rng.standard_normal((k, k)) + 0.3
    rows = np.einsum("ic,jt->ijct", u, v).reshape(-1, c * k)
    w = rng.standard_normal((o, c * k))
    units = [np.array([ch]) for ch in range(c)]
    exact = _exact_saliency(rows, w, units, k, 1e-9)
    np.testing.assert_allclose(_kron_saliency(rows, w, units, k, 1e-9), exact, rtol=2e-4)
    pair = [np.array([1, 3])]
    np.testing.assert_allclose(_kron_saliency(rows, w, pair, k, 1e-9), _exact_saliency(rows, w, pair, k, 1e-9),
                               rtol=2e-4)


def test_factored_score_is_exact_for_uncorrelated_channels():
    """Each row reads one channel only, so H is block-diagonal over channels with a different spatial block per
    channel (not a Kronecker product): the channel's own block makes the score exact, dampening included."""
    rng = np.random.default_rng(4)
    c, k = 4, 9
    rows = np.zeros((c * 300, c * k))
    for ch in range(c):
        rows[ch * 300:(ch + 1) * 300, ch * k:(ch + 1) * k] = (
            rng.standard_normal((300, k)) @ rng.standard_normal((k, k)) * (ch + 1))
    w = rng.standard_normal((3, c * k))
    units = [np.array([ch]) for ch in range(c)]
    np.testing.assert_allclose(_kron_saliency(rows, w, units, k, 0.01), _exact_saliency(rows, w, units, k, 0.01),
                               rtol=2e-4)


def test_kronecker_centering_is_the_bias_column():
    """With one column per channel (k = 1) the factors are the Hessian itself; centering (a layer with a bias)
    gives the exact score of the Hessian augmented with a constant column."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((600, 6)) @ rng.standard_normal((6, 6)) + 2.0
    w = rng.standard_normal((4, 6))
    w_bias = np.concatenate([w, rng.standard_normal((4, 1))], 1)
    units = [np.array([ch]) for ch in range(6)]
    np.testing.assert_allclose(_kron_saliency(rows, w, units, 1, 1e-9),
                               _exact_saliency(rows, w, units, 1, 1e-9), rtol=1e-5)
    np.testing.assert_allclose(_kron_saliency(rows, w, units, 1, 1e-9, centered=True),
                               _exact_saliency(rows, w_bias, units, 1, 1e-9, ones=True), rtol=1e-4)
    assert not np.allclose(_kron_saliency(rows, w, units, 1, 1e-9, centered=True),
                           _kron_saliency(rows, w, units, 1, 1e-9))


def test_kronecker_scored_convs_prune_and_refit_end_to_end(monkeypatch):
    """A wide conv's Kronecker score (here every conv with a 3x3 kernel: the threshold lowered to 0) drives a
    verified cut, and the refit still improves fidelity; the 1x1-free Gemm stays on the exact score."""
    monkeypatch.setattr(obspa, "KRONECKER_COLUMNS", 0)
    used = []
    scorer = obspa.KroneckerGram.scorer
    monkeypatch.setattr(obspa.KroneckerGram, "scorer", lambda self, damp: used.append(self.k) or scorer(self, damp))
    model = conv_net(True)
    rep = driver.prune(model, None, target_flops=0.5, importance="obspa", calib=calib_for(model, 64)).report
    rec = rep["reconstruction"]
    out = model.graph.output[0].name
    assert used == [9]                                           # c2 (c1 reads the image: no prunable group)
    assert rep["importance"]["hessian_data"]["layers_on_factored_hessians"] == 1
    assert rep["verification"]["status"] == "passed"
    assert rec["fidelity_after"][out]["rel_l2"] < rec["fidelity_before"][out]["rel_l2"]
    driver.prune(model, None, target_flops=0.5, importance="obspa", calib=calib_for(model, 64), exact_hessians=True)
    assert used == [9]                                           # --exact-hessians: no factored score


def test_kronecker_score_gives_up_like_the_exact_one_on_non_finite_inputs():
    kg = obspa.KroneckerGram(9, centered=False)
    kg.add(torch.full((4, 9, 3), float("nan")))
    assert kg.scorer(0.01) is None


@pytest.mark.parametrize("dtype,d", [(np.float64, 40), (np.float32, 1100)])
@pytest.mark.parametrize("scipy_present", [True, False])
def test_inverse_rows_give_the_blocks_of_the_inverse(dtype, d, scipy_present, monkeypatch):
    """The scores read [H⁻¹]_QQ = R_Q R_Qᵀ from one triangular inverse (scipy's trtri, or torch's triangular
    solve without scipy): the same saliencies as the whole inverse, for single channels and channel sets."""
    import sys

    if not scipy_present:
        monkeypatch.setitem(sys.modules, "scipy", None)
        monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3 * d, d)) + 0.3
    h = (x.T @ x / d + 0.01 * np.eye(d)).astype(dtype)
    rows = obspa.inverse_rows(h.copy())
    full = np.linalg.inv(h.astype(np.float64))
    np.testing.assert_allclose(rows @ rows.T, full, rtol=0, atol=2e-5 * np.abs(full).max())
    w = rng.standard_normal((5, d))
    for columns in ([np.array([i]) for i in range(d)], [np.array([0, 1, 2]), np.array([7]), np.array([3, 9])]):
        exact = [0.5 * np.einsum("oq,qo->", w[:, q], np.linalg.solve(full[np.ix_(q, q)], w[:, q].T)) for q in columns]
        np.testing.assert_allclose(obspa.obs_saliency(w, rows, columns), exact, rtol=2e-4)
    with pytest.raises(np.linalg.LinAlgError):
        obspa.inverse_rows(-np.eye(4, dtype=dtype))


def test_scores_read_half_the_sampled_positions_and_the_refit_all(monkeypatch):
    """SCORE_SHARE: a layer with more positions than --positions gets `positions` sampled rows; its score's
    Hessian sums SCORE_SHARE of them, the refit every one."""
    rows: dict[tuple, int] = {}
    add = obspa.Gram.add

    def counting(self, x, y=None):
        key = (id(self), y is None, x.shape[1])     # y is None: a score's Hessian; else a refit's sums
        rows[key] = rows.get(key, 0) + x.shape[0]
        return add(self, x, y)

    monkeypatch.setattr(obspa.Gram, "add", counting)
    model = conv_net(False)
    positions = 128                                   # c2 sees 64 samples x 12 x 12 positions: far more
    rep = driver.prune(model, None, target_flops=0.5, importance="obspa", calib=calib_for(model, 64),
                       positions=positions).report
    conv_columns = {d for (_, _, d) in rows if d > 64}   # c2's patches: >= 8 channels x 9 positions (+ bias)
    scored = [n for (_, score, d), n in rows.items() if score and d in conv_columns]
    refit = [n for (_, score, d), n in rows.items() if not score and d > 64]
    assert scored == [round(positions * obspa.SCORE_SHARE)]
    assert refit == [positions]
    assert rep["importance"]["hessian_data"]["positions_scored_per_layer"] == round(positions * obspa.SCORE_SHARE)


@pytest.mark.parametrize("d, ones", [(5, True), (5, False), (80, True)])
def test_gram_over_chunks_is_one_product_with_the_ones_column(d, ones):
    """Row blocks added chunk by chunk (torch or numpy) give XᵀX and XᵀY of all rows at once, X with a ones
    column when `ones`; float64 up to 64 columns, float32 above; the sums can be read twice and taken over."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, d)).astype(np.float32)
    y = rng.standard_normal((300, 7)).astype(np.float32)
    g = obspa.Gram(ones=ones)
    for part in (slice(0, 100), slice(100, 250), slice(250, 300)):
        g.add(torch.from_numpy(x[part]), y[part])
    a = np.concatenate([x, np.ones((300, 1), np.float32)], 1) if ones else x
    tol = 1e-10 if a.shape[1] <= 64 else 2e-4
    assert g.n == 300 and g.xx.dtype == (np.float64 if a.shape[1] <= 64 else np.float32)
    np.testing.assert_allclose(g.xx, a.T.astype(np.float64) @ a, rtol=tol, atol=tol * 300)
    np.testing.assert_allclose(g.xy, a.T.astype(np.float64) @ y, rtol=tol, atol=tol * 300)
    np.testing.assert_allclose(g.xx, a.T.astype(np.float64) @ a, rtol=tol, atol=tol * 300)   # read again: same
    g.add(x[:10])                      # more rows after a read: added to the sums already formed
    more = a[:10].astype(np.float64)
    np.testing.assert_allclose(g.xx, a.T.astype(np.float64) @ a + more.T @ more, rtol=tol, atol=tol * 300)
    h, g.xx = g.xx, None               # exact_scorer takes the Hessian over
    assert g.xx is None and h.shape == (a.shape[1], a.shape[1])


def test_a_five_dimensional_constant_does_not_stop_the_data_passes(tmp_path):
    """The data passes lay 4-D weights out channels_last; Module.to did that to every 4-D and 5-D tensor, and a
    5-D constant (a BART export folds one) raised 'required rank 4 tensor' as a traceback. Only 4-D ones now."""
    b = Builder()
    x = b.relu(b.conv("c1", b.input("x", [1, 3, 8, 8]), 3, 8))
    five = b.op("Reshape", [x, b.const("to5", np.array([1, 2, 4, 8, 8]))])
    five = b.op("Add", [five, b.const("bias5", np.full((1, 2, 1, 1, 1), 0.5, np.float32))])
    y = b.op("Reshape", [five, b.const("to4", np.array([1, 8, 8, 8]))])
    b.output(b.conv("c2", b.relu(b.conv("c3", y, 8, 8)), 8, 4))
    src = tmp_path / "m.onnx"
    import onnx
    onnx.save(b.model(), str(src))
    rep = driver.prune(str(src), str(tmp_path / "o.onnx"), ratio=0.5).report
    assert rep["verification"]["status"] == "passed" and rep["importance"]["criterion"] == "obspa"
