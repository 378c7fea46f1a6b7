"""Pruning quality without fine-tuning: spa-prune's methods vs Torch-Pruning 1.6.1 at the same MACs.

    python tools/bench_quality.py --quick                       # 1 model, 1 seed: checks the harness
    python tools/bench_quality.py                               # every model x seed x target x method
    python tools/bench_quality.py --methods l1 --resume         # add rows, keep the ones already measured

A benchmark, not a test. For each trained network (`tools/train_bench.py`, cached), training seed and target
fraction F of MACs kept (`--target-flops`, default 0.7 0.5 0.3):

* ours: the trained model exported to ONNX (BN folded), pruned by `spa.driver.prune(onnx, out,
  target_flops=F, **OUR_METHODS[name])`, evaluated in onnxruntime on the test set. The calibration set
  (128 TRAIN samples, keys "input" and "labels") is written next to the export. A method whose keyword
  arguments the pruner does not accept yet (TypeError, SpaError, NotImplementedError) becomes a row
  "n/a (reason)" and the run goes on.
* Torch-Pruning on a deep copy of the SAME torch model: `tp.pruner.MetaPruner` (an alias of BasePruner in
  1.6.1) with one of TP_CRITERIA, global or local ranking, the classifier ignored. Its `pruning_ratio` is a
  channel fraction, so it is bisected until the pruned model's MACs (`models.counting.torch_macs_params`, the
  conv/linear count spa's cost model uses; both are printed for the unpruned model) are within `--mac-tol`
  (relative, default 1 %) of F x unpruned MACs; the closest probe wins when no probe gets that close. Each
  variant is evaluated as pruned and after BN re-estimation on the calibration samples ("+bn").
* the unpruned accuracy (torch and onnxruntime).

No fine-tuning anywhere. Outputs under `--out` (default .bench/quality/): results.json (every row),
results.md (mean ± std over seeds per model/method/target, with the command lines that produced the rows)
and accuracy_vs_flops.png.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning made 2-thread torch 4-10x
# slower under load (450 vs 105 ms per ResNet1d batch at load average 4). Read once, when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python tools/bench_quality.py`
    sys.path.insert(0, str(ROOT))

from spa.models import datasets
from spa.models.bench_nets import BENCH_MODELS, classifier
from spa.models.counting import torch_macs_params
from tools import train_bench

DEFAULT_OUT = ROOT / ".bench" / "quality"
CALIB = "<calib>"  # placeholder in OUR_METHODS, replaced by the model/seed's calibration .npz path
CALIB_N = 128

# ---- our methods: name -> keyword arguments of spa.driver.prune (edit freely) ----------------------------------
OUR_METHODS: dict[str, dict] = {  # every method uses --allocation uniform (same fraction in every group)
    "l1": {"importance": "l1", "allocation": "uniform"},
    "taylor": {"importance": "taylor", "calib": CALIB, "allocation": "uniform"},
    "obs": {"importance": "obs", "calib": CALIB, "allocation": "uniform"},
    "obspa": {"importance": "obspa", "calib": CALIB, "allocation": "uniform"},
    "obspa-global": {"importance": "obspa", "calib": CALIB},  # the default global per-MAC allocation
    "obspa-datafree": {"importance": "obspa", "allocation": "uniform"},
    "similarity": {"importance": "l1", "compensate": "similarity", "allocation": "uniform"},
    "recalibrate": {"importance": "l1", "calib": CALIB, "recalibrate": True, "allocation": "uniform"},
    "l1-refit": {"importance": "l1", "calib": CALIB, "reconstruct": True, "allocation": "uniform"},
}
# exceptions that mean "this method is not available (yet)": recorded as n/a, the run continues
NOT_AVAILABLE = (TypeError, NotImplementedError)

# ---- Torch-Pruning: criterion name -> (importance factory given the torch_pruning module, gradients it needs) --
TP_CRITERIA = {
    "magnitude": (lambda tp: tp.importance.MagnitudeImportance(p=2), None),  # TP's default "magnitude"
    "taylor": (lambda tp: tp.importance.TaylorImportance(), "mean-loss"),
    "hessian": (lambda tp: tp.importance.HessianImportance(), "per-sample-squared"),
    "lamp": (lambda tp: tp.importance.LAMPImportance(p=2), None),
}
TP_OPTIONAL = {  # not run by default; name them in --tp-methods
    "hessian-asis": (lambda tp: tp.importance.HessianImportance(), "tp-accumulate"),
}
TP_SCOPES = ("global", "local")


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# per model and seed: trained model, data, exports
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Subject:
    """Everything one (model, seed) needs; built once and shared by every target and method."""

    model_name: str
    seed: int
    model: nn.Module  # trained, eval mode; never pruned itself
    data: datasets.Dataset
    calib_x: np.ndarray
    calib_y: np.ndarray
    onnx_path: Path
    calib_path: Path
    input_shape: tuple[int, ...]
    torch_macs: int
    spa_macs: int | None
    torch_acc: float
    onnx_acc: float

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape)


def ort_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_accuracy(path, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((sess.run(None, {name: x[i:i + batch]})[0].argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def spa_total_macs(onnx_path, input_shape) -> int | None:
    """spa's cost-model MACs of the unpruned export at batch 1 (None if the analysis fails)."""
    try:
        import spa
        return int(spa.analyse(spa.load(str(onnx_path), {"input": (1, *input_shape)})).total_macs)
    except Exception as e:  # noqa: BLE001 - a benchmark: report and carry on
        log(f"  spa analysis of {onnx_path.name} failed: {type(e).__name__}: {e}")
        return None


