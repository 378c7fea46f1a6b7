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
    rep = driver.prune(resnet18, None, ratio=0.9, min_channels=5, round_to=1, fast=True).report
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


@pytest.mark.parametrize("allocation", ["global", "uniform", "banded"])
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

    rep = driver.prune(resnet18, None, target_flops=0.5, allocation="uniform", round_to=1, fast=True).report
    assert rep["macs"]["after"] <= 0.5 * rep["macs"]["before"]
    rows = [r for r in rep["per_group"] if r["frozen_units"] == 0 and r["units"] > 1]
    # one ratio r explains every group's kept count: floor(r*n + 0.5) removed, or one unit fewer where the
    # budget allowed one back (and up to the units given back so that no tensor empties)
    lo = max((r["units"] - r["kept"] - 0.5) / r["units"] for r in rows if r["given_back"] == 0)
    hi = min((r["units"] - r["kept"] + 1.5) / r["units"] for r in rows if r["given_back"] == 0)
    assert lo <= hi
    assert rep["macs"]["after"] > 0.49 * rep["macs"]["before"]   # the units given back fill the budget
    smaller = driver.prune(resnet18, None, ratio=max(lo - 0.02, 0.0), round_to=1, fast=True).report
    assert smaller["macs"]["after"] > 0.5 * smaller["macs"]["before"] or math.isclose(lo, 0.0)


# ---- the banded allocation ----------------------------------------------------------------------------------------
def chain_net():
    """x -> a (16) -> b (16) -> c (16) -> out (4): three prunable groups of 16 with the same MACs per unit
    except at the ends (a's units also cost the 3-channel input conv, c's the 4-channel output conv)."""
    from helpers import Builder

    b = Builder()
    y = b.input("x", [1, 3, 8, 8])
    for name, cin in (("a", 3), ("b", 16), ("c", 16)):
        y = b.relu(b.conv(name, y, cin, 16))
    b.output(b.conv("out", y, 16, 4))
    return b.model()


@pytest.fixture(scope="module")
def chain():
    from helpers import analyse, group_of

    _, analysis = analyse(chain_net())
    groups = {n: group_of(analysis, n) for n in "abc"}
    return analysis, groups


def chain_scores(analysis, groups, cheap: str, cheap_scale: float = 1e-6):
    """Per-unit scores rising inside each group; the group `cheap` scaled down (near-zero importance)."""
    scores = {}
    for name, g in groups.items():
        for i, u in enumerate(g.units):
            scores[int(u)] = (1.0 + i / g.size) * (cheap_scale if name == cheap else 1.0)
    for u in analysis.unit_group:
        scores.setdefault(int(u), 1.0)
    return scores


def removed_fractions(plan, groups):
    return {n: len(plan.removed.get(g.id, [])) / g.size for n, g in groups.items()}


@pytest.fixture
def fixed_band(monkeypatch):
    """The band's mechanics at every budget: a fixed ±0.1 (the default opens only past BAND_OPENS)."""
    from spa import select as select_module

    monkeypatch.setattr(select_module, "BAND", 0.1)
    monkeypatch.setattr(select_module, "BAND_OPENS", 0.0)
    return 0.1


