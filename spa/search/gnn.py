"""A GATv2 graph encoder in plain torch (no torch-geometric) over the env's group graph.

GATv2 (Brody, Alon & Yahav, "How attentive are graph attention networks?", 2022) scores an edge j -> i with the
attention vector applied *after* the non-linearity, so the ranking of neighbours can depend on the query node:

    e_ij   = a^T LeakyReLU(W [h_i || h_j || f_ij])  =  a^T LeakyReLU(W_dst h_i + W_src h_j + W_edge f_ij)
    alpha  = softmax_j(e_ij)                         (over the in-edges of i, self-loop included)
    h_i'   = sum_j alpha_ij W_src h_j                (per head; heads concatenated)

with edge features f_ij (AutoSculpt fuses its pattern information into them; ours are `graph.EDGE_FEATURES`).
The env's data-flow edges are directed; the encoder adds the reverse of every edge and a self-loop per node, with
two extra edge columns (`reverse`, `self`) so attention can tell them apart.

`GraphEncoder` stacks an input projection and `layers` GATv2 layers (residual + LayerNorm + ELU); optionally
(`multi_stage=True`) a second level in the spirit of GNN-RL's multi-stage GNN: nodes are pooled into *stages*
(groups whose source layers produce the same feature-map size, the resolution levels of a CNN), a GATv2 layer runs
on the stage graph and each node gets its stage's embedding added back. `pool` gives the graph embedding
(mean || max over nodes) a critic reads.

Inputs are the env's numpy observation; `GraphBatch.from_obs` turns it into tensors once per distinct graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .graph import EDGE_FEATURES, NODE_FEATURES

EXTRA_EDGE_FEATURES = ("reverse", "self")
EDGE_DIM = len(EDGE_FEATURES) + len(EXTRA_EDGE_FEATURES)
NODE_DIM = len(NODE_FEATURES)
_FMAP = NODE_FEATURES.index("fmap_log")


@dataclass
class GraphBatch:
    """One graph as tensors: node features (N, F), edges with reverse copies and self-loops (2, E'), edge
    features (E', Fe + 2), and the stage of every node (for the multi-stage level)."""

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_attr: torch.Tensor
    stage: torch.Tensor
    stage_edge_index: torch.Tensor
    stage_edge_attr: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @classmethod
    def from_obs(cls, obs: dict) -> GraphBatch:
        nodes = np.asarray(obs["nodes"], dtype=np.float32)
        ei = np.asarray(obs["edge_index"], dtype=np.int64).reshape(2, -1)
        ea = np.asarray(obs["edges"], dtype=np.float32).reshape(ei.shape[1], -1)
        index, attr = augment_edges(ei, ea, len(nodes))
        stage, s_index, s_attr = stages(nodes, ei, ea)
        return cls(torch.from_numpy(nodes), torch.from_numpy(index), torch.from_numpy(attr),
                   torch.from_numpy(stage), torch.from_numpy(s_index), torch.from_numpy(s_attr))


def augment_edges(edge_index: np.ndarray, edge_attr: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Forward edges, their reverses and one self-loop per node; columns `reverse` and `self` appended."""
    e, fe = edge_attr.shape
    fwd = np.concatenate([edge_attr, np.zeros((e, 2), np.float32)], axis=1)
    rev = np.concatenate([edge_attr, np.ones((e, 1), np.float32), np.zeros((e, 1), np.float32)], axis=1)
    loop = np.zeros((n, fe + 2), np.float32)
    loop[:, -1] = 1.0
    index = np.concatenate([edge_index, edge_index[::-1], np.tile(np.arange(n, dtype=np.int64), (2, 1))], axis=1)
    return np.ascontiguousarray(index), np.concatenate([fwd, rev, loop], axis=0)


def stages(nodes: np.ndarray, edge_index: np.ndarray, edge_attr: np.ndarray):
    """Stage of every node (nodes with the same feature-map size of their sources), the stage graph's edges
    (augmented like the node graph) and features (mean over the merged node edges)."""
    key = np.round(nodes[:, _FMAP].astype(np.float64), 4)
    _, stage = np.unique(key, return_inverse=True)
    stage = stage.astype(np.int64).reshape(-1)
    n_stages = int(stage.max(initial=-1)) + 1
    merged: dict[tuple[int, int], list[np.ndarray]] = {}
    for k in range(edge_index.shape[1]):
        a, b = int(stage[edge_index[0, k]]), int(stage[edge_index[1, k]])
        if a != b:
            merged.setdefault((a, b), []).append(edge_attr[k])
    pairs = sorted(merged)
    s_index = np.array(pairs, dtype=np.int64).T.reshape(2, -1)
    s_attr = np.array([np.mean(merged[p], axis=0) for p in pairs], dtype=np.float32).reshape(-1, edge_attr.shape[1])
    index, attr = augment_edges(s_index, s_attr, n_stages)
    return stage, index, attr


def segment_softmax(score: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Softmax of `score` (E, H) over the entries that share a target `index` (E,)."""
    idx = index.unsqueeze(1).expand_as(score)
    top = torch.full((n, score.shape[1]), -torch.inf, dtype=score.dtype)
    top = top.scatter_reduce(0, idx, score, reduce="amax", include_self=True)
    ex = torch.exp(score - top[index])
    den = torch.zeros((n, score.shape[1]), dtype=score.dtype).index_add_(0, index, ex)
    return ex / den[index].clamp_min(1e-16)


class GATv2Layer(nn.Module):
    """One multi-head GATv2 convolution with edge features; output heads * out_dim (concat) or out_dim (mean)."""

    def __init__(self, in_dim: int, out_dim: int, edge_dim: int, heads: int = 4, negative_slope: float = 0.2,
                 concat: bool = True):
        super().__init__()
        self.heads, self.out_dim, self.concat = heads, out_dim, concat
        self.lin_src = nn.Linear(in_dim, heads * out_dim)
        self.lin_dst = nn.Linear(in_dim, heads * out_dim)
        self.lin_edge = nn.Linear(edge_dim, heads * out_dim, bias=False)
        self.att = nn.Parameter(torch.empty(heads, out_dim))
        self.bias = nn.Parameter(torch.zeros(heads * out_dim if concat else out_dim))
        self.act = nn.LeakyReLU(negative_slope)
        nn.init.xavier_uniform_(self.att)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        n, h, c = x.shape[0], self.heads, self.out_dim
        src, dst = edge_index[0], edge_index[1]
        xs = self.lin_src(x).view(n, h, c)
        xd = self.lin_dst(x).view(n, h, c)
        m = xs[src] + xd[dst] + self.lin_edge(edge_attr).view(-1, h, c)
        score = (self.act(m) * self.att).sum(-1)                  # (E, H)
        alpha = segment_softmax(score, dst, n)
        self.last_attention = alpha.detach()
        out = torch.zeros((n, h, c), dtype=x.dtype).index_add_(0, dst, alpha.unsqueeze(-1) * xs[src])
        out = out.reshape(n, h * c) if self.concat else out.mean(1)
        return out + self.bias


class GraphEncoder(nn.Module):
    """Node embeddings (N, hidden) and a graph embedding (2 * hidden) of a `GraphBatch`."""

    def __init__(self, node_dim: int = NODE_DIM, edge_dim: int = EDGE_DIM, hidden: int = 64, heads: int = 4,
                 layers: int = 2, multi_stage: bool = False):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.hidden, self.multi_stage = hidden, multi_stage
        self.inp = nn.Sequential(nn.Linear(node_dim, hidden), nn.ELU())
        self.convs = nn.ModuleList(GATv2Layer(hidden, hidden // heads, edge_dim, heads) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        if multi_stage:
            self.stage_conv = GATv2Layer(hidden, hidden // heads, edge_dim, heads)
            self.stage_norm = nn.LayerNorm(hidden)
            self.stage_out = nn.Linear(hidden, hidden)
        self.act = nn.ELU()

    @property
    def out_dim(self) -> int:
        return self.hidden

    @property
    def pooled_dim(self) -> int:
        return 2 * self.hidden

    def forward(self, g: GraphBatch) -> torch.Tensor:
        h = self.inp(g.x)
        for conv, norm in zip(self.convs, self.norms):
            h = self.act(norm(h + conv(h, g.edge_index, g.edge_attr)))
        if self.multi_stage:
            n_stages = int(g.stage.max()) + 1
            count = torch.zeros(n_stages, dtype=h.dtype).index_add_(0, g.stage, torch.ones_like(g.stage, dtype=h.dtype))
            s = torch.zeros((n_stages, h.shape[1]), dtype=h.dtype).index_add_(0, g.stage, h) / count.unsqueeze(1)
            s = self.act(self.stage_norm(s + self.stage_conv(s, g.stage_edge_index, g.stage_edge_attr)))
            h = h + self.stage_out(s)[g.stage]
        return h

    @staticmethod
    def pool(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.mean(0), h.max(0).values])
