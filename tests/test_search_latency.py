"""spa.latency budgets in the search (issue 4): cost tables, the latency model, the latency budget kind, the end-to-end
correction and `spa-prune profile`. Deterministic tests time models with a fake timer; the slow one measures."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

models = pytest.importorskip("spa.models")

from spa import driver
from spa import latency as L
from spa.budget import CostModel
from spa.cli import main
from spa.errors import SpaError
from spa.latency import fit as latency_fit
from spa.latency import table as latency_table
from spa.search import FunctionEvaluator, SearchProblem, search
from spa.search.graph import STATIC_NODE_FEATURES


def fake_timer(proto, feeds) -> dict:
    """Deterministic 'timing': grows with every weight and with the input size (wider layers cost more)."""
    weights = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    size = max(int(np.prod(v.shape)) for v in feeds.values())
    ms = 0.002 + 1e-7 * weights * np.sqrt(size)
    return {"median": ms, "p10": ms, "p90": ms, "runs": 1}


class FakeTimer:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, proto, feeds):
        return fake_timer(proto, feeds)


@pytest.fixture(scope="module")
def resnet18():
    return str(models.zoo_path("resnet18", small=True))


@pytest.fixture(scope="module")
def loaded(resnet18):
    model = driver.load(resnet18)
    return model, driver.analyse(model)


@pytest.fixture(scope="module")
def table(loaded):
    model, analysis = loaded
    return L.profile(model, analysis, batch=2, timer=fake_timer)


@pytest.fixture(scope="module")
def table_path(table, tmp_path_factory):
    path = tmp_path_factory.mktemp("latency") / "resnet18.json"
    table.save(path)
    return path


@pytest.fixture(scope="module")
def problem(resnet18, table_path, table):
    return SearchProblem.build(resnet18, target_latency=0.6 * table.full_ms, latency_table=table_path,
                               latency_batch=2, threads=1)


# ---- the table -------------------------------------------------------------------------------------------------
def test_table_covers_every_weight_layer(loaded, table):
    """Every Conv/Gemm of ResNet-18 is in the table; equal layers share a signature (measured once)."""
    model, _ = loaded
    weight_layers = [n.name for n in model.graph.nodes if n.op_type in ("Conv", "Gemm")]
    assert [la["node"] for la in table.layers] == weight_layers
    assert len(table.signatures) < len(table.layers)
    stem = next(la for la in table.layers if la["node"] == weight_layers[0])
    assert not stem["in_prunable"] and stem["out_prunable"]  # the model input cannot shrink
    sig = table.signatures[stem["signature"]]
    assert sig["in_counts"] == [3] and sig["out_counts"] == [2, 4, 8, 16]  # above 8 channels: whole blocks
    gemm = table.signatures[table.layers[-1]["signature"]]
    assert gemm["in_counts"] == [16, 32, 64, 96, 128] and gemm["out_counts"] == [10]  # no blocks, frozen output
    for sig in table.signatures.values():
        ms = np.asarray(sig["ms"])
        assert (np.diff(ms, axis=0) >= 0).all() and (np.diff(ms, axis=1) >= 0).all()  # monotone


def test_table_round_trip_and_checks(loaded, table, table_path, tmp_path):
    model, analysis = loaded
    back = L.LatencyTable.load(table_path)
    assert back.to_json() == json.loads(json.dumps(table.to_json()))
    d = json.loads(table_path.read_text())
    assert d["format"] == L.FORMAT and d["batch"] == 2 and d["threads"] == 1
    assert d["machine"]["cpu"] and d["machine"]["cores"] >= 1 and d["onnxruntime"]
    assert d["fingerprint"] == L.fingerprint(model) == L.fingerprint(driver.load(model.source))
    cm = CostModel(analysis)
    assert L.LatencyModel(back, cm, analysis).predict_removed(np.zeros(cm.n_units, bool)) == pytest.approx(table.full_ms)

    other = driver.load(str(models.zoo_path("mobilenet_v2", small=True)))
    with pytest.raises(SpaError, match="made for another model"):
        L.table_for(other, driver.analyse(other), table_path, batch=2)
    with pytest.raises(SpaError, match="batch 2, not 8"):
        L.table_for(model, analysis, table_path, batch=8)
    d["machine"] = {"cpu": "Some Other CPU", "cores": 64}
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="another setup.*Some Other CPU"):
        carried = L.table_for(model, analysis, moved, batch=2)
    assert not carried.same_machine()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SpaError, match="not a spa-prune latency table"):
        L.LatencyTable.load(tmp_path / "bad.json")


def test_profile_on_the_fly_is_cached(resnet18, monkeypatch, tmp_path):
    monkeypatch.setenv("SPA_LATENCY_CACHE", str(tmp_path))
    monkeypatch.setattr(latency_table, "Timer", FakeTimer)
    p = SearchProblem.build(resnet18, target_latency=1e-3, latency_batch=1)
    files = list(tmp_path.glob("*-b1-t1.json"))
    assert len(files) == 1 and files[0].name.startswith(L.fingerprint(p.model))

    def no_profile(*args, **kwargs):
        raise AssertionError("profiled again instead of reading the cache")

    monkeypatch.setattr(latency_table, "profile", no_profile)
    again = SearchProblem.build(resnet18, target_latency=1e-3, latency_batch=1)
    assert again.latency.full_ms == p.latency.full_ms


# ---- the latency model -----------------------------------------------------------------------------------------
def test_interpolation_exact_at_grid_points_and_bilinear_between():
    rng = np.random.default_rng(0)
    gx = np.array([[0.25, 0.5, 1.0], [1.0, 2.0, 3.0]])  # the second layer: one point (padded beyond 1)
    gy = np.array([[0.125, 0.5, 1.0], [0.5, 1.0, 2.0]])
    ms = np.cumsum(np.cumsum(rng.random((2, 3, 3)), axis=1), axis=2)
    ms[1, 1:, :] = ms[1, :1, :]  # padding repeats the edge
    ms[1, :, 2] = ms[1, :, 1]
    for i in range(3):
        for j in range(3):
            x = np.array([gx[0, i], 1.0])
            y = np.array([gy[0, j], gy[1, min(j, 1)]])
            got = L.interpolate(gx, gy, ms, x, y)
            assert got[0] == pytest.approx(ms[0, i, j], abs=1e-15)
            assert got[1] == pytest.approx(ms[1, 0, min(j, 1)], abs=1e-15)
    mid = L.interpolate(gx, gy, ms, np.array([0.75, 1.0]), np.array([0.75, 0.75]))[0]
    assert mid == pytest.approx(ms[0, 1:3, 1:3].mean())
    below = L.interpolate(gx, gy, ms, np.array([0.1, 1.0]), np.array([0.05, 1.0]))[0]
    assert below == ms[0, 0, 0]


def test_conv_widths_count_in_whole_blocks():
    """Above one block of 8 channels a partial block costs a whole one; below it, time scales with width."""
    size, align = np.array([16.0, 32.0, 10.0, 16.0]), np.array([8.0, 8.0, 8.0, 1.0])
    f = np.array([9 / 16, 17 / 32, 9 / 10, 9 / 16])
    assert L.LatencyModel._blocks(f, size, align).tolist() == [1.0, 0.75, 1.0, 9 / 16]
    assert L.LatencyModel._blocks(np.array([3 / 16, 3 / 32, 0.5, 0.5]), size, align).tolist() == [3 / 16, 3 / 32,
                                                                                                   0.5, 0.5]
    assert L.LatencyModel._blocks(np.array([0.5, 0.25, 0.8, 1.0]), size, align).tolist() == [0.5, 0.25, 0.8, 1.0]


def test_model_reads_its_table_at_grid_points(problem):
    """Through the CostModel factors: each layer's grid points come back exactly (before calibration)."""
    lm = problem.latency
    for layer in range(len(lm.names)):
        for i in range(lm.gx.shape[1]):
            for j in range(lm.gy.shape[1]):
                if lm.gx[layer, i] > 1 or lm.gy[layer, j] > 1:
                    continue
                got = L.interpolate(lm.gx[layer:layer + 1], lm.gy[layer:layer + 1], lm.ms[layer:layer + 1],
                                    lm.gx[layer, i:i + 1], lm.gy[layer, j:j + 1])
                assert got[0] == lm.ms[layer, i, j]


