"""spa-prune make-calib: calibration data from a folder of images."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..calib import (
    LABELS_KEY,
    Spec,
    format_shape,
    image_input,
    images_to_calib,
    input_specs,
    save_calib,
    validate_arrays,
)
from ..driver import input_paths
from ..errors import SpaError, one_line
from ..fileio import check_outputs
from ..options import check_counts, check_seed
from .common import add_memory_limit

MAKE_CALIB_DOC = """\
Turn a folder of images into calibration data (.npz) for spa-prune.

Each image (png, jpg, jpeg, bmp, gif, tif, tiff, webp; subfolders searched, files sorted) is converted to RGB
(or grayscale with --channels 1), resized with its aspect ratio kept to the smallest size that covers the target,
center-cropped to the target, scaled to [0, 1] and normalized per channel: (x - mean) / std. The result is a
float32 array NAME of shape (N, C, H, W) (nchw) or (N, H, W, C) (nhwc). When every image lies in a subfolder,
the images are labelled ImageFolder-style (index of the sorted subfolder name) and the labels are saved as
'labels'. Files that fail to decode are skipped with a warning.

    spa-prune make-calib val/ -o calib.npz --model model.onnx --limit 512
    spa-prune make-calib val/ -o calib.npz --size 224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
"""


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'")
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'")
    return vals


def _size(text: str) -> tuple[int, int]:
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or H,W (positive integers), got '{text}'")
    if len(vals) not in (1, 2) or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected S or H,W (positive integers), got '{text}'")
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("make-calib", description=MAKE_CALIB_DOC, help="calibration data (.npz) from a folder of images",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Exit codes: 0 success; 2 bad input or option (one line on stderr, nothing written).")
    p.add_argument("images", metavar="IMAGES_DIR", help="folder of images (searched recursively)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz",
                   help="where to write the calibration data (replaced atomically)")
    p.add_argument("--model", metavar="MODEL.onnx",
                   help="take the input name, layout, channels and size from the model's single 4-D image input "
                        "(the options below may fill its dynamic dims, but must agree with its static ones)")
    p.add_argument("--size", type=_size, metavar="S|H,W",
                   help="target size: S resizes the shorter side to S and center-crops S x S; H,W resizes to "
                        "cover H x W (aspect ratio kept) and center-crops H x W (required without --model)")
    p.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                   help="per-channel mean subtracted after scaling to [0, 1] (default 0.485,0.456,0.406 for "
                        "3 channels, 0.5 for 1)")
    p.add_argument("--std", type=_floats, metavar="S[,S,S]",
                   help="per-channel std divided by after subtracting the mean (default 0.229,0.224,0.225 for "
                        "3 channels, 0.5 for 1)")
    p.add_argument("--layout", choices=["nchw", "nhwc"],
                   help="array layout (default: nchw, or inferred from --model)")
    p.add_argument("--channels", type=int, choices=[1, 3],
                   help="3: RGB, 1: grayscale (default 3, or from --model)")
    p.add_argument("--name", metavar="INPUT_NAME",
                   help="array name = the model input it feeds (default 'input', or from --model)")
    p.add_argument("--limit", type=_positive, metavar="N",
                   help="keep N images: a seeded random choice when there are more (default: all)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed for the --limit choice (default 0)")
    add_memory_limit(p)
    p.set_defaults(run=run)
    return p


def _load_model_inputs(path: str) -> dict[str, Spec]:

    p = Path(path)
    if not p.is_file():
        raise SpaError(f"model {p}: not found" if not p.exists() else f"model {p}: not a file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (OSError, ValueError, RuntimeError, DecodeError) as e:
        raise SpaError(f"model {p}: cannot read it as ONNX: {one_line(e) or type(e).__name__}")
    return input_specs(model)


def _resolve(args):
    """name, layout, channels, (H, W), specs (or None) from the options and, with --model, the model."""
    if args.model is None:
        if args.size is None:
            raise SpaError("give --size S or H,W (or --model with a static image size)")
        return args.name or "input", args.layout or "nchw", args.channels or 3, args.size, None
    specs = _load_model_inputs(args.model)
    try:
        name, _, layout, channels, (h, w) = image_input(specs, args.layout)
    except SpaError as e:
        raise SpaError(f"model {args.model}: {e}")
    shape = format_shape(specs[name][0])
    if args.name is not None and args.name != name:
        raise SpaError(f"--name {args.name} does not match model {args.model}'s input '{name}'")
    if args.channels is not None and channels is not None and args.channels != channels:
        raise SpaError(f"--channels {args.channels} does not match model input '{name}' {shape} ({channels} "
                       f"channels, {layout})")
    channels = args.channels or channels or 3
    if args.size is not None:
        for got, want, axis in ((args.size[0], h, "H"), (args.size[1], w, "W")):
            if want is not None and got != want:
                raise SpaError(f"--size {args.size[0]},{args.size[1]} does not match model input '{name}' "
                               f"{shape} ({axis} = {want}, {layout})")
        h, w = args.size
    if h is None or w is None:
        raise SpaError(f"model input '{name}' {shape} has dynamic spatial dims; give --size S or H,W")
    return name, layout, channels, (h, w), specs


def run(args) -> int:
    """``spa-prune make-calib``: 0 on success, 2 with one line on stderr for bad input (nothing written)."""
    try:
        check_seed(args.seed)
        check_counts([("--limit", args.limit)])
        # the text as given: Path() would drop a trailing '/' that check_outputs refuses
        check_outputs({"-o": args.output}, input_paths(args.model))
        out = Path(args.output)
        name, layout, channels, hw, specs = _resolve(args)
        if out.exists() and out.resolve().is_relative_to(Path(args.images).resolve()):
            raise SpaError(f"-o {out} lies in the image folder it reads; refusing to overwrite an input")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            calib = images_to_calib(args.images, hw, args.mean, args.std, layout=layout, channels=channels,
                                    limit=args.limit, seed=args.seed, name=name)
        if specs is not None:  # cast to the model's dtype and check it the way load_calib will
            arrays = dict(calib.inputs)
            if calib.labels is not None:
                arrays[LABELS_KEY] = calib.labels
            checked = validate_arrays(str(args.images), arrays, specs, None)
            calib.inputs, calib.labels = checked.inputs, checked.labels
        save_calib(calib, out)
    except SpaError as e:
        print(f"spa-prune: error: {one_line(e)}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"spa-prune: warning: {one_line(w.message)}", file=sys.stderr)
    x = calib.inputs[name]
    labels = (f"labels yes ({len(calib.classes)} classes)" if calib.labels is not None else "labels no")
    print(f"make-calib: wrote {out}: {calib.n} images, '{name}' {list(x.shape)} {x.dtype.name} {layout}, "
          f"{labels}, {len(calib.skipped)} skipped", file=sys.stderr)
    return 0
