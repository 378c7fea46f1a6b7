"""The passes of a pruning run, in the order `spa.driver.prune` lists them.

Each pass has one job, reads what earlier passes left on the `PruneRun` (declared in `requires`), leaves its own
results there (`provides`) and returns its part of the report in a `PassResult`. The pass manager checks the
order, times each pass and drops cached analyses after the passes that rewrite the graph.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx

from .calib import Calib, input_specs, load_data
from .errors import DataPassesUnavailable, SpaError, VerificationError, one_line
from .execution import activation_bytes_per_sample, batch_size_for, input_bytes_per_sample
from .fileio import StagedOutputs
from .fixed_transforms import warnings_for as fixed_transform_warnings
from .groups import Analysis
from .importance import CRITERIA, ScoreInputs, score
from .ir import Graph, has_mapped, has_subgraph, needs_external_data, release, save_model
from .loading import load, param_count
from .memory import GB, memory_limit_gb
from .model import Model
from .operators.registry import RULES, canonical_domain
from .options import MEASURED_ALLOCATION, PruneOptions
from .passes import Pass, PassResult, verify
from .passes.analyse import Analyse
from .passes.apply import Apply
from .passes.compensate import FoldRemovedConstants, fidelity
from .passes.normalize import QDQ_RTOL, weights_out_of_reach
from .passes.qdq import dynamic_kernels_back
from .passes.reconstruct import output_rows
from .patterns import apply_patterns, check_patterns, report_section, sparse_storage
from .select import PruningPlan, coarse_groups, read_plan, select
from .synthesis import model_data

HOLDOUT_SHARE = 8        # 1/8 of the calibration samples (at least HOLDOUT_MIN) are kept out of every fit
HOLDOUT_MIN = 8
HOLDOUT_SYNTHESIZED = 16  # data-free: fresh synthesized samples, made with the fitted ones, never fitted


@dataclass
class PruneRun:
    """What one run's passes share: the options, the model as it goes, and what each pass found."""

    source: object
    output: object
    options: PruneOptions
    progress: object = None
    model: Model | None = None
    original: onnx.ModelProto | None = None    # the normalized input, kept for verification and fidelity
    params_before: int = 0
    analysis: Analysis | None = None
    data: object = None                        # calibration data (spa.calib.Calib) or None: data-free
    holdout: list | None = None                # feed batches no pass fits to, for the fidelity measurement
    holdout_label: str = ""
    holdout_reference: list | None = None      # the original's outputs on them (reference_on_holdout)
    holdout_fidelity: tuple | None = None      # (pruned model, its fidelity on them), once measured
    score_inputs: ScoreInputs | None = None
    plan: PruningPlan | None = None
    removed: set = field(default_factory=set)  # union-find roots of the removed units
    plan_json: dict | None = None
    out_rows: dict | None = None               # per-layer kept output rows, taken before Apply cuts the weights
    pruned: onnx.ModelProto | None = None
    patterns: dict | None = None               # node name -> spa.patterns.LayerPattern (--patterns)
    outputs: StagedOutputs = field(default_factory=StagedOutputs)   # files written only when the run commits
    alternative: PruningPlan | None = None     # --allocation auto: the banded plan, where it differs from uniform's
    inherited: PruneRun | None = None          # the run whose data, held-out samples and alternative plan this
    #                                            one refits and measures instead of scoring (spa.driver)

    @property
    def analyses(self) -> dict:
        return self.model.analyses if self.model is not None else {}

    def reference_on_holdout(self) -> list:
        """The original's outputs on the held-out feeds, run once in onnxruntime: the reconstruction's fidelity
        and the fidelity pass both compare against them."""
        if self.holdout_reference is None:
            self.holdout_reference = verify.run_many(self.original, self.holdout, "reference")
        return self.holdout_reference

    def settle_holdout(self) -> None:
        """Run the original on the held-out batches now; an export that declares a dynamic batch but runs only at
        the analysis batch size (torch 2.13's opset-23 RotaryEmbedding with a batch-1 cache) gets its held-out
        samples in batches of that size instead, with a warning, rather than a refusal."""
        try:
            self.reference_on_holdout()
            return
        except SpaError:
            # only where every input carries the samples on dim 0 (a recurrent state may carry them on dim 1)
            size = min((shape[0] for shape in self.model.input_shapes.values() if shape and shape[0] > 0), default=1)
            counts = {len(v) if np.ndim(v) else -1 for feeds in self.holdout for v in feeds.values()}
            smaller = [{k: v[s:s + size] for k, v in feeds.items()} for feeds in self.holdout
                       for s in range(0, len(next(iter(feeds.values()))), size)]
            if len(counts) != 1 or len(smaller) == len(self.holdout):
                raise
        self.holdout_reference = verify.run_many(self.original, smaller, "reference")
        n = len(next(iter(self.holdout[0].values())))
        self.holdout = smaller
        self.model.warnings.append(f"the input model declares a dynamic batch but does not run in onnxruntime at "
                                   f"batch {n}: its held-out samples run {size} at a time")

    def step(self, stage: str) -> None:
        """A new stage: the pages of mapped weights the last one read leave the resident set, then progress."""
        if self.model is not None:
            for value in self.model.graph.arrays.values():
                release(value)
        if self.progress:
            self.progress(stage)