@pytest.mark.parametrize("budget", [0.7, 0.5, 0.3])
def test_banded_meets_the_budget_inside_the_band_and_thins_the_cheap_group_most(chain, budget, fixed_band):
    from spa.select import select

    BAND = fixed_band
    analysis, groups = chain
    scores = chain_scores(analysis, groups, cheap="b")
    uniform = select(analysis, scores, target_flops=budget, allocation="uniform")
    banded = select(analysis, scores, target_flops=budget, allocation="banded")
    glob = select(analysis, scores, target_flops=budget, allocation="global")
    goal = budget * analysis.total_macs
    assert analysis.macs_after(banded.roots(analysis)) <= goal
    # no more pruned than needed: one unit fewer anywhere would miss the budget, checked via the uniform
    # plan's MACs as a floor (the band exists to spend the budget no worse than uniform)
    assert analysis.macs_after(banded.roots(analysis)) >= 0.9 * analysis.macs_after(uniform.roots(analysis))
    r_u = removed_fractions(uniform, groups)
    r_b = removed_fractions(banded, groups)
    r = max(r_u.values())  # the uniform fraction (rounded per group; all groups are 16 wide)
    for name in "abc":  # no group thinned past the band (filling the budget may leave one wider than it)
        assert r_b[name] <= r + BAND + 1 / 16, (name, r_b, r)
    assert r_b["b"] > r_b["c"] and r_b["b"] > r_b["a"]  # the near-zero group goes first ...
    assert r_b["b"] <= r + BAND + 1 / 32          # ... but only to the band's edge
    assert removed_fractions(glob, groups)["b"] > r_b["b"] or budget == 0.7  # where global thins it further


@pytest.mark.parametrize("budget", [0.7, 0.5, 0.3])
def test_banded_fills_the_budget(chain, budget, fixed_band):
    """Steps of 4 units: the threshold's last step overshoots, and units are given back until one step more
    of any group would break the budget (a plan that stops short is compared at fewer MACs than it may use)."""
    from spa.select import select

    analysis, groups = chain
    scores = chain_scores(analysis, groups, cheap="b")
    plan = select(analysis, scores, target_flops=budget, allocation="banded", round_to=4)
    goal = budget * analysis.total_macs
    removed = {g.id: [int(g.units[i]) for i in plan.removed.get(g.id, [])] for g in groups.values()}
    assert analysis.macs_after(set().union(*removed.values())) <= goal
    for gid, units in removed.items():
        if units:
            back = sorted(units, key=lambda u: scores[u])[:-4]   # the 4 most important of its removed units
            others = set().union(*(v for k, v in removed.items() if k != gid))
            assert analysis.macs_after(others | set(back)) > goal, (gid, len(units))


def test_banded_honours_min_channels_round_to_and_exclude(chain, fixed_band):
    from spa.select import select

    analysis, groups = chain
    scores = chain_scores(analysis, groups, cheap="b")
    plan = select(analysis, scores, target_flops=0.5, allocation="banded", round_to=4, min_channels=12,
                  exclude=["out"])  # touches c's units only (b's reach conv c)
    kept = {n: g.size - len(plan.removed.get(g.id, [])) for n, g in groups.items()}
    assert kept["c"] == 16                           # --exclude
    assert all(k % 4 == 0 and k >= 12 for k in kept.values()), kept
    # the budget cannot be met under these constraints: pruned as far as they allow, like uniform
    assert kept == {"a": 12, "b": 12, "c": 16}


def test_banded_is_uniform_when_every_unit_is_alike(chain, fixed_band):
    """Equal importance per MAC everywhere: the band has nothing to trade; the plan keeps the uniform fraction
    up to the per-group rounding."""
    from spa.select import select

    analysis, groups = chain
    scores = {int(u): analysis.unit_macs.get(int(u), 1.0) for u in analysis.unit_group}
    uniform = removed_fractions(select(analysis, scores, target_flops=0.5, allocation="uniform"), groups)
    banded = removed_fractions(select(analysis, scores, target_flops=0.5, allocation="banded"), groups)
    assert all(abs(banded[n] - uniform[n]) <= 2 / 16 for n in "abc"), (banded, uniform)


def test_band_width_opens_with_the_uniform_fraction():
    from spa.select import BAND, BAND_OPENS, band_width

    assert band_width(0.0) == band_width(BAND_OPENS) == 0.0
    assert band_width(BAND_OPENS + BAND / 2) == pytest.approx(BAND / 2)
    assert band_width(0.99) == BAND


