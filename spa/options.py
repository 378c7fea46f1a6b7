"""What a pruning run is asked to do, validated once.

`PruneOptions` is the one description of a run that the CLI and the Python API share: the CLI builds it from
its flags, `spa.prune(..., ratio=0.5)` from keywords, and `validated()` checks every value's domain and every
combination with the same one-line messages (they name the CLI flag, which is what users type). The passes
read the options; none re-checks them.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
from dataclasses import dataclass, field, fields, replace

from .errors import SpaError
from .memory import DEFAULT_MEMORY_LIMIT_GB

ALLOCATIONS = ("auto", "uniform", "banded", "global")
MEASURED_ALLOCATION = "auto"      # uniform, or banded where its plan differs and measures better (spa.driver)
DEFAULT_IMPORTANCE = "obspa"      # OBS saliencies on data (or synthesized inputs), then least-squares refit
DEFAULT_ALLOCATION = MEASURED_ALLOCATION
FAST_IMPORTANCE = "l2"            # --fast: magnitude ranking, no data pass, no reconstruction
FAST_ALLOCATION = "uniform"
DATA_CRITERIA = ("taylor", "snip", "grasp", "crop", "obs", "obspa")  # read activations or gradients (need torch)
COMPENSATIONS = ("similarity",)
ROUND_AUTO = "auto"               # --round-to's default: kernel-friendly widths per group (spa.select.kernel_steps)
LARGEST_COUNT = 2**31 - 1   # counts (positions, samples, channels) beyond this are nonsense, not big models
LARGEST_SEED = 2**32 - 1    # numpy's seed range


def is_whole(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(flag: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                 whole: bool = False) -> None:
    """One option's domain as a one-line SpaError: finite (NaN and inf never pass), whole when asked, within
    [low, high] (open ends when asked). None (the option not given) passes."""
    if value is None:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and (not whole or float(value).is_integer()) \
        and (low is None or (value > low if low_open else value >= low)) \
        and (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    if whole and low is not None and is_whole(value) and value < low:
        raise SpaError(f"{flag} must be at least {_fmt(low)}, got {value}")
    if high is None and low is not None:
        raise SpaError(f"{flag} must be a finite number {'>' if low_open else '>='} {_fmt(low)}, got {value}")
    lo = "(-inf" if low is None else ("(" if low_open else "[") + _fmt(low)
    hi = "inf)" if high is None else _fmt(high) + (")" if high_open else "]")
    raise SpaError(f"{flag} must be {'a whole number ' if whole else ''}in {lo}, {hi}, got {value}")


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def check_seed(value, flag: str = "--seed") -> None:
    check_number(flag, value, low=0, high=LARGEST_SEED, whole=True)


def check_count(flag: str, value, *, minimum: int = 1) -> None:
    """A whole number of things (units, samples, positions, evaluations): an int in [minimum, 2**31)."""
    check_number(flag, value, low=minimum, high=LARGEST_COUNT, whole=True)


def check_counts(pairs, *, minimum: int = 1) -> None:
    """(flag, value) pairs of whole-number options: each None or in [minimum, LARGEST_COUNT]."""
    for flag, value in pairs:
        check_count(flag, value, minimum=minimum)


def check_fraction(flag: str, value, *, low_open: bool = True, high_open: bool = False) -> None:
    """A fraction in (0, 1] (or the interval the flags ask for); NaN is never in range."""
    check_number(flag, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


def check_positive(flag: str, value) -> None:
    """A finite number > 0 (a budget in ms, a tolerance, a memory limit in GB)."""
    check_number(flag, value, low=0.0, low_open=True)


def check_selection(*, ratio, target_flops, max_ratio, allocation, min_channels, round_to) -> None:
    """The selection's options (shared by the driver and `spa.select.select`)."""
    if (ratio is None) == (target_flops is None):
        raise SpaError("give exactly one of --ratio and --target-flops")
    if ratio is not None:
        check_fraction("--ratio", ratio, low_open=False, high_open=True)
    if target_flops is not None:
        check_fraction("--target-flops", target_flops)
    check_fraction("--max-ratio", max_ratio)
    if allocation not in ALLOCATIONS:
        raise SpaError(f"unknown allocation '{allocation}' (choose from {', '.join(ALLOCATIONS)})")
    if round_to == ROUND_AUTO:
        round_to = 1
    if not (is_whole(min_channels) and is_whole(round_to)) or min_channels < 1 or round_to < 1:
        raise SpaError("--min-channels and --round-to must be >= 1 (--round-to also takes 'auto')")
    check_count("--min-channels", min_channels)
    check_count("--round-to", round_to)


