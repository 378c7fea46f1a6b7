"""spa-prune: structured pruning of ONNX models.

    spa-prune IN.onnx OUT.onnx --ratio 0.5            remove half of the units of every coupled group
    spa-prune IN.onnx OUT.onnx --target-flops 0.5     keep at most 50% of the MACs (global ranking)
    spa-prune analyse IN.onnx                          list coupled groups and frozen channels (dry run)
    spa-prune zoo:resnet18 out.onnx --ratio 0.5        prune a model from the built-in zoo (needs torch)
    spa-prune IN OUT --target-flops 0.5 --importance obspa --calib calib.npz
                                                       OBS scores + least-squares reconstruction, no fine-tuning
    spa-prune make-calib IMAGES_DIR -o calib.npz --size 224    calibration data from a folder of images
    spa-prune IN OUT --policy ppo-gnn --target-flops 0.5 --calib calib.npz --evals 300
                                                       search a per-group allocation (RL or a control), then
                                                       apply + verify it like any other selection
    spa-prune IN OUT --target-flops 0.5 --steps 3 --finetune-data train.npz
                                                       progressive: 3 verified steps, KD fine-tuning between
    spa-prune finetune OUT tuned.onnx --data train.npz --teacher IN    fine-tune (+ distillation), same interface
    spa-prune to-torch OUT out.pt                      a trainable torch module that reproduces OUT
    spa-prune profile IN.onnx -o table.json --batch 8  latency cost table for --target-latency (run it on the
                                                       deployment machine, carry the file)
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time

from .errors import SpaError, VerificationError

EPILOG = """\
Exit codes: 0 success; 1 verification failed (nothing written); 2 bad input or option (one line on stderr).
Every emitted model passes onnx.checker (full check), runs in onnxruntime, and matches the original with the
removed channels disconnected (relative tolerance --rtol of each output's scale), unless --no-verify is given.
Dynamic input dims: batch = 1, spatial dims of 4-D inputs = 224, other dims = 128 unless --input-shape fixes them.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other bad input."""

    def error(self, message):
        raise SpaError(f"{message} (see {self.prog} --help)")


def _shape(text: str):
    try:
        name, dims = text.rsplit("=", 1)
        return name, tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,..., got '{text}'")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", type=_shape, default=[], metavar="NAME=D1,D2,...",
                   help="fix the dims of an input for the cost model and verification (repeatable)")
    p.add_argument("--report", metavar="FILE", help="write a JSON report")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary table on stderr")


def _policy_lines() -> tuple[list[str] | None, str]:
    """Registered policy names (None when the search extra is missing) and one line describing each."""
    try:
        from .search import POLICIES
        from .search.report import describe
    except ImportError as e:
        return None, f"(the search needs gymnasium: pip install spa-prune[search]; {e})"
    width = max(map(len, POLICIES)) + 2
    return list(POLICIES), "\n".join(f"  {n:<{width}}{describe(n, c)}" for n, c in POLICIES.items())


def _policy_option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    return key.strip().replace("-", "_"), _option_value(value.strip())


def _option_value(text: str):
    """int, then float, then true/false/none, else the string itself."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    return None if low == "none" else text


def _search_options(p: argparse.ArgumentParser) -> None:
    names, lines = _policy_lines()
    s = p.add_argument_group(
        "allocation search",
        "--policy NAME searches how many units each coupled group keeps under --target-flops and/or "
        "--target-params,\nscoring candidates on --calib data (data-free synthesized inputs without it); which "
        "units go is --importance's\nchoice. The best plan then goes through the same apply/verify/"
        "reconstruction path as any other selection.\n--target-params without --policy uses the 'global' "
        "control. Policies:\n" + lines)
    s.add_argument("--policy", choices=names, metavar="NAME", help="search policy (list above)")
    s.add_argument("--evals", type=int, metavar="N",
                   help="candidates evaluated, cached ones included (default 300; uniform/global/lamp use 1)")
    s.add_argument("--target-params", type=float, metavar="P",
                   help="keep at most the fraction P of the float parameters (a search budget; combines with "
                        "--target-flops)")
    s.add_argument("--search-recalibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="re-calibrate BN statistics / channel scale of each candidate before scoring it (default: "
                        "on with --calib); add --recalibrate to give the written model the same treatment")
    s.add_argument("--search-refit", choices=["auto", "none", "fast", "full"], default="auto",
                   help="score each candidate after a least-squares refit of its layers: fast (sampled positions, "
                        "one pass), full (passes.reconstruct, ~5x slower) or none; auto = fast when the written "
                        "model is reconstructed (--importance obspa or --reconstruct), else none. At 90%% FLOPs "
                        "removed the reward without it does not predict the reconstructed model's accuracy")
    s.add_argument("--metric", choices=[*REWARD_METRICS, *METRIC_ALIASES], default="auto",
                   help="reward: accuracy (calibration labels), agreement (top-1 with the original; alias top1), "
                        "kl (to the original's softmax), rel_l2 (every output; alias l2); auto = accuracy with "
                        "labels, else kl for class logits, else rel_l2")
    s.add_argument("--policy-option", action="append", default=[], type=_policy_option, metavar="KEY=VALUE",
                   help="an option of the policy (repeatable; int/float/true/false/none/str), e.g. batch=8")
    s.add_argument("--search-curve", metavar="FILE.png", help="plot the reward of every evaluation and the best")
    s.add_argument("--sparsity-plot", metavar="FILE.png", help="plot the kept fraction of every group")
    s.add_argument("--target-latency", type=float, metavar="MS",
                   help="keep the latency at most MS milliseconds (from a measured table, see --latency-table)")
    s.add_argument("--latency-table", metavar="FILE", help="per-group latency table written by 'spa-prune profile'")
    s.add_argument("--latency-batch", type=int, metavar="B", help="batch size the latency budget is stated at")
    s.add_argument("--threads", type=int, metavar="T",
                   help="threads for scoring candidates in onnxruntime (and for the latency budget)")


REWARD_METRICS = ("auto", "accuracy", "agreement", "kl", "rel_l2")   # spa.search.reward.METRICS
METRIC_ALIASES = {"top1": "agreement", "l2": "rel_l2"}


def prune_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spa-prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("input", help="ONNX file, or zoo:NAME[:small][:dynamo]")
    p.add_argument("output", help="where to write the pruned ONNX model (replaced atomically)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="remove floor(R*n+0.5) of the n units of every coupled group")
    budget.add_argument("--target-flops", type=float, metavar="F",
                        help="keep at most the fraction F of the model's MACs (global ranking per MAC; with "
                             "--policy: the search's budget)")
    budget.add_argument("--plan", metavar="FILE", help="re-apply a plan written by --save-plan")
    from .importance import AGGREGATIONS, CRITERIA, NORMALIZATIONS
    p.add_argument("--importance", default="l2", choices=list(CRITERIA), metavar="NAME",
                   help="unit importance (default l2): " + "; ".join(f"{c.name}: {c.doc}" for c in CRITERIA.values())
                   + ". Gradient criteria and obs/obspa use --calib data, or synthesized inputs without it")
    p.add_argument("--aggregation", default="sum", choices=AGGREGATIONS,
                   help="how the scores of a unit's parameter slices (group members) combine (sum)")
    p.add_argument("--normalization", default="mean", choices=NORMALIZATIONS,
                   help="per-group normalization of scores, for global ranking (mean); standardize = min-max "
                        "to [0, 1], gaussian = z-score")
    data = p.add_argument_group("data, reconstruction and compensation")
    data.add_argument("--calib", metavar="FILE.npz|DIR",
                      help="calibration data: arrays keyed by input name (+ optional 'labels'), or a folder of "
                           "images (any images: out-of-distribution data works too; see make-calib)")
    data.add_argument("--calib-samples", type=int, metavar="N", help="use the first N calibration samples")
    data.add_argument("--loss", default="auto", choices=["auto", "ce", "pseudo", "fisher"],
                      help="loss for gradient criteria: ce (needs labels), pseudo (the model's own top-1), fisher "
                           "(labels sampled from its softmax); auto = ce with labels, else pseudo")
    data.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                      help="least-squares refit of every layer towards the original's outputs, layer by layer "
                           "(default: on for --importance obspa)")
    data.add_argument("--recalibrate", action="store_true",
                      help="re-estimate BN statistics / per-channel output scale and shift on --calib data")
    data.add_argument("--compensate", choices=["similarity"],
                      help="similarity: merge each removed channel into its most similar kept one (data-free)")
    data.add_argument("--dbscan", metavar="EPS,MIN_SAMPLES",
                      help="with --compensate similarity: merge only within DBSCAN clusters of channel features")
    data.add_argument("--positions", type=int, metavar="P",
                      help="positions sampled per layer for Hessians and refits (default 8192)")
    data.add_argument("--damp", type=float, help="Hessian dampening, fraction of its mean diagonal (0.01)")
    data.add_argument("--synth-samples", type=int, default=64, metavar="N",
                      help="data-free mode: number of synthesized inputs (64)")
    data.add_argument("--seed", type=int, default=0, help="seed for sampling and synthesized data")
    p.add_argument("--min-channels", type=int, default=1, metavar="K", help="keep at least K units per group")
    p.add_argument("--round-to", type=int, default=1, metavar="N", help="kept units a multiple of N")
    p.add_argument("--max-ratio", type=float, default=1.0, metavar="R",
                   help="with --target-flops: remove at most the fraction R of any group (default 1: no cap; "
                        "the global per-MAC ranking otherwise thins early, high-resolution layers first)")
    p.add_argument("--allocation", choices=["global", "uniform"],
                   help="with --target-flops: 'global' ranks units across groups by importance per MAC (default); "
                        "'uniform' removes the same fraction of every group (bisected to the budget), ranking "
                        "only inside groups: safer for accuracy without fine-tuning (with --policy: use "
                        "--policy global|uniform)")
    prog = p.add_argument_group("progressive pruning")
    prog.add_argument("--steps", type=int, default=1, metavar="K",
                      help="reach the budget in K verified steps (geometric schedule: each step removes the same "
                           "fraction of what is left); default 1 = one-shot")
    prog.add_argument("--finetune-data", metavar="FILE.npz|DIR",
                      help="with --steps: fine-tune between steps on this data (labels optional)")
    prog.add_argument("--finetune-epochs", type=int, default=1, metavar="N", help="epochs between steps (1)")
    prog.add_argument("--finetune-lr", type=float, default=0.01, metavar="LR", help="learning rate (0.01)")
    prog.add_argument("--no-kd", action="store_true",
                      help="between steps, train on the labels only (default: distill from the original too)")
    _search_options(p)
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="protect nodes/initializers whose name matches (fnmatch pattern, repeatable)")
    p.add_argument("--save-plan", metavar="FILE", help="write the chosen plan as JSON")
    p.add_argument("--fold-constants", action="store_true",
                   help="compensation: fold the constant each removed channel carries into consumer biases; "
                        "reports fidelity to the original before and after")
    p.add_argument("--strict", action="store_true", help="a frozen group is an error")
    p.add_argument("--no-verify", action="store_true", help="skip verification (benchmarks); said in the summary")
    p.add_argument("--rtol", type=float, default=1e-4, help="verification tolerance relative to output scale")
    _common(p)
    return p


def analyse_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spa-prune analyse",
                                description="Dry run: list every coupled group and every frozen group with why.")
    p.add_argument("input", help="ONNX file, or zoo:NAME[:small][:dynamo]")
    p.add_argument("--all", action="store_true", help="list every group (default: the 40 largest by MACs)")
    _common(p)
    return p


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fidelity_lines(prefix: str, part: dict) -> list[str]:
    """One line per output: relative L2 error (and top-1 agreement) before -> after a compensation pass."""
    out = []
    for name, after in part["fidelity_after"].items():
        before = part["fidelity_before"][name]
        extra = f", top-1 agreement {before['top1']:.0%} -> {after['top1']:.0%}" if "top1" in after else ""
        out.append(f"{prefix}: '{name}' rel. L2 error {before['rel_l2']:.3f} -> {after['rel_l2']:.3f}{extra}")
    return out


