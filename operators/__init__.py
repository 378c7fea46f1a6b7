"""Per-operator mask-propagation rules, registered by op type.

A rule is `rule(ctx, node)`: it reads the labellings of the node's inputs (`ctx.inp`), writes its outputs'
labellings (`ctx.out`), couples atoms (`ctx.unify`, `ctx.uf`), declares the parameter slices that follow a
labelling (`ctx.slice_param`), registers rewrites of shape constants and attributes (`ctx.edit`), records MACs
(`ctx.cost`) and freezes what it cannot express (`ctx.freeze`). Propagation and slicing of one operator family
live side by side in one module. An op type with no rule freezes every channel that reaches it.
"""
from __future__ import annotations

from typing import Callable

RULES: dict[str, Callable] = {}


def rule(*op_types: str):
    def register(fn):
        for t in op_types:
            RULES[t] = fn
        return fn

    return register


def lookup(op_type: str, domain: str = ""):
    if domain not in ("", "ai.onnx"):
        return None
    return RULES.get(op_type)


from . import conv, linear, norm, elementwise, pool, shape, concat  # noqa: E402,F401  (registration)
