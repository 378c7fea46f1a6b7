"""Selection options: --round-to, --min-channels, --exclude, --target-flops budgets, plans."""
from __future__ import annotations

import json
import math

import pytest

from spa import driver

models = pytest.importorskip("spa.models")


@pytest.fixture(scope="module")
def resnet18():
    return str(models.zoo_path("resnet18", small=True))


def kept_rows(rep):
    return {r["name"]: r for r in rep["per_group"]}


def test_round_to_keeps_multiples(resnet18):
    rep = driver.prune(resnet18, None, ratio=0.4, round_to=4, fast=True).report
    for row in rep["per_group"]:
        if row["frozen_units"] == 0 and row["units"] > 1:
            want = row["units"] - math.floor(0.4 * row["units"] + 0.5)
            assert row["kept"] % 4 == 0 or row["kept"] == row["units"], row
            assert row["kept"] >= want


def test_min_channels_wins_over_ratio(resnet18):
    rep = driver.prune(resnet18, None, ratio=0.9, min_channels=5, fast=True).report
    for row in rep["per_group"]:
        if row["frozen_units"] == 0 and row["units"] > 1:
            assert row["kept"] == max(row["units"] - math.floor(0.9 * row["units"] + 0.5), min(5, row["units"]))


def test_exclude_protects_matching_groups(resnet18):
    analysis = driver.analyse(driver.load(resnet18))
    target = next(g for g in analysis.groups if g.prunable > 1)
    pattern = target.sources[0]
    rep = driver.prune(resnet18, None, ratio=0.5, exclude=[pattern], fast=True).report
    row = kept_rows(rep)[target.name]
    assert row["kept"] == row["units"]
    others = [r for r in rep["per_group"] if r["name"] != target.name and r["frozen_units"] == 0 and r["units"] > 1]
    assert all(r["kept"] < r["units"] for r in others)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_target_flops_meets_budget(resnet18, budget):
    rep = driver.prune(resnet18, None, target_flops=budget, fast=True).report
    assert rep["macs"]["after"] <= budget * rep["macs"]["before"]
    assert rep["macs"]["after"] >= 0.6 * budget * rep["macs"]["before"]  # not wildly over-pruned


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_unreachable_target_flops_is_a_warning(resnet18, allocation):
    """Pruned as far as --min-channels allows, and the report says the budget was not met (not silent)."""
    rep = driver.prune(resnet18, None, target_flops=0.05, min_channels=8, allocation=allocation, fast=True).report
    ratio = rep["macs"]["after"] / rep["macs"]["before"]
    assert ratio > 0.05
    want = (f"the budget cannot be met: --target-flops 0.05, but the smallest model that --min-channels/--round-to/"
            f"--max-ratio/--exclude and the frozen groups allow keeps {ratio:.4f} of the MACs; pruned as far as they "
            f"allow")
    assert [w for w in rep["warnings"] if w.startswith("the budget cannot be met")] == [want]
    assert all(r["kept"] == min(8, r["units"]) for r in rep["per_group"] if r["frozen_units"] == 0)
    met = driver.prune(resnet18, None, target_flops=0.5, min_channels=8, allocation=allocation, fast=True).report
    assert not [w for w in met["warnings"] if w.startswith("the budget cannot be met")]


def test_target_flops_with_round_to_meets_budget(resnet18):
    rep = driver.prune(resnet18, None, target_flops=0.5, round_to=8, fast=True).report
    assert rep["macs"]["after"] <= 0.5 * rep["macs"]["before"]
    for row in rep["per_group"]:
        if row["frozen_units"] == 0 and row["units"] > 8:
            assert row["kept"] % 8 == 0 or row["kept"] == row["units"]


def test_saved_plan_reapplies_to_the_same_model(resnet18, tmp_path):
    plan = tmp_path / "plan.json"
    a = driver.prune(resnet18, None, target_flops=0.5, save_plan=str(plan), fast=True).report
    data = json.loads(plan.read_text())
    assert data["format"] == "spa-prune-plan/1" and data["groups"]
    b = driver.prune(resnet18, None, plan_file=str(plan), fast=True).report
    assert a["macs"]["after"] == b["macs"]["after"]
    assert a["per_group"] == b["per_group"]


@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_scores_match_a_brute_force_sum(resnet18, p):
    """Each unit's score = sum over its parameter slices of the slice's L_p norm (running stats excluded)."""
    import numpy as np

    from spa.importance import score

    analysis = driver.analyse(driver.load(resnet18))
    scores = score(analysis, f"l{p}", aggregation="sum", normalization="none")
    expected = {u: 0.0 for u in scores}
    for ps in analysis.ctx.params:
        if ps.role == "stat":
            continue
        w = np.asarray(analysis.ctx.g.const(ps.node.input[ps.input_index]), dtype=np.float64)
        roots = analysis.find(ps.atoms)
        for u in np.unique(roots[roots >= 0]):
            sl = np.compress(roots == u, w, axis=ps.axis)
            expected[int(u)] += np.abs(sl).sum() if p == 1 else np.sqrt(np.square(sl).sum())
    for u, v in scores.items():
        assert v == pytest.approx(expected[u], rel=1e-5)


def test_max_ratio_caps_every_group_under_a_budget(resnet18):
    rep = driver.prune(resnet18, None, target_flops=0.5, max_ratio=0.6, allocation="global", fast=True).report
    assert rep["macs"]["after"] <= 0.5 * rep["macs"]["before"]
    for row in rep["per_group"]:
        assert row["units"] - row["kept"] <= math.floor(0.6 * row["units"]), row
    uncapped = driver.prune(resnet18, None, target_flops=0.5, allocation="global", fast=True).report
    assert min(r["kept"] / r["units"] for r in uncapped["per_group"]) < 0.4  # what the cap prevents


def test_uniform_allocation_removes_one_fraction_everywhere_and_meets_the_budget(resnet18):
    import math

    rep = driver.prune(resnet18, None, target_flops=0.5, allocation="uniform", fast=True).report
    assert rep["macs"]["after"] <= 0.5 * rep["macs"]["before"]
    rows = [r for r in rep["per_group"] if r["frozen_units"] == 0 and r["units"] > 1]
    # one ratio r explains every group's kept count (floor(r*n + 0.5) removed), up to units given back
    lo = max((r["units"] - r["kept"] - 0.5) / r["units"] for r in rows if r["given_back"] == 0)
    hi = min((r["units"] - r["kept"] + 0.5) / r["units"] for r in rows if r["given_back"] == 0)
    assert lo <= hi
    smaller = driver.prune(resnet18, None, ratio=max(lo - 0.02, 0.0), fast=True).report
    assert smaller["macs"]["after"] > 0.5 * smaller["macs"]["before"] or math.isclose(lo, 0.0)