def _search_line(s: dict) -> str:
    """policy, evaluations (how many were new), best reward and its metric, search and setup time."""
    measured = s.get("measured")
    new = f" ({measured} measured)" if measured is not None and measured != s["evaluations"] else ""
    at = f" at #{s['best_index'] + 1}" if s.get("best_index") is not None else ""
    return (f"search        {s['policy']}: {s['evaluations']} evaluation{'s' * (s['evaluations'] != 1)}{new}, "
            f"best reward {s['best_reward']:.5f} ({s['metric']}){at}, {s['search_s']:.1f} s "
            f"(+ {s['setup_s']:.1f} s setup)")


def _latency_line(lat: dict) -> str:
    """The latency budget's outcome: measured end to end after the correction, or why it was not measured."""
    where = f"batch {lat.get('batch')}, {lat.get('threads')} thread(s)"
    if lat.get("measured_ms") is not None:
        line = (f"latency       {lat['measured_ms']:.3f} ms measured (median) for a {lat['budget_ms']:.3f} ms "
                f"budget, {where}")
        if lat.get("converged") is False:
            line += (f"  ** not within [{lat['band'][0]:g}, {lat['band'][1]:g}] x the budget after "
                     f"{len(lat.get('probes', []))} probes: too noisy or too small to time **")
        return line
    return (f"latency       {lat.get('search_predicted_ms', float('nan')):.3f} ms predicted for a "
            f"{lat.get('budget_ms', float('nan')):.3f} ms budget, {where}; {lat.get('fit', 'not measured')}")


