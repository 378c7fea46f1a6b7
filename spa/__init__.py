"""spa-prune: a structured-pruning compiler for ONNX models (Python API).

    import spa
    model = spa.load("in.onnx")                  # load + normalize
    analysis = spa.analyse(model)                # coupled groups, frozen channels, MACs
    plan = spa.plan(model, ratio=0.5)            # which units go
    result = spa.prune("in.onnx", "out.onnx", target_flops=0.5)   # the whole verified pipeline
"""
import os

# The data passes alternate numpy's OpenBLAS (Gram sums) with torch's OpenMP (layer forwards) many times a second.
# Both thread pools spin after each call by default, and the spinning pool takes the cores from the working one:
# a torch convolution right after a Gram ran 2.6x slower on 2 cores. Idle threads are made to sleep at once; only
# how idle threads wait changes, never a result. Set before numpy and torch start their pools (a value the user
# set wins).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")   # 2**16 cycles of spinning (~20 µs), then sleep
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .driver import PruneOptions, analyse, load, plan, prune  # noqa: E402
from .errors import SpaError, VerificationError  # noqa: E402

__all__ = ["PruneOptions", "SpaError", "VerificationError", "analyse", "load", "plan", "prune"]
__version__ = "0.1.0"
