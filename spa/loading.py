"""Reading a model into the IR: an ONNX file, a ModelProto, or a model from the built-in zoo, normalized."""
from __future__ import annotations

import numpy as np
import onnx

from . import quant
from .errors import SpaError
from .ir import MAPPED, Graph, read_model
from .memory import DEFAULT_MEMORY_LIMIT_GB
from .model import Model
from .passes import PassManager
from .passes.normalize import Normalize
from .validate import analysis_elements, check_input


def load(source, input_shapes: dict | None = None, memory_limit_gb: float = DEFAULT_MEMORY_LIMIT_GB,
         qdq: bool = False) -> Model:
    """Load an ONNX file (or a ModelProto, or 'zoo:NAME[:small][:dynamo]') and normalize it; analysed tensors
    larger than the memory limit allows are refused before anything of their size is allocated. qdq: write
    integer kernels in QDQ form (passes/qdq.py), for the data passes."""
    name = str(source) if not isinstance(source, onnx.ModelProto) else "<model>"
    raw = None
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        check_input(proto, mapped=frozenset(MAPPED.known))  # as read_model checks a file; no folder: no external
        # data, except the files this process maps weights from (a model it made: a progressive step's)
    else:
        proto, raw = read_model(resolve_input(str(source)))
    model = Model(Graph(proto, raw=raw), source=name)
    PassManager([Normalize(input_shapes, analysis_elements(memory_limit_gb), qdq)]).run(model)
    return model


def resolve_input(source: str) -> str:
    """A path as given, or the cached export of a zoo model (built on first use; needs torch)."""
    if not source.startswith("zoo:"):
        return source
    parts = source[4:].split(":")
    try:
        from . import models  # the zoo needs torch, an optional dependency
    except ImportError as e:
        raise SpaError(f"'{source}' needs the model zoo extra (torch): {e}")
    if parts[0] not in models.ZOO_NAMES:
        raise SpaError(f"unknown zoo model '{parts[0]}' (available: {', '.join(models.ZOO_NAMES)})")
    return str(models.zoo_path(parts[0], dynamo="dynamo" in parts[1:], small="small" in parts[1:]))


def param_count(g: Graph) -> int:
    """Parameters: elements of the initializers `is_parameter` counts."""
    return sum(int(np.prod(g.const_info(name)[0])) for name in g.initializer_names() if is_parameter(g, name))


def is_parameter(g: Graph, name: str) -> bool:
    """A float initializer, or the integers of a quantized weight or bias (a quantized model's weights are its
    integers: counting only its float scales reported ResNet-50 in QDQ form as 55 K parameters)."""
    kind = np.dtype(g.const_info(name)[1]).kind
    if kind == "f":
        return True
    return kind in "iu" and any(quant.reader(g, node, i) is not None and node.input[i] == name
                                for node, i in g.consumers.get(name, []) if i >= 0)
