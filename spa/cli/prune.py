"""spa-prune [prune] IN OUT: the default command (one-shot, progressive, or with an allocation search)."""
from __future__ import annotations

import argparse

from .. import driver
from ..errors import SpaError
from ..fileio import StagedOutputs, check_outputs
from ..importance import AGGREGATIONS, CRITERIA, NORMALIZATIONS
from ..options import ALLOCATIONS, ROUND_AUTO, PruneOptions, check_counts, check_number
from .common import (
    add_common,
    clear_progress,
    driver_kwargs,
    finish,
    input_range,
    stage_progress,
)
from .search import METRIC_ALIASES, REWARD_METRICS, reject_search_flags, run_pattern_search, run_search

USAGE = """spa-prune: structured pruning of ONNX models.

    spa-prune IN.onnx OUT.onnx --target-flops 0.5     keep at most 50% of the MACs: OBS scores + least-squares
                                                       reconstruction on synthesized inputs (data-free)
    spa-prune IN OUT --target-flops 0.5 --calib calib.npz     the same on your data (best accuracy)
    spa-prune IN.onnx OUT.onnx --ratio 0.5            remove half of the units of every coupled group
    spa-prune IN OUT --target-flops 0.5 --fast         magnitude ranking, no reconstruction: instant, for models
                                                       you fine-tune afterwards
    spa-prune IN OUT --target-flops 0.3 --max-drop 1   prune at most as far as keeps 99% of held-out top-1
                                                       predictions (exit 1, nothing written, if no cut does)
    spa-prune analyse IN.onnx                          list coupled groups and frozen channels (dry run)
    spa-prune zoo:resnet18 out.onnx --ratio 0.5        prune a model from the built-in zoo (needs torch)
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

EPILOG = """\
Exit codes: 0 success; 1 verification failed (nothing written); 2 bad input or option (one line on stderr).
Every emitted model passes onnx.checker (full check), runs in onnxruntime, and matches the original with the
removed channels disconnected (relative tolerance --rtol of each output's scale), unless --no-verify is given.
Dynamic input dims: batch = 1, spatial dims of 4-D inputs = 224, other dims = 128 unless --input-shape fixes them.
"""



def _policy_lines() -> tuple[list[str] | None, str]:
    """Registered policy names (None when the search extra is missing) and one line describing each."""
    try:
        from ..search import POLICIES  # gymnasium: an optional dependency
        from ..search.report import describe
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


def round_to_arg(text: str):
    """--round-to: a whole number or 'auto'."""
    if text == ROUND_AUTO:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or '{ROUND_AUTO}', got '{text}'")


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
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where candidates are evaluated: local (this process, default) or ray (Ray workers, one "
                        "per CPU of the cluster, single-threaded; same results; pip install spa-prune[ray])")
    s.add_argument("--ray-address", metavar="ADDR",
                   help="--executor ray: the cluster, HOST:PORT or ray://HOST:PORT, or auto (the one this machine "
                        "belongs to); default: a local Ray instance on 127.0.0.1, stopped afterwards")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prune", prog="spa-prune", description=USAGE, help="prune a model (the default command)",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("input", help="ONNX file, or zoo:NAME[:small][:dynamo]")
    p.add_argument("output", help="where to write the pruned ONNX model (replaced atomically)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="remove floor(R*n+0.5) of the n units of every coupled group")
    budget.add_argument("--target-flops", type=float, metavar="F",
                        help="keep at most the fraction F of the model's MACs (see --allocation; with --policy: "
                             "the search's budget)")
    budget.add_argument("--plan", metavar="FILE", help="re-apply a plan written by --save-plan")
    p.add_argument("--fast", action="store_true",
                   help="the instant path: magnitude (l2) ranking, uniform allocation, no data pass and no "
                        "reconstruction. Accuracy drops far more without fine-tuning; for models you fine-tune "
                        "afterwards. The default takes this path by itself, with a warning, for a model the data "
                        "passes cannot run (If/Loop bodies, inputs without a shared batch on dim 0)")
    p.add_argument("--max-drop", type=float, metavar="PCT",
                   help="fidelity guard: the pruned model may change at most PCT %% of the held-out top-1 "
                        "predictions of the original (classifiers; relative L2 error in %% otherwise). Prunes as "
                        "far as the budget allows within it, or exits 1 with nothing written when even the "
                        "smallest cut breaks it")
    p.add_argument("--importance", default=None, choices=list(CRITERIA), metavar="NAME",
                   help="unit importance (default obspa; l2 with --fast): " + "; ".join(f"{c.name}: {c.doc}" for c in CRITERIA.values())
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
                           "(default: on; off with --fast)")
    data.add_argument("--recalibrate", action="store_true",
                      help="re-estimate BN statistics / per-channel output scale and shift on --calib data")
    data.add_argument("--compensate", choices=["similarity"],
                      help="similarity: merge each removed channel into its most similar kept one (data-free)")
    data.add_argument("--dbscan", metavar="EPS,MIN_SAMPLES",
                      help="with --compensate similarity: merge only within DBSCAN clusters of channel features")
    data.add_argument("--positions", type=int, metavar="P",
                      help="positions sampled per layer for the refits (default 8192); the OBS scores sum half of them")
    data.add_argument("--damp", type=float, help="Hessian dampening, fraction of its mean diagonal (0.01)")
    data.add_argument("--exact-hessians", action="store_true",
                      help="OBS scores every layer on its exact Hessian; by default a conv with more than 1024 "
                           "columns (channels x kernel positions) is scored on Kronecker factors of it, several "
                           "times cheaper (ResNet-50: ~8 s of a 30 s run)")
    data.add_argument("--synth-samples", type=int, default=64, metavar="N",
                      help="data-free mode: number of synthesized inputs (64)")
    data.add_argument("--synth-steps", type=int, metavar="N",
                      help="data-free mode: at most N model-inversion steps shaping the synthesized inputs "
                           "(default 80, fewer on large models by a compute budget; 0: plain noise)")
    data.add_argument("--input-range", action="append", type=input_range, metavar="[NAME=]MEAN,STD",
                      help="data-free mode: synthesize the input NAME (without NAME: every float input) at this "
                           "per-sample mean and std, in the units the model reads (e.g. 0.45,0.25 for [0, 1] "
                           "pixels, 0,1 for standardized ones); default: read from the input's first layer, "
                           "which assumes a folded BatchNormalization there (the report's notes say what was read)")
    data.add_argument("--seed", type=int, default=0, help="seed for sampling and synthesized data")
    p.add_argument("--min-channels", type=int, default=1, metavar="K", help="keep at least K units per group")
    p.add_argument("--round-to", type=round_to_arg, default=ROUND_AUTO, metavar="N",
                   help="kept units a multiple of N; default 'auto' (with --target-flops): widths that suit the "
                        "kernels (multiples of 16 in groups of 128 or more units, of 4 in groups of 32 to 127, "
                        "narrower groups and attention heads as they are); 1 turns rounding off")
    p.add_argument("--max-ratio", type=float, default=1.0, metavar="R",
                   help="with --target-flops: remove at most the fraction R of any group (default 1: no cap; "
                        "the global per-MAC ranking otherwise thins early, high-resolution layers first)")
    p.add_argument("--allocation", choices=list(ALLOCATIONS),
                   help="with --target-flops: 'auto' (default) is 'uniform' where 'banded' gives the same plan; at "
                        "deep cuts, where they differ, both are refit and measured on the same held-out samples and "
                        "the one closer to the original is written (the summary says which); 'uniform' removes the "
                        "same fraction of every group (bisected to the budget), ranking only inside groups, and "
                        "spares groups of fewer than 8 units (attention heads) while the others meet the budget with "
                        "at most 0.8 of theirs; 'banded' is uniform until the uniform cut passes 40 %% of every "
                        "group, then ranks by importance per MAC within +-5 %% of the uniform fraction; 'global' "
                        "ranks units across groups by importance per MAC (thins some layers to almost nothing: worse "
                        "without fine-tuning) (with --policy: use --policy global|uniform)")
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
    pat = p.add_argument_group("pattern pruning (inside the kernels; docs/patterns.md)")
    pat.add_argument("--patterns", type=int, metavar="K",
                     help="keep at most K positions of every conv kernel larger than K (3x3, 5x5, 1-D), in one "
                          "connected shape through the centre chosen per kernel; after the channel cut when "
                          "--ratio/--target-flops is given (their budget is the channel cut's, dense MACs); the "
                          "kept weights are refit unless --fast")
    pat.add_argument("--connectivity", type=float, default=0.0, metavar="F",
                     help="with --patterns: also empty the share F of each patterned conv's kernels (default 0)")
    pat.add_argument("--patterns-search", nargs="?", const="ppo-gnn", metavar="POLICY",
                     help="search K per conv under --target-flops F of pattern-aware MACs (docs/patterns.md): "
                          "POLICY ppo-gnn (default: PPO over a GATv2 encoder), uniform or random; with --evals N "
                          "(64), --metric, --policy-option, --calib; the best then goes through the pattern path")
    pat.add_argument("--sparse-storage", action="store_true",
                     help="with --patterns: store patterned weights as kept values + a pattern id per kernel, "
                          "rebuilt at load (the file shrinks; onnxruntime runs the same dense kernels)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="protect nodes/initializers whose name matches (fnmatch pattern, repeatable)")
    p.add_argument("--save-plan", metavar="FILE", help="write the chosen plan as JSON")
    p.add_argument("--fold-constants", action="store_true",
                   help="compensation: fold the constant each removed channel carries into consumer biases; "
                        "reports fidelity to the original before and after")
    p.add_argument("--strict", action="store_true", help="a frozen group is an error")
    p.add_argument("--no-verify", action="store_true", help="skip verification (benchmarks); said in the summary")
    p.add_argument("--rtol", type=float, default=1e-4, help="verification tolerance relative to output scale")
    add_common(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    if args.patterns_search is not None:
        return run_pattern_search(args)
    if args.policy is not None or args.target_params is not None:
        if args.patterns is not None:
            raise SpaError("--patterns does not combine with a search (--policy/--target-params) yet")
        return run_search(args)
    reject_search_flags(args)
    if args.ratio is None and args.target_flops is None and args.plan is None and args.patterns is None:
        raise SpaError("give one of --ratio, --target-flops, --plan or --patterns")
    check_counts([("--steps", args.steps)])
    if args.patterns is not None and (args.steps != 1 or args.finetune_data):
        raise SpaError("--patterns does not combine with --steps/--finetune-data yet")
    check_counts([("--finetune-epochs", args.finetune_epochs)], minimum=0)
    check_number("--finetune-lr", args.finetune_lr, low=0, low_open=True)
    keywords = {"ratio": args.ratio, "target_flops": args.target_flops, "allocation": args.allocation,
                "plan_file": args.plan, "input_shapes": dict(args.input_shape), **driver_kwargs(args),
                "patterns": args.patterns, "connectivity": args.connectivity, "sparse_storage": args.sparse_storage}
    options = PruneOptions.from_keywords(**keywords)   # as asked: the driver resolves the defaults (a fallback
    options.validated()                                # among them); every option's domain checked before any work
    check_outputs({"OUT": args.output, "--report": args.report, "--save-plan": args.save_plan},
                  driver.input_paths(args.input, args.plan, args.calib, args.finetune_data))
    show = stage_progress(args.quiet)
    if args.steps != 1 or args.finetune_data:
        if args.steps < 2:
            raise SpaError("--finetune-data needs --steps K with K >= 2 (fine-tuning runs between steps)")
        from ..progressive import prune_progressive  # deferred: only --steps runs load the fine-tuning machinery

        res = prune_progressive(args.input, args.output, steps=args.steps, finetune_data=args.finetune_data,
                                finetune_epochs=args.finetune_epochs, kd=not args.no_kd,
                                finetune_options={"lr": args.finetune_lr, "seed": args.seed}, progress=show,
                                **keywords)
    else:
        with StagedOutputs() as outputs:  # OUT, --save-plan and --report are renamed into place together
            res = driver.prune(args.input, args.output, options, progress=show, outputs=outputs)
            clear_progress(show)
            return finish(args, res.report, outputs)
    clear_progress(show)
    return finish(args, res.report)