def summary(rep: dict) -> str:
    m, p, g, v = rep["macs"], rep["params"], rep["groups"], rep["verification"]
    lines = [
        f"{'':14}{'before':>12}{'after':>12}{'ratio':>9}",
        f"{'MACs':14}{_human(m['before']):>12}{_human(m['after']):>12}{m['ratio']:>9.3f}",
        f"{'params':14}{_human(p['before']):>12}{_human(p['after']):>12}{p['ratio']:>9.3f}",
        (f"groups        {g['total']} total, {g['pruned']} pruned, {g['frozen']} frozen, "
        f"{g['partially_frozen']} partially frozen"),
    ]
    if rep.get("search"):
        lines.append(_search_line(rep["search"]))
        if rep["search"].get("latency"):
            lines.append(_latency_line(rep["search"]["latency"]))
    if v["status"] == "passed":
        worst = max(v["max_rel_error"].values(), default=0.0)
        lines.append(f"verification  passed (max rel. error {worst:.2e} <= {v['rtol']:g}, checker full)")
    else:
        lines.append(f"verification  {v['status']}  ** the output model was NOT verified **")
    comp = rep.get("compensation")
    if comp:
        lines += _fidelity_lines(f"compensation  fold-constants on {comp['folded_sinks']} sinks", comp)
    rec = rep.get("reconstruction")
    if rec:
        names = " + ".join(p["pass"] for p in rec["passes"]) or "none"
        lines += _fidelity_lines(f"reconstruct   {names} on {rec['fidelity_on']}", rec)
    prog = rep.get("progressive")
    if prog:
        macs0 = max(m["before"], 1)
        chain = " -> ".join(f"{st['macs_after'] / macs0:.3f}" for st in prog["per_step"])
        tuned = sum(t["epochs"] for t in prog["finetune"])
        lines.append(f"steps         {prog['steps']}, MACs kept {chain}"
                     + (f"; fine-tuned {tuned} epoch(s) between steps" if tuned else "")
                     + "; every step verified against its input" * all(
                         st["verification"] == "passed" for st in prog["per_step"]))
    imp = rep.get("importance") or {}
    if imp.get("data") and imp["data"] != "weights only":
        lines.append(f"importance    {imp['criterion']} on {imp['data']}")
    for note in imp.get("notes", [])[:3]:
        lines.append(f"note          {note}")
    if rep["unruled_ops"]:
        lines.append("no rule for    " + ", ".join(f"{k} x{n}" for k, n in rep["unruled_ops"].items()))
    for w in rep["warnings"][:5]:
        lines.append(f"warning       {w}")
    lines.append(f"time          {rep['timings_s']['total']:.2f} s")
    return "\n".join(lines)