def check_input_range(ranges, *, calib, fast) -> None:
    """--input-range: name -> (mean, std), a finite mean and a positive finite std; it sets the range of the
    data-free mode's synthesized inputs, so with calibration data or --fast (no data pass) it would be ignored."""
    if not isinstance(ranges, dict) or not ranges:
        raise SpaError("--input-range takes [NAME=]MEAN,STD (a dict of input name -> (mean, std) in the API)")
    for name, value in ranges.items():
        try:
            mean, std = (float(v) for v in value)
        except (TypeError, ValueError):
            raise SpaError(f"--input-range {name}: expected (mean, std), got {value!r}") from None
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise SpaError(f"--input-range {name}: the mean must be finite and the std positive, got {mean:g}, {std:g}")
    if calib is not None:
        raise SpaError("--input-range sets the range of synthesized inputs; with --calib your samples are used: drop one")
    if fast:
        raise SpaError("--input-range sets the range of synthesized inputs; --fast runs no data pass: drop one")


def check_data_options(*, positions, damp, samples, dbscan, seed=0) -> None:
    """Bad numbers for the data-driven passes are one-line errors before any work (sklearn and torch would
    otherwise raise deep inside, or silently accept a negative dampening)."""
    if positions is not None:
        check_count("--positions", positions)
    if damp is not None and not (damp >= 0 and math.isfinite(damp)):
        raise SpaError(f"--damp must be >= 0, got {damp}")
    check_count("--synth-samples", samples)
    if dbscan is not None:
        eps, min_samples = dbscan
        if not (eps > 0 and math.isfinite(eps)) or min_samples < 1:
            raise SpaError(f"--dbscan needs EPS > 0 and MIN_SAMPLES >= 1, got {eps},{min_samples}")
    check_seed(seed)


