"""End-to-end correction: the chosen allocation measured for real and the latency fraction bisected until the
measurement is within the band (see spa.latency). The search's problem comes in as an argument (its projector,
`apply`, `latency`): nothing here imports spa.search."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SpaError
from .timing import MIN_RUNS, measure_latency

BAND = (0.9, 1.0)


@dataclass
class Probe:
    fraction: float       # latency budget fraction given to the projector
    predicted_ms: float
    measured_ms: float
    kept: list[int]
    feasible: bool = True  # False: no allocation meets the fraction (kept is the smallest model allowed)
    repeats: list[float] | None = None  # every measurement when it was confirmed (measured_ms: their median)

    def to_json(self) -> dict:
        out = {"fraction": round(self.fraction, 6), "predicted_ms": round(self.predicted_ms, 4),
               "measured_ms": round(self.measured_ms, 4), "feasible": self.feasible}
        if self.repeats:
            out["repeats_ms"] = [round(m, 4) for m in self.repeats]
        return out


@dataclass
class LatencyFit:
    """The corrected allocation: kept counts, plan, the final probe's numbers and every probe."""

    kept: np.ndarray
    plan: object
    budget_ms: float
    fraction: float
    predicted_ms: float
    measured_ms: float
    converged: bool
    probes: list[Probe]
    band: tuple = BAND

    def to_json(self) -> dict:
        return {"budget_ms": round(self.budget_ms, 4), "measured_ms": round(self.measured_ms, 4),
                "predicted_ms": round(self.predicted_ms, 4), "fraction": round(self.fraction, 6),
                "measured_over_budget": round(self.measured_ms / self.budget_ms, 4), "converged": self.converged,
                "band": list(self.band), "probes": [p.to_json() for p in self.probes]}


def plan_timer(problem, runs: int = MIN_RUNS, warmup: int = 5):
    """kept -> measured median (ms) of the applied candidate, at the table's batch, thread count and clock."""
    table = problem.latency.table

    def measure(kept) -> float:
        model, *_ = problem.apply(np.asarray(kept))
        return measure_latency(model.graph.to_model(), table.batch, table.threads, runs, warmup,
                               input_shapes=problem.model.input_shapes, clock=table.clock)["median"]

    return measure