@pytest.mark.parametrize("budget", [0.7, 0.5, 0.3, 0.2])
def test_banded_is_uniform_while_the_band_is_closed(chain, budget, monkeypatch):
    """While the uniform fraction is at most BAND_OPENS the plan is the uniform one itself; past it the cheap
    group is thinned to the band's edge and the others keep more than uniform (plus a unit's rounding). A wider band
    than the default, to be visible on 16-unit groups."""
    from spa import select as select_module

    monkeypatch.setattr(select_module, "BAND", 0.15)
    monkeypatch.setattr(select_module, "BAND_OPENS", 0.3)
    analysis, groups = chain
    scores = chain_scores(analysis, groups, cheap="b")
    uniform = select_module.select(analysis, scores, target_flops=budget, allocation="uniform")
    banded = select_module.select(analysis, scores, target_flops=budget, allocation="banded")
    r = max(removed_fractions(uniform, groups).values())
    assert analysis.macs_after(banded.roots(analysis)) <= budget * analysis.total_macs
    if r <= 0.3:
        assert banded.removed == uniform.removed
    else:
        r_b = removed_fractions(banded, groups)  # the cheap group thinned at least as far, the others kept wider
        assert r <= r_b["b"] <= r + select_module.band_width(r) + 1 / 16, (r, r_b)
        assert min(r_b["a"], r_b["c"]) < r, (r, r_b)


# ---- --round-to auto: widths that suit the kernels ---------------------------------------------------------------
def widths_net():
    """x -> a (64) -> b (128) -> c (40) -> d (24) -> out (4): groups in each width tier of kernel_steps."""
    from helpers import Builder

    b = Builder()
    y = b.input("x", [1, 3, 8, 8])
    for name, cin, cout in (("a", 3, 64), ("b", 64, 128), ("c", 128, 40), ("d", 40, 24)):
        y = b.relu(b.conv(name, y, cin, cout))
    b.output(b.conv("out", y, 24, 4))
    return b.model()


@pytest.fixture(scope="module")
def widths():
    from helpers import analyse, group_of

    from spa.importance import score

    _, analysis = analyse(widths_net())
    return analysis, {n: group_of(analysis, n) for n in "abcd"}, score(analysis, "l2", "sum", "mean")


def kept_widths(plan, groups):
    return {n: g.size - len(plan.removed.get(g.id, [])) for n, g in groups.items()}


def test_kernel_steps_by_group_width(widths):
    """Multiples of 16 from 128 units up, of 4 from 32 up, narrower groups as they are."""
    from spa.select import kernel_steps

    analysis, groups, _ = widths
    steps = kernel_steps(analysis)
    assert {n: steps[g.id] for n, g in groups.items()} == {"a": 4, "b": 16, "c": 4, "d": 1}


@pytest.mark.parametrize("budget, auto, unrounded", [
    (0.7, {"a": 56, "b": 96, "c": 36, "d": 21}, {"a": 53, "b": 107, "c": 33, "d": 21}),
    (0.5, {"a": 48, "b": 80, "c": 28, "d": 18}, {"a": 45, "b": 90, "c": 28, "d": 17}),
    (0.3, {"a": 36, "b": 64, "c": 24, "d": 14}, {"a": 34, "b": 70, "c": 22, "d": 13}),
])
def test_auto_widths_are_multiples_within_one_step_and_meet_the_budget(widths, budget, auto, unrounded):
    """round_to='auto' with the uniform allocation: every group a multiple of its step and within one step of
    the uniform width, the budget met, and no group rounded down can go one step up within it. round_to=1 gives
    the plan without rounding (the uniform counts, a unit given back to a group where the budget allows: d and
    b above); a group of step 1 may differ by that unit between the two."""
    from spa.select import PruningPlan, kernel_steps, select

    analysis, groups, scores = widths
    steps = kernel_steps(analysis)
    goal = budget * analysis.total_macs
    plan = select(analysis, scores, target_flops=budget, allocation="uniform", round_to="auto")
    assert kept_widths(plan, groups) == auto
    assert kept_widths(select(analysis, scores, target_flops=budget, allocation="uniform", round_to=1),
                       groups) == unrounded
    assert analysis.macs_after(plan.roots(analysis)) <= goal
    for n, g in groups.items():
        step = steps[g.id]
        assert auto[n] % step == 0 and abs(auto[n] - unrounded[n]) <= max(step - 1, 1), (n, auto, unrounded)
        if auto[n] < unrounded[n]:  # rounded down: one step more would miss the budget
            bigger = PruningPlan({**plan.removed, g.id: plan.removed[g.id][step:]})
            assert analysis.macs_after(bigger.roots(analysis)) > goal, n


