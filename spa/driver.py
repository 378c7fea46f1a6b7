"""The pipeline behind the CLI and the Python API:

    load ─► normalize ─► analyse ─► score ─► select ─► apply ─► verify ─► [compensate] ─► [reconstruct]
         ─► fidelity ─► save

`prune` validates its options once, runs the passes of `spa.pipeline` in this order through the pass manager,
and assembles the report from what they return. With a fidelity guard (--max-drop) a cut that loses too much
is retried smaller (bisection on the share of the requested cut) and the largest one within the guard is saved.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

from .errors import DataPassesUnavailable, FidelityError
from .execution import import_torch_in_background
from .fileio import StagedOutputs, check_outputs
from .groups import Analysis
from .importance import score
from .loading import load, param_count, resolve_input
from .memory import memory_limit
from .model import Model
from .options import DATA_CRITERIA, MEASURED_ALLOCATION, PruneOptions
from .passes import PassManager, PassResult
from .passes.analyse import Analyse
from .pipeline import (
    HOLDOUT_MIN,
    AnalyseModel,
    ApplyPlan,
    CompactStorage,
    DynamicKernelsBack,
    FidelityNotMet,
    FoldConstants,
    LoadModel,
    MeasureFidelity,
    PatternPrune,
    PruneRun,
    Reconstruction,
    ScoreAndSelect,
    VerifyStructure,
    WriteOutputs,
    data_label,
    data_passes,
    explain_nothing,
    selection_error,
)
from .select import PruningPlan, select

__all__ = ["PruneOptions", "Result", "analyse", "check_output_path", "explain_nothing", "input_paths", "load",
           "param_count", "passes_for", "plan", "prune", "resolve_input"]


def analyse(model: Model) -> Analysis:
    return Analyse().run(model)


def plan(model: Model, *, ratio=None, target_flops=None, importance="l2", aggregation="sum",
         normalization="mean", min_channels=1, round_to=1, exclude=None, max_ratio=1.0) -> PruningPlan:
    analysis = analyse(model)
    scores = score(analysis, importance, aggregation, normalization)
    return select(analysis, scores, ratio=ratio, target_flops=target_flops, min_channels=min_channels,
                  round_to=round_to, exclude=exclude, max_ratio=max_ratio)


@dataclass
class Result:
    model: Model
    report: dict = field(default_factory=dict)


GUARD_PROBES = 4  # smaller cuts tried after the requested one fails the guard: the smallest is 1/16 of it


def passes_for(options: PruneOptions, write: bool = True) -> list:
    """The run's passes, in order: the structural cut and its check always, the value passes when asked, the
    fidelity measurement whenever the run verifies (it needs onnxruntime), the writing unless `write` is off."""
    passes = [LoadModel(), AnalyseModel(), ScoreAndSelect(), ApplyPlan()]
    if options.verify:
        passes.append(VerifyStructure())
    if options.fold_constants:
        passes.append(FoldConstants())
    if options.patterns is not None:
        passes.append(PatternPrune())
    if options.value_passes:
        passes.append(Reconstruction())
    if data_passes(options):
        passes.append(DynamicKernelsBack())
    if options.verify:
        passes.append(MeasureFidelity())
    if options.sparse_storage:
        passes.append(CompactStorage())
    if write:
        passes.append(WriteOutputs())
    return passes


def prune(source, output=None, options: PruneOptions | None = None, *, progress=None,
          outputs: StagedOutputs | None = None, **keywords) -> Result:
    """Prune a model end to end; write `output` only after every check passed.

    Options come as a `PruneOptions` or as its fields by keyword (`ratio=0.5, importance="obspa", calib=...`).
    calib: a .npz file / image folder / spa.calib.Calib (None: data-free: synthesized inputs where data is
    needed). reconstruct: refit the consumers by least squares (default: on for importance 'obspa').
    recalibrate: per-layer statistics matching (needs calib). compensate: 'similarity' (data-free merging;
    `dbscan=(eps, min_samples)` restricts merges to DBSCAN clusters).
    outputs: stage OUT and --save-plan into the caller's StagedOutputs, which the caller commits with its own
    files (the CLI's report); by default they are committed here, at the end of a successful run."""
    requested = options or PruneOptions.from_keywords(**keywords)
    options = requested.validated()
    check_paths(source, output, options)
    if data_passes(options):
        import_torch_in_background()
    t0 = time.perf_counter()
    staged = outputs if outputs is not None else StagedOutputs()
    with staged, memory_limit(options.memory_limit_gb):  # a failure discards what was staged: nothing is written
        try:
            run, manager, results, guard = run_passes(source, output, options, progress, staged)
        except DataPassesUnavailable as e:
            if not default_mode(requested):
                raise   # data were asked for by name: say why they cannot be used
            options = replace(requested, fast=True).validated()
            run, manager, results, guard = run_passes(source, output, options, progress, staged)
            run.model.warnings.insert(0, f"the default mode's data passes cannot run on this model ({e.reason}): "
                                         f"pruned as --fast does (magnitude ranking, no reconstruction); the "
                                         f"fidelity line says what that kept")
        timings = {name: round(seconds, 4) for name, seconds in manager.timings.items()}
        timings["total"] = round(time.perf_counter() - t0, 4)
        report = assemble_report(run, results, timings)
        if guard is not None:
            report["fidelity"]["guard"] = guard
        if outputs is None:
            staged.commit()
    return Result(run.model, report)


def run_passes(source, output, options: PruneOptions, progress, staged: StagedOutputs):
    """(run, manager, results, fidelity guard section or None) of one pipeline, guarded when --max-drop asks."""
    if options.max_drop is not None:
        return guarded(source, output, options, progress, staged)
    return (*pipeline(source, output, options, progress, staged), None)


def pipeline(source, output, options: PruneOptions, progress, staged: StagedOutputs, write: bool = True):
    """(run, manager, results) of one cut: the passes in order; with --allocation auto, measured_allocation."""
    run = PruneRun(source, output, options, progress, outputs=staged)
    measured = options.allocation == MEASURED_ALLOCATION
    manager = PassManager(passes_for(options, write=write and not measured))
    if not measured:
        return run, manager, manager.run(run)
    run, manager, results = measured_allocation(run, manager)
    if write:
        results["save"] = manager.run_one(WriteOutputs(), run)
    return run, manager, results


def measured_allocation(run: PruneRun, manager: PassManager):
    """--allocation auto: the uniform plan; where the banded plan differs (a deep cut opens its band), that one
    too, on the same data, refit the same way and measured on the same held-out samples; the plan whose
    outputs stay closer to the original's (selection_error) is kept, uniform on a tie. The banded trade gained
    1-2 points on some nets at 70 % of the MACs removed and lost 1.2 on another (BENCHMARKS.md): measuring
    both keeps the gains where the held-out samples confirm them. Costs a second refit at deep cuts only."""
    try:
        results, failed = manager.run(run), None
    except FidelityNotMet as e:   # the guard may still accept the other plan
        if run.alternative is None:
            raise
        results, failed = None, e
    if run.alternative is None:
        chosen, why = one_plan(run)
        results["allocation"] = PassResult(report={"allocation": {"requested": MEASURED_ALLOCATION,
                                                                  "chosen": chosen, "why": why}})
        return run, manager, results
    t = time.perf_counter()
    progress = (lambda stage: run.progress(f"allocation check, banded plan: {stage}")) if run.progress else None
    second = PruneRun(run.source, run.output, replace(run.options, allocation="banded"), progress,
                      outputs=run.outputs, inherited=run)
    second_manager = PassManager(passes_for(second.options, write=False))
    try:
        second_results, second_failed = second_manager.run(second), None
    except FidelityNotMet as e:
        second_results, second_failed = None, e
    seconds = time.perf_counter() - t
    if failed is not None and second_failed is not None:  # neither within the guard: the smaller drop speaks
        raise min((failed, second_failed), key=lambda e: e.section["drop_pct"])
    errors = {}
    for name, res, fail in (("uniform", results, failed), ("banded", second_results, second_failed)):
        outputs = fail.section["outputs"] if fail is not None else res["fidelity"].report["fidelity"]["outputs"]
        errors[name] = selection_error(outputs)
    metric = errors["uniform"][1]
    banded = second_failed is None and (failed is not None or errors["banded"][0] < errors["uniform"][0])
    timings = {**manager.timings, "allocation check": seconds}   # the first run's passes, the second as one stage
    if banded:
        run, manager, results = second, second_manager, second_results
    manager.timings = timings
    section = {"requested": MEASURED_ALLOCATION, "chosen": "banded" if banded else "uniform", "metric": metric,
               "on": run.holdout_label or "random inputs",
               "candidates": {name: {"error": err, **({"within_guard": False} if fail else {})}
                              for (name, (err, _)), fail in zip(errors.items(), (failed, second_failed))},
               "seconds_second_candidate": round(seconds, 3)}
    results["allocation"] = PassResult(report={"allocation": section})
    return run, manager, results


def one_plan(run: PruneRun) -> tuple[str, str]:
    """(the plan kept, why) where --allocation auto had no second plan to measure."""
    opts = run.options
    if opts.plan_file:
        return "plan", "the cut came as a plan (--plan, or the --policy search)"
    if opts.target_flops is None:
        return "uniform", "--ratio removes the same share of every group"
    if not run.holdout:
        return "uniform", "no held-out samples to compare plans on" + (
            f" (--calib with fewer than {4 * HOLDOUT_MIN} samples)" if opts.calib is not None else "")
    return "uniform", "the banded plan is the uniform one at this cut"


def default_mode(options: PruneOptions) -> bool:
    """Whether the options leave the data passes to the defaults: no data criterion, calibration data or value
    pass was asked for by name (then a model they cannot run falls back to what --fast does, keeping a weight
    criterion that was named)."""
    return not (options.fast or options.importance in DATA_CRITERIA or options.reconstruct
                or options.calib is not None
                or options.recalibrate or options.compensate or options.synth_steps is not None
                or options.input_range is not None
                or options.positions is not None or options.damp is not None or options.exact_hessians)


def guarded(source, output, options: PruneOptions, progress, staged: StagedOutputs):
    """--max-drop: the requested cut, and when it loses more fidelity than allowed, a bisection on the share of
    it (GUARD_PROBES smaller cuts); the largest cut within the guard is written. None within it: FidelityError."""
    tried: list[dict] = []
    best = None
    lo, hi, share = 0.0, 1.0, 1.0
    for _ in range(GUARD_PROBES + 1):
        probe = scaled_cut(options, share)
        try:
            run, manager, results = pipeline(source, output, probe, progress, staged, write=False)
        except FidelityNotMet as e:
            tried.append({"share_of_cut": share, **cut_of(probe), "drop_pct": e.section["drop_pct"],
                          "metric": e.section["metric"], "met": False})
            hi = share
        else:
            section = results["fidelity"].report["fidelity"]
            removes = results["score+select"].report["groups"]["pruned"] > 0
            tried.append({"share_of_cut": share, **cut_of(probe), "drop_pct": section["drop_pct"],
                          "metric": section["metric"], "met": removes, **({} if removes else {"removes": "nothing"})})
            if not removes:  # so small a cut removes no unit: smaller ones do not either
                break
            best, lo = (run, manager, results), share
            if share == 1.0:
                break
        if options.plan_file:
            break  # a plan is checked, not scaled
        share = (lo + hi) / 2
    if best is None:
        worst = next(t for t in reversed(tried) if "removes" not in t) if len(tried) > 1 else tried[-1]
        raise FidelityError(f"--max-drop {options.max_drop:g}: even the smallest cut tried ({describe_cut(worst)}) "
                            f"loses {worst['drop_pct']:.2f} % > {options.max_drop:g} % ({worst['metric']}); "
                            f"nothing written (allow a larger --max-drop; more --calib data measures it finer)")
    run, manager, results = best
    results["save"] = manager.run_one(WriteOutputs(), run)
    met = tried[0]["met"]
    return run, manager, results, {
        "max_drop_pct": options.max_drop, "met_at_requested_budget": met, "tried": tried,
        "outcome": "the requested budget is within the guard" if met else
                   f"pruned less than asked, as far as the guard allows ({describe_cut(next(t for t in reversed(tried) if t['met']))})"}


def scaled_cut(options: PruneOptions, share: float) -> PruneOptions:
    """The options with `share` of the requested cut (1 = as asked): keep 1 - share x (1 - F) of the MACs, or
    remove share x R of every group."""
    if share == 1.0 or options.plan_file:
        return options
    if options.target_flops is not None:
        return replace(options, target_flops=1.0 - share * (1.0 - options.target_flops))
    return replace(options, ratio=share * options.ratio)


def cut_of(options: PruneOptions) -> dict:
    if options.plan_file:
        return {"plan": str(options.plan_file)}
    return {"target_flops": options.target_flops} if options.target_flops is not None else {"ratio": options.ratio}


def describe_cut(tried: dict) -> str:
    if "target_flops" in tried:
        return f"keep {tried['target_flops']:.3f} of the MACs"
    return f"--ratio {tried['ratio']:.3f}" if "ratio" in tried else f"the plan {tried['plan']}"


def assemble_report(run: PruneRun, results: dict, timings: dict) -> dict:
    """The run's JSON report: each pass's section, in a fixed order, plus what the run as a whole knows."""
    sections: dict = {}
    for result in results.values():
        sections.update(result.report)
    opts, inputs, graph = run.options, run.score_inputs, run.model.graph
    params_after = param_count(graph)
    return {
        "input": str(run.source), "output": str(run.output) if run.output else None,
        "macs": sections["macs"],
        "params": {"before": run.params_before, "after": params_after,
                   "ratio": params_after / max(run.params_before, 1)},
        "groups": sections["groups"],
        "frozen": sections["frozen"],
        "unruled_ops": sections["unruled_ops"],
        "per_group": sections["per_group"],
        "verification": sections.get("verification", {"status": "skipped (--no-verify)"}),
        "compensation": sections.get("compensation"),
        "reconstruction": sections.get("reconstruction"),
        "fidelity": sections.get("fidelity"),
        "allocation": sections.get("allocation", {"requested": opts.allocation,
                                                  "chosen": "plan" if opts.plan_file else opts.allocation}),
        "importance": {"criterion": opts.importance, "aggregation": opts.aggregation,
                       "normalization": opts.normalization, "data": data_label(run.data, opts.importance),
                       "notes": inputs.notes,
                       **({"obspa_timings_s": {k: round(v, 3) for k, v in inputs.cache["obspa_timing"].items()}}
                          if "obspa_timing" in inputs.cache else {}),
                       **({"hessian_data": inputs.cache["obspa_data"]} if "obspa_data" in inputs.cache else {})},
        "apply": sections["apply"],
        "normalize": run.model.normalize_report,
        "warnings": run.model.warnings,
        "input_shapes": {k: list(v) for k, v in run.model.input_shapes.items()},
        "timings_s": timings,
        **{key: sections[key] for key in ("patterns", "storage") if key in sections},
    }


def check_paths(source, output, options: PruneOptions) -> None:
    """No output may be an input (the model, a plan, calibration data) or another output, and each must be
    writable, before any work."""
    check_outputs({"OUT": output, "--save-plan": options.save_plan},
                  input_paths(source, options.plan_file, options.calib))


def input_paths(*candidates) -> tuple:
    """The files among a run's inputs (zoo names, ModelProtos, Calib objects and None are not files)."""
    return tuple(c for c in candidates if isinstance(c, (str, os.PathLike)) and not str(c).startswith("zoo:"))


def check_output_path(output, flag: str = "OUT") -> None:
    check_outputs({flag: output})
