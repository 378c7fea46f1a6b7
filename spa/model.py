"""The model being pruned: the IR plus what the passes learned about it."""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .ir import Graph


def default_dim(rank: int, index: int) -> int:
    """The size used for a dynamic input dim when --input-shape does not fix it (documented in README):
    batch (dim 0) = 1; spatial dims of a rank-4/5 input = 224; any other dim = 128 (sequence length)."""
    if index == 0:
        return 1
    if rank >= 4 and index >= 2:
        return 224
    return 128


@dataclass
class Model:
    graph: Graph
    source: str = ""
    input_shapes: dict[str, tuple] = field(default_factory=dict)  # static shapes used for analysis
    warnings: list[str] = field(default_factory=list)
    analyses: dict = field(default_factory=dict)
    normalize_report: dict = field(default_factory=dict)
    dynamic_as_qdq: set[str] = field(default_factory=set)   # dynamic integer layers normalization wrote as QDQ

    @property
    def proto(self) -> onnx.ModelProto:
        return self.graph.model

    @property
    def opset(self) -> int:
        for o in self.proto.opset_import:
            if o.domain in ("", "ai.onnx"):
                return o.version
        return 0
