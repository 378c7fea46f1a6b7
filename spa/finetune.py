"""Fine-tune a (pruned) ONNX model in torch, optionally distilling from the original, and write ONNX back.

    spa-prune finetune pruned.onnx tuned.onnx --data train.npz --teacher original.onnx --epochs 5

The model runs as a TorchGraph (spa/torch_graph.py, our torch lowering of the ONNX operator set). Only
initializer *values* change: the output is the input file with new weights, so its inputs, outputs, nodes and
shapes are exactly the same (a deployment that loads the pruned model loads the tuned one).

Loss: with labels and a teacher, (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher_T || student_T) on
the class logits (Hinton et al.'s distillation; T = --kd-temperature, default 0.75 as RL-Pruner uses); labels
only: cross-entropy; teacher only: the distillation term alone. Outputs that are not class logits (not
[batch, classes] floats) are matched to the teacher by mean squared error scaled by the teacher's variance.
The teacher's outputs are computed once, in onnxruntime, before training.

What trains (`trainable='weights'`, the default): initializers in a weight position (Conv/ConvTranspose/Gemm
weight and bias, MatMul's constant operand, BatchNorm/LayerNorm/InstanceNorm/GroupNorm scale and bias, PRelu
slope) and float Add/Mul/Sub constants of two or more elements applied to a computed tensor (biases and scales of
decomposed layers). Scalar constants (epsilons, exponents, 1/sqrt(d)), shape constants, BatchNorm running
statistics and constants applied to a raw graph input (pre-processing) stay as they are. `trainable='all'`
trains every float initializer of two or more elements. BatchNorm nodes in the graph run with their stored
statistics and Dropout is the identity.

Batch normalization for training (`batchnorm=True`, the default): exporters fold BatchNorm into the conv, and a
deep conv net without it diverges under SGD at ordinary learning rates (a BN-folded ResNet-20 did at lr 0.01).
So every Conv whose output no normalization reads gets a training-time BatchNorm, initialized to the identity
(running statistics measured on the training data, scale = their standard deviation, shift = their mean), and
it is folded back into the conv's weight and bias at export: the graph keeps its nodes (a conv without a bias
gains a bias input). spa/train_batchnorm.py has these BatchNorms and the Trainer that runs them.

Validation (`--val FILE`, or `--val-split F` to hold out part of --data): accuracy (or agreement with the
teacher) and loss after every epoch; with it, the best epoch is what comes back (`--keep-best`, on by default),
epoch 0 - the model as given - included: a model that OBSPA already reconstructed well is not made worse by a
fine-tuning run that does not help it.

After training the ONNX model is rebuilt, checked (onnx.checker full check), run in onnxruntime and compared
with the torch module on a batch; only then is it written (atomically).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from spa.operators.weights import BIAS_INPUT, WEIGHT_INPUT
from spa.passes.verify import run_many

from .calib import Calib, input_specs, load_calib
from .driver import check_output_path
from .errors import SpaError, VerificationError
from .execution import batch_size_for
from .fileio import atomic_write
from .ir import Graph, load_model, save_model
from .train_batchnorm import ConvSite, Trainer, bn_modules, conv_sites, fold_batchnorms

# trainable slots: wider than the weight-layer table (norm affines, PRelu, either MatMul operand, any constness)
WEIGHT_SLOTS = {
    **{op: (WEIGHT_INPUT[op], BIAS_INPUT[op]) for op in BIAS_INPUT}, "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2), "GroupNormalization": (1, 2),
    "PRelu": (1,), "MatMul": (0, 1),
}
BIAS_OPS = ("Add", "Mul", "Sub")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16)


def trainable_initializers(model: onnx.ModelProto, mode: str = "weights") -> list[str]:
    """Names of the initializers fine-tuning may change (see the module docstring), in file order."""
    if mode not in ("weights", "all"):
        raise SpaError(f"unknown trainable set '{mode}' (choose from: weights, all)")
    g = model.graph
    inits = {t.name: t for t in g.initializer if t.data_type in FLOAT_TYPES}
    big = {n for n, t in inits.items() if math.prod(t.dims) >= 2}
    if mode == "all":
        return [t.name for t in g.initializer if t.name in big]
    raw_inputs = {i.name for i in g.input} - set(inits)
    chosen: set[str] = set()
    for node in g.node:
        if node.op_type in WEIGHT_SLOTS and node.domain in ("", "ai.onnx"):
            chosen.update(node.input[i] for i in WEIGHT_SLOTS[node.op_type]
                          if i < len(node.input) and node.input[i] in inits)
        elif node.op_type in BIAS_OPS and len(node.input) == 2:
            a, b = node.input
            for const, other in ((a, b), (b, a)):
                if const in big and other not in inits and other not in raw_inputs:
                    chosen.add(const)
    return [t.name for t in g.initializer if t.name in chosen]


# ---- data ------------------------------------------------------------------------------------------------------

def _load(path_or_calib, model: onnx.ModelProto, what: str):
    if path_or_calib is None or isinstance(path_or_calib, Calib):
        return path_or_calib
    data = load_calib(str(path_or_calib), input_specs(model))
    if data.n < 1:
        raise SpaError(f"{what} data {path_or_calib} has no samples")
    return data


def _samples_per_run(proto: onnx.ModelProto, data, batch_size: int) -> int:
    """`batch_size`, or the export's fixed batch (often 1) when its reshapes bake that batch in; the gradients
    of a batch are then accumulated over runs of that size (execution.batch_size_for probes it)."""
    return batch_size_for(Graph(proto), batch_size, data.inputs)[0]


def _run_ort(model: onnx.ModelProto, data, batch: int) -> list[np.ndarray]:
    """Every output of `model` on every sample of `data`, in onnxruntime, concatenated over batches."""
    draws = [feeds for feeds, _ in data.batches(batch)]
    outs = run_many(model, draws, what="reference")
    return [np.concatenate([o[i] for o in outs]) for i in range(len(model.graph.output))]


# ---- training --------------------------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    model: onnx.ModelProto
    report: dict
    history: list[dict] = field(default_factory=list)


def _is_logits(arr: np.ndarray) -> bool:
    return arr.ndim == 2 and arr.shape[1] >= 2 and np.issubdtype(arr.dtype, np.floating)


def _loss_fn(n_outputs: int, logits_index: int | None, alpha: float, temperature: float, teacher_var):
    import torch.nn.functional as F

    def loss(outs, labels, teach):
        parts = {}
        total = 0.0
        if labels is not None and logits_index is not None:
            ce = F.cross_entropy(outs[logits_index], labels)
            parts["ce"] = ce
            total = total + (1 - alpha if teach is not None else 1.0) * ce
        if teach is not None:
            kd = 0.0
            for i in range(n_outputs):
                s, t = outs[i].float(), teach[i]
                if i == logits_index:
                    kd = kd + F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                                       reduction="batchmean", log_target=True) * temperature ** 2
                else:
                    kd = kd + F.mse_loss(s, t) / teacher_var[i]
            parts["kd"] = kd
            total = total + (alpha if labels is not None and logits_index is not None else 1.0) * kd
        return total, parts

    return loss


def finetune(student, output=None, *, data, teacher=None, val=None, epochs: int = 5, lr: float = 0.01,
             batch_size: int = 64, optimizer: str = "sgd", weight_decay: float = 5e-4, momentum: float = 0.9,
             kd_alpha: float | None = None, kd_temperature: float = 0.75, trainable: str = "weights",
             batchnorm: bool = True, seed: int = 0, curve=None, progress=None, threads: int | None = None,
             val_split: float = 0.0, keep_best: bool | None = None) -> FinetuneResult:
    """Train `student` (ONNX path or ModelProto) on `data` (.npz path or spa.calib.Calib with the inputs keyed by
    input name and optional int `labels`), distilling from `teacher` (ONNX path/ModelProto) when given.

    kd_alpha: weight of the distillation term when labels exist (default 0.5 with a teacher). Without labels
    the loss is distillation only. `val`: data for per-epoch validation (accuracy when it has labels, top-1
    agreement with the teacher otherwise). `val_split`: hold out this fraction of `data` (seeded, per class when
    labelled) as the validation data instead. `keep_best` (default: on when there is validation data): return
    the weights of the epoch with the best validation accuracy/agreement (ties: the lower validation loss),
    epoch 0 - the model as given - included, so fine-tuning never hands back a model that does worse on the
    validation data than its input. `curve`: PNG path for the loss/accuracy curve. `progress(text, line)` is
    called during training (line=True for the per-epoch summaries). Writes `output` (if given) only after the
    checks passed."""
    import torch  # here, not at the top: spa.cli.finetune imports this module (its docstring) without torch

    _check_numbers(epochs, lr, batch_size, weight_decay, momentum, kd_alpha, kd_temperature)
    if optimizer not in ("sgd", "adam"):
        raise SpaError(f"unknown optimizer '{optimizer}' (choose from: sgd, adam)")
    for path in (output, curve):
        if path is not None:
            check_output_path(path)
    say = progress or (lambda text, line=False: None)
    t_start = time.perf_counter()
    run = _load_run(student, teacher, data, val, val_split, keep_best, seed)
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)

    st = _build_student(run, trainable, batchnorm, batch_size, say)
    st.net.train(False)  # evaluation before training must not move the BatchNorm statistics
    say("teacher")
    goal = _build_goal(run, st, kd_alpha, kd_temperature)
    best = _BestEpoch(st.net, st.names) if run.keep_best else None
    opt, sched = _optimizer(st.params, optimizer, lr, momentum, weight_decay,
                            max(1, epochs * math.ceil(run.train.n / batch_size)))
    history = _train(run, st, goal, best, opt, sched, epochs, batch_size, seed, say)
    tuned, check = _export(run, st, best, history, curve, output, say)
    report = {
        "student": str(student) if not isinstance(student, onnx.ModelProto) else "<model>",
        "teacher": (str(teacher) if not isinstance(teacher, onnx.ModelProto) else "<model>") if teacher else None,
        "output": str(output) if output else None,
        "samples": run.train.n, "val_samples": run.valid.n if run.valid is not None else 0, "val_split": val_split,
        "keep_best": run.keep_best, "best_epoch": best.epoch if best else epochs,
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "micro_batch": st.micro, "optimizer": optimizer,
        "weight_decay": weight_decay, "kd_alpha": goal.alpha if run.tproto is not None else None,
        "kd_temperature": kd_temperature if run.tproto is not None else None,
        "loss": ("ce+kd" if run.train.labels is not None else "kd") if run.tproto is not None else "ce",
        "trainable": {"mode": trainable, "initializers": len(st.names),
                      "parameters": int(sum(p.numel() for p in st.params))},
        "training_batchnorms": len(st.sites), "notes": st.notes,
        "history": history, "export_check": check, "curve": str(curve) if curve else None,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    return FinetuneResult(tuned, report, history)


# ---- setup: the models and data, the student, the loss -----------------------------------------------------------

@dataclass
class _Run:
    """The student and teacher models and the training and validation data, loaded and checked."""

    proto: onnx.ModelProto
    tproto: onnx.ModelProto | None
    train: Calib
    valid: Calib | None
    keep_best: bool


def _load_run(student, teacher, data, val, val_split: float, keep_best: bool | None, seed: int) -> _Run:
    proto = student if isinstance(student, onnx.ModelProto) else load_model(str(student))
    tproto = None
    if teacher is not None:
        tproto = teacher if isinstance(teacher, onnx.ModelProto) else load_model(str(teacher))
        _same_interface(proto, tproto)
    train = _load(data, proto, "training")
    if train is None:
        raise SpaError("fine-tuning needs training data (--data FILE.npz or an image folder)")
    valid = _load(val, proto, "validation")
    if not 0.0 <= val_split < 1.0:
        raise SpaError(f"--val-split must be in [0, 1), got {val_split}")
    if val_split > 0:
        if valid is not None:
            raise SpaError("give either validation data (--val) or --val-split, not both")
        train, valid = split_holdout(train, val_split, seed)
    keep_best = valid is not None if keep_best is None else bool(keep_best)
    if keep_best and valid is None:
        raise SpaError("--keep-best needs validation data (--val or --val-split)")
    if train.labels is None and tproto is None:
        raise SpaError("fine-tuning needs labels in the training data or a teacher model (--teacher)")
    return _Run(proto, tproto, train, valid, keep_best)


@dataclass
class _Student:
    """The student as trained: its TorchGraph, the trainable initializers and parameters, the micro-batch."""

    tg: object  # spa.torch_graph.TorchGraph
    names: list[str]
    params: list
    micro: int
    net: Trainer
    sites: list[ConvSite]
    notes: list[str]


def _build_student(run: _Run, trainable: str, batchnorm: bool, batch_size: int, say) -> _Student:
    from .torch_graph import TorchGraph  # torch: imported on use (see finetune)

    proto, train = run.proto, run.train
    tg = TorchGraph(proto)
    names = trainable_initializers(proto, trainable)
    if not names:
        raise SpaError("the model has no trainable weights (no Conv/Gemm/MatMul/normalization parameters)")
    for name, p in tg.param_names.items():
        p.requires_grad_(name in names)
    params = [tg.param(n) for n in names]
    micro = min(_samples_per_run(proto, train, batch_size), batch_size)
    student_net = Trainer(tg)
    notes = []
    sites = conv_sites(proto, names) if batchnorm else []
    if sites and micro < min(batch_size, train.n):
        notes.append(f"no training-time BatchNorm: the export runs {micro} sample(s) at a time")
        sites = []
    if sites:
        say("batchnorm")
        bns, keys = bn_modules(tg, sites, train, micro)
        student_net = Trainer(tg, bns, keys)
        params = params + list(bns.parameters())
    return _Student(tg, names, params, micro, student_net, sites, notes)


@dataclass
class _Goal:
    """What the student is trained towards: the teacher's outputs (onnxruntime, computed once), which output
    is the class logits, and the loss."""

    teach_all: list | None
    val_teacher: list | None
    logits_index: int | None
    alpha: float
    loss_fn: object


def _build_goal(run: _Run, st: _Student, kd_alpha: float | None, kd_temperature: float) -> _Goal:
    train, tproto, micro = run.train, run.tproto, st.micro
    teach_all = _run_ort(tproto, train, micro) if tproto is not None else None
    probe = teach_all if teach_all is not None else [o.numpy() for o in _outputs(st.net, train, 0, min(2, train.n), micro)]
    logits_index = next((i for i, o in enumerate(probe) if _is_logits(o)), None)
    if train.labels is not None and logits_index is None:
        raise SpaError("the training data has labels but no model output is [batch, classes] logits")
    if train.labels is not None and int(train.labels.max()) >= probe[logits_index].shape[1]:
        raise SpaError(f"label {int(train.labels.max())} is out of range for {probe[logits_index].shape[1]} "
                       "classes")
    teacher_var = [max(float(np.var(o)), 1e-12) for o in teach_all] if teach_all is not None else None
    alpha = (0.5 if kd_alpha is None else kd_alpha) if tproto is not None else 0.0
    loss_fn = _loss_fn(len(st.tg.output_names), logits_index, alpha, kd_temperature, teacher_var)
    val_teacher = _run_ort(tproto, run.valid, micro) if (tproto is not None and run.valid is not None) else None
    return _Goal(teach_all, val_teacher, logits_index, alpha, loss_fn)


def _optimizer(params: list, optimizer: str, lr: float, momentum: float, weight_decay: float, total_steps: int):
    """The optimizer and its cosine learning-rate schedule over `total_steps` steps."""
    import torch  # see finetune

    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    return opt, sched


# ---- the training loop -------------------------------------------------------------------------------------------

def _evaluate(st: _Student, goal: _Goal, d, teach_outs, with_loss: bool = False) -> dict:
    """Accuracy (with labels) and agreement with the teacher (with teacher outputs) of the student on `d`,
    and its loss when asked."""
    import torch  # see finetune

    if d is None:
        return {}
    raw = _outputs(st.net, d, 0, d.n, st.micro)
    outs = [o.numpy() for o in raw]
    m = {}
    if goal.logits_index is not None and d.labels is not None:
        m["accuracy"] = float((outs[goal.logits_index].argmax(1) == d.labels).mean())
    if teach_outs is not None and goal.logits_index is not None:
        m["agreement"] = float((outs[goal.logits_index].argmax(1) == teach_outs[goal.logits_index].argmax(1)).mean())
    if with_loss:
        labels = None if d.labels is None else torch.from_numpy(d.labels.astype(np.int64))
        teach = None if teach_outs is None else [torch.from_numpy(t).float() for t in teach_outs]
        m["loss"] = float(goal.loss_fn(raw, labels, teach)[0])
    return m


def _validate(run: _Run, st: _Student, goal: _Goal) -> dict:
    return {f"val_{k}": v for k, v in _evaluate(st, goal, run.valid, goal.val_teacher, with_loss=True).items()}


def _train(run: _Run, st: _Student, goal: _Goal, best, opt, sched, epochs: int, batch_size: int, seed: int,
           say) -> list[dict]:
    """Epoch 0 (the model as given) evaluated, then `epochs` epochs of training, each validated; the history."""
    train = run.train
    gen = np.random.default_rng(seed)
    history = [{"epoch": 0, **_validate(run, st, goal),
                **{f"train_{k}": v for k, v in _evaluate(st, goal, train, goal.teach_all).items()}}]
    if best:
        best.offer(history[0])
    say(f"epoch 0/{epochs}: " + _fmt(history[0]), line=True)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        st.net.train(True)
        loss_sum, seen, correct = _train_epoch(run, st, goal, opt, sched, gen.permutation(train.n), batch_size,
                                               lambda text, epoch=epoch: say(f"epoch {epoch}/{epochs} {text}"))
        st.net.train(False)
        row = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "seconds": round(time.perf_counter() - t0, 2)}
        if train.labels is not None:
            row["train_accuracy"] = correct / max(seen, 1)
        row.update(_validate(run, st, goal))
        history.append(row)
        if best:
            best.offer(row)
        say(f"epoch {epoch}/{epochs}: " + _fmt(row), line=True)
    return history


def _train_epoch(run: _Run, st: _Student, goal: _Goal, opt, sched, order: np.ndarray, batch_size: int,
                 say) -> tuple[float, int, int]:
    """One pass over the training data in `order`, a step per batch (gradients accumulated over micro-batches):
    the summed loss, the samples seen and the correct top-1 predictions (with labels)."""
    import torch  # see finetune

    train, micro, teach_all = run.train, st.micro, goal.teach_all
    steps_per_epoch = math.ceil(train.n / batch_size)
    seen, loss_sum, correct = 0, 0.0, 0
    for b in range(steps_per_epoch):
        idx = np.sort(order[b * batch_size:(b + 1) * batch_size])
        opt.zero_grad(set_to_none=True)
        for start in range(0, len(idx), micro):
            part = idx[start:start + micro]
            feeds = {k: torch.from_numpy(np.ascontiguousarray(v[part])) for k, v in train.inputs.items()}
            outs = st.net.outputs(feeds)
            labels = None if train.labels is None else torch.from_numpy(train.labels[part].astype(np.int64))
            teach = None if teach_all is None else [torch.from_numpy(t[part]).float() for t in teach_all]
            loss, _ = goal.loss_fn(outs, labels, teach)
            (loss * (len(part) / len(idx))).backward()
            loss_sum += float(loss.detach()) * len(part)
            if labels is not None:
                correct += int((outs[goal.logits_index].detach().argmax(1) == labels).sum())
            seen += len(part)
        opt.step()
        sched.step()
        say(f"{_bar(b + 1, steps_per_epoch)} loss {loss_sum / max(seen, 1):.4f}")
    return loss_sum, seen, correct


# ---- back to ONNX ------------------------------------------------------------------------------------------------

def _export(run: _Run, st: _Student, best, history: list[dict], curve, output, say):
    """Same graph, new initializer values (the best epoch's with keep-best, training BatchNorms folded in);
    checked before anything is written. The tuned model and the export check."""
    say("export")
    st.net.train(False)
    if best:
        best.restore()
        say(f"kept epoch {best.epoch} (best on validation)", line=True)
    tuned = _with_weights(run.proto, st.tg, st.names)
    if st.sites:
        fold_batchnorms(tuned, st.sites, st.net.bns, st.net.keys)
    check = _check_export(tuned, st.net, run.valid or run.train, st.micro)
    if curve:
        plot_curve(history, curve)
    if output is not None:
        try:
            save_model(tuned, output)
        except OSError as e:
            raise SpaError(f"cannot write {output}: {e.strerror or e}")
    return tuned, check


def split_holdout(data, fraction: float, seed: int = 0):
    """(train, validation): `fraction` of the samples held out, seeded; per class when labelled, so every class
    keeps its share on both sides. At least one sample on each side."""
    rng = np.random.default_rng(seed)
    if data.labels is not None:
        held = [rng.permutation(np.flatnonzero(data.labels == c))[:round(fraction * int((data.labels == c).sum()))]
                for c in np.unique(data.labels)]
        held = np.concatenate(held)
    else:
        held = rng.permutation(data.n)[:round(fraction * data.n)]
    mask = np.zeros(data.n, dtype=bool)
    mask[held] = True
    if mask.all() or not mask.any():
        raise SpaError(f"--val-split {fraction} of {data.n} samples leaves one side empty")

    def part(m):
        return Calib({k: v[m] for k, v in data.inputs.items()}, None if data.labels is None else data.labels[m],
                     data.source, data.classes, data.skipped)
    return part(~mask), part(mask)


class _BestEpoch:
    """The trainable state of the best epoch so far by validation: accuracy (else agreement with the teacher),
    then the lower validation loss. A copy of the weights is taken only when an epoch becomes the best."""

    def __init__(self, net: Trainer, names: list[str]):
        self.net, self.names = net, names
        self.key, self.epoch, self.state = None, None, None

    def offer(self, row: dict) -> None:
        metric = row.get("val_accuracy", row.get("val_agreement", 0.0))
        key = (metric, -row.get("val_loss", 0.0))
        if self.key is None or key > self.key:
            self.key, self.epoch = key, row["epoch"]
            self.state = ({n: self.net.tg.param(n).detach().clone() for n in self.names},
                          None if self.net.bns is None else copy.deepcopy(self.net.bns.state_dict()))

    def restore(self) -> None:
        import torch
        params, bns = self.state
        with torch.no_grad():
            for n, t in params.items():
                self.net.tg.param(n).copy_(t)
        if bns is not None:
            self.net.bns.load_state_dict(bns)


def _outputs(net: Trainer, data, start: int, stop: int, micro: int = 0):
    """The student's outputs on samples [start, stop) without gradients, concatenated over micro-batches."""
    import torch
    micro = micro or (stop - start)
    chunks = []
    with torch.no_grad():
        for s in range(start, stop, micro):
            chunks.append(net.outputs({k: torch.from_numpy(np.ascontiguousarray(v[s:min(stop, s + micro)]))
                                       for k, v in data.inputs.items()}))
    return [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def _with_weights(proto: onnx.ModelProto, tg, names: list[str]) -> onnx.ModelProto:
    values = tg.state_dict_onnx()
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    wanted = set(names)
    for i, t in enumerate(out.graph.initializer):
        if t.name in wanted:
            arr = np.asarray(values[t.name]).astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr.reshape(tuple(t.dims)), t.name))
    return out


