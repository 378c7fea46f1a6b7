"""The pattern search's agent (AutoSculpt): a GATv2 encoder over the group graph whose edges - the convolutions -
carry the pattern information, a per-layer categorical policy over `sculpt.LEVELS`, trained with PPO-Clip on
reward = quality + alpha * (1 - pattern-aware MACs kept), alpha learned.

Graph: the channel search's `GroupGraph` (nodes = coupled channel groups, i.e. feature maps; an edge A -> B = the
layer(s) creating B from A), so a convolution is an edge, as in AutoSculpt. Each edge's features are the channel
graph's `EDGE_FEATURES` followed by `PATTERN_EDGE_FEATURES`, the mean over the patterned convs on that edge (zeros
where none): MAC share, log2 kernel positions / 4, the share of the weight energy the best pattern per kernel keeps
at K = 1..6, and a flag. The actor reads, per patterned conv, [h(source group) || h(target group) || the conv's
own pattern features || target] and outputs logits over the levels, plus a fixed prior (below).

PPO-Clip: `batch` sampled assignments per update (each one evaluation), advantages = the standardised training
rewards of the batch (one-step episodes: the batch mean is the baseline), `epochs` clipped passes; with
`eval_mean` the most likely assignment is evaluated once per update. `warm` evaluations first score uniform
assignments (`sculpt.uniform_search`'s order) and the prior puts `prior` logits on the best one, so the policy
starts at the best uniform assignment (as `ppo-gnn` starts from the uniform allocation) and explores around it.

Learned alpha: the paper (AutoSculpt) says only that alpha is learnable and balances FLOPs against accuracy. Here,
after every batch, log alpha moves by `alpha_lr` towards the value at which alpha * spread(1 - MACs kept) over the
batch is `alpha_share` of the spread of the quality (`ppo_gnn.adapt_alpha`, the channel agent's rule); it shapes
the training reward only, the logged reward (and the best candidate) is the evaluator's.
"""
from __future__ import annotations

import numpy as np

from .graph import _GroupLocator
from .ppo_gnn import adapt_alpha, torch_session
from .sculpt import LEVELS, PatternSearch, _uniform_rank, pattern_policy

PATTERN_EDGE_FEATURES = ("mac_share", "kernel_log", *(f"energy_k{k}" for k in range(1, 7)), "patterned")


def layer_edges(problem, space) -> list[tuple[int, int]]:
    """(input group, output group) of every patterned conv (-1 where its channels belong to no group)."""
    an = problem.analysis
    where = _GroupLocator(an)
    by_node = {}
    for s in an.ctx.sources:
        groups = where.groups_of(s.atoms)
        if len(groups):
            by_node.setdefault(s.node, int(np.bincount(groups).argmax()))
    g = problem.model.graph
    out = []
    for lay in space.layers:
        node = next(n for n in g.nodes if n.name == lay.name)
        lab = an.ctx.labels.get(node.input[0])
        src = where.groups_of(lab.atoms) if lab is not None else np.zeros(0, np.int64)
        out.append((int(np.bincount(src).argmax()) if len(src) else -1, by_node.get(lay.name, -1)))
    return out


def pattern_graph(problem, space, edges: list[tuple[int, int]]) -> dict:
    """The encoder's observation: node features, edges with the pattern columns appended."""
    gg = problem.graph
    n = gg.num_nodes
    nodes = gg.node_features(np.ones(n), np.zeros(n), np.zeros(n), None, 0.0, 0.0)
    feats = np.concatenate([space.layer_features(), np.ones((len(space.layers), 1), np.float32)], 1)
    extra = np.zeros((gg.num_edges, len(PATTERN_EDGE_FEATURES)), np.float32)
    count = np.zeros(gg.num_edges)
    pos = {(int(a), int(b)): i for i, (a, b) in enumerate(gg.edge_index.T)}
    for f, e in zip(feats, edges):
        i = pos.get(e)
        if i is not None:
            extra[i] += f
            count[i] += 1
    extra /= np.maximum(count, 1)[:, None]
    return {"nodes": nodes, "edge_index": gg.edge_index, "edges": np.concatenate([gg.edge_attr, extra], 1)}


