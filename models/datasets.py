"""Offline data sets for the pruning quality benchmark (no downloads: generated or shipped with sklearn).

Every loader returns a `Dataset` of float32 arrays [N, C, ...] that are already standardized with the
TRAIN split's mean/std (stored in the Dataset), so an exported ONNX model takes exactly these arrays as
input. The `seed` argument of a loader fixes the data (generation / split), not the training run:
the benchmark uses the default for every training seed, so all seeds are tested on the same test set.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / ".bench" / "data"

MNIST1D_TRAIN = 50_000  # ResNet1d reaches >= 98.5 % test accuracy in a few CPU minutes with this many
MNIST1D_TEST = 20_000
DIGITS_TEST = 540  # of 1797: 1257 train / 540 test, stratified


class Dataset(NamedTuple):
    name: str
    x_train: np.ndarray  # float32, standardized
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float  # train-set statistics the arrays were standardized with
    std: float

    @property
    def fill(self) -> float:
        """The standardized value of a raw 0 (background), for padding in augmentation."""
        return float(-self.mean / self.std)


def _standardize(name, x_train, y_train, x_test, y_test) -> Dataset:
    mean, std = float(x_train.mean()), float(x_train.std())
    return Dataset(name, ((x_train - mean) / std).astype(np.float32), y_train.astype(np.int64),
                   ((x_test - mean) / std).astype(np.float32), y_test.astype(np.int64), mean, std)


def _make_mnist1d(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """mnist1d samples with the library's default noise/shift arguments (its own split disabled)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, 1.0, seed
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; leave the caller's alone
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return d["x"], d["y"]


def mnist1d(seed: int = 0) -> Dataset:
    """mnist1d: 50,000 train samples (generation seed `seed`), 20,000 test samples (seed `seed + 10_000`).

    Arrays are [N, 1, 40]. make_dataset already scales each generated set by its own global mean/std; we
    then standardize both splits with the train statistics as the task requires (the two sets are large,
    so the test set's own scaling differs from the train set's by well under 1 %). Cached under
    .bench/data/ because generation takes ~30 s.
    """
    path = DATA_DIR / f"mnist1d-{MNIST1D_TRAIN}-{MNIST1D_TEST}-seed{seed}.npz"
    if not path.exists():
        x_tr, y_tr = _make_mnist1d(MNIST1D_TRAIN, seed)
        x_te, y_te = _make_mnist1d(MNIST1D_TEST, seed + 10_000)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
        tmp.replace(path)
    d = np.load(path)
    return _standardize("mnist1d", d["x_train"][:, None, :], d["y_train"], d["x_test"][:, None, :], d["y_test"])


def digits32(seed: int = 0) -> Dataset:
    """sklearn's 8x8 digits, bilinearly upsampled to 1x32x32, scaled to [0, 1], standardized.

    Stratified split of 1257 train / 540 test with split seed `seed`, independent of any training seed.
    """
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).numpy()
    y = digits.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=DIGITS_TEST, stratify=y, random_state=seed)
    return _standardize("digits32", x_tr, y_tr, x_te, y_te)


DATASETS = {"mnist1d": mnist1d, "digits32": digits32}


def load(name: str, seed: int = 0) -> Dataset:
    return DATASETS[name](seed)


def calib_subset(x: np.ndarray, y: np.ndarray, n: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` samples (without replacement) of a TRAIN split for calibration; pass train arrays, never test.

    Calibration data drive importance scores, compensation and BN re-estimation; drawing them from the
    test set would leak the evaluation data into the pruned model.
    """
    idx = np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False)
    idx.sort()
    return x[idx], y[idx]


def random_shift(x, max_shift: int, fill: float, generator=None):
    """Shift a batch of images [N, C, H, W] (torch) by up to `max_shift` pixels each way, padding with `fill`.

    Light training augmentation for digits32 (the set is small); pad-and-crop per sample.
    """
    import torch

    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=fill)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # [N, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # [N, 1, 1, W]
    batch = torch.arange(n)[:, None, None, None]
    return padded[batch, torch.arange(x.shape[1])[None, :, None, None], rows, cols]


__all__ = ["DATASETS", "Dataset", "calib_subset", "digits32", "load", "mnist1d", "random_shift"]
