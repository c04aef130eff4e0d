"""Deletion by magnitude versus deletion by erasure: how later writes hide earlier ones.

The residual stream read by a reader ``L`` (the input of a block, or the final stream) is the sum of
the writes before it, ``r_L = sum_{c<L} w_c``. Writes ``c`` in forward order: the embedding (token plus
learned position, one write labelled ``embed``), then ``attn_out.l`` and ``mlp_out.l`` of every block.
``P(x)`` is what the model's normalisation looks at: ``x - mean(x)`` when it centres (LayerNorm and
LN-free checkpoints), ``x`` for RMSNorm.

Every write is **token-centred**: ``w~_c = P(w_c) - mu_c`` with ``mu_c`` the mean of ``P(w_c)`` over the
data's tokens (the constant part, shared by every token, is reported apart as the shared component).
With ``Gamma_ij = sum_tokens <w~_i, w~_j>`` (summed over tokens, positions >= 1) and ``k`` the number of
writes before reader ``L``, the ratio-of-sums estimators are

* retention  ``rho(c,L)   = sum_{c<=j<k} Gamma_cj / Gamma_cc`` (regression coefficient of what is
  written from ``c`` on, as the reader sees it, on the write: 1 kept, 0 erased, > 1 reinforced)
* dilution   ``delta(c,L) = sqrt(Gamma_cc / sum_{i,j<k} Gamma_ij)``
* visibility ``nu(c,L)    = rho * delta``
* reading share ``R(L,c)  = sum_{j<k} Gamma_cj / sum_{i,j<k} Gamma_ij``
* equal-norm nulls ``R0, delta0, nu0``: the same from ``Gamma'_ij = Gamma_ij / sqrt(Gamma_ii Gamma_jj)``
  (every write rescaled to one common norm, directions kept); ``excess dilution = delta / delta0``.
* influence ``I(L,c)``: the direct effect of write ``c`` on reader ``L``'s normalised input when only the
  path ``c -> L`` is patched (``w_c`` replaced by its mean in ``r_L`` alone),
  ``sum_t ||N(r_L) - N(r_L - w~_c)|| / sum_t ||N(r_L)||``.

Depth convention (used for distances): ``layer(embed) = 0``, ``layer(attn_out.l) = layer(mlp_out.l) =
l + 1``, ``layer(resid_pre.l) = l + 1`` and ``layer(final) = n_layers + 1``; the distance
``d = layer(L) - layer(c)`` is >= 1 for every write before a reader and 1 for its first reader.

Pure functions on arrays come first (:func:`deletion_quantities`, :func:`write_slopes`,
:func:`deletion_verdict` ...), then the results, the report, and the model plumbing
(:func:`collect_deletion`, :func:`ablation_check`). Formulas and reading guide: ``docs/deletion.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .data import TokenBatch, as_token_batch, iter_batches
from .errors import NormgrowthError
from .numerics import (DEFAULT_N_BOOT, loglinear_slope, percentile_ci, polyfit_rows, resample_counts)
from .protocol import ResultProtocol
from .storage import json_safe
from .tables import fmt_number

QUANTITIES = ("retention", "dilution", "visibility", "reading", "reading_null", "dilution_null",
              "visibility_null", "excess_dilution")
MATRICES = QUANTITIES + ("influence",)
SHARE_WITHIN = (1, 2, 4, 8)  # layers for the locality shares
DEFAULT_ABLATION_LAYERS = 6  # number of blocks in the default ablation spread
MIN_PAIRS = 3  # a distance enters pooled statistics only with at least this many (reader, write) pairs
MIN_BOOT_SEQS = 30  # fewer sequences than this make a bootstrap CI unreliable (a warning is recorded)
ZERO_WRITE_TOL = 1e-5  # a write whose centred RMS is below this fraction of its raw RMS counts as zero
# verdict thresholds (documented in docs/deletion.md)
RETENTION_KEPT = 0.8  # retention at distance >= 2 above this: kept; below: erased
EXCESS_DECAY_MIN = 1.02  # excess-dilution decay per layer above this: dilution outpaces its equal-norm null
_CHUNK_BYTES = 256 * 2**20  # working memory for one chunk of per-token quantities
_BOOT_BLOCK = 128  # bootstrap replicates evaluated together


# ----------------------------------------------------------------------------------------------
# stream layout: writes, readers, depths
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamLayout:
    """Writes and readers of an ``n_layers``-block residual stream, in forward order.

    ``reader_index[r]`` is the number of writes before reader ``r`` (writes ``0 .. reader_index-1``
    sum to its stream). Depths follow the module docstring's convention.
    """

    n_layers: int
    writes: tuple[str, ...]
    write_layer: tuple[int, ...]
    readers: tuple[str, ...]
    reader_layer: tuple[int, ...]
    reader_index: tuple[int, ...]

    @property
    def n_writes(self) -> int:
        return len(self.writes)


def stream_layout(n_layers: int) -> StreamLayout:
    """Layout for ``n_layers`` blocks: ``C = 2 n_layers + 1`` writes, ``n_layers + 1`` readers."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    writes = ["embed"] + [f"{site}.{layer}" for layer in range(n_layers) for site in ("attn_out", "mlp_out")]
    write_layer = [0] + [layer + 1 for layer in range(n_layers) for _ in range(2)]
    readers = [f"resid_pre.{layer}" for layer in range(n_layers)] + ["final"]
    reader_layer = [layer + 1 for layer in range(n_layers)] + [n_layers + 1]
    reader_index = [1 + 2 * layer for layer in range(n_layers)] + [2 * n_layers + 1]
    return StreamLayout(n_layers, tuple(writes), tuple(write_layer), tuple(readers), tuple(reader_layer),
                        tuple(reader_index))


def distance_matrix(write_layer: Sequence[int], reader_layer: Sequence[int]) -> np.ndarray:
    """``d[L, c] = layer(L) - layer(c)`` as float ``[n_readers, n_writes]``; NaN where c is not before L."""
    wl = np.asarray(write_layer, dtype=float)[None, :]
    rl = np.asarray(reader_layer, dtype=float)[:, None]
    dist = rl - wl
    return np.where(dist >= 1, dist, np.nan)


# ----------------------------------------------------------------------------------------------
# pure math on Gram matrices
# ----------------------------------------------------------------------------------------------
def project_writes(writes: torch.Tensor, center: bool) -> torch.Tensor:
    """``P(w)`` in float32: ``w - mean(w)`` over the last axis when ``center``, else ``w``."""
    x = writes.float()
    return x - x.mean(-1, keepdim=True) if center else x


def gram_from_writes(writes: torch.Tensor, center: bool) -> torch.Tensor:
    """``G[..., i, j] = <P(w_i), P(w_j)>`` (float32) for writes ``[..., C, d]``."""
    p = project_writes(writes, center)
    return p @ p.transpose(-1, -2)


def deletion_quantities(gram: Any, reader_index: Sequence[int]) -> dict[str, torch.Tensor]:
    """Retention, dilution, visibility, reading share and their equal-norm nulls from a Gram matrix.

    gram: ``[..., C, C]`` (a per-token Gram matrix, or ``Gamma`` summed over tokens for the
    ratio-of-sums estimators), writes in forward order. reader_index: for every reader, the number
    of writes before it (``1 <= k <= C``). Returns ``[..., n_readers, C]`` tensors (keys
    :data:`QUANTITIES`; float64 for float64 input, else float32), NaN where ``c >= k``. With
    ``S_k = sum_{i,j<k} G_ij``: ``rho = sum_{c<=j<k} G_cj / G_cc``, ``delta = sqrt(G_cc / S_k)``,
    ``nu = rho delta``, ``R = sum_{j<k} G_cj / S_k``; ``R0, delta0, nu0`` are the same of
    ``G_ij / sqrt(G_ii G_jj)``; ``excess_dilution = delta / delta0``. A write with ``G_cc = 0`` has
    NaN retention, visibility and excess dilution, dilution 0 and null share 0.
    """
    G = torch.as_tensor(gram)
    G = G if G.dtype == torch.float64 else G.float()
    n_writes = G.shape[-1]
    k = torch.as_tensor(list(reader_index), dtype=torch.long, device=G.device)
    if k.numel() == 0 or int(k.min()) < 1 or int(k.max()) > n_writes:
        raise ValueError(f"reader_index must lie in [1, {n_writes}], got {list(reader_index)}")
    before = torch.arange(n_writes, device=G.device)[None, :] < k[:, None]  # [R, C]
    nan = torch.tensor(float("nan"), dtype=G.dtype, device=G.device)

    def core(gram_: torch.Tensor) -> dict[str, torch.Tensor]:
        to_reader = gram_.cumsum(-1)[..., :, k - 1].transpose(-1, -2)  # [..., R, C]: sum_{j<k} G_cj
        stream_sq = torch.where(before, to_reader, 0.0).sum(-1)  # [..., R]: S_k
        from_write = torch.triu(gram_).cumsum(-1)[..., :, k - 1].transpose(-1, -2)  # sum_{c<=j<k} G_cj
        diag = gram_.diagonal(dim1=-2, dim2=-1)
        has_norm = (diag > 0)[..., None, :]
        write_norm = diag.clamp_min(0).sqrt()[..., None, :]
        stream_norm = stream_sq.clamp_min(0).sqrt()[..., :, None]
        return {"retention": torch.where(has_norm, from_write / diag[..., None, :], nan),
                "dilution": write_norm / stream_norm,
                "visibility": torch.where(has_norm, from_write / (write_norm * stream_norm), nan),
                "reading": to_reader / stream_sq[..., :, None]}

    q = core(G)
    diag = G.diagonal(dim1=-2, dim2=-1)
    inv_norm = torch.where(diag > 0, diag.clamp_min(torch.finfo(G.dtype).tiny).rsqrt(), 0.0)
    null = core(G * inv_norm[..., :, None] * inv_norm[..., None, :])
    q["reading_null"] = null["reading"]
    q["dilution_null"] = null["dilution"]
    q["visibility_null"] = null["visibility"]
    has = (diag > 0)[..., None, :]
    q["excess_dilution"] = torch.where(has, q["dilution"] / null["dilution"], nan)
    return {name: torch.where(before, q[name], nan) for name in QUANTITIES}