def fit_latency(problem, kept, budget_ms: float | None = None, *, measure=None, runs: int = MIN_RUNS,
                warmup: int = 5, band: tuple = BAND, max_steps: int = 8, confirm: int = 2,
                settle: float = 0.025, log=None) -> LatencyFit:
    """Measure the allocation `kept` for real and, when the median is outside [band[0], band[1]] x budget, bisect
    the latency fraction given to the projector (re-projecting the same desired ratios) until it is inside or
    `max_steps` probes were made. Each step first tries the proportional guess (the probe's prediction scaled by
    budget / measured) and falls back to the middle of the bracket when the guess leaves it (or to the whole
    model, fraction 1, when the guess lies beyond it and it was not measured yet). A probe that lands in the
    band is measured `confirm` more times and judged by the median of all its measurements: on a shared machine
    one median of 30 runs can land in the band during a quiet or a busy second and be 10-25 % off a moment
    later. The fit aims at the band's middle: it stops on a confirmed probe within `settle` x budget of it and
    otherwise goes on bisecting (until `max_steps`), so that a result is not left at the band's edge where the
    next reading falls out. `measure(kept) -> ms` replaces the real measurement (tests). Returns the in-band
    probe nearest the middle, else the largest measurement under the budget, else the smallest one."""
    lm = problem.latency
    if lm is None:
        raise SpaError("fit_latency needs a problem built with a latency table (target_latency / latency_table)")
    budget_ms = float(budget_ms if budget_ms is not None else problem.options.get("latency", {}).get("target_ms"))
    lo_ms, hi_ms = band[0] * budget_ms, band[1] * budget_ms
    target = 0.5 * (lo_ms + hi_ms)
    pj = problem.projector
    kept = np.asarray(kept, dtype=np.int64)
    ag = pj.action_groups
    rho = kept[ag] / np.maximum(pj.sizes[ag], 1)
    measure = measure or plan_timer(problem, runs, warmup)
    log = log or (lambda msg: None)
    measured: dict[bytes, float] = {}
    repeats: dict[bytes, list[float]] = {}   # the confirmed allocations' measurements
    probes: list[Probe] = []

    def probe(fraction: float, k: np.ndarray | None = None) -> Probe:
        feasible = True
        if k is None:
            proj = pj.with_budgets(latency=fraction).project(rho)
            k, feasible = proj.kept, proj.feasible
        k = np.asarray(k, dtype=np.int64)
        key = k.tobytes()
        if key not in measured:
            measured[key] = float(measure(k))
        p = Probe(fraction, pj.costs(k)["latency"] * lm.full_ms, measured[key], k.tolist(), feasible,
                  repeats.get(key))
        probes.append(p)
        log(f"latency probe {len(probes)}: fraction {fraction:.4f}, predicted {p.predicted_ms:.3f} ms, "
            f"measured {p.measured_ms:.3f} ms (budget {budget_ms:.3f} ms)")
        return p

    def inside(p: Probe) -> bool:
        return lo_ms <= p.measured_ms <= hi_ms

    def confirmed(p: Probe) -> Probe:
        """An in-band probe measured `confirm` more times: its median decides (a later visit reuses it)."""
        if confirm < 1 or not inside(p) or p.repeats:
            return p
        k = np.asarray(p.kept, dtype=np.int64)
        p.repeats = repeats[k.tobytes()] = [p.measured_ms, *(float(measure(k)) for _ in range(confirm))]
        p.measured_ms = measured[k.tobytes()] = float(np.median(p.repeats))
        log(f"latency probe {len(probes)} confirmed: {', '.join(f'{m:.3f}' for m in p.repeats)} ms, median "
            f"{p.measured_ms:.3f} ms")
        return p

    def settled(p: Probe) -> bool:
        return inside(p) and abs(p.measured_ms - target) <= settle * budget_ms

    p = confirmed(probe(pj.budgets.get("latency", min(budget_ms / lm.full_ms, 1.0)), kept))
    lo, hi = 0.0, 1.0      # bracket of fractions: measurements below the band's middle at lo, above it at hi
    while not settled(p) and len(probes) < max_steps:
        if p.measured_ms > target:
            if p.measured_ms > hi_ms and (not p.feasible or p.kept == pj.minimum().tolist()):
                break       # the smallest model the constraints allow is still over the band
            hi = min(hi, p.fraction)
        else:
            if p.fraction >= 1.0:
                break       # the whole model is under the middle: nothing left to give back
            lo = max(lo, p.fraction)
        if hi - lo < 1e-6:
            break
        guess = p.predicted_ms * target / max(p.measured_ms, 1e-12) / lm.full_ms
        repeat = sum(q.kept == p.kept for q in probes) > 1
        if lo < guess < hi and not repeat:
            nxt = guess
        elif guess >= hi == 1.0 and not any(q.fraction >= 1.0 for q in probes):
            nxt = 1.0       # the whole model first: if even it is under the band, the search is over
        else:
            nxt = 0.5 * (lo + hi)
        p = confirmed(probe(nxt))
    best = min((q for q in probes if inside(q)), key=lambda q: abs(q.measured_ms - target), default=None)
    converged = best is not None
    if best is None:
        under = [q for q in probes if q.measured_ms <= hi_ms]
        best = max(under, key=lambda q: q.measured_ms) if under else min(probes, key=lambda q: q.measured_ms)
    final = np.asarray(best.kept, dtype=np.int64)
    return LatencyFit(final, pj.plan(final), budget_ms, best.fraction, best.predicted_ms, best.measured_ms,
                      converged, probes, tuple(band))