def test_unpruned_prediction_equals_measured(problem, table):
    pj = problem.projector
    assert pj.costs(pj.full())["latency"] == pytest.approx(1.0, abs=1e-12)
    assert problem.latency.predict_removed(np.zeros(pj.cost_model.n_units, bool)) == pytest.approx(table.full_ms)
    # a smaller model is predicted faster, the smallest the constraints allow fastest
    assert pj.costs(pj.minimum())["latency"] < pj.costs(pj.counts_for_ratios(np.full(len(pj.action_groups),
                                                                                        0.5)))["latency"] < 1.0


def test_latency_share_feature(problem):
    """A layer's time counts for its input and its output group (like flops_share): the column sums to between
    the layers' share of the end-to-end time and twice that."""
    lm = problem.latency
    col = problem.graph.static[:, STATIC_NODE_FEATURES.index("latency_share")]
    layers = lm.scale * lm.layers_full / lm.full_ms
    assert (col >= 0).all() and layers - 1e-6 <= col.sum() <= 2 * layers + 1e-6
    assert col[problem.projector.action_groups].min() > 0


# ---- the budget ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, round_to, flops", [(0.6, 1, None), (0.4, 4, None), (0.5, 1, 0.5)])
def test_projection_meets_latency_budget_maximally(resnet18, problem, table_path, table, target, round_to, flops):
    p = SearchProblem.build(resnet18, target_latency=target * table.full_ms, latency_table=table_path,
                            latency_batch=2, round_to=round_to, target_flops=flops, scores=problem.scores)
    pj = p.projector
    assert pj.budgets["latency"] == pytest.approx(target)
    rng = np.random.default_rng(0)
    for rho in [rng.random(len(pj.action_groups)) for _ in range(3)] + [np.full(len(pj.action_groups), 0.5)]:
        proj = pj.project(rho)
        assert proj.feasible and proj.costs["latency"] <= target + 1e-12
        if flops is not None:
            macs = p.analysis.macs_after(pj.plan(proj.kept).roots(p.analysis)) / p.analysis.total_macs
            assert macs <= flops and macs == pytest.approx(proj.costs["flops"], abs=1e-12)
        assert not pj.growable(proj.kept)


