"""spa-prune IN OUT --policy NAME: search a per-group allocation, then prune with the best plan through the
driver's apply/verify/reconstruction path. Every check that can fail runs before the search."""
from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import time

from .. import driver
from ..errors import SpaError
from ..fileio import StagedOutputs, check_outputs
from ..options import ROUND_AUTO, PruneOptions, check_counts, check_data_options, check_number, resolved_defaults
from .common import (
    clear_progress,
    driver_kwargs,
    finish,
    parse_dbscan,
    stage_progress,
)

REWARD_METRICS = ("auto", "accuracy", "agreement", "kl", "rel_l2")   # spa.search.reward.METRICS
METRIC_ALIASES = {"top1": "agreement", "l2": "rel_l2"}
SEARCH_ONLY = (("evals", "--evals"), ("policy_option", "--policy-option"),
               ("search_recalibrate", "--search-recalibrate"), ("search_curve", "--search-curve"),
               ("sparsity_plot", "--sparsity-plot"), ("target_latency", "--target-latency"),
               ("latency_table", "--latency-table"), ("latency_batch", "--latency-batch"), ("threads", "--threads"),
               ("ray_address", "--ray-address"))
# flags whose spa.search.search() parameters are optional features: wired when search() takes them
OPTIONAL_SEARCH_ARGS = (("target_latency", "--target-latency"), ("latency_table", "--latency-table"),
                        ("latency_batch", "--latency-batch"), ("threads", "--threads"))
SINGLE_EVALUATION = ("uniform", "global", "lamp")   # controls that evaluate one candidate whatever --evals says


def reject_search_flags(args) -> None:
    """A search option without a search is a mistake, not a no-op."""
    given = [flag for dest, flag in SEARCH_ONLY if getattr(args, dest) not in (None, [])]
    if args.metric != "auto":
        given.append("--metric")
    if args.search_refit != "auto":
        given.append("--search-refit")
    if args.executor != "local":
        given.append("--executor")
    if given:
        raise SpaError(f"{given[0]} needs --policy NAME (an allocation search)")


def run_search(args) -> int:
    """--policy (or --target-params): search a per-group allocation, then prune with the best plan through the
    driver's apply/verify/reconstruction path. Every check that can fail runs before the search."""
    S = _search_module()
    if args.max_drop is not None:
        raise SpaError("--max-drop is not available with --policy yet (the search picks the plan; prune it "
                       "without --policy to use the guard)")
    defaults = resolved_defaults(PruneOptions(importance=args.importance, fast=args.fast,
                                              reconstruct=args.reconstruct))
    args.importance, args.reconstruct = defaults["importance"], defaults["reconstruct"]
    if args.round_to == ROUND_AUTO:  # the search chooses unit counts itself: no rounding unless asked for
        args.round_to = 1
    policy = args.policy or "global"
    cls = S.get_policy(policy)
    _check_search_args(args)
    options = _policy_options(cls, policy, args.policy_option)
    optional = _optional_search_kwargs(args, S)
    # the cluster is reached (a bad address refused) before any work; a connection made here is closed here
    connected = args.executor == "ray" and S.executor.connect(args.ray_address)
    try:
        return _search_and_prune(args, S, policy, options, optional)
    finally:
        if connected:
            S.executor.import_ray().shutdown()


def _search_and_prune(args, S, policy: str, options: dict, optional: dict) -> int:
    """The search, then the best plan through the driver's path (every check has passed)."""
    evals = 300 if args.evals is None else args.evals
    refit = _search_refit(args)
    recalibrate = (args.calib is not None and not refit) if args.search_recalibrate is None \
        else args.search_recalibrate
    metric = METRIC_ALIASES.get(args.metric, args.metric)
    progress = SearchProgress(policy, 1 if policy in SINGLE_EVALUATION else evals, args.quiet)
    progress.setup()
    t0 = time.perf_counter()
    problem = _search_problem(args, S, optional)
    _check_strict(args, problem.analysis)
    unreachable = _unreachable_budget(problem)
    setup_s = time.perf_counter() - t0
    plan, history = S.search(args.input, policy, problem=problem, evals=evals, seed=args.seed, metric=metric,
                             recalibrate=recalibrate, reconstruct=refit, policy_options=options,
                             progress=progress, executor=args.executor, ray_address=args.ray_address, **optional)
    progress.close()
    show = stage_progress(args.quiet)
    outputs = StagedOutputs()  # OUT, --save-plan, the plots and --report are renamed into place together
    with outputs:
        res = S.prune_with_plan(args.input, args.output, plan, history.problem, progress=show, outputs=outputs,
                                **driver_kwargs(args))
        clear_progress(show)
        from ..search.report import search_section
        section = search_section(history, plan, metric=metric, policy_options=options, recalibrate=recalibrate,
                                 setup_s=setup_s, curve=args.search_curve, sparsity_plot=args.sparsity_plot)
        _draw_plots(args, history, section, outputs)
        section["feasible"] = unreachable is None
        section["refit"] = refit or "none"
        if unreachable:
            res.report["warnings"].append(unreachable)
        res.report["search"] = section
        return finish(args, res.report, outputs)


