"""What each reader reads of each older write, innovation retention, and the verdict (pure functions).

**Reader sublayers** ``L``: the attention of every block (its Q, K and V input weights), the MLP of every block
(its input weights, or gate and up for gated MLPs) and the unembedding. A reader that divides by the stream's
size sees ``N(r_L) = gamma_L * P(r_L) / s_L(t) + beta`` with ``s_L(t) = sqrt(||P(r_L(t))||^2 / d + eps)`` (the
LayerNorm sigma when ``P`` centres, the RMS for RMSNorm), which is exactly
``sum_c gamma_L * P(w_c(t)) / s_L(t) + beta``. With ``M_L = W_in,L diag(gamma_L)`` the **read** of write ``c`` is

    I(c, L)  = sum_t ||M_L P(w_c(t))||^2 / s_L(t)^2
    I0(c, L) = sum_t ||M_L P(w_c(t))||^2 / s_c(t)^2     (no growth since the write)

where ``s_c(t)`` is the scale of the stream write ``c`` was added to (the stream of its own sublayer; the
embedding's own stream for the embedding). ``||M_L x||^2 = x^T H_L x`` with ``H_L = M_L^T M_L``, evaluated as
``||F_L x||^2`` with a ``d x d`` factor ``F_L^T F_L = H_L`` (:func:`reader_factor`). A reader that reads the raw
stream has ``s = 1``, so ``I = I0``: output-only placement (gain 1) and LN-free checkpoints (gain
``stored / sqrt(eps)``, the constant their norms divide by).

**Distance** in layers between write ``c`` (forward index) and a reader of ``k`` writes: ``d = (k - c) / 2``
(two writes per block, ``1/2`` for the first reader after a write).

**Innovation** ``u_c``: the residual of the token-centred write ``w~_c`` after least-squares regression on every
earlier write, over tokens. From the Gram matrix ``Gamma`` by a Cholesky factorisation ``Gamma = L L^T``
(Gram-Schmidt in token space): ``||u_c||^2 = L_cc^2`` and ``<w~_j, u_c> = L_jc L_cc`` for ``j >= c`` (0 for
``j < c``), so the **innovation retention** at a reader of ``k`` writes is
``<r~_L, u_c> / <w~_c, u_c> = sum_{c<=j<k} L_jc / L_cc``. A write with ``||u_c||^2 < 1e-6 ||w~_c||^2`` has no
innovation: its column is set to 0 (later residuals are unchanged, since it lies in the span before it).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

NO_INNOVATION_TOL = 1e-6  # ||u_c||^2 below this fraction of ||w~_c||^2: no innovation (counted, skipped)
READ_ZERO_TOL = 1e-9  # a read below this fraction of the write's largest read: the reader does not see the write
FAR_DISTANCE = 2  # innovation retention is pooled over readers at least this many layers after the write
# verdict thresholds (documented in docs/deletion.md)
ERASED_BELOW = 0.8  # pooled innovation retention CI below this: erasure
REINFORCED_ABOVE = 1.25  # pooled innovation retention CI above this: reinforced
SHARE_SPLIT = 0.5  # magnitude share CI above: magnitude; below: direction
FRONT_LOADED_MIN = 0.5  # embedding + block 0 share of the last reader's squared input at least this: front-loaded
LABELS = ("erasure", "reinforced", "magnitude", "direction", "no locality", "inconclusive")


def reader_factor(weight_in: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``F`` ``[d, d]`` (float32) with ``||F x||^2 = ||(gain * x) W||^2`` for ``W`` ``[d, width]`` (``x W``
    orientation): the eigen-factor ``F = diag(sqrt(lambda)) V^T`` of ``H = diag(gain) W W^T diag(gain)``,
    computed in float64."""
    w = weight_in.double() * gain.double()[:, None]
    lam, vec = torch.linalg.eigh(w @ w.T)
    return (lam.clamp_min(0).sqrt()[:, None] * vec.T).float()