def test_depthwise_layers_and_budget(tmp_path):
    """MobileNetV2: depthwise convs are timed on a 1-D grid of kept groups (input tied to output), and the
    latency budget is met maximally there too."""
    path = str(models.zoo_path("mobilenet_v2", small=True))
    model = driver.load(path)
    analysis = driver.analyse(model)
    table = L.profile(model, analysis, batch=1, timer=fake_timer)
    dw = [la for la in table.layers if la["tied"]]
    assert dw and all(table.signatures[la["signature"]]["in_counts"] == [1] for la in dw)
    assert all(len(table.signatures[la["signature"]]["out_counts"]) > 1 for la in dw)
    p = SearchProblem.build(path, target_latency=0.5 * table.full_ms, latency_table=table, latency_batch=1,
                            round_to=2)
    pj = p.projector
    assert pj.costs(pj.full())["latency"] == pytest.approx(1.0)
    for seed in range(2):
        proj = pj.project(np.random.default_rng(seed).random(len(pj.action_groups)))
        assert proj.feasible and proj.costs["latency"] <= 0.5 and not pj.growable(proj.kept)


def test_flops_only_problem_is_unchanged(resnet18, problem):
    """Without a latency budget or table nothing predicts latency (costs, budgets and features as before)."""
    p = SearchProblem.build(resnet18, target_flops=0.5, scores=problem.scores)
    assert p.latency is None and set(p.projector.costs(p.projector.full())) == {"flops", "params"}
    assert (p.graph.static[:, STATIC_NODE_FEATURES.index("latency_share")] == 0).all()


def test_latency_budget_errors(resnet18, problem, table_path, table):
    with pytest.raises(SpaError, match="not below the unpruned model"):
        SearchProblem.build(resnet18, target_latency=2 * table.full_ms, latency_table=table_path, latency_batch=2,
                            scores=problem.scores)
    with pytest.raises(SpaError, match="must be > 0"):
        SearchProblem.build(resnet18, target_latency=0.0, latency_table=table_path, latency_batch=2,
                            scores=problem.scores)
    with pytest.raises(SpaError, match="latency budget needs a latency table"):
        type(problem.projector)(problem.analysis, problem.scores, {"latency": 0.5})


