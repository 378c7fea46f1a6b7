"""The operator registries, keyed by (domain, op type): propagation rules and torch lowerings, and the public
way to add an operator (`register`). The family modules register their built-ins here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

RULES: dict[tuple[str, str], Callable] = {}
# the torch lowerings (spa.lowering fills it with the built-ins when it is imported): a plain table here, so
# that registering an operator never imports torch and the torch layer depends on this one, not the reverse
LOWERINGS: dict[tuple[str, str], Callable] = {}
USER_LOWERINGS: set[tuple[str, str]] = set()  # registered through `register`: the built-ins never replace them


def canonical_domain(domain: str) -> str:
    """The registry key of a domain: "" and "ai.onnx" are both the default ONNX domain and key as ""."""
    return "" if domain in ("", "ai.onnx") else domain


def rule(*op_types: str, domain: str = ""):
    """Decorator: register `fn(ctx, node)` as the propagation rule of the given op types of `domain`."""
    d = canonical_domain(domain)

    def add(fn):
        for t in op_types:
            RULES[(d, t)] = fn
        return fn

    return add


def lookup(op_type: str, domain: str = ""):
    """The propagation rule of an op type of a domain, or None (the analysis then freezes what reaches it)."""
    return RULES.get((canonical_domain(domain), op_type))


# ---- registering a user's operator ---------------------------------------------------------------------------------
_MISSING = object()


@dataclass
class Registration:
    """What `register` changed, so that it can be undone: `undo()`, or use the registration as a context manager
    (`with register(...):`). Undoing restores whatever was registered before (nothing, or a built-in)."""

    op_type: str
    domain: str
    previous: dict = field(default_factory=dict)  # "rule" / "lowering" -> the entry it replaced (or _MISSING)

    def undo(self) -> None:
        key = (self.domain, self.op_type)
        for table, old in self.previous.items():
            registry = RULES if table == "rule" else LOWERINGS
            if old is _MISSING:
                registry.pop(key, None)
            else:
                registry[key] = old
        self.previous = {}

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def register(op_type: str, *, domain: str = "", rule: Callable | None = None, lowering: Callable | None = None,
             replace: bool = False) -> Registration:
    """Teach spa an operator it does not know: a custom op of your own domain (or a default-domain op spa has no
    rule for).

    Why: an op without a propagation rule freezes every channel that reaches it ("no propagation rule for this
    operator"), and an op without a torch lowering stops everything that runs the model in torch (gradient
    criteria, obs/obspa, reconstruction, fine-tuning). Both registries are keyed by (domain, op type), so a
    custom domain's op cannot collide with an ONNX op of the same name.

    rule: `fn(ctx, node)` mask propagation, as the built-in rules in spa/operators/<family>.py are written
        (`spa.labels.passthrough` for a channel-wise op whose output carries its input's channels unchanged).
    lowering: `fn(node, inputs, attrs) -> list[torch.Tensor]`, as in spa/lowering/<family>.py (registering
        imports no torch; a lowering registered before spa.lowering is loaded is kept over a built-in one).
    replace: an entry that already exists (a built-in, or an earlier registration) is replaced only when True;
        otherwise ValueError (a custom op that shadows a built-in by mistake would silently change results).

    Returns a Registration: `.undo()` (or `with register(...):`) restores the previous state. `unregister`
    removes entries whoever made them. Constant folding (spa/passes/fold.py) stays default-domain only.
    """
    if rule is None and lowering is None:
        raise ValueError("register: give a rule, a lowering, or both")
    d = canonical_domain(domain)
    key = (d, op_type)
    tables = []
    if rule is not None:
        tables.append(("rule", RULES, rule))
    if lowering is not None:
        tables.append(("lowering", LOWERINGS, lowering))
        USER_LOWERINGS.add(key)
    if not replace:
        taken = [name for name, registry, _ in tables if key in registry]
        if taken:
            raise ValueError(f"register: {d + '::' if d else ''}{op_type} already has a {' and a '.join(taken)} "
                             "(pass replace=True to replace it)")
    reg = Registration(op_type, d)
    for name, registry, fn in tables:
        reg.previous[name] = registry.get(key, _MISSING)
        registry[key] = fn
    return reg


def unregister(op_type: str, *, domain: str = "") -> None:
    """Remove the rule and the torch lowering of an op type of a domain (absent entries are ignored; the lowering
    registry is only looked at when spa.lowering is already loaded, so this never imports torch)."""
    key = (canonical_domain(domain), op_type)
    RULES.pop(key, None)
    LOWERINGS.pop(key, None)