def stream_scales(writes: torch.Tensor, eps: float) -> torch.Tensor:
    """``s_j(t) = sqrt(||sum_{c<j} P(w_c(t))||^2 / d + eps)`` for ``j = 0 .. C`` (float64 ``[n, C + 1]``)
    from projected writes ``[n, C, d]``."""
    x = writes.double()
    cum = torch.cat([torch.zeros_like(x[:, :1]), x.cumsum(1)], 1)
    return (cum.pow(2).sum(-1) / x.shape[-1] + eps).sqrt()


def read_terms(writes: torch.Tensor, factors: Sequence[torch.Tensor], reader_k: Sequence[int],
               normalises: Sequence[bool], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token terms of ``I`` and ``I0`` (float64 ``[n, R, C]``, 0 where ``c >= k_L``).

    writes: projected writes ``P(w)`` ``[n, C, d]`` (float32); factors: ``F_L`` per reader; reader_k: writes
    before each reader; normalises: whether the reader divides by the stream's size. Each reader projects all
    its earlier writes at once (one float32 matmul); the ``[n, k, d]`` projection lives for this call only.
    """
    n, n_c, _ = writes.shape
    x = writes.float()
    scale = stream_scales(x, eps)  # [n, C+1]
    s_write = scale[:, :n_c].clone()
    s_write[:, 0] = scale[:, 1]  # the embedding: its own stream
    read = torch.zeros(n, len(factors), n_c, dtype=torch.float64, device=x.device)
    read0 = torch.zeros_like(read)
    for r, (f, k, norm) in enumerate(zip(factors, reader_k, normalises)):
        q = (x[:, :k] @ f.to(x.device).T).pow(2).sum(-1).double()  # [n, k]: ||F_L P(w_c)||^2
        if norm:
            read[:, r, :k] = q / scale[:, k:k + 1].pow(2)
            read0[:, r, :k] = q / s_write[:, :k].pow(2)
        else:
            read[:, r, :k] = q
            read0[:, r, :k] = q
    return read, read0


def read_distance(reader_k: Sequence[int], n_writes: int) -> np.ndarray:
    """``d(L, c) = (k_L - c) / 2`` in layers ``[R, C]``; NaN where ``c >= k_L``."""
    k = np.asarray(reader_k, dtype=float)[:, None]
    c = np.arange(n_writes, dtype=float)[None, :]
    return np.where(c < k, (k - c) / 2, np.nan)


# ----------------------------------------------------------------------------------------------
# locality and magnitude share
# ----------------------------------------------------------------------------------------------
def reader_groups(readers: Sequence[str]) -> np.ndarray:
    """Reader kind per reader sublayer: 0 attention, 1 MLP, 2 the unembedding (slopes compare like with like)."""
    return np.array([0 if r.startswith("attn") else 1 if r.startswith("mlp") else 2 for r in readers])


def _slopes(log_y: np.ndarray, distance: np.ndarray, pairs: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Least-squares slope of ``log_y[..., L, c]`` on ``distance[L, c]`` over the pairs of each write, with one
    intercept per reader kind (``groups``): ``x`` and ``y`` are centred within each kind, so that attention and MLP
    weights of different sizes do not pass for distance. NaN without two distances within one kind."""
    out = np.full(log_y.shape[:-2] + (log_y.shape[-1],), np.nan)
    for c in range(log_y.shape[-1]):
        rows = np.flatnonzero(pairs[:, c])
        if rows.size < 2:
            continue
        x = distance[rows, c].astype(float)
        y = log_y[..., rows, c]
        xc, yc = np.zeros_like(x), np.zeros_like(y)
        for g in np.unique(groups[rows]):
            at = groups[rows] == g
            xc[at] = x[at] - x[at].mean()
            yc[..., at] = y[..., at] - y[..., at].mean(-1, keepdims=True)
        if (xc * xc).sum() > 0:  # two distances within one kind at least
            out[..., c] = (yc * xc).sum(-1) / (xc * xc).sum()
    return out


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), np.nan)


