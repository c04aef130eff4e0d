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

This module holds the pure estimators on tensors and arrays; :mod:`.results` the result and its text,
:mod:`.collection` the hooks, :mod:`.ablation` the causal check. Formulas: ``docs/deletion.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..numerics import DEFAULT_N_BOOT, loglinear_slope, percentile_ci, polyfit_rows, resample_counts
from .reads import (FAR_DISTANCE, NO_INNOVATION_TOL, READ_ZERO_TOL, front_share, innovation_factor,
                    innovation_retention, locality_statistics, pooled_retention, read_distance, reader_groups)

QUANTITIES = ("retention", "dilution", "visibility", "reading", "reading_null", "dilution_null",
              "visibility_null", "excess_dilution")
MATRICES = QUANTITIES + ("influence",)
SHARE_WITHIN = (1, 2, 4, 8)  # layers for the locality shares
MIN_PAIRS = 3  # a distance enters pooled statistics only with at least this many (reader, write) pairs
ZERO_WRITE_TOL = 1e-5  # a write whose centred RMS is below this fraction of its raw RMS counts as zero
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


def deletion_quantities(gram: Any, reader_index: Sequence[int], stream_gram: Any = None) -> dict[str, torch.Tensor]:
    """Retention, dilution, visibility, reading share and their equal-norm nulls from a Gram matrix.

    gram: ``[..., C, C]`` (a per-token Gram matrix, or ``Gamma`` summed over tokens for the
    ratio-of-sums estimators), writes in forward order. reader_index: for every reader, the number
    of writes before it (``1 <= k <= C``). Returns ``[..., n_readers, C]`` tensors (keys
    :data:`QUANTITIES`; float64 for float64 input, else float32), NaN where ``c >= k``. With
    ``S_k = sum_{i,j<k} G_ij``: ``rho = sum_{c<=j<k} G_cj / G_cc``, ``delta = sqrt(G_cc / S_k)``,
    ``nu = rho delta``, ``R = sum_{j<k} G_cj / S_k``; ``R0, delta0, nu0`` are the same of
    ``G_ij / sqrt(G_ii G_jj)``; ``excess_dilution = delta / delta0``. A write with ``G_cc = 0`` has
    NaN retention, visibility and excess dilution, dilution 0 and null share 0. ``stream_gram`` (default
    ``gram``): the Gram matrix whose sums ``S_k`` are the dilution's denominator (the token-centred Gram plus
    ``n_tokens <mu_i, mu_j>``, so that it holds the shared mean direction the norm divides by too).
    """
    G = torch.as_tensor(gram)
    G = G if G.dtype == torch.float64 else G.float()
    S = G if stream_gram is None else torch.as_tensor(stream_gram).to(G.dtype)
    n_writes = G.shape[-1]
    k = torch.as_tensor(list(reader_index), dtype=torch.long, device=G.device)
    if k.numel() == 0 or int(k.min()) < 1 or int(k.max()) > n_writes:
        raise ValueError(f"reader_index must lie in [1, {n_writes}], got {list(reader_index)}")
    before = torch.arange(n_writes, device=G.device)[None, :] < k[:, None]  # [R, C]
    nan = torch.tensor(float("nan"), dtype=G.dtype, device=G.device)

    def core(gram_: torch.Tensor, stream_: torch.Tensor) -> dict[str, torch.Tensor]:
        to_reader = gram_.cumsum(-1)[..., :, k - 1].transpose(-1, -2)  # [..., R, C]: sum_{j<k} G_cj
        own_sq = torch.where(before, to_reader, 0.0).sum(-1)  # [..., R]: sum_{i,j<k} G_ij
        stream_sq = torch.where(before, stream_.cumsum(-1)[..., :, k - 1].transpose(-1, -2), 0.0).sum(-1)
        from_write = torch.triu(gram_).cumsum(-1)[..., :, k - 1].transpose(-1, -2)  # sum_{c<=j<k} G_cj
        diag = gram_.diagonal(dim1=-2, dim2=-1)
        has_norm = (diag > 0)[..., None, :]
        write_norm = diag.clamp_min(0).sqrt()[..., None, :]
        stream_norm = stream_sq.clamp_min(0).sqrt()[..., :, None]
        return {"retention": torch.where(has_norm, from_write / diag[..., None, :], nan),
                "dilution": write_norm / stream_norm,
                "visibility": torch.where(has_norm, from_write / (write_norm * stream_norm), nan),
                "reading": to_reader / own_sq[..., :, None]}

    q = core(G, S)
    diag = G.diagonal(dim1=-2, dim2=-1)
    inv_norm = torch.where(diag > 0, diag.clamp_min(torch.finfo(G.dtype).tiny).rsqrt(), 0.0)
    scale = inv_norm[..., :, None] * inv_norm[..., None, :]
    null = core(G * scale, S * scale)
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
                des: _Design, summary_writes: Optional[np.ndarray], mean_gram: Optional[np.ndarray] = None
                ) -> dict[str, np.ndarray]:
    """Every estimate for a stack of summed Gram matrices ``gamma [B, C, C]`` (one per replicate)."""
    lay = des.layout
    g = gamma.copy()
    g[:, des.zero, :] = 0.0
    g[:, :, des.zero] = 0.0
    stream = None
    if mean_gram is not None:
        m = np.asarray(mean_gram, dtype=np.float64).copy()
        m[des.zero, :] = 0.0
        m[:, des.zero] = 0.0
        stream = torch.from_numpy(g + n_tokens[:, None, None] * m[None])
    q = {k: v.numpy() for k, v in deletion_quantities(torch.from_numpy(g), lay.reader_index, stream).items()}
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


