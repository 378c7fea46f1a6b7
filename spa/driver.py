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

from passes import PassManager
from passes.analyse import Analyse
from passes.apply import Apply
from passes.normalize import Normalize

from .errors import SpaError
from .groups import Analysis
from .ir import Graph, read_model, save_model
from .model import Model
from .importance import score
from .select import PruningPlan, select


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
        import models
    except ImportError as e:  # torch is an extra
        raise SpaError(f"'{source}' needs the model zoo extra (torch): {e}")
    if parts[0] not in models.ZOO_NAMES:
        raise SpaError(f"unknown zoo model '{parts[0]}' (available: {', '.join(models.ZOO_NAMES)})")
    return str(models.zoo_path(parts[0], dynamo="dynamo" in parts[1:], small="small" in parts[1:]))


def analyse(model: Model) -> Analysis:
    return Analyse().run(model)


def plan(model: Model, *, ratio=None, target_flops=None, importance="l2", aggregation="sum",
         normalization="mean", min_channels=1, round_to=1, exclude=None, max_ratio=1.0) -> PruningPlan:
    an = analyse(model)
    scores = score(an, importance, aggregation, normalization)
    return select(an, scores, ratio=ratio, target_flops=target_flops, min_channels=min_channels,
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
          normalization="mean", min_channels=1, round_to=1, exclude=None, max_ratio=1.0, plan_file=None,
          save_plan=None, verify=True, rtol=1e-4, strict=False, input_shapes=None, progress=None,
          fold_constants=False) -> Result:
    """Prune a model end to end; write `output` only after every check passed."""
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
    step("load")
    t = time.perf_counter()
    model = load(source, input_shapes)
    t = lap("load+normalize", t)
    original = onnx.ModelProto()
    if verify:
        original.CopyFrom(model.graph.to_model())
    params_before = param_count(model.graph)
    step("analyse")
    an = analyse(model)
    t = lap("analyse", t)
    frozen_groups = [g for g in an.groups if g.prunable == 0]
    if strict:  # a graph output's channels are fixed by the interface, not by a missing rule
        for g in an.groups:
            real = [(w, r) for w, r in g.reasons if not w.startswith("graph output")]
            if real:
                raise SpaError(f"--strict: group '{g.name}' is frozen at {real[0][0]}: {real[0][1]}")
    if not any(g.prunable >= 1 and g.size >= 2 for g in an.groups):
        raise SpaError("no prunable group: " + explain_nothing(an))
    step("score")
    if plan_file:
        try:
            data = json.loads(Path(plan_file).read_text())
        except (OSError, ValueError) as e:
            raise SpaError(f"cannot read plan {plan_file}: {e}")
        chosen = PruningPlan.from_json(data, an)
    else:
        scores = score(an, importance, aggregation, normalization)
        chosen = select(an, scores, ratio=ratio, target_flops=target_flops, min_channels=min_channels,
                        round_to=round_to, exclude=exclude, max_ratio=max_ratio)
    t = lap("score+select", t)
    removed = chosen.roots(an)
    macs_before = an.total_macs
    macs_after = an.macs_after(removed)
    group_rows = [{"id": g.id, "name": g.name, "units": g.size,
                   "kept": g.size - len(chosen.removed.get(g.id, [])), "frozen_units": int(g.frozen.sum()),
                   "given_back": chosen.given_back.get(g.id, 0)}
                  for g in an.groups]
    step("apply")
    apply_stats = Apply(an, removed).run(model)
    t = lap("apply", t)
    pruned = model.graph.to_model()
    verification = {"status": "skipped (--no-verify)"}
    if verify:
        step("verify")
        from passes import verify as V
        V.check(pruned)
        reference = V.build_reference(original, an, removed, an.node_index)
        verification = {"status": "passed", **V.compare(reference, pruned, model.input_shapes, rtol=rtol)}
        t = lap("verify", t)
    compensation = None
    if fold_constants:
        if not verify:
            raise SpaError("--fold-constants needs verification (it measures fidelity); drop --no-verify")
        step("compensate")
        from passes.compensate import FoldRemovedConstants, fidelity
        before = fidelity(original, pruned, model.input_shapes)
        stats = FoldRemovedConstants(an, removed, original, model.input_shapes).run(model)
        pruned = model.graph.to_model()
        V.check(pruned)
        compensation = {"pass": "fold-constants", **stats, "fidelity_before": before,
                        "fidelity_after": fidelity(original, pruned, model.input_shapes)}
        t = lap("compensate", t)
    if save_plan:
        chosen.save(save_plan, an)
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
        "groups": {"total": len(an.groups), "pruned": len([g for g in chosen.removed.values() if g]),
                   "frozen": len(frozen_groups),
                   "partially_frozen": len([g for g in an.groups if g.frozen.any() and g.prunable > 0])},
        "frozen": [{"group": g.name, "units": g.size, "reasons": [{"where": w, "why": r} for w, r in g.reasons]}
                   for g in an.groups if g.frozen.any()],
        "unruled_ops": an.unruled_ops,
        "per_group": group_rows,
        "verification": verification,
        "compensation": compensation,
        "apply": apply_stats,
        "normalize": model.normalize_report,
        "warnings": model.warnings,
        "input_shapes": {k: list(v) for k, v in model.input_shapes.items()},
        "timings_s": timings,
    }
    return Result(model, report)


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


def explain_nothing(an: Analysis) -> str:
    if not an.ctx.sources:
        return ("no Conv/ConvTranspose/Gemm/MatMul with a constant weight was found (quantized or "
                "run-time weights are not prunable yet)")
    reasons = {}
    for g in an.groups:
        for where, why in g.reasons:
            reasons.setdefault(why, where)
    top = "; ".join(f"{why} (at {where})" for why, where in list(reasons.items())[:3])
    return f"every group is frozen or has a single unit: {top or 'all groups have one unit'}"
