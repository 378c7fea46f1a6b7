"""Issue 4's first "Done when": every policy and control runs on every zoo model from its ONNX file and meets its
budget exactly.

For each (zoo model, exporter, budget, policy in POLICIES) the search runs on the exported ONNX file with a few
evaluations (real data-free rewards: CalibEvaluator on synthesized inputs), then:

* the best candidate's projected costs are within every budget, and equal the costs History.meta reports;
* it is maximal: no action group can take its next allowed count without breaking a budget;
* the plan applied through the driver (`prune_with_plan`: apply + verify) has exactly those MACs and parameters,
  the kept count of every group (the candidate's counts plus units given back to concat pieces), and passes
  verification.

Every zoo model is covered, the two transformers (vit_tiny, bert_layer) too: nothing in the search is CNN-specific
(their groups are heads and hidden widths), so there is no reason to skip them.

Default run: two small models x every policy (densenet121 at FLOPs 0.5: concat pieces and units given back;
mobilenet_v3_small at FLOPs 0.45 + params 0.4 with round-to 4: SE blocks, depthwise convs, two budgets at once),
and a budget no model the constraints allow can meet (googlenet small: FLOPs 0.3 with round-to 4, the smallest
allowed model keeps 0.337): every policy then returns that smallest model, as the driver's selection does.
`pytest -m slow tests/test_search_zoo.py`: every small zoo model x both exporters x both budgets x every policy,
and every full-size zoo model (torchscript export, FLOPs 0.5) x every policy. (FLOPs 0.45 rather than 0.3 in the
two-budget case because 0.3 is out of reach with round-to 4 for googlenet, vit_tiny and bert_layer small: their
smallest allowed models keep 0.337, 0.369 and 0.435.)
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("gymnasium")
models = pytest.importorskip("spa.models")

from spa.search import POLICIES, CalibEvaluator, SearchProblem, prune_with_plan, search
from spa.search.report import kept_units

EVALS = 3
FAST = {"ppo-gnn": {"hidden": 16, "batch": 2, "epochs": 1}, "sac": {"hidden": 16, "batch": 8},
        "dist": {"samples": 2}}
SINGLE_EVALUATION = ("uniform", "global", "lamp")
UNREACHABLE = {"target_flops": 0.3, "round_to": 4}
BUDGETS = {"flops50": {"target_flops": 0.5},
           "flops45-params40-round4": {"target_flops": 0.45, "target_params": 0.4, "round_to": 4}}


@functools.lru_cache(maxsize=2)
def setup(name: str, dynamo: bool, small: bool, budget: str):
    """The exported file, its search problem and a data-free evaluator, shared by the policies of one case."""
    path = str(models.zoo_path(name, dynamo=dynamo, small=small))
    problem = SearchProblem.build(path, **(UNREACHABLE if budget == "unreachable" else BUDGETS[budget]))
    evaluator = CalibEvaluator(problem, samples=8 if small else 2, threads=1)
    return path, problem, evaluator


def reachable(pj) -> bool:
    """The smallest model the constraints allow meets every budget."""
    floor = pj.costs(pj.minimum())
    return all(floor[k] <= t for k, t in pj.budgets.items())


def check_policy(name: str, dynamo: bool, small: bool, budget: str, policy: str) -> None:
    path, problem, evaluator = setup(name, dynamo, small, budget)
    pj = problem.projector
    plan, history = search(path, policy, evals=EVALS, seed=0, problem=problem, evaluator=evaluator,
                           policy_options=FAST.get(policy))
    assert len(history) == (1 if policy in SINGLE_EVALUATION else EVALS)
    kept = np.asarray(history.meta["kept"])
    costs = pj.costs(kept)
    for kind in problem.budgets:
        assert costs[kind] == pytest.approx(history.meta["costs"][kind], abs=1e-12)
    if reachable(pj):
        for kind, target in problem.budgets.items():
            assert costs[kind] <= target, (kind, costs[kind], target)
        assert not pj.growable(kept), "a group could keep one more step within the budget"
    else:   # as the driver's selection: as far as the constraints allow (the CLI warns)
        assert kept.tolist() == pj.minimum().tolist()
    report = prune_with_plan(path, None, plan, problem).report
    assert report["verification"]["status"] == "passed"
    assert report["macs"]["after"] == problem.analysis.macs_after(plan.roots(problem.analysis))
    assert report["macs"]["after"] / report["macs"]["before"] == pytest.approx(costs["flops"], abs=1e-12)
    assert report["params"]["after"] / report["params"]["before"] == pytest.approx(costs["params"], abs=1e-12)
    assert [r["kept"] for r in sorted(report["per_group"], key=lambda r: r["id"])] == kept_units(problem, plan)


def cases(names, exporters, budgets):
    """Model-major order, so the cached problem serves every policy of a model in turn."""
    return [pytest.param(n, d, b, p, id=f"{n}-{'dynamo' if d else 'torchscript'}-{b}-{p}")
            for n in names for d in exporters for b in budgets for p in POLICIES]


DEFAULT = [c for n, b in (("densenet121", "flops50"), ("mobilenet_v3_small", "flops45-params40-round4"))
           for c in cases([n], [False], [b])]


@pytest.mark.parametrize("name, dynamo, budget, policy", DEFAULT)
def test_every_policy_meets_its_budget(name, dynamo, budget, policy):
    check_policy(name, dynamo, True, budget, policy)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_unreachable_budget_gives_the_smallest_model(policy):
    _path, problem, _ = setup("googlenet", False, True, "unreachable")
    assert not reachable(problem.projector)
    check_policy("googlenet", False, True, "unreachable", policy)


@pytest.mark.slow
@pytest.mark.parametrize("name, dynamo, budget, policy", cases(models.ZOO_NAMES, [False, True], list(BUDGETS)))
def test_every_zoo_model_every_policy(name, dynamo, budget, policy):
    check_policy(name, dynamo, True, budget, policy)


@pytest.mark.slow
@pytest.mark.parametrize("name, dynamo, budget, policy", cases(models.ZOO_NAMES, [False], ["flops50"]))
def test_every_full_size_zoo_model_every_policy(name, dynamo, budget, policy):
    check_policy(name, dynamo, False, budget, policy)