@dataclass(frozen=True)
class _ReadDesign:
    """Which pairs and writes enter the read and innovation statistics (fixed from the full sample)."""

    readers: tuple[str, ...]  # reader sublayers (attn.l, mlp.l, unembed)
    reader_k: tuple[int, ...]
    distance: np.ndarray  # [Rs, C] (k - c) / 2, NaN where c >= k
    fit_pairs: np.ndarray  # [Rs, C] block reader sublayers (not the unembedding) with I, I0 > 0
    fit_writes: np.ndarray  # [C] writes with >= 2 fit pairs and finite slopes
    curve_d: np.ndarray  # distances of the by-distance curves
    far_pairs: np.ndarray  # [R, C] stream readers >= FAR_DISTANCE layers after a non-zero write
    retention_writes: np.ndarray  # [C] non-zero writes with innovation and far readers
    no_innovation: np.ndarray  # [C] non-zero writes without innovation (counted, skipped)
    front: np.ndarray  # [C] the embedding and block 0's writes


def _read_design(gamma: np.ndarray, mean_gram: np.ndarray, n_tokens: float, read: Optional[np.ndarray],
                 read0: Optional[np.ndarray], readers: Sequence[str], reader_k: Sequence[int], des: _Design
                 ) -> _ReadDesign:
    lay = des.layout
    n_c = lay.n_writes
    raw = np.diag(gamma) + n_tokens * np.diag(mean_gram)
    if read is None:
        dist = np.zeros((0, n_c))
        fit_pairs = np.zeros((0, n_c), dtype=bool)
        fit_writes = np.zeros(n_c, dtype=bool)
        curve_d = np.zeros(0)
    else:
        dist = read_distance(reader_k, n_c)
        block = np.array([r != "unembed" for r in readers])[:, None]
        top = np.nanmax(np.where(np.isfinite(dist), read, np.nan), 0, initial=0.0)  # [C]: the write's largest read
        seen = (read > READ_ZERO_TOL * top[None, :]) & (read0 > 0)
        fit_pairs = np.isfinite(dist) & block & (raw > 0)[None, :] & seen
        probe = locality_statistics(read[None], read0[None], raw[None], dist, fit_pairs,
                                    fit_pairs.sum(0) >= 2, np.zeros(0), reader_groups(readers))
        fit_writes = (fit_pairs.sum(0) >= 2) & np.isfinite(probe["write_locality_slope"][0]) \
            & np.isfinite(probe["write_magnitude_slope"][0])
        curve_d = np.unique(dist[fit_pairs & fit_writes[None, :]])
    _, innov = innovation_factor(gamma, des.zero)
    has = innov >= NO_INNOVATION_TOL * np.diag(gamma)
    stream_dist = des.distance
    far = np.isfinite(stream_dist) & (np.nan_to_num(stream_dist, nan=0.0) >= FAR_DISTANCE) & ~des.zero[None, :]
    front = np.array([w == "embed" or w.endswith(".0") for w in lay.writes])
    return _ReadDesign(tuple(readers), tuple(reader_k), dist, fit_pairs, fit_writes, curve_d, far,
                       ~des.zero & has & far.any(0), ~des.zero & ~has, front)