def export_path(out: Path, model_name: str, seed: int, keep_bn: bool) -> Path:
    """Where `prepare` writes (and later runs find) the unpruned ONNX export of one trained model."""
    return out / f"{model_name}-seed{seed}{'-bn' if keep_bn else ''}.onnx"


def prepare(model_name: str, seed: int, out: Path, keep_bn: bool) -> Subject:
    """Trained model (cached), its ONNX export and calibration .npz (cached), unpruned MACs and accuracy."""
    model, _ = train_bench.train(model_name, seed)
    spec = BENCH_MODELS[model_name]
    data = datasets.load(spec.dataset)
    calib_x, calib_y = datasets.calib_subset(data.x_train, data.y_train, CALIB_N, seed=seed)
    onnx_path, calib_path = export_path(out, model_name, seed, keep_bn), out / f"calib-{model_name}-seed{seed}.npz"
    pt = train_bench.cache_paths(model_name, seed)[0]
    if not onnx_path.exists() or onnx_path.stat().st_mtime < pt.stat().st_mtime:
        train_bench.export_onnx(model, onnx_path, keep_bn, input_shape=spec.input_shape, check_x=data.x_test[:64])
    if not calib_path.exists():
        np.savez(calib_path, input=calib_x, labels=calib_y)
    torch_macs, _ = torch_macs_params(model, torch.zeros(1, *spec.input_shape))
    subject = Subject(model_name, seed, model, data, calib_x, calib_y, onnx_path, calib_path, spec.input_shape,
                      torch_macs, spa_total_macs(onnx_path, spec.input_shape),
                      train_bench.accuracy(model, data.x_test, data.y_test),
                      onnx_accuracy(onnx_path, data.x_test, data.y_test))
    agree = "agree" if subject.spa_macs == torch_macs else "DISAGREE"
    spa_macs = "n/a" if subject.spa_macs is None else f"{subject.spa_macs:,}"
    log(f"{model_name} seed {seed}: unpruned MACs torch {torch_macs:,} / spa {spa_macs} ({agree}); "
        f"test accuracy torch {subject.torch_acc:.4f}, onnxruntime {subject.onnx_acc:.4f}")
    return subject


# ---------------------------------------------------------------------------------------------------------------
# ours
# ---------------------------------------------------------------------------------------------------------------
def method_kwargs(name: str, calib_path: Path) -> dict:
    return {k: (str(calib_path) if v == CALIB else v) for k, v in OUR_METHODS[name].items()}


