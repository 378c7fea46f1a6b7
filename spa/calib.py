"""Calibration data: sample inputs for data-driven importance and fidelity checks.

A calibration set is an ``.npz`` archive with one array per model input, keyed by the input's name, whose first
axis counts samples (the batch dim of the file may differ from the model's); an optional ``labels`` array holds
1-D non-negative integer class labels, one per sample. ``load_calib`` checks the archive against the model's
inputs and fails with ONE line (``SpaError``) naming the file, the input and what was expected versus found.

A folder of images is also accepted: ``images_to_calib`` (and ``spa-prune make-calib``) turns it into the same
arrays. Each image is converted to RGB (or grayscale for 1 channel), resized so that it covers the target size
with its aspect ratio kept, center-cropped to (H, W), scaled to [0, 1] and normalized per channel with
``(x - mean) / std``. For a square size S the resize puts the shorter side at S (the usual eval transform,
without the extra crop margin of torchvision's ``Resize(256) + CenterCrop(224)``). When every image lies in a
subfolder, the label of an image is the index of its top-level subfolder among the sorted subfolders that hold
images (torchvision's ``ImageFolder`` convention).

Default normalization for image folders (no mean/std given): ImageNet's mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225) for 3 channels, mean 0.5 and std 0.5 for 1 channel.

    spa-prune make-calib images/ -o calib.npz --model model.onnx --limit 256
"""
from __future__ import annotations

import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import SpaError, one_line
from .fileio import atomic_write
from .memory import GB, array_bytes, check_memory

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)
LABELS_KEY = "labels"

Spec = tuple  # (shape: tuple[int | None, ...] | None, dtype: np.dtype)


# ---- the data set -----------------------------------------------------------------------------------------------
@dataclass
class Calib:
    """Calibration samples: ``inputs[name]`` has the samples on axis 0; ``labels`` (int64, one per sample) or None.
    ``classes`` names the label indices of an image folder; ``skipped`` lists image files that failed to decode."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    classes: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        """Number of samples."""
        for arr in self.inputs.values():
            return int(arr.shape[0])
        return 0 if self.labels is None else len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Consecutive batches of at most ``batch_size`` samples (the last one may be smaller), as views."""
        if int(batch_size) < 1:
            raise SpaError(f"batch size must be at least 1, got {batch_size}")
        bs = int(batch_size)
        for start in range(0, self.n, bs):
            sl = slice(start, start + bs)
            yield ({k: v[sl] for k, v in self.inputs.items()},
                   None if self.labels is None else self.labels[sl])

    def subset(self, n: int, seed: int = 0) -> Calib:
        """``n`` samples drawn without replacement (seeded), kept in their original order; all if n >= self.n."""
        if int(n) < 1:
            raise SpaError(f"a calibration subset needs at least 1 sample, got {n}")
        if n >= self.n:
            return self
        idx = np.sort(np.random.default_rng(seed).choice(self.n, size=int(n), replace=False))
        return Calib({k: v[idx] for k, v in self.inputs.items()},
                     None if self.labels is None else self.labels[idx], self.source, self.classes, self.skipped)


# ---- model inputs -----------------------------------------------------------------------------------------------
def input_specs(model: onnx.ModelProto) -> dict[str, Spec]:
    """The graph's real inputs (not initializers): name -> (shape with None for dynamic dims, numpy dtype).
    The shape is None when the model does not declare a rank."""
    inits = {t.name for t in model.graph.initializer}
    specs: dict[str, Spec] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            raise SpaError(f"model input '{vi.name}' is not a tensor; calibration data supports tensor inputs only")
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise SpaError(f"model input '{vi.name}' has an unsupported element type {tt.elem_type}")
        shape = None
        if tt.HasField("shape"):
            shape = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                          for d in tt.shape.dim)
        specs[vi.name] = (shape, dtype)
    return specs


def format_shape(shape) -> str:
    if shape is None:
        return "[any rank]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _fmt_spec(spec: Spec) -> str:
    return f"{format_shape(spec[0])} {spec[1].name}"


