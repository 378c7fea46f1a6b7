"""The pipeline behind the CLI and the Python API:

    load ─► normalize ─► analyse ─► score ─► select ─► apply ─► verify ─► save
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from spa.passes import PassManager
from spa.passes.analyse import Analyse
from spa.passes.apply import Apply
from spa.passes.normalize import Normalize

from .errors import SpaError
from .groups import Analysis
from .importance import score
from .ir import Graph, read_model, save_model
from .model import Model
from .select import PruningPlan, select, write_plan


def load(source, input_shapes: dict | None = None) -> Model:
    """Load an ONNX file (or a ModelProto, or 'zoo:NAME[:small][:dynamo]') and normalize it."""
    name = str(source) if not isinstance(source, onnx.ModelProto) else "<model>"
    raw = None
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
    else:
        proto, raw = read_model(resolve_input(str(source)))
    model = Model(Graph(proto, raw=raw), source=name)
    PassManager([Normalize(input_shapes)]).run(model)
    return model


def resolve_input(source: str) -> str:
    if not source.startswith("zoo:"):
        return source
    parts = source[4:].split(":")
    try:
        from spa import models
    except ImportError as e:  # torch is an extra
        raise SpaError(f"'{source}' needs the model zoo extra (torch): {e}")
    if parts[0] not in models.ZOO_NAMES:
        raise SpaError(f"unknown zoo model '{parts[0]}' (available: {', '.join(models.ZOO_NAMES)})")
    return str(models.zoo_path(parts[0], dynamo="dynamo" in parts[1:], small="small" in parts[1:]))


def analyse(model: Model) -> Analysis:
    return Analyse().run(model)


def plan(model: Model, *, ratio=None, target_flops=None, importance="l2", aggregation="sum",
         normalization="mean", min_channels=1, round_to=1, exclude=None, max_ratio=1.0) -> PruningPlan:
    analysis = analyse(model)
    scores = score(analysis, importance, aggregation, normalization)
    return select(analysis, scores, ratio=ratio, target_flops=target_flops, min_channels=min_channels,
                  round_to=round_to, exclude=exclude, max_ratio=max_ratio)


def param_count(g: Graph) -> int:
    total = 0
    for name in g.initializer_names():
        shape, dtype = g.const_info(name)
        if np.dtype(dtype).kind == "f":
            total += int(np.prod(shape))
    return total


@dataclass
class Result:
    model: Model
    report: dict = field(default_factory=dict)


def prune(source, output=None, *, ratio=None, target_flops=None, importance="l2", aggregation="sum",
          normalization="mean", min_channels=1, round_to=1, exclude=None, max_ratio=1.0, allocation="global",
          plan_file=None,
          save_plan=None, verify=True, rtol=1e-4, strict=False, input_shapes=None, progress=None,
          fold_constants=False, calib=None, calib_limit=None, loss="auto", reconstruct=None, recalibrate=False,
          compensate=None, dbscan=None, positions=None, damp=None, samples=64, seed=0) -> Result:
    """Prune a model end to end; write `output` only after every check passed.

    calib: a .npz file / image folder / spa.calib.Calib (None: data-free: synthesized inputs where data is
    needed). reconstruct: refit the consumers by least squares (default: on for importance 'obspa').
    recalibrate: per-layer statistics matching (needs calib). compensate: 'similarity' (data-free merging;
    `dbscan=(eps, min_samples)` restricts merges to DBSCAN clusters)."""
    step = progress or (lambda s: None)
    t0 = time.perf_counter()
    timings = {}

    def lap(name, since):
        timings[name] = round(time.perf_counter() - since, 4)
        return time.perf_counter()

    if output is not None and not str(source).startswith("zoo:") and Path(output).exists() \
            and Path(source).exists() and os.path.samefile(source, output):
        raise SpaError("output path is the input file; refusing to overwrite the input")
    if output is not None:
        check_output_path(output)
    _check_data_options(positions, damp, samples, dbscan)
    step("load")
    t = time.perf_counter()
    model = load(source, input_shapes)
    t = lap("load+normalize", t)
    original = onnx.ModelProto()
    if verify:
        original.CopyFrom(model.graph.to_model())
    params_before = param_count(model.graph)
    step("analyse")
    analysis = analyse(model)
    t = lap("analyse", t)
    frozen_groups = [g for g in analysis.groups if g.prunable == 0]
    if strict:  # a graph output's channels are fixed by the interface, not by a missing rule
        for g in analysis.groups:
            real = [(w, r) for w, r in g.reasons if not w.startswith("graph output")]
            if real:
                raise SpaError(f"--strict: group '{g.name}' is frozen at {real[0][0]}: {real[0][1]}")
    if not any(g.prunable >= 1 and g.size >= 2 for g in analysis.groups):
        raise SpaError("no prunable group: " + explain_nothing(analysis))
    calib_data = _load_data(calib, model, calib_limit)
    if reconstruct is None:
        reconstruct = importance == "obspa"
    if recalibrate and calib_data is None:
        raise SpaError("--recalibrate needs calibration data (--calib FILE.npz or an image folder)")
    if compensate not in (None, "similarity"):
        raise SpaError(f"unknown compensation '{compensate}' (choose from: similarity)")
    if (reconstruct or recalibrate or compensate) and not verify:
        raise SpaError("reconstruction and compensation need verification (they report fidelity); drop --no-verify")
    from .importance import ScoreInputs
    inputs = ScoreInputs(analysis, calib=calib_data, loss=loss, samples=samples, seed=seed, progress=step)
    inputs.cache["obspa_options"] = {k: v for k, v in (("positions", positions), ("damp", damp)) if v is not None}
    step("score")
    if plan_file:
        try:
            data = json.loads(Path(plan_file).read_text())
        except (OSError, ValueError) as e:
            raise SpaError(f"cannot read plan {plan_file}: {e}")
        chosen = PruningPlan.from_json(data, analysis)
    else:
        scores = score(analysis, importance, aggregation, normalization, inputs)
        chosen = select(analysis, scores, ratio=ratio, target_flops=target_flops, min_channels=min_channels,
                        round_to=round_to, exclude=exclude, max_ratio=max_ratio, allocation=allocation)
    t = lap("score+select", t)
    removed = chosen.roots(analysis)
    plan_json = chosen.to_json(analysis) if save_plan else None  # before Apply, which rewrites the initializers
    macs_before = analysis.total_macs
    macs_after = analysis.macs_after(removed)
    if target_flops is not None and not plan_file and macs_after > target_flops * macs_before * (1 + 1e-9):
        # select() then prunes as far as the constraints allow; say so instead of staying quiet
        model.warnings.append(
            f"the budget cannot be met: --target-flops {target_flops:g}, but the smallest model that "
            f"--min-channels/--round-to/--max-ratio/--exclude and the frozen groups allow keeps "
            f"{macs_after / max(macs_before, 1):.4f} of the MACs; pruned as far as they allow")
    group_rows = [{"id": g.id, "name": g.name, "units": g.size,
                   "kept": g.size - len(chosen.removed.get(g.id, [])), "frozen_units": int(g.frozen.sum()),
                   "given_back": chosen.given_back.get(g.id, 0)}
                  for g in analysis.groups]
    out_rows = None
    if reconstruct or recalibrate:
        from spa.passes.reconstruct import output_rows
        out_rows = output_rows(analysis, removed)
    step("apply")
    apply_stats = Apply(analysis, removed).run(model)
    t = lap("apply", t)
    pruned = model.graph.to_model()
    verification = {"status": "skipped (--no-verify)"}
    if verify:
        step("verify")
        from spa.passes import verify as V
        V.check(pruned)
        reference = V.build_reference(original, analysis, removed, analysis.node_index)
        verification = {"status": "passed", **V.compare(reference, pruned, model.input_shapes, rtol=rtol)}
        t = lap("verify", t)
    compensation = None
    if fold_constants:
        if not verify:
            raise SpaError("--fold-constants needs verification (it measures fidelity); drop --no-verify")
        step("compensate")
        from spa.passes.compensate import FoldRemovedConstants, fidelity
        before = fidelity(original, pruned, model.input_shapes)
        stats = FoldRemovedConstants(analysis, removed, original, model.input_shapes).run(model)
        pruned = model.graph.to_model()
        V.check(pruned)
        compensation = {"pass": "fold-constants", **stats, "fidelity_before": before,
                        "fidelity_after": fidelity(original, pruned, model.input_shapes)}
        t = lap("compensate", t)
    reconstruction = None
    if reconstruct or recalibrate or compensate:
        reconstruction = _reconstruct(model, original, analysis, removed, calib_data, inputs, out_rows, step,
                                      reconstruct=reconstruct, recalibrate=recalibrate, compensate=compensate,
                                      dbscan=dbscan, positions=positions, damp=damp, seed=seed)
        pruned = model.graph.to_model()
        t = lap("reconstruct", t)
    if save_plan:
        write_plan(plan_json, save_plan)
    if output is not None:
        step("save")
        try:
            save_model(pruned, output)
        except OSError as e:
            raise SpaError(f"cannot write {output}: {e.strerror or e}")
        t = lap("save", t)
    timings["total"] = round(time.perf_counter() - t0, 4)
    report = {
        "input": str(source), "output": str(output) if output else None,
        "macs": {"before": macs_before, "after": macs_after, "ratio": macs_after / max(macs_before, 1)},
        "params": {"before": params_before, "after": param_count(model.graph),
                   "ratio": param_count(model.graph) / max(params_before, 1)},
        "groups": {"total": len(analysis.groups), "pruned": len([g for g in chosen.removed.values() if g]),
                   "frozen": len(frozen_groups),
                   "partially_frozen": len([g for g in analysis.groups if g.frozen.any() and g.prunable > 0])},
        "frozen": [{"group": g.name, "units": g.size, "reasons": [{"where": w, "why": r} for w, r in g.reasons]}
                   for g in analysis.groups if g.frozen.any()],
        "unruled_ops": analysis.unruled_ops,
        "per_group": group_rows,
        "verification": verification,
        "compensation": compensation,
        "reconstruction": reconstruction,
        "importance": {"criterion": importance, "aggregation": aggregation, "normalization": normalization,
                       "data": _data_label(calib_data, importance), "notes": inputs.notes,
                       **({"obspa_timings_s": {k: round(v, 3) for k, v in inputs.cache["obspa_timing"].items()}}
                          if "obspa_timing" in inputs.cache else {}),
                       **({"hessian_data": inputs.cache["obspa_data"]} if "obspa_data" in inputs.cache else {})},
        "apply": apply_stats,
        "normalize": model.normalize_report,
        "warnings": model.warnings,
        "input_shapes": {k: list(v) for k, v in model.input_shapes.items()},
        "timings_s": timings,
    }
    return Result(model, report)


def _check_data_options(positions, damp, samples, dbscan) -> None:
    """Bad numbers for the data-driven passes are one-line errors, before any work (sklearn and torch would
    otherwise raise deep inside, or silently accept a negative dampening)."""
    if positions is not None and positions < 1:
        raise SpaError(f"--positions must be at least 1, got {positions}")
    if damp is not None and not damp >= 0:
        raise SpaError(f"--damp must be >= 0, got {damp}")
    if samples < 1:
        raise SpaError(f"--synth-samples must be at least 1, got {samples}")
    if dbscan is not None:
        eps, min_samples = dbscan
        if not eps > 0 or min_samples < 1:
            raise SpaError(f"--dbscan needs EPS > 0 and MIN_SAMPLES >= 1, got {eps},{min_samples}")


def _load_data(calib, model: Model, limit):
    if calib is None:
        return None
    from .calib import Calib, input_specs, load_calib
    if isinstance(calib, Calib):
        return calib if limit is None else calib.subset(limit)
    return load_calib(str(calib), input_specs(model.graph.model), limit=limit)


def _data_label(data, importance: str) -> str:
    from .importance import CRITERIA
    crit = CRITERIA.get(importance)
    if crit is None or crit.needs == "weights":
        return "weights only"
    return f"calibration ({data.n} samples)" if data is not None else "data-free (synthesized inputs)"


def _reconstruct(model, original, analysis, removed, data, inputs, out_rows, step, *, reconstruct, recalibrate,
                 compensate, dbscan, positions, damp, seed) -> dict:
    """Similarity compensation, least-squares refit and/or re-calibration on the structurally verified model;
    each changes values only. Fidelity to the original is measured before and after on the calibration data
    (or random inputs when data-free)."""
    from spa.passes import verify as V
    from spa.passes.compensate import fidelity

    from .obspa import batch_size_for, model_data
    if data is not None:
        bs, _ = batch_size_for(model.graph, 64)  # onnxruntime: a fixed batch dim gets batches of exactly that size
        feeds_list = [b for b, _ in data.subset(min(data.n, 256 if bs >= 16 else 64)).batches(bs)
                      if next(iter(b.values())).shape[0] == bs]
        fidelity_on = "calibration data"
    else:
        feeds_list = [V.random_inputs(original, model.input_shapes, seed) for seed in (0, 1)]
        fidelity_on = "random inputs (data-free)"
    reference = V.run_many(original, feeds_list, "reference")
    before = fidelity(original, model.graph.to_model(), model.input_shapes, feeds=feeds_list, reference=reference)
    report: dict = {"fidelity_before": before, "passes": []}
    if compensate == "similarity":
        step("similarity")
        from spa.passes.similarity import SimilarityCompensation
        stats = SimilarityCompensation(analysis, removed, original, dbscan=dbscan).run(model)
        report["passes"].append({"pass": "similarity", **stats})
    if reconstruct or recalibrate:
        step("reconstruct")
        from spa.passes.reconstruct import Reconstruct
        feeds, _ = model_data(inputs)
        kw = {k: v for k, v in (("positions", positions), ("damp", damp)) if v is not None}
        stats = Reconstruct(original, out_rows, feeds, refit=reconstruct, recalibrate=recalibrate, seed=seed,
                            progress=step, **kw).run(model)
        name = "+".join(p for p, used in (("obspa-refit", reconstruct), ("recalibrate", recalibrate)) if used)
        report["passes"].append({"pass": name, "data": _data_label(data, "obspa"), **stats})
    pruned = model.graph.to_model()
    V.check(pruned)
    report["fidelity_after"] = fidelity(original, pruned, model.input_shapes, feeds=feeds_list, reference=reference)
    report["fidelity_on"] = fidelity_on
    return report


def check_output_path(output) -> None:
    p = Path(output)
    if p.is_dir():
        raise SpaError(f"output {p} is a directory")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SpaError(f"cannot create {p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise SpaError(f"cannot write into {parent}")


def explain_nothing(analysis: Analysis) -> str:
    if not analysis.ctx.sources:
        return ("no Conv/ConvTranspose/Gemm/MatMul with a constant weight was found (quantized or "
                "run-time weights are not prunable yet)")
    reasons = {}
    for g in analysis.groups:
        for where, why in g.reasons:
            reasons.setdefault(why, where)
    top = "; ".join(f"{why} (at {where})" for why, where in list(reasons.items())[:3])
    return f"every group is frozen or has a single unit: {top or 'all groups have one unit'}"
