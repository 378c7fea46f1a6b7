"""Calibration data: .npz loading and validation against the model's inputs (every failure one SpaError line
naming the file and the input), image folders via Pillow (resize/crop/normalize, ImageFolder labels, corrupt
files skipped), atomic saving, and the `spa-prune make-calib` command (exit 2 with one line, nothing written)."""
from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from spa.calib import Calib, images_to_calib, input_specs, load_calib, save_calib
from spa.cli import main
from spa.errors import SpaError

SPA_PRUNE = Path(sys.executable).parent / "spa-prune"


# ---- models -------------------------------------------------------------------------------------------------------
def conv_model(shape=("N", 3, 8, 8), elem=TensorProto.FLOAT) -> onnx.ModelProto:
    """Conv 3->4 on input 'x' of `shape` (strings are dynamic dims)."""
    cin = shape[1] if isinstance(shape[1], int) else shape[3]
    w = numpy_helper.from_array(np.ones((4, cin, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, list(shape)),
                                            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, cin, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_input_model() -> onnx.ModelProto:
    """'x' float [N,3,8,8] and 'ids' int64 [N,5] (a Gather from a table)."""
    table = numpy_helper.from_array(np.ones((10, 2), np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("e", TensorProto.FLOAT, None)], initializer=[table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


SPECS = input_specs(conv_model())
SPECS2 = input_specs(two_input_model())


def x(n=4, dtype=np.float32):
    return np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(dtype)


def npz(tmp_path, name="calib.npz", **arrays) -> Path:
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def fails(path, specs, *fragments, **kw) -> str:
    with pytest.raises(SpaError) as e:
        load_calib(path, specs, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


# ---- input specs ----------------------------------------------------------------------------------------------------
def test_input_specs_skip_initializers_and_mark_dynamic_dims():
    assert SPECS == {"x": ((None, 3, 8, 8), np.dtype(np.float32))}
    assert SPECS2 == {"x": ((None, 3, 8, 8), np.dtype(np.float32)), "ids": ((None, 5), np.dtype(np.int64))}


# ---- valid archives ----------------------------------------------------------------------------------------------------
def test_valid_npz_with_labels_batches_and_subset(tmp_path):
    data = x(5)
    c = load_calib(npz(tmp_path, x=data, labels=np.array([0, 1, 2, 1, 0], np.int32)), SPECS)
    assert c.n == 5 and c.source.endswith("calib.npz")
    np.testing.assert_array_equal(c.inputs["x"], data)
    assert c.labels.dtype == np.int64 and c.labels.tolist() == [0, 1, 2, 1, 0]
    got = list(c.batches(2))
    assert [b["x"].shape[0] for b, _ in got] == [2, 2, 1]
    assert [lab.tolist() for _, lab in got] == [[0, 1], [2, 1], [0]]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b, _ in got]), data)
    s = c.subset(3, seed=1)
    assert s.n == 3 and len(s.labels) == 3
    idx = [int(np.argmax([np.array_equal(row, r) for r in data])) for row in s.inputs["x"]]
    assert idx == sorted(idx) and s.labels.tolist() == [c.labels[i] for i in idx]
    assert c.subset(99) is c
    with pytest.raises(SpaError):
        list(c.batches(0))


def test_float64_cast_to_float32_and_float16(tmp_path):
    c = load_calib(npz(tmp_path, x=x(2, np.float64)), SPECS)
    assert c.inputs["x"].dtype == np.float32
    half = input_specs(conv_model(elem=TensorProto.FLOAT16))
    assert load_calib(npz(tmp_path, x=x(2)), half).inputs["x"].dtype == np.float16


def test_single_input_accepts_any_key_and_batch_dim_may_differ(tmp_path):
    c = load_calib(npz(tmp_path, images=x(7)), input_specs(conv_model((1, 3, 8, 8))))
    assert list(c.inputs) == ["x"] and c.n == 7 and c.labels is None


def test_dynamic_dims_accept_anything(tmp_path):
    specs = input_specs(conv_model(("N", 3, "H", "W")))
    assert load_calib(npz(tmp_path, x=np.zeros((2, 3, 5, 11), np.float32)), specs).inputs["x"].shape == (2, 3, 5, 11)


def test_two_inputs_with_integer_cast(tmp_path):
    ids = np.arange(15, dtype=np.int32).reshape(3, 5) % 10
    c = load_calib(npz(tmp_path, x=x(3), ids=ids, labels=np.array([1, 0, 1])), SPECS2)
    assert c.inputs["ids"].dtype == np.int64 and c.n == 3
    np.testing.assert_array_equal(c.inputs["ids"], ids)


def test_limit_keeps_the_first_samples(tmp_path):
    data = x(6)
    c = load_calib(npz(tmp_path, x=data, labels=np.arange(6)), SPECS, limit=2)
    np.testing.assert_array_equal(c.inputs["x"], data[:2])
    assert c.labels.tolist() == [0, 1]
    assert load_calib(npz(tmp_path, x=data), SPECS, limit=100).n == 6
    fails(npz(tmp_path, x=data), SPECS, "at least 1", limit=0)


# ---- unreadable files ---------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    fails(tmp_path / "nope.npz", SPECS, "nope.npz", "not found")


def test_empty_text_npy_and_pickle_files(tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    fails(tmp_path / "empty.npz", SPECS, "empty.npz", "empty")
    (tmp_path / "t.npz").write_text("x,y\n1,2\n")
    fails(tmp_path / "t.npz", SPECS, "t.npz", "not an .npz archive")
    np.save(tmp_path / "a.npy", x(2))
    fails(tmp_path / "a.npy", SPECS, "a.npy", "single .npy array", "expected an .npz")
    (tmp_path / "p.npz").write_bytes(pickle.dumps({"x": x(2)}))
    fails(tmp_path / "p.npz", SPECS, "p.npz", "pickle")


def test_truncated_archive(tmp_path):
    p = npz(tmp_path, x=x(8))
    p.write_bytes(p.read_bytes()[:300])
    fails(p, SPECS, "calib.npz", "cannot read the .npz archive")


def test_object_array_is_never_unpickled(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([{"a": 1}, None], dtype=object))
    fails(p, SPECS, "obj.npz", "'x'", "Python objects")


def test_unreadable_file(tmp_path):
    p = npz(tmp_path, x=x(2))
    p.chmod(0)
    try:
        if p.open("rb"):  # running as root: permissions do not apply
            pytest.skip("file readable despite chmod 0 (root)")
    except OSError:
        fails(p, SPECS, "calib.npz", "cannot read")
    finally:
        p.chmod(0o644)


# ---- keys, shapes, counts -----------------------------------------------------------------------------------------------
def test_keys_missing_and_unexpected(tmp_path):
    msg = fails(npz(tmp_path, x=x(2), tokens=np.zeros((2, 5), np.int64)), SPECS2,
                "calib.npz", "missing 'ids'", "[?,5] int64", "unexpected 'tokens'")
    assert "model inputs: x, ids" in msg
    fails(npz(tmp_path, a=x(2), b=x(2)), SPECS, "missing 'x'", "unexpected 'a', 'b'")
    fails(npz(tmp_path, labels=np.arange(2)), SPECS, "missing 'x'")


def test_rank_mismatch(tmp_path):
    fails(npz(tmp_path, x=np.zeros((3, 8, 8), np.float32)), SPECS, "input 'x'", "expected rank 4 [?,3,8,8]",
          "found rank 3 [3, 8, 8]", "sample axis 0 is missing")
    fails(npz(tmp_path, x=np.zeros((2, 3, 64), np.float32)), SPECS, "expected rank 4", "found rank 3")


def test_static_dim_mismatch(tmp_path):
    fails(npz(tmp_path, x=np.zeros((2, 3, 8, 9), np.float32)), SPECS, "calib.npz", "input 'x'", "dim 3 must be 8",
          "found 9")
    fails(npz(tmp_path, x=np.zeros((2, 1, 8, 8), np.float32)), SPECS, "dim 1 must be 3", "found 1")


def test_sample_counts_differ(tmp_path):
    fails(npz(tmp_path, x=x(3), ids=np.zeros((2, 5), np.int64)), SPECS2, "different sample counts", "'x' 3",
          "'ids' 2")


def test_zero_samples(tmp_path):
    fails(npz(tmp_path, x=np.zeros((0, 3, 8, 8), np.float32)), SPECS, "zero samples")


# ---- dtypes and values ----------------------------------------------------------------------------------------------------
def test_dtype_kind_mismatches(tmp_path):
    fails(npz(tmp_path, x=x(2), ids=np.zeros((2, 5), np.float32)), SPECS2, "input 'ids'",
          "expected integer data (int64), found float32")
    fails(npz(tmp_path, x=np.zeros((2, 3, 8, 8), np.int64)), SPECS, "input 'x'",
          "expected float data (float32), found int64")
    fails(npz(tmp_path, x=np.zeros((2, 3, 8, 8), bool)), SPECS, "found bool")


def test_uint8_pixels_for_a_float_input_suggest_make_calib(tmp_path):
    fails(npz(tmp_path, x=np.zeros((2, 3, 8, 8), np.uint8)), SPECS, "input 'x'", "uint8", "make-calib")


def test_integer_overflow_is_an_error(tmp_path):
    m = two_input_model()
    m.graph.input[1].type.tensor_type.elem_type = TensorProto.INT32
    ids = np.full((2, 5), 2**40, np.int64)
    fails(npz(tmp_path, x=x(2), ids=ids), input_specs(m), "input 'ids'", "do not fit int32")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf(tmp_path, bad):
    data = x(3)
    data[1, 2, 3, 4] = bad
    fails(npz(tmp_path, x=data), SPECS, "calib.npz", "input 'x'", "1 NaN/Inf", "sample 1")


def test_float16_overflow(tmp_path):
    half = input_specs(conv_model(elem=TensorProto.FLOAT16))
    fails(npz(tmp_path, x=x(2) * 1e6), half, "overflow float16")


@pytest.mark.parametrize("labels, fragment", [
    (np.zeros((3, 1), np.int64), "must be 1-D"),
    (np.array([0.0, 1.0, 2.0]), "integer class indices, found float64"),
    (np.array([0, 1]), "2 entries for 3 samples"),
    (np.array([0, -1, 2]), "non-negative, found -1"),
])
def test_bad_labels(tmp_path, labels, fragment):
    fails(npz(tmp_path, x=x(3), labels=labels), SPECS, "calib.npz", "'labels'", fragment)


# ---- images -------------------------------------------------------------------------------------------------------------
def write_image(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def random_pixels(seed, h=12, w=10, c=3):
    shape = (h, w, c) if c > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_exact_pixel_values_nchw_and_nhwc(tmp_path):
    px = np.array([[[0, 10, 20], [30, 40, 50]], [[60, 70, 80], [255, 128, 1]]], np.uint8)
    write_image(tmp_path / "img" / "a.png", px)
    c = images_to_calib(tmp_path / "img", 2, mean=0.0, std=1.0)
    assert c.labels is None and c.classes == () and c.inputs["input"].dtype == np.float32
    np.testing.assert_allclose(c.inputs["input"][0], px.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-7)
    h = images_to_calib(tmp_path / "img", (2, 2), mean=[0.5, 0.5, 0.5], std=[0.5], layout="nhwc", name="img")
    np.testing.assert_allclose(h.inputs["img"][0], (px / 255.0 - 0.5) / 0.5, rtol=0, atol=1e-6)


def test_default_normalization_is_imagenet(tmp_path):
    write_image(tmp_path / "img" / "a.png", np.full((4, 4, 3), 255, np.uint8))
    c = images_to_calib(tmp_path / "img", 4)
    expected = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(c.inputs["input"][0, :, 0, 0], expected, rtol=1e-6)
    write_image(tmp_path / "gray" / "a.png", np.full((4, 4), 255, np.uint8))
    g = images_to_calib(tmp_path / "gray", 4, channels=1)
    assert g.inputs["input"].shape == (1, 1, 4, 4)
    np.testing.assert_allclose(g.inputs["input"], 1.0)  # (1 - 0.5) / 0.5


def test_resize_shorter_side_then_center_crop(tmp_path):
    # 4 x 8 image, left half black, right half white: size 2 -> resized to 2 x 4, the crop keeps columns 1..2
    px = np.zeros((4, 8, 3), np.uint8)
    px[:, 4:] = 255
    write_image(tmp_path / "img" / "a.png", px)
    c = images_to_calib(tmp_path / "img", 2, mean=0, std=1)
    assert c.inputs["input"].shape == (1, 3, 2, 2)
    v = c.inputs["input"][0, 0]
    assert v[0, 0] < 0.5 < v[0, 1]
    r = images_to_calib(tmp_path / "img", (3, 5), mean=0, std=1, layout="nhwc")
    assert r.inputs["input"].shape == (1, 3, 5, 3)


def test_image_folder_labels_png_and_jpeg(tmp_path):
    root = tmp_path / "data"
    write_image(root / "cat" / "1.png", random_pixels(1))
    write_image(root / "cat" / "2.JPG", random_pixels(2))
    write_image(root / "dog" / "deep" / "3.jpeg", random_pixels(3))
    write_image(root / "ant" / "4.bmp", random_pixels(4))
    (root / "dog" / "notes.txt").write_text("not an image")
    c = images_to_calib(root, (6, 4))
    assert c.classes == ("ant", "cat", "dog")
    assert c.labels.tolist() == [0, 1, 1, 2]  # ant/4, cat/1, cat/2, dog/deep/3
    assert c.inputs["input"].shape == (4, 3, 6, 4) and c.skipped == ()


def test_loose_images_mean_no_labels(tmp_path):
    write_image(tmp_path / "d" / "top.png", random_pixels(1))
    write_image(tmp_path / "d" / "cls" / "a.png", random_pixels(2))
    c = images_to_calib(tmp_path / "d", 4)
    assert c.labels is None and c.n == 2


def test_corrupt_images_are_skipped_with_a_warning(tmp_path):
    root = tmp_path / "d"
    write_image(root / "a.png", random_pixels(1))
    (root / "b.png").write_bytes(b"\x89PNG garbage")
    jpg = root / "c.jpg"
    write_image(jpg, random_pixels(3, 32, 32))
    jpg.write_bytes(jpg.read_bytes()[:200])
    with pytest.warns(UserWarning, match=r"skipped 2 image file\(s\).*b\.png"):
        c = images_to_calib(root, 4)
    assert c.n == 1 and c.skipped == ("b.png", "c.jpg")


def test_no_usable_images(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(SpaError, match="no image files"):
        images_to_calib(tmp_path / "d", 4)
    (tmp_path / "d" / "x.png").write_bytes(b"nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SpaError, match="none of the 1 image files could be decoded"):
            images_to_calib(tmp_path / "d", 4)
    with pytest.raises(SpaError, match="not found"):
        images_to_calib(tmp_path / "missing", 4)
    with pytest.raises(SpaError, match="1 or 3 values"):
        images_to_calib(tmp_path / "d", 4, mean=[0.1, 0.2])


def test_image_limit_is_a_seeded_sorted_subset(tmp_path):
    root = tmp_path / "d"
    for i in range(6):
        write_image(root / f"{i}.png", np.full((2, 2, 3), i * 40, np.uint8))
    a = images_to_calib(root, 2, mean=0, std=1, limit=3, seed=5)
    b = images_to_calib(root, 2, mean=0, std=1, limit=3, seed=5)
    np.testing.assert_array_equal(a.inputs["input"], b.inputs["input"])
    firsts = (a.inputs["input"][:, 0, 0, 0] * 255).round().astype(int).tolist()
    assert len(firsts) == 3 and firsts == sorted(firsts)


def test_load_calib_from_a_folder_uses_the_model_input(tmp_path):
    root = tmp_path / "d"
    write_image(root / "a" / "1.png", random_pixels(1))
    write_image(root / "b" / "2.png", random_pixels(2))
    c = load_calib(root, conv_model())
    assert list(c.inputs) == ["x"] and c.inputs["x"].shape == (2, 3, 8, 8) and c.labels.tolist() == [0, 1]
    nhwc = input_specs(conv_model(("N", 8, 6, 3)))
    assert load_calib(root, nhwc, limit=1).inputs["x"].shape == (1, 8, 6, 3)
    fails(root, input_specs(conv_model(("N", 3, "H", "W"))), "dynamic spatial dims", "--input-shape", "make-calib")
    fails(root, SPECS2, "single image input", "2 inputs")


def test_an_image_folder_takes_the_size_input_shape_pinned(tmp_path):
    """A detector declared [N, 3, H, W] run with --input-shape x=1,3,6,10: its image folder is sized 6x10, the
    pinned dims filling only the dynamic ones (a declared dim wins)."""
    from spa.calib import load_data

    root = tmp_path / "d"
    write_image(root / "1.png", random_pixels(1))
    write_image(root / "2.png", random_pixels(2))
    c = load_data(str(root), conv_model(("N", 3, "H", "W")), pinned={"x": (1, 3, 6, 10)})
    assert c.inputs["x"].shape == (2, 3, 6, 10)
    c = load_data(str(root), conv_model(("N", 3, 8, "W")), pinned={"x": (1, 3, 6, 10)})
    assert c.inputs["x"].shape == (2, 3, 8, 10)


# ---- saving ---------------------------------------------------------------------------------------------------------------
def test_save_roundtrip_is_atomic(tmp_path):
    c = Calib({"x": x(3)}, np.array([2, 0, 1]), "mem")
    out = tmp_path / "sub" / "c.npz"
    save_calib(c, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.npz"]
    back = load_calib(out, SPECS)
    np.testing.assert_array_equal(back.inputs["x"], c.inputs["x"])
    assert back.labels.tolist() == [2, 0, 1]
    with pytest.raises(SpaError, match="is a directory"):
        save_calib(c, tmp_path)


# ---- spa-prune make-calib -------------------------------------------------------------------------------------------------
def cli(argv, capsys):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *fragments):
    assert rc == 2, (rc, err)
    assert err.count("\n") == 1 and err.startswith("spa-prune: error:"), err
    for f in fragments:
        assert f in err, err


@pytest.fixture
def image_dir(tmp_path) -> Path:
    root = tmp_path / "images"
    write_image(root / "a" / "1.png", random_pixels(1))
    write_image(root / "b" / "2.jpg", random_pixels(2))
    write_image(root / "b" / "3.png", random_pixels(3))
    return root


def test_make_calib_subprocess(tmp_path, image_dir):
    out = tmp_path / "calib.npz"
    r = subprocess.run([str(SPA_PRUNE), "make-calib", str(image_dir), "-o", str(out), "--size", "6,4",
                        "--mean", "0.5", "--std", "0.25", "--name", "pixels"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "3 images" in r.stderr and "[3, 3, 6, 4]" in r.stderr
    assert "labels yes (2 classes)" in r.stderr and "0 skipped" in r.stderr
    with np.load(out) as z:
        assert sorted(z.files) == ["labels", "pixels"]
        assert z["labels"].tolist() == [0, 1, 1]
        np.testing.assert_allclose(z["pixels"], images_to_calib(image_dir, (6, 4), 0.5, 0.25).inputs["input"])
    r = subprocess.run([str(SPA_PRUNE), "make-calib", str(tmp_path / "nope"), "-o", str(tmp_path / "o.npz"),
                        "--size", "4"], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("spa-prune: error:")
    assert "not found" in r.stderr and not (tmp_path / "o.npz").exists()


def test_make_calib_from_model(tmp_path, image_dir, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(("N", 8, 6, 3)), str(model))
    out = tmp_path / "c.npz"
    rc, _, err = cli(["make-calib", image_dir, "-o", out, "--model", model, "--limit", "2"], capsys)
    assert rc == 0, err
    assert "2 images" in err and "'x' [2, 8, 6, 3]" in err and "nhwc" in err
    c = load_calib(out, input_specs(conv_model(("N", 8, 6, 3))))
    assert c.n == 2 and len(c.labels) == 2


def test_make_calib_skipped_files_warn(tmp_path, image_dir, capsys):
    (image_dir / "b" / "bad.png").write_bytes(b"broken")
    rc, _, err = cli(["make-calib", image_dir, "-o", tmp_path / "c.npz", "--size", "4"], capsys)
    assert rc == 0
    assert "spa-prune: warning: skipped 1 image file(s)" in err and "1 skipped" in err


@pytest.mark.parametrize("extra, fragment", [
    ([], "give --size"),
    (["--size", "0"], "positive integers"),
    (["--size", "4,x"], "positive integers"),
    (["--size", "4", "--mean", "a,b"], "comma-separated numbers"),
    (["--size", "4", "--mean", "0.1,0.2"], "1 or 3 values"),
    (["--size", "4", "--std", "0"], "std must be non-zero"),
    (["--size", "4", "--layout", "chw"], "invalid choice"),
    (["--size", "4", "--limit", "0"], "positive integer"),
    (["--model", "MODEL", "--size", "5"], "does not match model input 'x' [?,3,8,8]"),
    (["--model", "MODEL", "--name", "y"], "--name y does not match"),
    (["--model", "MODEL", "--channels", "1"], "--channels 1 does not match"),
    (["--model", "NOMODEL"], "not found"),
    (["--model", "TEXT"], "cannot read it as ONNX"),
])
def test_make_calib_errors(tmp_path, image_dir, capsys, extra, fragment):
    onnx.save(conv_model(), str(tmp_path / "m.onnx"))
    (tmp_path / "t.onnx").write_text("hello")
    subst = {"MODEL": tmp_path / "m.onnx", "NOMODEL": tmp_path / "no.onnx", "TEXT": tmp_path / "t.onnx"}
    out = tmp_path / "out.npz"
    rc, _, err = cli(["make-calib", image_dir, "-o", out, *[subst.get(a, a) for a in extra]], capsys)
    one_line_error(rc, err, fragment)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.npz")]


def test_make_calib_bad_folders_and_output(tmp_path, image_dir, capsys):
    rc, _, err = cli(["make-calib", image_dir, "-o", tmp_path, "--size", "4"], capsys)
    one_line_error(rc, err, "is a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = cli(["make-calib", empty, "-o", tmp_path / "o.npz", "--size", "4"], capsys)
    one_line_error(rc, err, "no image files")
    (empty / "x.png").write_bytes(b"junk")
    rc, _, err = cli(["make-calib", empty, "-o", tmp_path / "o.npz", "--size", "4"], capsys)
    one_line_error(rc, err, "could be decoded")
    rc, _, err = cli(["make-calib", image_dir, "--size", "4"], capsys)
    one_line_error(rc, err, "-o/--output")
    assert not (tmp_path / "o.npz").exists()


def test_make_calib_help(capsys):
    rc, out, _ = cli(["make-calib", "--help"], capsys)
    assert rc == 0
    for opt in ("--size", "--mean", "--std", "--layout", "--channels", "--name", "--model", "--limit", "--seed"):
        assert opt in out