def image_input(specs: dict[str, Spec], layout: str | None = None):
    """The model's single 4-D image input: (name, dtype, layout, channels or None, (H or None, W or None)).
    The layout is inferred from where a channel dim of size 1 or 3 sits (axis 1: nchw, last axis: nhwc)."""
    if len(specs) != 1:
        raise SpaError(f"images need a model with a single image input, the model has {len(specs)} inputs "
                       f"({', '.join(specs) or 'none'}); give an .npz with one array per input instead")
    name, (shape, dtype) = next(iter(specs.items()))
    if shape is None or len(shape) != 4:
        raise SpaError(f"images need a 4-D image input, model input '{name}' is {format_shape(shape)}")
    if dtype.kind != "f":
        raise SpaError(f"images give float data, model input '{name}' is {dtype.name}")
    if layout is None:
        if shape[1] in (1, 3):
            layout = "nchw"
        elif shape[3] in (1, 3):
            layout = "nhwc"
        else:
            raise SpaError(f"cannot tell the channel axis of model input '{name}' {format_shape(shape)} (no dim of "
                           f"size 1 or 3 at axis 1 or 3); give the layout (nchw or nhwc)")
    if layout not in ("nchw", "nhwc"):
        raise SpaError(f"layout must be nchw or nhwc, got '{layout}'")
    channels, hw = (shape[1], shape[2:4]) if layout == "nchw" else (shape[3], shape[1:3])
    if channels is not None and channels not in (1, 3):
        raise SpaError(f"model input '{name}' {format_shape(shape)} has {channels} channels in {layout} layout; "
                       f"images give 1 (grayscale) or 3 (RGB)")
    return name, dtype, layout, channels, tuple(hw)


# ---- loading and validation ---------------------------------------------------------------------------------------
def _pinned_dims(shape: tuple | None, pinned: tuple | None) -> tuple | None:
    """A declared shape with its dynamic dims (None) taken from the pinned one where it has them."""
    if shape is None or not pinned:
        return shape
    return tuple(pinned[i] if d is None and i < len(pinned) else d for i, d in enumerate(shape))


