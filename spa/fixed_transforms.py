"""Weights that look like a fixed signal-processing transform, not learned: a warning, never a freeze.

Audio front ends ship their STFT / DCT basis or their mel filterbank as a Conv or MatMul weight
(openwakeword, ...). spa sees a prunable source there like any other; pruning it drops frequency bins, which the
user rarely wants. The test looks at the 1-D fibers of the weight along the axis it contracts (a conv's taps, a
matrix's input axis), long ones only (>= MIN_LENGTH), so it costs one FFT of the weight:

- **sinusoid basis** (DFT, STFT with any usual window, DCT): nearly every fiber is one frequency — at least
  PURITY of its energy lies within ±2 bins of its peak on a zero-padded spectrum (a rectangular window keeps
  ~95 % there at any frequency, Hann ~100 %; white noise of 32 taps ~40 %) — and the fibers' peaks cover
  several frequencies (at least DISTINCT_PEAKS distinct ones): a basis, not one learned band-pass repeated;
- **filterbank** (mel, bark, triangular or not): every entry >= 0, every fiber's support (entries above 1e-6 of
  the weight's largest) one contiguous run over at most half the axis, at least DISTINCT_PEAKS fibers centred at
  distinct positions. Learned weights are never all non-negative with exact zeros around each band.

Measured (tests/test_fixed_transforms.py): every STFT/DFT/DCT/mel basis built with numpy is found; random
initialisations, the zoo's models and the trained benchmark nets are not.
"""
from __future__ import annotations

import fnmatch

import numpy as np

MIN_LENGTH = 16
PURITY = 0.9
SHARE = 0.9          # of the non-zero fibers that must pass
DISTINCT_PEAKS = 4
SAMPLE = 16          # fibers looked at before the whole weight


def fibers(w: np.ndarray, axis: int, rows: np.ndarray | None = None) -> np.ndarray:
    """The weight's 1-D fibers along `axis` (those numbered `rows`, else all), one per row, in float64, all-zero
    fibers left out. Only the chosen fibers are copied."""
    moved = np.moveaxis(np.asarray(w), axis, -1)
    if rows is None:
        f = moved.reshape(-1, moved.shape[-1]).astype(np.float64)
    else:
        f = moved[np.unravel_index(rows, moved.shape[:-1])].astype(np.float64)
    return f[np.abs(f).max(axis=1) > 0]


def sinusoid_basis(f: np.ndarray) -> bool:
    """Nearly every fiber one frequency, the fibers covering several."""
    purity, peak = _purity(f)
    if (purity >= PURITY).mean() < SHARE:
        return False
    return len(np.unique(peak)) >= DISTINCT_PEAKS


def _purity(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per fiber: the share of its energy within ±2 bins of its peak (on a zero-padded spectrum: 8x, 2x for
    fibers of 256 and more, which resolve frequencies finely enough), and the peak's bin on the unpadded grid."""
    n = f.shape[1]
    pad = 8 if n < 256 else 2
    power = np.abs(np.fft.rfft(f, n=pad * n, axis=1)) ** 2
    half = 2 * pad  # ±2 unpadded bins
    c = np.concatenate([np.zeros((len(f), half + 1)), np.cumsum(power, axis=1), np.zeros((len(f), half))], axis=1)
    c[:, -half:] = c[:, -half - 1:-half]
    near = c[:, 2 * half + 1:] - c[:, :-2 * half - 1]  # windowed sums centred on each padded bin
    peak = near.argmax(axis=1)
    purity = near[np.arange(len(f)), peak] / np.maximum(power.sum(axis=1), 1e-300)
    return purity, np.round(peak / pad).astype(np.int64)


def filterbank(f: np.ndarray, w_max: float) -> bool:
    """Non-negative fibers (the caller checked), each on one narrow contiguous band, at several positions."""
    on = f > 1e-6 * w_max
    n = f.shape[1]
    runs = (np.diff(on.astype(np.int8), axis=1) == 1).sum(axis=1) + on[:, 0]  # contiguous support: one run
    narrow = on.sum(axis=1) <= n // 2
    if ((runs == 1) & narrow).mean() < SHARE:
        return False
    return len(np.unique(f.argmax(axis=1))) >= DISTINCT_PEAKS


def fixed_transform(w: np.ndarray, axis: int) -> str | None:
    """What fixed transform a weight looks like along its contracted `axis` ("sinusoid basis (DFT/STFT/DCT)",
    "non-negative filterbank (mel-like)"), or None."""
    if w.ndim < 2 or w.shape[axis] < MIN_LENGTH or np.asarray(w).dtype.kind != "f":
        return None
    count = w.size // w.shape[axis]
    if count < DISTINCT_PEAKS:
        return None
    # a sample of the fibers first: a learned weight (the common case, LLM matrices included) is rejected
    # without reading the whole weight
    sample = fibers(w, axis, np.linspace(0, count - 1, SAMPLE).astype(np.int64) if count > SAMPLE else None)
    if len(sample) < DISTINCT_PEAKS or not np.isfinite(sample).all():
        return None
    if sample.min() >= 0:
        if not filterbank(sample, float(sample.max())) or np.min(w) < 0:
            return None
        f = fibers(w, axis)
        return "non-negative filterbank (mel-like)" if filterbank(f, float(f.max())) else None
    if not sinusoid_basis(sample):
        return None
    return "sinusoid basis (DFT/STFT/DCT)" if sinusoid_basis(fibers(w, axis)) else None


def contracted_axis(op_type: str, w: np.ndarray, out_axis: int) -> int:
    """The axis of a source weight its layer sums over: a conv's last tap axis, a matrix's other axis."""
    if op_type in ("Conv", "ConvTranspose"):
        return w.ndim - 1
    return 1 - out_axis if w.ndim == 2 else w.ndim - 1


def warnings_for(analysis, exclude=()) -> list[str]:
    """One warning per prunable group source whose weight looks like a fixed transform, with the --exclude
    hint (sources already matched by an --exclude pattern are left out)."""
    g = analysis.ctx.g
    out_axis = {(id(ps.node), ps.node.input[ps.input_index]): ps.axis for ps in analysis.ctx.params
                if ps.role == "source"}
    nodes = {n.name: n for n in analysis.nodes}
    prunable = {int(u) for grp in analysis.groups for u, fr in zip(grp.units, grp.frozen) if not fr}
    found = []
    for s in analysis.ctx.sources:
        node = nodes.get(s.node)
        if node is None or s.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        if not any(int(r) in prunable for r in np.unique(analysis.find(s.atoms))):
            continue
        if any(fnmatch.fnmatchcase(s.node, p) or fnmatch.fnmatchcase(s.weight, p) for p in exclude):
            continue
        w = g.const(s.weight)
        axis = out_axis.get((id(node), s.weight))
        if w is None or axis is None:
            continue
        kind = fixed_transform(w, contracted_axis(s.op_type, w, axis))
        if kind:
            found.append(f"{s.op_type} '{s.node}' has a weight that looks like a fixed {kind}, not learned: "
                         f"pruning it drops transform outputs (keep it with --exclude '{s.node}')")
    return found