def _search_refit(args):
    """The reward's refit: False, "fast" or True (CalibEvaluator's refit). By default the search scores what
    the written model will be: refit when the final path reconstructs."""
    choice = args.search_refit
    if choice == "auto":
        choice = "fast" if args.reconstruct else "none"
    return {"none": False, "fast": "fast", "full": True}[choice]


def _search_module():
    try:
        from .. import search  # gymnasium and torch: optional dependencies
    except ImportError as e:
        raise SpaError(f"the allocation search needs gymnasium and torch: pip install spa-prune[search] ({e})")
    return search


def _check_search_args(args) -> None:
    """One-line errors for every bad combination, before the model is even loaded."""
    for value, flag in ((args.ratio, "--ratio"), (args.plan, "--plan")):
        if value is not None:
            raise SpaError(f"--policy searches the allocation under --target-flops/--target-params; it does not "
                           f"combine with {flag}")
    if args.steps != 1 or args.finetune_data:
        raise SpaError("--policy searches a one-shot allocation; it does not combine with --steps or --finetune-data")
    if args.allocation:
        raise SpaError("--allocation is the selection without --policy; search with --policy global or uniform")
    if args.ray_address is not None and args.executor != "ray":
        raise SpaError("--ray-address needs --executor ray")
    if args.target_flops is None and args.target_params is None and args.target_latency is None:
        raise SpaError("--policy needs a budget: --target-flops F, --target-params P and/or --target-latency MS")
    _check_search_numbers(args)
    if args.calib is None:
        for flag, given in (("--search-recalibrate", args.search_recalibrate), ("--recalibrate", args.recalibrate),
                            ("--metric accuracy", args.metric == "accuracy")):
            if given:
                raise SpaError(f"{flag} needs calibration data (--calib FILE.npz or an image folder)")
    if args.no_verify and (args.reconstruct or args.recalibrate or args.compensate or args.fold_constants):
        raise SpaError("reconstruction and compensation need verification (they report fidelity); drop --no-verify")
    check_data_options(positions=args.positions, damp=args.damp, samples=args.synth_samples,
                       dbscan=parse_dbscan(args.dbscan), seed=args.seed)
    _check_search_paths(args)


def _check_search_numbers(args) -> None:
    for flag, value in (("--target-flops", args.target_flops), ("--target-params", args.target_params),
                        ("--max-ratio", args.max_ratio)):
        check_number(flag, value, low=0.0, low_open=True, high=1.0)
    check_counts([("--evals", args.evals), ("--min-channels", args.min_channels), ("--round-to", args.round_to),
                  ("--latency-batch", args.latency_batch), ("--threads", args.threads),
                  ("--calib-samples", args.calib_samples)])
    check_number("--target-latency", args.target_latency, low=0.0, low_open=True)
    check_number("--rtol", args.rtol, low=0.0, low_open=True)


def _check_search_paths(args) -> None:
    """Every file the run will write is writable (and no PNG needs a missing matplotlib) before the search."""
    check_outputs({"OUT": args.output, "--report": args.report, "--save-plan": args.save_plan,
                   "--search-curve": args.search_curve, "--sparsity-plot": args.sparsity_plot},
                  driver.input_paths(args.input, args.calib, args.latency_table))
    plots = [(flag, path) for flag, path in (("--search-curve", args.search_curve),
                                             ("--sparsity-plot", args.sparsity_plot)) if path]
    for flag, path in plots:
        if not str(path).lower().endswith(".png"):
            raise SpaError(f"{flag} writes a PNG: give FILE.png, got '{path}'")
    if plots:
        if importlib.util.find_spec("matplotlib") is None:
            raise SpaError(f"{plots[0][0]} needs matplotlib: pip install matplotlib")