def load_calib(path, specs, limit: int | None = None, mean=None, std=None, layout: str | None = None,
               pinned: dict | None = None) -> Calib:
    """Load calibration data for a model whose inputs are ``specs`` (from ``input_specs``, or a ModelProto).

    ``path`` is an ``.npz`` archive (arrays keyed by input name, optional ``labels``) or a folder of images
    (see ``images_to_calib``; size, channels and layout come from the model's single 4-D input, ``layout``
    overrides the inferred one, mean/std default to ImageNet's for 3 channels and 0.5/0.5 for 1 channel).
    Arrays are cast to the input dtype where that is lossless in kind (float to float, integer to integer);
    ``limit`` keeps the first ``limit`` samples of an archive, or a seeded random ``limit`` images of a folder.
    Every problem is a one-line ``SpaError`` naming the file and the input."""
    if isinstance(specs, onnx.ModelProto):
        specs = input_specs(specs)
    if limit is not None and int(limit) < 1:
        raise SpaError(f"calibration limit must be at least 1, got {limit}")
    p = Path(path)
    if not p.exists():
        raise SpaError(f"calibration data {p}: not found")
    if p.is_dir():
        if pinned:  # the dims --input-shape fixed, where the model declares them dynamic
            specs = {k: (_pinned_dims(shape, pinned.get(k)), dtype) for k, (shape, dtype) in specs.items()}
        name, _, layout, channels, (h, w) = image_input(specs, layout)
        if h is None or w is None:
            raise SpaError(f"calibration data {p}: model input '{name}' {format_shape(specs[name][0])} has dynamic "
                           f"spatial dims; fix them with --input-shape, or make an .npz with `spa-prune make-calib "
                           f"--size H,W`")
        calib = images_to_calib(p, (h, w), mean, std, layout=layout, channels=channels or 3, limit=limit,
                                name=name)
        arrays = dict(calib.inputs)
        if calib.labels is not None:
            arrays[LABELS_KEY] = calib.labels
        out = validate_arrays(str(p), arrays, specs, None)
        out.classes, out.skipped = calib.classes, calib.skipped
        return out
    return validate_arrays(str(p), _read_npz(p), specs, limit)


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    where = f"calibration data {p}"
    try:
        with open(p, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise SpaError(f"{where}: cannot read: {one_line(e.strerror or e)}")
    if not head:
        raise SpaError(f"{where}: the file is empty, expected an .npz archive")
    if head.startswith(b"\x93NUMPY"):
        raise SpaError(f"{where}: is a single .npy array, expected an .npz archive with one array per model "
                       f"input (np.savez(path, INPUT_NAME=array))")
    if head[:1] == b"\x80":
        raise SpaError(f"{where}: is a pickle, expected an .npz archive (pickles are never loaded: they can run code)")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise SpaError(f"{where}: not an .npz archive (np.savez output)")
    _check_npz_sizes(p, where)
    arrays = {}
    try:
        with np.load(p, allow_pickle=False) as z:
            for key in z.files:
                try:
                    arrays[key] = np.ascontiguousarray(z[key])
                except ValueError as e:
                    if "pickle" in str(e).lower() or "object" in str(e).lower():
                        raise SpaError(f"{where}: array '{key}' holds Python objects (pickled), expected numeric "
                                       f"data; object arrays are never loaded")
                    raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        # truncated or corrupt members, CRC errors, bad .npy headers
        raise SpaError(f"{where}: cannot read the .npz archive: {one_line(e) or type(e).__name__}")
    if not arrays:
        raise SpaError(f"{where}: the archive holds no arrays")
    return arrays


def _check_npz_sizes(p: Path, where: str) -> None:
    """Every member's declared size, read from the zip directory and from the .npy header inside the member
    (a few hundred bytes decompressed), against the memory limit, before any array is read: a small archive that
    inflates to gigabytes (a zip bomb) or declares 2**40 elements is refused at once."""
    total = 0
    try:
        with zipfile.ZipFile(p) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                declared = info.file_size
                if info.filename.endswith(".npy"):
                    with z.open(info) as f:
                        try:
                            version = np.lib.format.read_magic(f)
                            header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                                      np.lib.format.read_array_header_2_0)(f)
                        except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
                            raise SpaError(f"{where}: member {info.filename}: not an .npy array: "
                                           f"{one_line(e, 200) or type(e).__name__}")
                    shape, _, dtype = header
                    if dtype.hasobject:
                        raise SpaError(f"{where}: array '{info.filename[:-4]}' holds Python objects (pickled), "
                                       f"expected numeric data; object arrays are never loaded")
                    declared = max(declared, array_bytes(shape, dtype))
                total += declared
                check_memory(total, f"{where}: reading the archive ({info.filename} declares "
                                    f"{declared / GB:.3g} GB)")
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as e:
        raise SpaError(f"{where}: cannot read the .npz archive: {one_line(e, 200) or type(e).__name__}")


def validate_arrays(where: str, arrays: dict[str, np.ndarray], specs: dict[str, Spec], limit: int | None) -> Calib:
    pre = f"calibration data {where}"
    labels = arrays.pop(LABELS_KEY) if LABELS_KEY in arrays and LABELS_KEY not in specs else None
    names = list(specs)
    if not names:
        raise SpaError(f"{pre}: the model has no inputs to calibrate")
    if set(arrays) != set(names):
        if len(names) == 1 and len(arrays) == 1:
            arrays = {names[0]: next(iter(arrays.values()))}
        else:
            missing = [n for n in names if n not in arrays]
            extra = [k for k in arrays if k not in specs]
            parts = []
            if missing:
                parts.append("missing " + ", ".join(f"'{n}' ({_fmt_spec(specs[n])})" for n in missing))
            if extra:
                parts.append("unexpected " + ", ".join(f"'{k}'" for k in extra))
            raise SpaError(f"{pre}: arrays do not match the model inputs: {'; '.join(parts)} "
                           f"(model inputs: {', '.join(names)}; optional '{LABELS_KEY}')")
    out: dict[str, np.ndarray] = {}
    counts = {}
    for name in names:
        out[name] = _check_input(pre, name, arrays[name], specs[name])
        counts[name] = out[name].shape[0]
    if len(set(counts.values())) > 1:
        raise SpaError(f"{pre}: inputs have different sample counts (axis 0): "
                       + ", ".join(f"'{k}' {v}" for k, v in counts.items()))
    n = next(iter(counts.values()))
    if n == 0:
        raise SpaError(f"{pre}: holds zero samples (axis 0 of '{names[0]}' is empty)")
    if labels is not None:
        labels = _check_labels(pre, labels, n)
    if limit is not None and limit < n:
        out = {k: v[:limit] for k, v in out.items()}
        labels = None if labels is None else labels[:limit]
    return Calib(out, labels, where)


