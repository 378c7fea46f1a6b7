"""Model zoo: standard architectures in plain torch (full size) plus small same-topology variants.

The small variants exist so CI can export every architecture with both ONNX exporters in
seconds; the full ones are the realistic targets. Everything is deterministic.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pathlib
import sys
import tempfile
import warnings
from typing import Callable, NamedTuple

import onnx
import torch

from . import conv1d, densenet, efficientnet, googlenet, mobilenet, resnet, transformer, unet, vgg
from ._common import randomize_norms


class _Spec(NamedTuple):
    build: Callable[[bool], torch.nn.Module]
    shape: tuple[int, ...]  # full-size input shape
    small_shape: tuple[int, ...]
    vocab: tuple[int, int] | None = None  # (full, small) vocabulary -> int64 token ids


_IMG, _IMG_SMALL = (1, 3, 224, 224), (1, 3, 32, 32)
_SPECS: dict[str, _Spec] = {
    "vgg16_bn": _Spec(vgg.vgg16_bn, _IMG, _IMG_SMALL),
    "resnet18": _Spec(resnet.resnet18, _IMG, _IMG_SMALL),
    "resnet50": _Spec(resnet.resnet50, _IMG, _IMG_SMALL),
    "resnet56": _Spec(resnet.resnet56, (1, 3, 32, 32), (1, 3, 32, 32)),
    "mobilenet_v2": _Spec(mobilenet.mobilenet_v2, _IMG, _IMG_SMALL),
    "mobilenet_v3_small": _Spec(mobilenet.mobilenet_v3_small, _IMG, _IMG_SMALL),
    "densenet121": _Spec(densenet.densenet121, _IMG, _IMG_SMALL),
    "googlenet": _Spec(googlenet.googlenet, _IMG, _IMG_SMALL),
    "resnext": _Spec(resnet.resnext, _IMG, _IMG_SMALL),
    "efficientnet_b0": _Spec(efficientnet.efficientnet_b0, _IMG, _IMG_SMALL),
    "unet": _Spec(unet.unet, (1, 3, 128, 128), _IMG_SMALL),
    "vit_tiny": _Spec(transformer.vit_tiny, _IMG, _IMG_SMALL),
    "bert_layer": _Spec(transformer.bert_layer, (1, 64), (1, 16),
                        (transformer.BERT_FULL["vocab"], transformer.BERT_SMALL["vocab"])),
    "conv1d_net": _Spec(conv1d.conv1d_net, (1, 1, 256), (1, 1, 64)),
}
ZOO_NAMES: list[str] = list(_SPECS)


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise KeyError(f"unknown zoo model {name!r}; choose from {', '.join(ZOO_NAMES)}")
    return _SPECS[name]


def build(name: str, small: bool = False) -> torch.nn.Module:
    """Deterministic model in eval mode with random (non-identity) norm statistics."""
    with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG alone
        torch.manual_seed(0)
        model = randomize_norms(_spec(name).build(small))
    return model.eval()


def example_inputs(name: str, small: bool = False) -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs (int64 token ids in range for bert)."""
    spec = _spec(name)
    shape = spec.small_shape if small else spec.shape
    g = torch.Generator().manual_seed(1)
    if spec.vocab:
        return (torch.randint(0, spec.vocab[small], shape, generator=g, dtype=torch.int64),)
    return (torch.randn(shape, generator=g),)


def input_names(name: str) -> list[str]:
    return ["input_ids"] if _spec(name).vocab else ["input"]


def export(name: str, path, *, dynamo: bool, small: bool = False) -> pathlib.Path:
    """Export with static shapes to ONE self-contained .onnx file (IR version capped at 10)."""
    path = pathlib.Path(path)
    model, inputs = build(name, small), example_inputs(name, small)
    kwargs = dict(input_names=input_names(name), output_names=["output"], dynamo=dynamo,
                  opset_version=18 if dynamo else 17)
    if dynamo:
        kwargs.update(external_data=False, verbose=False)
    quiet = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), \
                _shared_torchlib_registry():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, str(path), **kwargs)
    except Exception:
        sys.stderr.write(quiet.getvalue()[-20000:])  # the swallowed exporter log explains the failure
        raise
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 10)
    onnx.save(proto, str(path))
    return path


_REGISTRIES: dict = {}


@contextlib.contextmanager
def _shared_torchlib_registry():
    """Reuse the dynamo exporter's aten->ONNX registry between our exports.

    Rebuilding it costs ~0.7 s per export (a quarter of a small model's export time). It is
    only mutated for custom_translation_table, which we never pass. Private API, so any
    mismatch just falls back to the normal path; the patch is undone on exit.
    """
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
        original = ONNXRegistry.__dict__["from_torchlib"]
        build_fn = original.__func__
    except (ImportError, KeyError, AttributeError):
        yield
        return

    def cached(cls, *args, **kw):
        key = (cls, args, tuple(sorted(kw.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build_fn(cls, *args, **kw)
        return _REGISTRIES[key]

    ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = original


def _fingerprint() -> str:
    """Hash of the zoo sources + torch version, so edited models never hit a stale cache."""
    h = hashlib.sha256(torch.__version__.encode())
    for f in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:10]


def zoo_path(name: str, *, dynamo: bool = False, small: bool = False, cache_dir=None) -> pathlib.Path:
    """Path of a cached export, exporting on first use (atomic: temp file + os.replace)."""
    _spec(name)
    cache = pathlib.Path(cache_dir or os.environ.get("SPA_ZOO_CACHE") or pathlib.Path.home() / ".cache/spa-prune/zoo")
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"{name}{'-small' if small else ''}-{'dynamo' if dynamo else 'torchscript'}-{_fingerprint()}"
    final = cache / f"{stem}.onnx"
    if final.exists():
        return final
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp.onnx", dir=cache)
    os.close(fd)
    try:
        export(name, tmp, dynamo=dynamo, small=small)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


__all__ = ["ZOO_NAMES", "build", "example_inputs", "export", "input_names", "zoo_path"]
