"""spa-prune to-torch: an ONNX model as a trainable torch module file (torch is imported by run() only)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from onnx import helper

from ..driver import input_paths
from ..errors import VerificationError
from ..fileio import atomic_write, check_outputs
from ..options import check_number
from ..passes import verify
from .common import add_memory_limit, input_shape

TO_TORCH_DOC = """\
Convert an ONNX model (e.g. one written by spa-prune) into a trainable PyTorch module file.

    spa-prune to-torch pruned.onnx pruned.pt

Load it in your code (spa-prune must be importable):

    from spa.torch_bridge import load_torch
    net = load_torch("pruned.pt")     # a torch.nn.Module: net(x), net.parameters(), net.state_dict(), ...
    net.param("conv1.weight")         # parameters by ONNX initializer name; save_torch(net, path) after training

The file is reloaded and compared with onnxruntime on random inputs before it replaces OUT.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("to-torch", description=TO_TORCH_DOC, help="a trainable torch module file from an ONNX model",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Exit codes: 0 success; 1 the reloaded module does not match onnxruntime (nothing written); "
                       "2 bad input or option (one line on stderr).")
    p.add_argument("input", help="ONNX file, or zoo:NAME[:small][:dynamo]")
    p.add_argument("output", help="the .pt file to write (replaced atomically)")
    p.add_argument("--input-shape", action="append", type=input_shape, default=[], metavar="NAME=D1,D2,...",
                   help="fix dynamic input dims for the check (batch 1, spatial 224, others 128 otherwise)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="check tolerance: max |torch - onnxruntime| relative to each output's scale (1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the reload + onnxruntime comparison")
    p.add_argument("--keep-half", action="store_true",
                   help="run float16 models in float16 (default: upcast to float32, which CPU torch needs)")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary line on stderr")
    add_memory_limit(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..torch_bridge import (
        OnnxModule,
        _proto_of,
        _writer,
        check_against_onnxruntime,
        load_torch,
    )

    t0 = time.perf_counter()
    src = args.input
    check_outputs({"OUT": args.output}, input_paths(src))
    check_number("--rtol", args.rtol, low=0.0, low_open=True)
    proto = _proto_of(src)
    module = OnnxModule(proto, upcast_half=not args.keep_half)
    out = Path(args.output)
    err = None

    # float16 outputs: onnxruntime sums in float16 where the (upcast) module sums in float32
    rtol = max(verify.output_rtol(helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type), args.rtol)
               if o.type.tensor_type.elem_type else args.rtol for o in proto.graph.output)

    def check(tmp):
        nonlocal err
        err = check_against_onnxruntime(load_torch(tmp), proto, dict(args.input_shape))
        if not err <= rtol:
            raise VerificationError(f"the reloaded module differs from onnxruntime: max rel. error {err:.3g} > "
                                    f"{rtol:g}")

    atomic_write(out, _writer(module), check=None if args.no_check else check)
    if not args.quiet:
        n = sum(p.numel() for p in module.parameters())
        check = "not checked (--no-check)" if err is None else \
            f"reloaded, max rel. error vs onnxruntime {err:.2e} (<= {rtol:g}, 2 random inputs)"
        print(f"to-torch: wrote {out}: {n:,} parameters in {len(module.param_names)} tensors, "
              f"{len(module.nodes)} nodes; {check}; {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return 0
