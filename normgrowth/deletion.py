"""Deletion by magnitude versus deletion by erasure: how later writes hide earlier ones.

The residual stream read by a reader ``L`` (the input of a block, or the final stream) is the sum of
the writes before it, ``r_L = sum_{c<L} w_c``. Writes ``c`` in forward order: the embedding (token plus
learned position, one write labelled ``embed``), then ``attn_out.l`` and ``mlp_out.l`` of every block.
``P(x)`` is what the model's normalisation looks at: ``x - mean(x)`` when it centres (LayerNorm and
LN-free checkpoints), ``x`` for RMSNorm. Per token, from the Gram matrix ``G_ij = <P(w_i), P(w_j)>``:

* dilution   ``delta(c,L) = ||P(w_c)|| / ||P(r_L)|| = sqrt(G_cc) / sqrt(sum_{i,j<L} G_ij)``
* retention  ``rho(c,L)   = <P(sum_{c<=j<L} w_j), u_c> / ||P(w_c)|| = sum_{c<=j<L} G_cj / G_cc``
* visibility ``nu(c,L)    = rho * delta``
* reading share ``R(L,c)  = <P(w_c), P(r_L)> / ||P(r_L)||^2 = sum_{j<L} G_cj / sum_{i,j<L} G_ij``
* equal-norm null ``R0(L,c)``: ``R`` after every write is rescaled to one common norm (directions kept),
  i.e. ``R`` computed from ``G_ij / sqrt(G_ii G_jj)``.

Depth convention (used for distances): ``layer(embed) = 0``, ``layer(attn_out.l) = layer(mlp_out.l) =
l + 1``, ``layer(resid_pre.l) = l + 1`` and ``layer(final) = n_layers + 1``; the distance
``d = layer(L) - layer(c)`` is >= 1 for every write before a reader and 1 for its first reader.

Pure functions on tensors/arrays come first (:func:`gram_from_writes`, :func:`deletion_quantities`,
:func:`summarize_deletion` ...), then the model plumbing (:func:`collect_deletion`,
:func:`ablation_check`). Formulas and reading guide: ``docs/deletion.md``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .data import iter_batches
from .errors import NormgrowthError

QUANTITIES = ("retention", "dilution", "visibility", "reading", "reading_null")
SHARE_WITHIN = (1, 2, 4, 8)  # layers for the locality shares
DEFAULT_ABLATION_LAYERS = 6  # number of blocks in the default ablation spread
_CHUNK_BYTES = 256 * 2**20  # working memory for one chunk of per-token quantities


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
# pure per-token math
# ----------------------------------------------------------------------------------------------
def project_writes(writes: torch.Tensor, center: bool) -> torch.Tensor:
    """``P(w)`` in float32: ``w - mean(w)`` over the last axis when ``center``, else ``w``."""
    x = writes.float()
    return x - x.mean(-1, keepdim=True) if center else x


def gram_from_writes(writes: torch.Tensor, center: bool) -> torch.Tensor:
    """``G[..., i, j] = <P(w_i), P(w_j)>`` (float32) for writes ``[..., C, d]``."""
    p = project_writes(writes, center)
    return p @ p.transpose(-1, -2)


def deletion_quantities(gram: torch.Tensor, reader_index: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-token retention, dilution, visibility, reading share and equal-norm null share from ``G``.

    gram: ``[..., C, C]`` Gram matrix of the projected writes (forward order). reader_index: for every
    reader, the number of writes before it (``1 <= k <= C``). Returns a dict of ``[..., n_readers, C]``
    float32 tensors (keys :data:`QUANTITIES`), NaN where write ``c`` is not before the reader
    (``c >= k``). With ``S_k = sum_{i,j<k} G_ij``:
    ``rho = sum_{c<=j<k} G_cj / G_cc``, ``delta = sqrt(G_cc / S_k)``, ``nu = rho * delta``,
    ``R = sum_{j<k} G_cj / S_k``, ``R0`` = ``R`` of ``G_ij / sqrt(G_ii G_jj)``. A write with
    ``G_cc = 0`` has NaN retention and visibility and null share 0.
    """
    G = gram.float()
    n_writes = G.shape[-1]
    k = torch.as_tensor(list(reader_index), dtype=torch.long, device=G.device)
    if k.numel() == 0 or int(k.min()) < 1 or int(k.max()) > n_writes:
        raise ValueError(f"reader_index must lie in [1, {n_writes}], got {list(reader_index)}")
    before = torch.arange(n_writes, device=G.device)[None, :] < k[:, None]  # [R, C]
    nan = torch.tensor(float("nan"), device=G.device)

    def shares(gram_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        to_reader = gram_.cumsum(-1)[..., :, k - 1].transpose(-1, -2)  # [..., R, C]: sum_{j<k} G_cj
        stream_sq = torch.where(before, to_reader, 0.0).sum(-1)  # [..., R]: S_k
        return to_reader, stream_sq

    to_reader, stream_sq = shares(G)
    from_write = torch.triu(G).cumsum(-1)[..., :, k - 1].transpose(-1, -2)  # sum_{c<=j<k} G_cj
    diag = G.diagonal(dim1=-2, dim2=-1)  # [..., C]
    write_norm = diag.clamp_min(0).sqrt()[..., None, :]
    stream_norm = stream_sq.clamp_min(0).sqrt()[..., :, None]
    has_norm = (diag > 0)[..., None, :]
    retention = torch.where(has_norm, from_write / diag[..., None, :], nan)
    dilution = write_norm / stream_norm
    visibility = torch.where(has_norm, from_write / (write_norm * stream_norm), nan)
    reading = to_reader / stream_sq[..., :, None]

    inv_norm = torch.where(diag > 0, diag.clamp_min(torch.finfo(G.dtype).tiny).rsqrt(), 0.0)
    unit_gram = G * inv_norm[..., :, None] * inv_norm[..., None, :]
    to_reader0, stream_sq0 = shares(unit_gram)
    reading_null = to_reader0 / stream_sq0[..., :, None]

    out = {"retention": retention, "dilution": dilution, "visibility": visibility, "reading": reading,
           "reading_null": reading_null}
    return {name: torch.where(before, value, nan) for name, value in out.items()}


# ----------------------------------------------------------------------------------------------
# pure summaries (numpy)
# ----------------------------------------------------------------------------------------------
def pair_average_by_distance(matrix: np.ndarray, distance: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average a ``[..., n_readers, n_writes]`` matrix over the (reader, write) pairs at each distance.

    Returns ``(distances [D], values [..., D], n_pairs [D])``; every pair counts equally, NaN entries
    (write not before reader, or undefined) are skipped.
    """
    matrix = np.asarray(matrix, dtype=float)
    finite_d = distance[np.isfinite(distance)]
    distances = np.unique(finite_d).astype(int)
    values, n_pairs = [], []
    for d in distances:
        sel = distance == d
        block = matrix[..., sel]
        with np.errstate(invalid="ignore"):
            cnt = np.isfinite(block).sum(-1)
            tot = np.where(np.isfinite(block), block, 0.0).sum(-1)
            values.append(np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan))
        n_pairs.append(int(sel.sum()))
    return distances, np.stack(values, -1), np.asarray(n_pairs)


def log_linear_slope(distance: np.ndarray, values: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """Weighted least-squares slope of ``log(values)`` on ``distance`` (per layer).

    Points with non-finite or non-positive values are skipped; NaN when fewer than two distinct
    distances remain. ``exp(-slope)`` is the factor by which the quantity falls per layer.
    """
    x = np.asarray(distance, dtype=float)
    y = np.asarray(values, dtype=float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(y) & (y > 0) & np.isfinite(x) & (w > 0)
    if np.unique(x[ok]).size < 2:
        return float("nan")
    x, ly, w = x[ok], np.log(y[ok]), w[ok]
    xm = np.sum(w * x) / np.sum(w)
    ym = np.sum(w * ly) / np.sum(w)
    return float(np.sum(w * (x - xm) * (ly - ym)) / np.sum(w * (x - xm) ** 2))


def dilution_share(dilution_slope: float, visibility_slope: float) -> float:
    """Share of the fall of visibility explained by dilution: ``slope(log delta) / slope(log nu)``.

    Since ``log nu = log rho + log delta``, 1 means visibility falls only because the write is
    diluted (deletion by magnitude), 0 only because later writes erase it. Defined only when
    visibility falls (``visibility_slope < 0``); NaN otherwise.
    """
    if not (np.isfinite(dilution_slope) and np.isfinite(visibility_slope)) or visibility_slope >= 0:
        return float("nan")
    return float(dilution_slope / visibility_slope)


def locality(reading: np.ndarray, reading_null: np.ndarray, distance: np.ndarray,
             within: Sequence[int] = SHARE_WITHIN) -> dict[str, Any]:
    """Where each reader's stream comes from, by distance, next to the equal-norm null.

    reading, reading_null, distance: ``[n_readers, n_writes]`` (mean shares; distance NaN where the
    write is not before the reader). Per reader: ``mean_distance = sum_c R(L,c) d(L,c)`` and
    ``share_within[k] = sum_{c: d<=k} R(L,c)``. The scalar ``share_within[k]`` averages the per-reader
    shares over the readers that have at least one write farther than ``k`` layers (NaN if none).
    """
    before = np.isfinite(distance)
    dist0 = np.where(before, distance, 0.0)

    def per_reader(share: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
        share = np.where(before, share, 0.0)
        mean_distance = np.sum(share * dist0, -1)
        per, scalar = {}, {}
        farthest = np.nanmax(np.where(before, distance, -np.inf), -1)
        for k in within:
            s = np.sum(np.where(before & (dist0 <= k), share, 0.0), -1)
            per[str(k)] = s
            has_far = farthest > k
            scalar[str(k)] = float(np.mean(s[has_far])) if has_far.any() else float("nan")
        return mean_distance, per, scalar

    md, per, scalar = per_reader(np.asarray(reading, dtype=float))
    md0, per0, scalar0 = per_reader(np.asarray(reading_null, dtype=float))
    return {"mean_distance": md, "mean_distance_null": md0, "share_within": scalar,
            "share_within_null": scalar0, "share_within_per_reader": per, "share_within_null_per_reader": per0}


def _bootstrap_weights(seq_weights: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n_seqs]`` weights: multinomial resampling counts of sequences times their token counts."""
    n = seq_weights.shape[0]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    return counts * seq_weights[None, :]


def _weighted_nanmean(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``weights [B, S]`` x ``values [S, D]`` -> ``[B, D]`` weighted means skipping NaN values."""
    ok = np.isfinite(values)
    num = weights @ np.where(ok, values, 0.0)
    den = weights @ ok.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _ci(samples: np.ndarray) -> np.ndarray:
    """Percentile 95% interval along axis 0, ignoring NaN replicates -> ``[..., 2]``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN bounds
        lo = np.nanpercentile(samples, 2.5, axis=0)
        hi = np.nanpercentile(samples, 97.5, axis=0)
    return np.stack([lo, hi], -1)


def summarize_deletion(mean: dict[str, np.ndarray], write_layer: Sequence[int], reader_layer: Sequence[int],
                       seq_mean: Optional[dict[str, np.ndarray]] = None, seq_weights: Optional[np.ndarray] = None,
                       n_boot: int = 1000, seed: int = 0, fit_window: Optional[tuple[int, int]] = None
                       ) -> dict[str, Any]:
    """Distance curves, decay rates, dilution share and locality from mean matrices.

    mean: ``{quantity: [n_readers, n_writes]}`` token means. seq_mean/seq_weights (optional):
    per-sequence means ``[n_seqs, n_readers, n_writes]`` and tokens per sequence, for 95% percentile
    bootstrap CIs over sequences (token-weighted resampling). Decay rates are weighted (by pairs per
    distance) log-linear fits of the pair-averaged curves over ``fit_window = (d_min, d_max)``
    (default: all distances); ``*_decay_per_layer = exp(-slope)`` (> 1: falls with distance).
    """
    distance = distance_matrix(write_layer, reader_layer)
    by: dict[str, Any] = {}
    curves = {}
    for q in QUANTITIES:
        dists, curves[q], n_pairs = pair_average_by_distance(mean[q], distance)
    by["distance"] = dists
    by["n_pairs"] = n_pairs
    for q in QUANTITIES:
        by[q] = curves[q]
    lo, hi = (int(dists.min()), int(dists.max())) if fit_window is None else fit_window
    in_window = (dists >= lo) & (dists <= hi)
    fit_w = np.where(in_window, n_pairs, 0).astype(float)
    by["fit_window"] = [lo, hi]

    def fits(c: dict[str, np.ndarray]) -> dict[str, float]:
        s_nu = log_linear_slope(dists, c["visibility"], fit_w)
        s_delta = log_linear_slope(dists, c["dilution"], fit_w)
        s_rho = log_linear_slope(dists, c["retention"], fit_w)
        return {"visibility_decay_per_layer": math.exp(-s_nu) if np.isfinite(s_nu) else float("nan"),
                "dilution_decay_per_layer": math.exp(-s_delta) if np.isfinite(s_delta) else float("nan"),
                "retention_decay_per_layer": math.exp(-s_rho) if np.isfinite(s_rho) else float("nan"),
                "share_explained_by_dilution": dilution_share(s_delta, s_nu)}

    point = fits(curves)
    by.update(point)
    if seq_mean is not None and seq_weights is not None and np.asarray(seq_weights).size >= 2 and n_boot > 0:
        w = np.asarray(seq_weights, dtype=float)
        keep = w > 0
        boot_w = _bootstrap_weights(w[keep], n_boot, seed)
        boot_curves = {}
        for q in QUANTITIES:
            _, seq_curves, _ = pair_average_by_distance(np.asarray(seq_mean[q])[keep], distance)
            boot_curves[q] = _weighted_nanmean(boot_w, seq_curves)  # [B, D]
            by[q + "_ci95"] = _ci(boot_curves[q])
        boot_fits = [fits({q: boot_curves[q][b] for q in QUANTITIES}) for b in range(n_boot)]
        for key in point:
            by[key + "_ci95"] = _ci(np.asarray([f[key] for f in boot_fits], dtype=float)[:, None])[0]
    else:
        for q in QUANTITIES:
            by[q + "_ci95"] = np.full((len(dists), 2), np.nan)
        for key in point:
            by[key + "_ci95"] = np.full(2, np.nan)
    return {"by_distance": by, "locality": locality(mean["reading"], mean["reading_null"], distance)}


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    """numpy/torch -> plain lists and floats, NaN/inf -> None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


@dataclass
class DeletionResults:
    """Streamed deletion statistics of one model on one data set.

    ``seq_sum[s, q, r, c]`` / ``seq_count[s, q, r, c]``: per-sequence sums and counts of quantity
    ``QUANTITIES[q]`` for (reader r, write c) over the sequence's tokens (position 0 and padding
    excluded); token means and per-sequence means derive from them.
    """

    model: str
    ln_free: bool
    normalization: str
    centers: bool
    n_layers: int
    layout: StreamLayout
    seq_sum: np.ndarray
    seq_count: np.ndarray
    seq_n_tokens: np.ndarray
    max_write_sum_rel_error: float  # max over tokens/readers of ||sum of writes - stream|| / ||stream||
    data_source: str = ""
    ablation: Optional[dict] = None
    n_boot: int = 1000
    seed: int = 0
    fit_window: Optional[tuple[int, int]] = None
    _summary: Optional[dict] = field(default=None, repr=False)

    @property
    def n_seqs(self) -> int:
        return int(self.seq_sum.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.seq_n_tokens.sum())

    @property
    def mean(self) -> dict[str, np.ndarray]:
        """Token means ``{quantity: [n_readers, n_writes]}`` (NaN where the write is not before the reader)."""
        tot, cnt = self.seq_sum.sum(0), self.seq_count.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
        return {q: m[i] for i, q in enumerate(QUANTITIES)}

    @property
    def seq_mean(self) -> dict[str, np.ndarray]:
        """Per-sequence means ``{quantity: [n_seqs, n_readers, n_writes]}``."""
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.where(self.seq_count > 0, self.seq_sum / np.maximum(self.seq_count, 1), np.nan)
        return {q: m[:, i] for i, q in enumerate(QUANTITIES)}

    def distance(self) -> np.ndarray:
        return distance_matrix(self.layout.write_layer, self.layout.reader_layer)

    def summary(self) -> dict[str, Any]:
        """``{"by_distance": ..., "locality": ...}`` (see :func:`summarize_deletion`), cached."""
        if self._summary is None:
            self._summary = summarize_deletion(self.mean, self.layout.write_layer, self.layout.reader_layer,
                                               self.seq_mean, self.seq_n_tokens, n_boot=self.n_boot,
                                               seed=self.seed, fit_window=self.fit_window)
        return self._summary

    def to_json(self) -> dict:
        lay = self.layout
        mean = self.mean
        summ = self.summary()
        by = summ["by_distance"]
        loc = summ["locality"]
        out: dict[str, Any] = {
            "model": self.model, "ln_free": bool(self.ln_free), "normalization": self.normalization,
            "centers": bool(self.centers), "n_layers": self.n_layers, "n_seqs": self.n_seqs,
            "n_tokens": self.n_tokens, "data_source": self.data_source,
            "max_write_sum_rel_error": self.max_write_sum_rel_error,
            "writes": list(lay.writes), "write_layer": list(lay.write_layer),
            "readers": list(lay.readers), "reader_layer": list(lay.reader_layer),
        }
        for q in QUANTITIES:
            out[q] = mean[q]
        out["by_distance"] = {k: by[k] for k in (
            "distance", "retention", "dilution", "visibility", "reading", "visibility_decay_per_layer",
            "dilution_decay_per_layer", "share_explained_by_dilution")}
        out["by_distance"].update({k: v for k, v in by.items() if k not in out["by_distance"]})
        out["by_distance"]["n_boot"] = self.n_boot
        out["locality"] = {k: loc[k] for k in ("mean_distance", "mean_distance_null", "share_within")}
        out["locality"].update({k: v for k, v in loc.items() if k not in out["locality"]})
        out["ablation"] = self.ablation if self.ablation is not None else {
            "writes": [], "distance": [], "normalized_input_change": [], "final_kl": [], "run": False}
        return _jsonable(out)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _f(x: Any, spec: str = ".3f") -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "-"
    return format(x, spec) if math.isfinite(x) else "-"


def _with_ci(x: Any, ci: Any, spec: str = ".3f") -> str:
    ci = np.asarray(ci, dtype=float)
    if ci.size == 2 and np.all(np.isfinite(ci)):
        return f"{_f(x, spec)} [{_f(ci[0], spec)}, {_f(ci[1], spec)}]"
    return _f(x, spec)


def format_deletion_report(res: DeletionResults) -> str:
    """Plain-text report: distance table with 95% CIs, decay rates, dilution share, locality, ablation."""
    return format_deletion_json(res.to_json())


def format_deletion_json(doc: dict) -> str:
    """The report of :func:`format_deletion_report` from a :meth:`DeletionResults.to_json` document."""
    by, loc = doc["by_distance"], doc["locality"]
    kind = "LN-free" if doc.get("ln_free") else doc.get("normalization", "")
    centred = "centred" if doc.get("centers", True) else "uncentred"
    err = doc.get("max_write_sum_rel_error")
    lines = [f"deletion analysis: {doc['model']} ({kind}, P = {centred} writes), {doc.get('n_layers', '?')} layers, "
             f"{doc.get('n_seqs', '?')} sequences, {doc.get('n_tokens', '?')} tokens (position 0 and padding excluded)"]
    if err is not None:
        lines.append(f"check: the writes sum to every reader's stream within {err:.1e} (relative)")
    lines += ["",
              "by distance d = layer(reader) - layer(write); mean over (reader, write) pairs at that distance, "
              "95% CI by bootstrap over sequences",
              f"{'d':>3} {'pairs':>5}  {'retention rho':<24}{'dilution delta':<24}{'visibility nu':<24}"
              f"{'reading R':<24}{'null R0':<24}"]
    n_d = len(by["distance"])
    no_ci = [[None, None]] * n_d
    for i, d in enumerate(by["distance"]):
        cells = [_with_ci(by[q][i], by.get(q + "_ci95", no_ci)[i]) for q in QUANTITIES]
        pairs = by.get("n_pairs", [None] * n_d)[i]
        lines.append(f"{int(d):>3} {_f(pairs, '.0f'):>5}  "
                     + "".join(f"{c:<24}" for c in cells))
    lo, hi = by.get("fit_window", [by["distance"][0], by["distance"][-1]])

    def decay(key: str) -> str:
        return _with_ci(by.get(key), by.get(key + "_ci95"), ".4f")

    lines += ["",
              f"decay per layer of distance (weighted log-linear fit over d = {lo}..{hi}; the factor by which the "
              "mean falls per layer, > 1 = falls):",
              f"  visibility {decay('visibility_decay_per_layer')}",
              f"  dilution   {decay('dilution_decay_per_layer')}",
              f"  retention  {decay('retention_decay_per_layer')}",
              "share of the fall of visibility explained by dilution: "
              f"{_with_ci(by.get('share_explained_by_dilution'), by.get('share_explained_by_dilution_ci95'))}"
              "  (1 = deletion by magnitude, 0 = deletion by erasure)"]
    if doc.get("ln_free"):
        lines.append("  note: this model is LN-free: nothing divides by the stream's size, so dilution does not "
                     "reduce a write's effect here (see docs/deletion.md)")
    per = loc.get("share_within_per_reader", {})
    lines += ["", "locality: mean distance of what each reader reads (reading shares R; equal-norm null R0), and the "
              "share of R within k layers",
              f"{'reader':<14}{'mean d':>8}{'null':>8}" + "".join(f"{'<=' + k:>8}" for k in per)]
    readers = doc.get("readers", [str(i) for i in range(len(loc["mean_distance"]))])
    for r, name in enumerate(readers):
        lines.append(f"{name:<14}{_f(loc['mean_distance'][r], '.2f'):>8}{_f(loc['mean_distance_null'][r], '.2f'):>8}"
                     + "".join(f"{_f(v[r]):>8}" for v in per.values()))
    null_within = loc.get("share_within_null", {})
    lines.append("share within k layers (mean over readers with writes farther than k): "
                 + ", ".join(f"k={k}: {_f(v)} (null {_f(null_within.get(k))})" for k, v in loc["share_within"].items()))
    ab = doc.get("ablation")
    if ab and ab.get("writes"):
        lines += ["", "causal check: mean-ablate one write (all positions but 0); relative change of the normalised "
                  "input at the reader d layers later, and mean KL(clean || ablated) of the next-token distribution",
                  f"{'write':<12}" + "".join(f"{'d=' + str(d):>9}" for d in ab["distance"]) + f"{'KL':>11}"]
        for i, w in enumerate(ab["writes"]):
            lines.append(f"{w:<12}" + "".join(f"{_f(v):>9}" for v in ab["normalized_input_change"][i])
                         + f"{_f(ab['final_kl'][i], '.4g'):>11}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# model plumbing
# ----------------------------------------------------------------------------------------------
def _batch_tensors(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = getattr(batch, "tokens", None)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise NormgrowthError("the token batch must hold .tokens as an integer tensor [n_seqs, seq_len].")
    mask = getattr(batch, "attention_mask", None)
    mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    if mask.shape != tokens.shape:
        raise NormgrowthError(f"attention mask shape {tuple(mask.shape)} differs from token shape {tuple(tokens.shape)}.")
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


class _GramCollector:
    """Hooks that store the batch's projected writes and form their Gram matrix at ``final_in``.

    Writes ``P(w)`` go into a ``[batch, pos, C, d]`` float32 buffer that lives for one batch only; the
    Gram matrix ``[batch, pos, C, C]`` is formed by one batched matmul when the final stream is read
    (the last hook of the forward pass), after which the buffer is dropped. Reader hooks compare each
    block input and the final stream with the running sum of the raw writes (a self-check).
    """

    def __init__(self, model: Any, layout: StreamLayout):
        self.model, self.layout = model, layout
        self.center = bool(model.centers)
        self.writes: Optional[torch.Tensor] = None
        self.stream: Optional[torch.Tensor] = None
        self.gram: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None
        self.max_rel_error = 0.0

    def start_batch(self, valid: torch.Tensor) -> None:
        self.valid = valid
        self.writes = None
        self.stream = None
        self.gram = None

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
                b, p, c, d = self.writes.shape
                flat = self.writes.view(b * p, c, d)
                self.gram = torch.bmm(flat, flat.transpose(1, 2)).view(b, p, c, c)
                self.writes = None
                self.stream = None
        return hook


def deletion_bytes_per_token(model: Any) -> int:
    """Bytes per token the deletion collector keeps beyond a norm-collection pass: the float32 writes
    ``[C, d_model]``, their running sum ``[d_model]`` and the Gram matrix ``[C, C]`` with a bmm
    temporary (C = 2 n_layers + 1). For ``--batch-size auto``."""
    n_c = stream_layout(model.n_layers).n_writes
    return 4 * ((n_c + 1) * model.d_model + 2 * n_c * n_c)


def collect_deletion(model: Any, batch: Any, batch_size: int = 8, ablate: Any = None,
                     progress: Optional[Callable[[int, int], None]] = None, n_boot: int = 1000, seed: int = 0,
                     fit_window: Optional[tuple[int, int]] = None) -> DeletionResults:
    """Stream the per-token deletion quantities of ``model`` over ``batch`` into per-sequence sums.

    Position 0 and padding are excluded; compute in float32, sums in float64. ``ablate``: None (no
    causal check), "default", or write labels / layer numbers for :func:`ablation_check`.
    ``progress(n_done, n_total)`` is called after each batch (sequences).
    """
    tokens, mask = _batch_tensors(batch)
    layout = stream_layout(model.n_layers)
    n_seqs = tokens.shape[0]
    n_q, n_r, n_c = len(QUANTITIES), len(layout.readers), layout.n_writes
    seq_sum = np.zeros((n_seqs, n_q, n_r, n_c))
    seq_count = np.zeros((n_seqs, n_q, n_r, n_c), dtype=np.int64)
    seq_n_tokens = _valid(mask).sum(1).numpy().astype(np.int64)
    ablation_writes = resolve_ablation_writes(model, ablate) if ablate is not None else None
    collector = _GramCollector(model, layout)
    per_token_bytes = 4 * (6 * n_c * n_c + 3 * n_q * n_r * n_c)
    chunk = max(1, _CHUNK_BYTES // per_token_bytes)
    with torch.inference_mode(), model.hooks(collector.hooks()):
        for start, tok, m in iter_batches(tokens, mask, batch_size):
            valid = _valid(m)
            collector.start_batch(valid)
            model.forward(tok, attention_mask=m, logits=False)  # the stream only
            if collector.gram is None:
                raise RuntimeError("the final_in hook did not fire: the Gram matrix of the writes was not formed")
            gram = collector.gram
            dev = gram.device
            acc_dev = dev if dev.type in ("cpu", "cuda") else torch.device("cpu")
            valid_d = valid.to(dev)
            seq_id = torch.arange(tok.shape[0], device=dev)[:, None].expand_as(valid_d)[valid_d].to(acc_dev)
            g_valid = gram[valid_d]  # [n_valid, C, C]
            collector.gram = None
            sums = torch.zeros(tok.shape[0], n_q, n_r, n_c, dtype=torch.float64, device=acc_dev)
            counts = torch.zeros(tok.shape[0], n_q, n_r, n_c, dtype=torch.float64, device=acc_dev)
            for lo in range(0, g_valid.shape[0], chunk):
                qd = deletion_quantities(g_valid[lo:lo + chunk], layout.reader_index)
                stacked = torch.stack([qd[q] for q in QUANTITIES], 1).to(acc_dev)  # [n, Q, R, C]
                finite = torch.isfinite(stacked)
                ids = seq_id[lo:lo + chunk]
                sums.index_add_(0, ids, torch.where(finite, stacked, 0.0).double())
                counts.index_add_(0, ids, finite.double())
            seq_sum[start:start + tok.shape[0]] = sums.cpu().numpy()
            seq_count[start:start + tok.shape[0]] = counts.cpu().numpy().round().astype(np.int64)
            if progress is not None:
                progress(start + tok.shape[0], n_seqs)
    res = DeletionResults(
        model=str(model.spec), ln_free=bool(model.ln_free), normalization=str(model.normalization),
        centers=bool(model.centers), n_layers=int(model.n_layers), layout=layout, seq_sum=seq_sum,
        seq_count=seq_count, seq_n_tokens=seq_n_tokens, max_write_sum_rel_error=collector.max_rel_error,
        data_source=str(getattr(batch, "source", "")), n_boot=n_boot, seed=seed, fit_window=fit_window)
    if ablation_writes:
        res.ablation = ablation_check(model, batch, writes=ablation_writes, batch_size=batch_size)
    return res


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
    tokens, mask = _batch_tensors(batch)
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

        def reader_hook(r: int) -> Callable:
            def hook(x: torch.Tensor) -> None:
                normed = normalize_input(x, model.centers, eps)
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