def _kind(dtype: np.dtype) -> str:
    return {"f": "float", "i": "integer", "u": "integer", "b": "bool", "c": "complex"}.get(dtype.kind, dtype.name)


def _check_input(pre: str, name: str, arr: np.ndarray, spec: Spec) -> np.ndarray:
    shape, dtype = spec
    what = f"{pre}: input '{name}'"
    if shape is not None:
        if len(shape) == 0:
            raise SpaError(f"{what}: the model input is a scalar; calibration data needs a sample axis")
        if arr.ndim != len(shape):
            hint = ""
            if arr.ndim == len(shape) - 1 and all(d is None or d == a for d, a in zip(shape[1:], arr.shape)):
                hint = " (the sample axis 0 is missing? add it with arr[None])"
            raise SpaError(f"{what}: expected rank {len(shape)} {format_shape(shape)}, found rank {arr.ndim} "
                           f"{list(arr.shape)}{hint}")
        for axis, (want, got) in enumerate(zip(shape, arr.shape)):
            if axis > 0 and want is not None and want != got:
                raise SpaError(f"{what}: dim {axis} must be {want} ({format_shape(shape)}), found {got} "
                               f"(shape {list(arr.shape)})")
    elif arr.ndim == 0:
        raise SpaError(f"{what}: found a scalar; calibration data needs a sample axis")
    want_kind, got_kind = _kind(dtype), _kind(arr.dtype)
    if want_kind == "float" and arr.dtype == np.uint8:
        raise SpaError(f"{what}: expected {dtype.name}, found uint8 (raw image pixels?); scale and normalize "
                       f"them first, e.g. with `spa-prune make-calib IMAGES_DIR -o OUT.npz --model MODEL.onnx`")
    if want_kind != got_kind:
        raise SpaError(f"{what}: expected {want_kind} data ({dtype.name}), found {arr.dtype.name}")
    if want_kind == "float" or want_kind == "complex":
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            first = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise SpaError(f"{what}: {bad} NaN/Inf values (first in sample {first})")
        with np.errstate(over="ignore"):
            cast = arr.astype(dtype, copy=False)
        if not np.isfinite(cast).all():
            raise SpaError(f"{what}: values overflow {dtype.name} (largest magnitude {float(np.abs(arr).max()):g})")
        return np.ascontiguousarray(cast)
    if want_kind == "integer" and arr.size:
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise SpaError(f"{what}: values {lo}..{hi} do not fit {dtype.name} ({info.min}..{info.max})")
    return np.ascontiguousarray(arr.astype(dtype, copy=False))