# ---- end-to-end correction -------------------------------------------------------------------------------------
def linear_clock(problem, offset: float, per_flop: float):
    """Fake 'measured' latency: an offset plus a cost proportional to the MACs kept (deterministic)."""
    calls = []

    def measure(kept):
        calls.append(kept.copy())
        return offset + per_flop * problem.projector.costs(kept)["flops"]

    return measure, calls


@pytest.mark.parametrize("offset, per_flop", [(0.05, 1.0), (0.3, 0.4), (0.0, 3.0)])
def test_fit_latency_converges_into_the_band(problem, table, offset, per_flop):
    pj = problem.projector
    kept = pj.project(np.random.default_rng(1).random(len(pj.action_groups))).kept
    budget = offset + 0.5 * per_flop
    measure, calls = linear_clock(problem, offset, per_flop)
    fit = L.fit_latency(problem, kept, budget, measure=measure, max_steps=12)
    assert fit.converged and 0.9 * budget <= fit.measured_ms <= budget
    assert fit.measured_ms == pytest.approx(measure(fit.kept))
    # repeated allocations are not re-timed; an in-band one is timed twice more (the +1: measure(fit.kept) above)
    timed = {tuple(p.kept): p.repeats for p in fit.probes}
    assert len(fit.probes) <= 12 and len(calls) == len(timed) + 2 * sum(bool(r) for r in timed.values()) + 1
    first = fit.probes[0]
    assert first.kept == kept.tolist() and first.fraction == pytest.approx(pj.budgets["latency"])
    for p in fit.probes:
        assert p.predicted_ms == pytest.approx(pj.costs(np.array(p.kept))["latency"] * table.full_ms)
    assert fit.plan.removed == pj.plan(fit.kept).removed
    # the same allocation shape: groups keep their order of keep ratios (up to rounding)
    ag = pj.action_groups
    r0, r1 = kept[ag] / pj.sizes[ag], fit.kept[ag] / pj.sizes[ag]
    assert np.corrcoef(r0, r1)[0, 1] > 0.5


def test_fit_latency_in_band_needs_one_probe(problem):
    pj = problem.projector
    kept = pj.project(np.full(len(pj.action_groups), 0.5)).kept
    fit = L.fit_latency(problem, kept, 1.0, measure=lambda k: 0.95)
    assert fit.converged and len(fit.probes) == 1 and (fit.kept == kept).all()


def test_fit_latency_reports_when_out_of_reach(problem):
    """A budget no allocation meets: the probes stop at the smallest model (or the step limit), the fastest probe
    is returned, not converged."""
    pj = problem.projector
    kept = pj.project(np.full(len(pj.action_groups), 0.5)).kept
    measure, _ = linear_clock(problem, 1.0, 1.0)
    fit = L.fit_latency(problem, kept, 0.5, measure=measure, max_steps=20)
    assert not fit.converged and len(fit.probes) < 20 and not fit.probes[-1].feasible
    assert fit.probes[-1].kept == pj.minimum().tolist()
    assert fit.measured_ms == min(p.measured_ms for p in fit.probes)
    fit = L.fit_latency(problem, kept, 0.5, measure=measure, max_steps=2)
    assert not fit.converged and len(fit.probes) == 2
    assert fit.to_json()["probes"][0].keys() == {"fraction", "predicted_ms", "measured_ms", "feasible"}
    # the whole model is faster than the band: one probe at fraction 1 ends it, the largest under budget is kept
    measure, _ = linear_clock(problem, 0.0, 1.0)
    fit = L.fit_latency(problem, kept, 5.0, measure=measure)
    assert not fit.converged and fit.probes[-1].fraction == 1.0 and len(fit.probes) == 2
    assert fit.measured_ms == pytest.approx(1.0)


