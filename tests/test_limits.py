"""Resource limits, warnings and option domains (issue 17): memory is estimated before it is allocated and refused
with a line naming --memory-limit; Python warnings go to the report, never to stderr; every nonsense number of
every subcommand is one line and exit 2."""
from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from fuzz_cases import png_bytes, residual_net
from helpers import Builder, assert_one_line_error, run_cli
from PIL import Image

cli, one_line_error = run_cli, assert_one_line_error


@pytest.fixture
def model(tmp_path) -> Path:
    p = tmp_path / "in.onnx"
    onnx.save(residual_net(), str(p))
    return p


def dynamic_model(path: Path) -> Path:
    b = Builder()
    x = b.input("x", ["N", 3, 8, 8])
    b.output(b.conv("c2", b.relu(b.conv("c1", x, 3, 8)), 8, 4))
    onnx.save(b.model(), str(path))
    return path


def zip_bomb(path: Path, shape=(60_000_000, 3, 8, 8)) -> None:
    """An .npz whose member declares `shape` float32 and inflates to gigabytes of zeros: ~300 KB on disk."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
            f.write(header.getvalue())
            for _ in range(16):
                f.write(bytes(1 << 24))


def test_npz_zip_bomb_refused_before_reading(tmp_path, model, capsys):
    zip_bomb(tmp_path / "bomb.npz")
    assert (tmp_path / "bomb.npz").stat().st_size < 1_000_000
    t0 = time.perf_counter()
    rc, _, err = cli([model, tmp_path / "out.onnx", "--ratio", "0.5", "--calib", tmp_path / "bomb.npz"], capsys)
    assert time.perf_counter() - t0 < 10
    one_line_error(rc, err, "bomb.npz", "GB limit", "--memory-limit")
    assert not (tmp_path / "out.onnx").exists()


def test_npz_declared_shape_checked_against_the_limit(tmp_path, model, capsys):
    np.savez(tmp_path / "c.npz", x=np.zeros((16, 3, 8, 8), np.float32))   # 12 KB declared; the model fits in 5 KB
    rc, _, err = cli([model, tmp_path / "out.onnx", "--ratio", "0.5", "--calib", tmp_path / "c.npz",
                      "--memory-limit", "5e-6"], capsys)
    one_line_error(rc, err, "c.npz", "over the 5e-06 GB limit")


def test_huge_input_shape_refused(tmp_path, capsys):
    m = dynamic_model(tmp_path / "in.onnx")
    rc, _, err = cli([m, tmp_path / "out.onnx", "--ratio", "0.5", "--input-shape", "x=4000000,3,8,8"], capsys)
    one_line_error(rc, err, "GB", "--memory-limit")   # the analysis's guard (an 8 GB tensor) before verification's
    rc, _, err = cli([m, tmp_path / "out.onnx", "--ratio", "0.5", "--input-shape", "x=200000,3,8,8"], capsys)
    one_line_error(rc, err, "verification (inputs and activations)", "GB limit", "--memory-limit")  # 0.4 GB tensors
    rc, _, err = cli([m, tmp_path / "out.onnx", "--ratio", "0.5", "-q", "--input-shape", "x=64,3,8,8"], capsys)
    assert rc == 0, err


def test_memory_limit_flag_raises_and_lowers_it(tmp_path, model, capsys):
    rc, _, err = cli([model, tmp_path / "out.onnx", "--ratio", "0.5", "--memory-limit", "1e-7"], capsys)
    one_line_error(rc, err, "--memory-limit")
    rc, _, err = cli([model, tmp_path / "out.onnx", "--ratio", "0.5", "-q", "--memory-limit", "64"], capsys)
    assert rc == 0, err
    for bad in ("0", "-1", "nan", "inf"):
        rc, _, err = cli([model, tmp_path / "o2.onnx", "--ratio", "0.5", "--memory-limit", bad], capsys)
        one_line_error(rc, err, "--memory-limit")


def test_synthesized_samples_refused(tmp_path, model, capsys):
    rc, _, err = cli([model, tmp_path / "out.onnx", "--ratio", "0.5", "--importance", "obspa",
                      "--synth-samples", "100000000"], capsys)
    one_line_error(rc, err, "synthesized samples", "--memory-limit")


def test_hessians_checked():
    from spa.errors import SpaError
    from spa.memory import memory_limit
    from spa.obspa import LayerView, check_hessians

    class G:
        def const(self, name):
            return np.zeros((4, 5000), np.float32)

    view = LayerView(node=None, kind="gemm", weight="w", bias=None, data_index=0, k=1)
    need = check_hessians(G(), {"a": (view, [])}, 8192)   # 5000^2 x 4 x 3 + 8192 x 5000 x (4 + 4): 0.63 GB
    assert need == 5000 ** 2 * 4 * 3 + 8192 * 5000 * 8
    with memory_limit(0.6), pytest.raises(SpaError, match="Hessians.*--memory-limit"):
        check_hessians(G(), {"a": (view, [])}, 8192)


def image_folder(folder: Path, bad: bool = True) -> Path:
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png_bytes(i, (8, 8)))
    if bad:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


def test_warnings_go_to_the_report_not_stderr(tmp_path, model, capsys):
    calib = image_folder(tmp_path / "imgs")
    rc, _, err = cli([model, tmp_path / "out.onnx", "--ratio", "0.5", "--calib", calib, "--importance", "taylor",
                      "--report", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    assert ".py:" not in err and "warnings.warn" not in err, err   # no Python warning line (file:line: ...)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert any("broken.png" in w for w in rep["warnings"]), rep["warnings"]
    assert "warning       skipped 1 image" in err, err


def test_warnings_not_printed_on_a_refusal(tmp_path, model, capsys):
    calib = image_folder(tmp_path / "imgs")
    rc, _, err = cli([model, tmp_path / "out.onnx", "--ratio", "0.5", "--calib", calib, "--importance", "taylor",
                      "--calib-samples", "1", "--max-ratio", "nan"], capsys)
    one_line_error(rc, err, "--max-ratio")


def test_decompression_bomb_image_skipped(tmp_path, model, capsys, monkeypatch):
    folder = image_folder(tmp_path / "imgs", bad=False)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(folder / "bomb.png")  # 144 px: over 80, under 160
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80)
    rc, _, err = cli(["make-calib", folder, "-o", tmp_path / "c.npz", "--size", "8"], capsys)
    assert rc == 0, err
    assert "bomb.png" in err and "Traceback" not in err and "DecompressionBombWarning:" not in err, err
    assert np.load(tmp_path / "c.npz")["input"].shape[0] == 3


@pytest.mark.parametrize("argv, fragment", [
    (["--round-to", str(10**30)], "--round-to"),
    (["--rtol", "nan"], "--rtol"),
    (["--steps", "1" * 40], "--steps"),
    (["--steps", "2", "--finetune-lr", "nan"], "--finetune-lr"),
    (["--seed", "-1"], "--seed"),
    (["--policy", "uniform", "--target-flops", "0.5", "--evals", "0"], "--evals"),
    (["--policy", "uniform", "--target-flops", "nan"], "--target-flops"),
    (["--policy", "uniform", "--target-flops", "0.5", "--policy-option", "bogus=1"], "no option 'bogus'"),
    (["--policy", "uniform", "--target-flops", "0.5", "--target-latency", "inf"], "--target-latency"),
])
def test_prune_options_one_line(tmp_path, model, capsys, argv, fragment):
    base = [model, tmp_path / "out.onnx"] + ([] if "--policy" in argv else ["--ratio", "0.5"])
    rc, _, err = cli(base + argv, capsys)
    one_line_error(rc, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


@pytest.mark.parametrize("argv, fragment", [
    (["finetune", "{m}", "{d}/t.onnx", "--data", "{d}/c.npz", "--epochs", "-1"], "--epochs"),
    (["finetune", "{m}", "{d}/t.onnx", "--data", "{d}/c.npz", "--lr", "nan"], "--lr"),
    (["finetune", "{m}", "{d}/t.onnx", "--data", "{d}/c.npz", "--momentum", "1"], "--momentum"),
    (["finetune", "{m}", "{d}/t.onnx", "--data", "{d}/c.npz", "--seed", str(2**64)], "--seed"),
    (["finetune", "{m}", "{m}", "--data", "{d}/c.npz"], "input file"),
    (["profile", "{m}", "-o", "{d}/t.json", "--runs", "0"], "--runs"),
    (["profile", "{m}", "-o", "{d}/t.json", "--threads", str(2**64)], "--threads"),
    (["profile", "{m}", "-o", "{m}"], "input file"),
    (["make-calib", "{d}/imgs", "-o", "{d}/c2.npz", "--size", "8", "--limit", "0"], "--limit"),
    (["make-calib", "{d}/imgs", "-o", "{d}/c2.npz", "--size", "8", "--seed", "-3"], "--seed"),
    (["make-calib", "{d}/imgs", "-o", "{d}/c2/", "--size", "8"], "directory"),
    (["to-torch", "{m}", "{d}/m.pt", "--rtol", "nan"], "--rtol"),
    (["analyse", "{m}", "--report", "{m}"], "input file"),
])
def test_subcommand_options_one_line(tmp_path, model, capsys, argv, fragment):
    image_folder(tmp_path / "imgs", bad=False)
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    before = sorted(p.name for p in tmp_path.iterdir())
    data = model.read_bytes()
    rc, _, err = cli([a.replace("{m}", str(model)).replace("{d}", str(tmp_path)) for a in argv], capsys)
    one_line_error(rc, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert model.read_bytes() == data