MIN_SYNTHESIZED = 8   # fewer synthesized samples than this are not taken to save memory (--memory-limit refuses)


def synthesized_count(g, wanted: int) -> tuple[int, str | None]:
    """Data-free: how many samples to synthesize, and a note when it is fewer than asked. The layer-wise passes
    (scoring, refit) hold every sample's activations at each node; PP-OCRv4's detector at 640² keeps ~39 MB a
    sample alive, so 64 samples peaked above 4 GB. When `wanted` samples would pass --memory-limit, as many as
    fit (at least MIN_SYNTHESIZED): each layer still samples its positions (8192) from all of them, and a large
    input gives thousands of positions per sample. Calibration samples are not thinned so: fitting the
    detector to 30 of its 56 natural-image crops instead of all cost 0.07 of text IoU (BENCHMARKS.md)."""
    per = activation_bytes_per_sample(g)
    limit = memory_limit_gb() * GB
    if per <= 0 or wanted * per <= limit or wanted * input_bytes_per_sample(g) > limit:
        return wanted, None   # fits; or the samples themselves do not, which the synthesis refuses in one line
    n = max(MIN_SYNTHESIZED, int(limit // per))
    if n >= wanted:
        return wanted, None
    return n, (f"data-free: {n} synthesized samples instead of {wanted}: the layer-wise passes hold every sample's "
               f"activations at each layer ({per / 1e6:.3g} MB a sample at these input shapes), and {wanted} would "
               f"pass --memory-limit {limit / GB:g} GB (raise it to use more)")


def data_passes(opts: PruneOptions) -> bool:
    """Whether the run scores or refits on data (calibration or synthesized): the passes that run the model."""
    return uses_data(opts.importance) or opts.reconstruct or opts.recalibrate


def uses_data(importance: str) -> bool:
    """Whether the criterion reads activations or gradients (calibration data, or synthesized inputs)."""
    crit = CRITERIA.get(importance)
    return crit is not None and crit.needs != "weights"


def data_label(data, importance: str) -> str:
    if not uses_data(importance):
        return "weights only"
    return f"calibration ({data.n} samples)" if data is not None else "data-free (synthesized inputs)"


class LoadModel(Pass):
    """Read and normalize the input; keep a copy of the normalized original for the checks."""
    name, provides = "load+normalize", ("model", "original")

    def run(self, run: PruneRun) -> PassResult:
        run.step("load")
        opts = run.options
        run.model = load(run.source, opts.input_shapes, opts.memory_limit_gb, qdq=data_passes(opts))
        if run.options.verify:
            run.original = onnx.ModelProto()
            run.original.CopyFrom(run.model.graph.to_model())
        run.params_before = param_count(run.model.graph)
        return PassResult()


class AnalyseModel(Pass):
    """Coupled groups and frozen units; refuse a model with nothing to prune (and frozen groups under --strict)."""
    name, requires, provides = "analyse", ("model",), ("analysis",)

    def run(self, run: PruneRun) -> PassResult:
        run.step("analyse")
        analysis = run.analysis = Analyse().run(run.model)
        if run.options.strict:
            check_strict(analysis)
        if not any(g.prunable >= 1 and g.size >= 2 for g in analysis.groups):
            raise SpaError("no prunable group: " + explain_nothing(analysis))
        run.model.warnings.extend(fixed_transform_warnings(analysis, run.options.exclude))
        return PassResult(report={
            "frozen": [{"group": g.name, "units": g.size, "reasons": [{"where": w, "why": r} for w, r in g.reasons]}
                       for g in analysis.groups if g.frozen.any()],
            "unruled_ops": analysis.unruled_ops})


class ScoreAndSelect(Pass):
    """Load the calibration data, score the units and choose which go (or read them from --plan)."""
    name, requires, provides = "score+select", ("analysis",), ("plan", "data")

    def run(self, run: PruneRun) -> PassResult:
        opts, analysis = run.options, run.analysis
        if run.inherited is not None:
            return self.inherit(run)
        if uses_data(opts.importance) or opts.reconstruct or opts.recalibrate:
            check_no_control_flow(run.model.graph)
            check_sample_axis(run.model.graph)
            check_lowerable(run.model.graph)
            check_finite_weights(analysis)
        if opts.target_flops is not None and not opts.plan_file:
            check_countable(analysis, run.model.warnings)
        run.data, held = split_holdout(load_data(opts.calib, run.model.graph.model, opts.calib_limit,
                                                     pinned=opts.input_shapes))
        if run.data is not None and not uses_data(opts.importance) and not (opts.reconstruct or opts.recalibrate):
            run.model.warnings.append(
                f"--calib is not used for pruning: --importance {opts.importance} ranks by weights only and nothing "
                f"reconstructs (it only measures fidelity); without --fast the default puts the data to work")
        synthesizes = run.data is None and (uses_data(opts.importance) or opts.reconstruct)
        samples, capped = synthesized_count(analysis.ctx.g, opts.samples) if synthesizes else (opts.samples, None)
        inputs = run.score_inputs = ScoreInputs(analysis, calib=run.data, loss=opts.loss, samples=samples,
                                                seed=opts.seed, progress=run.step)
        if capped:
            inputs.notes.append(capped)
        inputs.cache["obspa_options"] = {k: v for k, v in (("positions", opts.positions), ("damp", opts.damp))
                                         if v is not None}
        if opts.exact_hessians:
            inputs.cache["obspa_options"]["kronecker_columns"] = None
        if opts.reconstruct:  # the refit reads the original's layer outputs the scoring pass keeps
            inputs.cache["obspa_options"]["keep_targets"] = True
            if opts.patterns is not None:   # ... of the grouped convs too, which only the pattern path refits
                inputs.cache["obspa_options"]["grouped_targets"] = True
        if opts.synth_steps is not None:
            inputs.cache.setdefault("synthesis_options", {})["steps"] = opts.synth_steps
        if opts.input_range is not None:
            inputs.cache.setdefault("synthesis_options", {})["ranges"] = dict(opts.input_range)
        if held is not None:
            run.holdout_label = f"{held.n} held-out calibration samples"
            run.holdout = batches_for(run.model.graph, held.inputs)
        elif synthesizes:
            run.holdout = synthesize_holdout(run, inputs)
        if run.holdout:
            run.settle_holdout()
        run.step("score")
        if opts.plan_file:
            run.plan = read_plan(opts.plan_file, analysis)
        else:
            scores = score(analysis, opts.importance, opts.aggregation, opts.normalization, inputs)
            run.step("select")

            def plan(allocation: str) -> PruningPlan:
                return select(analysis, scores, ratio=opts.ratio, target_flops=opts.target_flops,
                              min_channels=opts.min_channels, round_to=opts.round_to, exclude=list(opts.exclude),
                              max_ratio=opts.max_ratio, allocation=allocation)
            run.plan = plan(opts.allocation)
            if opts.allocation == MEASURED_ALLOCATION and opts.target_flops is not None and run.holdout:
                banded = plan("banded")   # compared on held-out samples only: random inputs say nothing of it
                run.alternative = None if banded.same_cut(run.plan) else banded
        return self.planned(run)

    def inherit(self, run: PruneRun) -> PassResult:
        """The second candidate of --allocation auto: the first run's data, held-out samples (and the original's
        outputs on them) and synthesized inputs, its alternative plan; no scoring (the refit computes the
        original's layer outputs it needs itself)."""
        first, opts = run.inherited, run.options
        run.data, run.holdout, run.holdout_label = first.data, first.holdout, first.holdout_label
        run.holdout_reference = first.holdout_reference
        inputs = run.score_inputs = ScoreInputs(run.analysis, calib=run.data, loss=opts.loss,
                                                samples=first.score_inputs.samples, seed=opts.seed,
                                                progress=run.step)
        inputs.notes.extend(first.score_inputs.notes)
        if "synthesized" in first.score_inputs.cache:
            inputs.cache["synthesized"] = first.score_inputs.cache["synthesized"]
        run.plan = PruningPlan.from_json(first.alternative.to_json(first.analysis, tensors=False), run.analysis)
        return self.planned(run)

    def planned(self, run: PruneRun) -> PassResult:
        """What the chosen plan removes, and its part of the report."""
        opts, analysis = run.options, run.analysis
        run.removed = run.plan.roots(analysis)
        run.plan_json = run.plan.to_json(analysis) if opts.save_plan else None  # before Apply rewrites weights
        macs_before, macs_after = analysis.total_macs, analysis.macs_after(run.removed)
        if opts.target_flops is not None and not opts.plan_file and \
                macs_after > opts.target_flops * macs_before * (1 + 1e-9):
            # select() then prunes as far as the constraints allow; say so instead of staying quiet
            run.model.warnings.append(
                f"the budget cannot be met: --target-flops {opts.target_flops:g}, but the smallest model that "
                f"--min-channels/--round-to/--max-ratio/--exclude and the frozen groups allow keeps "
                f"{macs_after / max(macs_before, 1):.4f} of the MACs; pruned as far as they allow" + (
                    "; the MACs of some nodes are not counted (see above): --ratio R prunes a share of every group "
                    "instead" if uncounted_nodes(analysis) else ""))
        plan = run.plan
        spared = []
        if plan.removed and opts.target_flops is not None and opts.allocation in ("uniform", MEASURED_ALLOCATION) \
                and not opts.plan_file and run.inherited is None:
            coarse = coarse_groups(analysis)
            spared = [g.name for g in analysis.groups if g.id in coarse and g.prunable > 0 and not plan.removed.get(g.id)]
        return PassResult(report={
            "macs": {"before": macs_before, "after": macs_after, "ratio": macs_after / max(macs_before, 1)},
            "groups": {"total": len(analysis.groups), "pruned": len([g for g in plan.removed.values() if g]),
                       "frozen": len([g for g in analysis.groups if g.prunable == 0]),
                       "partially_frozen": len([g for g in analysis.groups if g.frozen.any() and g.prunable > 0]),
                       "coarse_spared": spared},
            "per_group": [{"id": g.id, "name": g.name, "units": g.size,
                           "kept": g.size - len(plan.removed.get(g.id, [])), "frozen_units": int(g.frozen.sum()),
                           "given_back": plan.given_back.get(g.id, 0)} for g in analysis.groups]})


def uncounted_nodes(analysis) -> list[str]:
    """The MAC-carrying nodes whose MACs are unknown (their shapes are not inferred): they count 0."""
    return [name for name, cost in analysis.ctx.costs.items() if cost.macs <= 0]


def check_countable(analysis, warnings: list) -> None:
    """--target-flops needs the MACs: a node whose shapes are unknown (inside an If/Loop body that shape inference
    does not reach, or data-dependent) counts 0. None counted at all: refuse (a budget of nothing would prune
    nothing and say 0.000); some: warn that the budget covers the rest."""
    uncounted = uncounted_nodes(analysis)
    if not uncounted:
        return
    example = ", ".join(f"'{n}'" for n in uncounted[:2])
    hint = optimized_model_hint(analysis.ctx.g.model)
    if analysis.total_macs <= 0:
        raise SpaError(f"--target-flops: no MACs can be counted in this model: the shapes of all {len(uncounted)} "
                       f"MAC-carrying nodes are unknown ({example}, ...: inside If/Loop bodies or data-dependent); "
                       f"prune a share of every group with --ratio R instead{hint}")
    warnings.append(f"the MACs of {len(uncounted)} of {len(analysis.ctx.costs)} MAC-carrying nodes are unknown "
                    f"(their shapes are not inferred: {example}, ...): --target-flops counts only the others{hint}")


class ApplyPlan(Pass):
    """Cut the removed units' slices and rewrite the shape constants."""
    name, requires, provides, rewrites = "apply", ("plan",), ("pruned",), True

    def run(self, run: PruneRun) -> PassResult:
        if run.options.reconstruct or run.options.recalibrate:
            run.out_rows = output_rows(run.analysis, run.removed)  # before Apply cuts the weights
            targets = run.score_inputs.cache.get("obspa_targets", {}) if run.score_inputs else {}
            for name, target in targets.items():   # the refit's targets: only the kept output channels
                if name in run.out_rows:
                    target.keep_channels(run.out_rows[name])
        run.step("apply")
        stats = Apply(run.analysis, run.removed).run(run.model)
        run.pruned = run.model.graph.to_model()
        return PassResult(modified=True, report={"apply": stats})


class VerifyStructure(Pass):
    """onnx.checker, then onnxruntime against the original with the removed channels disconnected."""
    name, requires = "verify", ("pruned", "original")

    def run(self, run: PruneRun) -> PassResult:
        run.step("verify")
        verify.check(run.pruned)
        reference = verify.build_reference(run.original, run.analysis, run.removed, run.analysis.node_index)
        pruned = run.pruned
        if run.model.dynamic_as_qdq:   # compared in the integer form they will be written in: its sums are exact,
            reference, pruned = (integer_form(m, run.model.dynamic_as_qdq)[0] for m in (reference, pruned))
            # the float QDQ path's rounding can flip a later dynamic quantization by one step
        result = None
        skeletons = [verify.float_skeleton(m) for m in (reference, pruned)]
        if all(m is not None for m in skeletons):   # quantized activations: compared without their rounding
            try:
                result = verify.compare(*skeletons, run.model.input_shapes, rtol=run.options.rtol,
                                        pinned=run.options.input_shapes)
                result["compared_on"] = "float skeleton (activations clipped to their quantized range, not rounded)"
            except SpaError:   # an op that needs the integers (an integer kernel kept): the models as they are
                result = None
        if result is None:
            result = verify.compare(reference, pruned, run.model.input_shapes, rtol=run.options.rtol,
                                    pinned=run.options.input_shapes)
        run.model.warnings.extend(result.pop("warnings", []))
        return PassResult(report={"verification": {"status": "passed", **result}})


class FoldConstants(Pass):
    """Fold the constant each removed channel carries into its consumers' biases; report fidelity."""
    name, requires, rewrites = "compensate", ("pruned", "original"), True

    def run(self, run: PruneRun) -> PassResult:
        run.step("compensate")
        shapes = run.model.input_shapes
        before = fidelity(run.original, run.pruned, shapes)
        stats = FoldRemovedConstants(run.analysis, run.removed, run.original, shapes).run(run.model)
        run.pruned = run.model.graph.to_model()
        verify.check(run.pruned)
        return PassResult(modified=True, report={"compensation": {
            "pass": "fold-constants", **stats, "fidelity_before": before,
            "fidelity_after": fidelity(run.original, run.pruned, shapes)}})


class PatternPrune(Pass):
    """--patterns K: zero every conv kernel (of the kept channels) outside its best-fitting library shape
    (spa.patterns), exact zeros; the structure is unchanged, so the model must equal the masked one exactly."""
    name, requires, provides, rewrites = "patterns", ("pruned",), ("patterns",), True

    def run(self, run: PruneRun) -> PassResult:
        run.step("patterns")
        opts, g = run.options, run.model.graph
        run.patterns = apply_patterns(g, opts.patterns, connectivity=opts.connectivity,
                                      per_layer=opts.pattern_assignment)
        check_patterns(g, run.patterns)
        run.pruned = g.to_model()
        if opts.verify:
            verify.check(run.pruned)
        section = report_section(g, run.patterns, opts.patterns, opts.connectivity,
                                 run.analysis.macs_after(run.removed), run.analysis.total_macs)
        if opts.pattern_assignment:
            section["assignment"] = {name: {"k": lp.lib.k, "connectivity": lp.connectivity}
                                     for name, lp in run.patterns.items()}
        return PassResult(modified=True, report={"patterns": section})


class CompactStorage(Pass):
    """--sparse-storage: the patterned weights as kept values + pattern ids, rebuilt at load; checked (onnx.checker,
    and onnxruntime gives the dense model's outputs) before it replaces the model that is written."""
    name, requires = "sparse-storage", ("pruned", "patterns")

    def run(self, run: PruneRun) -> PassResult:
        run.step("sparse storage")
        compact, stats = sparse_storage(run.pruned, run.patterns)
        verify.check(compact)
        feeds = run.holdout or [verify.random_inputs(run.pruned, run.model.input_shapes, 0)]
        dense_out = verify.run_many(run.pruned, feeds)
        compact_out = verify.run_many(compact, feeds)
        diff = max(float(np.max(np.abs(a - b))) if a.size else 0.0
                   for da, ca in zip(dense_out, compact_out) for a, b in zip(da, ca))
        if diff != 0.0:
            raise SpaError(f"internal: the compactly stored model differs from the dense one (max {diff:g})")
        dense_bytes, compact_bytes = run.pruned.ByteSize(), compact.ByteSize()
        run.pruned = compact
        return PassResult(report={"storage": {"sparse": True, **stats, "file_bytes_dense": dense_bytes,
                                              "file_bytes": compact_bytes,
                                              "file_ratio": compact_bytes / max(dense_bytes, 1),
                                              "outputs_equal_dense": True}})


class Reconstruction(Pass):
    """Similarity compensation, least-squares refit and/or re-calibration on the verified structure; each
    changes values only. Fidelity to the original is measured before and after, on the calibration data (or
    random inputs when data-free)."""
    name, requires, rewrites = "reconstruct", ("pruned", "original", "data"), True

    def run(self, run: PruneRun) -> PassResult:
        if not run.removed and not run.patterns:  # nothing was cut: the original's values are the best ones
            return PassResult(report={"reconstruction": None})
        from .reconstruction import reconstruct_values  # deferred: only runs with value passes load them

        report = reconstruct_values(run, data_label(run.data, "obspa"))   # sets run.pruned
        return PassResult(modified=True, report={"reconstruction": report})


def integer_form(model: onnx.ModelProto, names: set[str]) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with the dynamic layers normalization wrote as QDQ (`names`) back as integer kernels, and
    how many."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = Graph(copy)
    restored = dynamic_kernels_back(g, names)
    return (g.to_model(), restored) if restored else (model, 0)


class DynamicKernelsBack(Pass):
    """The dynamically quantized layers that normalization wrote in QDQ form (for the scores and the refit) back
    in their integer form (passes/qdq.py: onnxruntime does not fuse dynamic QDQ into its integer kernels),
    checked against the refit QDQ model in onnxruntime before it replaces the model that is written."""
    name, requires, rewrites = "dynamic-kernels", ("pruned",), True

    def run(self, run: PruneRun) -> PassResult:
        names = run.model.dynamic_as_qdq
        if not names:
            return PassResult(skipped=True)
        run.step("dynamic kernels")
        back, restored = integer_form(run.pruned, names)
        if not restored:
            return PassResult(skipped=True)
        verify.check(back)
        try:
            verify.compare(run.pruned, back, run.model.input_shapes, rtol=QDQ_RTOL,
                           pinned=tuple(run.options.input_shapes or ()))
        except VerificationError as e:
            raise SpaError(f"internal: the dynamic integer layers written back differ from their QDQ form "
                           f"({one_line(e, 200)})")
        run.pruned = back
        return PassResult(modified=True, report={"dynamic_kernels_restored": restored})


class FidelityNotMet(Exception):
    """The --max-drop guard failed for this cut (the driver then tries a smaller one)."""

    def __init__(self, section: dict):
        super().__init__(f"fidelity drop {section['drop_pct']:.2f} % > --max-drop {section['max_drop_pct']:g} %")
        self.section = section


class MeasureFidelity(Pass):
    """The pruned model's fidelity to the original on inputs no pass fitted to (held-out calibration samples,
    or fresh synthesized / random inputs when data-free): top-1 agreement for outputs that look like class logits,
    relative L2 error for the others. --max-drop turns it into a guard."""
    name, requires = "fidelity", ("pruned", "original")

    def run(self, run: PruneRun) -> PassResult:
        run.step("fidelity")
        if run.holdout and run.holdout_fidelity is not None and run.holdout_fidelity[0] is run.pruned:
            label, outputs = run.holdout_label, run.holdout_fidelity[1]   # measured by the reconstruction
        else:
            if run.holdout:
                feeds, label, reference = run.holdout, run.holdout_label, run.reference_on_holdout()
            else:
                feeds = [verify.random_inputs(run.original, run.model.input_shapes, seed) for seed in (2, 3)]
                label, reference = random_inputs_label(run.data), None
            outputs = fidelity(run.original, run.pruned, run.model.input_shapes, feeds=feeds, reference=reference)
        drop, metric = fidelity_drop(outputs)
        section = {"on": label, "metric": metric, "drop_pct": drop, "outputs": outputs}
        if run.options.max_drop is not None:
            section["max_drop_pct"] = run.options.max_drop
            if drop > run.options.max_drop:
                raise FidelityNotMet(section)
        return PassResult(report={"fidelity": section})


def check_no_control_flow(g) -> None:
    """Scoring on data and the value passes run the model in torch, which does not run If/Loop/Scan bodies yet:
    say so before any work (the rules do reach into the bodies: --fast prunes them)."""
    flow = next((n for n in g.model.graph.node if has_subgraph(n)), None)
    if flow is not None:
        raise DataPassesUnavailable(f"{flow.op_type} node '{flow.name}' has a subgraph, which the data passes (OBS "
                                    f"scoring, reconstruction) cannot run in torch yet")


def check_lowerable(g) -> None:
    """The data passes run every node in torch: an operator without a torch lowering (onnxruntime's fused
    contrib ops in a model its offline optimizer saved) stops them; say so before any work (the rules freeze
    what such an operator touches, and --fast prunes the rest)."""
    from .torch_graph import why_not_lowerable  # torch: this module must import without it

    why = why_not_lowerable(g.model.graph.node)
    if why:
        raise DataPassesUnavailable(f"{why}, which the data passes (OBS scoring, reconstruction) need")


def check_sample_axis(g) -> None:
    """The data passes stack samples on dim 0 of every input. Inputs whose declared dim 0 cannot be one shared
    batch (two different fixed sizes, or a fixed size above 1 beside a dynamic batch: a recurrent state laid out
    [layers, batch, hidden]) would be cut along the wrong axis: say so before any work."""
    firsts = {name: shape[0] for name, (shape, _) in input_specs(g.model).items() if shape}
    fixed = {d for d in firsts.values() if d is not None}
    if len(fixed) > 1 or (fixed and max(fixed) > 1 and None in firsts.values()):
        dims = ", ".join(f"{name}: {d if d is not None else 'dynamic'}" for name, d in firsts.items())
        raise DataPassesUnavailable(f"the inputs do not share a batch on dim 0 ({dims}), which the data passes (OBS "
                                    f"scoring, reconstruction) stack samples on (a recurrent state laid out "
                                    f"[layers, batch, hidden] does not)")


def check_finite_weights(analysis: Analysis) -> None:
    """The data passes (OBS Hessians, least-squares refits) need finite weights: a NaN/inf weight is one line of
    bad input, not a failed solve deep inside."""
    g = analysis.ctx.g
    seen = set()
    for ps in analysis.ctx.params:   # the parameters the groups cut: weights, biases, norm parameters
        name = ps.node.input[ps.input_index]
        if name in seen:
            continue
        seen.add(name)
        w = g.const(name)
        if w is not None and np.asarray(w).dtype.kind == "f" and not np.isfinite(w).all():
            raise SpaError(f"the parameter '{name}' of node '{ps.node.name}' has NaN/inf values: scoring on data "
                           f"and reconstruction need finite values (fix the model, or add --fast: magnitude "
                           f"ranking only)")


def fidelity_drop(outputs: dict) -> tuple[float, str]:
    """One number for the guard and the summary, in percent: the top-1 predictions that changed on the first
    output that looks like class logits, else the mean relative L2 error of the outputs."""
    for values in outputs.values():
        if "top1" in values:
            return round(100.0 * (1.0 - values["top1"]), 4), "top-1 predictions changed"
    errors = [v["rel_l2"] for v in outputs.values()]
    return round(100.0 * (sum(errors) / max(len(errors), 1)), 4), "relative L2 error of the outputs"


def random_inputs_label(data: Calib | None) -> str:
    """Where the fidelity falls back to random inputs: data-free, or too few calibration samples to hold any out."""
    if data is None:
        return "random inputs (data-free)"
    return (f"random inputs ({data.n} calibration samples are too few to hold some out; "
            f"{4 * HOLDOUT_MIN} or more are)")


def split_holdout(data: Calib | None) -> tuple[Calib | None, Calib | None]:
    """(samples to fit, samples held out for the fidelity measurement): 1/HOLDOUT_SHARE of them, at least
    HOLDOUT_MIN, from the end; nothing is held out of fewer than 4 x HOLDOUT_MIN samples."""
    if data is None or data.n < 4 * HOLDOUT_MIN:
        return data, None
    held = max(data.n // HOLDOUT_SHARE, HOLDOUT_MIN)
    keep = data.n - held

    def part(sl):
        return Calib({k: v[sl] for k, v in data.inputs.items()}, None if data.labels is None else data.labels[sl],
                     data.source, data.classes, data.skipped)

    return part(slice(0, keep)), part(slice(keep, None))


def batches_for(graph, inputs: dict) -> list[dict] | None:
    """Feed batches for onnxruntime: whole batches of the exported size when the batch dim is fixed (None when
    there are fewer samples than one batch), else one batch of all samples."""
    n = int(next(iter(inputs.values())).shape[0])
    size, fixed = batch_size_for(graph, 64)
    if not fixed:
        return [{k: v[s:s + size] for k, v in inputs.items()} for s in range(0, n, size)]
    out = [{k: v[s:s + size] for k, v in inputs.items()} for s in range(0, n - size + 1, size)]
    return out or None


def synthesize_holdout(run: PruneRun, inputs: ScoreInputs) -> list[dict] | None:
    """Data-free: synthesize HOLDOUT_SYNTHESIZED more samples together with the fitted ones, keep the fitted
    ones where the data passes read them (spa.synthesis.model_data's cache) and the rest for the fidelity."""
    wanted = inputs.samples
    inputs.samples = wanted + HOLDOUT_SYNTHESIZED
    try:
        feeds, _ = model_data(inputs)
    finally:
        inputs.samples = wanted
    inputs.cache["synthesized"] = {k: v[:wanted] for k, v in feeds.items()}
    run.holdout_label = f"{HOLDOUT_SYNTHESIZED} held-out synthesized samples (data-free)"
    return batches_for(run.model.graph, {k: v[wanted:] for k, v in feeds.items()})


class WriteOutputs(Pass):
    """The plan (--save-plan) and the model, staged beside their targets after every check passed; they are
    renamed into place together with the caller's other outputs when the run commits (driver.prune)."""
    name, requires = "save", ("pruned",)

    def run(self, run: PruneRun) -> PassResult:
        if run.options.save_plan:
            run.outputs.stage(run.options.save_plan, lambda f: f.write(json.dumps(run.plan_json, indent=1)),
                              binary=False)
        if run.output is not None:
            run.step("save")
            if needs_external_data(run.pruned) or has_mapped(run.pruned):  # weights in OUT.data, on its own
                try:
                    save_model(run.pruned, run.output)
                except OSError as e:
                    raise SpaError(f"cannot write {run.output}: {e.strerror or e}")
            else:
                run.outputs.stage(run.output, lambda f: f.write(run.pruned.SerializeToString()))
        return PassResult()


def check_strict(analysis: Analysis) -> None:
    """--strict: a frozen group is an error (a graph output's channels are fixed by the interface, not by a
    missing rule, so those are allowed)."""
    for g in analysis.groups:
        real = [(w, r) for w, r in g.reasons if not w.startswith("graph output")]
        if real:
            raise SpaError(f"--strict: group '{g.name}' is frozen at {real[0][0]}: {real[0][1]}")


def explain_nothing(analysis: Analysis) -> str:
    if not analysis.ctx.sources:
        return weights_out_of_reach(analysis.ctx.g.model) or ("no Conv/ConvTranspose/Gemm/MatMul with a constant weight was found (quantized or "
                "run-time weights are not prunable yet)")
    reasons = {}
    for g in analysis.groups:
        for where, why in g.reasons:
            reasons.setdefault(why, where)
    top = "; ".join(f"{why} (at {where})" for why, where in list(reasons.items())[:3])
    return f"every group is frozen or has a single unit: {top or 'all groups have one unit'}" + \
        optimized_model_hint(analysis.ctx.g.model)


def optimized_model_hint(model: onnx.ModelProto) -> str:
    """What to do with a model onnxruntime's offline optimizer saved: its fused contrib ops (FusedConv,
    SkipLayerNormalization, ...: com.microsoft, no ONNX shape inference, no rule here) freeze everything
    around them, so the plain export is the one to prune."""
    fused = sorted({n.op_type for n in model.graph.node if n.domain.startswith("com.microsoft")
                    and (canonical_domain(n.domain), n.op_type) not in RULES})
    if not fused:
        return ""
    return (f"; it holds onnxruntime contrib ops ({', '.join(fused[:4])}{', ...' if len(fused) > 4 else ''}) that "
            f"its offline optimizer writes: prune the model as exported, then optimize it (or save it at "
            f"ORT_ENABLE_BASIC, which keeps standard ops)")


def selection_error(outputs: dict) -> tuple[float, str]:
    """How far a candidate's outputs are from the original's, for choosing between plans (--allocation auto):
    the mean KL divergence of the class probabilities on outputs that look like class logits (continuous,
    where the top-1 agreement on a few held-out samples ties), else the mean relative L2 error."""
    kl = [v["kl"] for v in outputs.values() if "kl" in v]
    if kl:
        return float(np.mean(kl)), "KL divergence of the class probabilities"
    return float(np.mean([v["rel_l2"] for v in outputs.values()])), "relative L2 error of the outputs"