def _policy_options(cls, name: str, pairs) -> dict:
    """--policy-option KEY=VALUE pairs checked against the policy's constructor (a typo is an error)."""
    options = dict(pairs)
    params = inspect.signature(cls.__init__).parameters
    if cls.__init__.__qualname__ == "Policy.__init__":   # the base class's catch-all: the policy takes no option
        params = {}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = [n for n in params if n != "self"]
        unknown = [k for k in options if k not in known]
        if unknown:
            raise SpaError(f"policy '{name}' has no option '{unknown[0]}' (options: {', '.join(known) or 'none'})")
    try:
        cls(**options)
    except (TypeError, ValueError) as e:
        raise SpaError(f"bad --policy-option for '{name}': {e}")
    return options


def _optional_search_kwargs(args, S) -> dict:
    """Flags for optional search features (latency budget, thread count): passed when both search() and
    SearchProblem.build (the CLI builds the problem itself) take them, else a one-line error."""
    takes = [inspect.signature(f).parameters for f in (S.search, S.SearchProblem.build)]
    out = {}
    for dest, flag in OPTIONAL_SEARCH_ARGS:
        value = getattr(args, dest)
        if value is None:
            continue
        if not all(dest in params for params in takes):
            raise SpaError(f"{flag} is not available yet (spa.search.search() has no '{dest}')")
        out[dest] = value
    return out


def _search_problem(args, S, optional: dict):
    """The search problem, built with the same scoring options as the driver (loss, synthesized samples) and
    the optional budgets (latency)."""
    return S.SearchProblem.build(args.input, target_flops=args.target_flops, target_params=args.target_params,
                                 importance=args.importance, aggregation=args.aggregation,
                                 normalization=args.normalization, calib=args.calib,
                                 calib_samples=args.calib_samples, input_shapes=dict(args.input_shape),
                                 min_channels=args.min_channels, round_to=args.round_to, max_ratio=args.max_ratio,
                                 exclude=args.exclude or None, loss=args.loss, samples=args.synth_samples,
                                 seed=args.seed, **optional)


def _unreachable_budget(problem) -> str | None:
    """Why the budget cannot be met, or None. Like the driver's selection, the search then prunes as far as
    the constraints allow (every candidate is that smallest model); the report says so instead of staying quiet."""
    pj = problem.projector
    floor = pj.costs(pj.minimum())
    over = [f"{k} {floor[k]:.4f} > {t:g}" for k, t in pj.budgets.items() if floor[k] > t]
    if not over:
        return None
    return ("the budget cannot be met: the smallest model --min-channels/--round-to/--max-ratio/--exclude allow "
            "keeps " + ", ".join(over) + "; pruned as far as they allow")


def _check_strict(args, analysis) -> None:
    """--strict as the driver applies it, but before the search instead of after it."""
    if not args.strict:
        return
    for g in analysis.groups:
        real = [(w, r) for w, r in g.reasons if not w.startswith("graph output")]
        if real:
            raise SpaError(f"--strict: group '{g.name}' is frozen at {real[0][0]}: {real[0][1]}")


def _draw_plots(args, history, section: dict, outputs) -> None:
    from ..search.report import plot_curve, plot_sparsity

    name = section["policy"]
    if args.search_curve:
        plot_curve(history, args.search_curve,
                   f"search {name}: {section['evaluations']} evaluations, best {section['best_reward']:.5f}", outputs)
    if args.sparsity_plot:
        costs = ", ".join(f"{k} kept {v:.3f}" for k, v in (section.get("costs") or {}).items())
        plot_sparsity(history.problem, section["kept"], args.sparsity_plot, f"{name}: {costs}", outputs)