def run_ours(s: Subject, method: str, target: float, out: Path) -> dict:
    """One prune call of spa-prune and the onnxruntime accuracy of its output."""
    from spa import driver
    from spa.errors import SpaError

    kwargs = method_kwargs(method, s.calib_path)
    row = {"family": "ours", "kwargs": {k: str(v) for k, v in kwargs.items()}}
    dest = out / "pruned" / f"{s.model_name}-seed{s.seed}-{method}-f{target}.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        result = driver.prune(str(s.onnx_path), str(dest), target_flops=target,
                              input_shapes={"input": (1, *s.input_shape)}, **kwargs)
    except (*NOT_AVAILABLE, SpaError) as e:
        return {**row, "error": f"n/a ({type(e).__name__}: {e})"}
    except Exception as e:  # noqa: BLE001 - record, keep benchmarking the rest
        traceback.print_exc()
        return {**row, "error": f"error ({type(e).__name__}: {e})"}
    seconds = time.perf_counter() - t0
    rep = result.report
    return {**row, "macs_ratio": rep["macs"]["ratio"], "params_ratio": rep["params"]["ratio"],
            "accuracy": onnx_accuracy(dest, s.data.x_test, s.data.y_test), "time_s": seconds,
            "verification": rep["verification"]["status"], "timings_s": rep.get("timings_s")}


# ---------------------------------------------------------------------------------------------------------------
# Torch-Pruning
# ---------------------------------------------------------------------------------------------------------------
def tp_importance(criterion: str):
    import torch_pruning as tp

    return {**TP_CRITERIA, **TP_OPTIONAL}[criterion][0](tp)


def tp_gradients(model: nn.Module, x: np.ndarray, y: np.ndarray, kind: str | None) -> dict[str, torch.Tensor]:
    """The `.grad` each parameter must carry before TP scores it (computed once per model, eval mode).

    mean-loss: gradient of the mean cross-entropy over the calibration samples (TaylorImportance).
    per-sample-squared: mean over samples of the squared per-sample gradient, the diagonal Fisher that
      HessianImportance expects from `accumulate_grad` + its division by the sample count.
    tp-accumulate: exactly what TP 1.6.1's `HessianImportance.accumulate_grad` produces when called per sample
      as its docstring shows. Its membership test compares a parameter NAME with a dict keyed by parameter
      OBJECTS, so every call overwrites: only the last sample's squared gradient survives (count 1).
    """
    if kind is None:
        return {}
    model = copy.deepcopy(model).eval()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    params = dict(model.named_parameters())
    if kind == "mean-loss":
        model.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    imp = tp_importance("hessian") if kind == "tp-accumulate" else None
    total: dict[str, torch.Tensor] = {}
    for i in range(len(xt)):  # eval mode: one sample at a time gives the same per-sample gradients as
        model.zero_grad()     # TP's backward(retain_graph=True) over a batch loss, ~100x faster
        nn.functional.cross_entropy(model(xt[i:i + 1]), yt[i:i + 1]).backward()
        if imp is not None:
            imp.accumulate_grad(model)
            continue
        for n, p in params.items():
            if p.grad is not None:
                total[n] = total.get(n, 0) + p.grad.detach() ** 2
    if imp is not None:
        by_param = {id(p): n for n, p in params.items()}
        return {by_param[id(p)]: g / imp._counter[p] for p, g in imp._accu_grad.items()}
    assert kind == "per-sample-squared", kind
    return {n: g / len(xt) for n, g in total.items()}


def tp_prune(base: nn.Module, example: torch.Tensor, criterion: str, scope: str, ratio: float,
             grads: dict[str, torch.Tensor]) -> nn.Module:
    """A pruned deep copy of `base` (which stays untouched)."""
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    for n, p in model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    pruner = tp.pruner.MetaPruner(model, example, importance=tp_importance(criterion),
                                  global_pruning=scope == "global", pruning_ratio=ratio,
                                  ignored_layers=[classifier(model)])
    pruner.step()
    for p in model.parameters():
        p.grad = None
    return model


@dataclass
class Probe:
    ratio: float
    macs: int | None  # None: TP failed at this ratio (counted as over-pruned)
    seconds: float
    model: nn.Module | None = None
    error: str | None = None