def zero_write_mask(centred_energy: np.ndarray, raw_energy: np.ndarray, tol: float = ZERO_WRITE_TOL) -> np.ndarray:
    """Writes that are zero once token-centred: ``sum ||w~||^2 <= tol^2 sum ||P(w)||^2`` (or no energy).

    Exactly zero writes (pruned heads, zeroed layers) and writes that are the same vector at every token
    (a bias alone) carry nothing a token-level statistic could use; they are skipped and counted.
    """
    c = np.asarray(centred_energy, dtype=float)
    r = np.asarray(raw_energy, dtype=float)
    return (c <= tol**2 * r) | (r <= 0)


def normalized_change(a_sq: Any, a_dot_w: Any, w_sq: Any, d_model: int, eps: float) -> tuple[Any, Any]:
    """``(||N(a) - N(a - w)||, ||N(a)||)`` from inner products, ``N(x) = x / sqrt(||x||^2 / d + eps)``.

    ``a``: the projected stream a reader normalises, ``w``: the part removed. With ``b = a - w``,
    ``alpha^2 = ||a||^2/d + eps``, ``beta^2 = ||b||^2/d + eps``:
    ``||N(a) - N(b)||^2 = ||a||^2/alpha^2 + ||b||^2/beta^2 - 2 <a, b>/(alpha beta)``. Works on numpy
    arrays or tensors (use float64: the expression cancels when ``w`` is small).
    """
    lib = torch if isinstance(a_sq, torch.Tensor) else np
    b_sq = (a_sq - 2 * a_dot_w + w_sq).clip(min=0) if lib is np else (a_sq - 2 * a_dot_w + w_sq).clamp_min(0)
    alpha = lib.sqrt(a_sq / d_model + eps)
    beta = lib.sqrt(b_sq / d_model + eps)
    diff_sq = a_sq / alpha**2 + b_sq / beta**2 - 2 * (a_sq - a_dot_w) / (alpha * beta)
    diff_sq = diff_sq.clip(min=0) if lib is np else diff_sq.clamp_min(0)
    return lib.sqrt(diff_sq), lib.sqrt(a_sq) / alpha


