"""ai.onnx.ml: the few operators converters of classic ML models put around a network (skl2onnx maps a
classifier's argmax to its class labels with ArrayFeatureExtractor). No propagation rule: channels never reach them."""
from __future__ import annotations

import torch

from .core import lower


def array_feature_extractor(node, inputs, attrs):
    """ai.onnx.ml ArrayFeatureExtractor: X[..., Y] over the last axis with Y flattened; a 1-D X gives shape
    (1, len(Y)), as onnxruntime does."""
    x, idx = inputs[0], inputs[1]
    picked = x.index_select(-1, idx.reshape(-1).to(torch.int64))
    return [picked.unsqueeze(0) if x.dim() == 1 else picked]


lower("ArrayFeatureExtractor", domain="ai.onnx.ml")(array_feature_extractor)
