"""Search over per-group sparsity allocations (issue 4): environment, budgets, rewards, policies.

    from spa.search import search
    plan, history = search("model.onnx", policy="random", target_flops=0.3, calib="calib.npz", evals=300,
                           recalibrate=True, seed=0)
    # the chosen plan goes through the same apply/verify path as any other selection:
    spa.search.prune_with_plan("model.onnx", "out.onnx", plan, history.problem, recalibrate=True,
                               calib="calib.npz")

Modules: `spa.budget` (cost model, exact budget projection; below this package), `graph` (group graph and features), `problem` (model +
analysis + scores + projector + graph), `reward` (evaluators; `CalibEvaluator`'s pieces: `samples`, `onepass`,
`refit`), `env` (gymnasium env), `policy` (interface and
registry), `controls` (uniform/global/lamp/random), the agents `ppo_gnn` (PPO over the GATv2 encoder of `gnn`),
`sac` (sequential SAC) and `dist` (RL-Pruner's distribution policy). Latency budgets (measured cost tables, the
latency model, end-to-end correction) come from `spa.latency`, the layer below. See docs/search.md.
"""
from __future__ import annotations

import os
import tempfile
import time

from .. import driver
from ..budget import BudgetProjector, CostModel, Projection
from ..errors import SpaError
from ..latency import fit_latency
from ..select import PruningPlan
from . import controls, dist, ppo_gnn, sac, sculpt_ppo  # noqa: F401  (register the controls and the agents)
from .env import GLOBAL_FEATURES, PruningEnv
from .executor import EXECUTORS, LocalExecutor, RayExecutor, make_executor
from .graph import EDGE_FEATURES, NODE_FEATURES, GroupGraph
from .policy import POLICIES, Policy, SearchResult, get_policy, register_policy
from .problem import SearchProblem
from .reward import CalibEvaluator, Evaluation, Evaluator, FunctionEvaluator

__all__ = ["EDGE_FEATURES", "EXECUTORS", "GLOBAL_FEATURES", "NODE_FEATURES", "POLICIES", "BudgetProjector",
           "CalibEvaluator", "CostModel", "Evaluation", "Evaluator", "FunctionEvaluator", "GroupGraph", "History",
           "LocalExecutor", "Policy", "Projection", "PruningEnv", "RayExecutor", "SearchProblem", "SearchResult",
           "get_policy", "prune_with_plan", "register_policy", "search"]


class History(list):
    """(evaluation index, reward, best reward so far) rows, plus `meta` (policy, budgets, evaluations, best
    reward and metrics, wall time, kept counts) and the `problem` it was searched on."""

    meta: dict
    problem: SearchProblem | None = None


