"""Importance criteria on graphs small enough to compute every score by hand, and every AGG/NORM combination."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import Builder

from spa import driver
from spa.errors import SpaError
from spa.importance import AGGREGATIONS, CRITERIA, NORMALIZATIONS, score

W1 = np.array([[1.0, -2.0], [0.5, 0.5], [-3.0, 0.0]], np.float32)   # Gemm transB: 3 outputs x 2 inputs
B1 = np.array([0.1, -0.2, 0.3], np.float32)
W2 = np.array([[2.0, 0.0, 1.0], [-1.0, 4.0, 0.0]], np.float32)     # 2 outputs x 3 inputs


def mlp(bn: bool = False):
    """x[1,2] -> Gemm(3) [-> BN] -> Relu -> Gemm(2): one prunable group of three units."""
    b = Builder()
    x = b.input("x", ["N", 2])
    h = b.op("Gemm", [x, b.const("w1", W1), b.const("b1", B1)], name="g1", transB=1)
    if bn:
        h = b.op("Unsqueeze", [h, b.i64("ax", [2])], name="unsq")
        h = b.op("BatchNormalization", [h, b.const("gamma", np.array([0.5, -2.0, 1.0], np.float32)),
                                        b.const("beta", np.zeros(3, np.float32)),
                                        b.const("mu", np.zeros(3, np.float32)),
                                        b.const("var", np.ones(3, np.float32))], name="bn")
        h = b.op("Squeeze", [h, b.i64("ax2", [2])], name="sq")
    h = b.relu(h)
    b.output(b.op("Gemm", [h, b.const("w2", W2)], name="g2", transB=1))
    return b.model()


def group_scores(model, importance, aggregation="sum", normalization="none"):
    analysis = driver.analyse(driver.load(model))
    g = max(analysis.groups, key=lambda g: g.prunable)
    assert g.size == 3
    s = score(analysis, importance, aggregation, normalization)
    return np.array([s[int(u)] for u in g.units])


def test_l1_sums_producer_rows_bias_and_consumer_columns():
    expected = np.abs(W1).sum(1) + np.abs(B1) + np.abs(W2).sum(0)
    np.testing.assert_allclose(group_scores(mlp(), "l1"), expected, rtol=1e-6)


def test_l2_sums_member_norms():
    expected = np.linalg.norm(W1, axis=1) + np.abs(B1) + np.linalg.norm(W2, axis=0)
    np.testing.assert_allclose(group_scores(mlp(), "l2"), expected, rtol=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aggregations_over_the_three_members(aggregation):
    members = np.stack([np.abs(W1).sum(1), np.abs(B1), np.abs(W2).sum(0)])  # in declaration order
    expected = {"sum": members.sum(0), "mean": members.mean(0), "max": members.max(0), "prod": members.prod(0),
                "median": np.median(members, 0), "first": members[0]}[aggregation]
    np.testing.assert_allclose(group_scores(mlp(), "l1", aggregation), expected, rtol=1e-6)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_normalizations_per_group(normalization):
    v = (np.abs(W1).sum(1) + np.abs(B1) + np.abs(W2).sum(0)).astype(np.float64)
    expected = {"none": v, "sum": v / v.sum(), "mean": v / v.mean(), "max": v / v.max(),
                "standardize": (v - v.min()) / (v.max() - v.min()),
                "gaussian": (v - v.mean()) / v.std()}[normalization]
    np.testing.assert_allclose(group_scores(mlp(), "l1", normalization=normalization), expected, rtol=1e-5, atol=1e-6)


def test_bn_scale_reads_gamma_and_refuses_folded_exports():
    np.testing.assert_allclose(group_scores(mlp(bn=True), "bn-scale"), [0.5, 2.0, 1.0])
    with pytest.raises(SpaError, match="needs BatchNormalization nodes.*use l1"):
        group_scores(mlp(), "bn-scale")


def test_lamp_divides_by_the_sum_of_not_smaller_squares():
    sq = np.square(W1).sum(1) + np.square(B1) + np.square(W2).sum(0)
    order = np.argsort(sq)
    expected = np.empty(3)
    for rank, i in enumerate(order):
        expected[i] = sq[i] / sq[order[rank:]].sum()
    np.testing.assert_allclose(group_scores(mlp(), "lamp"), expected, rtol=1e-6)


def test_fpgm_is_the_summed_distance_between_producer_filters():
    d = np.linalg.norm(W1[:, None, :] - W1[None, :, :], axis=2)
    np.testing.assert_allclose(group_scores(mlp(), "fpgm"), d.sum(1), rtol=1e-5)


def test_random_is_seeded():
    a, b = group_scores(mlp(), "random"), group_scores(mlp(), "random")
    np.testing.assert_array_equal(a, b)


def test_unknown_names_are_one_line_errors():
    analysis = driver.analyse(driver.load(mlp()))
    for kw, what in [({"importance": "nope"}, "importance"), ({"aggregation": "nope"}, "aggregation"),
                     ({"normalization": "nope"}, "normalization")]:
        args = {"importance": "l1", "aggregation": "sum", "normalization": "mean", **kw}
        with pytest.raises(SpaError, match=f"unknown {what}"):
            score(analysis, **args)


def test_every_criterion_is_documented():
    for c in CRITERIA.values():
        assert c.doc and c.needs in ("weights", "gradients", "activations")


# ---- gradient criteria against an independent torch computation ------------------------------------------------
def _torch_reference(x, labels):
    """Loss, gradients and Hessian-gradient products of the mlp() graph, written directly in torch."""
    torch = pytest.importorskip("torch")
    params = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (W1, B1, W2)]

    def loss_fn(w1, b1, w2):
        h = torch.relu(torch.from_numpy(x) @ w1.T + b1)
        return torch.nn.functional.cross_entropy(h @ w2.T, torch.from_numpy(labels))

    grads = torch.autograd.grad(loss_fn(*params), params)
    _, hg = torch.autograd.functional.hvp(loss_fn, tuple(params), tuple(g.detach() for g in grads))
    return [g.numpy().astype(np.float64) for g in grads], [h.numpy().astype(np.float64) for h in hg]


@pytest.mark.parametrize("criterion", ["taylor", "snip", "grasp", "crop"])
def test_gradient_criteria_match_a_direct_torch_computation(criterion):
    from spa.calib import Calib
    from spa.importance import ScoreInputs

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 2)).astype(np.float32)
    labels = rng.integers(0, 2, 32)
    grads, hgs = _torch_reference(x, labels)
    analysis = driver.analyse(driver.load(mlp()))
    g = max(analysis.groups, key=lambda g: g.prunable)
    s = score(analysis, criterion, "sum", "none", ScoreInputs(analysis, calib=Calib({"x": x}, labels, "test"), loss="ce"))
    got = np.array([s[int(u)] for u in g.units])
    other = hgs if criterion in ("grasp", "crop") else grads
    prods = [w.astype(np.float64) * d for w, d in zip((W1, B1, W2), other)]
    if criterion == "taylor":
        expected = np.abs(prods[0].sum(1)) + np.abs(prods[1]) + np.abs(prods[2].sum(0))
    elif criterion == "grasp":
        expected = prods[0].sum(1) + prods[1] + prods[2].sum(0)
    else:
        expected = np.abs(prods[0]).sum(1) + np.abs(prods[1]) + np.abs(prods[2]).sum(0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)


def test_label_free_losses_and_a_missing_label_error():
    from spa.calib import Calib
    from spa.importance import ScoreInputs

    x = np.random.default_rng(0).standard_normal((16, 2)).astype(np.float32)
    analysis = driver.analyse(driver.load(mlp()))
    for loss in ("pseudo", "fisher", "auto"):
        s = score(analysis, "taylor", "sum", "none", ScoreInputs(analysis, calib=Calib({"x": x}, None, "t"), loss=loss))
        assert all(np.isfinite(list(s.values()))) and max(s.values()) > 0
    with pytest.raises(SpaError, match="needs labels"):
        score(analysis, "taylor", inputs=ScoreInputs(analysis, calib=Calib({"x": x}, None, "t"), loss="ce"))
