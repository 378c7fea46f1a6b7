"""Training-time batch normalization for fine-tuning (spa/finetune.py).

Exporters fold BatchNorm into the conv, and a deep conv net without it diverges under SGD at ordinary learning
rates (a BN-folded ResNet-20 did at lr 0.01). So every Conv whose output no normalization reads gets a
training-time BatchNorm, initialized to the identity (running statistics measured on the training data, scale =
their standard deviation, shift = their mean), and it is folded back into the conv's weight and bias at export:
the graph keeps its nodes (a conv without a bias gains a bias input).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

NORM_OPS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization")


@dataclass
class ConvSite:
    """A Conv whose output gets a training-time BatchNorm: its node, weight and (optional) bias initializers."""

    index: int  # position in model.graph.node (the same in the trained copy)
    node: onnx.NodeProto
    weight: str
    bias: str | None


def conv_sites(model: onnx.ModelProto, trainable: list[str]) -> list[ConvSite]:
    """Convs with trainable, unshared weight (and bias) whose output no normalization node reads."""
    uses: dict[str, int] = {}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for x in node.input:
            uses[x] = uses.get(x, 0) + 1
            readers.setdefault(x, []).append(node.op_type)
    wanted = set(trainable)
    sites = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = node.input[1]
        b = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if w not in wanted or uses[w] != 1 or (b is not None and (b not in wanted or uses[b] != 1)):
            continue
        if any(op in NORM_OPS for op in readers.get(node.output[0], [])):
            continue
        sites.append(ConvSite(index, node, w, b))
    return sites


def bn_modules(tg, sites: list[ConvSite], data, micro: int, limit: int = 256):
    """One nn.BatchNorm per site, initialized to the identity on (up to `limit` samples of) `data`."""
    import torch  # torch only when training: spa.finetune (and so this module) imports without it
    from torch import nn

    outs = {s.node.output[0] for s in sites}
    sums: dict[str, list] = {}

    def hook(node, _ins, res):
        o = node.output[0]
        if o in outs:
            t = res[0].detach().double().transpose(0, 1).reshape(res[0].shape[1], -1)
            acc = sums.setdefault(o, [0.0, 0.0, 0])
            acc[0] = acc[0] + t.sum(1)
            acc[1] = acc[1] + (t * t).sum(1)
            acc[2] += t.shape[1]

    n = min(data.n, limit)
    with torch.no_grad():
        for start in range(0, n, micro):
            tg.run({k: torch.from_numpy(np.ascontiguousarray(v[start:min(n, start + micro)]))
                    for k, v in data.inputs.items()}, hook=hook)
    bns = nn.ModuleDict()
    keys = {}
    for i, site in enumerate(sites):
        o = site.node.output[0]
        total, sq, count = sums[o]
        mean = total / count
        var = (sq / count - mean * mean).clamp_min(0)
        c = mean.numel()
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}.get(len(_kernel(tg, site)), nn.BatchNorm2d)(c)
        with torch.no_grad():
            bn.running_mean.copy_(mean.float())
            bn.running_var.copy_(var.float())
            bn.weight.copy_(torch.sqrt(var + bn.eps).float())
            bn.bias.copy_(mean.float())
        keys[o] = f"bn{i}"
        bns[keys[o]] = bn
    return bns, keys


def _kernel(tg, site: ConvSite) -> tuple:
    return tuple(tg.param(site.weight).shape[2:])


class Trainer:
    """The student as trained: the TorchGraph plus the training-time BatchNorms after their convs."""

    def __init__(self, tg, bns=None, keys=None):
        self.tg, self.bns, self.keys = tg, bns, keys or {}

    def train(self, mode: bool = True) -> None:
        self.tg.train(mode)
        if self.bns is not None:
            self.bns.train(mode)

    def outputs(self, feeds) -> list:
        res = self.tg.run(feeds, hook=self._normalize if self.keys else None)
        return [res[o] for o in self.tg.output_names]

    def _normalize(self, node, _inputs, outs):
        """TorchGraph.run hook: a site's conv output goes through its training-time BatchNorm."""
        key = self.keys.get(node.output[0])
        return None if key is None else [self.bns[key](outs[0]), *outs[1:]]


def fold_batchnorms(model: onnx.ModelProto, sites: list[ConvSite], bns, keys) -> None:
    """Fold each training-time BatchNorm (eval-mode statistics) into its conv's weight and bias, in place."""
    inits = {t.name: t for t in model.graph.initializer}
    taken = {t.name for t in model.graph.initializer} | {x for n in model.graph.node for x in n.output}
    for site in sites:
        node = model.graph.node[site.index]
        bn = bns[keys[node.output[0]]]
        scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().double().numpy()
        mean = bn.running_mean.detach().double().numpy()
        shift = bn.bias.detach().double().numpy()
        wt = inits[site.weight]
        w = numpy_helper.to_array(wt).astype(np.float64)
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(wt.data_type)
        wt.CopyFrom(numpy_helper.from_array(w.astype(dtype), site.weight))
        b = numpy_helper.to_array(inits[site.bias]).astype(np.float64) if site.bias else np.zeros_like(scale)
        b = (b - mean) * scale + shift
        if site.bias:
            inits[site.bias].CopyFrom(numpy_helper.from_array(b.astype(dtype), site.bias))
        else:
            name, k = f"{site.weight}_bias", 1
            while name in taken:
                name, k = f"{site.weight}_bias{k}", k + 1
            taken.add(name)
            model.graph.initializer.append(numpy_helper.from_array(b.astype(dtype), name))
            node.input.append(name)
