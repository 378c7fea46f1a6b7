"""Progressive pruning: reach the budget in K verified steps, optionally fine-tuning (with distillation from the
original) between them.

    spa-prune IN OUT --target-flops 0.5 --steps 3 [--finetune-data train.npz --finetune-epochs 1]

Step k of K aims at F^(k/K) of the ORIGINAL model's MACs (a geometric schedule: every step removes the same
fraction of what is left), measured on the model the previous step produced, so rounding in one step is made up
in the next and the last step lands on F exactly as a one-shot run would. With --ratio R every step removes
1 - (1 - R)^(1/K) of each group's remaining units. Each step is a full `driver.prune` run (scores on the current
model, apply, verify against that step's input, optional reconstruction), so every intermediate model is checked
like any other output. Between steps, `finetune_data` trains the intermediate model (spa/finetune.py), distilling
from the original unless `kd=False`; the final model is not fine-tuned here (run `spa-prune finetune` on it).
"""
from __future__ import annotations

import onnx

from . import driver
from .errors import SpaError
from .finetune import _load, finetune
from .ir import save_model


def step_targets(steps: int, ratio: float | None, target_flops: float | None) -> list[float]:
    """Per step: the fraction of the ORIGINAL MACs to reach (target_flops) or the per-group ratio (ratio)."""
    if ratio is not None:
        return [1.0 - (1.0 - ratio) ** (1.0 / steps)] * steps
    return [target_flops ** (k / steps) for k in range(1, steps + 1)]


def prune_progressive(source, output=None, *, steps: int, ratio=None, target_flops=None, finetune_data=None,
                      finetune_epochs: int = 1, finetune_options: dict | None = None, kd: bool = True,
                      progress=None, **prune_kwargs):
    """Prune in `steps` steps; returns a driver.Result whose report has the overall numbers plus one entry per
    step. `prune_kwargs` go to every driver.prune call (importance, calib, reconstruct, input_shapes, ...)."""
    if int(steps) != steps or steps < 1:
        raise SpaError(f"--steps must be a whole number >= 1, got {steps}")
    if (ratio is None) == (target_flops is None):
        raise SpaError("progressive pruning needs exactly one of --ratio or --target-flops")
    for bad in ("plan_file", "save_plan"):
        if prune_kwargs.get(bad):
            raise SpaError("--plan/--save-plan describe one step; they cannot be combined with --steps")
    if finetune_epochs < 0:
        raise SpaError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    if output is not None:
        driver.check_output_path(output)
    say = progress or (lambda s: None)
    teacher = driver.load(source, prune_kwargs.get("input_shapes")).graph.to_model()
    if finetune_data is not None and finetune_epochs > 0:  # read and checked once, before any pruning
        finetune_data = _load(finetune_data, teacher, "fine-tuning")
    current = teacher
    reports, tuned = [], []
    macs0 = params0 = None
    for k, want in enumerate(step_targets(steps, ratio, target_flops), start=1):
        tag = f"step {k}/{steps}"
        if ratio is not None:
            res = driver.prune(current, None, ratio=want, progress=lambda s, t=tag: say(f"{t} {s}"), **prune_kwargs)
        else:
            frac = want if not reports else want * macs0 / max(reports[-1]["macs"]["after"], 1)
            res = driver.prune(current, None, target_flops=min(1.0, frac),
                               progress=lambda s, t=tag: say(f"{t} {s}"), **prune_kwargs)
        rep = res.report
        if macs0 is None:
            macs0, params0 = rep["macs"]["before"], rep["params"]["before"]
        reports.append(rep)
        current = res.model.graph.to_model()
        if finetune_data is not None and finetune_epochs > 0 and k < steps:
            say(f"{tag} finetune")
            ft = finetune(current, None, data=finetune_data, teacher=teacher if kd else None,
                          epochs=finetune_epochs, **(finetune_options or {}))
            current = ft.model
            tuned.append({"after_step": k, **{key: ft.report[key] for key in ("epochs", "loss", "seconds")},
                          "history": ft.history})
    if output is not None:
        try:
            save_model(current, output)
        except OSError as e:
            raise SpaError(f"cannot write {output}: {e.strerror or e}")
    last = reports[-1]
    macs_after, params_after = last["macs"]["after"], last["params"]["after"]
    report = dict(last)
    report.update({
        "input": str(source) if not isinstance(source, onnx.ModelProto) else "<model>",
        "output": str(output) if output else None,
        "macs": {"before": macs0, "after": macs_after, "ratio": macs_after / max(macs0, 1)},
        "params": {"before": params0, "after": params_after, "ratio": params_after / max(params0, 1)},
        "progressive": {
            "steps": steps, "schedule": step_targets(steps, ratio, target_flops),
            "per_step": [{"step": i + 1, "macs_after": r["macs"]["after"], "params_after": r["params"]["after"],
                          "verification": r["verification"].get("status"),
                          "max_rel_error": r["verification"].get("max_rel_error"),
                          "reconstruction": (r.get("reconstruction") or {}).get("fidelity_after"),
                          "seconds": r["timings_s"]["total"]} for i, r in enumerate(reports)],
            "finetune": tuned,
        },
    })
    report["timings_s"] = {"total": round(sum(r["timings_s"]["total"] for r in reports)
                                          + sum(t["seconds"] for t in tuned), 4)}
    if any(r["verification"].get("status") != "passed" for r in reports):
        report["verification"] = {"status": "skipped in some step (--no-verify)"}
    return driver.Result(res.model, report)  # the last step is never fine-tuned here: its model is `current`
