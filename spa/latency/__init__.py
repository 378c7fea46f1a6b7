"""Latency budgets: a measured per-layer cost table, a latency model over removal masks, end-to-end correction.

`spa.latency` sits below the search (`spa.search` imports it, never the reverse) and needs neither gymnasium nor
torch. Modules: `timing` (onnxruntime sessions, timed runs, random feeds), `layers` (the timed layers, the model
fingerprint), `table` (`profile`, `LatencyTable`, `table_for`), `model` (`LatencyModel`), `fit` (`fit_latency`).

Latency is not MACs: small channel counts, depthwise convs and everything between the layers cost what they cost
on the deployment machine. So latency comes from measurements, made once per model and machine:

* **Cost table** (`profile`, CLI `spa-prune profile IN.onnx -o TABLE.json`): every MAC-carrying layer with a weight
  (Conv incl. grouped/depthwise, ConvTranspose, Gemm, MatMul with a constant 2-D operand) of the normalized model
  is timed alone - a one-node ONNX model with the layer's real input shape (batch set to the table's batch),
  attributes and random weights - on a grid of kept widths: {1/8, 1/4, 1/2, 3/4, 1} of its input and of its output
  channels (a 2-D grid; grouped/depthwise convs lose whole groups, so their grid is 1-D over kept groups; an axis
  that cannot shrink - the model input, a frozen classifier output - has one point). Conv channel counts above one
  block are rounded to whole blocks of `align` (8) channels: onnxruntime's blocked (NCHWc) CPU convolutions run a
  partial block at the cost of a full one or worse (measured on AVX-512: a 3x3 conv with 17-23 input channels is 1.5-3x
  slower than with 24 or 16). Layers with the same signature (op, shapes, attributes, grids) are measured once. The fixed cost of one `InferenceSession.run` call (a one-op
  model) is subtracted from every layer point, and each grid is made non-decreasing in both widths (each point
  becomes the smallest time of any wider configuration: timing noise only adds time, and the projector's
  bisection needs a monotone cost). The whole model is timed end to end in blocks of >= 30 runs spread over the
  profile (median of the block medians), so that layers and model see the same machine load on average.
* **Latency model** (`LatencyModel`): for a removed-unit mask, `CostModel.kept_fractions` gives each layer's kept
  input and output fraction (the same factors the MAC count uses), above one block rounded up to whole blocks of
  `align` channels on conv axes; the layer's time is the bilinear interpolation of its grid (below the smallest grid point: the
  smallest point's time). Monotone and stepped: growing a group inside its last block costs nothing, so the
  projector's greedy fill completes blocks by itself. The **rest** (activations, adds,
  pooling, copies: the end-to-end time minus the call overhead minus the layers at full width) is modelled as
  proportional to the kept fraction of the activations - the layers' output channels weighted by their output
  elements - and the call overhead as constant:

      predicted = overhead + scale * (sum_layers t_l(in_l, out_l) + rest * activation_fraction)

  `scale` calibrates: the prediction of the unpruned model equals the measured end-to-end median. It is 1 unless
  the standalone layers add up to more than the whole model (onnxruntime fuses activations into the layers; rest
  is then 0 and the layers are scaled down).
* **Budget**: `"latency"` is a third budget kind of `BudgetProjector`: the fraction kept of the table's
  end-to-end latency. `SearchProblem.build(target_latency=MS, latency_table=PATH)` converts milliseconds (at the
  table's batch and thread count) into that fraction.
* **End-to-end correction** (`fit_latency`): the chosen allocation is applied and timed for real (median of >= 30
  runs); if it is not within [0.9, 1.0] x the budget, the latency fraction handed to the projector is bisected -
  re-projecting the same desired ratios, i.e. the same allocation shape - until the measurement falls in the band
  or the step limit is reached. Every probe is reported.

Timings are wall-clock medians by default. On a machine shared with other work, a long run is preempted more
often than a short one, so medians inflate the whole model against its layers; `clock="cpu"` (one thread only)
times the calling thread's CPU time instead - the latency on an idle core - and the table records which clock
it used (the correction measures with the same one).

The table is JSON (format below, `LatencyTable.to_json`) with the machine (CPU model, core count), onnxruntime
version, thread count, batch and a fingerprint of the normalized model's structure. A table of another model is an
error; one from another machine or thread count loads with a warning (profile on the deployment machine, carry the
file, prune anywhere; the end-to-end correction is skipped when the table comes from another machine, since it
would measure this one).
"""
from __future__ import annotations

from .fit import BAND, LatencyFit, Probe, fit_latency, plan_timer
from .layers import ALIGN, GRID, LayerSpec, fingerprint, layer_specs
from .model import LatencyModel, interpolate
from .table import FORMAT, LatencyTable, cache_path, profile, table_for
from .timing import (
                     CLOCKS,
                     MIN_RUNS,
                     Timer,
                     free_batch_dim,
                     machine_info,
                     measure_latency,
                     ort_version,
                     runnable,
                     session,
                     time_session,
)

__all__ = ["ALIGN", "BAND", "CLOCKS", "FORMAT", "GRID", "MIN_RUNS", "LatencyFit", "LatencyModel", "LatencyTable",
           "LayerSpec", "Probe", "Timer", "cache_path", "fingerprint", "fit_latency", "free_batch_dim", "interpolate",
           "layer_specs", "machine_info", "measure_latency", "ort_version", "plan_timer", "profile", "runnable",
           "session", "table_for", "time_session"]
