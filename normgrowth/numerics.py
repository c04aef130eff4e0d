"""Pure numerics shared by every analysis: least-squares lines, the bootstrap over sequences, CIs.

Everything here works on numpy arrays and knows nothing of models. One resampling scheme is used
everywhere: a bootstrap replicate draws ``n`` sequences with replacement (``rng.integers``), and a
token-weighted mean over the drawn sequences is ``sum_s c_s w_s x_s / sum_s c_s w_s`` with ``c_s``
the number of times sequence ``s`` was drawn and ``w_s`` its token count. Percentile intervals take
the 2.5 % and 97.5 % quantiles of the finite replicates (numpy's default linear interpolation);
replicates that give NaN are counted and reported, never silently dropped (see ``PercentileCI``).
Formulas: docs/fit.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from scipy import stats

Z95 = float(stats.norm.ppf(0.975))
DEFAULT_N_BOOT = 1000  # bootstrap resamples of every CI over sequences
MIN_BOOT = 100  # fewer bootstrap resamples than this are refused
MIN_BOOT_SEQS = 30  # fewer sequences than this feeding a bootstrap: percentile CIs come out too narrow (a warning)
_BOOT_CHUNK_CELLS = 2_000_000  # resample-count matrix cells per chunk (replicates * sequences)

Seed = Union[int, np.random.Generator, None]


# ----------------------------------------------------------------------------------------------
# least-squares lines
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LineFit:
    """Least squares ``y = intercept + slope * x``.

    ``slope_se = sqrt(s^2 / S_xx)``, ``s^2 = RSS / df``, ``df = k - 2`` (NaN when df <= 0);
    ``r2 = 1 - RSS / TSS`` (1 for a flat y); ``rss`` = sum of squared residuals.
    """

    slope: float
    intercept: float
    slope_se: float
    df: int
    rss: float
    r2: float

    def slope_ci(self, level: float = 0.95) -> tuple[float, float]:
        """t interval ``slope +- t_{(1+level)/2, df} slope_se``."""
        return t_interval(self.slope, self.slope_se, self.df, level)


def fit_line(x: Any, y: Any) -> LineFit:
    """Ordinary least squares of ``y`` on ``x`` (scipy.stats.linregress), with RSS and R^2."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2 or np.unique(x).size < 2:
        raise ValueError(f"fit_line needs two 1-D arrays of equal length with >= 2 distinct x; got {x.shape}, {y.shape}")
    k = x.size
    if np.ptp(y) == 0:
        return LineFit(0.0, float(y[0]), 0.0 if k > 2 else math.nan, k - 2, 0.0, 1.0)
    res = stats.linregress(x, y)
    resid = y - (res.intercept + res.slope * x)
    rss = float(resid @ resid)
    tss = float(((y - y.mean()) ** 2).sum())
    se = float(res.stderr) if k > 2 else math.nan
    return LineFit(float(res.slope), float(res.intercept), se, k - 2, rss, 1.0 - rss / tss)


def polyfit_rows(x: Any, y: Any, deg: int) -> np.ndarray:
    """Least-squares polynomial coefficients of every row of ``y`` (``[..., k]``) on ``x`` (``[k]``).

    Returns ``[..., deg + 1]`` coefficients of ``(x - mean x)^p``, p = 0..deg. Centring x changes
    neither the slope of a line nor the top coefficient of any degree; it keeps the design well
    conditioned. Vectorised so that thousands of bootstrap curves are fitted in one product.
    """
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean()
    design = np.stack([xc**p for p in range(deg + 1)], axis=1)
    return np.asarray(y, dtype=np.float64) @ np.linalg.pinv(design).T


