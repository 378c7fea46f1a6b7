"""Per-operator mask-propagation rules, registered by (domain, op type).

A rule is `rule(ctx, node)`: it reads the labellings of the node's inputs (`ctx.inp`), writes its outputs'
labellings (`ctx.out`), couples atoms (`ctx.unify`, `ctx.uf`), declares the parameter slices that follow a
labelling (`ctx.slice_param`), registers rewrites of shape constants and attributes (`ctx.edit`), records MACs
(`ctx.cost`) and freezes what it cannot express (`ctx.freeze`). Propagation and slicing of one operator family
live side by side in one module. An op type with no rule freezes every channel that reaches it.

Registry: RULES[(domain, op_type)] = rule, the default ONNX domain keyed as "" ("" and "ai.onnx" name the same
domain: `canonical_domain`). The torch lowerings (spa.lowering) are keyed the same way. A user adds an operator of
their own with `register` (docs/operators.md). This package never imports torch.
"""
from . import attention, concat, control, conv, elementwise, linear, norm, pool, quantized, recurrent, shape  # noqa: F401  (registers the built-in rules)
from .registry import LOWERINGS, RULES, Registration, canonical_domain, lookup, register, rule, unregister  # noqa: F401,E501
from .weights import BIAS_INPUT, WEIGHT_INPUT, is_weight_layer, weight_input  # noqa: F401
