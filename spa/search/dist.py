"""`dist`: RL-Pruner's sparsity-distribution policy (Wang & Kindratenko, 2024), on the one-shot env.

The policy is a distribution of sparsity over the action groups: `pd[g]`, the fraction of group g's units to
remove, kept on the budget (after every evaluation, pd is moved along the projector's common-shift path by the
shift the projection chose, before any rounding). Each iteration draws `samples` (NS = 10) actions:

* the first is pd itself (`eval_mean`: the greedy action; its reward is the value of the current distribution);
* with probability epsilon (epsilon-greedy, cosine decay from `epsilon` = 0.4 at the first evaluation to 0 at the
  last) a random sparsity vector, uniform in [0, 1) per group (exploration);
* otherwise pd plus Gaussian noise of variance `variance` (v = 0.04). With `space="logit"` (default) the noise is
  added to logit(pd), the coordinates the projector shifts in, so groups near 0 or 1 are perturbed in proportion;
  `space="ratio"` adds it to the sparsity itself (clipped to [0, 1]), as the paper states it.

Every action is projected onto the budget and evaluated (one evaluation each; an iteration's samples as one
batch, in parallel with `executor="ray"`); the update learns from the
projected sparsities (what was evaluated). Q-value-style update: episodes are one step long, so Q(a_i) is the
reward of a_i (RL-Pruner's discount has no later stage to apply to). With the noise draws' Q standardised into
advantages A_i (mean 0, std 1),

    pd' = pd + step * sum_i A_i (a_i - pd)            (in logit coordinates with space="logit")

which moves the distribution towards the better samples and away from the worse ones (an evolution-strategies
gradient). Exploration draws are off-policy: one enters only when it beat every noise draw and pd, and then pd
moves `step` of the way towards it. The change is clipped PPO-style: each group's new sparsity stays within
[1 - delta, 1 + delta] times the old one (delta = `clip` = 0.2), with an absolute floor `min_change` (0.02) so a
group at sparsity 0 can still move. The best candidate seen is returned (the env tracks it).

Options (defaults): samples [10], variance [0.04], step [0.2], clip [0.2], epsilon [0.4], eval_mean [True],
min_change [0.02], init ["uniform"; "random": a random starting distribution], space ["logit"; "ratio"],
noise_decay [False] (cosine decay of the noise std to `final_noise` [0.25] of it over the budget).
The paper's step is lambda = 0.1; with this update's scale 0.2 reached the planted optimum of the tests about
twice as fast (docs/search.md has the numbers), 0.1 is `step=0.1`.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import SpaError
from .policy import Policy, SearchResult, register_policy


@register_policy("dist")
class DistributionPolicy(Policy):
    mode = "one-shot"

    def __init__(self, samples: int = 10, variance: float = 0.04, step: float = 0.2, clip: float = 0.2,
                 epsilon: float = 0.4, eval_mean: bool = True, min_change: float = 0.02, init: str = "uniform",
                 noise_decay: bool = False, final_noise: float = 0.25, space: str = "logit"):
        if samples < 1 or variance < 0 or step <= 0 or not 0 <= clip < 1 or not 0 <= epsilon <= 1:
            raise SpaError("dist needs samples >= 1, variance >= 0, step > 0, 0 <= clip < 1, 0 <= epsilon <= 1")
        if init not in ("uniform", "random"):
            raise SpaError(f"unknown init '{init}' (choose from uniform, random)")
        if space not in ("logit", "ratio"):
            raise SpaError(f"unknown space '{space}' (choose from logit, ratio)")
        super().__init__(samples=samples, variance=variance, step=step, clip=clip, epsilon=epsilon,
                         eval_mean=eval_mean, min_change=min_change, init=init, noise_decay=noise_decay,
                         final_noise=final_noise, space=space)
        self.trace: list[np.ndarray] = []   # the distribution after every update

    def epsilon_at(self, done: int, evals: int) -> float:
        """Cosine decay of the exploration rate from `epsilon` (first evaluation) to 0 (last)."""
        return 0.5 * self.options["epsilon"] * (1.0 + math.cos(math.pi * min(done / max(evals - 1, 1), 1.0)))

    def sigma_at(self, done: int, evals: int) -> float:
        """Noise std: sqrt(variance), decayed (cosine) to `final_noise` of it with `noise_decay`."""
        o = self.options
        s = math.sqrt(o["variance"])
        if not o["noise_decay"]:
            return s
        c = 0.5 * (1.0 + math.cos(math.pi * min(done / max(evals - 1, 1), 1.0)))
        return s * (o["final_noise"] + (1.0 - o["final_noise"]) * c)

    def search(self, env, evals: int, seed: int = 0) -> SearchResult:
        o = self.options
        rng = np.random.default_rng(seed)
        env.reset(seed=seed)
        pj = env.projector
        n = len(env.action_groups)
        pd = np.full(n, 0.5) if o["init"] == "uniform" else rng.uniform(0.0, 1.0, n)
        pd = self._on_budget(pj, pd, pj.project(1.0 - pd).shift)
        start = env.evaluations
        self.trace = [pd.copy()]
        while env.evaluations - start < evals:
            # the step's samples depend on the distribution, not on each other's rewards: drawn first (in the
            # order a loop would draw them), then evaluated as one batch (in parallel on a Ray cluster)
            samples = []
            for i in range(o["samples"]):
                done = env.evaluations - start + i
                if done >= evals:
                    break
                if i == 0 and o["eval_mean"]:
                    s, kind = pd, None
                elif rng.random() < self.epsilon_at(done, evals):
                    s, kind = rng.uniform(0.0, 1.0, n), True
                else:
                    s, kind = self._noisy(pd, rng.normal(0.0, self.sigma_at(done, evals), n)), False
                s = np.clip(s, 0.0, 1.0)
                proj = pj.project(1.0 - s)
                a = self._on_budget(pj, s, proj.shift)   # the sample moved onto the budget (before rounding)
                if kind is None:
                    pd = a
                samples.append((a, kind, proj.kept))
            evaluations = env.evaluate_many([kept for _, _, kept in samples])
            actions, rewards, explored, greedy = [], [], [], None
            for (a, kind, _), ev in zip(samples, evaluations):
                if kind is None:
                    greedy = float(ev.reward)
                    continue
                actions.append(a)
                rewards.append(float(ev.reward))
                explored.append(kind)
            if not actions:
                break
            pd = self.update(pd, np.asarray(actions), np.asarray(rewards), np.asarray(explored), greedy)
            self.trace.append(pd.copy())
        return SearchResult.from_env(env, policy=self.name or "dist")

    @staticmethod
    def _on_budget(pj, sparsity: np.ndarray, shift: float) -> np.ndarray:
        """Sparsities after the projector's common shift (its path, before rounding and the greedy fill)."""
        rho = np.clip(1.0 - np.asarray(sparsity, dtype=np.float64), _EPS, 1.0 - _EPS)
        if pj.mode == "logit":
            kept = _sigmoid(np.log(rho / (1.0 - rho)) + shift)
        else:
            kept = np.minimum(1.0, rho * math.exp(shift))
        return np.clip(1.0 - kept, 0.0, 1.0)

    def _noisy(self, pd, noise):
        if self.options["space"] == "logit":
            return _sigmoid(_logit(pd) + noise)
        return pd + noise

    def update(self, pd: np.ndarray, actions: np.ndarray, q: np.ndarray, explored: np.ndarray,
               q_pd: float | None) -> np.ndarray:
        """One distribution update from sampled actions (projected sparsities), their Q-values and which ones
        were epsilon-exploration draws."""
        o = self.options
        new = pd.copy()
        on = ~explored
        if on.sum() >= 2 and float(q[on].std()) > 1e-12:
            adv = (q[on] - float(q[on].mean())) / float(q[on].std())
            if o["space"] == "logit":
                lp = _logit(pd)
                new = _sigmoid(lp + o["step"] * (adv[:, None] * (_logit(actions[on]) - lp)).sum(0))
            else:
                new = pd + o["step"] * (adv[:, None] * (actions[on] - pd)).sum(0)
        if explored.any():
            ref = float(q[on].max()) if on.any() else -np.inf
            if q_pd is not None:
                ref = max(ref, q_pd)
            i = int(np.flatnonzero(explored)[np.argmax(q[explored])])
            if q[i] > ref:   # an exploration draw beat everything the policy proposed: move towards it
                new = new + o["step"] * (actions[i] - new)
        room = np.maximum(o["clip"] * pd, o["min_change"])
        return np.clip(np.clip(new, pd - room, pd + room), 0.0, 1.0 - 1e-6)


_EPS = 1e-4


def _logit(p):
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))