def test_search_runs_the_correction(resnet18, problem, table, monkeypatch):
    """search() with a latency budget measures and corrects the best candidate and reports every probe."""
    measure, _ = linear_clock(problem, 0.01, 0.9 * table.full_ms)
    monkeypatch.setattr(latency_fit, "plan_timer", lambda problem, runs=30, warmup=5: measure)
    ev = FunctionEvaluator(problem, lambda r: -float(np.abs(r - 0.6).sum()))
    budget = 0.6 * table.full_ms
    plan, history = search(resnet18, "random", evals=5, problem=problem, evaluator=ev, target_latency=budget)
    lat = history.meta["latency"]
    assert lat["converged"] and 0.9 * budget <= lat["measured_ms"] <= budget
    assert lat["probes"] and lat["budget_ms"] == pytest.approx(budget, abs=1e-4) and lat["batch"] == 2
    assert plan.removed == problem.plan(np.array(history.meta["kept"])).removed
    with pytest.raises(SpaError, match="prebuilt problem"):
        flops_only = SearchProblem.build(resnet18, target_flops=0.5, scores=problem.scores)
        search(resnet18, "uniform", evals=1, problem=flops_only, evaluator=ev, target_latency=budget)


def test_search_skips_the_correction_with_a_carried_table(resnet18, problem, table_path, tmp_path):
    """A table from another machine predicts the budget; measuring here would correct towards this machine."""
    d = json.loads(table_path.read_text())
    d["machine"] = {"cpu": "Deployment CPU", "cores": 4}
    carried = tmp_path / "carried.json"
    carried.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="Deployment CPU"):
        p = SearchProblem.build(resnet18, target_latency=0.6 * d["full"]["median"], latency_table=carried,
                                latency_batch=2, scores=problem.scores)
    ev = FunctionEvaluator(p, lambda r: -float(np.abs(r - 0.6).sum()))
    plan, history = search(resnet18, "uniform", evals=1, problem=p, evaluator=ev)
    lat = history.meta["latency"]
    assert lat["fit"].startswith("skipped") and "probes" not in lat
    assert lat["search_predicted_ms"] <= 0.6 * d["full"]["median"] + 1e-3
    assert plan.removed == p.plan(np.array(history.meta["kept"])).removed


# ---- measuring and the CLI -------------------------------------------------------------------------------------
def test_measure_latency_at_a_batch(resnet18):
    stats = L.measure_latency(resnet18, batch=3, threads=1, runs=5, warmup=1)
    assert stats["batch"] == 3 and stats["threads"] == 1 and stats["runs"] == 5
    assert 0 < stats["p10"] <= stats["median"] <= stats["p90"]
    with pytest.raises(SpaError, match="batch must be"):
        L.measure_latency(resnet18, batch=0)


def test_cli_profile_writes_a_table(resnet18, tmp_path, capsys):
    out = tmp_path / "t" / "table.json"
    assert main(["profile", resnet18, "-o", str(out), "--runs", "3", "--batch", "2"]) == 0
    err = capsys.readouterr().err
    assert "distinct signatures" in err and "end to end" in err
    table = L.LatencyTable.load(out)
    model = driver.load(resnet18)
    table.check(L.fingerprint(model), batch=2, threads=1)
    assert table.full["runs"] >= L.MIN_RUNS and table.runs == 3
    assert not list(out.parent.glob(".*tmp"))  # written atomically, no temp file left


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model.onnx", "-o", "{out}"], "not found"),
    (["{model}", "-o", "{out}", "--batch", "0"], "--batch must be at least 1"),
    (["{model}", "-o", "{out}", "--runs", "x"], "invalid int"),
    (["{model}"], "required"),
    (["{model}", "-o", "{dir}"], "is a directory"),
    (["{model}", "-o", "{out}", "--input-shape", "nope=1,3,32,32"], "not a model input"),
])
def test_cli_profile_bad_input_exits_2(resnet18, tmp_path, capsys, args, message):
    out = tmp_path / "table.json"
    argv = [a.format(model=resnet18, out=out, dir=tmp_path) for a in args]
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