@dataclass(frozen=True)
class PruneOptions:
    """Every option of a pruning run (defaults are the CLI's). `validated()` returns a checked copy with the
    defaults that depend on other options resolved: OBS scoring, the default allocation and reconstruction,
    or with `fast` magnitude ranking and no value pass."""

    # what to remove: exactly one of ratio / target_flops / plan_file
    ratio: float | None = None
    target_flops: float | None = None
    plan_file: str | None = None
    allocation: str | None = None  # None: DEFAULT_ALLOCATION (FAST_ALLOCATION with fast)
    # how units are ranked
    importance: str | None = None  # None: DEFAULT_IMPORTANCE (FAST_IMPORTANCE with fast)
    fast: bool = False             # the instant path: magnitude ranking, no reconstruction (fine-tune afterwards)
    aggregation: str = "sum"
    normalization: str = "mean"
    # constraints on the selection
    min_channels: int = 1
    round_to: int | str = "auto"  # kept units a multiple of N; "auto": kernel-friendly widths for a budget (1: off)
    max_ratio: float = 1.0
    exclude: tuple = ()
    # data for scoring and for the value passes
    calib: object = None          # a .npz path, an image folder, or a spa.calib.Calib; None: data-free
    calib_limit: int | None = None
    loss: str = "auto"
    samples: int = 64             # synthesized inputs in data-free mode
    synth_steps: int | None = None  # data-free: most model-inversion steps (0: noise); None: spa.synthesis's default
    input_range: dict | None = None  # data-free: input name ("*": every float input) -> (mean, std) per sample;
    #                                  None: read from each input's first layer (spa.synthesis.input_range)
    seed: int = 0
    positions: int | None = None
    damp: float | None = None
    exact_hessians: bool = False  # OBS scores wide convs on their exact Hessian too (no Kronecker factors)
    # value passes after the structural cut (each reports fidelity)
    reconstruct: bool | None = None   # None: on unless fast
    recalibrate: bool = False
    compensate: str | None = None
    dbscan: tuple | None = None
    fold_constants: bool = False
    # checks and outputs
    verify: bool = True
    rtol: float = 1e-4
    strict: bool = False
    input_shapes: dict = field(default_factory=dict)
    save_plan: str | None = None
    max_drop: float | None = None  # fidelity guard: the most the held-out fidelity may drop, in percent
    # pattern pruning inside the kernels (spa.patterns), after the channel cut when one is asked
    patterns: int | None = None    # at most K non-zero positions per conv kernel (None: no patterns)
    connectivity: float = 0.0      # with patterns: the share of each patterned conv's kernels emptied
    sparse_storage: bool = False   # with patterns: write patterned weights compactly (rebuilt at load)
    pattern_assignment: dict | None = None   # with patterns: conv node name -> (K, connectivity), a searched one
    memory_limit_gb: float = DEFAULT_MEMORY_LIMIT_GB  # bounds analysed tensors and the data a run makes

    @classmethod
    def from_keywords(cls, **kwargs) -> PruneOptions:
        """Keywords of `spa.prune` / `driver.prune`; an unknown one is a TypeError, as for any function."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"prune() got an unexpected keyword argument '{unknown[0]}'")
        kwargs = {k: v for k, v in kwargs.items() if not (k in ("exclude", "input_shapes") and v is None)}
        if "exclude" in kwargs:
            kwargs["exclude"] = tuple(kwargs["exclude"])
        return cls(**kwargs)

    @property
    def value_passes(self) -> bool:
        """Whether a pass after the cut changes weight values (they need the verified structure first)."""
        return bool(self.reconstruct or self.recalibrate or self.compensate)

    def validated(self) -> PruneOptions:
        resolved = replace(self, **resolved_defaults(self))
        if self.patterns is not None:
            check_patterns(resolved)
        if resolved.plan_file is None:
            check_selection(ratio=resolved.ratio, target_flops=resolved.target_flops, max_ratio=self.max_ratio,
                            allocation=resolved.allocation, min_channels=self.min_channels, round_to=self.round_to)
        check_data_options(positions=self.positions, damp=self.damp, samples=self.samples, dbscan=self.dbscan,
                           seed=self.seed)
        check_positive("--rtol", self.rtol)
        check_positive("--memory-limit", self.memory_limit_gb)
        if self.calib_limit is not None:
            check_count("--calib-samples", self.calib_limit)
        if self.synth_steps is not None:
            check_count("--synth-steps", self.synth_steps, minimum=0)
        if self.input_range is not None:
            check_input_range(self.input_range, calib=resolved.calib, fast=resolved.fast)
        if self.max_drop is not None:
            check_number("--max-drop", self.max_drop, low=0.0, high=100.0)
            if not resolved.verify:
                raise SpaError("--max-drop measures fidelity after verification; drop --no-verify")
        check_torch(resolved)
        if resolved.recalibrate and resolved.calib is None:
            raise SpaError("--recalibrate needs calibration data (--calib FILE.npz or an image folder)")
        if resolved.compensate not in (None, *COMPENSATIONS):
            raise SpaError(f"unknown compensation '{resolved.compensate}' (choose from: {', '.join(COMPENSATIONS)})")
        if resolved.value_passes and not resolved.verify:
            hint = "" if self.reconstruct or self.fast else \
                " or add --fast (the default reconstructs: magnitude ranking only with --fast)"
            raise SpaError(f"reconstruction and compensation need verification (they report fidelity); drop "
                           f"--no-verify{hint}")
        if self.patterns is None and (self.sparse_storage or self.connectivity):
            raise SpaError("--sparse-storage and --connectivity need --patterns K")
        if resolved.fold_constants and not resolved.verify:
            raise SpaError("--fold-constants needs verification (it measures fidelity); drop --no-verify")
        return resolved


def resolved_defaults(options: PruneOptions) -> dict:
    """The values of the options left at None: the default mode (OBS scoring, reconstruction) or, with --fast,
    magnitude ranking without any pass that reads data. --fast with a data criterion or --reconstruct is a
    contradiction, refused."""
    if options.fast:
        if options.importance in DATA_CRITERIA:
            raise SpaError(f"--fast ranks by weights only; --importance {options.importance} reads data (drop --fast "
                           f"for it)")
        if options.reconstruct:
            raise SpaError("--fast skips reconstruction; drop --fast or --reconstruct")
    importance = options.importance or (FAST_IMPORTANCE if options.fast else DEFAULT_IMPORTANCE)
    allocation = options.allocation or (FAST_ALLOCATION if options.fast else DEFAULT_ALLOCATION)
    reconstruct = options.reconstruct if options.reconstruct is not None else not options.fast
    cut = {}
    if options.patterns is not None and options.ratio is None and options.target_flops is None \
            and options.plan_file is None:
        cut = {"ratio": 0.0}   # patterns alone: the channel cut removes nothing
    return {"importance": importance, "allocation": allocation, "reconstruct": reconstruct, **cut}


def check_patterns(options: PruneOptions) -> None:
    """--patterns K (1..24), --connectivity in [0, 1), --sparse-storage only with patterns; no fidelity guard
    yet (it scales the channel cut only)."""
    check_number("--patterns", options.patterns, low=1, high=24, whole=True)
    check_number("--connectivity", options.connectivity, low=0.0, high=1.0, high_open=True)
    for name, (k, connectivity) in (options.pattern_assignment or {}).items():
        check_number(f"K of '{name}'", k, low=1, high=24, whole=True)
        check_number(f"connectivity of '{name}'", connectivity, low=0.0, high=1.0, high_open=True)
    if options.max_drop is not None:
        raise SpaError("--max-drop does not scale --patterns yet; drop one of them")


def needs_torch(options: PruneOptions) -> bool:
    """Whether the run reads data through the torch lowering (a data criterion, or a value pass)."""
    return options.importance in DATA_CRITERIA or bool(options.reconstruct or options.recalibrate)


def check_torch(options: PruneOptions) -> None:
    """The default mode runs the model in torch (an optional dependency): say how to get it, or --fast."""
    if needs_torch(options) and importlib.util.find_spec("torch") is None:
        what = "reconstruction" if options.importance not in DATA_CRITERIA else f"--importance {options.importance}"
        raise SpaError(f"{what} needs torch: pip install 'spa-prune[criteria]' (or add --fast: magnitude ranking "
                       f"without reconstruction, for models you fine-tune afterwards)")