def test_auto_rounding_gives_way_when_it_cannot_meet_the_budget(widths):
    """At 1 % of the MACs the rounded widths (a and c at least 4, b at least 16) cannot get there: no rounding
    then, the plan of round_to=1."""
    from spa.select import select

    analysis, groups, scores = widths
    plan = select(analysis, scores, target_flops=0.01, allocation="uniform", round_to="auto")
    assert analysis.macs_after(plan.roots(analysis)) <= 0.01 * analysis.total_macs
    assert kept_widths(plan, groups) == {"a": 6, "b": 11, "c": 4, "d": 2}
    assert kept_widths(select(analysis, scores, target_flops=0.01, allocation="uniform", round_to=1), groups) == \
        {"a": 6, "b": 11, "c": 4, "d": 2}


def _attention_block(heads: int, head_dim: int, F: int, residual: bool):
    """q/k/v/o over `heads` heads of head_dim channels (one coarse unit each: fewer than 8 heads) and a ReLU MLP
    of F channels, with residual Adds when asked (then the model width is frozen by the input)."""
    from helpers import Builder, analyse

    T, D = 5, heads * head_dim
    b = Builder()
    x = b.input("x", [1, T, D])
    shape = b.i64("heads_shape", [1, T, heads, head_dim])
    q = b.op("Transpose", [b.op("Reshape", [b.matmul("wq", x, D, D), shape], name="q_rs")], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [b.op("Reshape", [b.matmul("wk", x, D, D), shape], name="k_rs")], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [b.op("Reshape", [b.matmul("wv", x, D, D), shape], name="v_rs")], perm=[0, 2, 1, 3])
    p = b.op("Softmax", [b.op("MatMul", [q, k], name="qk")], name="softmax", axis=-1)
    o = b.op("Transpose", [b.op("MatMul", [p, v], name="pv")], perm=[0, 2, 1, 3])
    o = b.matmul("wo", b.op("Reshape", [o, b.i64("merge_shape", [1, T, D])], name="merge"), D, D)
    o = b.op("Add", [x, o]) if residual else o
    y = b.matmul("w2", b.relu(b.matmul("w1", o, D, F)), F, D)
    b.output(b.op("Add", [o, y]) if residual else y)
    return analyse(b.model())[1]


def test_attention_heads_are_not_rounded():
    """Units that span several channels (a head: 16 channels of each of q, k, v) keep step 1; the MLP's 128
    channels go by 16, the attention output's 64 by 4."""
    from helpers import group_of

    from spa.select import kernel_steps, select, unit_channels

    analysis = _attention_block(heads=4, head_dim=16, F=128, residual=False)
    head, out, mlp = (group_of(analysis, n) for n in ("wq", "wo", "w1"))
    assert (head.size, unit_channels(analysis)[head.id]) == (4, 16)
    steps = kernel_steps(analysis)
    assert (steps[head.id], steps[out.id], steps[mlp.id]) == (1, 4, 16)
    scores = {int(u): 1.0 for u in analysis.unit_group}
    kept = {}
    for target in (0.5, 0.2):
        plan = select(analysis, scores, target_flops=target, allocation="uniform", round_to="auto")
        kept[target] = {n: g.size - len(plan.removed.get(g.id, [])) for n, g in (("head", head), ("out", out),
                                                                                   ("mlp", mlp))}
        assert analysis.macs_after(plan.roots(analysis)) <= target * analysis.total_macs
    # 0.5: the 4 heads are a coarse group, spared while the finer groups meet the budget (a multiple of 4 and 16);
    # 0.2: the finer groups at their limit do not meet it: the heads go (3 of 4), and the rest is given back
    assert kept == {0.5: {"head": 4, "out": 16, "mlp": 32}, 0.2: {"head": 1, "out": 20, "mlp": 32}}