class MacMatcher:
    """Bisection on TP's pruning_ratio towards a MACs target; probes are cached per variant across targets."""

    def __init__(self, s: Subject, criterion: str, scope: str, grads):
        self.s, self.criterion, self.scope, self.grads = s, criterion, scope, grads
        self.cache: dict[float, Probe] = {}

    def probe(self, ratio: float) -> Probe:
        if ratio not in self.cache:
            t0 = time.perf_counter()
            try:
                m = tp_prune(self.s.model, self.s.example, self.criterion, self.scope, ratio, self.grads)
                macs, err = torch_macs_params(m, self.s.example)[0], None
            except Exception as e:  # noqa: BLE001 - e.g. a layer emptied at a high ratio
                m, macs, err = None, None, f"{type(e).__name__}: {e}"
            self.cache[ratio] = Probe(ratio, macs, time.perf_counter() - t0, m, err)
        return self.cache[ratio]

    def match(self, target_macs: float, tol: float, max_iter: int = 24) -> tuple[Probe, list[Probe]]:
        """Closest probe to the target; stops as soon as one is within `tol` (relative)."""
        lo, hi, used = 0.0, 1.0, []
        best = None
        for _ in range(max_iter):
            p = self.probe(round((lo + hi) / 2, 9))
            used.append(p)
            if p.macs is not None and (best is None or abs(p.macs - target_macs) < abs(best.macs - target_macs)):
                best = p
            if p.macs is not None and abs(p.macs - target_macs) <= tol * target_macs:
                break
            if p.macs is None or p.macs < target_macs:
                hi = p.ratio
            else:
                lo = p.ratio
        if best is None:
            raise RuntimeError(f"no pruning ratio worked: {used[-1].error}")
        return best, used


def reestimate_bn(model: nn.Module, x: np.ndarray, batch: int = 32) -> nn.Module:
    """A copy whose BN running statistics are re-measured on the calibration samples (no weight changes).

    Stats are reset, momentum=None makes them a cumulative average over the batches, only the BN layers
    run in train mode; afterwards everything is back in eval mode.
    """
    model = copy.deepcopy(model).eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(torch.from_numpy(x[i:i + batch]))
    return model.eval()


def run_tp(s: Subject, matcher: MacMatcher, target: float, grad_seconds: float, tol: float) -> list[dict]:
    """Rows for one TP variant at one target: as pruned, and after BN re-estimation."""
    name = f"tp-{matcher.criterion}-{matcher.scope}"
    t0 = time.perf_counter()
    try:
        best, used = matcher.match(target * s.torch_macs, tol)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        err = f"error ({type(e).__name__}: {e})"
        return [{"method": m, "family": "tp", "error": err} for m in (name, name + "+bn")]
    search = time.perf_counter() - t0 + grad_seconds  # cached probes from other targets cost nothing here
    params = sum(p.numel() for p in best.model.parameters()) / sum(p.numel() for p in s.model.parameters())
    common = {"family": "tp", "macs_ratio": best.macs / s.torch_macs, "params_ratio": params,
              "pruning_ratio": best.ratio, "mac_error": best.macs / (target * s.torch_macs) - 1,
              "probes": len(used), "search_time_s": search}
    prune_s = best.seconds + grad_seconds
    acc = train_bench.accuracy(best.model, s.data.x_test, s.data.y_test)
    t1 = time.perf_counter()
    recal = reestimate_bn(best.model, s.calib_x)
    bn_s = time.perf_counter() - t1
    acc_bn = train_bench.accuracy(recal, s.data.x_test, s.data.y_test)
    return [dict(method=name, accuracy=acc, time_s=prune_s, **common),
            dict(method=name + "+bn", accuracy=acc_bn, time_s=prune_s + bn_s, **common)]


# ---------------------------------------------------------------------------------------------------------------
# results: json rows, markdown, plot
# ---------------------------------------------------------------------------------------------------------------
def row_key(r: dict) -> tuple:
    return (r["model"], r["seed"], r["method"], float(r["target"]))


