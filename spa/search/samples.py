"""The calibration samples a `CalibEvaluator` scores on: loading, the statistics / scoring split, batches for
onnxruntime and torch chunks, and onnxruntime runs over a slice (see reward.py)."""
from __future__ import annotations

import numpy as np

from ..calib import input_specs
from ..errors import SpaError
from ..execution import batch_size_for, chunks
from ..importance import ScoreInputs
from ..latency import free_batch_dim
from ..passes.verify import open_session
from ..synthesis import model_data


class CalibSamples:
    """`feeds` (the first n samples, n a whole number of batches when the model fixes its batch dim), `labels` of
    the scoring samples (or None), `stats_slice` (re-calibration statistics) and `score_slice` (scoring): both the
    whole set without `score_split`, else the last `score_split` of the samples are scored and the rest give the
    statistics."""

    def __init__(self, problem, calib, samples: int | None, seed: int, batch_size: int,
                 score_split: float | None):
        feeds, labels = self.load(problem, calib, samples, seed)
        n = int(next(iter(feeds.values())).shape[0])
        bs, fixed = batch_size_for(problem.model.graph, batch_size, feeds)
        if fixed:  # a fixed batch dim: whole batches only
            n -= n % bs
            if n == 0:
                raise SpaError(f"fewer calibration samples than the model's fixed batch size {bs}")
        n_score = n if score_split is None else max(bs if fixed else 1, round(n * score_split))
        if fixed:
            n_score -= n_score % bs
        n_stats = n if score_split is None else n - n_score
        if n_stats <= 0:
            raise SpaError("score_split leaves no samples for the re-calibration statistics")
        self.batch_size, self.fixed_batch = bs, fixed
        # an export with a static batch dim that computes per sample (probed above) runs in onnxruntime with
        # the dim freed (inputs/outputs only), instead of one session run per sample
        declared = [s[0][0] for s in input_specs(problem.original_proto()).values() if s[0]]
        self.free_batch = not fixed and any(isinstance(d, int) and d != bs for d in declared)
        self.feeds = {k: np.ascontiguousarray(v[:n]) for k, v in feeds.items()}
        self.stats_slice = slice(0, n_stats)
        self.score_slice = slice(n - n_score, n)
        self.labels = None if labels is None else np.asarray(labels[:n])[self.score_slice]
        self.n_stats, self.n_score = n_stats, n_score

    @staticmethod
    def load(problem, calib, samples: int | None, seed: int):
        """(inputs, labels or None): the calibration data (a seeded subset of `samples`), or without it `samples`
        (64) inputs synthesized as the importance criteria do."""
        if calib is not None:
            data = calib.subset(samples, seed) if samples else calib
            return data.inputs, data.labels
        feeds, _ = model_data(ScoreInputs(problem.analysis, None, samples=samples or 64, seed=seed))
        return feeds, None

    def slice(self, sl: slice) -> dict[str, np.ndarray]:
        return {k: v[sl] for k, v in self.feeds.items()}

    def batches(self, sl: slice) -> list[dict[str, np.ndarray]]:
        start, stop = sl.start, sl.stop
        return [{k: v[i:min(i + self.batch_size, stop)] for k, v in self.feeds.items()}
                for i in range(start, stop, self.batch_size)]

    def chunks(self, sl: slice) -> list:
        """Torch chunks of slice `sl` (spa.execution.chunks: whole batches when the batch dim is fixed)."""
        return list(chunks(self.slice(sl), sl.stop - sl.start, (self.batch_size, self.fixed_batch)))

    def run_ort(self, proto, sl: slice, threads: int | None, own: bool = False) -> list[np.ndarray]:
        """Outputs over the batches of slice `sl`; `own`: the proto may be changed (a candidate's copy)."""
        if self.free_batch:
            proto = free_batch_dim(proto, copy=not own)
        sess = _session(proto, threads)
        parts = [sess.run(None, b) for b in self.batches(sl)]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _session(proto, threads: int | None):
    """A CPU session with `threads` intra-op threads (onnxruntime's default without)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return open_session(proto, opts)