def ols_covariance(design: Any, y: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Least squares ``y ~ design @ coef``: ``(coef, cov, df)`` with ``cov = s^2 (X'X)^-1``,
    ``s^2 = RSS / df``, ``df = k - p`` (``cov`` all NaN when df <= 0)."""
    x = np.asarray(design, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    df = x.shape[0] - x.shape[1]
    if df <= 0:
        return coef, np.full((x.shape[1], x.shape[1]), np.nan), df
    resid = y - x @ coef
    return coef, float(resid @ resid) / df * np.linalg.pinv(x.T @ x), df


def top_coefficient_se(x: Any, y: Any, deg: int) -> tuple[float, float, int]:
    """OLS top coefficient of a degree-``deg`` polynomial, its SE ``sqrt(s^2 [(X'X)^-1]_kk)`` with
    ``s^2 = RSS / (k - deg - 1)``, and that df (SE NaN when df <= 0)."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean()
    design = np.stack([xc**p for p in range(deg + 1)], axis=1)
    coef, cov, df = ols_covariance(design, y)
    if df <= 0:
        return float(coef[deg]), math.nan, df
    return float(coef[deg]), float(math.sqrt(max(cov[deg, deg], 0.0))), df


def loglinear_slope(x: Any, y: Any, weights: Any = None) -> float:
    """Weighted least-squares slope of ``log y`` on ``x``; points with non-finite or non-positive
    ``y`` (or zero weight) are skipped; NaN when fewer than two distinct ``x`` remain.
    ``exp(slope)`` is the factor per unit of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(y) & (y > 0) & np.isfinite(x) & (w > 0)
    if np.unique(x[ok]).size < 2:
        return math.nan
    x, ly, w = x[ok], np.log(y[ok]), w[ok]
    xm = np.sum(w * x) / np.sum(w)
    ym = np.sum(w * ly) / np.sum(w)
    return float(np.sum(w * (x - xm) * (ly - ym)) / np.sum(w * (x - xm) ** 2))


# ----------------------------------------------------------------------------------------------
# the bootstrap over sequences
# ----------------------------------------------------------------------------------------------
def rng_of(seed: Seed) -> np.random.Generator:
    """``np.random.default_rng(seed)``, or the generator itself."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def spawn_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """``n`` independent generators from one seed (``SeedSequence.spawn``)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def resample_counts(n_rows: int, n_boot: int, seed: Seed = 0) -> Iterator[np.ndarray]:
    """Bootstrap draw counts ``c[b, s]`` (how often row ``s`` is drawn in replicate ``b``; each row of
    ``c`` sums to ``n_rows``), yielded in chunks ``[m, n_rows]`` so memory stays bounded."""
    rng = rng_of(seed)
    chunk = max(1, min(n_boot, _BOOT_CHUNK_CELLS // max(n_rows, 1)))
    done = 0
    while done < n_boot:
        m = min(chunk, n_boot - done)
        idx = rng.integers(0, n_rows, size=(m, n_rows))
        flat = (idx + (np.arange(m) * n_rows)[:, None]).ravel()
        yield np.bincount(flat, minlength=m * n_rows).reshape(m, n_rows).astype(np.float64)
        done += m


def weighted_mean(values: Any, weights: Any = None, skip_nan: bool = False) -> np.ndarray:
    """``sum_s w_s x_s / sum_s w_s`` over axis 0 of ``values`` ``[n, ...]``; with ``skip_nan`` the
    non-finite entries are left out of both sums (NaN where nothing is left)."""
    x = np.asarray(values, dtype=np.float64)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    return _weighted_means(w[None, :], x, skip_nan)[0]


def _weighted_means(cw: np.ndarray, x: np.ndarray, skip_nan: bool) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1)
    if skip_nan:
        ok = np.isfinite(flat)
        num = cw @ np.where(ok, flat, 0.0)
        den = cw @ ok.astype(np.float64)
    else:
        num = cw @ flat
        den = np.broadcast_to(cw.sum(axis=1, keepdims=True), num.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out.reshape((cw.shape[0],) + x.shape[1:])


def bootstrap_means(values: Any, weights: Any = None, n_boot: int = DEFAULT_N_BOOT, seed: Seed = 0,
                    skip_nan: bool = False) -> np.ndarray:
    """Bootstrap replicates ``[n_boot, ...]`` of the weighted mean over axis 0 of ``values`` ``[n, ...]``:
    replicate b = ``sum_s c_bs w_s x_s / sum_s c_bs w_s`` with the counts of :func:`resample_counts`."""
    x = np.asarray(values, dtype=np.float64)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    parts = [_weighted_means(c * w[None, :], x, skip_nan) for c in resample_counts(x.shape[0], n_boot, seed)]
    return np.concatenate(parts, axis=0)


@dataclass(frozen=True)
class PercentileCI:
    """A percentile interval with the count of replicates that were not finite (left out)."""

    lo: Any
    hi: Any
    n_nonfinite: Any
    n_boot: int

    def as_array(self) -> np.ndarray:
        """``[..., 2]`` array of (lo, hi)."""
        return np.stack([np.asarray(self.lo, dtype=float), np.asarray(self.hi, dtype=float)], axis=-1)


def percentile_ci(samples: Any, level: float = 0.95, axis: int = 0) -> PercentileCI:
    """Percentile interval of bootstrap replicates along ``axis``: the ``(1-level)/2`` and
    ``(1+level)/2`` quantiles of the finite replicates; NaN where none is finite."""
    x = np.asarray(samples, dtype=np.float64)
    finite = np.isfinite(x)
    q = [(1 - level) / 2, (1 + level) / 2]
    with np.errstate(invalid="ignore"), _quiet():
        lo, hi = np.nanquantile(np.where(finite, x, np.nan), q, axis=axis)
    n_bad = (~finite).sum(axis=axis)
    if np.ndim(lo) == 0:
        lo, hi, n_bad = float(lo), float(hi), int(n_bad)
    return PercentileCI(lo, hi, n_bad, int(x.shape[axis]))


class _quiet:
    """Silence numpy's all-NaN-slice RuntimeWarning (those slices give NaN bounds by design)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# ----------------------------------------------------------------------------------------------
# intervals
# ----------------------------------------------------------------------------------------------
def t_interval(est: float, se: float, df: float, level: float = 0.95) -> tuple[float, float]:
    """``est +- t_{(1+level)/2, df} se``; a normal quantile when df is infinite; NaN when undefined."""
    if not (math.isfinite(se) and df > 0):
        return (math.nan, math.nan)
    q = float(stats.norm.ppf((1 + level) / 2)) if math.isinf(df) else float(stats.t.ppf((1 + level) / 2, df))
    return (est - q * se, est + q * se)


def welch_satterthwaite_df(variances: Sequence[float], dfs: Sequence[float]) -> float:
    """``(sum v_i)^2 / sum(v_i^2 / df_i)``; infinite-df terms contribute 0 to the denominator."""
    num = sum(variances) ** 2
    den = sum(v * v / d for v, d in zip(variances, dfs) if math.isfinite(d))
    return math.inf if den == 0 else num / den


def se_from_ci(ci: Any) -> float:
    """Standard error implied by a symmetric normal 95 % CI: ``(hi - lo) / (2 * 1.96)``."""
    lo, hi = (math.nan if v is None else float(v) for v in ci)
    return (hi - lo) / (2 * Z95)


def difference_ci_from_cis(a: float, a_ci: Any, b: float, b_ci: Any) -> tuple[float, tuple[float, float]]:
    """``A - B`` with the normal-approximation 95 % CI ``(A - B) +- 1.96 sqrt(SE_A^2 + SE_B^2)``,
    SE from each side's own CI (:func:`se_from_ci`); NaN CI when either side has none."""
    diff = float(a) - float(b)
    se_a, se_b = se_from_ci(a_ci), se_from_ci(b_ci)
    if not (math.isfinite(se_a) and math.isfinite(se_b)):
        return diff, (math.nan, math.nan)
    half = Z95 * math.sqrt(se_a**2 + se_b**2)
    return diff, (diff - half, diff + half)


def weighted_mean_ci(values: Any, weights: Any = None) -> tuple[float, tuple[float, float]]:
    """Weighted mean of per-sequence values with a normal 95 % CI: weighted variance
    ``sum w (v - m)^2 / sum w``, Kish effective size ``n_eff = (sum w)^2 / sum w^2``,
    SE ``sqrt(var / (n_eff - 1))``; non-finite values and zero weights are left out."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    keep = np.isfinite(v) & (w > 0)
    v, w = v[keep], w[keep]
    if v.size == 0:
        return math.nan, (math.nan, math.nan)
    mean = float(np.sum(w * v) / np.sum(w))
    if v.size < 2:
        return mean, (math.nan, math.nan)
    n_eff = np.sum(w) ** 2 / np.sum(w**2)
    var = float(np.sum(w * (v - mean) ** 2) / np.sum(w))
    se = math.sqrt(var / max(n_eff - 1, 1))
    return mean, (mean - Z95 * se, mean + Z95 * se)


def excludes_zero(ci: Any) -> bool:
    """True when both ends of the interval are finite and on the same side of 0."""
    lo, hi = (math.nan if v is None else float(v) for v in ci)
    return bool(math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0))


def holm_adjust(p_values: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjusted p-values (family-wise error control); None entries are skipped."""
    idx = [i for i, p in enumerate(p_values) if p is not None and math.isfinite(p)]
    order = sorted(idx, key=lambda i: p_values[i])
    m = len(order)
    out: list[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out