def _read_statistics(gamma: np.ndarray, n_tokens: np.ndarray, mean_gram: np.ndarray, read: Optional[np.ndarray],
                     read0: Optional[np.ndarray], rdes: _ReadDesign, des: _Design) -> dict[str, np.ndarray]:
    """Reads, locality, magnitude share, innovation retention and the front share for ``[B, ...]`` stacks."""
    lay = des.layout
    out: dict[str, np.ndarray] = {}
    raw = np.diagonal(gamma, axis1=-2, axis2=-1) + n_tokens[:, None] * np.diag(mean_gram)[None, :]
    if read is not None:
        loc = locality_statistics(read, read0, raw, rdes.distance, rdes.fit_pairs, rdes.fit_writes, rdes.curve_d,
                                  reader_groups(rdes.readers))
        out.update({f"read.{k}": v for k, v in loc.items()})
        out["matrix.read"] = np.where(np.isfinite(rdes.distance), read, np.nan)
        out["matrix.read_no_growth"] = np.where(np.isfinite(rdes.distance), read0, np.nan)
    lower, innov = innovation_factor(gamma, des.zero | rdes.no_innovation)
    rho = innovation_retention(lower, lay.reader_index)
    out["matrix.innovation_retention"] = np.where(rdes.retention_writes[None, :], rho, np.nan)
    pooled = pooled_retention(rho, rdes.far_pairs, innov, np.diagonal(gamma, axis1=-2, axis2=-1),
                              rdes.retention_writes)
    out.update({f"retention.{k}": v for k, v in pooled.items()})
    with np.errstate(invalid="ignore", divide="ignore"):
        out["innovation_share"] = np.where(rdes.retention_writes, innov, np.nan) / np.diagonal(gamma, axis1=-2,
                                                                                                axis2=-1)
    raw_gram = gamma + n_tokens[:, None, None] * mean_gram[None]
    out["front_share"] = front_share(raw_gram, rdes.front, lay.reader_index[-1])
    return out


