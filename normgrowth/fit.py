"""Growth-rate fits for residual-stream norm curves (pure numpy/scipy, no model code).

A *curve* is a 1-D array ``n[l]`` of mean norms indexed by layer ``l = 0..n_layers-1`` (the array
position is the layer index). Per-sequence curves are a 2-D array ``[n_seqs, n_layers]``; the fitted
curve is their weighted mean ``m[l] = sum_s w_s n_s[l] / sum_s w_s`` (``w_s`` = tokens per sequence
makes ``m`` the token mean).

Model-free numbers first (the primary ones): the local log-slope profile d log m / dl by central
differences, the mean log-slope over an inclusive window ``a..b`` (``(log m[b] - log m[a]) / (b - a)``), the
last/first norm ratio and the window-sensitivity band (the range of the mean log-slope over every window of
>= 5 layers that skips the first and the last layer). Then the least-squares growth factor
``g = exp(beta)`` of ``log m[l] = alpha + beta * l`` (``percent_per_layer = 100 (g - 1)``) and the curvature.
95% CIs: percentile bootstrap over sequences when there are several curves, otherwise the regression
standard error with a t quantile. The growth law (:mod:`normgrowth.laws`: exponential, linear, power with a
free origin, saturating, or none) is a secondary interpretation. See docs/fit.md for every formula.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from normgrowth.curve_files import read_curve  # noqa: F401  (normgrowth.fit.read_curve: fit a curve file)
from normgrowth.errors import NormgrowthError
from normgrowth.laws import LawFit, fit_laws, law_label, rejected_text
from normgrowth.numerics import (DEFAULT_N_BOOT, MIN_BOOT, MIN_BOOT_SEQS, bootstrap_means, excludes_zero, fit_line,
                                 percentile_ci, polyfit_rows, spawn_rngs, t_interval, top_coefficient_se,
                                 weighted_mean, welch_satterthwaite_df)
from normgrowth.storage import as_float, json_safe
from normgrowth.tables import fmt_number, text_table, with_ci
from normgrowth.windows import Window, WindowSpec, default_window, parse_window, resolve_window  # noqa: F401

if TYPE_CHECKING:
    from normgrowth.results import Results

CI_BOOTSTRAP = "bootstrap over sequences"
CI_SE = "regression standard error"
CI_DIFF_BOOTSTRAP = "independent bootstraps over sequences"
CI_DIFF_PAIRED = "paired bootstrap over sequences (same resampled sequences for both: same token batch)"
CI_DIFF_SE = "combined standard errors (Welch-Satterthwaite t)"
SENSITIVITY_MIN_LAYERS = 5  # window-sensitivity band: every window of at least this many layers
MIN_CURVATURE_LAYERS = 5  # curvature is tested (flag) only on windows with at least this many layers
_HOLDS_RTOL = 1e-5  # relative slack for the appendix-1 bound check (float32 means)



@dataclass
class GrowthFit:
    """Result of :func:`fit_growth` on one norm curve (or the weighted mean of several).

    Model-free numbers (the primary ones): mean_log_slope = (log m[b] - log m[a]) / (b - a), the mean of the
    per-layer log-slopes over the window (exp of it = endpoint_growth_factor); ratio_last_first = m[L-1] / m[0]
    over the whole curve; local_slope = d log m / dl per layer by central differences (one-sided at the ends)
    with CIs; window_sensitivity = the range of the mean log-slope over every window of >= 5 layers that skips
    the first and the last layer.
    growth_factor = exp(slope of log m[l] on l over window a..b); percent_per_layer = 100 (g - 1);
    endpoint_growth_factor = (m[b] / m[a]) ** (1 / (b - a)); curvature = c in
    log m[l] = alpha + beta l + c l^2 (natural log per layer^2); curvature_effect = exp(c (h^2 - v)) - 1,
    the relative deviation of the quadratic from the exponential fit at either end of the window
    (h = (b - a) / 2, v = (k^2 - 1) / 12); curvature_tested = the window has >= 5 layers (only then is
    the curvature's CI read as a test); law = the exponential, linear and power-law fits and the
    preferred law (:class:`normgrowth.laws.LawFit`). CIs are 95%; NaN when undefined.
    """

    window: Window
    growth_factor: float
    ci95: tuple[float, float]
    percent_per_layer: float
    r2: float
    endpoint_growth_factor: float
    curvature: float
    curvature_ci95: tuple[float, float]
    n_curves: int
    ci_method: str
    n_boot: int = 0
    curvature_effect: float = float("nan")
    curvature_effect_ci95: tuple[float, float] = (float("nan"), float("nan"))
    curvature_tested: bool = False
    law: Optional[LawFit] = None
    mean_log_slope: float = float("nan")
    mean_log_slope_ci95: tuple[float, float] = (float("nan"), float("nan"))
    ratio_last_first: float = float("nan")
    ratio_last_first_ci95: tuple[float, float] = (float("nan"), float("nan"))
    local_slope: dict = field(default_factory=dict)  # strict-JSON form: {"layers", "slope", "ci95_lo", "ci95_hi"}
    window_sensitivity: dict = field(default_factory=dict)  # strict-JSON form (window_sensitivity())

    @property
    def mean_percent_per_layer(self) -> float:
        """The mean log-slope as a growth per layer: 100 (exp(s) - 1)."""
        return 100.0 * math.expm1(self.mean_log_slope) if math.isfinite(self.mean_log_slope) else math.nan

    @property
    def percent_per_layer_ci95(self) -> tuple[float, float]:
        """100 (g - 1) at both CI ends."""
        return (100.0 * (self.ci95[0] - 1.0), 100.0 * (self.ci95[1] - 1.0))

    def to_json(self) -> dict:
        """Strict-JSON dict (NaN -> None); keys: window, growth_factor, ci95, percent_per_layer,
        percent_per_layer_ci95, r2, endpoint_growth_factor, curvature, curvature_ci95, curvature_effect,
        curvature_effect_ci95, curvature_tested, n_curves, ci_method, n_boot and law (when fitted)."""
        doc = {
            "window": [int(self.window[0]), int(self.window[1])],
            "growth_factor": self.growth_factor,
            "ci95": list(self.ci95),
            "percent_per_layer": self.percent_per_layer,
            "percent_per_layer_ci95": list(self.percent_per_layer_ci95),
            "r2": self.r2,
            "endpoint_growth_factor": self.endpoint_growth_factor,
            "curvature": self.curvature,
            "curvature_ci95": list(self.curvature_ci95),
            "curvature_effect": self.curvature_effect,
            "curvature_effect_ci95": list(self.curvature_effect_ci95),
            "curvature_tested": bool(self.curvature_tested),
            "n_curves": int(self.n_curves),
            "ci_method": self.ci_method,
            "n_boot": int(self.n_boot),
            "mean_log_slope": self.mean_log_slope,
            "mean_log_slope_ci95": list(self.mean_log_slope_ci95),
            "mean_percent_per_layer": self.mean_percent_per_layer,
            "ratio_last_first": self.ratio_last_first,
            "ratio_last_first_ci95": list(self.ratio_last_first_ci95),
            "local_slope": self.local_slope,
            "window_sensitivity": self.window_sensitivity,
        }
        if self.law is not None:
            doc["law"] = self.law.to_json()
        return json_safe(doc)

    @classmethod
    def from_json(cls, data: dict) -> "GrowthFit":
        """Inverse of :meth:`to_json` (None -> NaN; extra keys ignored; fields added later get defaults)."""
        try:
            eff_ci = data.get("curvature_effect_ci95") or [None, None]
            return cls(
                window=(int(data["window"][0]), int(data["window"][1])),
                growth_factor=as_float(data["growth_factor"]),
                ci95=(as_float(data["ci95"][0]), as_float(data["ci95"][1])),
                percent_per_layer=as_float(data["percent_per_layer"]),
                r2=as_float(data["r2"]),
                endpoint_growth_factor=as_float(data["endpoint_growth_factor"]),
                curvature=as_float(data["curvature"]),
                curvature_ci95=(
                    as_float(data["curvature_ci95"][0]),
                    as_float(data["curvature_ci95"][1]),
                ),
                n_curves=int(data.get("n_curves", 1)),
                ci_method=str(data.get("ci_method", "")),
                n_boot=int(data.get("n_boot", 0)),
                curvature_effect=as_float(data.get("curvature_effect")),
                curvature_effect_ci95=(as_float(eff_ci[0]), as_float(eff_ci[1])),
                curvature_tested=bool(data.get("curvature_tested", False)),
                law=LawFit.from_json(data["law"]) if data.get("law") else None,
                mean_log_slope=as_float(data.get("mean_log_slope")),
                mean_log_slope_ci95=_pair(data.get("mean_log_slope_ci95")),
                ratio_last_first=as_float(data.get("ratio_last_first")),
                ratio_last_first_ci95=_pair(data.get("ratio_last_first_ci95")),
                local_slope=dict(data.get("local_slope") or {}),
                window_sensitivity=dict(data.get("window_sensitivity") or {}),
            )
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise NormgrowthError(
                f"growth-fit JSON is malformed ({type(err).__name__}: {err}); regenerate it with normgrowth."
            ) from None


def _pair(values: Any) -> tuple[float, float]:
    lo, hi = values or (None, None)
    return (as_float(lo), as_float(hi))


# ----------------------------------------------------------------------------------------------
# Internal numerics
# ----------------------------------------------------------------------------------------------


def _prepare(curves: Any, weights: Any, what: str = "curves") -> tuple[np.ndarray, np.ndarray]:
    """Curves as float64 [n_rows, n_layers] and weights [n_rows] (> 0; zero-weight rows dropped)."""
    try:
        arr = np.asarray(curves, dtype=np.float64)
    except (TypeError, ValueError):
        raise NormgrowthError(f"{what} must be numeric arrays of norms; got non-numeric values.") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise NormgrowthError(
            f"{what} must have shape [n_layers] or [n_seqs, n_layers] with at least one layer; got "
            f"shape {tuple(np.shape(curves))}."
        )
    if weights is None:
        w = np.ones(arr.shape[0])
    else:
        try:
            w = np.asarray(weights, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise NormgrowthError(f"weights for {what} must be numbers (e.g. tokens per sequence).") from None
        if w.shape[0] != arr.shape[0]:
            raise NormgrowthError(
                f"got {w.shape[0]} weights for {arr.shape[0]} {what} rows; give one weight per sequence."
            )
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise NormgrowthError(
                f"weights for {what} must be finite, non-negative and not all zero (e.g. tokens per sequence)."
            )
    keep = w > 0
    return arr[keep], w[keep]


def _check_positive(arr: np.ndarray, a: int, b: int, what: str = "norm curve") -> None:
    """Raise naming the first layer in a..b with a non-positive or non-finite value."""
    sub = arr[:, a : b + 1]
    bad = ~np.isfinite(sub) | (sub <= 0)
    if bad.any():
        rows, cols = np.nonzero(bad)
        order = np.lexsort((rows, cols))  # lowest layer first
        row, col = int(rows[order[0]]), int(cols[order[0]])
        layer = a + col
        seq = f" (sequence {row})" if arr.shape[0] > 1 else ""
        raise NormgrowthError(
            f"{what} value {sub[row, col]!r} at layer {layer}{seq} is not positive and finite; norms must be "
            f"> 0 in layers {a}..{b}, so pick a window that excludes layer {layer} or fix the input."
        )


def _check_n_boot(n_boot: int) -> int:
    n_boot = int(n_boot)
    if n_boot < MIN_BOOT:
        raise NormgrowthError(f"n_boot={n_boot} is too few bootstrap resamples; use at least {MIN_BOOT} (default {DEFAULT_N_BOOT}).")
    return n_boot


def _warn_few_sequences(n_rows: int) -> None:
    if 2 <= n_rows < MIN_BOOT_SEQS:
        warnings.warn(f"only {n_rows} sequences feed the bootstrap over sequences, whose percentile CIs come out too "
                      f"narrow below about {MIN_BOOT_SEQS} sequences; collect more sequences for reliable intervals.",
                      stacklevel=3)


def curvature_effect_scale(k: int) -> float:
    """h^2 - v with h = (k - 1) / 2, v = (k^2 - 1) / 12: the quadratic fit minus the line fit at either end of a
    k-layer window is c (h^2 - v) in log space (the centred l^2 column is orthogonal to l on an even grid)."""
    return (k - 1) ** 2 / 4.0 - (k * k - 1) / 12.0


# ----------------------------------------------------------------------------------------------
# Model-free numbers
# ----------------------------------------------------------------------------------------------


def _safe_log(values: np.ndarray) -> np.ndarray:
    """log of positive finite entries, NaN elsewhere."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(v) & (v > 0)
        return np.where(ok, np.log(np.where(ok, v, 1.0)), np.nan)


def local_log_slopes(log_curve: Any) -> np.ndarray:
    """d log m / dl per layer along the last axis: ``(log m[l+1] - log m[l-1]) / 2`` inside, one-sided
    differences at the first and last layer (``numpy.gradient``); NaN next to a missing value; a one-layer
    curve gives NaN."""
    y = np.asarray(log_curve, dtype=np.float64)
    if y.shape[-1] < 2:
        return np.full(y.shape, np.nan)
    return np.gradient(y, axis=-1)


def window_sensitivity(log_curve: Any, min_layers: int = SENSITIVITY_MIN_LAYERS) -> dict:
    """Range of the mean log-slope ``(log m[b] - log m[a]) / (b - a)`` over every window ``a..b`` with
    ``b - a + 1 >= min_layers``, ``a >= 1`` and ``b <= L - 2`` (skipping the first and the last layer):
    ``{"min", "max"}`` (natural log per layer), ``"min_percent"``/``"max_percent"`` = 100 (exp - 1), the windows
    where they occur and ``n_windows`` (0 and NaN when the curve has fewer than min_layers + 2 layers)."""
    y = np.asarray(log_curve, dtype=np.float64)
    n = y.size
    lo_a, hi_b = 1, n - 2
    a_idx, b_idx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ok = (a_idx >= lo_a) & (b_idx <= hi_b) & (b_idx - a_idx + 1 >= min_layers)
    with np.errstate(invalid="ignore"):
        slopes = np.where(ok, (y[None, :] - y[:, None]) / np.where(ok, b_idx - a_idx, 1), np.nan)
    valid = ok & np.isfinite(slopes)
    out: dict[str, Any] = {"min_layers": int(min_layers), "n_windows": int(valid.sum()), "min": math.nan,
                           "max": math.nan, "min_window": None, "max_window": None,
                           "min_percent": math.nan, "max_percent": math.nan}
    if valid.any():
        flat = np.where(valid, slopes, np.nan)
        i_min, i_max = np.unravel_index(np.nanargmin(flat), flat.shape), np.unravel_index(np.nanargmax(flat), flat.shape)
        out.update(min=float(flat[i_min]), max=float(flat[i_max]), min_window=[int(i_min[0]), int(i_min[1])],
                   max_window=[int(i_max[0]), int(i_max[1])], min_percent=100 * math.expm1(float(flat[i_min])),
                   max_percent=100 * math.expm1(float(flat[i_max])))
    return out


# ----------------------------------------------------------------------------------------------
# Fits
# ----------------------------------------------------------------------------------------------


def fit_growth(
    curves: Any,
    window: WindowSpec = None,
    weights: Any = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> GrowthFit:
    """Model-free growth numbers and a log-linear growth fit over an inclusive window a..b.

    Model-free: mean log-slope, last/first ratio, local log-slopes and the window-sensitivity band
    (:class:`GrowthFit`). m = weighted mean of the rows of ``curves`` (``weights`` per row, default equal);
    fit log m[l] = alpha + beta l (least squares, l = a..b), g = exp(beta), R^2 of that fit;
    endpoint g_end = (m[b]/m[a])^(1/(b-a)); curvature c from log m[l] = alpha + beta l + c l^2.
    CI: several rows -> percentile bootstrap over rows (n_boot resamples, rng = default_rng(seed));
    one row -> exp(beta +- t_{0.975,k-2} SE(beta)) and c +- t_{0.975,k-3} SE(c).
    The model-free numbers' CIs: the same bootstrap replicates over every layer (none for one curve).
    Growth laws: :func:`normgrowth.laws.fit_laws` on m (with the same bootstrap replicates). Warns when
    2..29 sequences feed the bootstrap.
    """
    arr, w = _prepare(curves, weights)
    n_rows, n_layers = arr.shape
    a, b = resolve_window(window, n_layers)
    _check_positive(arr, a, b)
    layers = np.arange(a, b + 1, dtype=np.float64)
    k = b - a + 1
    full_mean = weighted_mean(arr, w)
    log_full = _safe_log(full_mean)
    mean_curve = full_mean[a : b + 1]
    y = log_full[a : b + 1]

    line = fit_line(layers, y)
    slope = float(polyfit_rows(layers, y, 1)[1])  # the same projection as the bootstrap replicates' slopes
    endpoint = float((mean_curve[-1] / mean_curve[0]) ** (1.0 / (b - a)))
    curvature = float(polyfit_rows(layers, y, 2)[2]) if k >= 3 else float("nan")
    local = local_log_slopes(log_full)
    nan2 = (float("nan"), float("nan"))
    local_lo = local_hi = np.full(n_layers, np.nan)
    mls_ci = ratio_ci = nan2

    boot = None
    if n_rows >= 2:
        n_boot = _check_n_boot(n_boot)
        _warn_few_sequences(n_rows)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot_full = bootstrap_means(arr, w, n_boot, np.random.default_rng(seed))
        boot_log = _safe_log(boot_full)
        boot = boot_full[:, a : b + 1]
        boot_y = boot_log[:, a : b + 1]
        slope_ci = percentile_ci(polyfit_rows(layers, boot_y, 1)[:, 1])
        slope_lo, slope_hi = slope_ci.lo, slope_ci.hi
        if k >= 3:
            c_ci = percentile_ci(polyfit_rows(layers, boot_y, 2)[:, 2])
            c_lo, c_hi = c_ci.lo, c_ci.hi
        else:
            c_lo = c_hi = float("nan")
        local_ci = percentile_ci(local_log_slopes(boot_log))
        local_lo, local_hi = np.asarray(local_ci.lo), np.asarray(local_ci.hi)
        mls = percentile_ci((boot_y[:, -1] - boot_y[:, 0]) / (b - a))
        ratio = percentile_ci(boot_full[:, -1] / boot_full[:, 0])
        mls_ci, ratio_ci = (float(mls.lo), float(mls.hi)), (float(ratio.lo), float(ratio.hi))
        method, used_boot = CI_BOOTSTRAP, n_boot
    else:
        slope_lo, slope_hi = t_interval(slope, line.slope_se, line.df)
        if k >= 3:
            _, se_c, df_c = top_coefficient_se(layers, y, 2)
            c_lo, c_hi = t_interval(curvature, se_c, df_c)
        else:
            c_lo = c_hi = float("nan")
        method, used_boot = CI_SE, 0

    scale = curvature_effect_scale(k)
    effect = lambda c: math.exp(c * scale) - 1.0 if math.isfinite(c) else float("nan")  # noqa: E731
    g = math.exp(slope)
    with np.errstate(invalid="ignore", divide="ignore"):
        last_first = float(full_mean[-1] / full_mean[0]) if full_mean[0] > 0 else float("nan")
    return GrowthFit(
        window=(a, b),
        growth_factor=g,
        ci95=(float(np.exp(slope_lo)), float(np.exp(slope_hi))),
        percent_per_layer=100.0 * (g - 1.0),
        r2=float(line.r2),
        endpoint_growth_factor=endpoint,
        curvature=curvature,
        curvature_ci95=(float(c_lo), float(c_hi)),
        n_curves=int(n_rows),
        ci_method=method,
        n_boot=used_boot,
        curvature_effect=effect(curvature),
        curvature_effect_ci95=(effect(float(c_lo)), effect(float(c_hi))),
        curvature_tested=k >= MIN_CURVATURE_LAYERS,
        law=fit_laws(layers, mean_curve, boot_curves=boot),
        mean_log_slope=float((y[-1] - y[0]) / (b - a)),
        mean_log_slope_ci95=mls_ci,
        ratio_last_first=last_first,
        ratio_last_first_ci95=ratio_ci,
        local_slope=json_safe({"layers": list(range(n_layers)), "slope": local, "ci95_lo": local_lo,
                               "ci95_hi": local_hi}),
        window_sensitivity=json_safe(window_sensitivity(log_full)),
    )


def fit_site(res: "Results", site: str, window: Any = None, seed: int = 0) -> GrowthFit:
    """The growth fit the report prints for ``site``: :func:`fit_growth` of the per-sequence mean curves
    ``res.sites[site].seq_mean`` weighted by ``res.seq_n_tokens`` (so the fitted curve is the token-weighted mean
    curve), over ``window`` ("a:b" or (a, b); None: the default window), CIs by a percentile bootstrap over
    sequences (``DEFAULT_N_BOOT`` resamples, ``seed``)."""
    st = res.sites.get(site)
    if st is None:
        have = ", ".join(s for s, v in res.sites.items() if v is not None)
        raise NormgrowthError(f"no {site!r} statistics in this result: fit one of {have}.")
    return fit_growth(st.seq_mean, window=window or None, weights=res.seq_n_tokens, n_boot=DEFAULT_N_BOOT, seed=seed)


def layer_ratios(
    curves: Any, weights: Any = None, n_boot: int = DEFAULT_N_BOOT, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-layer growth ratio r[l-1] = m[l] / m[l-1], l = 1..n_layers-1, of the weighted mean curve m,
    with 95% percentile-bootstrap CIs over rows (NaN CIs for a single curve)."""
    arr, w = _prepare(curves, weights)
    n_rows, n_layers = arr.shape
    if n_layers < 2:
        raise NormgrowthError(f"layer ratios need at least 2 layers, the curve has {n_layers}; supply a longer curve.")
    _check_positive(arr, 0, n_layers - 1)
    m = weighted_mean(arr, w)
    ratio = m[1:] / m[:-1]
    if n_rows < 2:
        nan = np.full(n_layers - 1, np.nan)
        return ratio, nan, nan.copy()
    n_boot = _check_n_boot(n_boot)
    _warn_few_sequences(n_rows)
    boot = bootstrap_means(arr, w, n_boot, np.random.default_rng(seed))
    ci = percentile_ci(boot[:, 1:] / boot[:, :-1])
    return ratio, np.asarray(ci.lo), np.asarray(ci.hi)


def _slope_stats(
    curves: Any, weights: Any, window: WindowSpec, n_boot: int, rng: np.random.Generator, what: str
) -> dict:
    """Point slope of log m over the window plus bootstrap slopes (several rows) or SE and df (one row)."""
    arr, w = _prepare(curves, weights, what)
    a, b = resolve_window(window, arr.shape[1])
    _check_positive(arr, a, b, what=f"norm curve of {what}")
    layers = np.arange(a, b + 1, dtype=np.float64)
    sub = arr[:, a : b + 1]
    slope = float(polyfit_rows(layers, np.log(weighted_mean(sub, w)), 1)[1])
    out: dict = {"window": (a, b), "slope": slope, "n_curves": arr.shape[0], "boot": None}
    if arr.shape[0] >= 2:
        _warn_few_sequences(arr.shape[0])
        boot = polyfit_rows(layers, np.log(bootstrap_means(sub, w, n_boot, rng)), 1)[:, 1]
        out.update(boot=boot, se=float(np.std(boot, ddof=1)), df=math.inf)
    else:
        _, se, df = top_coefficient_se(layers, np.log(sub[0]), 1)
        out.update(se=se, df=float(df) if df > 0 else float("nan"))
    return out


def growth_difference(
    curves_a: Any,
    curves_b: Any,
    window: WindowSpec | tuple[WindowSpec, WindowSpec],
    weights_a: Any = None,
    weights_b: Any = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    paired: bool = False,
) -> dict:
    """Difference g_a - g_b and ratio g_a / g_b of log-linear growth factors with 95% CIs.

    ``window``: (a, b) or "a:b" used for both curves, None for each curve's default window, or a
    pair (window_a, window_b). Both sides with several rows: percentile bootstraps, paired when ``paired``
    (row s of A and row s of B come from the same sequence: one draw of sequence indices serves both, which
    needs the same number of rows) and independent otherwise (seeds spawned from ``seed``), CI from the quantiles of exp(beta_a*) - exp(beta_b*) and
    exp(beta_a* - beta_b*). Otherwise: SE(g_a - g_b) = sqrt((g_a se_a)^2 + (g_b se_b)^2) (delta method),
    SE(log ratio) = sqrt(se_a^2 + se_b^2), se = regression SE (one row) or bootstrap SD of beta
    (several rows, df = inf), t quantile with Welch-Satterthwaite df. significant: CI of the
    difference excludes 0.
    """
    if (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(w is None or isinstance(w, (str, tuple, list)) for w in window)
    ):
        window_a, window_b = window
    else:
        window_a = window_b = window
    n_boot = _check_n_boot(n_boot)
    if paired:
        n_a, n_b = np.shape(curves_a)[0] if np.ndim(curves_a) == 2 else 1, np.shape(curves_b)[0] if np.ndim(curves_b) == 2 else 1
        if n_a != n_b:
            raise NormgrowthError(f"a paired comparison needs the same sequences on both sides; got {n_a} and {n_b} "
                                  "curves: compare them unpaired.")
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)  # the same draws for both
    else:
        rng_a, rng_b = spawn_rngs(seed, 2)
    sa = _slope_stats(curves_a, weights_a, window_a, n_boot, rng_a, "curves_a")
    sb = _slope_stats(curves_b, weights_b, window_b, n_boot, rng_b, "curves_b")
    g_a, g_b = math.exp(sa["slope"]), math.exp(sb["slope"])
    diff, ratio = g_a - g_b, g_a / g_b

    if sa["boot"] is not None and sb["boot"] is not None:
        d_ci = percentile_ci(np.exp(sa["boot"]) - np.exp(sb["boot"]))
        r_ci = percentile_ci(np.exp(sa["boot"] - sb["boot"]))
        d_lo, d_hi, r_lo, r_hi = d_ci.lo, d_ci.hi, r_ci.lo, r_ci.hi
        n_nonfinite = int(d_ci.n_nonfinite)
        method = CI_DIFF_PAIRED if paired else CI_DIFF_BOOTSTRAP
    else:
        var_a, var_b = (g_a * sa["se"]) ** 2, (g_b * sb["se"]) ** 2
        d_lo, d_hi = t_interval(diff, math.sqrt(var_a + var_b), welch_satterthwaite_df([var_a, var_b], [sa["df"], sb["df"]]))
        lv_a, lv_b = sa["se"] ** 2, sb["se"] ** 2
        lr_lo, lr_hi = t_interval(
            math.log(ratio), math.sqrt(lv_a + lv_b), welch_satterthwaite_df([lv_a, lv_b], [sa["df"], sb["df"]])
        )
        r_lo, r_hi = math.exp(lr_lo), math.exp(lr_hi)
        n_nonfinite = 0
        method = CI_DIFF_SE
    d_lo, d_hi, r_lo, r_hi = (float(v) for v in (d_lo, d_hi, r_lo, r_hi))
    significant = excludes_zero((d_lo, d_hi))
    return {
        "window_a": list(sa["window"]),
        "window_b": list(sb["window"]),
        "growth_factor_a": g_a,
        "growth_factor_b": g_b,
        "difference": diff,
        "difference_ci95": json_safe([d_lo, d_hi]),
        "ratio": ratio,
        "ratio_ci95": json_safe([r_lo, r_hi]),
        "significant": significant,
        "ci_method": method,
        "n_curves_a": int(sa["n_curves"]),
        "n_curves_b": int(sb["n_curves"]),
        "n_boot": n_boot if (sa["boot"] is not None or sb["boot"] is not None) else 0,
        "n_nonfinite": n_nonfinite,
        "paired": bool(paired and method == CI_DIFF_PAIRED),
    }


# ----------------------------------------------------------------------------------------------
# Appendix-1 bound of the 2023 study
# ----------------------------------------------------------------------------------------------


def appendix1_bound(
    resid_pre_mean: Any, attn_out_mean: Any, mlp_out_mean: Any, resid_post_mean: Any
) -> dict[str, np.ndarray]:
    """Per-layer growth bound from the triangle inequality, on token means of L2 norms.

    growth_minus_1[l] = resid_post_mean[l] / resid_pre_mean[l] - 1;
    bound[l] = (attn_out_mean[l] + mlp_out_mean[l]) / resid_pre_mean[l];
    tightness = growth_minus_1 / bound (NaN where bound = 0); lower_bound = -bound;
    holds[l] = -bound (1 + eps) <= growth_minus_1 <= bound (1 + eps) up to rtol 1e-5 of the total.
    Valid exactly when all four means are over the same tokens (see docs/fit.md).
    """
    names = ("resid_pre_mean", "attn_out_mean", "mlp_out_mean", "resid_post_mean")
    arrays = []
    for name, val in zip(names, (resid_pre_mean, attn_out_mean, mlp_out_mean, resid_post_mean)):
        try:
            arr = np.asarray(val, dtype=np.float64)
        except (TypeError, ValueError):
            raise NormgrowthError(f"{name} must be a numeric array of mean norms per layer.") from None
        if arr.ndim != 1 or arr.size == 0:
            raise NormgrowthError(f"{name} must be a 1-D array [n_layers]; got shape {arr.shape}.")
        arrays.append(arr)
    if len({arr.shape for arr in arrays}) != 1:
        raise NormgrowthError(
            "resid_pre_mean, attn_out_mean, mlp_out_mean and resid_post_mean must have the same length "
            f"(got {[arr.size for arr in arrays]}); pass per-layer means from the same run."
        )
    for name, arr in zip(names, arrays):
        bad = ~np.isfinite(arr) | (arr <= 0 if name == "resid_pre_mean" else arr < 0)
        if bad.any():
            layer = int(np.argmax(bad))
            need = "positive" if name == "resid_pre_mean" else "non-negative"
            raise NormgrowthError(
                f"{name} at layer {layer} is {arr[layer]!r}; mean norms must be finite and {need}."
            )
    pre, attn, mlp, post = arrays
    growth_minus_1 = post / pre - 1.0
    bound = (attn + mlp) / pre
    with np.errstate(divide="ignore", invalid="ignore"):
        tightness = np.where(bound > 0, growth_minus_1 / np.where(bound > 0, bound, 1.0), np.nan)
    slack = _HOLDS_RTOL * (pre + attn + mlp) / pre
    holds = (growth_minus_1 <= bound + slack) & (growth_minus_1 >= -bound - slack)
    return {
        "growth_minus_1": growth_minus_1,
        "bound": bound,
        "tightness": tightness,
        "lower_bound": -bound,
        "holds": holds,
    }


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------


def curvature_flag(fit: GrowthFit) -> str:
    """'faster than exponential' if the curvature CI is above 0, 'slower ...' if below, else ''; always ''
    for windows of fewer than 5 layers (a quadratic through 3 or 4 points says nothing about the law)."""
    if not fit.curvature_tested:
        return ""
    lo, hi = fit.curvature_ci95
    if math.isfinite(lo) and lo > 0:
        return "faster than exponential"
    if math.isfinite(hi) and hi < 0:
        return "slower than exponential"
    return ""


def sensitivity_text(fit: GrowthFit) -> str:
    """``"+1.2..+2.7"``: the window-sensitivity band in % per layer ('' when no window qualifies)."""
    ws = fit.window_sensitivity or {}
    if not ws.get("n_windows"):
        return ""
    return f"{fmt_number(ws.get('min_percent'), '+.2f')}..{fmt_number(ws.get('max_percent'), '+.2f')}"


def format_fit_table(fits: dict[str, GrowthFit]) -> str:
    """Plain-text table, one row per site. Model-free numbers first: mean log-slope as % per layer [95% CI], its
    window-sensitivity band, last/first norm ratio; then the least-squares growth factor g [95% CI], the
    curvature's effect at the window ends, window, curves; last the law (a secondary interpretation) with the
    rejected laws, and notes (curvature flag when its CI excludes 0 on a window of >= 5 layers)."""
    header = ["site", "mean %/layer [95% CI]", "band (windows>=5)", "last/first", "LS g/layer [95% CI]",
              "curv. effect", "window", "curves", "law (interpretation)", "note"]
    rows = []
    for site, fit in fits.items():
        mls_ci = [100 * math.expm1(v) if math.isfinite(v) else math.nan for v in fit.mean_log_slope_ci95]
        law = law_label(fit.law).replace("exponential", "exp.")
        rejected = rejected_text(fit.law).replace("exponential", "exp.")
        rows.append([
            str(site),
            with_ci(fit.mean_percent_per_layer, mls_ci, "+.2f"),
            sensitivity_text(fit),
            fmt_number(fit.ratio_last_first, ".3g"),
            with_ci(fit.growth_factor, fit.ci95, ".4f"),
            fmt_number(100 * fit.curvature_effect, "+.1f") + "%",
            f"{fit.window[0]}:{fit.window[1]}",
            str(fit.n_curves),
            law + (f"; {rejected}" if rejected else ""),
            curvature_flag(fit),
        ])
    lines = text_table(header, rows)
    ci_methods = sorted({fit.ci_method for fit in fits.values()})
    if ci_methods:
        lines.append(f"CI: {'; '.join(ci_methods)}. mean %/layer = 100 (exp(s) - 1), s = (log n[b] - log n[a]) / (b - a); "
                     "band = range of s over every window of >= 5 layers skipping the first and last layer; "
                     "last/first = n[L-1] / n[0]; LS g = exp(least-squares slope of log n); curv. effect = quadratic vs "
                     "exponential fit at the window ends; law: exp./linear/power/saturating, none or undecided "
                     "(docs/fit.md), power exponents are not comparable across models.")
    return "\n".join(lines)
