"""Verification must catch wrong bookkeeping: inject bugs into Apply and expect exit-1 errors, never a model."""
from __future__ import annotations

import numpy as np
import pytest

import spa.passes.apply as apply_mod
from spa import driver
from spa.errors import VerificationError

models = pytest.importorskip("spa.models")


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "vit_tiny"])
def test_shifted_slices_are_caught(name, monkeypatch, tmp_path):
    """Cut the kept positions one place off (a concat-offset style bug): outputs differ from the reference."""
    real_cut = apply_mod.cut

    def shifted(array, slices):
        return real_cut(array, [(axis, np.roll(mask, 1)) for axis, mask in slices])

    monkeypatch.setattr(apply_mod, "cut", shifted)
    out = tmp_path / "out.onnx"
    with pytest.raises(VerificationError):
        driver.prune(str(models.zoo_path(name, small=True)), str(out), ratio=0.5)
    assert not out.exists()


def test_wrong_shape_rewrite_is_caught(monkeypatch, tmp_path):
    """A Reshape/Split/Slice rewrite with an off-by-one count: checker or runtime rejects it."""
    monkeypatch.setattr(apply_mod.ApplyContext, "kept", lambda self, atoms: int(self.keep(atoms).sum()) + 1)
    out = tmp_path / "out.onnx"
    with pytest.raises(VerificationError):
        driver.prune(str(models.zoo_path("vit_tiny", small=True)), str(out), ratio=0.5)
    assert not out.exists()


def test_reference_zeroing_is_what_makes_it_pass(monkeypatch):
    """Without the sink zeroing the reference is just the original: a pruned model must then fail."""
    from spa.passes import verify

    real = verify.build_reference
    monkeypatch.setattr(verify, "build_reference", lambda original, analysis, removed, idx: real(original, analysis, set(), idx))
    with pytest.raises(VerificationError):
        driver.prune(str(models.zoo_path("resnet18", small=True)), None, ratio=0.5)