def summarize_deletion(seq_gram: np.ndarray, seq_n_tokens: np.ndarray, seq_infl: np.ndarray, seq_fnorm: np.ndarray,
                       mean_gram: np.ndarray, layout: StreamLayout, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                       seq_read: Optional[np.ndarray] = None, seq_read0: Optional[np.ndarray] = None,
                       readers: Sequence[str] = (), reader_k: Sequence[int] = ()) -> dict[str, Any]:
    """All summaries of a deletion run from its per-sequence sums.

    seq_gram ``[S, C, C]``: per sequence, ``sum_t <w~_i, w~_j>`` over its tokens; seq_n_tokens ``[S]``;
    seq_infl ``[S, R, C]`` / seq_fnorm ``[S, R]``: sums of ``||N(r) - N(r - w~_c)||`` and ``||N(r)||``;
    mean_gram ``[C, C]``: ``<mu_i, mu_j>`` of the write means; seq_read / seq_read0 ``[S, Rs, C]``: the reads
    ``I`` and ``I0`` of the reader sublayers ``readers`` (``reader_k`` writes before each;
    :mod:`normgrowth.deletion.reads`). CIs: percentile bootstrap over sequences
    (:func:`normgrowth.numerics.resample_counts`); a replicate's estimate is the same function of the
    resampled sums; replicates that give NaN are counted (``nonfinite``), never dropped silently.
    """
    seq_gram = np.asarray(seq_gram, dtype=np.float64)
    n_tok = np.asarray(seq_n_tokens, dtype=np.float64)
    infl = np.asarray(seq_infl, dtype=np.float64)
    fnorm = np.asarray(seq_fnorm, dtype=np.float64)
    mean_gram = np.asarray(mean_gram, dtype=np.float64)
    has_read = seq_read is not None and len(readers) > 0
    rd = np.asarray(seq_read, dtype=np.float64) if has_read else None
    rd0 = np.asarray(seq_read0, dtype=np.float64) if has_read else None
    gamma = seq_gram.sum(0)
    N = float(n_tok.sum())
    raw_energy = np.diag(gamma) + N * np.diag(mean_gram)
    zero = zero_write_mask(np.diag(gamma), raw_energy)
    des = _design(layout, zero)
    rdes = _read_design(gamma, mean_gram, N, None if rd is None else rd.sum(0), None if rd0 is None else rd0.sum(0),
                        readers, reader_k, des)

    def stats(g: np.ndarray, i_num: np.ndarray, i_den: np.ndarray, n: np.ndarray, r: Optional[np.ndarray],
              r0: Optional[np.ndarray], sel_: Optional[np.ndarray]) -> dict[str, np.ndarray]:
        out = _statistics(g, i_num, i_den, n, des, sel_, mean_gram)
        out.update(_read_statistics(g, n, mean_gram, r, r0, rdes, des))
        return out

    probe = _statistics(gamma[None], infl.sum(0)[None], fnorm.sum(0)[None], np.array([N]), des, None, mean_gram)
    sel = _summary_writes({k: probe[f"write_slope.{k}"][0] for k in ("dilution", "visibility", "excess_dilution")},
                          des)
    point = {k: v[0] for k, v in stats(gamma[None], infl.sum(0)[None], fnorm.sum(0)[None], np.array([N]),
                                       None if rd is None else rd.sum(0)[None],
                                       None if rd0 is None else rd0.sum(0)[None], sel).items()}
    n_seqs = int(seq_gram.shape[0])
    boot: dict[str, list] = {}
    if n_boot > 0 and n_seqs >= 2:
        for chunk in resample_counts(n_seqs, n_boot, seed):
            for lo in range(0, chunk.shape[0], _BOOT_BLOCK):  # bounded memory: [block, R, C] per matrix
                counts = chunk[lo:lo + _BOOT_BLOCK]
                st = stats(np.einsum("bs,sij->bij", counts, seq_gram), np.einsum("bs,src->brc", counts, infl),
                           counts @ fnorm, counts @ n_tok,
                           None if rd is None else np.einsum("bs,src->brc", counts, rd),
                           None if rd0 is None else np.einsum("bs,src->brc", counts, rd0), sel)
                for k, v in st.items():
                    if not k.startswith("matrix."):
                        boot.setdefault(k, []).append(v)
    cis = {k: percentile_ci(np.concatenate(v, 0)) for k, v in boot.items()}
    return {"point": point, "ci": cis, "design": des, "read_design": rdes, "summary_writes": sel, "n_seqs": n_seqs,
            "n_boot": n_boot if cis else 0, "parts": stream_parts(gamma, mean_gram, int(N), layout.reader_index),
            "n_tokens": int(N), "raw_energy": raw_energy}


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
