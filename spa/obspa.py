"""OBSPA: Optimal-Brain-Surgeon saliencies on coupled groups, and least-squares reconstruction of the consumers.

Every *consumer* of a group (a Conv with group 1, a Gemm, or a MatMul whose right operand is a weight) sees the
group's channels as input columns of its weight matrix W (O x D; a conv's D is channels x kernel positions). From
its input patches X (one row per sampled output position) the layer-wise Hessian is H = XᵀX/n, dampened by
`damp * mean(diag H)`, and augmented with a constant column when the layer has a bias (removing a channel may
then also move the bias: the mean the channel carried is compensated).

Score: removing the columns Q of one unit costs ½ Σ_rows w_Qᵀ([H⁻¹]_QQ)⁻¹ w_Q (the OBS saliency, summed over the
output rows and then over every consumer of the group by the aggregation). A wide conv (more than
KRONECKER_COLUMNS columns and a kernel of several positions) is scored on factors of its Hessian (`KroneckerGram`:
A over its input channels, each channel's own k x k block, H ≈ A ⊗ B across channels): the exact D x D sum and
inverse cost P·D² and D³, the factors P·D·C and C³ — on ResNet-50 the 3x3 convs of its last three stages were about
a quarter of the whole run. `--exact-hessians` turns this off.

Reconstruction: after selection, the pruned model runs beside the original, node by node in topological order, on
the calibration inputs (or synthesized ones). Each consumer's kept weights are refit to reproduce the original
layer's output from the pruned network's actual input (so errors of earlier layers are compensated too):

    min_W' ||X_p W'ᵀ - X_o W_oᵀ||² + λ||W' - W_p||²  =>  W'ᵀ = (X_pᵀX_p + λI)⁻¹ (X_pᵀX_o W_oᵀ + λ W_pᵀ)

With X_p = X_o (nothing upstream changed) this is exactly the OBS update W + δW, δW = -W_Q([H⁻¹]_QQ)⁻¹[H⁻¹]_Q:,
of the dampened Hessian. X_o W_oᵀ is the original layer's output, read at the sampled positions (the original's
input patches are never unfolded). Positions are subsampled per layer (`positions`, default 8192 output positions);
the scores read every other one of them (SCORE_SHARE: a ranking needs fewer rows than a refit — measured on trained
detectors, the halved score Hessians gave the same output error, the halved refit a worse one). The scoring pass
keeps X_o W_oᵀ at its sampled positions (`LayerTargets`): the refit reads it there instead of running the original
model a second time.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import quant
from .errors import SpaError
from .execution import batch_free_polymorphic, chunks, fast_layout, layerwise_batch, run_layerwise
from .importance import Member
from .ir import attr as get_attr
from .memory import GB, check_memory, memory_limit_gb
from .synthesis import model_data

DEFAULT_POSITIONS = 8192
DEFAULT_DAMP = 0.01
GATHER_ELEMENTS = 1 << 22  # rows of R = U⁻¹ gathered at once by obs_saliency (16 MB in float32)
SCORE_SHARE = 0.5          # the share of a layer's sampled positions its score's Hessian sums (the refit: all)
KRONECKER_COLUMNS = 1024   # a conv with more columns (channels x kernel positions) is scored on A ⊗ B


# ---- a consumer as a matrix ---------------------------------------------------------------------------------------
@dataclass
class LayerView:
    """A Conv/Gemm/MatMul seen as y = X Wᵀ (+ b): how to read its weight as an O x D matrix and its input as rows
    of D columns (per input channel: `k` consecutive columns)."""

    node: object
    kind: str                 # conv | gemm | matmul
    weight: str
    bias: str | None
    data_index: int
    k: int                    # columns per input channel (conv: kernel positions)
    trans: bool = False       # weight stored as D x O (Gemm transB=0, MatMul)
    conv: dict = field(default_factory=dict)

    def matrix(self, w: np.ndarray) -> np.ndarray:
        return w.T if self.trans else w.reshape(w.shape[0], -1)

    def unmatrix(self, m: np.ndarray, shape) -> np.ndarray:
        return np.ascontiguousarray(m.T if self.trans else m.reshape(shape))


def layer_view(g, node) -> LayerView | None:
    """The matrix view of a node, or None for a node OBS does not model (grouped/transposed conv, 3-D conv,
    activation x activation MatMul, Gemm with transA or a run-time weight): narrower than
    spa.operators.weights.is_weight_layer on purpose (only layers OBS can write as y = X Wᵀ)."""
    if node.op_type == "Conv":
        return conv_view(g, node) if get_attr(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        if get_attr(node, "transA", 0) or quant.weight(g, node.input[1]) is None:
            return None
        if get_attr(node, "alpha", 1.0) != 1.0 or (len(node.input) > 2 and get_attr(node, "beta", 1.0) != 1.0):
            return None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            b = quant.weight(g, bias)
            if b is None or b.ndim != 1:
                return None
        return LayerView(node, "gemm", node.input[1], bias, 0, 1, trans=not get_attr(node, "transB", 0))
    if node.op_type == "MatMul":
        w = quant.weight(g, node.input[1])
        if w is None or w.ndim != 2 or g.const(node.input[0]) is not None:
            return None
        return LayerView(node, "matmul", node.input[1], None, 0, 1, trans=True)
    return None


def refit_view(g, node) -> LayerView | None:
    """The view the least-squares refit solves for with patterns: `layer_view`'s layers, and grouped/depthwise
    convs (refit per group on their kept positions, spa.patterns.refit_grouped), which OBS does not score."""
    view = layer_view(g, node)
    return view if view is not None or node.op_type != "Conv" else conv_view(g, node)


def conv_view(g, node) -> LayerView | None:
    """A 1-D/2-D Conv with a constant weight as y = X Wᵀ, whatever its group count (a grouped conv's rows then
    see only their group's columns: `layer_view` leaves those out of OBS; spa.patterns refits them per group)."""
    w = quant.weight(g, node.input[1])
    if w is None or w.ndim not in (3, 4):
        return None
    dims = w.ndim - 2
    auto_pad = get_attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    conv = {"kernel": list(w.shape[2:]), "strides": list(get_attr(node, "strides", [1] * dims)),
            "dilations": list(get_attr(node, "dilations", [1] * dims)),
            "pads": list(get_attr(node, "pads", [0] * (2 * dims))), "auto_pad": auto_pad,
            "group": int(get_attr(node, "group", 1))}
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return LayerView(node, "conv", node.input[1], bias, 0, int(np.prod(w.shape[2:])), conv=conv)


def _conv_pads(view: LayerView, spatial: tuple[int, ...]) -> list[int]:
    c = view.conv
    dims = len(spatial)
    if c["auto_pad"] in ("", "NOTSET"):
        return c["pads"]
    if c["auto_pad"] == "VALID":
        return [0] * (2 * dims)
    begin, end = [], []
    for i in range(dims):
        out = math.ceil(spatial[i] / c["strides"][i])
        total = max((out - 1) * c["strides"][i] + (c["kernel"][i] - 1) * c["dilations"][i] + 1 - spatial[i], 0)
        small, large = total // 2, total - total // 2
        begin.append(small if c["auto_pad"] == "SAME_UPPER" else large)
        end.append(large if c["auto_pad"] == "SAME_UPPER" else small)
    return begin + end


def output_positions(view: LayerView, x) -> int:
    """Number of rows the layer's input gives (batch x output positions)."""
    if view.kind != "conv":
        return int(np.prod(x.shape[:-1]))
    spatial = tuple(x.shape[2:])
    c = view.conv
    return int(x.shape[0] * np.prod(_conv_out(spatial, c["kernel"], c["strides"], c["dilations"],
                                              _conv_pads(view, spatial))))


def _conv_out(spatial, kernel, strides, dilations, pads) -> list[int]:
    dims = len(spatial)
    return [(spatial[i] + pads[i] + pads[i + dims] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
            for i in range(dims)]


def sample_rows(view: LayerView, x, rows, by_position: bool = False):
    """Input rows (P x D, torch) of the layer at flat output positions `rows` (a LongTensor): conv patches in
    the weight's (channel, kernel...) column order, or the Gemm/MatMul input rows. Only the sampled patches are
    gathered (no padded copy of the whole tensor): taps that fall in the padding read 0. `by_position`: a conv's
    patches as gathered, P x kernel positions x channels (`KroneckerGram` reads them so)."""
    import torch

    if view.kind != "conv":
        return x.reshape(-1, x.shape[-1])[rows]
    c = view.conv
    if x.dim() == 3:  # Conv1d as a 2-D conv of height 1
        x = x.unsqueeze(2)
        kernel, strides, dil = [1, *c["kernel"]], [1, *c["strides"]], [1, *c["dilations"]]
        p = _conv_pads(view, (x.shape[3],))
        pads = [0, p[0], 0, p[1]]
    else:
        kernel, strides, dil = c["kernel"], c["strides"], c["dilations"]
        pads = _conv_pads(view, tuple(x.shape[2:]))
    height, width = x.shape[2], x.shape[3]
    oh, ow = _conv_out((height, width), kernel, strides, dil, pads)
    n = rows // (oh * ow)
    rem = rows % (oh * ow)
    i, j = rem // ow, rem % ow
    ki = torch.arange(kernel[0]).repeat_interleave(kernel[1]) * dil[0]
    kj = torch.arange(kernel[1]).repeat(kernel[0]) * dil[1]
    r = i[:, None] * strides[0] + ki[None, :] - pads[0]        # (P, K) in the unpadded input
    s = j[:, None] * strides[1] + kj[None, :] - pads[1]
    inside = (r >= 0) & (r < height) & (s >= 0) & (s < width)
    patches = x[n[:, None], :, r.clamp(0, height - 1), s.clamp(0, width - 1)]   # (P, K, C): advanced indices first
    if not bool(inside.all()):
        patches = patches * inside[:, :, None].to(patches.dtype)
    if by_position:
        return patches
    return patches.permute(0, 2, 1).reshape(len(rows), -1)


def sample_outputs(view: LayerView, y, rows, keep=None):
    """The layer's output (P x O', torch) at the flat output positions `rows` (as `sample_rows`), restricted to
    the output channels `keep` (a LongTensor, or None for all)."""
    if view.kind == "conv":                                           # no reshape: y may be channels_last
        per = math.prod(y.shape[2:])
        n, rem = rows // per, rows % per
        picked = y[n, :, rem // y.shape[3], rem % y.shape[3]] if y.dim() == 4 else y[n, :, rem]   # (P, O)
    else:
        picked = y.reshape(-1, y.shape[-1])[rows]
    return picked if keep is None else picked.index_select(1, keep)


def pick_rows(total: int, positions: int, generator):
    import torch

    if total <= positions:
        return torch.arange(total)
    return torch.randperm(total, generator=generator)[:positions].sort().values


# ---- statistics -----------------------------------------------------------------------------------------------------
class Gram:
    """XᵀX (and XᵀY) over row blocks X (P x D) and Y (P x O) added one chunk of samples at a time; `ones`: X
    gets a ones column (a bias) when the sums are formed. The blocks are kept and multiplied once, when `xx` or
    `xy` is first read: one symmetric rank-k update over all rows runs 1.2-1.3x faster than one per chunk (~1000
    rows each) on the wide layers here, and the ones column costs no copy of its own. One layer's rows are held at
    a time (at most the positions sampled x D). float64 for narrow layers (D <= 64), float32 otherwise (half the
    memory of the Hessians held until the solve). The products run in numpy's BLAS (OpenBLAS, a symmetric rank-k
    update for XᵀX): torch's MKL sgemm was 2-3x slower on our AMD CPUs."""

    def __init__(self, ones: bool = False):
        self.ones = ones
        self._x: list = []
        self._y: list = []
        self._xx = self._xy = None
        self.n = 0

    def add(self, x, y=None):
        self._x.append(_numpy(x))
        if y is not None:
            self._y.append(_numpy(y))
        self.n += x.shape[0]

    def _reduce(self) -> None:
        if not self._x:
            return
        blocks, self._x = self._x, []
        d = blocks[0].shape[1] + self.ones
        a = np.empty((sum(len(b) for b in blocks), d), np.float64 if d <= 64 else np.float32)
        np.concatenate(blocks, out=a[:, :d - 1] if self.ones else a, casting="same_kind")
        del blocks
        if self.ones:
            a[:, -1] = 1.0
        xx = a.T @ a
        self._xx = xx if self._xx is None else np.add(self._xx, xx, out=self._xx)
        if self._y:
            ys, self._y = self._y, []
            xy = a.T @ np.concatenate(ys).astype(a.dtype, copy=False)
            self._xy = xy if self._xy is None else np.add(self._xy, xy, out=self._xy)

    @property
    def xx(self):
        self._reduce()
        return self._xx

    @xx.setter
    def xx(self, value):   # exact_scorer takes the Hessian over (None: freed)
        self._reduce()
        self._xx = value

    @property
    def xy(self):
        self._reduce()
        return self._xy


class KroneckerGram:
    """A wide conv's Hessian in factored form, from the same sampled patches as `Gram` (columns (channel, kernel
    position)): A (C x C), the input channels' second moment averaged over the kernel positions, and each
    channel's own k x k block H_cc. Scores read H ≈ A ⊗ B (B: the blocks summed over channels, scaled so that
    diag(A ⊗ B) = diag(H) on average) for the cross-channel part and the channel's own block for the rest.
    Centered when the layer has a bias: the exact score's constant column makes its Schur complement the
    covariance, so the bias absorbs a removed channel's mean in both."""

    def __init__(self, k: int, centered: bool):
        self.k, self.centered = k, centered
        self.a = self.blocks = self.s = None
        self.n = 0

    def add(self, x) -> None:
        """x: patches P x k x C (`sample_rows(..., by_position=True)`)."""
        import torch

        x = x.float()
        patches = np.ascontiguousarray(_numpy(x))
        p, k = patches.shape[0], self.k
        flat = patches.reshape(p * k, -1)
        a = flat.T @ flat                                            # Σ over positions and kernel positions
        by_channel = x.permute(2, 1, 0).contiguous()                 # C x k x P: torch's batched product is
        blocks = torch.bmm(by_channel, by_channel.transpose(1, 2)).double().numpy()   # 2x numpy's; C x k x k
        s = patches.sum(0, dtype=np.float64).T                        # C x k, for centering
        if self.a is None:
            self.a, self.blocks, self.s = a.astype(np.float64), blocks, s
        else:
            self.a += a
            self.blocks += blocks
            self.s += s
        self.n += p

    def scorer(self, damp: float):
        """The OBS saliency of removing input channel sets, the Hessian dampened as the exact score's (λ =
        damp x mean diag H). One channel c: ½ r_c Σ_rows w_c (H_cc + λI) w_cᵀ, where r_c = 1 / ((A⁻¹)_cc A_cc) is
        the share of the channel's second moment the other channels cannot explain — exact when the channels are
        uncorrelated (r = 1) and when H = A ⊗ B. Several channels S: the Kronecker form [H⁻¹]_SS = (A⁻¹)_SS ⊗ B⁻¹,
        ½ Σ_rows tr(((A⁻¹)_SS)⁻¹ W_S B W_Sᵀ). None when A is not positive definite (as `exact_scorer`)."""
        a, blocks, sums, k = self.a, self.blocks, self.s, self.k
        if self.centered:
            a = a - sums @ sums.T / self.n
            blocks = blocks - sums[:, :, None] * sums[:, None, :] / self.n
        a = a / (self.n * k)
        blocks = blocks / self.n
        a_damped, lam = damped(a, damp)                              # mean diag a = mean diag H: the same λ
        eye = lam * np.eye(k)
        b = blocks.sum(0) / max(float(np.trace(a)), 1e-12) + eye
        try:
            a_inv = psd_inverse(a_damped).astype(np.float64)
        except np.linalg.LinAlgError:
            return None
        share = 1.0 / (np.diag(a_inv) * np.diag(a_damped))

        def saliency(w: np.ndarray, units: list[np.ndarray]) -> np.ndarray:
            w3 = w[:, :a.shape[0] * k].reshape(w.shape[0], -1, k)
            if all(len(u) == 1 for u in units):
                ch = np.array([u[0] for u in units], dtype=np.int64)
                wc = np.ascontiguousarray(w3[:, ch].transpose(1, 2, 0))            # C x k x O
                energy = np.einsum("ctu,ctu->c", np.matmul(wc, wc.transpose(0, 2, 1)), blocks[ch] + eye)
                return 0.5 * share[ch] * energy
            out = np.zeros(len(units))
            for i, u in enumerate(units):
                ws = w3[:, u]                                            # O x |S| x k
                m = np.linalg.inv(a_inv[np.ix_(u, u)])
                out[i] = 0.5 * np.einsum("ij,ojt,tu,oiu->", m, ws, b, ws)
            return out

        return saliency


def exact_scorer(gram: Gram, damp: float, k: int):
    """The OBS saliency of removing input channel sets (each channel: k consecutive columns) on the dampened
    exact Hessian of `gram`, which is consumed (normalized and dampened in place: one D x D copy less).
    None when the Hessian is not positive definite."""
    h, gram.xx = gram.xx, None
    h /= gram.n
    h.flat[::len(h) + 1] += damp * max(float(np.diag(h).astype(np.float64).mean()), 1e-12)   # as `damped`
    try:
        rows = inverse_rows(h)
    except np.linalg.LinAlgError:
        return None
    del h

    def saliency(w: np.ndarray, units: list[np.ndarray]) -> np.ndarray:
        return obs_saliency(w, rows, [np.concatenate([np.arange(c * k, (c + 1) * k) for c in u]) for u in units])

    return saliency


def kronecker_scored(view: LayerView, columns: int, limit: int | None = KRONECKER_COLUMNS) -> bool:
    """Whether the layer is scored on Kronecker factors: a conv whose kernel has several positions and whose
    exact Hessian would have more than `limit` columns (None: never, --exact-hessians)."""
    return limit is not None and view.kind == "conv" and view.k > 1 and columns > limit


def _numpy(t) -> np.ndarray:
    return t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)


def with_ones(x):
    import torch

    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def damped(h: np.ndarray, damp: float) -> np.ndarray:
    lam = damp * max(float(np.diag(h).astype(np.float64).mean()), 1e-12)
    out = np.array(h, copy=True)
    out.flat[::len(h) + 1] += lam                                 # + λI without a D x D identity
    return out, lam


def obs_saliency(w: np.ndarray, rows: np.ndarray, columns: list[np.ndarray]) -> np.ndarray:
    """½ Σ_rows w_Qᵀ([H⁻¹]_QQ)⁻¹ w_Q for each column set Q (w: O x D; rows: R with H⁻¹ = R Rᵀ, D' x D' with
    D' >= D, from `inverse_rows`: [H⁻¹]_QQ = R_Q R_Qᵀ)."""
    if columns and len({len(q) for q in columns}) == 1:
        idx = np.stack(columns)                                   # (U, q)
        blocks = np.empty((len(idx), idx.shape[1], idx.shape[1]), rows.dtype)
        step = max(1, GATHER_ELEMENTS // (idx.shape[1] * rows.shape[1]))   # all units' rows at once: a second R
        for start in range(0, len(idx), step):
            r = rows[idx[start:start + step]]                     # (chunk, q, D')
            blocks[start:start + step] = np.matmul(r, np.swapaxes(r, 1, 2))
        wq = np.moveaxis(w[:, idx], 0, 1)                         # (U, O, q)
        # Σ_o w_oQᵀ B⁻¹ w_oQ = <B⁻¹, W_QᵀW_Q>: q x q products per unit instead of a solve for every output row
        gram = np.matmul(np.swapaxes(wq, 1, 2), wq)               # (U, q, q)
        return 0.5 * np.einsum("uqp,uqp->u", np.linalg.inv(blocks.astype(np.float64)), gram)
    out = np.zeros(len(columns))
    for k, q in enumerate(columns):
        wq, r = w[:, q], rows[q]
        out[k] = 0.5 * np.einsum("oq,qo->", wq, np.linalg.solve(r @ r.T, wq.T))
    return out


def refit(w_p: np.ndarray, gram: Gram, damp: float) -> tuple[np.ndarray, float]:
    """The ridge least-squares refit of the docstring, from gram.xx = X_pᵀX_p and gram.xy = X_pᵀY_o with Y_o the
    original layer's output at the same positions (= X_o W_oᵀ over its kept output rows; the bias included when
    X_p is augmented). w_p: O' x D_p (current pruned weights, bias as the last column when augmented).
    Returns (new w_p, λ)."""
    h = gram.xx / gram.n
    hd, lam = damped(h, damp)
    rhs = gram.xy.astype(np.float64) / gram.n + lam * w_p.T.astype(np.float64)
    return _solve_psd(hd, rhs).T, lam


LARGE = 1024  # above this many columns, factorizations run in float32 (dampening keeps them well conditioned)


def _factor(a: np.ndarray):
    """Cholesky factor with torch's LAPACK (scipy's wheel is several times slower here), float32 for large
    matrices; falls back to float64 when float32 fails. None when a is not positive definite."""
    import torch

    at = torch.from_numpy(np.ascontiguousarray(a))
    for dtype in ((torch.float32, torch.float64) if len(a) > LARGE else (torch.float64,)):
        chol, info = torch.linalg.cholesky_ex(at.to(dtype))
        if int(info) == 0:
            return chol
    return None


def _solve_psd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a x = b for symmetric positive definite a."""
    import torch

    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise SpaError("the model computes NaN/inf values on the calibration/synthesized inputs: least squares "
                       "needs finite activations (check the model and its input scale, or add --fast)")
    chol = _factor(a)
    if chol is None:
        return np.linalg.lstsq(a, b, rcond=None)[0]
    return torch.cholesky_solve(torch.from_numpy(np.ascontiguousarray(b)).to(chol.dtype), chol).double().numpy()


def inverse_rows(a: np.ndarray) -> np.ndarray:
    """R = U⁻¹ for the Cholesky factor a = UᵀU (U upper triangular), so that a⁻¹ = R Rᵀ and any block of the
    inverse is [a⁻¹]_QQ = R_Q R_Qᵀ: the scores read only the blocks of their units, and one triangular inverse
    (LAPACK trtri, D³/3) costs a fraction of the whole inverse (torch's cholesky_inverse: 0.26 s against 0.04 s at
    D = 2049 here). Without scipy, torch's triangular solve against I (0.13 s). LinAlgError when a is not
    positive definite."""
    import torch

    chol = _factor(a)
    if chol is None:
        raise np.linalg.LinAlgError("not positive definite")
    try:
        from scipy.linalg import lapack
    except ImportError:
        lower_inv = torch.linalg.solve_triangular(chol, torch.eye(len(a), dtype=chol.dtype), upper=False)
        return lower_inv.numpy().T
    u = chol.numpy().T                      # Fortran-ordered upper factor: LAPACK reads it without a copy
    inv, info = (lapack.strtri if u.dtype == np.float32 else lapack.dtrtri)(u, lower=0)
    if info != 0:
        raise np.linalg.LinAlgError("singular Cholesky factor")
    return inv


def psd_inverse(a: np.ndarray) -> np.ndarray:
    import torch

    chol = _factor(a)
    if chol is None:
        raise np.linalg.LinAlgError("not positive definite")
    return torch.cholesky_inverse(chol).numpy()   # in the factor's precision (float32 above LARGE columns)


# ---- scores (the `obs` / `obspa` criteria) ---------------------------------------------------------------------------
def obs_members(inputs):
    """OBS saliency members: one per sink slice of a modelled consumer. Runs the original model once over the
    data (batched), accumulating each consumer's Hessian from sampled positions. With
    `obspa_options["keep_targets"]` (a reconstruction follows) the same pass also keeps, for every modelled layer,
    its output at the sampled positions (`LayerTargets`, in `inputs.cache["obspa_targets"]`): the refit reads
    them instead of running the original model a second time."""
    import torch

    from .torch_graph import TorchGraph  # torch: this module must import without it

    analysis = inputs.analysis
    g = analysis.ctx.g
    opts = inputs.cache.setdefault("obspa_options", {})
    positions = opts.get("positions", DEFAULT_POSITIONS)
    damp = opts.get("damp", DEFAULT_DAMP)
    limit = opts.get("kronecker_columns", KRONECKER_COLUMNS)
    sinks = {}
    for ps in analysis.ctx.params:
        if ps.role == "sink":
            node, slot = quant.weight_use(g, ps.node, ps.input_index)   # a QDQ weight: the layer reading it
            view = layer_view(g, node)
            if view is not None and slot == 1:
                sinks.setdefault(node.name, (view, []))[1].append(ps)
    if not sinks:
        return []
    n = inputs.calib.n if inputs.calib is not None else inputs.samples
    need = check_hessians(g, sinks, positions, n, limit)
    feeds, n = model_data(inputs)
    layers = {name: view for name, (view, _) in sinks.items()}    # the layers whose inputs/outputs are read
    targets: dict[str, LayerTargets] | None = None
    if opts.get("keep_targets"):
        view_of = refit_view if opts.get("grouped_targets") else layer_view   # patterns: grouped convs too
        wanted = {node.name: layers.get(node.name) or view_of(g, node) for node in g.model.graph.node}
        wanted = {name: view for name, view in wanted.items() if view is not None}
        extra = targets_bytes(g, wanted, positions, n)
        if need + extra <= memory_limit_gb() * GB:
            targets = {}
            layers.update(wanted)
        else:
            inputs.notes.append(f"the refit runs the original model again: its layers' sampled outputs "
                                f"(~{extra / GB:.2g} GB) would not fit beside the Hessians in --memory-limit")
    timing = inputs.cache.setdefault("obspa_timing", {"forward_s": 0.0, "hessian_s": 0.0, "solve_s": 0.0})
    t0 = time.perf_counter()
    tg = fast_layout(TorchGraph(g, batch_free=batch_free_polymorphic(g, feeds)))   # as layerwise_batch chunks
    grams: dict[str, Gram | KroneckerGram] = {
        name: KroneckerGram(view.k, view.bias is not None) if kronecker_scored(view, _columns(g, view), limit)
        else Gram(ones=view.bias is not None)
        for name, (view, _) in sinks.items()}
    factored = sum(isinstance(gram, KroneckerGram) for gram in grams.values())
    scored: dict[str, list] = {}
    gen = torch.Generator().manual_seed(inputs.seed)
    hess_t, solve_t = [0.0], [0.0]
    batches = list(chunks(feeds, n, layerwise_batch(g, inputs.batch_size, feeds)))
    last = len(batches) - 1

    def hook(node, k, ins, outs):
        view = layers.get(node.name)
        if view is None:
            return
        t = time.perf_counter()
        x = ins[view.data_index].float()
        total = output_positions(view, x)
        quota = max(1, round(positions * x.shape[0] / n))
        picked = pick_rows(total, quota, gen)
        if targets is not None:
            targets.setdefault(node.name, LayerTargets()).add(total, picked, sample_outputs(view, outs[0].float(),
                                                                                          picked))
        entry = sinks.get(node.name)
        if entry is None:
            hess_t[0] += time.perf_counter() - t
            return
        gram = grams[node.name]
        scored_rows = max(1, round(positions * SCORE_SHARE * x.shape[0] / n))
        if len(picked) > scored_rows:   # evenly through the sorted sample: still a random sample of the positions
            picked = picked[torch.linspace(0, len(picked) - 1, scored_rows).round().long()]
        gram.add(sample_rows(view, x, picked, by_position=isinstance(gram, KroneckerGram)))
        t1 = time.perf_counter()
        hess_t[0] += t1 - t
        if k == last:  # the Hessian is complete: score now and free it (one Hessian held at a time)
            gram = grams.pop(node.name)
            if gram.n:
                scorer = gram.scorer(damp) if isinstance(gram, KroneckerGram) else exact_scorer(gram, damp, view.k)
                scored[node.name] = _layer_members(analysis, g, view, entry[1], scorer)
            solve_t[0] += time.perf_counter() - t1

    with torch.no_grad():
        run_layerwise(tg, batches, hook, lambda s: inputs.progress(f"obs: {s} ({n} samples)"))
    timing["forward_s"] += time.perf_counter() - t0 - hess_t[0] - solve_t[0]
    timing["hessian_s"] += hess_t[0]
    timing["solve_s"] += solve_t[0]
    members = [m for name in sinks for m in scored.get(name, [])]  # in the sinks' order, as before
    inputs.cache["obspa_data"] = {"samples": n, "positions_per_layer": positions,
                                  "positions_scored_per_layer": max(1, round(positions * SCORE_SHARE)),
                                  "layers_scored": len(sinks),
                                  "layers_on_factored_hessians": factored,
                                  "mode": "calibration" if inputs.calib is not None else "data-free (synthesized)"}
    if targets is not None:
        inputs.cache["obspa_targets"] = {name: t.done() for name, t in targets.items()}
    return members


class LayerTargets:
    """One layer's output in the original model at its sampled positions, shared by the OBS scoring pass (which
    ran the original) and the refit (which reads it instead of running the original again). `rows` index the
    layer's output positions over all samples in order (each batch's positions follow the previous batches':
    independent of how the samples are batched), `outputs` holds the outputs there (len(rows) x channels,
    float32), `total` is the number of positions the layer has over all samples."""

    def __init__(self):
        self.total = 0
        self.rows = []
        self.outputs = []

    def add(self, total: int, rows, outputs) -> None:
        """One batch: its `total` positions, the sampled ones (`rows`, local to the batch) and their outputs."""
        self.rows.append(rows + self.total)
        self.outputs.append(outputs.contiguous())
        self.total += total

    def done(self) -> LayerTargets:
        import torch

        if isinstance(self.rows, list):
            self.rows, self.outputs = torch.cat(self.rows), torch.cat(self.outputs)
        return self

    def keep_channels(self, keep: np.ndarray) -> None:
        """Drop the output channels the cut removed (never a refit's target)."""
        import torch

        if not keep.all():
            self.outputs = self.outputs.index_select(1, torch.from_numpy(np.flatnonzero(keep))).contiguous()

    def between(self, lo: int, hi: int):
        """(the sampled rows in [lo, hi), made local to it, their outputs)."""
        inside = ((self.rows >= lo) & (self.rows < hi)).nonzero().flatten()
        return self.rows[inside] - lo, self.outputs[inside]


def _layer_members(analysis, g, view: LayerView, pss: list, saliency) -> list:
    """The OBS saliency members of one consumer (one per sink slice), `saliency(w, units)` giving the cost of
    removing each unit's input channels (`exact_scorer` or `KroneckerGram.scorer`; None: not scored)."""
    if saliency is None:
        return []
    w = view.matrix(np.asarray(quant.weight(g, view.weight), dtype=np.float64))
    members = []
    for ps in pss:
        roots = analysis.find(ps.atoms)
        per_pos = np.zeros(len(roots))
        valid = np.flatnonzero(roots >= 0)
        if not len(valid):
            continue
        uniq, first = np.unique(roots[valid], return_index=True)
        per_pos[valid[first]] = saliency(w, [valid[roots[valid] == u] for u in uniq])
        members.append(Member(ps, per_pos))
    return members


def _columns(g, view: LayerView) -> int:
    """The layer's exact Hessian size: its weight's input columns, plus one for a bias."""
    w = quant.weight(g, view.weight)
    if w is None or not w.ndim:
        return 0
    return (int(w.shape[0]) if view.trans else math.prod(int(s) for s in w.shape[1:])) + (view.bias is not None)


def factor_bytes(d: int) -> int:
    """Peak bytes of one layer's scoring solve at d columns: the Hessian (normalized and dampened in place), its
    Cholesky factor and inverse (float32 above LARGE columns, else float64; the sum is float64 up to 64 columns)."""
    if d > LARGE:
        return 3 * 4 * d * d
    return (8 if d <= 64 else 4) * d * d + 2 * 8 * d * d


def check_hessians(g, sinks: dict, positions: int, samples: int | None = None,
                   kronecker_columns: int | None = KRONECKER_COLUMNS) -> int:
    """The scoring pass's statistics against the memory limit, before the forward pass: the widest layer's
    Hessian and its solve (`factor_bytes`; one layer's at a time) and its sampled rows (positions x D: the
    blocks `Gram` holds, float32, and the buffer it multiplies them in, float64 up to 64 columns). Returns the
    bytes."""
    need = 0
    widest = 0
    for view, _ in sinks.values():
        d = _columns(g, view)
        if not d:
            continue
        rows = min(int(positions), _positions_bound(g, view, samples))
        if kronecker_scored(view, d, kronecker_columns):   # C x C factors, C x k x k blocks; rows and a copy
            need = max(need, 3 * 8 * (d // view.k) ** 2 + 8 * d * view.k + 2 * rows * d * 4)
        else:
            need = max(need, factor_bytes(d) + rows * d * (12 if d <= 64 else 8))
        widest = max(widest, d)
    check_memory(need, f"the Hessians of {len(sinks)} layers (up to {widest} columns, --positions {positions})")
    return need


def targets_bytes(g, layers: dict, positions: int, samples: int) -> int:
    """Bytes of the layers' outputs the scoring pass keeps for the refit (`LayerTargets`): positions x output
    channels each, float32, with their row indices."""
    need = 0
    for view in layers.values():
        w = quant.weight(g, view.weight)
        out = int(w.shape[1] if view.trans else w.shape[0])
        need += (4 * out + 8) * min(int(positions), _positions_bound(g, view, samples))
    return need


def _positions_bound(g, view: LayerView, samples: int | None) -> int:
    """How many output positions the layer has over `samples` samples, from the inferred shape of its output
    (no bound when unknown)."""
    shapes = getattr(g, "shapes", None)
    shape = shapes.get(view.node.output[0]) if shapes is not None and samples and view.node is not None else None
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        return 2**62
    per = math.prod(shape[2:]) if view.kind == "conv" else math.prod(shape[1:-1])
    return samples * per