def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    t0 = time.perf_counter()

    def show(stage: str):
        sys.stderr.write(f"\r[spa-prune {time.perf_counter() - t0:6.1f}s] {stage:<12}")
        sys.stderr.flush()

    return show


def run_prune(argv) -> int:
    args = prune_parser().parse_args(argv)
    from . import driver

    if args.policy is not None or args.target_params is not None:
        return run_search(args)
    _reject_search_flags(args)
    if args.ratio is None and args.target_flops is None and args.plan is None:
        raise SpaError("give one of --ratio, --target-flops or --plan")
    if args.report:
        driver.check_output_path(args.report)
    show = _progress(args.quiet)
    kwargs = {}
    prune = driver.prune
    if args.steps < 1:
        raise SpaError(f"--steps must be at least 1, got {args.steps}")
    if args.steps != 1 or args.finetune_data:
        if args.steps < 2:
            raise SpaError("--finetune-data needs --steps K with K >= 2 (fine-tuning runs between steps)")
        from .progressive import prune_progressive as prune
        kwargs = {"steps": args.steps, "finetune_data": args.finetune_data, "finetune_epochs": args.finetune_epochs,
                  "finetune_options": {"lr": args.finetune_lr, "seed": args.seed}, "kd": not args.no_kd}
    res = prune(args.input, args.output, ratio=args.ratio, target_flops=args.target_flops, **kwargs,
                allocation=args.allocation or "global", plan_file=args.plan, input_shapes=dict(args.input_shape),
                progress=show, **_driver_kwargs(args))
    _clear(show)
    return _finish(args, res.report)