def search(model_path, policy: str = "random", *, target_flops: float | None = None,
           target_params: float | None = None, calib=None, evals: int = 300, seed: int = 0,
           importance: str = "l2", aggregation: str = "sum", normalization: str = "mean",
           min_channels: int = 1, round_to: int = 1, max_ratio: float = 1.0, exclude: list[str] | None = None,
           input_shapes: dict | None = None, calib_samples: int | None = None, recalibrate: bool = False,
           reconstruct: bool | str = False, metric: str = "auto", alpha: float = 0.0, beta: float = 0.0,
           score_split: float | None = None, mode: str | None = None, policy_options: dict | None = None,
           threads: int | None = None, progress=None, problem: SearchProblem | None = None,
           evaluator: Evaluator | None = None, target_latency: float | None = None, latency_table=None,
           latency_batch: int = 1, loss: str = "auto", samples: int = 64, executor="local",
           ray_address: str | None = None, workers: int | None = None) -> tuple[PruningPlan, History]:
    """Search a per-group allocation for `model_path` under the budget(s) with `policy` (a name in POLICIES)
    within `evals` evaluations. Rewards come from the calibration data (`calib`: .npz, image folder or
    spa.calib.Calib; data-free synthesized inputs without it), optionally re-calibrated (`recalibrate`) or
    least-squares refit per candidate (`reconstruct`: True = passes.reconstruct's, "fast" = the same refit on
    fewer sampled positions in one pass; see CalibEvaluator). Returns the best plan and its History.
    `problem` / `evaluator` reuse ones built earlier (e.g. to compare policies on the same teacher outputs).
    `loss` / `samples`: the gradient criteria's loss and the number of synthesized inputs when there is no
    calibration data, as in the driver (`--loss`, `--synth-samples`).

    `target_latency` (ms, at `latency_batch` and the table's thread count) adds a latency budget predicted from
    `latency_table` (made by `spa-prune profile`; without one this machine is profiled with `threads`, default 1,
    and the table cached). The best candidate is then measured for real and corrected (`latency.fit_latency`);
    the plan returned is the corrected one, and `history.meta["latency"]` holds every probe and the final
    measured latency.

    `executor`: where candidates are evaluated - "local" (this process) or "ray" (Ray actors, `workers` of them,
    default one per CPU of the cluster; `ray_address` None starts a local instance, "auto" joins this machine's
    cluster, else a cluster address; see executor.py), or an executor object. The history and the plan are the
    local executor's for the same seed."""
    if evals < 1:
        raise SpaError(f"evals must be at least 1, got {evals}")
    cls = get_policy(policy)
    t0 = time.perf_counter()
    if problem is None:
        problem = SearchProblem.build(model_path, target_flops=target_flops, target_params=target_params,
                                      importance=importance, aggregation=aggregation, normalization=normalization,
                                      calib=calib, calib_samples=calib_samples, input_shapes=input_shapes,
                                      min_channels=min_channels, round_to=round_to, max_ratio=max_ratio,
                                      exclude=exclude, loss=loss, samples=samples, seed=seed,
                                      target_latency=target_latency,
                                      latency_table=latency_table, latency_batch=latency_batch, threads=threads)
    elif target_latency is not None and "latency" not in problem.budgets:
        raise SpaError("target_latency with a prebuilt problem: build it with SearchProblem.build(..., "
                       "target_latency=, latency_table=, latency_batch=, threads=)")
    if evaluator is None:
        evaluator = CalibEvaluator(problem, metric=metric, recalibrate=recalibrate, refit=reconstruct,
                                   alpha=alpha, beta=beta, score_split=score_split, threads=threads, seed=seed)
    agent = cls(**(policy_options or {}))
    runner = make_executor(executor, evaluator, ray_address, workers)
    t_setup = time.perf_counter() - t0
    try:
        env = PruningEnv(problem, evaluator, mode=mode or cls.mode, progress=progress, executor=runner)
        t1 = time.perf_counter()
        result = agent.search(env, evals, seed)
    finally:
        if runner is not executor:   # made here: stopped here
            runner.close()
    history = History(result.history)
    history.problem = problem
    history.meta = {"policy": policy, "budgets": dict(problem.budgets), "evaluations": len(result.history),
                    "best_reward": result.reward, "best_index": result.info.get("best_index"),
                    "metrics": result.info.get("metrics"), "costs": result.info.get("costs"),
                    "kept": result.kept.tolist(), "seed": seed, "setup_s": round(t_setup, 3),
                    "search_s": round(time.perf_counter() - t1, 3), "measured": evaluator.measured,
                    "measure_s": round(evaluator.seconds, 3), "executor": runner.describe()}
    plan = result.plan
    if "latency" in problem.budgets:
        plan = _fit_latency(problem, result, history.meta, target_latency)
    return plan, history


def _fit_latency(problem: SearchProblem, result: SearchResult, meta: dict, target_ms: float | None) -> PruningPlan:
    """The end-to-end correction of the best candidate (skipped when the table comes from another machine: it
    would measure this one); the corrected counts replace the search's in `meta`."""
    lm = problem.latency
    budget_ms = target_ms if target_ms is not None else problem.options["latency"]["target_ms"]
    info = {"budget_ms": budget_ms, "batch": lm.table.batch, "threads": lm.table.threads,
            "table_full_ms": round(lm.full_ms, 4), "search_kept": result.kept.tolist(),
            "search_predicted_ms": round(problem.projector.costs(result.kept)["latency"] * lm.full_ms, 4)}
    if not lm.table.same_machine():
        info["fit"] = (f"skipped: the table was measured on {lm.table.machine.get('cpu')}; measure and correct on "
                       "that machine")
        meta["latency"] = info
        return result.plan
    t0 = time.perf_counter()
    fit = fit_latency(problem, result.kept, budget_ms)
    info.update(fit.to_json(), fit_s=round(time.perf_counter() - t0, 3))
    meta["latency"] = info
    meta["kept"] = fit.kept.tolist()
    meta["costs"] = problem.projector.costs(fit.kept)
    return fit.plan


def prune_with_plan(model_path, output, plan: PruningPlan, problem: SearchProblem, **driver_kwargs):
    """Run the driver's full pipeline (apply, verify, optional reconstruction, save) with a searched plan.
    Driver keywords (calib, recalibrate, reconstruct, importance, input_shapes, ...) pass through."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="spa-plan-")
    os.close(fd)
    try:
        plan.save(path, problem.analysis)
        driver_kwargs.setdefault("input_shapes", problem.model.input_shapes)
        return driver.prune(model_path, output, plan_file=path, **driver_kwargs)
    finally:
        os.unlink(path)