# ---- a real model, measured ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name, small, clock, round_to", [("resnet56", False, "wall", 8), ("resnet56", False, "cpu", 8)])
def test_latency_budget_met_on_real_model(name, small, clock, round_to):
    """Batch 8, 1 thread, budget 0.6 x the measured end-to-end latency (the table's): the corrected plan's
    measured median (>= 30 runs) is within 10 % of the budget. Prints the probes and the table's prediction error
    on them. The cpu clock is for a machine shared with other work, where wall-clock medians of a long model
    measure the scheduler; round_to keeps widths on onnxruntime's fast multiples (docs/search.md)."""
    path = str(models.zoo_path(name, small=small))
    model = driver.load(path)
    table = L.profile(model, driver.analyse(model), batch=8, threads=1, clock=clock)
    budget = 0.6 * table.full_ms
    problem = SearchProblem.build(path, target_latency=budget, latency_table=table, latency_batch=8, threads=1,
                                  round_to=round_to)
    ev = FunctionEvaluator(problem, lambda r: -float(np.abs(r - 0.6).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same machine, same threads: no warning
        _, history = search(path, "random", evals=10, problem=problem, evaluator=ev, target_latency=budget, seed=0)
    lat = history.meta["latency"]
    errors = [p["predicted_ms"] / p["measured_ms"] - 1 for p in lat["probes"]]
    print(f"\n{name} ({clock} clock, round_to {round_to}): table {table.full_ms:.3f} ms {table.full['blocks']}, "
          f"budget {budget:.3f} ms, final measured {lat['measured_ms']:.3f} ms ({lat['measured_over_budget']:.3f} x "
          f"budget, converged {lat['converged']}), probes (fraction, predicted, measured) "
          f"{[(p['fraction'], p['predicted_ms'], p['measured_ms']) for p in lat['probes']]}, prediction errors "
          f"{[round(e, 3) for e in errors]}")
    assert abs(lat["measured_ms"] / budget - 1) <= 0.10


def test_fit_latency_confirms_an_in_band_probe_before_it_stops(problem):
    """A quiet second made the first measurement land in the band; two more say it is 15 % over: the fit goes on
    and ends on an allocation whose median of three measurements is in the band."""
    pj = problem.projector
    kept = pj.project(np.full(len(pj.action_groups), 0.5)).kept
    measure, _ = linear_clock(problem, 0.0, 1.0)
    budget = 0.87 * measure(kept)                 # the allocation is really 15 % over the budget
    first = iter([0.95 * budget])                 # ... but its first measurement is in the band

    def noisy(k):
        return next(first, None) or measure(k)

    fit = L.fit_latency(problem, kept, budget, measure=noisy, max_steps=12)
    p0 = fit.probes[0]
    assert p0.repeats == [pytest.approx(0.95 * budget), pytest.approx(budget / 0.87), pytest.approx(budget / 0.87)]
    assert p0.measured_ms == pytest.approx(budget / 0.87) and p0.to_json()["repeats_ms"][1] == round(p0.repeats[1], 4)
    assert fit.converged and (fit.kept != kept).any() and 0.9 * budget <= fit.measured_ms <= budget
    final = next(p for p in fit.probes if (np.array(p.kept) == fit.kept).all())
    assert len(final.repeats) == 3 and fit.measured_ms == pytest.approx(np.median(final.repeats))
    without = L.fit_latency(problem, kept, budget, measure=lambda k: 0.95 * budget, confirm=0)
    assert without.converged and len(without.probes) == 1 and without.probes[0].repeats is None


def test_fit_latency_leaves_the_band_edge_for_its_middle(problem):
    """In the band but at its lower edge (0.905 x budget): the fit goes on towards 0.95 x budget, where the next
    reading's noise does not take it out; with `settle` as wide as the band it stops at once."""
    pj = problem.projector
    kept = pj.project(np.full(len(pj.action_groups), 0.5)).kept
    measure, _ = linear_clock(problem, 0.0, 1.0)
    budget = measure(kept) / 0.905
    fit = L.fit_latency(problem, kept, budget, measure=measure, max_steps=12)
    assert fit.converged and len(fit.probes) > 1
    assert abs(fit.measured_ms - 0.95 * budget) <= 0.025 * budget
    assert fit.measured_ms > fit.probes[0].measured_ms
    wide = L.fit_latency(problem, kept, budget, measure=measure, settle=0.05)
    assert wide.converged and len(wide.probes) == 1 and wide.measured_ms == pytest.approx(0.905 * budget)