def _driver_kwargs(args) -> dict:
    """The driver options every pruning path shares (scoring, constraints, verification, data, compensation)."""
    return {"importance": args.importance, "aggregation": args.aggregation, "normalization": args.normalization,
            "min_channels": args.min_channels, "round_to": args.round_to, "max_ratio": args.max_ratio,
            "exclude": args.exclude, "save_plan": args.save_plan, "verify": not args.no_verify, "rtol": args.rtol,
            "strict": args.strict, "fold_constants": args.fold_constants, "calib": args.calib,
            "calib_limit": args.calib_samples, "loss": args.loss, "reconstruct": args.reconstruct,
            "recalibrate": args.recalibrate, "compensate": args.compensate, "dbscan": _dbscan(args.dbscan),
            "positions": args.positions, "damp": args.damp, "samples": args.synth_samples, "seed": args.seed}


def _clear(show) -> None:
    if show:
        sys.stderr.write("\r" + " " * 40 + "\r")


def _finish(args, report: dict) -> int:
    if args.report:
        _write_json(report, args.report)
    if not args.quiet:
        print(summary(report), file=sys.stderr)
    return 0


def _write_json(data: dict, path) -> None:
    """check_output_path allows missing parent folders: create them, as the model's writer does."""
    from pathlib import Path

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    except OSError as e:
        raise SpaError(f"cannot write {path}: {e.strerror or e}")


# ---- allocation search (--policy) ---------------------------------------------------------------------------------
SEARCH_ONLY = (("evals", "--evals"), ("policy_option", "--policy-option"),
               ("search_recalibrate", "--search-recalibrate"), ("search_curve", "--search-curve"),
               ("sparsity_plot", "--sparsity-plot"), ("target_latency", "--target-latency"),
               ("latency_table", "--latency-table"), ("latency_batch", "--latency-batch"), ("threads", "--threads"))
# flags whose spa.search.search() parameters are optional features: wired when search() takes them
OPTIONAL_SEARCH_ARGS = (("target_latency", "--target-latency"), ("latency_table", "--latency-table"),
                        ("latency_batch", "--latency-batch"), ("threads", "--threads"))
SINGLE_EVALUATION = ("uniform", "global", "lamp")   # controls that evaluate one candidate whatever --evals says


def _reject_search_flags(args) -> None:
    """A search option without a search is a mistake, not a no-op."""
    given = [flag for dest, flag in SEARCH_ONLY if getattr(args, dest) not in (None, [])]
    if args.metric != "auto":
        given.append("--metric")
    if args.search_refit != "auto":
        given.append("--search-refit")
    if given:
        raise SpaError(f"{given[0]} needs --policy NAME (an allocation search)")


