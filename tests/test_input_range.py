"""Data-free inputs at the range the model was trained on: the inputs' per-sample mean and std are read from the
first layer (a folded BatchNormalization in its bias and weights, a surviving one in its running statistics,
a normalization the export kept in front of it), and the synthesized samples are made at that range; a reading
close to standardized keeps the standardized prior."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import Builder, analyse, assert_one_line_error, run_cli, run_model

pytest.importorskip("torch")

from spa import synthesis  # noqa: E402
from spa.importance import ScoreInputs  # noqa: E402

SHAPE = [1, 1, 16, 16]
CHANNELS = 8


def blocky(n: int, mean: float, std: float, seed: int = 0) -> np.ndarray:
    """"Training data": 4x4 random blocks upsampled to 16x16 (not the pink noise the reading uses), each sample at
    the given mean and std."""
    rng = np.random.default_rng(seed)
    x = np.kron(rng.standard_normal((n, 1, 4, 4)), np.ones((4, 4)))
    x = (x - x.mean((1, 2, 3), keepdims=True)) / x.std((1, 2, 3), keepdims=True)
    return (mean + std * x).astype(np.float32)


def first_conv_statistics(data: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of conv(w) over `data`, as BatchNormalization's running statistics would hold."""
    b = Builder()
    b.output(b.op("Conv", [b.input("x", ["N", *SHAPE[1:]]), b.const("w", w)], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    y = run_model(b.model(), {"x": data})[0]
    return y.mean((0, 2, 3)), y.std((0, 2, 3))


def trained_like(mean: float, std: float, kept_bn: bool = False, normalize: tuple | None = None):
    """A classifier whose first Conv absorbed (or is followed by) a BatchNormalization fitted on data at `mean`/`std`
    (beta 0, gamma 1, as BatchNormalization starts); `normalize` = (sub, div) puts that normalization in the graph
    in front of the Conv, the statistics then fitted on the normalized data."""
    w = np.random.default_rng(1).standard_normal((CHANNELS, 1, 3, 3)).astype(np.float32)
    data = blocky(256, mean, std)
    if normalize is not None:
        data = (data - normalize[0]) / normalize[1]
    mu, sigma = first_conv_statistics(data, w)
    b = Builder()
    x = b.input("x", SHAPE)
    if normalize is not None:
        x = b.op("Sub", [x, b.const("sub", np.float32(normalize[0]))])
        x = b.op("Div", [x, b.const("div", np.float32(normalize[1]))])
    if kept_bn:
        y = b.op("Conv", [x, b.const("c1.weight", w)], name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        y = b.op("BatchNormalization", [y, b.const("bn.scale", np.ones(CHANNELS, np.float32)),
                                        b.const("bn.bias", np.zeros(CHANNELS, np.float32)),
                                        b.const("bn.mean", mu), b.const("bn.var", sigma ** 2)], epsilon=0.0)
    else:
        folded = (w / sigma[:, None, None, None]).astype(np.float32)
        y = b.op("Conv", [x, b.const("c1.weight", folded), b.const("c1.bias", (-mu / sigma).astype(np.float32))],
                 name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.op("Flatten", [b.op("GlobalAveragePool", [b.relu(y)])], axis=1)
    fc = np.random.default_rng(2).standard_normal((4, CHANNELS)).astype(np.float32)
    b.output(b.op("Gemm", [y, b.const("fc.weight", fc), b.const("fc.bias", np.zeros(4, np.float32))], transB=1))
    return b.model()


def reading(model):
    m, _ = analyse(model)
    feeds = {"x": np.zeros((2, *SHAPE[1:]), np.float32)}
    return synthesis.input_range(m.graph, feeds, "x", seed=0)


@pytest.mark.parametrize("kept_bn", [False, True], ids=["folded", "kept-bn"])
def test_pixels_in_0_1_are_read_from_the_first_layer(kept_bn):
    mean, std, how = reading(trained_like(0.3, 0.3, kept_bn=kept_bn))
    assert abs(mean - 0.3) < 0.01
    assert 0.3 / 1.2 < std < 0.3 * 1.2
    assert ("running statistics" in how) == kept_bn


def test_a_normalization_in_the_graph_is_read_through():
    # raw 0-255 pixels, the export kept (x - 120) / 60 in front of a Conv fitted on the normalized data
    mean, std, _ = reading(trained_like(120.0, 60.0, normalize=(120.0, 60.0)))
    assert abs(mean - 120.0) < 1.0
    assert 60.0 / 1.2 < std < 60.0 * 1.2


def test_no_first_layer_behind_a_nonlinearity():
    b = Builder()
    y = b.conv("c1", b.relu(b.input("x", SHAPE)), 1, 4)
    b.output(b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1))
    m, _ = analyse(b.model())
    assert synthesis.first_layer(m.graph, "x") is None
    assert synthesis.input_range(m.graph, {"x": np.zeros((2, *SHAPE[1:]), np.float32)}, "x", 0) is None


def synthesized(model, samples=24, given=None):
    _, analysis = analyse(model)
    inputs = ScoreInputs(analysis, None, samples=samples, seed=0)
    if given is not None:
        inputs.cache["synthesis_options"] = {"ranges": given}
    feeds, _ = synthesis.model_data(inputs)
    return feeds["x"], inputs.notes


def test_synthesized_samples_are_made_at_the_range_read():
    x, notes = synthesized(trained_like(0.3, 0.3))
    note = next(n for n in notes if "input 'x' synthesized at mean" in n)
    assert "folded BatchNormalization" in note
    per_sample = x.reshape(len(x), -1)
    assert abs(float(per_sample.mean()) - 0.3) < 0.1
    assert 0.3 / 1.6 < float(np.median(per_sample.std(1))) < 0.3 * 1.6


def test_a_standardized_reading_keeps_the_prior_and_the_samples():
    model = trained_like(0.0, 1.0)
    x, notes = synthesized(model)
    assert any("input 'x' taken as standardized" in n for n in notes)
    # the same samples as with the reading switched off
    original = synthesis.input_ranges
    try:
        synthesis.input_ranges = lambda g, feeds, seed, notes, given=(): {}
        y, _ = synthesized(model)
    finally:
        synthesis.input_ranges = original
    np.testing.assert_array_equal(x, y)


# ---- --input-range: the caller says the range -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["x", "*"])
def test_a_given_range_replaces_the_reading(name):
    # the first layer reads 0.3 / 0.3; the caller says 0.6 / 0.1 (for one input by name, or for every float input)
    x, notes = synthesized(trained_like(0.3, 0.3), given={name: (0.6, 0.1)})
    assert any("input 'x' synthesized at mean 0.6, std 0.1 per sample (--input-range)" in n for n in notes)
    assert not any("read from" in n for n in notes)
    per_sample = x.reshape(len(x), -1)
    assert abs(float(per_sample.mean()) - 0.6) < 0.05   # half a std: the inversion moves the samples a little
    assert 0.1 / 1.6 < float(np.median(per_sample.std(1))) < 0.1 * 1.6


def test_a_given_range_for_an_unknown_input_is_an_error():
    from spa.errors import SpaError

    with pytest.raises(SpaError, match="names 'image', which is not a float input of the model .float inputs: x"):
        synthesized(trained_like(0.3, 0.3), given={"image": (0.5, 0.2)})


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(trained_like(0.3, 0.3), str(path))
    return path


def test_input_range_on_the_command_line(model_file, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    rc, _, err = run_cli([model_file, out, "--ratio", "0.5", "--input-range", "x=0.6,0.1", "--synth-samples", "8",
                          "--synth-steps", "2", "--report", report], capsys)
    assert rc == 0, err
    notes = json.loads(report.read_text())["importance"]["notes"]
    assert any("mean 0.6, std 0.1 per sample (--input-range)" in n for n in notes), notes


@pytest.mark.parametrize("extra, fragment", [
    (["--input-range", "0.5"], "expected [NAME=]MEAN,STD"),
    (["--input-range", "x=0.5,0"], "the std positive"),
    (["--input-range", "x=nan,1"], "the mean must be finite"),
    (["--input-range", "image=0.5,0.2"], "not a float input of the model"),
    (["--input-range", "0.5,0.2", "--fast"], "--fast runs no data pass"),
])
def test_input_range_errors_are_one_line(model_file, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out.onnx"
    rc, _, err = run_cli([model_file, out, "--ratio", "0.5", "--synth-samples", "8", "--synth-steps", "2", *extra],
                         capsys)
    assert_one_line_error(rc, err, fragment)
    assert not out.exists()


def test_input_range_with_calibration_data_is_refused(model_file, tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=blocky(8, 0.3, 0.3))
    rc, _, err = run_cli([model_file, tmp_path / "out.onnx", "--ratio", "0.5", "--calib", calib,
                          "--input-range", "0.5,0.2"], capsys)
    assert_one_line_error(rc, err, "with --calib your samples are used")
