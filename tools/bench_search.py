"""Allocation search (issue 4): RL policies vs controls at an equal evaluation budget, no fine-tuning.

    python tools/bench_search.py --quick                     # resnet1d_mnist1d, seed 0, keep 0.1, 20 evals
    python tools/bench_search.py --models resnet1d_mnist1d   # 3 seeds x keep 0.3 / 0.1 x every policy
    python tools/bench_search.py --models resnet56_digits --seeds 0 --budgets 0.1 --resume

A benchmark, not a test. For each trained network of the quality benchmark (`tools/train_bench.py`, cached;
exported by `bench_quality.prepare`, BN folded, with 128 TRAIN samples as calibration data), training seed,
budget (FLOPs kept, default 0.3 and 0.1; a latency budget too once `spa.search.search` takes `target_latency`)
and policy (controls uniform/global/lamp/random, RL agents ppo-gnn/sac/dist):

* one `SearchProblem` per (model, seed, budget): criterion `importance="obspa"` (scores computed once per
  (model, seed) and passed to every budget's problem), the budget projection and the group graph;
* one `CalibEvaluator` per (model, seed, budget): label-free fidelity, `metric="kl"` (exp(-KL) of the pruned
  model's softmax to the original's on the calibration samples; their labels are never used for the reward),
  with per-candidate BN/affine re-calibration (`recalibrate=True`), onnxruntime and torch on 2 threads. Its
  teacher outputs and original moments are computed once and shared by every policy. Its reward cache is
  CLEARED before each policy (`fresh_cache`): a policy never gets another policy's candidates for free, so the
  search wall times compare, and within a policy a repeated candidate still counts as one evaluation (the env
  counts every request, cached or not) - every searching policy spends exactly `--evals` evaluations;
  uniform/global/lamp spend 1;
* the chosen plan goes through `prune_with_plan(..., importance="obspa", calib=..., reconstruct=True)` (OBSPA
  least-squares reconstruction and verification, the same for every policy), then the TEST accuracy in
  onnxruntime (the test split is used for nothing else), MACs/params kept, onnxruntime latency (batch 1, 2
  threads, median of 30), the search wall time, the chosen plan's reward and the search curve.

`--probes K` also prunes K random allocations per (model, budget) for the first seed (keep ratios uniform in
[0, 1] per group, projected, as the `random` control draws them) through the same final path: with the chosen
plans they show how well the search reward predicts the final test accuracy.

The re-calibrated reward does not anticipate the final OBSPA reconstruction: at 90 % removed it does not rank
candidates as the reconstructed models' test accuracies do (BENCHMARKS.md). `--reward fast` (into OUT/fast)
scores each candidate after `CalibEvaluator(refit="fast")`'s one-pass least-squares refit (~1.4x the
re-calibrated cost), `--reward refit` (into OUT/refit) after `Reconstruct` itself (exact, ~4-7 s per ResNet-56
candidate: only the small models fit the 10-minute budget).

Agent options are each agent's defaults (they fit 300 evaluations: ppo-gnn 8 episodes + 1 mean action per
update, dist 10 samples per iteration, sac one episode per evaluation), except `threads=2` for the torch agents
so their re-calibration passes run on the same 2 torch threads as the controls' (`POLICY_OPTIONS`).

Outputs under `--out` (default .bench/search/): results.json (rows keyed by model, seed, budget, policy, evals;
`--resume` keeps rows measured without error), results.md (tables, with the command lines and versions) and
curves-{model}-{budget}.png (best-so-far reward per evaluation, seed 0; reward vs test accuracy).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_quality: spinning OpenMP threads under load
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python tools/bench_search.py`
    sys.path.insert(0, str(ROOT))

from tools import bench_quality

MODELS = ("resnet1d_mnist1d", "resnet56_digits", "mobilenetv2_digits")
CONTROLS = ("uniform", "global", "lamp", "random")
AGENTS = ("ppo-gnn", "sac", "dist")
POLICIES = CONTROLS + AGENTS
POLICY_OPTIONS = {"ppo-gnn": {"threads": 2}, "sac": {"threads": 2}}  # everything else: the agent's defaults
THREADS = 2
CRITERION = "obspa"
REWARDS = {  # label-free fidelity; "recal" is the benchmark's default reward, the refits anticipate the final path
    "recal": {"metric": "kl", "recalibrate": True},
    "fast": {"metric": "kl", "recalibrate": False, "refit": "fast"},
    "refit": {"metric": "kl", "recalibrate": False, "refit": True},
}
DEFAULT_OUT = ROOT / ".bench" / "search"
LATENCY_RUNS = 30
LATENCY_ROUNDS = 5  # round-robin passes of the re-measurement over a latency setting's final models


def log(msg: str) -> None:
    print(f"[search {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """A FLOPs budget (fraction of MACs kept) or a latency budget (fraction of the unpruned latency at `batch`)."""

    kind: str      # "flops" | "latency"
    fraction: float
    batch: int = 1  # latency: the batch size the budget is stated at (latency of every final model: at this batch)

    @property
    def name(self) -> str:
        return f"{self.kind}{self.fraction:g}" + (f"b{self.batch}" if self.batch != 1 else "")

    def label(self) -> str:
        if self.kind == "flops":
            return f"FLOPs kept {self.fraction:g} ({100 * (1 - self.fraction):.0f}% removed)"
        return f"latency {self.fraction:g} x unpruned at batch {self.batch}"


def latency_supported() -> bool:
    """Latency budgets need `target_latency` in both search() and SearchProblem.build (another change)."""
    from spa.search import SearchProblem, search

    return all("target_latency" in inspect.signature(f).parameters for f in (search, SearchProblem.build))


def budget_kwargs(budget: Budget, unpruned_ms: float | None) -> dict:
    """SearchProblem.build's budget keywords; a latency budget in ms at its batch on the benchmark's 2 threads."""
    if budget.kind == "flops":
        return {"target_flops": budget.fraction}
    return {"target_latency": round(budget.fraction * unpruned_ms, 4), "latency_batch": budget.batch,
            "threads": THREADS}


def median_latency_ms(path: Path, input_shape, batch: int = 1, runs: int = LATENCY_RUNS) -> float:
    """onnxruntime latency at `batch` on 2 threads: median of `runs` after 5 warm-up runs."""
    sess = bench_quality.ort_session(path)
    feed = {sess.get_inputs()[0].name: np.zeros((batch, *input_shape), np.float32)}
    times = []
    for i in range(runs + 5):
        t = time.perf_counter()
        sess.run(None, feed)
        if i >= 5:
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# one (model, seed, budget): problem + evaluator shared by every policy
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Setting:
    subject: bench_quality.Subject
    budget: Budget
    problem: object           # spa.search.SearchProblem
    evaluator: object         # spa.search.CalibEvaluator
    setup_s: float
    unpruned_ms: float | None  # latency budgets: the reference the budget is a fraction of
    calib_samples: int
    reward: str
    reference_ms: list = field(default_factory=list)  # the unpruned model's median(s) the budget was set from

    @property
    def key(self) -> tuple:
        return self.subject.model_name, self.subject.seed, self.budget.name


def build_setting(s: bench_quality.Subject, budget: Budget, scores: dict | None, calib_samples: int,
                  reward: str) -> Setting:
    """The problem (criterion scores reused across budgets) and its evaluator (teacher outputs computed now)."""
    from spa.search import CalibEvaluator, SearchProblem

    # a latency budget's reference: the median of LATENCY_ROUNDS medians (one median moved 10-25 % here); a FLOPs
    # budget needs none
    reference = [median_latency_ms(s.onnx_path, s.input_shape, budget.batch)
                 for _ in range(LATENCY_ROUNDS if budget.kind == "latency" else 0)]
    unpruned_ms = statistics.median(reference) if reference else None
    t0 = time.perf_counter()
    problem = SearchProblem.build(str(s.onnx_path), importance=CRITERION, calib=str(s.calib_path),
                                  calib_samples=calib_samples, input_shapes={"input": (1, *s.input_shape)},
                                  seed=s.seed, scores=scores, **budget_kwargs(budget, unpruned_ms))
    evaluator = CalibEvaluator(problem, threads=THREADS, seed=s.seed, **REWARDS[reward])
    evaluator.teacher()
    return Setting(s, budget, problem, evaluator, time.perf_counter() - t0, unpruned_ms, calib_samples, reward,
                   [round(m, 4) for m in reference])


def fresh_cache(evaluator) -> None:
    """Forget measured candidates (keep the teacher outputs/moments): each policy measures its own."""
    evaluator.cache = {}
    evaluator.calls = evaluator.measured = 0
    evaluator.seconds = 0.0


def progress_logger(tag: str, every: int = 50):
    def report(index, reward, best):
        if (index + 1) % every == 0:
            log(f"    {tag}: {index + 1} evaluations, best reward {best:.4f} [load {loadavg()[0]}]")
    return report


# ---------------------------------------------------------------------------------------------------------------
# one policy: search, final prune, test accuracy
# ---------------------------------------------------------------------------------------------------------------
def run_policy(st: Setting, policy: str, evals: int, out: Path) -> dict:
    from spa.search import search

    s = st.subject
    fresh_cache(st.evaluator)
    options = POLICY_OPTIONS.get(policy, {})
    load_before = loadavg()
    latency = {"target_latency": st.problem.options["latency"]["target_ms"]} if st.budget.kind == "latency" else {}
    plan, history = search(str(s.onnx_path), policy, evals=evals, seed=s.seed, threads=THREADS, **latency,
                           importance=CRITERION, policy_options=options, problem=st.problem,
                           evaluator=st.evaluator, progress=progress_logger(f"{s.model_name} s{s.seed} "
                                                                            f"{st.budget.name} {policy}"))
    meta = history.meta
    row = {"evaluations": meta["evaluations"], "measured": meta["measured"], "search_s": meta["search_s"],
           "measure_s": meta["measure_s"], "reward": meta["best_reward"], "best_index": meta["best_index"],
           "metrics": _rounded(meta["metrics"]), "costs": _rounded(meta["costs"]), "kept": meta["kept"],
           "curve": [round(r, 6) for _, r, _ in history], "policy_options": options,
           "load_search": [load_before, loadavg()], "latency_fit": meta.get("latency")}
    dest = pruned_path(out, {"model": s.model_name, "seed": s.seed, "budget": st.budget.name, "policy": policy,
                             "evals": evals})
    return {**row, **final_prune(st, plan, dest)}


def final_prune(st: Setting, plan, dest: Path) -> dict:
    """The same path for every plan: OBSPA reconstruction + verification, then test accuracy and latency."""
    from spa.search import prune_with_plan

    s = st.subject
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = prune_with_plan(str(s.onnx_path), str(dest), plan, st.problem, importance=CRITERION,
                             calib=str(s.calib_path), reconstruct=True)
    prune_s = time.perf_counter() - t0
    rep = result.report
    fid = next(iter((rep.get("reconstruction") or {}).get("fidelity_after", {}).values()), {})
    return {"test_acc": bench_quality.onnx_accuracy(dest, s.data.x_test, s.data.y_test), "macs_ratio": rep["macs"]["ratio"],
            "params_ratio": rep["params"]["ratio"], "verification": rep["verification"]["status"],
            "calib_fidelity_after": _rounded(fid), "prune_s": round(prune_s, 3),
            "latency_ms": round(median_latency_ms(dest, s.input_shape, st.budget.batch), 4),
            "latency_batch": st.budget.batch}


def latency_rows(res: Results, **match) -> list[dict]:
    """The measured rows of latency budgets whose fields equal `match` (e.g. model=, seed=, budget=)."""
    return [r for r in res.rows.values() if r.get("test_acc") is not None
            and "target_latency" in r.get("budget_kwargs", {}) and all(r[k] == v for k, v in match.items())]


def pruned_path(out: Path, row: dict) -> Path:
    return out / "pruned" / f"{row['model']}-seed{row['seed']}-{row['budget']}-{row['policy']}-e{row['evals']}.onnx"


def remeasure_latency(res: Results, out: Path, model: str, seed: int, budget: str,
                      rounds: int = LATENCY_ROUNDS) -> bool:
    """Time a latency setting's final models again, together with the unpruned one, in `rounds` round-robin
    passes (a median of LATENCY_RUNS runs per model per pass). On a shared machine a burst or a drift lasting
    seconds moves one median of 30 runs by 10-25 %; within a pass it hits every model alike, and the median over
    the passes is the number the latency goal is read from. The rows gain `latency_rounds_ms` (and the
    unpruned model's `unpruned_rounds_ms`); False when a final model is missing."""
    rows = latency_rows(res, model=model, seed=seed, budget=budget)
    paths = {row_key(r): pruned_path(out, r) for r in rows}
    if not rows or not all(p.exists() for p in paths.values()):
        return False
    spec = bench_quality.BENCH_MODELS[model]
    batch = rows[0]["budget_kwargs"]["latency_batch"]
    unpruned = bench_quality.export_path(out, model, seed, keep_bn=False)
    timings: dict = {key: [] for key in [*paths, "unpruned"]}
    for _ in range(rounds):
        for key, path in [*paths.items(), ("unpruned", unpruned)]:
            timings[key].append(round(median_latency_ms(path, spec.input_shape, batch), 4))
    for r in rows:
        r["latency_rounds_ms"] = timings[row_key(r)]
        r["unpruned_rounds_ms"] = timings["unpruned"]
        r["latency_rounds_load"] = loadavg()
        res.mine.add(row_key(r))
    return True


def run_probes(st: Setting, k: int, out: Path) -> list[dict]:
    """K random allocations (as `random` draws them) through reward + final prune: reward vs test accuracy."""
    rng = np.random.default_rng(10_000 + st.subject.seed)
    pj = st.problem.projector
    fresh_cache(st.evaluator)
    rows = []
    for i in range(k):
        kept = pj.project(rng.uniform(0.0, 1.0, len(pj.action_groups))).kept
        ev = st.evaluator(kept)
        dest = out / "pruned" / f"{st.subject.model_name}-seed{st.subject.seed}-{st.budget.name}-probe{i}.onnx"
        row = {"probe": i, "reward": ev.reward, "metrics": _rounded(ev.metrics),
               **final_prune(st, st.problem.plan(kept), dest)}
        rows.append(row)
        log(f"    probe {i}: reward {ev.reward:.4f}, test acc {row['test_acc']:.4f}")
    fresh_cache(st.evaluator)
    return rows


def _rounded(d: dict | None) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in (d or {}).items()}


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------
def row_key(r: dict) -> tuple:
    return r["model"], r["seed"], r["budget"], r["policy"], r["evals"]


