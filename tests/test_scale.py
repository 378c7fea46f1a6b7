"""Large models (issue 15, item 8): weights mapped from their external-data files, never copied; the same
pruned model as the in-memory path, byte for byte; union-find depth on very wide axes."""
from __future__ import annotations

import mmap
import time

import numpy as np
import onnx
import pytest

from spa import driver, ir
from spa.labels import UnionFind
from spa.loading import load

torch = pytest.importorskip("torch")

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, vocab=50)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama-style export with external data (tools/make_llama_onnx.py), and the same model inline."""
    from tools.make_llama_onnx import export

    folder = tmp_path_factory.mktemp("llama")
    external = folder / "ext" / "llama.onnx"
    export(external, **TINY)
    inline = folder / "inline.onnx"
    onnx.save(onnx.load(str(external)), str(inline))
    return external, inline


def _mapped_base(a) -> bool:
    while a is not None and not isinstance(a, mmap.mmap):
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return a is not None


def test_external_weights_are_mapped_not_copied(llama, monkeypatch):
    external, _ = llama
    monkeypatch.setattr(ir, "SPILL_MIN_BYTES", 1024)
    g = load(str(external), {"input_ids": (1, 8)}).graph
    w = g.const("blocks.0.mlp.up")
    assert w.shape == (TINY["hidden"], TINY["intermediate"]) and _mapped_base(w) and not w.flags.writeable
    assert ir.has_mapped(g.model)
    # a value a pass makes for a mapped model goes to the spill file and comes back mapped
    g.set_const("blocks.0.mlp.up", np.ascontiguousarray(w[:, :10]) * 2)
    assert ir.is_mapped(g._tensors["blocks.0.mlp.up"])
    np.testing.assert_array_equal(g.const("blocks.0.mlp.up"), np.asarray(w[:, :10]) * 2)


@pytest.mark.parametrize("fast", [True, False])
def test_mapped_run_equals_the_in_memory_run(llama, tmp_path, fast, monkeypatch):
    """The mapped path (weights in files, cuts spilled, sessions by path, streamed save) writes the same model
    as the in-memory path, byte for byte, and verifies."""
    external, inline = llama
    monkeypatch.setattr(ir, "SPILL_MIN_BYTES", 1024)   # the tiny model's cut weights go to the spill file too
    kw = dict(ratio=0.3, input_shapes={"input_ids": (1, 8)}, exclude=["*attn*"], seed=0)
    kw.update(importance="l2", allocation="uniform", reconstruct=False) if fast else kw.update(
        importance="obspa", samples=4, synth_steps=2)
    a = driver.prune(str(inline), str(tmp_path / "a.onnx"), **kw)
    b = driver.prune(str(external), str(tmp_path / "b.onnx"), **kw)
    assert b.report["verification"]["status"] == "passed"
    assert (tmp_path / "b.onnx.data").exists() and not (tmp_path / "a.onnx.data").exists()
    ma, mb = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    assert [n.SerializeToString() for n in ma.graph.node] == [n.SerializeToString() for n in mb.graph.node]
    ta = {t.name: onnx.numpy_helper.to_array(t) for t in ma.graph.initializer}
    tb = {t.name: onnx.numpy_helper.to_array(t) for t in mb.graph.initializer}
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].tobytes() == tb[name].tobytes() and ta[name].shape == tb[name].shape, name
    assert a.report["macs"] == b.report["macs"] and b.report["macs"]["ratio"] < 1


def test_forced_external_path_equals_inline(llama, tmp_path, monkeypatch):
    """An in-memory model past the (lowered) 2 GB threshold: sessions take its weights as external
    initializers and the save streams them into OUT.data; the result equals the small-model path."""
    _, inline = llama
    kw = dict(ratio=0.3, input_shapes={"input_ids": (1, 8)}, exclude=["*attn*"], importance="l2",
              allocation="uniform", reconstruct=False)
    driver.prune(str(inline), str(tmp_path / "a.onnx"), **kw)
    monkeypatch.setattr(ir, "EXTERNAL_DATA_BYTES", 10_000)
    driver.prune(str(inline), str(tmp_path / "b.onnx"), **kw)
    assert (tmp_path / "b.onnx.data").exists()
    ma, mb = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    for x, y in zip(ma.graph.initializer, mb.graph.initializer):
        assert x.name == y.name
        assert onnx.numpy_helper.to_array(x).tobytes() == onnx.numpy_helper.to_array(y).tobytes()


def test_saved_external_data_is_page_aligned(llama, tmp_path, monkeypatch):
    external, _ = llama
    monkeypatch.setattr(ir, "SPILL_MIN_BYTES", 1024)
    driver.prune(str(external), str(tmp_path / "b.onnx"), ratio=0.3, input_shapes={"input_ids": (1, 8)},
                 exclude=["*attn*"], importance="l2", allocation="uniform", reconstruct=False)
    m = onnx.load(str(tmp_path / "b.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        info = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        if info and info["length"] >= ir.EXTERNAL_ALIGN_BYTES:
            assert info["offset"] % ir.EXTERNAL_ALIGN_BYTES == 0, t.name


def test_union_all_of_a_wide_axis_is_flat_and_fast():
    """union_all over 200k atoms: one root, every atom one step from it (a chain made find quadratic)."""
    uf = UnionFind()
    atoms = uf.add(200_000)
    t = time.perf_counter()
    uf.union_all(atoms[::-1].copy())
    roots = uf.find(atoms)
    assert time.perf_counter() - t < 2.0
    assert (roots == 0).all() and (uf.parent[uf.parent] == uf.parent).all()


def test_a_mapped_model_proto_loads_again(llama, tmp_path, monkeypatch):
    """A pruned mapped model handed back as a ModelProto (what a progressive step does) loads; a ModelProto
    naming any other file as external data is still refused."""
    from spa.errors import SpaError

    external, _ = llama
    monkeypatch.setattr(ir, "SPILL_MIN_BYTES", 1024)
    res = driver.prune(str(external), None, ratio=0.3, input_shapes={"input_ids": (1, 8)}, exclude=["*attn*"],
                       importance="l2", allocation="uniform", reconstruct=False)
    proto = res.model.graph.to_model()
    assert ir.has_mapped(proto)
    again = load(proto, {"input_ids": (1, 8)})
    assert again.graph.const("blocks.0.mlp.up").shape == res.model.graph.const("blocks.0.mlp.up").shape
    stranger = onnx.ModelProto()
    stranger.CopyFrom(proto)
    t = next(t for t in stranger.graph.initializer if ir.is_mapped(t))
    next(e for e in t.external_data if e.key == "location").value = str(tmp_path / "elsewhere.data")
    with pytest.raises(SpaError, match="external data"):
        load(stranger, {"input_ids": (1, 8)})


def test_the_spill_folder_is_removed_on_demand():
    """An interrupted CLI run ends with os._exit (no atexit hook): spa.cli removes the folder itself first."""
    import os

    from spa.ir import MappedWeights

    weights = MappedWeights()
    folder = weights.session_folder()
    open(os.path.join(folder, "spill.data"), "wb").close()
    weights.remove_folder()
    assert not os.path.exists(folder)
