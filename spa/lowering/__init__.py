"""Torch lowerings of the ONNX operators: an eager interpreter's kernels (see spa/torch_graph.py).

Why: gradient-based pruning criteria, layer-by-layer activation capture and fine-tuning need the ONNX graph as
a differentiable torch program, built from the file alone (onnx2torch is not an option: it needs torchvision).

Registry (keyed like the propagation rules of spa.operators, by domain and op type; "" and "ai.onnx" are the
same domain, keyed as ""):

    LOWERINGS[(domain, op_type)] = fn(node, inputs, attrs) -> list[torch.Tensor]

`@lower(op_type, ..., domain="")` registers a function, `lowering(op_type, domain)` looks one up (what
TorchGraph does for every node). A user's own operator is registered through `spa.operators.register(...,
lowering=fn)` (docs/operators.md), which imports this package only when a lowering is given.

`node` is the onnx.NodeProto, `inputs` the input tensors in order (None for a missing optional input), `attrs`
the decoded attributes (`node_attrs`: strings as str, tensors as torch tensors). `attrs` may also carry
`"_opset"`, the model's default-domain opset, which a few operators need (Softmax before 13 flattens to 2-D,
Resize-10/Upsample use the legacy coordinate rules, Clip/Pad/Slice/Split/Squeeze read attributes in old opsets);
without it the newest semantics apply. Every value computation is a torch op, so autograd flows through
whatever is differentiable; constant integer inputs (shapes, pads, starts, axes, scales of Resize) are read
with `.tolist()`.

One module per operator family, mirroring the propagation-rule modules of spa/operators (attention, conv, linear,
norm, elementwise, pool, shape, concat, recurrent, quantized) plus ml (ai.onnx.ml); _util holds the helpers they share. This module holds the
registry and the public helpers (dtypes, attribute decoding, `unsupported`) and imports the family modules, which
register their lowerings.

Semantics follow the ONNX spec as implemented by onnxruntime (the project verifies against it). Where the spec leaves
room the onnxruntime behaviour is taken and noted at the operator (Resize-10/Upsample legacy nearest rounding,
linear Resize clamping the source coordinate).

Supported operators (default domain):
  conv:        Conv (1-3 d, groups, dilations, strides, explicit/asymmetric pads, auto_pad), ConvTranspose
               (output_padding, output_shape, groups, dilations, auto_pad)
  linear:      Gemm (alpha, beta, transA, transB, C broadcast), MatMul (batched/broadcast), Einsum
  norm:        BatchNormalization (inference), InstanceNormalization, LayerNormalization (+Mean/InvStdDev
               outputs), GroupNormalization (opset 18 per-group and opset 21 per-channel scale),
               LpNormalization, MeanVarianceNormalization, LRN, RMSNormalization
  attention:   Attention (opset 23: 3-D and 4-D, grouped-query, bool/float masks, is_causal, past key/value,
               softcap, qk_matmul_output modes 0-3), RotaryEmbedding (position_ids, interleaved, partial)
  elementwise: Relu, LeakyRelu, PRelu, Sigmoid, HardSigmoid, HardSwish, Gelu, Erf, Tanh, Softplus, Softsign,
               Exp, Log, Sqrt, Abs, Neg, Reciprocal, Floor, Ceil, Round, Sign, Sin, Cos, Tan, Elu, Selu, Celu,
               ThresholdedRelu, Mish, Swish, Relu6, Shrink, Identity, Dropout (inference: identity), Cast,
               CastLike, Not, IsNaN, IsInf, Clip, Add, Sub, Mul, Div, Pow, Mod, Max, Min, Sum, Mean, Where,
               Equal, Less, Greater, LessOrEqual, GreaterOrEqual, And, Or, Xor, BitShift, BitwiseAnd,
               BitwiseOr, BitwiseXor, BitwiseNot, QuantizeLinear, DequantizeLinear (per-tensor and per-axis)
  pool:        MaxPool (ceil_mode, pads, dilations, auto_pad, Indices output with storage_order),
               AveragePool (count_include_pad, ceil_mode, dilations), LpPool, GlobalAveragePool,
               GlobalMaxPool, GlobalLpPool, ReduceMean/Sum/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare (axes
               as attribute or input, keepdims, noop_with_empty_axes), ArgMax/ArgMin (select_last_index),
               Softmax/LogSoftmax/Hardmax (opset < 13 coerce to 2-D), CumSum, TopK, Resize (nearest with all
               nearest_modes, linear, cubic incl. exclude_outside; every coordinate_transformation_mode incl.
               tf_crop_and_resize; scales or sizes; axes; keep_aspect_ratio_policy), Upsample, Pad (constant,
               reflect, edge, wrap; axes)
  shape:       Reshape (0, -1, allowzero), Flatten, Transpose, Squeeze, Unsqueeze, Expand, Tile, Shape
               (start/end), Size, ConstantOfShape, Constant, Range, DepthToSpace, SpaceToDepth, Trilu, NonZero,
               OneHot
  concat:      Concat, Split (split attr/input, num_outputs, equal), Slice (negative/INT_MAX ends, negative
               steps, opset < 10 attributes), Gather (negative indices), GatherElements, GatherND (batch_dims),
               ScatterND, ScatterElements (reduction none/add/mul/max/min)
  recurrent:   LSTM, GRU, RNN (directions, layout 0/1, sequence_lens, initial states, peepholes, clip,
               linear_before_reset; activations Sigmoid/Tanh/Relu/Softsign/Softplus/LeakyRelu/HardSigmoid;
               not input_forget=1)

  quantized:   QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger, DynamicQuantizeLinear, and com.microsoft
               QGemm, QLinearAdd, QLinearMul, QLinearGlobalAveragePool, QLinearSigmoid, QLinearLeakyRelu
               (integer arithmetic emulated in float: dequantize, the float op, requantize)

Not supported (TorchGraph raises SpaError naming the node): MaxRoiPool, Resize antialias=1,
NonMaxSuppression, RoiAlign, QLinearConcat and the other quantized kernels,
QuantizeLinear/DequantizeLinear block_size > 0 and float8 types, random ops, sequence/optional ops, string
tensors, control flow with subgraphs (If, Loop, Scan), and every other op of another domain (com.microsoft, ...)
unless a user registers one.

ai.onnx.ml: ArrayFeatureExtractor only (skl2onnx's classifiers end with it).

Notes:
  * QuantizeLinear returns the integer type of its zero point, except when its input requires grad and grad
    mode is on: then it returns a float tensor holding the same integer values, rounded with a
    straight-through estimator, so that gradients flow through Q -> DQ pairs. DequantizeLinear accepts both.
  * BatchNormalization is written as a per-channel affine so that mean/var/scale/bias all get gradients
    (F.batch_norm in eval mode gives none to the running statistics).
  * Dropout is the inference identity whatever training_mode says.
"""
from . import attention, concat, conv, elementwise, linear, ml, norm, pool, quantized, recurrent, shape  # noqa: F401  (registers the built-ins)
from .core import (
           DTYPES,
           LATEST_OPSET,
           LOWERINGS,
           lower,
           lowering,
           node_attrs,
           tensor_from_proto,
           torch_dtype,
           unsupported,
)

__all__ = ["DTYPES", "LATEST_OPSET", "LOWERINGS", "lower", "lowering", "node_attrs", "tensor_from_proto",
           "torch_dtype", "unsupported"]