def probe_key(r: dict) -> tuple:
    return r["model"], r["seed"], r["budget"], r["probe"]


class Results:
    """results.json: {"runs", "rows", "probes"}; a row replaces an older one with the same key. With `resume`,
    `save` first takes in rows another process wrote to the file since (two runs into one folder at once),
    keeping this process's own rows where both have the key."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.resume = path, resume
        old = json.loads(path.read_text()) if resume and path.exists() else {}
        self.runs = old.get("runs", [])
        self.rows = {row_key(r): r for r in old.get("rows", [])}
        self.probes = {probe_key(r): r for r in old.get("probes", [])}
        self.mine: set[tuple] = set()   # keys this process measured

    def merge_disk(self) -> None:
        if not (self.resume and self.path.exists()):
            return
        disk = json.loads(self.path.read_text())
        for r in disk.get("rows", []):
            if row_key(r) not in self.mine:
                self.rows[row_key(r)] = r
        for r in disk.get("probes", []):
            if ("probe", *probe_key(r)) not in self.mine:
                self.probes[probe_key(r)] = r
        self.runs += [r for r in disk.get("runs", []) if r not in self.runs]

    def done(self, key: tuple) -> bool:
        r = self.rows.get(key)
        return r is not None and not r.get("error")

    def probes_done(self, model: str, seed: int, budget: str, k: int) -> bool:
        return all((model, seed, budget, i) in self.probes for i in range(k))

    def add_row(self, row: dict) -> None:
        self.rows[row_key(row)] = row
        self.mine.add(row_key(row))

    def add_probe(self, row: dict) -> None:
        self.probes[probe_key(row)] = row
        self.mine.add(("probe", *probe_key(row)))

    def save(self) -> None:
        self.merge_disk()
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"runs": self.runs, "rows": list(self.rows.values()),
                                   "probes": list(self.probes.values())}, indent=1))
        tmp.replace(self.path)


def mean_std(xs) -> tuple[float, float]:
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(rows: list[dict]) -> dict:
    """(model, budget, policy, evals) -> mean test accuracy (%) and friends over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("test_acc") is not None and r["policy"] != "unpruned":
            groups.setdefault((r["model"], r["budget"], r["policy"], r["evals"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        acc, std = mean_std(100 * r["test_acc"] for r in rs)
        out[key] = {"acc": acc, "std": std, "n": len(rs), "seeds": {r["seed"]: 100 * r["test_acc"] for r in rs},
                    "reward": statistics.fmean(r["reward"] for r in rs),
                    "kl": statistics.fmean(r["metrics"].get("kl", float("nan")) for r in rs),
                    "search_s": statistics.fmean(r["search_s"] for r in rs),
                    "max_search_s": max(r["search_s"] for r in rs),
                    "evaluations": statistics.fmean(r["evaluations"] for r in rs),
                    "macs": statistics.fmean(r["macs_ratio"] for r in rs),
                    "latency_ms": statistics.fmean(r["latency_ms"] for r in rs),
                    "load": statistics.fmean(r["load_search"][1][0] for r in rs)}
    return out


def best_of(summ: dict, model: str, budget: str, evals: int, names) -> tuple[str, dict] | None:
    cands = [(p, summ[(model, budget, p, evals)]) for p in names if (model, budget, p, evals) in summ]
    return max(cands, key=lambda c: c[1]["acc"]) if cands else None


def paired_diff(a: dict, b: dict) -> tuple[float, float, int] | None:
    """Mean ± std over seeds of a's accuracy minus b's, on the seeds both have."""
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    if not seeds:
        return None
    m, sd = mean_std(a["seeds"][k] - b["seeds"][k] for k in seeds)
    return m, sd, len(seeds)


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def correlation_points(res: Results, model: str, budget: str, seed: int) -> list[tuple[float, float, float]]:
    """(reward, post-reconstruction calibration KL, test accuracy) of probes and chosen plans of one seed."""
    pts = [r for r in res.probes.values() if (r["model"], r["budget"], r["seed"]) == (model, budget, seed)]
    pts += [r for r in res.rows.values() if (r["model"], r["budget"], r["seed"]) == (model, budget, seed)
            and r.get("test_acc") is not None and r["policy"] != "unpruned"]
    return [(r["reward"], r["calib_fidelity_after"].get("kl", float("nan")), r["test_acc"]) for r in pts]


# ---------------------------------------------------------------------------------------------------------------
# results.md
# ---------------------------------------------------------------------------------------------------------------
def markdown(res: Results) -> str:
    rows = list(res.rows.values())
    summ = summarize(rows)
    lines = ["# Allocation search: RL policies vs controls at an equal evaluation budget", "",
             "Generated by `tools/bench_search.py` from `results.json`. Commands that produced these rows:", ""]
    lines += [f"- `{r['command']}` ({r['date']}; {r['versions']}; {r['cpus']} CPUs, load at start "
              f"{r['load']})" for r in res.runs]
    lines += ["", settings_text(rows), ""]
    for model in [m for m in MODELS if any(k[0] == m for k in summ)]:
        lines += model_tables(res, summ, model)
    lines += comparison_table(summ)
    lines += correlation_table(res)
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["Errors:", ""] + [f"- {row_key(r)}: {r['error'][:300]}" for r in errors] + [""]
    return "\n".join(lines)


def settings_text(rows: list[dict]) -> str:
    opts = {r["policy"]: r.get("policy_options") for r in rows if r.get("policy_options")}
    samples = sorted({r.get("calib_samples") for r in rows if r.get("calib_samples")})
    modes = sorted({r.get("reward_kind", "recal") for r in rows if r["policy"] != "unpruned"})
    how = {"recal": "after per-candidate BN/affine re-calibration (`CalibEvaluator(metric=\"kl\", recalibrate=True)`)",
           "fast": "after the one-pass least-squares refit (`CalibEvaluator(metric=\"kl\", refit=\"fast\")`)",
           "refit": "after a per-candidate OBSPA refit (`CalibEvaluator(metric=\"kl\", refit=True)`)"}
    return (f"Criterion `importance=\"{CRITERION}\"` for every policy (scores computed once); reward = label-free "
            f"fidelity exp(-KL(original || pruned)) on {samples or '?'} calibration TRAIN samples "
            f"{'; '.join(how[m] for m in modes)}, one evaluator per (model, seed, budget) whose reward cache is "
            "cleared before each policy; the chosen plan pruned with `prune_with_plan(importance=\"obspa\", "
            "reconstruct=True)` (OBSPA least-squares reconstruction, verified). Test accuracy in onnxruntime, no "
            "fine-tuning. onnxruntime and torch on 2 threads. "
            f"Agent options: defaults, plus {opts or 'none'}. Cells: test accuracy %, mean ± std over seeds; reward "
            "and calib KL of the chosen plan (the search objective); search s = the policy's wall time "
            "(evaluations included, the shared setup not); load = 1-min load average after the search.")


def model_tables(res: Results, summ: dict, model: str) -> list[str]:
    base = [r for r in res.rows.values() if r["model"] == model and r["policy"] == "unpruned"]
    head = f"## {model}"
    if base:
        acc, std = mean_std(100 * r["test_acc"] for r in base)
        head += f" (unpruned {acc:.2f} ± {std:.2f} %, n={len(base)})"
    lines = [head, ""]
    for budget in sorted({k[1] for k in summ if k[0] == model}, key=_budget_order):
        for evals in sorted({k[3] for k in summ if k[0] == model and k[1] == budget}):
            lines += [f"### {Budget(*_parse_name(budget)).label()}, {evals} evaluations", "",
                      ("| policy | evaluations | test acc % | reward | calib KL | MACs kept | latency ms | search s "
                      "(max) | load | n |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for policy in POLICIES:
                e = summ.get((model, budget, policy, evals))
                if e is None:
                    continue
                lines.append(f"| {policy} | {e['evaluations']:.0f} | {e['acc']:.2f} ± {e['std']:.2f} | "
                             f"{e['reward']:.4f} | {e['kl']:.3f} | {e['macs']:.3f} | {e['latency_ms']:.3f} | "
                             f"{e['search_s']:.1f} ({e['max_search_s']:.1f}) | {e['load']:.1f} | {e['n']} |")
            lines += latency_note(res, model, budget, evals) + [""]
    return lines


def latency_note(res: Results, model: str, budget: str, evals: int) -> list[str]:
    """For a latency budget: how far each final model's measured latency is from the budget (goal: 10 %)."""
    rows = latency_rows(res, model=model, budget=budget, evals=evals)
    if not rows:
        return []
    target = rows[0]["budget_kwargs"]["target_latency"]
    batch = rows[0]["budget_kwargs"]["latency_batch"]

    def within(values, goal: float = target) -> str:
        errs = [v / goal - 1 for v in values]
        return (f"{sum(abs(e) <= 0.1 for e in errs)}/{len(errs)} within 10 % ("
                + ", ".join(f"{r['policy']} {100 * e:+.1f}%" for r, e in zip(rows, errs)) + ")")

    first = (f"Latency budget {target:.4f} ms (batch {batch}, 2 threads). Each final model's median of "
             f"{LATENCY_RUNS} runs right after its search: {within(r['latency_ms'] for r in rows)}.")
    lines = ["", first]
    again = [r for r in rows if r.get("latency_rounds_ms")]
    if len(again) == len(rows):
        n = len(rows[0]["latency_rounds_ms"])
        unp = rows[0]["unpruned_rounds_ms"]
        lines.append(f"Timed again together with the unpruned model in {n} round-robin passes (median over the "
                     f"passes of the per-pass medians of {LATENCY_RUNS} runs; the unpruned model's per-pass "
                     f"medians {min(unp):.2f}-{max(unp):.2f} ms): "
                     f"{within(statistics.median(r['latency_rounds_ms']) for r in rows)}.")
        fraction = _parse_name(budget)[1]
        ref = rows[0].get("reference_ms") or [target / fraction]
        how = "one median" if len(ref) == 1 else f"the median of {len(ref)} medians ({min(ref):.2f}-{max(ref):.2f})"
        lines.append(f"The budget was {fraction:g} x {how} of the unpruned model taken before the searches "
                     f"({target / fraction:.2f} ms). The same passes as fractions of the unpruned model timed in "
                     f"the same pass (median over the passes; the machine's drift cancels, the budget's own "
                     f"reference error does not), against {fraction:g}: " + within(
                         (statistics.median(a / b for a, b in zip(r["latency_rounds_ms"], r["unpruned_rounds_ms"]))
                          for r in rows), fraction) + ".")
    return lines


def comparison_table(summ: dict) -> list[str]:
    lines = ["## Best control vs best RL policy", "",
             ("Best = highest mean test accuracy over seeds; difference = RL − control in accuracy points (mean of "
             "the means; in brackets mean ± std of the per-seed differences on the seeds both have)."), "",
             "| model | budget | evals | best control | best RL | difference (points) | ≥ 1 point |",
             "|---|---|---:|---|---|---:|---|"]
    for model, budget, evals in sorted({(k[0], k[1], k[3]) for k in summ},
                                       key=lambda t: (MODELS.index(t[0]) if t[0] in MODELS else 99,
                                                      _budget_order(t[1]), t[2])):
        ctl, rl = best_of(summ, model, budget, evals, CONTROLS), best_of(summ, model, budget, evals, AGENTS)
        if ctl is None or rl is None:
            continue
        diff = rl[1]["acc"] - ctl[1]["acc"]
        pd = paired_diff(rl[1], ctl[1])
        paired = f" ({pd[0]:+.2f} ± {pd[1]:.2f}, n={pd[2]})" if pd else ""
        lines.append(f"| {model} | {budget} | {evals} | {ctl[0]} {ctl[1]['acc']:.2f} | {rl[0]} {rl[1]['acc']:.2f} | "
                     f"{diff:+.2f}{paired} | {'yes' if diff >= 1 else 'no'} |")
    return lines + [""]


def correlation_table(res: Results) -> list[str]:
    keys = sorted({(r["model"], r["budget"], r["seed"]) for r in res.probes.values()})
    if not keys:
        return []
    lines = ["## Does the search reward predict the test accuracy?", "",
             ("Random allocations (probes, keep ratios uniform in [0, 1] per group, projected) and the chosen plans "
             "of that seed, all through the same final path. Spearman rank correlation of the test accuracy with "
             "the search reward (the reward named above) and with the calibration KL after "
             "the OBSPA reconstruction (negated: higher = better)."), "",
             ("| model | budget | seed | points | reward range | test acc range % | ρ(reward, acc) | "
             "ρ(−KL after reconstruction, acc) |"), "|---|---|---:|---:|---|---|---:|---:|"]
    for model, budget, seed in keys:
        pts = correlation_points(res, model, budget, seed)
        rw, kl, acc = (list(v) for v in zip(*pts))
        lines.append(f"| {model} | {budget} | {seed} | {len(pts)} | {min(rw):.4f}–{max(rw):.4f} | "
                     f"{100 * min(acc):.2f}–{100 * max(acc):.2f} | {spearman(rw, acc):+.2f} | "
                     f"{spearman([-k for k in kl], acc):+.2f} |")
    return lines + [""]


def _parse_name(name: str) -> tuple[str, float, int]:
    kind = "latency" if name.startswith("latency") else "flops"
    fraction, _, batch = name[len(kind):].partition("b")
    return kind, float(fraction), int(batch or 1)


def _budget_order(name: str) -> tuple:
    kind, frac, batch = _parse_name(name)
    return kind != "flops", batch, -frac


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------
def plot(res: Results, out: Path, seed: int = 0) -> list[Path]:
    """Per (model, budget): best-so-far reward per evaluation (seed `seed`) and reward vs test accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = [r for r in res.rows.values() if r.get("curve") and r.get("test_acc") is not None]
    colour = {p: plt.get_cmap("tab10")(i) for i, p in enumerate(POLICIES)}
    for model, budget in sorted({(r["model"], r["budget"]) for r in rows}):
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
        mine = [r for r in rows if (r["model"], r["budget"]) == (model, budget)]
        for r in sorted((r for r in mine if r["seed"] == seed), key=lambda r: POLICIES.index(r["policy"])):
            best = np.maximum.accumulate(r["curve"])
            if len(best) == 1:
                ax.axhline(best[0], color=colour[r["policy"]], ls="--", lw=1, label=f"{r['policy']} (1 eval)")
            else:
                ax.plot(np.arange(1, len(best) + 1), best, color=colour[r["policy"]], lw=1.3, label=r["policy"])
        ax.set(title=f"{model}, {budget}, seed {seed}: best reward so far", xlabel="evaluation",
               ylabel="search reward (exp(-KL))")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        probes = [p for p in res.probes.values() if (p["model"], p["budget"]) == (model, budget)]
        if probes:
            bx.scatter([p["reward"] for p in probes], [100 * p["test_acc"] for p in probes], c="grey", s=14,
                       label="random allocations")
        for r in mine:
            bx.scatter(r["reward"], 100 * r["test_acc"], color=colour[r["policy"]], s=22, marker="o",
                       label=r["policy"] if r["seed"] == seed else None)
        bx.set(title="chosen plans (all seeds) and probes", xlabel="search reward",
               ylabel="test accuracy % after OBSPA reconstruction")
        bx.grid(alpha=0.3)
        bx.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curves-{model}-{budget}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
def versions() -> str:
    from importlib import metadata
    out = [f"python {platform.python_version()}"]
    for dist in ("torch", "onnx", "onnxruntime", "numpy", "gymnasium"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    out.append(f"spa-prune {source_version()}")
    return ", ".join(out)


def source_version() -> str:
    """The commit of the code that ran, marked when spa/passes/tools differ from it (a shared working tree)."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "spa", "passes", "tools", "models")
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budgets", nargs="*", type=float, default=[0.3, 0.1], help="fractions of FLOPs kept")
    ap.add_argument("--latency", nargs="*", type=float, default=[0.5],
                    help="latency budgets as fractions of the unpruned latency (batch 1, 2 threads); run only "
                         "when spa.search.search takes target_latency")
    ap.add_argument("--latency-batch", type=int, default=1, help="batch size the latency budgets are stated at")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--evals", type=int, default=300, help="evaluation budget of every searching policy")
    ap.add_argument("--calib-samples", type=int, default=bench_quality.CALIB_N, help="calibration samples of the reward")
    ap.add_argument("--probes", type=int, default=12,
                    help="random allocations pruned per (model, budget) for the first seed (reward vs accuracy)")
    ap.add_argument("--reward", choices=REWARDS, default="recal",
                    help="recal: re-calibrated fidelity; fast / refit: fidelity after the fast one-pass / the "
                         "exact per-candidate OBSPA refit, anticipating the final path (default --out OUT/<reward>)")
    ap.add_argument("--quick", action="store_true", help="resnet1d_mnist1d, seed 0, keep 0.1, 20 evals, 3 probes")
    ap.add_argument("--resume", action="store_true", help="keep results.json's rows; skip rows measured without error")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--render", action="store_true", help="measure nothing: rewrite results.md and the PNGs")
    ap.add_argument("--remeasure-latency", action="store_true",
                    help=f"search nothing: time every latency setting's final models of --models/--seeds again in "
                         f"{LATENCY_ROUNDS} round-robin passes with the unpruned model (done after each latency "
                         f"setting anyway), then render")
    args = ap.parse_args(argv)
    if args.latency_batch < 1:
        ap.error(f"--latency-batch must be >= 1, got {args.latency_batch}")
    if args.quick:
        args.models, args.seeds, args.budgets, args.latency = ["resnet1d_mnist1d"], [0], [0.1], []
        args.evals, args.probes, args.out = 20, 3, args.out / "quick"
    if args.reward != "recal" and args.out == DEFAULT_OUT:
        args.out = args.out / args.reward
    return args


def budgets_of(args) -> list[Budget]:
    budgets = [Budget("flops", f) for f in args.budgets]
    if args.latency:
        if latency_supported():
            budgets += [Budget("latency", f, args.latency_batch) for f in args.latency]
        else:
            log("note: spa.search.search/SearchProblem.build take no target_latency yet: latency budget skipped")
    return budgets


def bench_subject(s: bench_quality.Subject, args, res: Results) -> None:
    """Every requested row of one (model, seed); results.json is rewritten after each row."""
    unpruned_ms = median_latency_ms(s.onnx_path, s.input_shape)  # batch 1, for the tables
    res.add_row({"model": s.model_name, "seed": s.seed, "budget": "none", "policy": "unpruned", "evals": 0,
                 "test_acc": s.onnx_acc, "macs_ratio": 1.0, "latency_ms": round(unpruned_ms, 4)})
    scores = None
    for budget in budgets_of(args):
        todo = [p for p in args.policies if not res.done((s.model_name, s.seed, budget.name, p, args.evals))]
        probe = args.probes and s.seed == args.seeds[0] and not res.probes_done(s.model_name, s.seed, budget.name,
                                                                                 args.probes)
        if not todo and not probe:
            continue
        st = build_setting(s, budget, scores, args.calib_samples, args.reward)
        scores = st.problem.scores
        log(f"{s.model_name} s{s.seed} {budget.name}: {len(st.problem.projector.action_groups)} action groups, "
            f"setup {st.setup_s:.1f} s (problem + teacher)")
        for policy in todo:
            res.add_row(one_row(st, policy, args))
            res.save()
        if budget.kind == "latency" and todo and remeasure_latency(res, args.out, s.model_name, s.seed,
                                                                    budget.name):
            res.save()
        if probe:
            for r in run_probes(st, args.probes, args.out):
                r.update(model=s.model_name, seed=s.seed, budget=budget.name)
                res.add_probe(r)
            res.save()


def one_row(st: Setting, policy: str, args) -> dict:
    s = st.subject
    base = {"model": s.model_name, "seed": s.seed, "budget": st.budget.name, "policy": policy, "evals": args.evals,
            "budget_kwargs": budget_kwargs(st.budget, st.unpruned_ms), "calib_samples": st.calib_samples,
            "reference_ms": st.reference_ms,
            "setup_s": round(st.setup_s, 3), "threads": THREADS, "criterion": CRITERION,
            "reward_kind": st.reward, "reward_mode": REWARDS[st.reward]}
    try:
        row = {**base, **run_policy(st, policy, args.evals, args.out)}
    except Exception as e:  # noqa: BLE001 - a benchmark: record and carry on
        traceback.print_exc()
        return {**base, "error": f"{type(e).__name__}: {e}", "load": loadavg()}
    log(f"  {s.model_name} s{s.seed} {st.budget.name} {policy}: test acc {row['test_acc']:.4f}, reward "
        f"{row['reward']:.4f}, MACs kept {row['macs_ratio']:.4f}, {row['evaluations']} evals "
        f"({row['measured']} measured), search {row['search_s']:.1f} s, prune {row['prune_s']:.1f} s "
        f"[load {row['load_search'][1][0]}]")
    return row


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(THREADS)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        return render(Results(args.out / "results.json", resume=True), args.out)
    if args.remeasure_latency:
        res = Results(args.out / "results.json", resume=True)
        settings = sorted({(r["model"], r["seed"], r["budget"]) for r in latency_rows(res)
                           if r["model"] in args.models and r["seed"] in args.seeds})
        for model, seed, budget in settings:
            done = remeasure_latency(res, args.out, model, seed, budget)
            log(f"{model} s{seed} {budget}: " + ("re-measured" if done else "skipped (a final model is missing)"))
        res.save()
        return render(res, args.out)
    command = shlex.join(["python", "tools/bench_search.py", *(sys.argv[1:] if argv is None else argv)])
    res = Results(args.out / "results.json", args.resume)
    res.runs.append({"command": command, "date": datetime.datetime.now(datetime.timezone.utc)
                     .strftime("%Y-%m-%d %H:%M UTC"), "versions": versions(), "cpus": os.cpu_count(),
                     "load": loadavg()})
    log(f"{command}\n  models {args.models}, seeds {args.seeds}, budgets {args.budgets} + latency {args.latency}, "
        f"policies {args.policies}, evals {args.evals}, out {args.out}")
    t0 = time.perf_counter()
    for model_name in args.models:
        for seed in args.seeds:
            bench_subject(bench_quality.prepare(model_name, seed, args.out, keep_bn=False), args, res)
            res.save()
    render(res, args.out)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def render(res: Results, out: Path) -> int:
    """results.md and the PNGs from the rows."""
    md = markdown(res)
    (out / "results.md").write_text(md + "\n")
    plots = plot(res, out)
    print(md)
    log(f"wrote {out / 'results.md'}, {', '.join(p.name for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