class Results:
    """results.json: {"runs": [...], "rows": [...]}; rows replace older rows with the same key."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        old = json.loads(path.read_text()) if resume and path.exists() else {}
        self.runs = old.get("runs", [])
        self.rows = {row_key(r): r for r in old.get("rows", [])}

    def done(self, model, seed, method, target) -> bool:
        r = self.rows.get((model, seed, method, float(target)))
        return r is not None and not r.get("error")

    def add(self, row: dict) -> None:
        self.rows[row_key(row)] = row

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"runs": self.runs, "rows": list(self.rows.values())}, indent=1))
        tmp.replace(self.path)


def mean_std(xs) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(rows: list[dict], means=(("time", "time_s"), ("search", "search_time_s"))) -> dict:
    """(model, method, target) -> {acc, std, macs, n, errors} plus the mean of each (name, row key) in `means`."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], float(r["target"])), []).append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("accuracy") is not None]
        entry = {"n": len(ok), "errors": sorted({r["error"] for r in rs if r.get("error")})}
        if ok:
            entry["acc"], entry["std"] = mean_std([100 * r["accuracy"] for r in ok])
            entry["macs"] = statistics.fmean(r["macs_ratio"] for r in ok)
            for name, k in means:
                vals = [r[k] for r in ok if r.get(k) is not None]
                entry[name] = statistics.fmean(vals) if vals else None
        out[key] = entry
    return out


def method_order(methods) -> list[str]:
    rank = {m: i for i, m in enumerate(["unpruned", *OUR_METHODS])}
    return sorted(set(methods), key=lambda m: (rank.get(m, len(rank)), m))


def markdown(res: Results, tol: float) -> str:
    rows = list(res.rows.values())
    summ = summarize(rows)
    lines = ["# Pruning quality without fine-tuning", "",
             "Generated by `tools/bench_quality.py` from `results.json`. Commands that produced these rows:", ""]
    lines += [f"- `{r['command']}` ({r['date']}; {r['versions']})" for r in res.runs]
    lines += ["", ("Cells: test accuracy in %, mean ± std over seeds (n = seeds), and in brackets the fraction of "
              "MACs actually kept (mean). Ours: spa-prune on the BN-folded ONNX export, accuracy in onnxruntime. "
              f"TP: Torch-Pruning 1.6.1 MetaPruner, pruning_ratio bisected to within {100 * tol:g} % of the MACs "
              "target where reachable (see mac_error in results.json); '+bn' = BN statistics re-estimated on "
              f"the {CALIB_N} calibration samples. No fine-tuning. Time: mean seconds of the prune call (ours: "
              "spa.driver.prune with verification; TP: final prune incl. gradients, +bn also the BN re-estimation; "
              "in brackets the ratio search for that target incl. gradients, where probes already made for an "
              "earlier target are reused, not re-timed). Local TP pruning removes the same fraction of every "
              "group, so its MACs move in steps (up to ~6 % on ResNet-20 at keep 0.3); the closest probe is kept."),
              ""]
    notes: dict[str, int] = {}
    for model in [m for m in BENCH_MODELS if any(k[0] == m for k in summ)]:
        targets = sorted({k[2] for k in summ if k[0] == model and k[1] != "unpruned"}, reverse=True)
        base = summ.get((model, "unpruned", 1.0))
        head = f"## {model}"
        if base and base["n"]:
            head += f" (unpruned {base['acc']:.2f} ± {base['std']:.2f} %, n={base['n']})"
        lines += [head, "", "| method | " + " | ".join(f"keep {t:g}" for t in targets) + " | time (s) |",
                  "|---|" + "---:|" * (len(targets) + 1)]
        for method in method_order(k[1] for k in summ if k[0] == model and k[1] != "unpruned"):
            cells, times = [], []
            for t in targets:
                e = summ.get((model, method, t))
                if e is None:
                    cells.append("–")
                elif e["n"]:
                    cells.append(f"{e['acc']:.2f} ± {e['std']:.2f} [{e['macs']:.3f}] (n={e['n']})")
                    if e["time"] is not None:
                        times.append((e["time"], e.get("search")))
                else:
                    note = notes.setdefault(e["errors"][0], len(notes) + 1)
                    cells.append(f"n/a [{note}]")
            if times:
                t_mean = statistics.fmean(t for t, _ in times)
                searches = [s for _, s in times if s is not None]
                t_cell = f"{t_mean:.2f}" + (f" ({statistics.fmean(searches):.1f})" if searches else "")
            else:
                t_cell = "–"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {t_cell} |")
        lines.append("")
    if notes:
        lines += ["Not available / errors:", ""] + [f"{i}. {msg[:300]}" for msg, i in notes.items()] + [""]
    errs = [abs(r["mac_error"]) for r in rows if r.get("mac_error") is not None]
    if errs:
        within = sum(e <= tol for e in errs)
        lines += [(f"MAC matching of TP: {within}/{len(errs)} rows within {100 * tol:g} % of the target; "
                  f"median |error| {100 * statistics.median(errs):.2f} %, max {100 * max(errs):.2f} %."), ""]
    return "\n".join(lines)


