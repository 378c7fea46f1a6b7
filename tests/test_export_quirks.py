"""What real exports hold that spa-prune must take without a traceback or a dead end (issue 15): no prunable source
in the main graph (quantized weights, weights only inside an If), a dynamic dim declared -1 (Paddle), a batch baked
into a Reshape or held at dim 1 of another input (silero-vad), models past protobuf's 2 GB.

Every fixture is built with onnx.helper, small, with the IR and opset versions real exports of that kind carry."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import Builder, assert_one_line_error, run_cli, run_model
from onnx import TensorProto, helper, numpy_helper

from spa import driver


def set_dims(vi: onnx.ValueInfoProto, dims) -> None:
    """Declared dims: an int is a dim_value (-1 too, as Paddle writes a dynamic dim), a str a dim_param."""
    shape = vi.type.tensor_type.shape
    shape.Clear()
    for d in dims:
        if isinstance(d, str):
            shape.dim.add().dim_param = d
        else:
            shape.dim.add().dim_value = d


def cnn(batch_dim="batch", reshape_batch=None) -> onnx.ModelProto:
    """Conv -> ReLU -> Conv -> ReLU -> (GlobalAveragePool -> Flatten | Reshape to a constant [B, -1]) -> Gemm,
    on a 1x3x8x8 input whose dim 0 is then declared `batch_dim`."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv("c1", x, 3, 8))
    y = b.relu(b.conv("c2", y, 8, 8))
    if reshape_batch is None:
        y = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
        k = 8
    else:  # what some exporters write for x.view(1, -1): the batch baked into the constant
        y = b.op("Reshape", [b.op("MaxPool", [y], kernel_shape=[4, 4], strides=[4, 4]),
                             b.i64("target", [reshape_batch, -1])])
        k = 8 * 2 * 2
    b.output(b.gemm("fc", y, k, 4))
    m = b.model()
    set_dims(m.graph.input[0], [batch_dim, 3, 8, 8])
    set_dims(m.graph.output[0], [batch_dim, 4])
    return m


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


# ---- a dim declared -1 is dynamic: --input-shape may pin it -------------------------------------------------------
def paddle_cls() -> onnx.ModelProto:
    """PaddleOCR's direction classifier declares its input (-1, 3, ?, ?) and its output (-1, 4)."""
    m = cnn()
    set_dims(m.graph.input[0], [-1, 3, "?", "?"])
    set_dims(m.graph.output[0], [-1, 4])
    return m


def test_input_shape_pins_a_dim_declared_minus_one(tmp_path, capsys):
    src, out = save(paddle_cls(), tmp_path / "cls.onnx"), tmp_path / "out.onnx"
    rc, _, err = run_cli([src, out, "--fast", "--ratio", "0.5", "--input-shape", "x=1,3,48,192",
                          "--report", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["input_shapes"] == {"x": [1, 3, 48, 192]}
    assert rep["verification"]["status"] == "passed" and rep["groups"]["pruned"] == 2
    pruned = onnx.load(str(out))
    x = np.random.default_rng(0).standard_normal((3, 3, 48, 192)).astype(np.float32)  # any batch, any size
    assert run_model(pruned, {"x": x})[0].shape == (3, 4)


def test_minus_one_without_input_shape_takes_the_default_sizes(tmp_path, capsys):
    """The declared -1 in the output is no size either (it used to fail as 'negative dim in [-1, 4]')."""
    src = save(paddle_cls(), tmp_path / "cls.onnx")
    rc, _, err = run_cli([src, tmp_path / "out.onnx", "--fast", "--ratio", "0.5", "--report", tmp_path / "r.json"],
                         capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["input_shapes"] == {"x": [1, 3, 224, 224]}


def test_input_shape_still_refuses_a_static_dim_it_contradicts(tmp_path, capsys):
    src, out = save(paddle_cls(), tmp_path / "cls.onnx"), tmp_path / "out.onnx"
    rc, _, err = run_cli([src, out, "--ratio", "0.5", "--input-shape", "x=1,4,48,192"], capsys)
    assert_one_line_error(rc, err, "--input-shape x=1,4,48,192 does not match the declared shape ('?', 3, '?', '?')")
    assert not out.exists()
