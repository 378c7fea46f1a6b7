"""The search problem: one normalized model, its analysis, unit scores, the budget projector and the group graph.

Built once per search (`SearchProblem.build`); everything the environment, the evaluators and the policies need
hangs off it. The original model is never modified: a candidate is applied to a fresh copy (`apply`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from spa.passes import PassManager
from spa.passes.analyse import Analyse
from spa.passes.apply import Apply
from spa.passes.reconstruct import output_rows

from .. import driver
from ..budget import BudgetProjector, CostModel
from ..calib import load_data
from ..errors import SpaError
from ..groups import Analysis
from ..importance import ScoreInputs, score
from ..ir import Graph
from ..latency import LatencyModel, table_for
from ..model import Model
from ..select import PruningPlan
from .graph import GroupGraph


@dataclass
class SearchProblem:
    model: Model                 # normalized original; never modified
    analysis: Analysis
    scores: dict                 # unit (root atom) -> importance, higher keeps
    projector: BudgetProjector
    graph: GroupGraph
    calib: object | None = None  # spa.calib.Calib or None (data-free)
    options: dict = field(default_factory=dict)   # how it was built (criterion, budgets, constraints)
    latency: object | None = None  # latency.LatencyModel when built with a latency budget or table

    @property
    def budgets(self) -> dict[str, float]:
        return self.projector.budgets

    @property
    def sizes(self) -> np.ndarray:
        return self.projector.sizes

    @classmethod
    def build(cls, source, *, target_flops: float | None = None, target_params: float | None = None,
              importance: str = "l2", aggregation: str = "sum", normalization: str = "mean", calib=None,
              calib_samples: int | None = None, input_shapes: dict | None = None, min_channels: int = 1,
              round_to: int = 1, max_ratio: float = 1.0, exclude: list[str] | None = None, mode: str = "logit",
              loss: str = "auto", samples: int = 64, seed: int = 0, scores: dict | None = None,
              target_latency: float | None = None, latency_table=None, latency_batch: int = 1,
              threads: int | None = 1) -> SearchProblem:
        """Load and analyse `source` (path, ModelProto or zoo:NAME), score units with `importance` (on `calib`
        where the criterion needs data) and set up the budget(s): `target_flops` / `target_params` are
        fractions kept, `target_latency` milliseconds at the latency table's batch and thread count (the table:
        `latency_table`, a path or LatencyTable made by `spa-prune profile`, checked against the model; without
        one, this model is profiled on this machine at `latency_batch` / `threads` and cached). A table given
        without a latency budget still fills the graph's latency_share feature. `scores` overrides the criterion
        (unit root -> score)."""
        budgets = {k: v for k, v in (("flops", target_flops), ("params", target_params)) if v is not None}
        if not budgets and target_latency is None:
            raise SpaError("a search needs a budget: give target_flops, target_params and/or target_latency")
        model = driver.load(source, input_shapes)
        analysis = driver.analyse(model)
        if not any(g.prunable >= 1 and g.size >= 2 for g in analysis.groups):
            raise SpaError("no prunable group: " + driver.explain_nothing(analysis))
        data = load_data(calib, model.graph.model, calib_samples, pinned=input_shapes)
        if scores is None:
            inputs = ScoreInputs(analysis, calib=data, loss=loss, samples=samples, seed=seed)
            scores = score(analysis, importance, aggregation, normalization, inputs)
        cost_model = CostModel(analysis)
        latency = None
        if target_latency is not None or latency_table is not None:
            table = table_for(model, analysis, latency_table, batch=latency_batch, threads=threads)
            latency = LatencyModel(table, cost_model, analysis)
            cost_model.attach_latency(latency)
            if target_latency is not None:
                budgets["latency"] = latency.fraction_of(target_latency)
        projector = BudgetProjector(analysis, scores, budgets, min_channels=min_channels, round_to=round_to,
                                    max_ratio=max_ratio, exclude=exclude, mode=mode, cost_model=cost_model)
        graph = GroupGraph.build(analysis, scores, params_total=projector.cost_model.params_total)
        if latency is not None:
            graph.set_latency(latency.group_share())
        options = {"source": str(source) if not isinstance(source, onnx.ModelProto) else "<model>",
                   "importance": importance, "aggregation": aggregation, "normalization": normalization,
                   "budgets": budgets, "min_channels": min_channels, "round_to": round_to, "max_ratio": max_ratio,
                   "exclude": list(exclude or []), "input_shapes": {k: list(v) for k, v in model.input_shapes.items()},
                   "seed": seed}
        if latency is not None:
            options["latency"] = {"target_ms": target_latency, "table": None if latency_table is None or not
                                  isinstance(latency_table, (str, os.PathLike)) else str(latency_table),
                                  "batch": latency.table.batch, "threads": latency.table.threads,
                                  **latency.summary()}
        problem = cls(model, analysis, scores, projector, graph, data, options, latency)
        problem._proto = onnx.ModelProto()
        problem._proto.CopyFrom(model.graph.to_model())
        return problem

    # ---- candidates ----------------------------------------------------------------------------------------------
    def plan(self, kept: np.ndarray) -> PruningPlan:
        return self.projector.plan(kept)

    def original_proto(self) -> onnx.ModelProto:
        """The normalized original (a shared object: copy it before changing it)."""
        if not hasattr(self, "_proto"):
            self._proto = onnx.ModelProto()
            self._proto.CopyFrom(self.model.graph.to_model())
        return self._proto

    def clone(self) -> Model:
        """A fresh copy of the normalized model (shapes carried over: no second normalization)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.original_proto())
        g = Graph(proto)
        g.shapes, g.dtypes = dict(self.model.graph.shapes), dict(self.model.graph.dtypes)
        return Model(g, source=self.model.source, input_shapes=dict(self.model.input_shapes))

    def apply(self, kept: np.ndarray, rows: bool = False) -> tuple[Model, Analysis, set[int], dict | None]:
        """The pruned model of a candidate (structurally pruned, not verified: candidates skip verification; the
        chosen plan goes through the driver's apply/verify path). Returns (model, its analysis, removed roots,
        and with `rows` the kept output rows of every weight layer, which reconstruction needs)."""
        model = self.clone()
        analysis = Analyse().run(model)
        if [(g.name, g.size) for g in analysis.groups] != [(g.name, g.size) for g in self.analysis.groups]:
            raise SpaError("internal: the copy of the model analyses differently from the original")
        removed = self.plan(kept).roots(analysis)
        out_rows = output_rows(analysis, removed) if rows else None  # before Apply cuts the weights
        PassManager([Apply(analysis, removed)]).run(model)  # the manager drops the now stale analyses
        return model, analysis, removed, out_rows
