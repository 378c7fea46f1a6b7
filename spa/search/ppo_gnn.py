"""`ppo-gnn`: an actor-critic over the GATv2 group-graph encoder, trained with PPO-Clip (GNN-RL, AutoSculpt).

One-shot episodes: the actor reads the env's observation (node features, edges with features, globals) through
`gnn.GraphEncoder` and outputs, per action group, the mean of a Gaussian over the *logit* of the group's keep
ratio (state-independent learnable std). A sample z gives ratios sigmoid(z), which the env's adapter projects onto
the budget (`BudgetProjector.project`: a common logit shift, so only the relative logits matter - the means are
centred over the action groups and bounded by `mean_scale`). Each episode is one candidate, one evaluation; the
`batch` rollout episodes of an update are evaluated together (`env.step_many`: in parallel on a Ray cluster).

Episodes are one step long, so GAE reduces to advantage = reward - V(s): the critic (its own encoder,
mean || max pooling, plus the globals) is the baseline (`advantage="moving"` uses a moving average of the rewards
instead). With `iterative=True` the env plays GNN-RL's iterative episodes (`steps` re-graphing steps, reward at the
last, see `env.py`): every step is a PPO sample on the graph of the model pruned so far, the advantage is GAE over
the episode (`gamma`, `gae_lambda`; the value target is the lambda-return), and a one-step episode is exactly the
one-shot case. Rewards are standardised with running statistics; advantages are normalised per batch. Every `batch`
episodes, `epochs` passes of PPO-Clip (clip 0.2) over the batch. With `eval_mean`, the deterministic action (the
means) is evaluated once per update: the search returns the best candidate seen, and late in training the mean is
usually it (these evaluations count against `evals`).

Options (constructor keywords / `policy_options`), defaults in brackets:

    hidden [64], heads [4], layers [2]      encoder width, attention heads, GATv2 layers
    multi_stage [False]                     GNN-RL-style stage level in the encoder (`gnn.py`)
    batch [8], epochs [16], clip [0.2]      episodes per update, PPO passes per update, PPO-Clip epsilon
    lr [1e-3], value_coef [0.5], entropy_coef [0.0], max_grad_norm [1.0]
    init_std [0.5], min_std [0.05]          exploration std of the logits (learnable, floored)
    mean_scale [3.0]                        |centred mean logit| bound (tanh)
    advantage ["critic"]                    "critic" (r - V(s)) or "moving" (r - moving average)
    eval_mean [True]                        evaluate the deterministic action once per update
    learn_alpha [False], alpha [0.0], alpha_share [0.1], alpha_lr [0.5]
                                            AutoSculpt's learnable alpha: the training reward gets + alpha *
                                            (1 - FLOPs kept); alpha is adapted each update so that term's spread
                                            over the batch is `alpha_share` of the reward's spread (see below)
    iterative [False], steps [4]            GNN-RL's iterative episodes (the policy switches the env to them)
    gamma [1.0], gae_lambda [0.95]          GAE over an episode's steps (no effect on one-step episodes)
    network [None]                          a user network: a class / callable returning an nn.Module with
                                            forward(graph, globals, mask) -> (mean (A,), log_std, value)
    threads [1]                             torch intra-op threads during the search

AutoSculpt's learnable alpha, here: the env's projection puts every candidate at the budget, so the FLOPs term
differs between candidates only by the slack the unit granularity leaves (`round_to`); alpha then rewards the
agent for using less of the budget at equal fidelity, scaled automatically against the fidelity spread. It only
shapes the agent's training signal: the reward the env logs (and the best candidate) stays the evaluator's, so
policies remain comparable. GNN-RL's multi-stage encoder is the `multi_stage` option; its iterative re-graphing
episodes are `iterative=True`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from ..errors import SpaError
from .policy import Policy, SearchResult, register_policy

ADVANTAGES = ("critic", "moving")


@contextmanager
def torch_session(seed: int, threads: int | None):
    """Seeded torch RNG (the caller's global state is restored afterwards) and a thread count for the search."""
    import torch

    old = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if threads:
            torch.set_num_threads(int(threads))
        try:
            yield
        finally:
            torch.set_num_threads(old)


def adapt_alpha(alpha: float, quality: np.ndarray, slack: np.ndarray, share: float, lr: float) -> float:
    """AutoSculpt's learnable alpha, one update: move log alpha by the step `lr` towards the value at which
    alpha * spread(FLOPs term over the batch) is `share` of the spread of the quality term (geometric
    interpolation; alpha stays put when either spread is zero; from 0 it starts at 1e-3 of the goal)."""
    sq, ss = float(np.std(quality)), float(np.std(slack))
    if ss < 1e-12 or sq < 1e-12:
        return alpha
    goal = share * sq / ss
    base = alpha if alpha > 0 else goal * 1e-3
    return float(math.exp((1 - lr) * math.log(base) + lr * math.log(goal)))


class RunningStats:
    """Running mean / std (Welford) of scalar rewards."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values) -> None:
        for v in np.asarray(values, dtype=np.float64).reshape(-1):
            self.n += 1
            d = v - self.mean
            self.mean += d / self.n
            self.m2 += d * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n > 1 else 1.0

    def normalize(self, values):
        return (np.asarray(values, dtype=np.float64) - self.mean) / max(self.std, 1e-8)


def build_actor_critic(hidden: int = 64, heads: int = 4, layers: int = 2, multi_stage: bool = False,
                       n_globals: int = 7, init_std: float = 0.5, mean_scale: float = 3.0):
    """The default network: separate GATv2 encoders for the actor and the critic (as GNN-RL)."""
    import torch
    from torch import nn

    from .gnn import GraphEncoder  # torch: imported when an agent is built

    class ActorCritic(nn.Module):
        def __init__(self):
            super().__init__()
            self.actor_enc = GraphEncoder(hidden=hidden, heads=heads, layers=layers, multi_stage=multi_stage)
            self.critic_enc = GraphEncoder(hidden=hidden, heads=heads, layers=layers, multi_stage=multi_stage)
            d = self.actor_enc.out_dim + self.actor_enc.pooled_dim + n_globals
            self.actor = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            self.critic = nn.Sequential(nn.Linear(self.critic_enc.pooled_dim + n_globals, hidden), nn.Tanh(),
                                        nn.Linear(hidden, 1))
            self.log_std = nn.Parameter(torch.tensor(math.log(init_std)))
            nn.init.zeros_(self.actor[-1].weight)   # start from the uniform allocation
            nn.init.zeros_(self.actor[-1].bias)

        def forward(self, g, glob, mask):
            h = self.actor_enc(g)
            ctx = torch.cat([self.actor_enc.pool(h), glob]).expand(h.shape[0], -1)
            mean = mean_scale * torch.tanh(self.actor(torch.cat([h, ctx], 1)).squeeze(-1))[mask]
            mean = mean - mean.mean()
            hc = self.critic_enc(g)
            value = self.critic(torch.cat([self.critic_enc.pool(hc), glob])).squeeze(-1)
            return mean, self.log_std, value

    return ActorCritic()


@register_policy("ppo-gnn")
class PPOGNNPolicy(Policy):
    mode = "one-shot"

    def __init__(self, hidden: int = 64, heads: int = 4, layers: int = 2, multi_stage: bool = False,
                 batch: int = 8, epochs: int = 16, clip: float = 0.2, lr: float = 1e-3, value_coef: float = 0.5,
                 entropy_coef: float = 0.0, max_grad_norm: float = 1.0, init_std: float = 0.5,
                 min_std: float = 0.05, mean_scale: float = 3.0, advantage: str = "critic", eval_mean: bool = True,
                 learn_alpha: bool = False, alpha: float = 0.0, alpha_share: float = 0.1, alpha_lr: float = 0.5,
                 iterative: bool = False, steps: int = 4, gamma: float = 1.0, gae_lambda: float = 0.95,
                 network=None, threads: int | None = 1):
        if advantage not in ADVANTAGES:
            raise SpaError(f"unknown advantage '{advantage}' (choose from {', '.join(ADVANTAGES)})")
        if batch < 1 or epochs < 1 or not 0.0 < clip < 1.0:
            raise SpaError("ppo-gnn needs batch >= 1, epochs >= 1 and 0 < clip < 1")
        if not (0.0 <= gamma <= 1.0 and 0.0 <= gae_lambda <= 1.0):
            raise SpaError("ppo-gnn needs gamma and gae_lambda in [0, 1]")
        if iterative and (int(steps) != steps or steps < 1):
            raise SpaError(f"ppo-gnn: iterative episodes need a whole number of steps >= 1, got {steps}")
        super().__init__(hidden=hidden, heads=heads, layers=layers, multi_stage=multi_stage, batch=batch,
                         epochs=epochs, clip=clip, lr=lr, value_coef=value_coef, entropy_coef=entropy_coef,
                         max_grad_norm=max_grad_norm, init_std=init_std, min_std=min_std, mean_scale=mean_scale,
                         advantage=advantage, eval_mean=eval_mean, learn_alpha=learn_alpha, alpha=alpha,
                         alpha_share=alpha_share, alpha_lr=alpha_lr, iterative=iterative, steps=steps, gamma=gamma,
                         gae_lambda=gae_lambda, network=network, threads=threads)
        self.net = None
        self.alpha_trace: list[float] = []

    def build_network(self, env):
        o = self.options
        if o["network"] is not None:
            return o["network"]()
        return build_actor_critic(o["hidden"], o["heads"], o["layers"], o["multi_stage"],
                                  env.observation_space["globals"].shape[0], o["init_std"], o["mean_scale"])

    # ---- search --------------------------------------------------------------------------------------------------
    def search(self, env, evals: int, seed: int = 0) -> SearchResult:
        if self.options["iterative"]:
            env.set_episodes(True, self.options["steps"])
        with torch_session(seed, self.options["threads"]):
            self._search(env, evals, seed)
        return SearchResult.from_env(env, policy=self.name or "ppo-gnn", alpha=self.alpha_trace)

    def _search(self, env, evals: int, seed: int) -> None:
        import torch

        from .gnn import GraphBatch  # torch

        o = self.options
        self.net = net = self.build_network(env)
        opt = torch.optim.Adam(net.parameters(), lr=o["lr"])
        stats, moving = RunningStats(), None
        alpha = float(o["alpha"])
        graphs: dict[bytes, tuple] = {}

        def encode(obs):
            key = b"".join(np.ascontiguousarray(obs[k]).tobytes() for k in ("nodes", "edge_index", "edges",
                                                                             "globals"))
            if key not in graphs:
                graphs[key] = (GraphBatch.from_obs(obs), torch.from_numpy(np.asarray(obs["globals"], np.float32)),
                               torch.from_numpy(np.asarray(obs["mask"]).astype(bool)))
            return key

        env.reset(seed=seed)
        while env.evaluations < evals:
            if getattr(env, "iterative", False):
                graphs.clear()   # every step's graph is a new pruned model: keep only this batch's
            # ---- rollouts: episodes from the current policy (one step each unless iterative)
            keys, zs, lengths, rewards, slack = [], [], [], [], []
            room = evals - env.evaluations - (1 if o["eval_mean"] and evals - env.evaluations > 1 else 0)
            episodes = min(o["batch"], max(room, 1))
            if getattr(env, "iterative", False) or not hasattr(env, "step_many"):
                played = [self._episode(env, net, graphs, encode, sample=True) for _ in range(episodes)]
            else:
                played = self._rollouts(env, net, graphs, encode, episodes)
            for ep_keys, ep_zs, r, info in played:
                keys += ep_keys
                zs += ep_zs
                lengths.append(len(ep_keys))
                rewards.append(r)
                slack.append(1.0 - float(info["costs"]["flops"]))
            if o["eval_mean"] and env.evaluations < evals:
                self._episode(env, net, graphs, encode, sample=False)
            # ---- training reward (learnable alpha), standardised
            rewards = np.asarray(rewards)
            slack = np.asarray(slack)
            if o["learn_alpha"]:
                alpha = self._adapt_alpha(alpha, rewards, slack)
                self.alpha_trace.append(alpha)
            train = rewards + alpha * slack
            stats.add(train)
            target = torch.tensor(stats.normalize(train), dtype=torch.float32)
            if env.evaluations >= evals:   # no rollout would use another update
                break
            self._update(net, opt, graphs, keys, torch.stack(zs), lengths, target, moving)
            moving = float(target.mean()) if moving is None else 0.9 * moving + 0.1 * float(target.mean())

    def _episode(self, env, net, graphs, encode, sample: bool):
        """Play one episode (a sampled or the deterministic action at every step): (graph keys, logits, final
        reward, final info)."""
        import torch

        o = self.options
        obs, _ = env.reset()
        keys, zs, done = [], [], False
        while not done:
            key = encode(obs)
            g, glob, mask = graphs[key]
            with torch.no_grad():
                mean, log_std, _ = net(g, glob, mask)
                if sample:
                    std = log_std.exp().clamp_min(o["min_std"])
                    z = mean + std * torch.randn(mean.shape)
                else:
                    z = mean
            obs, r, done, _, info = env.step(env.ratios_to_action(torch.sigmoid(z).double().numpy()))
            keys.append(key)
            zs.append(z)
        return keys, zs, float(r), info

    def _rollouts(self, env, net, graphs, encode, episodes: int):
        """`episodes` sampled single-step episodes as one batch (`env.step_many`, in parallel on a Ray cluster):
        every one starts from the same reset observation and the network does not change within a rollout, so
        the samples (drawn in the order `_episode` draws them) and the results are those of `episodes` calls of
        `_episode`."""
        import torch

        o = self.options
        obs, _ = env.reset()
        key = encode(obs)
        g, glob, mask = graphs[key]
        zs = []
        for _ in range(episodes):
            with torch.no_grad():
                mean, log_std, _ = net(g, glob, mask)
                std = log_std.exp().clamp_min(o["min_std"])
                zs.append(mean + std * torch.randn(mean.shape))
        results = env.step_many([env.ratios_to_action(torch.sigmoid(z).double().numpy()) for z in zs])
        return [([key], [z], float(r), info) for z, (_, r, _, _, info) in zip(zs, results)]

    def _adapt_alpha(self, alpha: float, quality: np.ndarray, slack: np.ndarray) -> float:
        return adapt_alpha(alpha, quality, slack, self.options["alpha_share"], self.options["alpha_lr"])

    def _returns(self, target, values, lengths):
        """Per step: the lambda-return (value target) and its Monte Carlo counterpart, with the episode's reward
        `target[e]` at its last step and 0 before (a one-step episode's are both its reward)."""
        import torch

        o = self.options
        gamma, lam = o["gamma"], o["gae_lambda"]
        ret = torch.zeros(len(values))
        mc = torch.zeros(len(values))
        end = 0
        for e, n in enumerate(lengths):
            start, end = end, end + n
            g_lam, g_mc, v_next = 0.0, 0.0, 0.0
            for t in range(end - 1, start - 1, -1):
                r = target[e] if t == end - 1 else 0.0
                g_lam = r + gamma * ((1.0 - lam) * v_next + lam * g_lam)
                g_mc = r + gamma * g_mc
                ret[t], mc[t] = g_lam, g_mc
                v_next = values[t]
        return ret, mc

    def _update(self, net, opt, graphs, keys, zs, lengths, target, moving) -> None:
        import torch

        o = self.options
        order = sorted(set(keys))
        rows = {k: [i for i, kk in enumerate(keys) if kk == k] for k in order}

        def evaluate():
            logp = torch.zeros(len(keys))
            values = torch.zeros(len(keys))
            entropy = torch.zeros(())
            for k in order:
                g, glob, mask = graphs[k]
                mean, log_std, value = net(g, glob, mask)
                std = log_std.exp().clamp_min(o["min_std"]) * torch.ones_like(mean)
                dist = torch.distributions.Normal(mean, std)
                idx = torch.tensor(rows[k])
                logp = logp.index_put((idx,), dist.log_prob(zs[idx]).sum(-1))
                values = values.index_put((idx,), value.expand(len(idx)))
                entropy = entropy + dist.entropy().sum() * len(idx) / len(keys)
            return logp, values, entropy

        with torch.no_grad():
            old_logp, old_values, _ = evaluate()
            returns, mc = self._returns(target, old_values, lengths)
        if o["advantage"] == "critic":
            adv = returns - old_values
        else:
            adv = mc - (0.0 if moving is None else moving)
        if len(adv) > 1 and float(adv.std()) > 1e-8:
            adv = (adv - adv.mean()) / adv.std()
        for _ in range(o["epochs"]):
            logp, values, entropy = evaluate()
            ratio = torch.exp(logp - old_logp)
            surrogate = torch.min(ratio * adv, ratio.clamp(1 - o["clip"], 1 + o["clip"]) * adv)
            loss = -surrogate.mean() + o["value_coef"] * ((values - returns) ** 2).mean() \
                - o["entropy_coef"] * entropy
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), o["max_grad_norm"])
            opt.step()