def plot(res: Results, path: Path) -> None:
    """One subplot per model: accuracy (mean ± std over seeds) against the fraction of MACs kept.

    A method and its '+bn' variant share a colour; ours solid, Torch-Pruning dashed, '+bn' dotted.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(list(res.rows.values()))
    models = [m for m in BENCH_MODELS if any(k[0] == m for k in summ)]
    if not models:
        return
    bases = method_order(k[1].removesuffix("+bn") for k in summ if k[1] != "unpruned")
    colour = {b: plt.get_cmap("tab20")(i % 20) for i, b in enumerate(bases)}
    cols = min(2, len(models))
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 5 * rows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for method in method_order(k[1] for k in summ if k[0] == model):
            pts = sorted((e["macs"], e["acc"], e["std"]) for k, e in summ.items()
                         if k[0] == model and k[1] == method and e["n"])
            if not pts:
                continue
            if method == "unpruned":
                ax.axhline(pts[0][1], color="black", lw=1, ls=":", label=f"unpruned ({pts[0][1]:.2f} %)")
                continue
            tp_method, bn = method.startswith("tp-"), method.endswith("+bn")
            x, y, sd = zip(*pts)
            ax.errorbar(x, y, yerr=sd, ls=":" if bn else ("--" if tp_method else "-"), marker="s" if bn else "o",
                        ms=3, lw=1.2, capsize=2, color=colour[method.removesuffix("+bn")], label=method)
        ax.set_title(model)
        ax.set_xlabel("fraction of MACs kept")
        ax.set_ylabel("test accuracy (%), no fine-tuning")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
def versions(extra: tuple[str, ...] = ()) -> str:
    """Python and the versions of the distributions a benchmark's numbers depend on (plus `extra` ones)."""
    from importlib import metadata
    out = [f"python {platform.python_version()}"]
    for dist in ("torch", "torch-pruning", "onnx", "onnxruntime", *extra):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["all"], help=f"'all' or some of {', '.join(BENCH_MODELS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--targets", "--target-flops", nargs="+", type=float, default=[0.7, 0.5, 0.3],
                    help="fractions of MACs to keep")
    ap.add_argument("--methods", nargs="+", default=["all"], help=f"'all', 'none' or some of {', '.join(OUR_METHODS)}")
    ap.add_argument("--tp-methods", nargs="+", default=["all"],
                    help=f"'all', 'none' or some of {', '.join([*TP_CRITERIA, *TP_OPTIONAL])}")
    ap.add_argument("--tp-scopes", nargs="+", default=list(TP_SCOPES), choices=TP_SCOPES)
    ap.add_argument("--mac-tol", type=float, default=0.01, help="relative MACs tolerance of TP's ratio search")
    ap.add_argument("--keep-bn", action="store_true", help="prune an export that keeps BatchNormalization nodes")
    ap.add_argument("--quick", action="store_true", help="resnet20_digits, seed 0, into OUT/quick: checks the harness")
    ap.add_argument("--resume", action="store_true", help="keep results.json's rows; skip rows measured without error")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                    help="measure nothing: merge the results.json of these output folders (e.g. one run of ours "
                         "and one of Torch-Pruning, run side by side) into OUT and render the table and plot")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.out = ["resnet20_digits"], [0], args.out / "quick"
    args.models = list(BENCH_MODELS) if args.models == ["all"] else args.models
    args.methods = _choose(args.methods, list(OUR_METHODS), OUR_METHODS)
    args.tp_methods = _choose(args.tp_methods, list(TP_CRITERIA), {**TP_CRITERIA, **TP_OPTIONAL})
    for m in args.models:
        if m not in BENCH_MODELS:
            ap.error(f"unknown model {m!r}")
    return args