def run_search(args) -> int:
    """--policy (or --target-params): search a per-group allocation, then prune with the best plan through the
    driver's apply/verify/reconstruction path. Every check that can fail runs before the search."""
    from . import driver

    S = _search_module()
    policy = args.policy or "global"
    cls = S.get_policy(policy)
    _check_search_args(args, driver)
    options = _policy_options(cls, policy, args.policy_option)
    optional = _optional_search_kwargs(args, S)
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
                             progress=progress, **optional)
    progress.close()
    show = _progress(args.quiet)
    res = S.prune_with_plan(args.input, args.output, plan, history.problem, progress=show, **_driver_kwargs(args))
    _clear(show)
    from .search.report import search_section
    section = search_section(history, plan, metric=metric, policy_options=options, recalibrate=recalibrate,
                             setup_s=setup_s, curve=args.search_curve, sparsity_plot=args.sparsity_plot)
    _draw_plots(args, history, section)
    section["feasible"] = unreachable is None
    section["refit"] = refit or "none"
    if unreachable:
        res.report["warnings"].append(unreachable)
    res.report["search"] = section
    return _finish(args, res.report)


def _search_refit(args):
    """The reward's refit: False, "fast" or True (CalibEvaluator's refit). By default the search scores what
    the written model will be: refit when the final path reconstructs."""
    choice = args.search_refit
    if choice == "auto":
        reconstruct = args.reconstruct if args.reconstruct is not None else args.importance == "obspa"
        choice = "fast" if reconstruct else "none"
    return {"none": False, "fast": "fast", "full": True}[choice]


def _search_module():
    try:
        from . import search
    except ImportError as e:
        raise SpaError(f"the allocation search needs gymnasium and torch: pip install spa-prune[search] ({e})")
    return search


def _check_search_args(args, driver) -> None:
    """One-line errors for every bad combination, before the model is even loaded."""
    for value, flag in ((args.ratio, "--ratio"), (args.plan, "--plan")):
        if value is not None:
            raise SpaError(f"--policy searches the allocation under --target-flops/--target-params; it does not "
                           f"combine with {flag}")
    if args.steps != 1 or args.finetune_data:
        raise SpaError("--policy searches a one-shot allocation; it does not combine with --steps or --finetune-data")
    if args.allocation:
        raise SpaError("--allocation is the selection without --policy; search with --policy global or uniform")
    if args.target_flops is None and args.target_params is None and args.target_latency is None:
        raise SpaError("--policy needs a budget: --target-flops F, --target-params P and/or --target-latency MS")
    _check_search_numbers(args)
    if args.calib is None:
        for flag, given in (("--search-recalibrate", args.search_recalibrate), ("--recalibrate", args.recalibrate),
                            ("--metric accuracy", args.metric == "accuracy")):
            if given:
                raise SpaError(f"{flag} needs calibration data (--calib FILE.npz or an image folder)")
    reconstruct = args.reconstruct if args.reconstruct is not None else args.importance == "obspa"
    if args.no_verify and (reconstruct or args.recalibrate or args.compensate or args.fold_constants):
        raise SpaError("reconstruction and compensation need verification (they report fidelity); drop --no-verify")
    driver._check_data_options(args.positions, args.damp, args.synth_samples, _dbscan(args.dbscan))
    _check_search_paths(args, driver)