def locality_statistics(read: np.ndarray, read0: np.ndarray, weight: np.ndarray, distance: np.ndarray,
                        fit_pairs: np.ndarray, fit_writes: np.ndarray, curve_d: np.ndarray, groups: np.ndarray
                        ) -> dict[str, np.ndarray]:
    """Locality slope, magnitude slope and magnitude share from read matrices ``[..., R, C]``.

    Per write ``c`` (over its ``fit_pairs``, one intercept per reader kind ``groups``): ``l_c`` = slope of
    ``log I(c, L)`` on ``d``, ``m_c`` = slope of ``log(I / I0)``. Pooled over ``fit_writes`` with weights
    ``omega_c = ||w_c||^2`` (``weight [..., C]``) as
    ratios of sums: ``locality = sum omega l / sum omega``, ``magnitude = sum omega m / sum omega``,
    ``share = sum omega m / sum omega l`` (0 when every ``I = I0``: no reader divides by the stream); the same with
    every write weighted alike (``*_equal_weights``) shows how much the weighting matters. By distance ``d`` in ``curve_d`` (pairs of ``fit_writes`` with a
    fit reader at ``d`` and at ``1/2``): ``read(d) = sum I(c, c+d) / sum I(c, c+1/2)`` and
    ``read_no_growth(d) = sum I0(c, c+d) / sum I(c, c+1/2)``; ``share(d) = (log read(d) - log read0(d) +
    log read0(1/2)) / log read(d)`` (NaN at ``d = 1/2``).
    """
    log_i, log_ratio = _log(read), _log(read) - _log(read0)
    lc = _slopes(log_i, distance, fit_pairs, groups)
    mc = _slopes(log_ratio, distance, fit_pairs, groups)
    w = np.where(fit_writes, weight, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        wl = np.where(fit_writes, w * lc, 0.0).sum(-1)
        wm = np.where(fit_writes, w * mc, 0.0).sum(-1)
        tot = w.sum(-1)
        out = {"write_locality_slope": lc, "write_magnitude_slope": mc, "locality_slope": wl / tot,
               "magnitude_slope": wm / tot, "magnitude_share": np.where(wm == 0, 0.0, wm / wl)}
        # sensitivity to the weighting: every write alike (a NaN slope makes the replicate NaN: counted by the CI)
        n_fit = max(int(fit_writes.sum()), 1)
        mean_l = np.where(fit_writes, lc, 0.0).sum(-1) / n_fit
        mean_m = np.where(fit_writes, mc, 0.0).sum(-1) / n_fit
        out["locality_slope_equal_weights"] = np.where(fit_writes.any(), mean_l, np.nan)
        out["magnitude_share_equal_weights"] = np.where(fit_writes.any() & (mean_m != 0), mean_m / mean_l, 0.0)
    first = np.where(fit_pairs & (distance == 0.5), read, 0.0).sum(-2)  # [..., C]: I(c, c + 1/2)
    curves = {"read": [], "read_no_growth": [], "share": []}
    for d in curve_d:
        at = fit_pairs & (distance == d) & fit_writes[None, :] & np.any(fit_pairs & (distance == 0.5), 0)[None, :]
        has = at.any(0)
        den = np.where(has, first, 0.0).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            curves["read"].append(np.where(at, read, 0.0).sum((-2, -1)) / den)
            curves["read_no_growth"].append(np.where(at, read0, 0.0).sum((-2, -1)) / den)
    for key in ("read", "read_no_growth"):
        out[f"curve_{key}"] = np.stack(curves[key], -1) if curves[key] else np.zeros(read.shape[:-2] + (0,))
    r0_first = out["curve_read_no_growth"][..., :1]
    with np.errstate(invalid="ignore", divide="ignore"):
        log_read = _log(out["curve_read"])
        share_d = (log_read - _log(out["curve_read_no_growth"]) + _log(r0_first)) / log_read
    out["curve_share"] = np.where(np.asarray(curve_d) > 0.5, share_d, np.nan)
    return out


# ----------------------------------------------------------------------------------------------
# innovation retention
# ----------------------------------------------------------------------------------------------
def innovation_factor(gamma: np.ndarray, skip: np.ndarray, tol: float = NO_INNOVATION_TOL
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factor ``L`` ``[..., C, C]`` of ``Gamma`` with writes that have no innovation skipped.

    Column ``c``: ``v = Gamma[:, c] - L[:, :c] L[c, :c]``; ``||u_c||^2 = v_c``; when ``v_c > tol Gamma_cc`` and
    ``c`` is not in ``skip``: ``L[j, c] = v_j / sqrt(v_c)`` for ``j >= c``, else the column is 0. Returns ``L``
    and ``||u_c||^2`` ``[..., C]`` (0 for skipped writes, the measured residual otherwise, possibly below tol).
    """
    g = np.asarray(gamma, dtype=np.float64)
    n_c = g.shape[-1]
    lower = np.zeros_like(g)
    innov = np.zeros(g.shape[:-1])
    for c in range(n_c):
        v = g[..., :, c] - np.einsum("...jk,...k->...j", lower[..., :, :c], lower[..., c, :c])
        vc = v[..., c]
        innov[..., c] = np.where(skip[c], 0.0, vc)
        ok = (vc > tol * g[..., c, c]) & ~skip[c] & (g[..., c, c] > 0)
        root = np.sqrt(np.where(ok, vc, 1.0))
        col = np.where(ok[..., None], v / root[..., None], 0.0)
        col[..., :c] = 0.0
        lower[..., :, c] = col
    return lower, innov


def innovation_retention(lower: np.ndarray, reader_index: Sequence[int]) -> np.ndarray:
    """``rho_u(c, L) = sum_{c<=j<k} L_jc / L_cc`` ``[..., R, C]`` (NaN where ``c >= k`` or ``L_cc = 0``)."""
    k = np.asarray(reader_index)
    cum = np.cumsum(lower, -2)  # [..., j, c]: sum_{i<=j} L_ic (L_ic = 0 for i < c)
    to_reader = np.swapaxes(cum[..., k - 1, :], -1, -2)  # [..., C, R]
    diag = np.diagonal(lower, axis1=-2, axis2=-1)  # [..., C]
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(diag[..., :, None] > 0, to_reader / np.where(diag > 0, diag, 1.0)[..., :, None], np.nan)
    before = np.arange(lower.shape[-1])[:, None] < k[None, :]
    return np.swapaxes(np.where(before, rho, np.nan), -1, -2)


def pooled_retention(rho: np.ndarray, far_pairs: np.ndarray, innov: np.ndarray, energy: np.ndarray,
                     writes: np.ndarray, below: float = ERASED_BELOW) -> dict[str, np.ndarray]:
    """Per write ``rho_c`` = mean of ``rho(c, L)`` over its far readers; pooled over ``writes`` as ratios of
    sums with weights ``||u_c||^2`` (``innovation_weighted``) and ``||w~_c||^2`` (``write_weighted``); the
    median of ``rho_c`` and the share of writes with ``rho_c < below``."""
    far = np.where(far_pairs, rho, 0.0)
    cnt = far_pairs.sum(0)
    with np.errstate(invalid="ignore"):
        per = np.where(cnt > 0, far.sum(-2) / np.maximum(cnt, 1), np.nan)
    use = writes & (cnt > 0)
    out = {"write_retention": per}
    for key, wgt in (("innovation_weighted", innov), ("write_weighted", energy)):
        w = np.where(use, wgt, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[key] = np.where(use, w * per, 0.0).sum(-1) / w.sum(-1)
        if not use.any():
            out[key] = np.full(per.shape[:-1], np.nan)
    sel = per[..., use]
    out["median"] = np.median(sel, -1) if use.any() else np.full(per.shape[:-1], np.nan)
    out["share_below"] = (sel < below).mean(-1) if use.any() else np.full(per.shape[:-1], np.nan)
    return out


def front_share(raw_gram: np.ndarray, front: np.ndarray, k: int) -> np.ndarray:
    """Share of the last reader's squared input carried by the ``front`` writes:
    ``sum_{c in front} sum_{j<k} G_cj / sum_{i,j<k} G_ij`` for the raw projected Gram ``G`` ``[..., C, C]``."""
    g = raw_gram[..., :k, :k]
    with np.errstate(invalid="ignore", divide="ignore"):
        return g[..., front[:k], :].sum((-2, -1)) / g.sum((-2, -1))


# ----------------------------------------------------------------------------------------------
# verdict
# ----------------------------------------------------------------------------------------------
def _side(ci: Any, threshold: float) -> Optional[bool]:
    """True: the CI lies above ``threshold``; False: below; None: straddles it or is missing."""
    lo, hi = (float("nan") if v is None else float(v) for v in (ci if ci is not None else (None, None)))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    if lo > threshold:
        return True
    if hi < threshold:
        return False
    return None


def deletion_verdict(retention_ci: Sequence[Optional[float]], locality_ci: Sequence[Optional[float]],
                     share_ci: Sequence[Optional[float]], front: Optional[float]) -> dict[str, Any]:
    """One label and the flags of every other criterion that holds.

    erasure: pooled innovation retention at d >= 2 has its CI below 0.8; reinforced: above 1.25; magnitude:
    locality (slope CI below 0) and magnitude share CI above 0.5; direction: locality and share CI below 0.5;
    no locality: slope CI includes 0 or lies above it; front-loaded (flag only): embedding + block 0 carry at
    least half of the last reader's squared input. Label precedence: erasure, reinforced, magnitude /
    direction / no locality, inconclusive.
    """
    ret_lo, ret_hi = (float("nan") if v is None else float(v) for v in retention_ci)
    erased = math.isfinite(ret_hi) and ret_hi < ERASED_BELOW
    reinforced = math.isfinite(ret_lo) and ret_lo > REINFORCED_ABOVE
    lo_l, hi_l = (float("nan") if v is None else float(v) for v in locality_ci)
    local = math.isfinite(hi_l) and hi_l < 0
    no_local = math.isfinite(lo_l) and math.isfinite(hi_l) and hi_l >= 0
    share_side = _side(share_ci, SHARE_SPLIT)
    holds = {"erasure": erased, "reinforced": reinforced, "magnitude": local and share_side is True,
             "direction": local and share_side is False, "no locality": no_local,
             "front-loaded": front is not None and math.isfinite(front) and front >= FRONT_LOADED_MIN}
    label = next((lab for lab in LABELS[:-1] if holds[lab]), "inconclusive")
    reasons = {
        "erasure": "later writes remove what is new in earlier ones (innovation retention at d >= 2 below 0.8)",
        "reinforced": "later writes re-write what is new in earlier ones (innovation retention above 1.25)",
        "magnitude": "reads fall with distance, mostly because the reader's scale grows (magnitude share above 0.5)",
        "direction": "reads fall with distance, mostly because the readers' weights ignore old writes "
                     "(magnitude share below 0.5)",
        "no locality": "reads do not fall with distance (the locality slope's CI includes 0 or lies above it)",
        "inconclusive": "no criterion's CI lies on one side of its threshold",
    }
    return {"label": label, "reason": reasons[label],
            "flags": [k for k, v in holds.items() if v and k != label],
            "thresholds": {"erased_below": ERASED_BELOW, "reinforced_above": REINFORCED_ABOVE,
                           "share_split": SHARE_SPLIT, "locality_slope_below": 0.0,
                           "front_loaded_min": FRONT_LOADED_MIN, "far_distance": FAR_DISTANCE}}