class SearchProgress:
    """Called by the env after every evaluation with (index, reward, best so far). On a terminal: one updating
    stderr line; otherwise one line per 10 % of the evaluations (a log stays readable); nothing with --quiet."""

    def __init__(self, policy: str, total: int, quiet: bool, stream=None):
        self.stream = stream or sys.stderr
        self.policy, self.total = policy, max(int(total), 1)
        self.enabled = not quiet
        self.tty = self.stream.isatty()
        self.every = max(1, math.ceil(self.total / 10))
        self.t0 = time.perf_counter()
        self.count, self.best, self.printed = 0, float("nan"), 0

    def line(self) -> str:
        return (f"search {self.policy}  {self.count}/{self.total}  best reward {self.best:.5f}  "
                f"({time.perf_counter() - self.t0:.1f} s)")

    def setup(self) -> None:
        """Start the clock (the time shown is setup + search) and say what the wait before the first
        evaluation is."""
        self.t0 = time.perf_counter()
        if self.enabled and self.tty:
            self.stream.write(f"\rsearch {self.policy}  setup (analysis, scores, original outputs)")
            self.stream.flush()

    def __call__(self, index: int, reward: float, best: float) -> None:
        self.count, self.best = index + 1, best
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self.line().ljust(64))
            self.stream.flush()
        elif self.count % self.every == 0 or self.count == self.total:
            self._print()

    def _print(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self.printed = self.count

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * 80 + "\r")
            self.stream.flush()
        elif self.count and self.printed != self.count:
            self._print()


def run_pattern_search(args) -> int:
    """--patterns-search POLICY: K per patterned conv searched under --target-flops (pattern-aware MACs kept),
    then the best assignment through the driver's pattern path; the report gains `pattern_search`."""
    for value, flag in ((args.policy, "--policy"), (args.ratio, "--ratio"), (args.plan, "--plan"),
                        (args.patterns, "--patterns"), (args.target_params, "--target-params"),
                        (args.target_latency, "--target-latency"), (args.finetune_data, "--finetune-data"),
                        (args.max_drop, "--max-drop"), (args.search_curve, "--search-curve"),
                        (args.sparsity_plot, "--sparsity-plot")):
        if value is not None:
            raise SpaError(f"--patterns-search does not combine with {flag}")
    if args.connectivity or args.steps != 1:
        raise SpaError("--patterns-search chooses the connectivity itself and runs in one step: drop "
                       "--connectivity/--steps")
    if args.target_flops is None:
        raise SpaError("--patterns-search needs --target-flops F (the fraction of pattern-aware MACs kept)")
    check_number("--target-flops", args.target_flops, low=0.0, high=1.0, low_open=True)
    evals = 64 if args.evals is None else args.evals
    check_counts([("--evals", evals)])
    S = _search_module()
    sculpt = S.sculpt
    if args.patterns_search not in sculpt.PATTERN_POLICIES:
        raise SpaError(f"unknown pattern-search policy '{args.patterns_search}' (choose from "
                       f"{', '.join(sorted(sculpt.PATTERN_POLICIES))})")
    options = dict(args.policy_option)
    if args.patterns_search == "ppo-gnn":
        options = _policy_options(S.sculpt_ppo.SculptPPO, "ppo-gnn", args.policy_option)
    elif options:
        raise SpaError(f"pattern-search policy '{args.patterns_search}' has no options")
    defaults = resolved_defaults(PruneOptions(importance=args.importance, fast=args.fast, reconstruct=args.reconstruct))
    if not defaults["reconstruct"]:
        raise SpaError("--patterns-search scores candidates after a refit: drop --fast/--no-reconstruct")
    check_outputs({"OUT": args.output, "--report": args.report, "--save-plan": args.save_plan},
                  driver.input_paths(args.input, None, args.calib, None))
    metric = METRIC_ALIASES.get(args.metric, args.metric)
    progress = SearchProgress(f"patterns {args.patterns_search}", evals, args.quiet)
    progress.setup()
    assignment, history = sculpt.search_patterns(
        args.input, target_flops=args.target_flops, policy=args.patterns_search, calib=args.calib,
        calib_samples=args.calib_samples, evals=evals,
        seed=args.seed, metric=metric, input_shapes=dict(args.input_shape), threads=args.threads or 1,
        policy_options=options, progress=progress)
    progress.close()
    show = stage_progress(args.quiet)
    with StagedOutputs() as outputs:
        kw = driver_kwargs(args)
        res = sculpt.prune_with_patterns(args.input, args.output, assignment, progress=show, outputs=outputs,
                                         sparse_storage=args.sparse_storage, input_shapes=dict(args.input_shape),
                                         **{k: v for k, v in kw.items() if k != "input_shapes"})
        clear_progress(show)
        res.report["pattern_search"] = history.meta
        return finish(args, res.report, outputs)