def _check_export(tuned: onnx.ModelProto, net: Trainer, data, micro: int, rtol: float = 1e-4) -> dict:
    """Full checker, a run in onnxruntime, and agreement with the torch module on a few samples."""
    try:
        onnx.checker.check_model(tuned, full_check=True)
    except Exception as e:  # noqa: BLE001 - any checker failure means we must not write the model
        raise VerificationError(f"the fine-tuned model fails onnx.checker: {str(e).splitlines()[0][:300]}")
    sub = data.subset(max(micro, 8))  # all of it when smaller
    ort_out = run_many(tuned, [feeds for feeds, _ in sub.batches(micro)])
    torch_out = _outputs(net, sub, 0, sub.n, micro)
    worst = 0.0
    for i, t in enumerate(torch_out):
        a = np.concatenate([o[i] for o in ort_out]).astype(np.float64)
        b = t.numpy().astype(np.float64)
        worst = max(worst, float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12)))
    if worst > rtol:
        raise VerificationError(f"the fine-tuned model in onnxruntime differs from the trained torch module by "
                                f"{worst:.2e} (relative) > {rtol}")
    return {"checker": "full", "onnxruntime_vs_torch_max_rel_error": worst, "samples": int(sub.n)}


def _same_interface(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    ia, ib = input_specs(a), input_specs(b)
    if set(ia) != set(ib):
        raise SpaError(f"the teacher's inputs {sorted(ib)} differ from the student's {sorted(ia)}")
    if len(a.graph.output) != len(b.graph.output):
        raise SpaError(f"the teacher has {len(b.graph.output)} outputs, the student {len(a.graph.output)}")


def _check_numbers(epochs, lr, batch_size, weight_decay, momentum, kd_alpha, kd_temperature) -> None:
    if int(epochs) != epochs or epochs < 0:
        raise SpaError(f"--epochs must be a whole number >= 0, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise SpaError(f"--lr must be a positive number, got {lr}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise SpaError(f"--batch-size must be at least 1, got {batch_size}")
    if weight_decay < 0 or not (0 <= momentum < 1):
        raise SpaError(f"--weight-decay must be >= 0 and --momentum in [0, 1), got {weight_decay}, {momentum}")
    if kd_alpha is not None and not 0 <= kd_alpha <= 1:
        raise SpaError(f"--kd-alpha must be in [0, 1], got {kd_alpha}")
    if not kd_temperature > 0:
        raise SpaError(f"--kd-temperature must be positive, got {kd_temperature}")


def _bar(done: int, total: int, width: int = 20) -> str:
    k = int(width * done / max(total, 1))
    return "[" + "#" * k + "." * (width - k) + f"] {done}/{total}"


def _fmt(row: dict) -> str:
    keys = [k for k in row if k not in ("epoch",)]
    return ", ".join(f"{k} {row[k]:.4f}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in keys)


def plot_curve(history: list[dict], path) -> None:
    """Loss and accuracy per epoch as a PNG (matplotlib, Agg)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpaError("the training curve needs matplotlib: pip install matplotlib (or pass --no-curve)")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    rows = [r for r in history if "loss" in r]
    ax1.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], "o-", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for key, style in (("train_accuracy", "o-"), ("val_accuracy", "s-"), ("val_agreement", "^--")):
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        if pts:
            ax2.plot(*zip(*pts), style, label=key.replace("_", " "))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("top-1")
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)







