"""spa-prune: a structured-pruning compiler for ONNX models (Python API).

    import spa
    model = spa.load("in.onnx")                  # load + normalize
    analysis = spa.analyse(model)                # coupled groups, frozen channels, MACs
    plan = spa.plan(model, ratio=0.5)            # which units go
    result = spa.prune("in.onnx", "out.onnx", target_flops=0.5)   # the whole verified pipeline
"""
from .driver import PruneOptions, analyse, load, plan, prune
from .errors import SpaError, VerificationError

__all__ = ["PruneOptions", "SpaError", "VerificationError", "analyse", "load", "plan", "prune"]
__version__ = "0.1.0"
