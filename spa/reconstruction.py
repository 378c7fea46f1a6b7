"""The value passes after the structural cut: similarity compensation, least-squares refit and re-calibration.
Each changes weight values only, on a model whose structure is already verified; fidelity to the original is
measured before and after on the same inputs (calibration data, or random inputs when data-free)."""
from __future__ import annotations

from .execution import batch_size_for
from .passes import verify
from .passes.compensate import fidelity
from .passes.reconstruct import Reconstruct
from .passes.similarity import SimilarityCompensation
from .synthesis import model_data


def fidelity_feeds(run) -> tuple[list[dict], str]:
    """The inputs fidelity is measured on: the held-out samples when the run has some (spa.pipeline), else up to
    256 calibration samples in whole batches (onnxruntime needs exactly the batch size a fixed batch dim
    declares), else two random draws."""
    data, model = run.data, run.model
    if run.holdout:
        return run.holdout, run.holdout_label
    if data is None:
        return [verify.random_inputs(run.original, model.input_shapes, seed) for seed in (0, 1)], \
            "random inputs (data-free)"
    bs, fixed = batch_size_for(model.graph, 64)
    feeds = [b for b, _ in data.subset(min(data.n, 256 if bs >= 16 else 64)).batches(bs)
             if next(iter(b.values())).shape[0] == bs or not fixed]  # a free batch dim takes a short last batch
    return feeds, "calibration data"


def reconstruct_values(run, data_label: str) -> dict:
    """Run the value passes the options ask for on `run.model`; the report section with fidelity before/after."""
    opts, model, original = run.options, run.model, run.original
    feeds_list, fidelity_on = fidelity_feeds(run)
    reference = run.reference_on_holdout() if run.holdout else verify.run_many(original, feeds_list, "reference")
    before = fidelity(original, model.graph.to_model(), model.input_shapes, feeds=feeds_list, reference=reference)
    report: dict = {"fidelity_before": before, "passes": []}
    if opts.compensate == "similarity":
        run.step("similarity")
        stats = SimilarityCompensation(run.analysis, run.removed, original, dbscan=opts.dbscan).run(model)
        report["passes"].append({"pass": "similarity", **stats})
    if opts.reconstruct or opts.recalibrate:
        run.step("reconstruct")
        feeds, _ = model_data(run.score_inputs)
        kw = {k: v for k, v in (("positions", opts.positions), ("damp", opts.damp)) if v is not None}
        targets = run.score_inputs.cache.pop("obspa_targets", None)  # the refit consumes (and frees) them
        stats = Reconstruct(original, run.out_rows, feeds, refit=opts.reconstruct, recalibrate=opts.recalibrate,
                            seed=opts.seed, progress=run.step, targets=targets, patterns=run.patterns,
                            **kw).run(model)
        name = "+".join(p for p, used in (("obspa-refit", opts.reconstruct), ("recalibrate", opts.recalibrate))
                        if used)
        report["passes"].append({"pass": name, "data": data_label, **stats})
    pruned = model.graph.to_model()
    verify.check(pruned)
    report["fidelity_after"] = fidelity(original, pruned, model.input_shapes, feeds=feeds_list, reference=reference)
    report["fidelity_on"] = fidelity_on
    run.pruned = pruned
    if run.holdout:  # the fidelity pass measures this same model on the same held-out feeds: it reads this
        run.holdout_fidelity = (pruned, report["fidelity_after"])
    return report