def _check_labels(pre: str, labels: np.ndarray, n: int) -> np.ndarray:
    if labels.ndim != 1:
        raise SpaError(f"{pre}: '{LABELS_KEY}' must be 1-D (one class index per sample), found shape "
                       f"{list(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise SpaError(f"{pre}: '{LABELS_KEY}' must hold integer class indices, found {labels.dtype.name}")
    if len(labels) != n:
        raise SpaError(f"{pre}: '{LABELS_KEY}' has {len(labels)} entries for {n} samples")
    if len(labels) and int(labels.min()) < 0:
        raise SpaError(f"{pre}: '{LABELS_KEY}' must be non-negative, found {int(labels.min())}")
    return labels.astype(np.int64)


# ---- image folders -------------------------------------------------------------------------------------------------
def _per_channel(values, channels: int, what: str, default) -> np.ndarray:
    if values is None:
        values = default
    v = np.atleast_1d(np.asarray(values, dtype=np.float64)).ravel()
    if v.size not in (1, channels):
        raise SpaError(f"{what} needs 1 or {channels} values (one per channel), got {v.size}")
    if not np.isfinite(v).all():
        raise SpaError(f"{what} values must be finite numbers")
    return np.broadcast_to(v, (channels,)).astype(np.float32)


def _target(size) -> tuple[int, int]:
    try:
        hw = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise SpaError(f"image size must be an int or (H, W), got {size!r}")
    if len(hw) != 2 or min(hw) < 1:
        raise SpaError(f"image size must be a positive int or (H, W), got {size!r}")
    return hw


def _image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _decode_errors() -> tuple:
    """What Pillow raises for a file it cannot decode (UnidentifiedImageError and truncation are OSErrors)."""
    from PIL import Image

    return (OSError, ValueError, TypeError, SyntaxError, EOFError, IndexError, struct.error, zlib.error,
            Image.DecompressionBombError, Image.DecompressionBombWarning, SpaError)


def _decode(path: Path, hw: tuple[int, int], channels: int) -> np.ndarray:
    from PIL import Image

    resample = getattr(Image, "Resampling", Image).BILINEAR
    with warnings.catch_warnings():
        # Pillow warns about (and past twice the size refuses) a decompression bomb: skip it like a corrupt file
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            check_memory(array_bytes((im.height, im.width, 4), np.uint8), f"image {path.name}")
            im = im.convert("RGB" if channels == 3 else "L")
    h, w = hw
    if (im.height, im.width) != (h, w):
        scale = max(h / im.height, w / im.width)  # cover the target, keep the aspect ratio
        nh, nw = max(h, round(im.height * scale)), max(w, round(im.width * scale))
        if (nh, nw) != (im.height, im.width):
            im = im.resize((nw, nh), resample)
        top, left = round((nh - h) / 2.0), round((nw - w) / 2.0)
        im = im.crop((left, top, left + w, top + h))
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def images_to_calib(folder, size, mean=None, std=None, layout: str = "nchw", channels: int = 3,
                    limit: int | None = None, seed: int = 0, name: str = "input") -> Calib:
    """Read a folder of images (recursive; png, jpg, jpeg, bmp, gif, tif, tiff, webp) into a float32 Calib.

    size: S (shorter side resized to S, center crop S x S) or (H, W) (resized, aspect ratio kept, to the
    smallest size that covers H x W, then center-cropped to H x W). Pixels are scaled to [0, 1] and normalized
    with (x - mean) / std per channel (mean/std: 1 or ``channels`` values; None: ImageNet's for 3 channels,
    0.5/0.5 for 1). layout "nchw" or "nhwc"; channels 3 (RGB) or 1 (grayscale).
    Labels follow torchvision's ImageFolder when every image lies in a subfolder: the index of the image's
    top-level subfolder among the sorted subfolders that hold images. ``limit`` keeps ``limit`` images, a
    seeded random choice (in sorted order) when there are more. Files that fail to decode are skipped (listed in
    ``Calib.skipped``, counted in a warning); no usable image at all is a SpaError."""
    folder = Path(folder)
    if not folder.exists():
        raise SpaError(f"image folder {folder}: not found")
    if not folder.is_dir():
        raise SpaError(f"image folder {folder}: not a directory")
    if layout not in ("nchw", "nhwc"):
        raise SpaError(f"layout must be nchw or nhwc, got '{layout}'")
    if channels not in (1, 3):
        raise SpaError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if limit is not None and int(limit) < 1:
        raise SpaError(f"image limit must be at least 1, got {limit}")
    hw = _target(size)
    m = _per_channel(mean, channels, "mean", IMAGENET_MEAN if channels == 3 else GRAY_MEAN)
    s = _per_channel(std, channels, "std", IMAGENET_STD if channels == 3 else GRAY_STD)
    if (s == 0).any():
        raise SpaError("std must be non-zero")
    files = _image_files(folder)
    if not files:
        raise SpaError(f"image folder {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}), searched recursively")
    rel = [f.relative_to(folder).parts for f in files]
    classes: tuple[str, ...] = ()
    if all(len(parts) > 1 for parts in rel):
        classes = tuple(sorted({parts[0] for parts in rel}))
    class_index = {c: i for i, c in enumerate(classes)}

    check_memory(array_bytes((min(len(files), limit or len(files)), channels, *hw), np.float32) +
                 array_bytes((min(len(files), limit or len(files)), *hw, channels), np.uint8),
                 f"image folder {folder}: {min(len(files), limit or len(files))} images at {hw[0]}x{hw[1]}")
    order = list(range(len(files)))
    if limit is not None and limit < len(files):
        order = list(np.random.default_rng(seed).permutation(len(files)))
    picked: list[tuple[int, np.ndarray]] = []
    skipped: list[tuple[str, str]] = []
    for i in order:
        if limit is not None and len(picked) >= limit:
            break
        try:
            picked.append((int(i), _decode(files[i], hw, channels)))
        except _decode_errors() as e:
            skipped.append((_rel_name(files[i], folder), one_line(e) or type(e).__name__))
    if skipped:
        shown = "; ".join(f"{f} ({why})" for f, why in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"skipped {len(skipped)} image file(s) that failed to decode: {shown}{more}", stacklevel=2)
    if not picked:
        raise SpaError(f"image folder {folder}: none of the {len(skipped)} image files could be decoded "
                       f"(first: {skipped[0][0]}: {skipped[0][1]})")
    picked.sort(key=lambda t: t[0])
    h, w = hw
    check_memory(array_bytes((len(picked), channels, h, w), np.float32), f"image folder {folder}: {len(picked)} "
                 f"images at {h}x{w}")
    x = np.empty((len(picked), channels, h, w) if layout == "nchw" else (len(picked), h, w, channels), np.float32)
    for k, (_, px) in enumerate(picked):  # uint8 H, W, C -> normalized float32, one image at a time
        v = (px / np.float32(255.0) - m) / s
        x[k] = v.transpose(2, 0, 1) if layout == "nchw" else v
    labels = None
    if classes:
        labels = np.array([class_index[rel[i][0]] for i, _ in picked], dtype=np.int64)
    return Calib({name: x}, labels, str(folder), classes, tuple(f for f, _ in skipped))


def _rel_name(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


# ---- writing --------------------------------------------------------------------------------------------------------
def save_calib(calib: Calib, path) -> None:
    """Write ``calib`` as an .npz (inputs by name, plus ``labels``): a temp file in the same folder, then
    os.replace, so a reader never sees a half-written file."""
    p = Path(path)
    if p.is_dir():
        raise SpaError(f"output {p} is a directory")
    arrays = dict(calib.inputs)
    if calib.labels is not None:
        if LABELS_KEY in arrays:
            raise SpaError(f"an input is named '{LABELS_KEY}', which the .npz format reserves for class labels")
        arrays[LABELS_KEY] = np.asarray(calib.labels)
    atomic_write(p, lambda f: np.savez(f, **arrays))


# ---- spa-prune make-calib ---------------------------------------------------------------------------------------------
















def load_data(calib, model: onnx.ModelProto, limit: int | None = None, pinned: dict | None = None) -> Calib | None:
    """Calibration data for a run: None (data-free), a Calib (a seeded subset of `limit` samples), or a path
    (.npz / image folder) checked against the model's inputs (its first `limit` samples). `pinned`: the
    shapes --input-shape gave, which size an image folder's pictures where the model leaves H, W dynamic."""
    if calib is None:
        return None
    if isinstance(calib, Calib):
        return calib if limit is None else calib.subset(limit)
    return load_calib(str(calib), input_specs(model), limit=limit, pinned=pinned)
