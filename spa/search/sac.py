"""`sac`: Soft Actor-Critic on the sequential env, one group per step (AutoDFP; AMC's layer-by-layer episodes).

Each episode visits the action groups in topological order; the agent picks the current group's keep ratio (an
action in [-1, 1], ratio = (a + 1) / 2), the env clips it so the budget stays reachable with every later group at
its minimum, and projects the finished allocation onto the budget; the reward comes once, at the end (one
episode = one evaluation).

State (per step, `state_vector`): the current group's node features (`graph.NODE_FEATURES`: its static
description plus keep ratio, decision flags, budget used/left) and the env's `globals` (budgets, costs now and
with the undecided groups at their minimum, progress); with `full_state` (default) also the keep ratios of all
action groups decided so far (1 while undecided), which makes the state Markov - what a later group can keep
depends on every earlier decision (AMC's state carries the previous action and the reduced/remaining FLOPs for
the same reason). Without it, in our runs on the planted test, the agent learned nothing group-specific.

SAC (Haarnoja et al. 2018): a tanh-squashed Gaussian actor (initialised near the uniform allocation with a
pre-tanh std `init_std`), twin Q critics (evaluated together with batched matmuls) whose smaller value is used,
automatic entropy temperature (log alpha trained towards `target_entropy`, default -1 = -action dims), a replay
buffer, `updates` gradient steps per env step interleaved with the steps, after `warmup` episodes of uniform
random actions (default 0: every episode costs an evaluation, and random ones are what the `random` control
already does).

Credit assignment (`reward_mode`):

* `"broadcast"` (default): every transition of an episode is stored with the episode's final reward and as
  terminal, so Q(s, a) estimates the expected final reward of choosing a in s (AMC shares the episode reward
  among all its steps the same way); no target networks are needed;
* `"terminal"`: the reward only on the last transition, earlier ones bootstrapped with `gamma` through
  Polyak-averaged target critics (rate `tau`), textbook SAC.

The action stored with a transition (`store_action`) is the actor's sample (`"raw"`, default), the count the env
kept after its clip (`"decided"`) or the group's ratio in the evaluated allocation (`"final"`, after the final
projection). Rewards are standardised with running statistics when sampled. Every `eval_every`-th episode is
played deterministically (the actor's mean); it counts against `evals` like any other candidate.

Options (defaults): hidden [64], lr [1e-3], batch [64], buffer [100000], warmup [0] episodes, updates [1.0] per
step, tau [0.01], gamma [1.0], init_alpha [0.1], target_entropy [-1.0], reward_mode ["broadcast"],
eval_every [10], full_state [True], init_std [0.3], store_action ["raw"], threads [1].
"""
from __future__ import annotations

import copy
import math

import numpy as np

from ..errors import SpaError
from .graph import NODE_FEATURES
from .policy import Policy, SearchResult, register_policy
from .ppo_gnn import RunningStats, torch_session

REWARD_MODES = ("broadcast", "terminal")
STORE_ACTIONS = ("final", "decided", "raw")


_KEEP = NODE_FEATURES.index("keep_ratio")


def state_vector(obs: dict, full: bool = True) -> np.ndarray:
    """The per-step state: the current group's node features and the globals (zeros when no group is current);
    with `full`, also the keep ratio of every action group so far (1 while undecided), which makes the state
    Markov: what later groups can still keep depends on every earlier decision."""
    nodes = np.asarray(obs["nodes"], dtype=np.float32)
    cur = int(obs["current"])
    row = nodes[cur] if cur < len(nodes) else np.zeros(nodes.shape[1], np.float32)
    parts = [row, np.asarray(obs["globals"], dtype=np.float32)]
    if full:
        parts.append(nodes[np.asarray(obs["mask"]).astype(bool), _KEEP])
    return np.concatenate(parts)


class ReplayBuffer:
    def __init__(self, capacity: int, state_dim: int):
        self.capacity, self.n, self.pos = capacity, 0, 0
        self.s = np.zeros((capacity, state_dim), np.float32)
        self.a = np.zeros((capacity, 1), np.float32)
        self.r = np.zeros(capacity, np.float64)
        self.s2 = np.zeros((capacity, state_dim), np.float32)
        self.done = np.zeros(capacity, np.float32)
        self.final = np.zeros(capacity, bool)   # the reward is an episode reward (standardised when sampled)

    def add(self, s, a, r, s2, done, final) -> None:
        i = self.pos
        self.s[i], self.a[i], self.r[i], self.s2[i], self.done[i], self.final[i] = s, a, r, s2, done, final
        self.pos = (self.pos + 1) % self.capacity
        self.n = min(self.n + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch: int):
        idx = rng.integers(0, self.n, min(batch, self.n))
        return self.s[idx], self.a[idx], self.r[idx], self.s2[idx], self.done[idx], self.final[idx]