def _choose(given: list[str], default: list[str], known) -> list[str]:
    if given == ["all"]:
        return default
    if given == ["none"]:
        return []
    unknown = [g for g in given if g not in known]
    if unknown:
        sys.exit(f"bench_quality: unknown method(s) {unknown}; choose from {list(known)}")
    return given


def bench_subject(s: Subject, args, res: Results) -> None:
    """Every requested row of one (model, seed); results.json is rewritten after each target."""
    base = {"model": s.model_name, "seed": s.seed}
    res.add(dict(base, method="unpruned", family="baseline", target=1.0, macs_ratio=1.0, accuracy=s.onnx_acc,
                 torch_accuracy=s.torch_acc, torch_macs=s.torch_macs, spa_macs=s.spa_macs))
    tp_variants = {}
    for crit in args.tp_methods:
        kind = {**TP_CRITERIA, **TP_OPTIONAL}[crit][1]
        todo = [(sc, t) for sc in args.tp_scopes for t in args.targets
                if not (res.done(s.model_name, s.seed, f"tp-{crit}-{sc}", t)
                        and res.done(s.model_name, s.seed, f"tp-{crit}-{sc}+bn", t))]
        if not todo:
            continue
        t0 = time.perf_counter()
        grads = tp_gradients(s.model, s.calib_x, s.calib_y, kind)
        grad_s = time.perf_counter() - t0
        for sc in args.tp_scopes:
            tp_variants[(crit, sc)] = (MacMatcher(s, crit, sc, grads), grad_s)
    for target in args.targets:
        for method in args.methods:
            if res.done(s.model_name, s.seed, method, target):
                continue
            row = dict(base, method=method, target=target, **run_ours(s, method, target, args.out))
            res.add(row)
            log(f"  {s.model_name} s{s.seed} keep {target}: {method}: " + describe(row))
        for (crit, sc), (matcher, grad_s) in tp_variants.items():
            name = f"tp-{crit}-{sc}"
            if res.done(s.model_name, s.seed, name, target) and res.done(s.model_name, s.seed, name + "+bn", target):
                continue
            for row in run_tp(s, matcher, target, grad_s, args.mac_tol):
                row = dict(base, target=target, **row)
                res.add(row)
                log(f"  {s.model_name} s{s.seed} keep {target}: {row['method']}: " + describe(row))
        res.save()


def describe(row: dict) -> str:
    if row.get("error"):
        return row["error"][:200]
    extra = f", ratio {row['pruning_ratio']:.4f}, {row['probes']} probes, search {row['search_time_s']:.1f} s" \
        if "pruning_ratio" in row else ""
    return f"acc {row['accuracy']:.4f}, MACs kept {row['macs_ratio']:.4f}, {row['time_s']:.2f} s{extra}"


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        res = Results(args.out / "results.json", resume=False)
        for folder in args.merge:
            part = Results(folder / "results.json", resume=True)
            res.runs.extend(part.runs)
            for row in part.rows.values():
                res.add(row)
        res.save()
        md = markdown(res, args.mac_tol)
        (args.out / "results.md").write_text(md + "\n")
        plot(res, args.out / "accuracy_vs_flops.png")
        print(md)
        return 0
    command = shlex.join(["python", "tools/bench_quality.py", *(sys.argv[1:] if argv is None else argv)])
    res = Results(args.out / "results.json", args.resume)
    res.runs.append({"command": command, "date": datetime.datetime.now(datetime.timezone.utc)
                     .strftime("%Y-%m-%d %H:%M UTC"), "versions": versions(), "cpus": os.cpu_count()})
    log(f"{command}\n  models {args.models}, seeds {args.seeds}, targets {args.targets}, ours {args.methods}, "
        f"TP {args.tp_methods} x {args.tp_scopes}, out {args.out}")
    t0 = time.perf_counter()
    for model_name in args.models:
        for seed in args.seeds:
            bench_subject(prepare(model_name, seed, args.out, args.keep_bn), args, res)
            res.save()
    md = markdown(res, args.mac_tol)
    (args.out / "results.md").write_text(md + "\n")
    plot(res, args.out / "accuracy_vs_flops.png")
    print(md)
    log(f"done in {time.perf_counter() - t0:.0f} s: {args.out / 'results.json'}, results.md, accuracy_vs_flops.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
