"""The pipeline behind the CLI and the Python API:

    load ─► normalize ─► analyse ─► score ─► select ─► apply ─► verify ─► [compensate] ─► [reconstruct] ─► save

`prune` validates its options once, runs the passes of `spa.pipeline` in this order through the pass manager,
and assembles the report from what they return.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .fileio import StagedOutputs, check_outputs
from .groups import Analysis
from .importance import score
from .loading import load, param_count, resolve_input
from .memory import memory_limit
from .model import Model
from .options import PruneOptions
from .passes import PassManager
from .passes.analyse import Analyse
from .pipeline import (
    AnalyseModel,
    ApplyPlan,
    FoldConstants,
    LoadModel,
    PruneRun,
    Reconstruction,
    ScoreAndSelect,
    VerifyStructure,
    WriteOutputs,
    data_label,
    explain_nothing,
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


def passes_for(options: PruneOptions) -> list:
    """The run's passes, in order: the structural cut and its check always, the value passes when asked."""
    passes = [LoadModel(), AnalyseModel(), ScoreAndSelect(), ApplyPlan()]
    if options.verify:
        passes.append(VerifyStructure())
    if options.fold_constants:
        passes.append(FoldConstants())
    if options.value_passes:
        passes.append(Reconstruction())
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
    options = (options or PruneOptions.from_keywords(**keywords)).validated()
    check_paths(source, output, options)
    t0 = time.perf_counter()
    staged = outputs if outputs is not None else StagedOutputs()
    with staged, memory_limit(options.memory_limit_gb):  # a failure discards what was staged: nothing is written
        run = PruneRun(source, output, options, progress, outputs=staged)
        manager = PassManager(passes_for(options))
        results = manager.run(run)
        timings = {name: round(seconds, 4) for name, seconds in manager.timings.items()}
        timings["total"] = round(time.perf_counter() - t0, 4)
        report = assemble_report(run, results, timings)
        if outputs is None:
            staged.commit()
    return Result(run.model, report)


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
