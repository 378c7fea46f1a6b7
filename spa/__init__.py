"""spa-prune: a structured-pruning compiler for ONNX models (Python API).

    import spa
    model = spa.load("in.onnx")                  # load + normalize
    analysis = spa.analyse(model)                # coupled groups, frozen channels, MACs
    plan = spa.plan(model, ratio=0.5)            # which units go
    result = spa.prune("in.onnx", "out.onnx", target_flops=0.5)   # the whole verified pipeline
"""
from .errors import SpaError, VerificationError

__all__ = ["SpaError", "VerificationError", "analyse", "load", "plan", "prune"]
__version__ = "0.1.0"


def __getattr__(name):
    """The pipeline functions load on first use: `passes` imports `spa` submodules, so importing the driver
    here eagerly would make `import passes.apply` (before `import spa`) circular."""
    if name in ("analyse", "load", "plan", "prune"):
        from . import driver
        return getattr(driver, name)
    raise AttributeError(f"module 'spa' has no attribute {name!r}")