def _kv_heads_and_mlp():
    """A coarse group of 2 units (2 heads of 16 channels: like a layer's 2 KV-head units) and an MLP of 64."""
    return _attention_block(heads=2, head_dim=16, F=64, residual=True)


def test_coarse_groups_are_spared_while_finer_groups_meet_the_budget():
    """A group of 2 units loses half its width to the first unit removed: the uniform allocation takes the budget
    from the MLP first (up to SPARED_FINE_LIMIT of it); then the coarse group loses a unit and the MLP gets back
    what that large step over-delivered; past that the MLP goes on. Every budget is met, the MACs fall as the
    budget tightens; --ratio still cuts every group alike."""
    from helpers import group_of

    from spa.select import SPARED_FINE_LIMIT, coarse_groups, select

    analysis = _kv_heads_and_mlp()
    heads, mlp = group_of(analysis, "wq"), group_of(analysis, "w1")
    assert (heads.size, mlp.size) == (2, 64) and coarse_groups(analysis) == {heads.id}
    scores = {int(u): float(u) for u in analysis.unit_group}
    kept, macs = {}, []
    for target in (0.9, 0.7, 0.6, 0.5, 0.4, 0.3):
        plan = select(analysis, scores, target_flops=target, allocation="uniform", round_to=1)
        kept[target] = (heads.size - len(plan.removed.get(heads.id, [])), mlp.size - len(plan.removed.get(mlp.id, [])))
        macs.append(analysis.macs_after(plan.roots(analysis)))
        assert target * analysis.total_macs - 0.02 * analysis.total_macs < macs[-1] <= target * analysis.total_macs
    assert macs == sorted(macs, reverse=True)
    limit_kept = 64 - round(SPARED_FINE_LIMIT * 64)
    assert [h for h, _ in kept.values()] == [2, 2, 1, 1, 1, 1]               # the MLP pays first
    assert kept[0.7][1] >= limit_kept and kept[0.6][1] > kept[0.7][1]       # and gets back the over-delivery
    assert kept[0.3][1] < limit_kept                                        # heads at their minimum: MLP goes on
    plan = select(analysis, scores, ratio=0.5)
    assert len(plan.removed[heads.id]) == 1 and len(plan.removed[mlp.id]) == 32


def test_round_to_auto_is_the_default_and_one_turns_it_off(resnet18):
    """The plain --target-flops command rounds (resnet18-small: groups of 16-128 units); --round-to 1 is the
    unrounded plan; --ratio stays exact."""
    from spa.options import PruneOptions

    assert PruneOptions().round_to == "auto"
    auto = driver.prune(resnet18, None, target_flops=0.5, fast=True).report
    off = driver.prune(resnet18, None, target_flops=0.5, round_to=1, fast=True).report
    for rep in (auto, off):
        assert rep["macs"]["after"] <= 0.5 * rep["macs"]["before"]
    step = {32: 4, 64: 4, 128: 16}
    rows = [r for r in auto["per_group"] if r["frozen_units"] == 0 and r["units"] in step]
    assert rows and all(r["kept"] % step[r["units"]] == 0 for r in rows), rows
    assert any(r["kept"] % 4 for r in off["per_group"] if r["frozen_units"] == 0 and r["units"] > 1)
    exact = driver.prune(resnet18, None, ratio=0.3, fast=True).report  # a ratio is an exact count per group
    assert all(r["kept"] == r["units"] - math.floor(0.3 * r["units"] + 0.5)
               for r in exact["per_group"] if r["frozen_units"] == 0)


