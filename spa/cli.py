"""spa-prune: structured pruning of ONNX models.

    spa-prune IN.onnx OUT.onnx --ratio 0.5            remove half of the units of every coupled group
    spa-prune IN.onnx OUT.onnx --target-flops 0.5     keep at most 50% of the MACs (global ranking)
    spa-prune analyse IN.onnx                          list coupled groups and frozen channels (dry run)
    spa-prune zoo:resnet18 out.onnx --ratio 0.5        prune a model from the built-in zoo (needs torch)
    spa-prune IN OUT --target-flops 0.5 --importance obspa --calib calib.npz
                                                       OBS scores + least-squares reconstruction, no fine-tuning
    spa-prune make-calib IMAGES_DIR -o calib.npz --size 224    calibration data from a folder of images
    spa-prune IN OUT --target-flops 0.5 --steps 3 --finetune-data train.npz
                                                       progressive: 3 verified steps, KD fine-tuning between
    spa-prune finetune OUT tuned.onnx --data train.npz --teacher IN    fine-tune (+ distillation), same interface
    spa-prune to-torch OUT out.pt                      a trainable torch module that reproduces OUT
    spa-prune profile IN.onnx -o table.json --batch 8  latency cost table for --target-latency (run it on the
                                                       deployment machine, carry the file)
"""
from __future__ import annotations

import argparse
import json
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


def prune_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spa-prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("input", help="ONNX file, or zoo:NAME[:small][:dynamo]")
    p.add_argument("output", help="where to write the pruned ONNX model (replaced atomically)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="remove floor(R*n+0.5) of the n units of every coupled group")
    budget.add_argument("--target-flops", type=float, metavar="F",
                        help="keep at most the fraction F of the model's MACs (global ranking per MAC)")
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
    p.add_argument("--allocation", default="global", choices=["global", "uniform"],
                   help="with --target-flops: 'global' ranks units across groups by importance per MAC (default); "
                        "'uniform' removes the same fraction of every group (bisected to the budget), ranking "
                        "only inside groups: safer for accuracy without fine-tuning")
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


def summary(rep: dict) -> str:
    m, p, g, v = rep["macs"], rep["params"], rep["groups"], rep["verification"]
    lines = [
        f"{'':14}{'before':>12}{'after':>12}{'ratio':>9}",
        f"{'MACs':14}{_human(m['before']):>12}{_human(m['after']):>12}{m['ratio']:>9.3f}",
        f"{'params':14}{_human(p['before']):>12}{_human(p['after']):>12}{p['ratio']:>9.3f}",
        (f"groups        {g['total']} total, {g['pruned']} pruned, {g['frozen']} frozen, "
        f"{g['partially_frozen']} partially frozen"),
    ]
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
                       importance=args.importance, aggregation=args.aggregation,
                       normalization=args.normalization, min_channels=args.min_channels, round_to=args.round_to,
                       max_ratio=args.max_ratio, allocation=args.allocation,
                       exclude=args.exclude, plan_file=args.plan, save_plan=args.save_plan,
                       verify=not args.no_verify, rtol=args.rtol, strict=args.strict,
                       input_shapes=dict(args.input_shape), progress=show, fold_constants=args.fold_constants,
                       calib=args.calib, calib_limit=args.calib_samples, loss=args.loss,
                       reconstruct=args.reconstruct, recalibrate=args.recalibrate, compensate=args.compensate,
                       dbscan=_dbscan(args.dbscan), positions=args.positions, damp=args.damp,
                       samples=args.synth_samples, seed=args.seed)
    if show:
        sys.stderr.write("\r" + " " * 40 + "\r")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(res.report, f, indent=1)
    if not args.quiet:
        print(summary(res.report), file=sys.stderr)
    return 0


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
    an = driver.analyse(model)
    groups = sorted(an.groups, key=lambda g: -g.macs)
    shown = groups if args.all else groups[:40]
    out = [f"{len(an.groups)} coupled groups, {an.total_macs:,} MACs, {len(an.ctx.sources)} prunable sources"]
    out.append(f"{'id':>4} {'units':>6} {'frozen':>6} {'MACs%':>7}  name")
    for g in shown:
        share = 100.0 * g.macs / max(an.total_macs, 1)
        out.append(f"{g.id:>4} {g.size:>6} {int(g.frozen.sum()):>6} {share:>7.2f}  {g.name}")
    if len(shown) < len(groups):
        out.append(f"... {len(groups) - len(shown)} more (use --all)")
    frozen = [g for g in an.groups if g.frozen.any()]
    if frozen:
        out.append(f"frozen ({len(frozen)} groups):")
        for g in frozen:
            for where, why in g.reasons[:3]:
                out.append(f"  group {g.id} '{g.name}': {where}: {why}")
    print("\n".join(out))
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"total_macs": an.total_macs, "groups": [g.to_json() for g in an.groups],
                       "unruled_ops": an.unruled_ops, "warnings": model.warnings}, f, indent=1)
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
