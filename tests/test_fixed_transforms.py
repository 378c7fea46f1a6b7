"""Weights that look like a fixed transform (spa/fixed_transforms.py): every usual STFT/DFT/DCT basis and mel
filterbank built with numpy is recognised; random initialisations, the zoo's models and the trained benchmark nets
(checked by hand, see the report) are not. A pruning run warns, with the --exclude hint, in the report and the
summary."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

from spa.fixed_transforms import fixed_transform


def stft_basis(n_fft, window="hann"):
    n, k = np.arange(n_fft), np.arange(n_fft // 2 + 1)[:, None]
    w = {"hann": np.hanning(n_fft + 1)[:-1], "hamming": np.hamming(n_fft), "rect": np.ones(n_fft)}[window]
    return np.concatenate([np.cos(2 * np.pi * k * n / n_fft) * w, -np.sin(2 * np.pi * k * n / n_fft) * w])


def dct_basis(n):
    return np.cos(np.pi * np.arange(n)[:, None] * (np.arange(n) + 0.5) / n)


def mel_filterbank(sr, n_fft, n_mels):
    def hz2mel(f):
        return 2595 * np.log10(1 + f / 700)

    pts = 700 * (10 ** (np.linspace(0, hz2mel(sr / 2), n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    return np.stack([np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)))
                     for lo, c, hi in zip(pts, pts[1:], pts[2:])])  # [n_mels, n_fft/2+1]


SINE = "sinusoid basis (DFT/STFT/DCT)"
MEL = "non-negative filterbank (mel-like)"
FIXED = [
    ("stft-hann-64-conv", stft_basis(64)[:, None, :], 2, SINE),
    ("stft-hann-400-conv", stft_basis(400)[:, None, :], 2, SINE),
    ("stft-hamming-512-conv", stft_basis(512, "hamming")[:, None, :], 2, SINE),
    ("dft-rect-32-gemm", stft_basis(32, "rect"), 1, SINE),
    ("dct-32-gemm", dct_basis(32), 1, SINE),
    ("dct-512-matmul", dct_basis(512).T, 0, SINE),
    ("mel-16k-512-40-matmul", mel_filterbank(16000, 512, 40).T, 0, MEL),
    ("mel-16k-400-32-conv1x1", mel_filterbank(16000, 400, 32)[:, :, None], 1, MEL),
]


@pytest.mark.parametrize("name,w,axis,kind", FIXED, ids=[f[0] for f in FIXED])
def test_fixed_bases_are_found(name, w, axis, kind):
    assert fixed_transform(w.astype(np.float32), axis) == kind


def test_learned_like_weights_are_not():
    rng = np.random.default_rng(0)
    smooth = np.stack([np.convolve(rng.standard_normal(40), np.hanning(9), "same")[4:36] for _ in range(16)])
    for w, axis in ((rng.standard_normal((32, 8, 16)), 2), (rng.standard_normal((64, 1, 32)), 2),
                    (rng.standard_normal((64, 256)), 1), (rng.uniform(0, 1, (64, 256)), 1),
                    (np.maximum(rng.standard_normal((64, 64)), 0), 1), (smooth[:, None, :], 2),
                    (rng.standard_normal((512, 2048)).astype(np.float32), 0)):
        assert fixed_transform(w, axis) is None, w.shape


def test_zoo_random_init_is_not():
    torch = pytest.importorskip("torch")
    from spa import models

    torch.manual_seed(0)
    for name in ("resnet18", "vit_tiny", "conv1d_net", "bert_layer"):
        for key, w in models.build(name).state_dict().items():
            if key.endswith("weight") and w.dim() >= 2:
                assert fixed_transform(w.numpy(), w.dim() - 1) is None, (name, key)


def test_pruning_run_warns_on_a_dft_front_end(tmp_path, capsys):
    """A Conv1d holding an STFT basis (frozen at export like any weight) gets the warning, with the hint; the
    learned layers after it do not, and --exclude silences it."""
    torch = pytest.importorskip("torch")
    from helpers import run_cli

    class FrontEnd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stft = torch.nn.Conv1d(1, 66, 64, stride=16, bias=False)
            self.stft.weight.data = torch.tensor(stft_basis(64)[:, None, :], dtype=torch.float32)
            self.conv = torch.nn.Conv1d(66, 16, 3)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            y = self.conv(self.stft(x) ** 2).relu()
            return self.fc(y.mean(-1))

    path = tmp_path / "frontend.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FrontEnd().eval(), (torch.randn(1, 1, 512),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"])
    onnx.checker.check_model(onnx.load(str(path)))
    rep = tmp_path / "report.json"
    rc, _, err = run_cli([str(path), str(tmp_path / "out.onnx"), "--ratio", "0.3", "--fast", "--report", str(rep)],
                         capsys)
    assert rc == 0, err
    import json

    warned = [w for w in json.loads(rep.read_text())["warnings"] if "fixed" in w]
    assert warned == ["Conv '/stft/Conv' has a weight that looks like a fixed sinusoid basis (DFT/STFT/DCT), not "
                      "learned: pruning it drops transform outputs (keep it with --exclude '/stft/Conv')"]
    assert "warning       Conv '/stft/Conv' has a weight that looks like a fixed sinusoid" in err
    rc, _, err = run_cli([str(path), str(tmp_path / "out2.onnx"), "--ratio", "0.3", "--fast", "--exclude",
                          "/stft/Conv", "--report", str(rep)], capsys)
    assert rc == 0, err
    assert not [w for w in json.loads(rep.read_text())["warnings"] if "fixed" in w]


def test_zoo_resnet18_gets_no_warning():
    pytest.importorskip("torch")
    from spa import driver, models
    from spa.fixed_transforms import warnings_for

    m = driver.load(str(models.zoo_path("resnet18", small=True)))
    assert warnings_for(driver.analyse(m)) == []