def _mlp(sizes):
    from torch import nn

    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _twin_q(in_dim: int, hidden: int):
    """Two independent Q MLPs (in_dim -> hidden -> hidden -> 1) evaluated together with batched matmuls; the
    forward returns (2, B)."""
    import torch
    from torch import nn

    class TwinQ(nn.Module):
        def __init__(self):
            super().__init__()
            dims = [in_dim, hidden, hidden, 1]
            self.w = nn.ParameterList()
            self.b = nn.ParameterList()
            for i in range(3):
                bound = 1.0 / math.sqrt(dims[i])   # nn.Linear's default initialisation, per net
                self.w.append(nn.Parameter(torch.empty(2, dims[i], dims[i + 1]).uniform_(-bound, bound)))
                self.b.append(nn.Parameter(torch.empty(2, 1, dims[i + 1]).uniform_(-bound, bound)))

        def forward(self, x):
            h = x.unsqueeze(0).expand(2, -1, -1)
            for i in range(3):
                h = torch.baddbmm(self.b[i], h, self.w[i])
                if i < 2:
                    h = torch.relu(h)
            return h.squeeze(-1)

    return TwinQ()


@register_policy("sac")
class SACPolicy(Policy):
    mode = "sequential"

    def __init__(self, hidden: int = 64, lr: float = 1e-3, batch: int = 64, buffer: int = 100_000,
                 warmup: int = 0, updates: float = 1.0, tau: float = 0.01, gamma: float = 1.0,
                 init_alpha: float = 0.1, target_entropy: float = -1.0, reward_mode: str = "broadcast",
                 eval_every: int = 10, full_state: bool = True, init_std: float = 0.3,
                 store_action: str = "raw", threads: int | None = 1):
        if reward_mode not in REWARD_MODES:
            raise SpaError(f"unknown reward_mode '{reward_mode}' (choose from {', '.join(REWARD_MODES)})")
        if store_action not in STORE_ACTIONS:
            raise SpaError(f"unknown store_action '{store_action}' (choose from {', '.join(STORE_ACTIONS)})")
        if batch < 1 or buffer < 1 or warmup < 0 or updates < 0 or not 0 < tau <= 1 or init_alpha <= 0:
            raise SpaError("sac needs batch >= 1, buffer >= 1, warmup >= 0, updates >= 0, 0 < tau <= 1, "
                           "init_alpha > 0")
        super().__init__(hidden=hidden, lr=lr, batch=batch, buffer=buffer, warmup=warmup, updates=updates,
                         tau=tau, gamma=gamma, init_alpha=init_alpha, target_entropy=target_entropy,
                         reward_mode=reward_mode, eval_every=eval_every, full_state=full_state,
                         init_std=init_std, store_action=store_action, threads=threads)
        self.actor = None
        self.alpha_trace: list[float] = []

    def search(self, env, evals: int, seed: int = 0) -> SearchResult:
        if env.mode != "sequential":
            raise SpaError("sac drives the sequential env (mode='sequential')")
        with torch_session(seed, self.options["threads"]):
            self._search(env, evals, seed)
        return SearchResult.from_env(env, policy=self.name or "sac", alpha=self.alpha_trace)

    # ---- networks --------------------------------------------------------------------------------------------
    def _build(self, state_dim: int):

        import torch

        o = self.options
        h = o["hidden"]
        self.actor = _mlp([state_dim, h, h, 2])
        with torch.no_grad():  # start near the uniform allocation with a moderate spread
            self.actor[-1].weight.mul_(0.01)
            self.actor[-1].bias.copy_(torch.tensor([0.0, math.log(o["init_std"])]))
        self.q = _twin_q(state_dim + 1, h)
        self.q_target = copy.deepcopy(self.q)
        for p in self.q_target.parameters():
            p.requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(o["init_alpha"]), requires_grad=True)
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=o["lr"], foreach=True)
        self.opt_q = torch.optim.Adam(self.q.parameters(), lr=o["lr"], foreach=True)
        self.opt_alpha = torch.optim.Adam([self.log_alpha], lr=o["lr"])

    def _policy(self, s, deterministic: bool = False):
        """Squashed-Gaussian action and its log-probability (tanh change of variables)."""
        import torch

        out = self.actor(s)
        mean, log_std = out[..., :1], out[..., 1:].clamp(-5.0, 1.0)
        if deterministic:
            return torch.tanh(mean), None
        std = log_std.exp()
        u = mean + std * torch.randn_like(mean)
        a = torch.tanh(u)
        logp = torch.distributions.Normal(mean, std).log_prob(u) - torch.log1p(-a.pow(2) + 1e-6)
        return a, logp.sum(-1)

    # ---- the loop --------------------------------------------------------------------------------------------
    def _search(self, env, evals: int, seed: int) -> None:
        import torch

        o = self.options
        rng = np.random.default_rng(seed)
        obs, _ = env.reset(seed=seed)
        state_dim = len(state_vector(obs, o["full_state"]))
        self._build(state_dim)
        buf = ReplayBuffer(o["buffer"], state_dim)
        stats = RunningStats()
        sizes = env.projector.sizes.astype(np.float64)
        episode, self._updates = 0, 0.0
        while env.evaluations < evals:
            deterministic = o["eval_every"] > 0 and episode >= o["warmup"] and \
                (episode + 1) % o["eval_every"] == 0
            obs, _ = env.reset()
            s = state_vector(obs, o["full_state"])
            steps, done, reward, info = [], False, 0.0, {}
            while not done:
                g = int(obs["current"])
                if episode < o["warmup"]:
                    a = rng.uniform(-1.0, 1.0, 1).astype(np.float32)
                else:
                    with torch.no_grad():
                        a = self._policy(torch.from_numpy(s), deterministic)[0].numpy().astype(np.float32)
                obs, reward, done, _, info = env.step(a)
                s2 = state_vector(obs, o["full_state"])
                decided = 2.0 * info["kept"] / sizes[g] - 1.0 if not done else None
                steps.append((s, a, s2, g, decided))
                s = s2
                if episode >= o["warmup"] and buf.n:   # updates interleaved with the steps (from episode 2 on)
                    self._updates += o["updates"]
                    while self._updates >= 1.0:
                        self._updates -= 1.0
                        self._update(buf, stats, rng)
            stats.add([reward])
            final = 2.0 * info["kept"] / sizes - 1.0
            for t, (st, at, st2, g, decided) in enumerate(steps):
                last = t == len(steps) - 1
                if o["store_action"] == "final":
                    at = np.array([final[g]], np.float32)
                elif o["store_action"] == "decided":
                    at = np.array([final[g] if decided is None else decided], np.float32)
                if o["reward_mode"] == "broadcast":
                    buf.add(st, at, reward, st2, 1.0, True)
                else:
                    buf.add(st, at, reward if last else 0.0, st2, float(last), last)
            episode += 1
            self.alpha_trace.append(float(self.log_alpha.detach().exp()))

    def _update(self, buf, stats, rng) -> None:
        import torch

        o = self.options
        s, a, r, s2, done, final = buf.sample(rng, o["batch"])
        r = np.where(final, stats.normalize(r), 0.0)
        s, a, s2 = torch.from_numpy(s), torch.from_numpy(a), torch.from_numpy(s2)
        r = torch.tensor(r, dtype=torch.float32)
        done = torch.from_numpy(done)
        alpha = self.log_alpha.exp().detach()
        target = r
        if float(done.min()) < 1.0:   # some transitions bootstrap ("terminal" mode)
            with torch.no_grad():
                a2, logp2 = self._policy(s2)
                sa2 = torch.cat([s2, a2], 1)
                q_next = self.q_target(sa2).min(0).values - alpha * logp2
                target = r + o["gamma"] * (1.0 - done) * q_next
        sa = torch.cat([s, a], 1)
        q_loss = ((self.q(sa) - target) ** 2).mean(1).sum()
        self.opt_q.zero_grad()
        q_loss.backward()
        self.opt_q.step()

        a_new, logp = self._policy(s)
        sa_new = torch.cat([s, a_new], 1)
        q_new = self.q(sa_new).min(0).values
        actor_loss = (alpha * logp - q_new).mean()
        self.opt_actor.zero_grad()
        actor_loss.backward()
        self.opt_actor.step()

        alpha_loss = -(self.log_alpha * (logp.detach() + o["target_entropy"])).mean()
        self.opt_alpha.zero_grad()
        alpha_loss.backward()
        self.opt_alpha.step()

        if o["reward_mode"] != "broadcast":  # the targets are only read when bootstrapping
            with torch.no_grad():
                for p, pt in zip(self.q.parameters(), self.q_target.parameters()):
                    pt.lerp_(p, o["tau"])