class SculptPPO:
    def __init__(self, hidden: int = 32, heads: int = 4, layers: int = 2, batch: int = 8, epochs: int = 8,
                 clip: float = 0.2, lr: float = 3e-3, entropy_coef: float = 0.01, max_grad_norm: float = 1.0,
                 warm: int = 7, prior: float = 3.0, eval_mean: bool = True, alpha: float = 0.0,
                 alpha_share: float = 0.1, alpha_lr: float = 0.5, threads: int | None = 1):
        self.options = dict(hidden=hidden, heads=heads, layers=layers, batch=batch, epochs=epochs, clip=clip, lr=lr,
                            entropy_coef=entropy_coef, max_grad_norm=max_grad_norm, warm=warm, prior=prior,
                            eval_mean=eval_mean, alpha=alpha, alpha_share=alpha_share, alpha_lr=alpha_lr,
                            threads=threads)
        self.alpha_trace: list[float] = []

    def search(self, run: PatternSearch, problem, evals: int, seed: int = 0) -> dict:
        with torch_session(seed, self.options["threads"]):
            self._search(run, problem, evals)
        return {"alpha": self.alpha_trace}

    def _search(self, run: PatternSearch, problem, evals: int) -> None:
        import torch
        from torch import nn

        from .gnn import EDGE_DIM, GraphBatch, GraphEncoder

        o = self.options
        space = run.space
        nl, nv = len(space.layers), len(LEVELS)
        # warm start: the most promising uniform assignments
        prior = torch.zeros(nv)
        order = sorted(range(nv), key=lambda lv: _uniform_rank(space, lv))
        warm = {lv: run.evaluate([lv] * nl)[0] for lv in order[:min(o["warm"], max(evals - 1, 0))]}
        if warm:
            prior[max(warm, key=warm.get)] = o["prior"]
        edges = layer_edges(problem, space)
        g = GraphBatch.from_obs(pattern_graph(problem, space, edges))
        feats = torch.from_numpy(np.concatenate([space.layer_features(),
                                                 np.full((nl, 1), space.target, np.float32)], 1))
        src = torch.tensor([max(a, 0) for a, _ in edges])
        dst = torch.tensor([max(b, 0) for _, b in edges])
        has = torch.tensor([[a >= 0, b >= 0] for a, b in edges], dtype=torch.float32)
        enc = GraphEncoder(edge_dim=EDGE_DIM + len(PATTERN_EDGE_FEATURES), hidden=o["hidden"], heads=o["heads"],
                           layers=o["layers"])
        head = nn.Sequential(nn.Linear(2 * o["hidden"] + feats.shape[1], o["hidden"]), nn.Tanh(),
                             nn.Linear(o["hidden"], nv))
        nn.init.zeros_(head[-1].weight)
        nn.init.zeros_(head[-1].bias)
        params = list(enc.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=o["lr"])

        def logits():
            h = enc(g)
            x = torch.cat([h[src] * has[:, :1], h[dst] * has[:, 1:], feats], 1)
            return head(x) + prior                                          # (layers, levels)

        alpha = float(o["alpha"])
        while run.evaluations < evals:
            room = evals - run.evaluations - (1 if o["eval_mean"] and evals - run.evaluations > 1 else 0)
            with torch.no_grad():
                dist = torch.distributions.Categorical(logits=logits())
                acts = [dist.sample() for _ in range(min(o["batch"], max(room, 1)))]
            quality, slack = [], []
            for a in acts:
                r, m, _ = run.evaluate(a.numpy())
                quality.append(r)
                slack.append(1.0 - float(m["flops"]))
            if o["eval_mean"] and run.evaluations < evals:
                with torch.no_grad():
                    run.evaluate(logits().argmax(1).numpy())
            if run.evaluations >= evals:
                break
            quality, slack = np.asarray(quality), np.asarray(slack)
            alpha = adapt_alpha(alpha, quality, slack, o["alpha_share"], o["alpha_lr"])
            self.alpha_trace.append(alpha)
            train = quality + alpha * slack
            adv = torch.tensor(train - train.mean(), dtype=torch.float32)
            if len(adv) < 2 or float(adv.std()) < 1e-12:
                continue
            adv = adv / adv.std()
            acts_t = torch.stack(acts)                                       # (B, layers)
            with torch.no_grad():
                old = torch.distributions.Categorical(logits=logits()).log_prob(acts_t).sum(1)
            for _ in range(o["epochs"]):
                dist = torch.distributions.Categorical(logits=logits())
                ratio = torch.exp(dist.log_prob(acts_t).sum(1) - old)
                surrogate = torch.min(ratio * adv, ratio.clamp(1 - o["clip"], 1 + o["clip"]) * adv)
                loss = -surrogate.mean() - o["entropy_coef"] * dist.entropy().sum()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, o["max_grad_norm"])
                opt.step()


@pattern_policy("ppo-gnn")
def ppo_search(run: PatternSearch, problem, evals: int, seed: int = 0, **options) -> dict:
    return SculptPPO(**options).search(run, problem, evals, seed)