# ----------------------------------------------------------------------------------------------
# pure summaries (numpy)
# ----------------------------------------------------------------------------------------------
def pair_average_by_distance(matrix: np.ndarray, distance: np.ndarray, pairs: Optional[np.ndarray] = None
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average a ``[..., n_readers, n_writes]`` matrix over the (reader, write) pairs at each distance.

    ``pairs`` (bool ``[n_readers, n_writes]``, default all) selects the pairs that take part. Returns
    ``(distances [D], values [..., D], n_pairs [D])``; every pair counts equally; NaN entries are skipped.
    """
    matrix = np.asarray(matrix, dtype=float)
    sel_all = np.isfinite(distance) & (True if pairs is None else np.asarray(pairs, dtype=bool))
    distances = np.unique(distance[sel_all]).astype(int)
    values, n_pairs = [], []
    for d in distances:
        sel = sel_all & (distance == d)
        block = matrix[..., sel]
        with np.errstate(invalid="ignore"):
            cnt = np.isfinite(block).sum(-1)
            tot = np.where(np.isfinite(block), block, 0.0).sum(-1)
            values.append(np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan))
        n_pairs.append(int(sel.sum()))
    if not values:
        return distances, np.zeros(matrix.shape[:-2] + (0,)), np.zeros(0, dtype=int)
    return distances, np.stack(values, -1), np.asarray(n_pairs)


def write_slopes(matrix: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Per write ``c``: least-squares slope of ``log matrix[..., L, c]`` on ``d(L, c)`` over its readers.

    matrix: ``[..., n_readers, n_writes]``; distance: ``[n_readers, n_writes]`` (NaN where the write is
    not before the reader). Returns ``[..., n_writes]``; NaN for a write with fewer than two readers
    or a non-positive / NaN value among them (such a replicate is counted by the CI, not hidden).
    ``exp(-slope)`` is the factor by which the quantity falls per layer of distance.
    """
    m = np.asarray(matrix, dtype=float)
    out = np.full(m.shape[:-2] + (m.shape[-1],), np.nan)
    for c in range(m.shape[-1]):
        rows = np.flatnonzero(np.isfinite(distance[:, c]))
        if rows.size < 2:
            continue
        y = m[..., rows, c]
        with np.errstate(invalid="ignore", divide="ignore"):
            ly = np.where(y > 0, np.log(np.where(y > 0, y, 1.0)), np.nan)
        out[..., c] = polyfit_rows(distance[rows, c], ly, 1)[..., 1]
    return out


def locality(reading: np.ndarray, reading_null: np.ndarray, distance: np.ndarray,
             within: Sequence[int] = SHARE_WITHIN, influence: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Where each reader's stream comes from, by distance: reading shares, equal-norm null, influence.

    reading, reading_null, influence, distance: ``[n_readers, n_writes]`` (distance NaN where the write is
    not before the reader). Per reader, with weights ``s(L,c)`` (``R``, ``R0`` or the influence
    normalised to sum to 1 per reader): ``mean_distance = sum_c s d`` and
    ``share_within[k] = sum_{c: d<=k} s``. The scalar ``share_within[k]`` averages the per-reader shares
    over the readers that have at least one write farther than ``k`` layers (NaN if none).
    """
    before = np.isfinite(distance)
    dist0 = np.where(before, distance, 0.0)
    farthest = np.max(np.where(before, distance, -np.inf), -1)

    def per_reader(share: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
        share = np.where(before, np.nan_to_num(share, nan=0.0), 0.0)
        mean_distance = np.sum(share * dist0, -1)
        per, scalar = {}, {}
        for k in within:
            s = np.sum(np.where(before & (dist0 <= k), share, 0.0), -1)
            per[str(k)] = s
            has_far = farthest > k
            scalar[str(k)] = float(np.mean(s[has_far])) if has_far.any() else float("nan")
        return mean_distance, per, scalar

    md, per, scalar = per_reader(np.asarray(reading, dtype=float))
    md0, per0, scalar0 = per_reader(np.asarray(reading_null, dtype=float))
    out = {"mean_distance": md, "mean_distance_null": md0, "share_within": scalar,
           "share_within_null": scalar0, "share_within_per_reader": per, "share_within_null_per_reader": per0}
    if influence is not None:
        infl = np.where(before, np.nan_to_num(np.asarray(influence, dtype=float), nan=0.0), 0.0)
        tot = infl.sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(tot > 0, infl / np.where(tot > 0, tot, 1.0), np.nan)
        mdi, peri, scalari = per_reader(share)
        out.update(mean_distance_influence=np.where(tot[:, 0] > 0, mdi, np.nan), share_within_influence=scalari,
                   share_within_influence_per_reader=peri)
    return out


def deletion_verdict(retention_far: float, retention_far_ci: Sequence[float], excess_decay: float,
                     excess_decay_ci: Sequence[float], kept_min: float = RETENTION_KEPT,
                     excess_min: float = EXCESS_DECAY_MIN) -> dict[str, Any]:
    """Label from two CIs: retention at distance >= 2 and the excess-dilution decay per layer.

    kept: CI of retention entirely >= ``kept_min``; erased: entirely < ``kept_min``. Dilution outpaces
    its equal-norm null: CI of the excess decay entirely > ``excess_min``; does not: entirely <=.
    magnitude = kept and outpaced; erasure = erased and not outpaced; mixed = erased and outpaced;
    neither = kept and not outpaced (nothing is deleted); inconclusive = a CI straddles its threshold
    or is missing.
    """
    def side(ci: Sequence[float], thr: float, strict_above: bool) -> Optional[bool]:
        lo, hi = (float("nan") if v is None else float(v) for v in ci)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        if (lo > thr) if strict_above else (lo >= thr):
            return True
        if (hi <= thr) if strict_above else (hi < thr):
            return False
        return None

    kept = side(retention_far_ci, kept_min, strict_above=False)
    outpaced = side(excess_decay_ci, excess_min, strict_above=True)
    if kept is None or outpaced is None:
        label = "inconclusive"
        why = []
        if kept is None:
            why.append(f"the CI of retention at distance >= 2 does not lie on one side of {kept_min}")
        if outpaced is None:
            why.append(f"the CI of the excess-dilution decay does not lie on one side of {excess_min}")
        reason = "; ".join(why)
    else:
        label = {(True, True): "magnitude", (False, False): "erasure", (False, True): "mixed",
                 (True, False): "neither"}[(kept, outpaced)]
        reason = {"magnitude": "earlier writes are kept but outgrown: dilution falls faster than its equal-norm null",
                  "erasure": "later writes remove earlier ones, and dilution does not outpace its null",
                  "mixed": "later writes remove earlier ones, and dilution also outpaces its null",
                  "neither": "earlier writes are kept and dilution does not outpace its null"}[label]
    return {"label": label, "reason": reason,
            "retention_far": {"value": retention_far, "ci95": list(retention_far_ci), "kept": kept},
            "excess_dilution_decay_per_layer": {"value": excess_decay, "ci95": list(excess_decay_ci),
                                                "outpaces_null": outpaced},
            "thresholds": {"retention_kept_min": kept_min, "excess_decay_min": excess_min}}


def stream_parts(gamma: np.ndarray, mean_gram: np.ndarray, n_tokens: int, reader_index: Sequence[int]
                 ) -> dict[str, np.ndarray]:
    """Split each reader's mean squared projected norm into the token-mean part and the rest.

    ``E||P(r_L)||^2 = ||mu_L||^2 + E||P(r_L) - mu_L||^2`` with ``mu_L = sum_{c<k} mu_c``:
    ``||mu_L||^2 = sum_{i,j<k} <mu_i, mu_j>`` (``mean_gram``) and the centred part
    ``sum_{i,j<k} Gamma_ij / n_tokens``. Returns RMS norms ``total``, ``shared`` (``||mu_L||``) and
    ``centred`` per reader.
    """
    shared, centred = [], []
    for k in reader_index:
        shared.append(float(np.sum(mean_gram[:k, :k])))
        centred.append(float(np.sum(gamma[..., :k, :k])) / max(n_tokens, 1))
    s, c = np.clip(shared, 0, None), np.clip(centred, 0, None)
    return {"total": np.sqrt(s + c), "shared": np.sqrt(s), "centred": np.sqrt(c)}


# ----------------------------------------------------------------------------------------------
# estimates and bootstrap
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Design:
    """Which writes and pairs enter which statistic (fixed from the full sample)."""

    layout: StreamLayout
    distance: np.ndarray  # [R, C]
    zero: np.ndarray  # [C] bool: zero writes, skipped
    block: np.ndarray  # [C] bool: attn_out / mlp_out writes that are not zero
    far_pairs: np.ndarray  # [R, C] bool: block writes at distance >= 2
    curve_pairs: np.ndarray  # [R, C] bool: pairs pooled by distance (block writes, any reader)


def _design(layout: StreamLayout, zero: np.ndarray) -> _Design:
    distance = distance_matrix(layout.write_layer, layout.reader_layer)
    block = np.array([w != "embed" for w in layout.writes]) & ~zero
    curve = np.isfinite(distance) & block[None, :]
    far = curve & (np.nan_to_num(distance, nan=0.0) >= 2)
    return _Design(layout, distance, zero, block, far, curve)


def _statistics(gamma: np.ndarray, infl_num: np.ndarray, infl_den: np.ndarray, n_tokens: np.ndarray,
                des: _Design, summary_writes: Optional[np.ndarray]) -> dict[str, np.ndarray]:
    """Every estimate for a stack of summed Gram matrices ``gamma [B, C, C]`` (one per replicate)."""
    lay = des.layout
    g = gamma.copy()
    g[:, des.zero, :] = 0.0
    g[:, :, des.zero] = 0.0
    q = {k: v.numpy() for k, v in deletion_quantities(torch.from_numpy(g), lay.reader_index).items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        q["influence"] = np.where(np.isfinite(des.distance), infl_num / infl_den[..., None], np.nan)
    for k in q:
        q[k][..., des.zero] = np.nan
    out: dict[str, np.ndarray] = {f"matrix.{k}": v for k, v in q.items()}
    for k, v in q.items():
        _, curve, _ = pair_average_by_distance(v, des.distance, des.curve_pairs)
        out[f"curve.{k}"] = curve
    slopes = {k: write_slopes(q[k], des.distance) for k in ("dilution", "visibility", "excess_dilution")}
    for k, v in slopes.items():
        out[f"write_slope.{k}"] = v
    far = np.where(des.far_pairs, q["retention"], np.nan)
    with np.errstate(invalid="ignore"):
        cnt = np.isfinite(far).sum(-2)
        out["write_retention_far"] = np.where(cnt > 0, np.nansum(far, -2) / np.maximum(cnt, 1), np.nan)
    # mean over every far pair; a NaN pair makes the replicate NaN (counted by the CI, never dropped)
    out["retention_far"] = (q["retention"][..., des.far_pairs].mean(-1) if des.far_pairs.any()
                            else np.full(g.shape[0], np.nan))
    sel = summary_writes if summary_writes is not None else np.zeros(lay.n_writes, dtype=bool)
    for k, v in slopes.items():
        out[f"{k}_decay_per_layer"] = (np.exp(-v[..., sel].mean(-1)) if sel.any()
                                       else np.full(g.shape[0], np.nan))
    centred = np.stack([g[:, :k, :k].sum((-2, -1)) for k in lay.reader_index], -1) / np.maximum(n_tokens, 1)[:, None]
    out["stream_centred_rms"] = np.sqrt(np.clip(centred, 0, None))
    return out


def _summary_writes(point_slopes: dict[str, np.ndarray], des: _Design) -> np.ndarray:
    """Writes in the cross-write summaries: block writes (not the embedding, not zero) with finite slopes."""
    ok = des.block.copy()
    for v in point_slopes.values():
        ok &= np.isfinite(v)
    return ok


def summarize_deletion(seq_gram: np.ndarray, seq_n_tokens: np.ndarray, seq_infl: np.ndarray, seq_fnorm: np.ndarray,
                       mean_gram: np.ndarray, layout: StreamLayout, n_boot: int = DEFAULT_N_BOOT, seed: int = 0
                       ) -> dict[str, Any]:
    """All summaries of a deletion run from its per-sequence sums.

    seq_gram ``[S, C, C]``: per sequence, ``sum_t <w~_i, w~_j>`` over its tokens; seq_n_tokens ``[S]``;
    seq_infl ``[S, R, C]`` / seq_fnorm ``[S, R]``: sums of ``||N(r) - N(r - w~_c)||`` and ``||N(r)||``;
    mean_gram ``[C, C]``: ``<mu_i, mu_j>`` of the write means. CIs: percentile bootstrap over sequences
    (:func:`normgrowth.numerics.resample_counts`); a replicate's estimate is the same function of the
    resampled sums; replicates that give NaN are counted (``nonfinite``), never dropped silently.
    """
    seq_gram = np.asarray(seq_gram, dtype=np.float64)
    n_tok = np.asarray(seq_n_tokens, dtype=np.float64)
    infl = np.asarray(seq_infl, dtype=np.float64)
    fnorm = np.asarray(seq_fnorm, dtype=np.float64)
    mean_gram = np.asarray(mean_gram, dtype=np.float64)
    gamma = seq_gram.sum(0)
    N = float(n_tok.sum())
    raw_energy = np.diag(gamma) + N * np.diag(mean_gram)
    zero = zero_write_mask(np.diag(gamma), raw_energy)
    des = _design(layout, zero)
    probe = _statistics(gamma[None], infl.sum(0)[None], fnorm.sum(0)[None], np.array([N]), des, None)
    sel = _summary_writes({k: probe[f"write_slope.{k}"][0] for k in ("dilution", "visibility", "excess_dilution")},
                          des)
    point = {k: v[0] for k, v in _statistics(gamma[None], infl.sum(0)[None], fnorm.sum(0)[None], np.array([N]),
                                             des, sel).items()}
    n_seqs = int(seq_gram.shape[0])
    boot: dict[str, list] = {}
    if n_boot > 0 and n_seqs >= 2:
        for chunk in resample_counts(n_seqs, n_boot, seed):
            for lo in range(0, chunk.shape[0], _BOOT_BLOCK):  # bounded memory: [block, R, C] per matrix
                counts = chunk[lo:lo + _BOOT_BLOCK]
                st = _statistics(np.einsum("bs,sij->bij", counts, seq_gram), np.einsum("bs,src->brc", counts, infl),
                                 counts @ fnorm, counts @ n_tok, des, sel)
                for k, v in st.items():
                    if not k.startswith("matrix."):
                        boot.setdefault(k, []).append(v)
    cis = {k: percentile_ci(np.concatenate(v, 0)) for k, v in boot.items()}
    return {"point": point, "ci": cis, "design": des, "summary_writes": sel, "n_seqs": n_seqs,
            "n_boot": n_boot if cis else 0, "parts": stream_parts(gamma, mean_gram, int(N), layout.reader_index),
            "n_tokens": int(N)}


def _ci_pair(ci: Optional[Any], index: Any = ()) -> list:
    if ci is None:
        return [None, None]
    lo, hi = np.asarray(ci.lo, dtype=float), np.asarray(ci.hi, dtype=float)
    return [float(lo[index]), float(hi[index])]


def _ci_array(ci: Optional[Any], shape: tuple) -> np.ndarray:
    return np.full(shape + (2,), np.nan) if ci is None else ci.as_array()


def _growth_over_depth(depth: Sequence[int], values: np.ndarray) -> float:
    """``exp(slope)`` of ``log values`` on depth (:func:`normgrowth.numerics.loglinear_slope`)."""
    s = loglinear_slope(np.asarray(depth, dtype=float), np.asarray(values, dtype=float))
    return math.exp(s) if math.isfinite(s) else float("nan")


def deletion_document(summ: dict[str, Any]) -> dict[str, Any]:
    """The JSON body (everything but the run metadata) from :func:`summarize_deletion`'s output."""
    point, cis, des = summ["point"], summ["ci"], summ["design"]
    lay = des.layout
    sel = summ["summary_writes"]
    out: dict[str, Any] = {}
    for q in MATRICES:
        out[q] = point[f"matrix.{q}"]
    dists, _, n_pairs = pair_average_by_distance(point["matrix.retention"], des.distance, des.curve_pairs)
    by: dict[str, Any] = {"distance": dists, "n_pairs": n_pairs, "used": n_pairs >= MIN_PAIRS,
                          "pairs": "attn_out / mlp_out writes (not the embedding, not zero writes) x every reader"}
    for q in MATRICES:
        by[q] = point[f"curve.{q}"]
        by[q + "_ci95"] = _ci_array(cis.get(f"curve.{q}"), (len(dists),))
    for key in ("dilution_decay_per_layer", "visibility_decay_per_layer", "excess_dilution_decay_per_layer"):
        by[key] = point[key]
        by[key + "_ci95"] = _ci_pair(cis.get(key))
    by["retention_far"] = point["retention_far"]
    by["retention_far_ci95"] = _ci_pair(cis.get("retention_far"))
    by["n_far_pairs"] = int(des.far_pairs.sum())
    out["by_distance"] = by
    per_write = []
    for c, w in enumerate(lay.writes):
        row = {"write": w, "write_layer": lay.write_layer[c], "zero": bool(des.zero[c]),
               "in_summary": bool(sel[c]), "n_readers": int(np.isfinite(des.distance[:, c]).sum())}
        for k in ("dilution", "visibility", "excess_dilution"):
            s = point[f"write_slope.{k}"][c]
            row[f"{k}_decay_per_layer"] = math.exp(-s) if math.isfinite(s) else None
            ci = cis.get(f"write_slope.{k}")
            lo, hi = _ci_pair(ci, c)
            row[f"{k}_decay_per_layer_ci95"] = [math.exp(-hi) if hi is not None and math.isfinite(hi) else None,
                                                math.exp(-lo) if lo is not None and math.isfinite(lo) else None]
        row["retention_far"] = point["write_retention_far"][c]
        row["retention_far_ci95"] = _ci_pair(cis.get("write_retention_far"), c)
        per_write.append(row)
    out["per_write"] = per_write
    out["zero_writes"] = [w for w, z in zip(lay.writes, des.zero) if z]
    out["verdict"] = deletion_verdict(point["retention_far"], by["retention_far_ci95"],
                                      point["excess_dilution_decay_per_layer"],
                                      by["excess_dilution_decay_per_layer_ci95"])
    out["verdict"]["n_writes_in_summary"] = int(sel.sum())
    out["verdict"]["n_far_pairs"] = int(des.far_pairs.sum())
    out["locality"] = locality(point["matrix.reading"], point["matrix.reading_null"], des.distance,
                               influence=point["matrix.influence"])
    parts = summ["parts"]
    depth = list(lay.reader_layer)
    centred_ci = cis.get("stream_centred_rms")
    out["stream_parts"] = {
        "readers": list(lay.readers), "reader_layer": depth,
        "rms_total": parts["total"], "rms_shared": parts["shared"], "rms_centred": parts["centred"],
        "rms_centred_ci95": _ci_array(centred_ci, (len(depth),)),
        "growth_per_layer": {k: _growth_over_depth(depth, parts[k]) for k in ("total", "shared", "centred")},
        "definition": "E||P(r_L)||^2 = ||mu_L||^2 + E||P(r_L) - mu_L||^2 over tokens at positions >= 1; "
                      "RMS norms; growth = exp(slope) of log RMS on reader depth",
    }
    # replicates that gave NaN where the full-sample estimate is finite (structurally undefined cells, such as
    # the slope of a write with one reader, are NaN in every replicate and are not counted)
    nonfinite = {k: int(np.max(np.where(np.isfinite(point[k]), np.asarray(ci.n_nonfinite), 0), initial=0))
                 for k, ci in cis.items()}
    warnings_ = []
    if summ["n_seqs"] < MIN_BOOT_SEQS:
        warnings_.append(f"only {summ['n_seqs']} sequences feed the bootstrap (fewer than {MIN_BOOT_SEQS}): "
                         "its CIs are unreliable")
    bad = {k: v for k, v in nonfinite.items() if v}
    if bad:
        worst = max(bad, key=bad.get)
        warnings_.append(f"{len(bad)} bootstrapped statistics had replicates that gave NaN (at most "
                         f"{bad[worst]} of {summ['n_boot']}, in {worst}); they are left out of the CIs and counted")
    if out["zero_writes"]:
        warnings_.append(f"{len(out['zero_writes'])} write(s) are zero once token-centred and are skipped: "
                         + ", ".join(out["zero_writes"]))
    out["bootstrap"] = {"n_boot": summ["n_boot"], "n_seqs": summ["n_seqs"], "nonfinite_replicates": nonfinite,
                        "min_seqs": MIN_BOOT_SEQS}
    out["warnings"] = warnings_
    return out


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
@dataclass(repr=False)
class DeletionResults(ResultProtocol):
    """Streamed deletion sums of one model on one data set (positions >= 1, padding excluded).

    ``seq_gram[s]``: ``sum_t <w~_i, w~_j>`` over sequence ``s``'s tokens (token-centred projected
    writes, ``[C, C]``); ``seq_infl[s, r, c]`` / ``seq_fnorm[s, r]``: sums of ``||N(r_L) - N(r_L - w~_c)||``
    and ``||N(r_L)||``; ``mean_gram``: ``<mu_i, mu_j>`` of the write means. Every statistic is a function
    of these sums (:func:`summarize_deletion`).
    """

    kind = "deletion"

    model: str
    ln_free: bool
    normalization: str
    centers: bool
    n_layers: int
    d_model: int
    norm_eps: float
    layout: StreamLayout
    seq_gram: np.ndarray
    seq_n_tokens: np.ndarray
    seq_infl: np.ndarray
    seq_fnorm: np.ndarray
    mean_gram: np.ndarray
    max_write_sum_rel_error: float  # max over tokens/readers of ||sum of writes - stream|| / ||stream||
    data_source: str = ""
    ablation: Optional[dict] = None
    n_boot: int = DEFAULT_N_BOOT
    seed: int = 0
    norm_placement: str = "pre"  # "post": block readers see the raw stream (see reader_normalises)
    parallel_blocks: bool = False
    _doc: Optional[dict] = field(default=None, repr=False)

    @property
    def n_seqs(self) -> int:
        return int(self.seq_gram.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(np.sum(self.seq_n_tokens))

    def statistics(self) -> dict[str, Any]:
        """:func:`summarize_deletion` of the stored sums."""
        return summarize_deletion(self.seq_gram, self.seq_n_tokens, self.seq_infl, self.seq_fnorm, self.mean_gram,
                                  self.layout, n_boot=self.n_boot, seed=self.seed)

    @property
    def mean(self) -> dict[str, np.ndarray]:
        """Ratio-of-sums matrices ``{quantity: [n_readers, n_writes]}`` (NaN where undefined)."""
        doc = self.to_json()
        return {q: np.array(doc[q], dtype=float) for q in MATRICES}

    def to_json(self) -> dict:
        if self._doc is None:
            lay = self.layout
            out: dict[str, Any] = {
                "model": self.model, "ln_free": bool(self.ln_free), "normalization": self.normalization,
                "centers": bool(self.centers), "norm_placement": self.norm_placement,
                "parallel_blocks": bool(self.parallel_blocks),
                "n_layers": self.n_layers, "d_model": self.d_model,
                "norm_eps": self.norm_eps, "n_seqs": self.n_seqs, "n_tokens": self.n_tokens,
                "data_source": self.data_source, "max_write_sum_rel_error": self.max_write_sum_rel_error,
                "writes": list(lay.writes), "write_layer": list(lay.write_layer),
                "readers": list(lay.readers), "reader_layer": list(lay.reader_layer),
                "n_boot_requested": self.n_boot, "seed": self.seed,
                "estimator": "ratio of sums over tokens (positions >= 1) of token-centred projected writes",
                "shared_component": {"write_mean_norm": np.sqrt(np.clip(np.diag(self.mean_gram), 0, None))},
            }
            out.update(deletion_document(self.statistics()))
            if self.ln_free:
                out["verdict"]["note"] = ("LN-free model: nothing divides by the stream's size, so dilution does not "
                                          "reduce a write's influence here; the label describes geometry only")
            elif self.norm_placement == "post":
                out["verdict"]["note"] = ("output-only normalisation: the sublayers read the raw stream, so dilution "
                                          "reduces a write's influence only at the final norm; the label describes "
                                          "geometry at the block readers")
            out["ablation"] = self.ablation if self.ablation is not None else {
                "writes": [], "distance": [], "normalized_input_change": [], "final_kl": [], "run": False}
            self._doc = json_safe(out)
        return self._doc

    def arrays(self) -> dict[str, np.ndarray]:
        return {"seq_gram": self.seq_gram, "seq_n_tokens": np.asarray(self.seq_n_tokens), "seq_infl": self.seq_infl,
                "seq_fnorm": self.seq_fnorm, "mean_gram": self.mean_gram}

    @classmethod
    def from_saved(cls, doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> "DeletionResults":
        boot = doc.get("bootstrap") or {}
        return cls(model=doc["model"], ln_free=bool(doc["ln_free"]), normalization=doc["normalization"],
                   centers=bool(doc["centers"]), n_layers=int(doc["n_layers"]), d_model=int(doc["d_model"]),
                   norm_eps=float(doc["norm_eps"]), layout=stream_layout(int(doc["n_layers"])),
                   seq_gram=arrays["seq_gram"], seq_n_tokens=arrays["seq_n_tokens"], seq_infl=arrays["seq_infl"],
                   seq_fnorm=arrays["seq_fnorm"], mean_gram=arrays["mean_gram"],
                   max_write_sum_rel_error=float(doc.get("max_write_sum_rel_error") or 0.0),
                   data_source=doc.get("data_source", ""), norm_placement=str(doc.get("norm_placement", "pre")),
                   parallel_blocks=bool(doc.get("parallel_blocks", False)),
                   ablation=doc.get("ablation") if (doc.get("ablation") or {}).get("writes") else None,
                   n_boot=int(doc.get("n_boot_requested", boot.get("n_boot", DEFAULT_N_BOOT))),
                   seed=int(doc.get("seed", 0)))

    def frame_rows(self) -> Iterable[dict[str, Any]]:
        doc = self.to_json()
        lay = self.layout
        dist = distance_matrix(lay.write_layer, lay.reader_layer)
        for q in MATRICES:
            for r, reader in enumerate(lay.readers):
                for c, write in enumerate(lay.writes):
                    v = doc[q][r][c]
                    if v is not None:
                        yield {"model": self.model, "site": write, "layer": lay.reader_layer[r], "statistic": q,
                               "value": float(v), "reader": reader, "distance": float(dist[r, c])}
        by = doc["by_distance"]
        for key in ("retention_far", "dilution_decay_per_layer", "visibility_decay_per_layer",
                    "excess_dilution_decay_per_layer"):
            lo, hi = by.get(key + "_ci95") or [None, None]
            yield {"model": self.model, "site": "all writes", "layer": None, "statistic": key, "value": by[key],
                   "ci_lo": lo, "ci_hi": hi}

    def summary(self) -> str:
        doc = self.to_json()
        v = doc["verdict"]
        rf, ex = v["retention_far"], v["excess_dilution_decay_per_layer"]
        return (f"deletion of {self.model}: {v['label']} ({self.n_seqs} sequences, {self.n_tokens} tokens)\n"
                f"retention at distance >= 2: {_with_ci(rf['value'], rf['ci95'])}\n"
                f"excess-dilution decay per layer: {_with_ci(ex['value'], ex['ci95'], '.4f')}")


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _f(x: Any, spec: str = ".3f") -> str:
    return fmt_number(x, spec, missing="-")


def _with_ci(x: Any, ci: Any, spec: str = ".3f") -> str:
    ci = np.asarray([np.nan if v is None else v for v in (ci if ci is not None else [None, None])], dtype=float)
    if ci.size == 2 and np.all(np.isfinite(ci)):
        return f"{_f(x, spec)} [{_f(ci[0], spec)}, {_f(ci[1], spec)}]"
    return _f(x, spec)


def format_deletion_report(res: DeletionResults) -> str:
    """Plain-text report: verdict with its evidence, distance table, per-write decay, locality, ablation."""
    return format_deletion_json(res.to_json())


def format_deletion_json(doc: dict) -> str:
    """The report of :func:`format_deletion_report` from a :meth:`DeletionResults.to_json` document."""
    if "verdict" not in doc or "per_write" not in doc:
        raise NormgrowthError(f"the deletion result for {doc.get('model', '?')!r} was computed by an older normgrowth "
                              "(no verdict): delete the cached file and run `normgrowth deletion` again.")
    by, loc, v = doc["by_distance"], doc["locality"], doc["verdict"]
    kind = "LN-free" if doc.get("ln_free") else doc.get("normalization", "")
    centred = "centred" if doc.get("centers", True) else "uncentred"
    err = doc.get("max_write_sum_rel_error")
    boot = doc.get("bootstrap", {})
    lines = [f"deletion analysis: {doc['model']} ({kind}, P = {centred} writes), {doc.get('n_layers', '?')} layers, "
             f"{doc.get('n_seqs', '?')} sequences, {doc.get('n_tokens', '?')} tokens (position 0 and padding excluded)",
             "estimators: ratios of sums over tokens of token-centred writes; 95% CIs by bootstrap over sequences "
             f"({boot.get('n_boot', 0)} resamples)"]
    if err is not None:
        lines.append(f"check: the writes sum to every reader's stream within {err:.1e} (relative)")
    for w in doc.get("warnings", []):
        lines.append(f"warning: {w}")
    rf, ex = v["retention_far"], v["excess_dilution_decay_per_layer"]
    th = v["thresholds"]
    lines += ["", f"VERDICT: {v['label']} - {v['reason']}" + (f" ({v['note']})" if v.get("note") else ""),
              f"  retention at distance >= 2 (mean over {v.get('n_far_pairs', '?')} pairs of attn/MLP writes): "
              f"{_with_ci(rf['value'], rf['ci95'])}  (kept if the CI is >= {th['retention_kept_min']}, erased if < it)",
              f"  excess-dilution decay per layer, delta/delta0 (mean slope over {v.get('n_writes_in_summary', '?')} "
              f"writes): {_with_ci(ex['value'], ex['ci95'], '.4f')}  (outpaces the equal-norm null if the CI is > "
              f"{th['excess_decay_min']})"]
    lines += ["",
              "by distance d = layer(reader) - layer(write); mean over the (reader, attn/MLP write) pairs at that "
              "distance; * = fewer than 3 pairs (not pooled)",
              f"{'d':>3} {'pairs':>5}  {'retention rho':<24}{'dilution delta':<24}{'null delta0':<24}"
              f"{'excess delta/delta0':<24}{'influence I':<24}"]
    cols = ("retention", "dilution", "dilution_null", "excess_dilution", "influence")
    n_d = len(by["distance"])
    for i, d in enumerate(by["distance"]):
        cells = [_with_ci(by[q][i], (by.get(q + "_ci95") or [[None, None]] * n_d)[i]) for q in cols]
        star = "" if by["used"][i] else "*"
        lines.append(f"{int(d):>3} {str(by['n_pairs'][i]) + star:>5}  " + "".join(f"{c:<24}" for c in cells))
    lines += ["",
              "decay per layer of distance, fitted per write (log-linear over the write's readers), mean slope over "
              "attn/MLP writes (> 1 = falls):",
              f"  dilution          {_with_ci(by.get('dilution_decay_per_layer'), by.get('dilution_decay_per_layer_ci95'), '.4f')}",
              f"  visibility        {_with_ci(by.get('visibility_decay_per_layer'), by.get('visibility_decay_per_layer_ci95'), '.4f')}",
              f"  excess dilution   {_with_ci(by.get('excess_dilution_decay_per_layer'), by.get('excess_dilution_decay_per_layer_ci95'), '.4f')}",
              "", f"{'write':<12}{'readers':>8}  {'retention d>=2':<24}{'dilution decay':<24}{'excess decay':<24}"]
    for row in doc.get("per_write", []):
        if row["zero"]:
            lines.append(f"{row['write']:<12}{row['n_readers']:>8}  (zero once token-centred: skipped)")
            continue
        tag = "" if row["in_summary"] else "  (not in the mean)"
        lines.append(f"{row['write']:<12}{row['n_readers']:>8}  {_with_ci(row['retention_far'], row['retention_far_ci95']):<24}"
                     f"{_with_ci(row['dilution_decay_per_layer'], row['dilution_decay_per_layer_ci95'], '.4f'):<24}"
                     f"{_with_ci(row['excess_dilution_decay_per_layer'], row['excess_dilution_decay_per_layer_ci95'], '.4f'):<24}"
                     + tag)
    if doc.get("ln_free"):
        lines.append("note: this model is LN-free: nothing divides by the stream's size, so dilution does not reduce "
                     "a write's effect here (see docs/deletion.md)")
    parts = doc.get("stream_parts")
    if parts:
        g = parts["growth_per_layer"]
        lines += ["", "which part of the stream grows (RMS of P(r) at each reader = shared token mean + the rest): "
                  f"growth per layer total {_f(g['total'], '.4f')}, shared {_f(g['shared'], '.4f')}, "
                  f"centred {_f(g['centred'], '.4f')}",
                  f"{'reader':<14}{'total':>10}{'shared':>10}{'centred':>10}"]
        for i, name in enumerate(parts["readers"]):
            lines.append(f"{name:<14}{_f(parts['rms_total'][i], '.4g'):>10}{_f(parts['rms_shared'][i], '.4g'):>10}"
                         f"{_f(parts['rms_centred'][i], '.4g'):>10}")
    per = loc.get("share_within_per_reader", {})
    lines += ["", "locality: mean distance of what each reader reads: reading shares R, equal-norm null R0, direct "
              "influence I; share of R within k layers",
              f"{'reader':<14}{'R':>8}{'R0':>8}{'I':>8}" + "".join(f"{'<=' + k:>8}" for k in per)]
    readers = doc.get("readers", [str(i) for i in range(len(loc["mean_distance"]))])
    infl_md = loc.get("mean_distance_influence", [None] * len(readers))
    for r, name in enumerate(readers):
        lines.append(f"{name:<14}{_f(loc['mean_distance'][r], '.2f'):>8}{_f(loc['mean_distance_null'][r], '.2f'):>8}"
                     f"{_f(infl_md[r], '.2f'):>8}" + "".join(f"{_f(v[r]):>8}" for v in per.values()))
    null_within = loc.get("share_within_null", {})
    infl_within = loc.get("share_within_influence", {})
    lines.append("share within k layers (mean over readers with writes farther than k): "
                 + ", ".join(f"k={k}: R {_f(v)}, R0 {_f(null_within.get(k))}, I {_f(infl_within.get(k))}"
                             for k, v in loc["share_within"].items()))
    ab = doc.get("ablation")
    if ab and ab.get("writes"):
        lines += ["", "causal check: mean-ablate one write (all positions but 0); relative change of the normalised "
                  "input at the reader d layers later (total effect), and mean KL(clean || ablated) of the next-token "
                  "distribution",
                  f"{'write':<12}" + "".join(f"{'d=' + str(d):>9}" for d in ab["distance"]) + f"{'KL':>11}"]
        for i, w in enumerate(ab["writes"]):
            lines.append(f"{w:<12}" + "".join(f"{_f(x):>9}" for x in ab["normalized_input_change"][i])
                         + f"{_f(ab['final_kl'][i], '.4g'):>11}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# model plumbing
# ----------------------------------------------------------------------------------------------
def _batch_tensors(batch: Any, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask (right-aligned) of anything :func:`normgrowth.data.as_token_batch` accepts, or of an
    object with ``.tokens`` and ``.attention_mask``."""
    if not isinstance(batch, TokenBatch) and hasattr(batch, "tokens"):
        batch = as_token_batch(batch.tokens, model, attention_mask=getattr(batch, "attention_mask", None))
    tb = as_token_batch(batch, model)
    tokens, mask = tb.tokens, tb.attention_mask.bool()
    if tokens.shape[1] < 2 or not bool(mask[:, 1:].any()):
        raise NormgrowthError("the token batch has no real token after position 0: use sequences of at least 2 tokens.")
    return tokens, mask


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """Tokens in the statistics: real (mask True) and not at position 0."""
    valid = mask.clone()
    valid[:, 0] = False
    return valid


def _site_of(label: str) -> tuple[str, int]:
    site, layer = label.split(".")
    return site, int(layer)


class _WriteCollector:
    """Hooks that store the batch's projected writes ``P(w)`` ``[batch, pos, C, d]`` (float32).

    The buffer lives for one batch; it is complete when the final stream is read (``final_in``, the last
    hook of the forward pass). Reader hooks compare each block input and the final stream with the
    running sum of the raw writes (a self-check).
    """

    def __init__(self, model: Any, layout: StreamLayout):
        self.model, self.layout = model, layout
        self.center = bool(model.centers)
        self.writes: Optional[torch.Tensor] = None
        self.stream: Optional[torch.Tensor] = None
        self.done: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None
        self.max_rel_error = 0.0

    def start_batch(self, valid: torch.Tensor) -> None:
        self.valid = valid
        self.writes = self.stream = self.done = None

    def hooks(self) -> list[tuple[str, Optional[int], Callable]]:
        hooks: list[tuple[str, Optional[int], Callable]] = [("embed", None, self._write_hook(0))]
        if self.model.has_pos_embed:
            hooks.append(("pos_embed", None, self._write_hook(0)))
        for layer in range(self.layout.n_layers):
            hooks.append(("attn_out", layer, self._write_hook(1 + 2 * layer)))
            hooks.append(("mlp_out", layer, self._write_hook(2 + 2 * layer)))
            hooks.append(("resid_pre", layer, self._reader_hook(final=False)))
        hooks.append(("final_in", None, self._reader_hook(final=True)))
        return hooks

    def _write_hook(self, index: int) -> Callable:
        def hook(x: torch.Tensor) -> None:
            if self.writes is None:
                b, p, d = x.shape
                self.writes = torch.zeros(b, p, self.layout.n_writes, d, dtype=torch.float32, device=x.device)
                self.stream = torch.zeros(b, p, d, dtype=torch.float32, device=x.device)
            xf = x.float().to(self.writes.device)  # (models spread over several devices)
            self.writes[:, :, index] += project_writes(xf, self.center)
            self.stream += xf
        return hook

    def _reader_hook(self, final: bool) -> Callable:
        def hook(x: torch.Tensor) -> None:
            xf = x.float().to(self.stream.device)
            valid = self.valid.to(xf.device)
            err = (self.stream - xf).norm(dim=-1) / xf.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
            if valid.any():
                self.max_rel_error = max(self.max_rel_error, float(err[valid].max()))
            if final:
                self.done, self.writes, self.stream = self.writes, None, None
        return hook


def reader_normalises(model: Any) -> list[bool]:
    """Per reader (``resid_pre.0`` .. ``resid_pre.{n-1}``, then ``final``): whether what reads it divides by the
    stream's size. Block readers do when the sublayers have input norms (pre / peri placement); with
    output-only placement (OLMo 2) the sublayers read the raw stream. The final stream always passes the
    final norm."""
    return [bool(model.input_norm)] * int(model.n_layers) + [True]


def token_sums(writes: torch.Tensor, write_mean: torch.Tensor, reader_index: Sequence[int], eps: float,
               normalises: Optional[Sequence[bool]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token terms of the deletion sums, in float64, for projected writes ``[n, C, d]``.

    With ``w~ = P(w) - mu`` and ``a_L = sum_{c<k} P(w_c)`` the projected stream of reader ``L``:
    returns ``<w~_i, w~_j>`` ``[n, C, C]``, ``||N(a_L) - N(a_L - w~_c)||`` ``[n, R, C]`` (0 where ``c`` is not
    before ``L``) and ``||N(a_L)||`` ``[n, R]`` (:func:`normalized_change`). A reader whose ``normalises``
    entry is False reads the raw stream, ``N(x) = x``: the terms are ``||w~_c||`` and ``||a_L||``.
    """
    x = writes.double()
    xt = x - write_mean.to(x.device, torch.float64)
    gram = xt @ xt.transpose(-1, -2)
    k = torch.as_tensor(list(reader_index), dtype=torch.long, device=x.device)
    a = x.cumsum(1)[:, k - 1]  # [n, R, d]
    a_sq = (a * a).sum(-1)  # [n, R]
    a_dot = a @ xt.transpose(-1, -2)  # [n, R, C]
    w_sq = gram.diagonal(dim1=-2, dim2=-1)  # [n, C]
    change, size = normalized_change(a_sq[..., None], a_dot, w_sq[:, None, :], x.shape[-1], eps)
    if normalises is not None and not all(normalises):
        raw = ~torch.as_tensor(list(normalises), dtype=torch.bool, device=x.device)  # [R]
        change = torch.where(raw[None, :, None], w_sq.sqrt()[:, None, :], change)
        size = torch.where(raw[None, :, None], a_sq.sqrt()[..., None], size)
    before = torch.arange(x.shape[1], device=x.device)[None, :] < k[:, None]
    return gram, torch.where(before, change, 0.0), size[..., 0]


def deletion_bytes_per_token(model: Any) -> int:
    """Bytes per token the deletion collector keeps beyond a norm-collection pass: the float32 writes
    ``[C, d_model]`` and their running sum, their float64 copies (raw and centred), the readers' float64
    streams ``[R, d_model]`` and the float64 ``[C, C]`` / ``[R, C]`` terms (C = 2 n_layers + 1). For
    ``--batch-size auto``."""
    lay = stream_layout(model.n_layers)
    n_c, n_r, d = lay.n_writes, len(lay.readers), model.d_model
    return 4 * (n_c + 1) * d + 16 * n_c * d + 8 * n_r * d + 8 * (2 * n_c * n_c + 4 * n_r * n_c)


def collect_deletion(model: Any, batch: Any, batch_size: int = 8, ablate: Any = None,
                     progress: Optional[Callable[[int, int], None]] = None, n_boot: int = DEFAULT_N_BOOT,
                     seed: int = 0, checkpoint: Any = None) -> DeletionResults:
    """Stream the deletion sums of ``model`` over ``batch`` (two passes: write means, then sums).

    Position 0 and padding are excluded; per-token terms in float64 (:func:`token_sums`), sums in
    float64. ``ablate``: None (no causal check), "default", or write labels / layer numbers for
    :func:`ablation_check`. ``progress(n_done, n_total)`` is called after each batch of the second pass.
    ``checkpoint`` (a :class:`normgrowth.checkpoint.Checkpoint`): the write means once the first pass
    is done and the per-sequence sums every ``checkpoint.every`` batches of the second are saved, and a
    saved state of the same run is resumed; removed at the end.
    """
    tokens, mask = _batch_tensors(batch, model)
    layout = stream_layout(model.n_layers)
    n_seqs = tokens.shape[0]
    n_r, n_c, d = len(layout.readers), layout.n_writes, model.d_model
    ablation_writes = resolve_ablation_writes(model, ablate) if ablate is not None else None
    eps = float(model.norm_eps)
    resume = _DeletionCheckpoint(checkpoint, batch_size, n_seqs, (n_c, d))
    raw_mean = resume.raw_mean
    if raw_mean is None:
        with torch.inference_mode():
            means = _write_means(model, tokens, mask, layout.writes, batch_size)
        raw_mean = torch.stack([means[w] for w in layout.writes])  # [C, d] float64
        resume.save(raw_mean, 0, {})
    write_mean = raw_mean - raw_mean.mean(-1, keepdim=True) if model.centers else raw_mean
    mean_gram = (write_mean @ write_mean.T).numpy()
    seq_gram = np.zeros((n_seqs, n_c, n_c))
    seq_infl = np.zeros((n_seqs, n_r, n_c))
    seq_fnorm = np.zeros((n_seqs, n_r))
    seq_n_tokens = _valid(mask).sum(1).numpy().astype(np.int64)
    collector = _WriteCollector(model, layout)
    done = resume.restore(seq_gram, seq_infl, seq_fnorm, collector)
    normalises = reader_normalises(model)
    chunk = max(1, _CHUNK_BYTES // (8 * (3 * n_c * d + n_r * d + 2 * n_c * n_c + 4 * n_r * n_c)))
    n_batches = 0
    with torch.inference_mode(), model.hooks(collector.hooks()):
        for start, tok, m in iter_batches(tokens[done:], mask[done:], batch_size):
            start += done
            valid = _valid(m)
            collector.start_batch(valid)
            model.forward(tok, attention_mask=m, logits=False)  # the stream only
            if collector.done is None:
                raise RuntimeError("the final_in hook did not fire: the writes were not all seen")
            writes = collector.done
            collector.done = None
            dev = writes.device
            acc_dev = dev if dev.type in ("cpu", "cuda") else torch.device("cpu")
            valid_d = valid.to(dev)
            seq_id = torch.arange(tok.shape[0], device=dev)[:, None].expand_as(valid_d)[valid_d].to(acc_dev)
            w_valid = writes[valid_d]  # [n_valid, C, d]
            del writes
            g_sum = torch.zeros(tok.shape[0], n_c, n_c, dtype=torch.float64, device=acc_dev)
            i_sum = torch.zeros(tok.shape[0], n_r, n_c, dtype=torch.float64, device=acc_dev)
            f_sum = torch.zeros(tok.shape[0], n_r, dtype=torch.float64, device=acc_dev)
            for lo in range(0, w_valid.shape[0], chunk):
                gram, change, size = token_sums(w_valid[lo:lo + chunk], write_mean, layout.reader_index, eps,
                                                normalises)
                ids = seq_id[lo:lo + chunk]
                g_sum.index_add_(0, ids, gram.to(acc_dev))
                i_sum.index_add_(0, ids, change.to(acc_dev))
                f_sum.index_add_(0, ids, size.to(acc_dev))
            stop = start + tok.shape[0]
            seq_gram[start:stop] = g_sum.cpu().numpy()
            seq_infl[start:stop] = i_sum.cpu().numpy()
            seq_fnorm[start:stop] = f_sum.cpu().numpy()
            n_batches += 1
            if resume.due(n_batches) and stop < n_seqs:
                resume.save(raw_mean, stop, {"seq_gram": seq_gram[:stop], "seq_infl": seq_infl[:stop],
                                             "seq_fnorm": seq_fnorm[:stop],
                                             "max_rel_error": np.float64(collector.max_rel_error)})
            if progress is not None:
                progress(stop, n_seqs)
    res = DeletionResults(
        model=str(model.spec), ln_free=bool(model.ln_free), normalization=str(model.normalization),
        centers=bool(model.centers), n_layers=int(model.n_layers), d_model=int(d), norm_eps=eps, layout=layout,
        norm_placement=str(model.norm_placement), parallel_blocks=bool(model.parallel_blocks),
        seq_gram=seq_gram, seq_n_tokens=seq_n_tokens, seq_infl=seq_infl, seq_fnorm=seq_fnorm, mean_gram=mean_gram,
        max_write_sum_rel_error=collector.max_rel_error, data_source=str(getattr(batch, "source", "")),
        n_boot=n_boot, seed=seed)
    if ablation_writes:
        res.ablation = ablation_check(model, batch, writes=ablation_writes, batch_size=batch_size)
    resume.remove()
    return res


class _DeletionCheckpoint:
    """Saving and resuming :func:`collect_deletion`'s state (:mod:`normgrowth.checkpoint`): the raw write
    means ``[C, d]`` after the first pass, then the per-sequence sums of the sequences done."""

    def __init__(self, checkpoint: Any, batch_size: int, n_seqs: int, mean_shape: tuple[int, int]):
        self.checkpoint, self.raw_mean, self.state, self.done = checkpoint, None, {}, 0
        self.every = None if checkpoint is None else checkpoint.every
        if checkpoint is None:
            return
        import time

        from . import resume as ckpt
        from .distributed import world

        self._ckpt, self._started = ckpt, time.perf_counter()
        self.path = checkpoint.path(*world())
        self.ident = ckpt.identity(checkpoint.key, kind="deletion", batch_size=batch_size, n_sequences=n_seqs)
        done, state, why = ckpt.load(self.path, self.ident)
        if state is not None and tuple(state.get("raw_mean", np.zeros(0)).shape) != mean_shape:
            state, why = None, "with other shapes"
        if state is not None:
            self.raw_mean, self.state, self.done = torch.from_numpy(state.pop("raw_mean")), state, done
            checkpoint.say(f"resuming at sequence {done} of {n_seqs}" if done else
                           "resuming after the first pass (write means)")
        elif why:
            checkpoint.say(f"ignoring checkpoint {self.path} {why}; starting afresh")

    def restore(self, seq_gram: np.ndarray, seq_infl: np.ndarray, seq_fnorm: np.ndarray, collector: Any) -> int:
        """Put the saved per-sequence sums back; the number of sequences done (the second pass starts)."""
        if self.checkpoint is not None:
            import time

            self._started = time.perf_counter()
        if self.done:
            seq_gram[:self.done] = self.state["seq_gram"]
            seq_infl[:self.done] = self.state["seq_infl"]
            seq_fnorm[:self.done] = self.state["seq_fnorm"]
            collector.max_rel_error = float(self.state["max_rel_error"])
        return self.done

    def due(self, n_batches: int) -> bool:
        """A checkpoint after this batch: every ``every`` batches (None: sized to about
        ``DEFAULT_EVERY_SECONDS`` of work after the first batch)."""
        if self.checkpoint is None:
            return False
        if self.every is None:
            import time

            per_batch = (time.perf_counter() - self._started) / n_batches
            self.every = max(1, int(self._ckpt.DEFAULT_EVERY_SECONDS / max(per_batch, 1e-9)))
        return n_batches % self.every == 0

    def save(self, raw_mean: torch.Tensor, done: int, arrays: dict[str, np.ndarray]) -> None:
        if self.checkpoint is not None:
            self._ckpt.save(self.path, self.ident, done, {"raw_mean": raw_mean.numpy(), **arrays})

    def remove(self) -> None:
        if self.checkpoint is not None:
            self._ckpt.remove(self.path)


# ----------------------------------------------------------------------------------------------
# causal check: mean ablation
# ----------------------------------------------------------------------------------------------
def default_ablation_writes(n_layers: int, n_spread: int = DEFAULT_ABLATION_LAYERS) -> list[str]:
    """attn_out and mlp_out of about ``n_spread`` blocks spread evenly from the first to the last."""
    layers = sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(n_spread, n_layers))})
    return [f"{site}.{layer}" for layer in layers for site in ("attn_out", "mlp_out")]


def parse_ablate(text: str, model: Any) -> list[str]:
    """Writes to ablate from a comma-separated list, in forward order, without duplicates.

    Items: a block number ``l`` (0-based; both ``attn_out.l`` and ``mlp_out.l``), a write label
    (``embed``, ``attn_out.l``, ``mlp_out.l``), ``default`` (attn and MLP writes of ~6 evenly spread
    blocks) or ``all`` (every write).
    """
    layout = stream_layout(model.n_layers)
    n = model.n_layers
    items = [t.strip() for t in str(text).split(",")]
    if not str(text).strip() or any(not t for t in items):
        raise NormgrowthError(f"--ablate {text!r} is empty or has an empty item: give block numbers like 0,3,6 "
                              "or write labels like embed,mlp_out.3.")
    chosen: set[str] = set()
    for item in items:
        low = item.lower()
        if low == "default":
            chosen.update(default_ablation_writes(n))
        elif low == "all":
            chosen.update(layout.writes)
        elif low.lstrip("+").isdigit():
            layer = int(low)
            if not 0 <= layer < n:
                raise NormgrowthError(f"--ablate block {layer} is out of range: this model has blocks 0..{n - 1}.")
            chosen.update({f"attn_out.{layer}", f"mlp_out.{layer}"})
        elif low in layout.writes:
            chosen.add(low)
        else:
            raise NormgrowthError(f"--ablate item {item!r} is not understood: use block numbers 0..{n - 1}, write "
                                  "labels (embed, attn_out.L, mlp_out.L), 'default' or 'all'.")
    return [w for w in layout.writes if w in chosen]


def resolve_ablation_writes(model: Any, writes: Any) -> list[str]:
    """Normalise ``writes`` (None/"default", a string for :func:`parse_ablate`, or labels / block numbers)."""
    if writes is None or writes is True:
        return default_ablation_writes(model.n_layers)
    if isinstance(writes, str):
        return parse_ablate(writes, model)
    return parse_ablate(",".join(str(w) for w in writes), model)


def normalize_input(x: torch.Tensor, centers: bool, eps: float) -> torch.Tensor:
    """``N(x)``: the model's normalisation without gain, float32.

    Centring models (LN, LN-free): ``(x - mean) / sqrt(var + eps)``; RMSNorm: ``x / sqrt(mean(x^2) + eps)``.
    """
    x = x.float()
    if centers:
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _replace_after_bos(value: torch.Tensor) -> Callable:
    def hook(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, 1:] = value.to(device=x.device, dtype=x.dtype)
        return out
    return hook


def _ablation_hooks(model: Any, label: str, mean_vec: torch.Tensor) -> list[tuple[str, Optional[int], Callable]]:
    if label == "embed":
        hooks = [("embed", None, _replace_after_bos(mean_vec))]
        if model.has_pos_embed:  # the combined write becomes the mean of (token + position) embeddings
            hooks.append(("pos_embed", None, _replace_after_bos(torch.zeros_like(mean_vec))))
        return hooks
    site, layer = _site_of(label)
    return [(site, layer, _replace_after_bos(mean_vec))]


def _write_means(model: Any, tokens: torch.Tensor, mask: torch.Tensor, labels: Sequence[str],
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Mean vector of each write over real tokens at positions >= 1 (float64)."""
    sums = {lab: torch.zeros(model.d_model, dtype=torch.float64) for lab in labels}
    state: dict[str, torch.Tensor] = {}

    def adder(label: str) -> Callable:
        def hook(x: torch.Tensor) -> None:
            v = state["valid"].to(x.device)
            sums[label] += x.float()[v].double().sum(0).cpu()
        return hook

    hooks = []
    for lab in labels:
        if lab == "embed":
            hooks.append(("embed", None, adder(lab)))
            if model.has_pos_embed:
                hooks.append(("pos_embed", None, adder(lab)))
        else:
            site, layer = _site_of(lab)
            hooks.append((site, layer, adder(lab)))
    n = 0
    with model.hooks(hooks):
        for _, tok, m in iter_batches(tokens, mask, batch_size):
            state["valid"] = _valid(m)
            n += int(state["valid"].sum())
            model.forward(tok, attention_mask=m, logits=False)
    return {lab: s / max(n, 1) for lab, s in sums.items()}


def ablation_check(model: Any, batch: Any, writes: Any = None, batch_size: int = 8,
                   progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Mean-ablate one write at a time and measure the change downstream.

    The write is replaced at every position except 0 by its mean over real tokens at positions >= 1
    (first pass). At every reader: mean over tokens (position 0 and padding excluded) of
    ``||N(r_ablated) - N(r_clean)|| / ||N(r_clean)||`` (:func:`normalize_input`); at the output:
    mean ``KL(p_clean || p_ablated)`` of the next-token distribution. Returns ``writes``,
    ``distance`` (1 .. n_layers+1), ``normalized_input_change [write][distance]`` (None where no reader
    lies that far), ``final_kl [write]``, plus ``readers`` and ``reader_change [write][reader]``.
    """
    tokens, mask = _batch_tensors(batch, model)
    layout = stream_layout(model.n_layers)
    labels = resolve_ablation_writes(model, writes)
    n_r = len(layout.readers)
    reader_sites = [("resid_pre", layer) for layer in range(model.n_layers)] + [("final_in", None)]
    eps = float(model.norm_eps)
    change_sum = np.zeros((len(labels), n_r))
    kl_sum = np.zeros(len(labels))
    n_valid = 0
    with torch.inference_mode():
        means = _write_means(model, tokens, mask, labels, batch_size)
        state: dict[str, Any] = {}

        normalises = reader_normalises(model)

        def reader_hook(r: int) -> Callable:
            def hook(x: torch.Tensor) -> None:
                normed = normalize_input(x, model.centers, eps) if normalises[r] else x.float()
                if state["mode"] == "clean":
                    state["clean"][r] = normed
                else:
                    ref = state["clean"][r]
                    rel = (normed - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
                    state["change"][r] = float(rel[state["valid"].to(rel.device)].double().sum())
            return hook

        readers = [(site, layer, reader_hook(r)) for r, (site, layer) in enumerate(reader_sites)]
        done = 0
        for _, tok, m in iter_batches(tokens, mask, batch_size):
            valid = _valid(m)
            state.update(mode="clean", clean={}, valid=valid)
            with model.hooks(readers):
                clean_logp = torch.log_softmax(model.forward(tok, attention_mask=m).float(), -1)
            n_valid += int(valid.sum())
            for i, lab in enumerate(labels):
                state.update(mode="ablated", change={})
                with model.hooks(readers + _ablation_hooks(model, lab, means[lab])):
                    logp = torch.log_softmax(model.forward(tok, attention_mask=m).float(), -1)
                for r, v in state["change"].items():
                    change_sum[i, r] += v
                kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
                kl_sum[i] += float(kl[valid.to(kl.device)].double().sum())
            done += tok.shape[0]
            if progress is not None:
                progress(done, tokens.shape[0])
    reader_change = change_sum / max(n_valid, 1)
    max_d = model.n_layers + 1
    distances = list(range(1, max_d + 1))
    by_d = []
    for lab, row in zip(labels, reader_change):
        wl = layout.write_layer[layout.writes.index(lab)]
        cells = []
        for d in distances:
            rl = wl + d
            cells.append(float(row[layout.reader_layer.index(rl)]) if rl in layout.reader_layer else None)
        by_d.append(cells)
    return {
        "writes": labels, "distance": distances, "normalized_input_change": by_d,
        "final_kl": [float(x) / max(n_valid, 1) for x in kl_sum],
        "readers": list(layout.readers), "reader_change": reader_change.tolist(), "n_tokens": n_valid,
        "ablated_positions": "all positions except 0", "run": True,
    }