def _check_search_numbers(args) -> None:
    for flag, value in (("--target-flops", args.target_flops), ("--target-params", args.target_params),
                        ("--max-ratio", args.max_ratio)):
        if value is not None and not 0.0 < value <= 1.0:
            raise SpaError(f"{flag} must be in (0, 1], got {value}")
    for flag, value in (("--evals", args.evals), ("--min-channels", args.min_channels), ("--round-to", args.round_to),
                        ("--latency-batch", args.latency_batch), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise SpaError(f"{flag} must be at least 1, got {value}")
    if args.target_latency is not None and not args.target_latency > 0:
        raise SpaError(f"--target-latency must be > 0 ms, got {args.target_latency}")


def _check_search_paths(args, driver) -> None:
    """Every file the run will write is writable (and no PNG needs a missing matplotlib) before the search."""
    from pathlib import Path

    src, out = Path(str(args.input)), Path(args.output)
    if not str(args.input).startswith("zoo:") and src.exists() and out.exists() and src.samefile(out):
        raise SpaError("output path is the input file; refusing to overwrite the input")
    for path in (args.output, args.report, args.save_plan, args.search_curve, args.sparsity_plot):
        if path:
            driver.check_output_path(path)
    plots = [(flag, path) for flag, path in (("--search-curve", args.search_curve),
                                             ("--sparsity-plot", args.sparsity_plot)) if path]
    for flag, path in plots:
        if not str(path).lower().endswith(".png"):
            raise SpaError(f"{flag} writes a PNG: give FILE.png, got '{path}'")
    if plots:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise SpaError(f"{plots[0][0]} needs matplotlib: pip install matplotlib")


def _policy_options(cls, name: str, pairs) -> dict:
    """--policy-option KEY=VALUE pairs checked against the policy's constructor (a typo is an error)."""
    options = dict(pairs)
    params = inspect.signature(cls.__init__).parameters
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


def _draw_plots(args, history, section: dict) -> None:
    from .search.report import plot_curve, plot_sparsity

    name = section["policy"]
    if args.search_curve:
        plot_curve(history, args.search_curve,
                   f"search {name}: {section['evaluations']} evaluations, best {section['best_reward']:.5f}")
    if args.sparsity_plot:
        costs = ", ".join(f"{k} kept {v:.3f}" for k, v in (section.get("costs") or {}).items())
        plot_sparsity(history.problem, section["kept"], args.sparsity_plot, f"{name}: {costs}")


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


def _dbscan(text):
    if text is None:
        return None
    try:
        eps, k = text.split(",")
        return float(eps), int(k)
    except ValueError:
        raise SpaError(f"--dbscan expects EPS,MIN_SAMPLES (e.g. 0.3,2), got '{text}'")


def run_analyse(argv) -> int:
    args = analyse_parser().parse_args(argv)
    from . import driver

    model = driver.load(args.input, dict(args.input_shape))
    analysis = driver.analyse(model)
    groups = sorted(analysis.groups, key=lambda g: -g.macs)
    shown = groups if args.all else groups[:40]
    out = [f"{len(analysis.groups)} coupled groups, {analysis.total_macs:,} MACs, {len(analysis.ctx.sources)} prunable sources"]
    out.append(f"{'id':>4} {'units':>6} {'frozen':>6} {'MACs%':>7}  name")
    for g in shown:
        share = 100.0 * g.macs / max(analysis.total_macs, 1)
        out.append(f"{g.id:>4} {g.size:>6} {int(g.frozen.sum()):>6} {share:>7.2f}  {g.name}")
    if len(shown) < len(groups):
        out.append(f"... {len(groups) - len(shown)} more (use --all)")
    frozen = [g for g in analysis.groups if g.frozen.any()]
    if frozen:
        out.append(f"frozen ({len(frozen)} groups):")
        for g in frozen:
            for where, why in g.reasons[:3]:
                out.append(f"  group {g.id} '{g.name}': {where}: {why}")
    print("\n".join(out))
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"total_macs": analysis.total_macs, "groups": [g.to_json() for g in analysis.groups],
                       "unruled_ops": analysis.unruled_ops, "warnings": model.warnings}, f, indent=1)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("analyse", "analyze"):
            return run_analyse(argv[1:])
        if argv and argv[0] == "make-calib":
            from .calib import make_calib_main
            return make_calib_main(argv[1:])
        if argv and argv[0] == "to-torch":
            from .torch_bridge import to_torch_main
            return to_torch_main(argv[1:])
        if argv and argv[0] == "finetune":
            from .finetune import finetune_main
            return finetune_main(argv[1:])
        if argv and argv[0] == "profile":
            from .search.latency import profile_main
            return profile_main(argv[1:])
        return run_prune(argv)
    except SpaError as e:
        print(f"spa-prune: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"spa-prune: verification failed, nothing written: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spa-prune: interrupted, nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