@pytest.mark.parametrize("budget", [0.05, 0.03, 0.02])
def test_explicit_round_to_with_min_channels_meets_a_tight_budget(widths, budget):
    """--round-to 4 --min-channels 6 with the uniform allocation: where the minimum (8, the multiple above 6)
    keeps groups above the multiple below their uniform width, the rounded widths are bisected instead; the
    budget is still met (the old plan, every group rounded up, met these too)."""
    from spa.select import select

    analysis, groups, scores = widths
    plan = select(analysis, scores, target_flops=budget, allocation="uniform", round_to=4, min_channels=6)
    assert analysis.macs_after(plan.roots(analysis)) <= budget * analysis.total_macs
    assert all(k % 4 == 0 and k >= 8 for k in kept_widths(plan, groups).values()), kept_widths(plan, groups)


def test_the_report_names_the_coarse_groups_it_spared(tmp_path):
    """The run says why the heads were not cut: the JSON report lists the spared groups, the summary says so."""
    import onnx

    from spa import driver
    from spa.cli.summary import summary

    analysis = _kv_heads_and_mlp()
    src = tmp_path / "kv.onnx"
    onnx.save(analysis.ctx.g.model, str(src))
    rep = driver.prune(str(src), str(tmp_path / "out.onnx"), target_flops=0.8, fast=True).report
    assert rep["groups"]["coarse_spared"] == ["wq (+2)"] and rep["groups"]["pruned"] == 1
    assert "1 groups of fewer than 8 units (e.g. attention heads) kept whole" in summary(rep)
    rep = driver.prune(str(src), str(tmp_path / "out.onnx"), ratio=0.5, fast=True).report
    assert rep["groups"]["coarse_spared"] == [] and rep["groups"]["pruned"] == 2


@pytest.mark.parametrize("allocation", ["uniform", "banded", "global"])
def test_an_unreachable_budget_leaves_groups_that_count_no_macs(chain, allocation, monkeypatch):
    """A budget that cannot be met prunes as far as it lowers the MACs, not further: groups whose units count no
    MACs (convs inside If bodies whose shapes inference does not reach) are not emptied for nothing (they were:
    silero-vad's op18 export kept 1 of 128 channels with no MAC saved)."""
    from spa.select import select

    analysis, groups = chain
    uncounted = {int(u) for g in groups.values() for u in g.units}
    counted = analysis.macs_after
    monkeypatch.setattr(analysis, "macs_after", lambda removed: counted({u for u in removed if u not in uncounted}))
    scores = chain_scores(analysis, groups, cheap="b")
    assert not select(analysis, scores, target_flops=0.01, allocation=allocation).removed
    monkeypatch.setattr(analysis, "macs_after", counted)     # counted: as far as the constraints allow
    plan = select(analysis, scores, target_flops=0.01, allocation=allocation)
    assert all(g.size - len(plan.removed.get(g.id, [])) == 1 for g in groups.values())


def stem_net():
    """Two groups of 8 units (a stem) and one of 32: the uniform fraction moves the 8-unit groups in steps of an
    eighth, both at once."""
    from helpers import Builder

    b = Builder()
    y = b.input("x", [1, 3, 16, 16])
    y = b.relu(b.conv("a", y, 3, 8))
    y = b.relu(b.conv("b", y, 8, 8))
    y = b.relu(b.conv("c", y, 8, 32))
    b.output(b.gemm("fc", b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1), 32, 10))
    return b.model()


@pytest.mark.parametrize("budget, kept, least", [(0.5, [6, 5, 24], 0.48), (0.7, [7, 7, 24], 0.68)])
def test_uniform_gives_a_unit_back_where_its_rounding_overshot_the_budget(budget, kept, least):
    """The bisected uniform fraction stops where a step of the narrow groups crosses the budget, and that step
    can take far more than needed (0.645 of the MACs for a budget of 0.7, 0.465 for 0.5): groups get one
    unit (or one kernel step) back while the budget holds."""
    rep = driver.prune(stem_net(), None, target_flops=budget, fast=True).report
    assert [g["kept"] for g in rep["per_group"]][:3] == kept
    assert least < rep["macs"]["ratio"] <= budget
