"""LSTM, GRU and RNN: the hidden size is one coupled group (operators/recurrent.py), and the torch lowering runs
them as onnxruntime does (spa/lowering/recurrent.py).

Models: torch nn.LSTM / nn.GRU / nn.RNN exported by torch.onnx (TorchScript, static and dynamic batch; dynamo),
and hand-built nodes for what exporters do not emit (layout 1, sequence_lens, peepholes, clip, activations,
initial states as graph inputs). onnxruntime refuses layout=1 (batchwise) recurrent ops, so the lowering is
checked there against onnx's reference evaluator.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from helpers import analyse, group_table, prune_and_check, removed_count
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
S, B, I, H = 5, 3, 4, 6


def recurrent_node(op, direction="forward", layout=0, *, bias=True, lens=False, h0=False, c0=False, peep=False,
                   h0_input=False, **attrs):
    """A one-node model; initial states are initializers, or a graph input (`h0_input`)."""
    rng = np.random.default_rng(0)
    dirs, g = (2 if direction == "bidirectional" else 1), GATES[op]
    inits = {"W": rng.standard_normal((dirs, g * H, I)), "R": 0.5 * rng.standard_normal((dirs, g * H, H))}
    names = ["x", "W", "R", "", "", "", "", ""]
    state = (B, dirs, H) if layout else (dirs, B, H)
    for flag, slot, name, value in ((bias, 3, "B", lambda: rng.standard_normal((dirs, 2 * g * H))),
                                    (lens, 4, "L", lambda: np.array([5, 2, 3], np.int32)),
                                    (h0, 5, "h0", lambda: rng.standard_normal(state)),
                                    (c0 and op == "LSTM", 6, "c0", lambda: rng.standard_normal(state)),
                                    (peep and op == "LSTM", 7, "P", lambda: rng.standard_normal((dirs, 3 * H)))):
        if flag:
            names[slot] = name
            inits[name] = value()
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, I] if layout else [S, B, I])]
    if h0_input:
        names[5] = "h0"
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, list(state)))
    while not names[-1]:
        names.pop()
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, names, outs, name="rnn", hidden_size=H, direction=direction, layout=layout,
                            **attrs)
    tensors = [numpy_helper.from_array(np.asarray(v, np.int32 if k == "L" else np.float32), k)
               for k, v in inits.items()]
    y = [S, dirs, B, H] if not layout else [B, S, dirs, H]
    st = list(state)
    graph = helper.make_graph([node], "rnn", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, y if o == "Y" else st)
                               for o in outs], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


CASES = [(op, d, lay, {}) for op in GATES for d in ("forward", "reverse", "bidirectional") for lay in (0, 1)]
CASES += [(op, "bidirectional", 0, {"lens": True, "h0": True, "c0": True}) for op in GATES]
CASES += [(op, "forward", 1, {"bias": False, "h0": True, "c0": True}) for op in GATES]
CASES += [("LSTM", "bidirectional", 0, {"peep": True, "c0": True, "h0": True, "lens": True}),
          ("LSTM", "forward", 0, {"clip": 0.5}),
          ("GRU", "bidirectional", 0, {"linear_before_reset": 1, "lens": True}),
          ("GRU", "reverse", 0, {"linear_before_reset": 1, "h0": True}),
          ("GRU", "forward", 0, {"activations": ["HardSigmoid", "Relu"], "activation_alpha": [0.3],
                                 "activation_beta": [0.4]}),
          ("RNN", "bidirectional", 0, {"activations": ["Relu", "Sigmoid"]})]


@pytest.mark.parametrize("op,direction,layout,kw", CASES, ids=[f"{c[0]}-{c[1]}-l{c[2]}-{'-'.join(c[3])}"
                                                                for c in CASES])
def test_lowering_matches_onnxruntime(op, direction, layout, kw):
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from spa.ir import Graph
    from spa.torch_graph import TorchGraph

    model = recurrent_node(op, direction, layout, **kw)
    x = np.random.default_rng(1).standard_normal([B, S, I] if layout else [S, B, I]).astype(np.float32)
    if layout:  # onnxruntime: "Batchwise recurrent operations (layout == 1) are not supported"
        ref = ReferenceEvaluator(model).run(None, {"x": x})
    else:
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = TorchGraph(Graph(model)).run({"x": torch.from_numpy(x)})
    for name, want in zip([o.name for o in model.graph.output], ref):
        np.testing.assert_allclose(got[name].detach().numpy(), want, rtol=1e-5, atol=2e-6, err_msg=name)


# ---- torch exports -----------------------------------------------------------------------------------------------
class Recurrent(torch.nn.Module):
    def __init__(self, kind, layers, bidirectional, batch_first, hidden=16, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(torch.nn, kind)(8, hidden, num_layers=layers, bidirectional=bidirectional,
                                           batch_first=batch_first)
        self.fc = torch.nn.Linear(hidden * (2 if bidirectional else 1), classes)
        self.batch_first = batch_first

    def forward(self, x):
        y = self.rnn(x)[0]
        return self.fc(y[:, -1] if self.batch_first else y[-1])


def export(tmp_path, kind, layers, bidirectional, batch_first, *, dynamo=False, dynamic=False):
    net = Recurrent(kind, layers, bidirectional, batch_first).eval()
    x = torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8)
    path = tmp_path / f"{kind}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (x,), str(path), dynamo=True, opset_version=18, input_names=["input"])
        else:
            axes = {"input": {0 if batch_first else 1: "batch"}} if dynamic else None
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              dynamic_axes=axes)
    model = onnx.load(str(path))
    model.ir_version = min(model.ir_version, 10)
    return model


def recurrent_shapes(model):
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [(n.op_type, [inits.get(x) for x in n.input[1:4]],
             next(a.i for a in n.attribute if a.name == "hidden_size"))
            for n in model.graph.node if n.op_type in GATES]


CONFIGS = [(kind, layers, bidir, bf) for kind in GATES for layers, bidir, bf in ((1, False, False), (2, True, True))]


@pytest.mark.parametrize("kind,layers,bidirectional,batch_first", CONFIGS,
                         ids=[f"{c[0]}-{c[1]}layer{'-bidir' * c[2]}{'-batchfirst' * c[3]}" for c in CONFIGS])
def test_torch_export_prunes_hidden_size(tmp_path, kind, layers, bidirectional, batch_first):
    model = export(tmp_path, kind, layers, bidirectional, batch_first)
    _, analysis = analyse(model)
    # one group per layer's hidden size (both directions, every gate), and the classifier's outputs (frozen)
    assert group_table(analysis) == [(16, 0)] * layers + [(4, 4)]
    res = prune_and_check(model, 0.3)  # verified; MACs against an independent count (tests/helpers.count_macs)
    h = 16 - removed_count(16, 0.3)
    dirs, g = (2 if bidirectional else 1), GATES[kind]
    want = [(kind, [(dirs, g * h, 8), (dirs, g * h, h), (dirs, 2 * g * h)], h)]
    want += [(kind, [(dirs, g * h, dirs * h), (dirs, g * h, h), (dirs, 2 * g * h)], h)] * (layers - 1)
    assert recurrent_shapes(res.pruned) == want


def test_dynamic_batch_zero_state_is_dropped(tmp_path):
    """TorchScript with a dynamic batch sizes the zero initial state at run time (Slice(ConstantOfShape)): the
    pruned LSTM drops it (an absent state is zeros) instead of freezing the hidden size."""
    model = export(tmp_path, "LSTM", 2, True, True, dynamic=True)
    res = prune_and_check(model, 0.3, input_shapes={"input": (2, 5, 8)}, check_macs=False)  # batch pinned here
    assert [n.input[5:] for n in res.pruned.graph.node if n.op_type == "LSTM"] == [[], []]
    assert [s[2] for s in recurrent_shapes(res.pruned)] == [11, 11]


def test_dynamo_export(tmp_path):
    """torch.onnx dynamo=True emits the same LSTM ops without initial states (2 layers: two LSTM nodes)."""
    model = export(tmp_path, "LSTM", 2, True, True, dynamo=True)
    assert [n.op_type for n in model.graph.node].count("LSTM") == 2
    res = prune_and_check(model, 0.3)
    assert [s[2] for s in recurrent_shapes(res.pruned)] == [11, 11]


def test_initial_state_graph_input_freezes():
    model = recurrent_node("LSTM", "bidirectional", h0_input=True)
    _, analysis = analyse(model)
    (group,) = analysis.groups
    assert group.size == H and group.frozen.all()
    assert ("LSTM 'rnn'", "initial_h 'h0' is a graph input: its hidden size is the caller's contract") in group.reasons


def test_default_run_refits_around_recurrent_layers(tmp_path):
    """The default run (obspa + reconstruction, data-free) prunes a GRU: the layer is scored, not refit, and the
    report says so; the classifier after it is refit."""
    from spa import driver

    model = export(tmp_path, "GRU", 1, False, False)
    res = driver.prune(model, None, ratio=0.3, samples=16)
    assert res.report["verification"]["status"] == "passed"
    (rec,) = [p for p in res.report["reconstruction"]["passes"] if p["pass"].startswith("obspa-refit")]
    assert "/rnn/GRU: a recurrent layer is not refit (pruned by its score only)" in rec["skipped"]
    assert rec["layers_refit"] == 1
