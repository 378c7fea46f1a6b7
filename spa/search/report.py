"""What a search leaves for people to read: the report's "search" section, the search curve and the per-group
kept-ratio bars as PNG files.

matplotlib is imported only when a plot is drawn, and only its object API (Figure + Agg canvas): no pyplot, so
drawing never switches the backend of a program that imported spa.
"""
from __future__ import annotations

import numpy as np

from ..errors import SpaError
from ..fileio import atomic_write

# one line per built-in policy, for --help and the docs (a registered policy's docstring serves otherwise)
POLICY_SUMMARY = {
    "uniform": "control: the same keep ratio in every group, projected onto the budget (1 evaluation)",
    "global": "control: spa.select's global l2-per-MAC ranking at the budget, projected (1 evaluation)",
    "lamp": "control: the same ranking with LAMP scores (1 evaluation)",
    "random": "control: EagleEye random search, keep ratios uniform per group, projected, best kept",
    "ppo-gnn": "RL (GNN-RL/AutoSculpt): PPO over a GATv2 encoder of the group graph, one-shot",
    "sac": "RL (AutoDFP/AMC): soft actor-critic, one group per step",
    "dist": "RL (RL-Pruner): a sparsity distribution, Gaussian samples, Q-value update with a clip",
}


def describe(name: str, cls=None) -> str:
    """One line on what policy `name` does: the built-in summary, else the class docstring's first line."""
    if name in POLICY_SUMMARY:
        return POLICY_SUMMARY[name]
    doc = (getattr(cls, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else "a registered policy"


def resolved_metric(requested: str, metrics: dict | None) -> str:
    """The metric the reward came from: "auto" picks accuracy with labels, else kl for logits, else rel_l2
    (reward.CalibEvaluator's rule), which the best candidate's metric keys reveal."""
    if requested != "auto" or not metrics:
        return requested
    return next((m for m in ("accuracy", "kl") if m in metrics), "rel_l2")


def kept_units(problem, plan) -> list[int]:
    """Units each group keeps in the pruned model: the candidate's counts plus any unit given back so that no
    concat/split piece empties (what the driver's per_group rows report)."""
    return [int(g.size - len(plan.removed.get(g.id, []))) for g in problem.analysis.groups]


def search_section(history, plan=None, *, metric: str = "auto", policy_options: dict | None = None,
                   recalibrate: bool = False, setup_s: float = 0.0, curve=None, sparsity_plot=None) -> dict:
    """The report's "search" entry: History.meta (policy, budgets, evaluations, best reward, costs, ...) plus
    the full history as [index, reward, best so far] rows and the per-group widths. `kept` is what the pruned
    model keeps (from `plan`); `candidate` the count vector the policy chose, before any unit given back."""
    meta = dict(history.meta)
    problem = history.problem
    sizes = problem.sizes if problem is not None else None
    section = {k: _plain(v) for k, v in meta.items()}
    if plan is not None and problem is not None:
        section["candidate"] = section.get("kept")
        section["kept"] = kept_units(problem, plan)
    section.update({
        "setup_s": round(float(meta.get("setup_s", 0.0)) + setup_s, 3),
        "metric": resolved_metric(metric, meta.get("metrics")),
        "recalibrate": bool(recalibrate),
        "policy_options": _plain(policy_options or {}),
        "history": [[int(i), float(r), float(b)] for i, r, b in history],
        "units": None if sizes is None else [int(n) for n in sizes],
        "action_groups": None if history.problem is None else
        [int(g) for g in history.problem.projector.action_groups],
        "curve": str(curve) if curve else None,
        "sparsity_plot": str(sparsity_plot) if sparsity_plot else None,
    })
    return section


def _plain(value):
    """JSON-safe copy: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- plots --------------------------------------------------------------------------------------------------------
def _figure(width: float = 7.0, height: float = 4.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SpaError("plots need matplotlib: pip install matplotlib (or spa-prune[search])")
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path, outputs=None) -> None:
    """Atomically, or staged into the run's outputs (renamed into place with the model)."""
    write = lambda f: fig.savefig(f, format="png", bbox_inches="tight")  # noqa: E731
    if outputs is not None:
        outputs.stage(path, write)
    else:
        atomic_write(path, write)


def plot_curve(history, path, title: str | None = None, outputs=None) -> None:
    """Reward of every evaluation (dots) and the best so far (line): does the policy still improve?"""
    rows = np.asarray([(i, r, b) for i, r, b in history], dtype=np.float64).reshape(-1, 3)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    x = rows[:, 0] + 1
    ax.plot(x, rows[:, 1], "o", ms=3, alpha=0.5, color="tab:blue", label="candidate")
    ax.step(x, rows[:, 2], where="post", color="tab:red", lw=1.5, label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("reward")
    ax.set_title(title or f"search {history.meta.get('policy', '')}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _integer_ticks(ax)
    _save(fig, path, outputs)


def plot_sparsity(problem, kept, path, title: str | None = None, outputs=None) -> None:
    """Kept fraction of every coupled group (bars by group id), action groups apart from fixed ones: where did
    the allocation put the budget?"""
    kept = np.asarray(kept, dtype=np.float64)
    sizes = np.maximum(problem.sizes.astype(np.float64), 1.0)
    action = np.zeros(len(kept), dtype=bool)
    action[problem.projector.action_groups] = True
    ids = np.arange(len(kept))
    fig = _figure(max(6.0, min(0.18 * len(kept) + 2.0, 24.0)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ratio = kept / sizes
    ax.bar(ids[action], ratio[action], color="tab:blue", label="searched group")
    ax.bar(ids[~action], ratio[~action], color="tab:gray", label="fixed group (frozen or one width)")
    ax.set_xlabel("group id")
    ax.set_ylabel("kept fraction of units")
    ax.set_ylim(0.0, 1.05)
    ax.set_title(title or "kept units per group")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small", frameon=False)
    _integer_ticks(ax)
    _save(fig, path, outputs)
