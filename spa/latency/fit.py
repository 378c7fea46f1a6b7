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
    pj = problem.projector
    fit = _Bisection(problem, kept, budget_ms, measure or plan_timer(problem, runs, warmup), band, confirm, settle,
                     log or (lambda msg: None))
    p = fit.confirmed(fit.probe(pj.budgets.get("latency", min(budget_ms / lm.full_ms, 1.0)), fit.kept))
    lo, hi = 0.0, 1.0      # bracket of fractions: measurements below the band's middle at lo, above it at hi
    while not fit.settled(p) and len(fit.probes) < max_steps:
        if p.measured_ms > fit.target:
            if p.measured_ms > fit.hi_ms and (not p.feasible or p.kept == pj.minimum().tolist()):
                break       # the smallest model the constraints allow is still over the band
            hi = min(hi, p.fraction)
        else:
            if p.fraction >= 1.0:
                break       # the whole model is under the middle: nothing left to give back
            lo = max(lo, p.fraction)
        if hi - lo < 1e-6:
            break
        p = fit.confirmed(fit.probe(fit.next_fraction(p, lo, hi)))
    best = fit.best()
    final = np.asarray(best.kept, dtype=np.int64)
    return LatencyFit(final, pj.plan(final), budget_ms, best.fraction, best.predicted_ms, best.measured_ms,
                      fit.inside(best), fit.probes, tuple(band))


class _Bisection:
    """The state of one `fit_latency`: every allocation measured (by its kept counts), the confirmed ones'
    repeated measurements, the probes in order."""

    def __init__(self, problem, kept, budget_ms: float, measure, band: tuple, confirm: int, settle: float, log):
        self.pj, self.lm = problem.projector, problem.latency
        self.budget_ms, self.measure, self.confirm, self.settle, self.log = budget_ms, measure, confirm, settle, log
        self.lo_ms, self.hi_ms = band[0] * budget_ms, band[1] * budget_ms
        self.target = 0.5 * (self.lo_ms + self.hi_ms)
        self.kept = np.asarray(kept, dtype=np.int64)
        ag = self.pj.action_groups
        self.rho = self.kept[ag] / np.maximum(self.pj.sizes[ag], 1)
        self.measured: dict[bytes, float] = {}
        self.repeats: dict[bytes, list[float]] = {}   # the confirmed allocations' measurements
        self.probes: list[Probe] = []

    def probe(self, fraction: float, k: np.ndarray | None = None) -> Probe:
        """The allocation at this latency fraction (re-projecting the desired ratios), or `k`, measured once."""
        feasible = True
        if k is None:
            proj = self.pj.with_budgets(latency=fraction).project(self.rho)
            k, feasible = proj.kept, proj.feasible
        k = np.asarray(k, dtype=np.int64)
        key = k.tobytes()
        if key not in self.measured:
            self.measured[key] = float(self.measure(k))
        p = Probe(fraction, self.pj.costs(k)["latency"] * self.lm.full_ms, self.measured[key], k.tolist(), feasible,
                  self.repeats.get(key))
        self.probes.append(p)
        self.log(f"latency probe {len(self.probes)}: fraction {fraction:.4f}, predicted {p.predicted_ms:.3f} ms, "
                 f"measured {p.measured_ms:.3f} ms (budget {self.budget_ms:.3f} ms)")
        return p

    def inside(self, p: Probe) -> bool:
        return self.lo_ms <= p.measured_ms <= self.hi_ms

    def confirmed(self, p: Probe) -> Probe:
        """An in-band probe measured `confirm` more times: its median decides (a later visit reuses it)."""
        if self.confirm < 1 or not self.inside(p) or p.repeats:
            return p
        k = np.asarray(p.kept, dtype=np.int64)
        p.repeats = self.repeats[k.tobytes()] = [p.measured_ms, *(float(self.measure(k)) for _ in range(self.confirm))]
        p.measured_ms = self.measured[k.tobytes()] = float(np.median(p.repeats))
        self.log(f"latency probe {len(self.probes)} confirmed: {', '.join(f'{m:.3f}' for m in p.repeats)} ms, median "
                 f"{p.measured_ms:.3f} ms")
        return p

    def settled(self, p: Probe) -> bool:
        return self.inside(p) and abs(p.measured_ms - self.target) <= self.settle * self.budget_ms

    def next_fraction(self, p: Probe, lo: float, hi: float) -> float:
        """The proportional guess when it lies inside the bracket (lo, hi) and `p` did not repeat an allocation;
        the whole model when the guess lies beyond the top and it was not measured yet; else the middle."""
        guess = p.predicted_ms * self.target / max(p.measured_ms, 1e-12) / self.lm.full_ms
        repeat = sum(q.kept == p.kept for q in self.probes) > 1
        if lo < guess < hi and not repeat:
            return guess
        if guess >= hi == 1.0 and not any(q.fraction >= 1.0 for q in self.probes):
            return 1.0       # the whole model first: if even it is under the band, the search is over
        return 0.5 * (lo + hi)

    def best(self) -> Probe:
        """The in-band probe nearest the middle, else the largest measurement under the budget, else the
        smallest measurement."""
        best = min((q for q in self.probes if self.inside(q)), key=lambda q: abs(q.measured_ms - self.target),
                   default=None)
        if best is not None:
            return best
        under = [q for q in self.probes if q.measured_ms <= self.hi_ms]
        return max(under, key=lambda q: q.measured_ms) if under else min(self.probes, key=lambda q: q.measured_ms)
