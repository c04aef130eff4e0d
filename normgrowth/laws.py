"""Which growth law describes a norm curve (pure numpy/scipy, no model code). A secondary, labelled
interpretation of a curve; the model-free numbers of :mod:`normgrowth.fit` come first.

Over an inclusive window of layers ``l = a..b`` (``k`` layers, ``u = l - a``) four laws are fitted to the
mean curve ``m[l]`` by least squares in log space, ``rss_log = sum_l (log m[l] - log fit[l])^2``:

* exponential (2 parameters): ``n = n_a g^u``;
* linear      (2 parameters): ``n = n_a + q u``;
* power       (3 parameters): ``n = A (l + l0)^k`` with a free origin ``l0 > -a``;
* saturating  (3 parameters): ``n = c - d exp(-u / tau)``, ``tau > 0``.

Decision (docs/fit.md, "Which growth law"):

1. Lack of fit. Each law's ``rss_log`` is compared with what noise alone leaves after that law's fit:
   several curves: the bootstrap replicates of the mean curve projected onto the law's residual space
   (linearised at the fit), so the correlation of layers across depth is kept; one curve: an F test
   against a polynomial reference in log space. A law is ``rejected`` when ``p < ALPHA / 4`` (Bonferroni
   over the four laws). All four rejected: ``best = "none"``.
2. Nested laws: the power law contains the linear one (``k = 1``) and tends to the exponential as
   ``l0 -> inf``; the saturating law tends to the linear one as ``tau -> inf``. When both laws of such a pair
   are left, the 3-parameter law replaces the 2-parameter one only if it fits significantly better
   (``p < ALPHA_NESTED``, same noise model; the 2-parameter law is then rejected), and it reduces to the
   2-parameter law (parsimony) when ``p >= P_REDUCE`` and that law is not rejected; in between both stay.
3. One law left after rejections and reductions: decided. Several: ``"undecided"``; the candidate with the smallest AICc (on log-space
   residuals; with the bootstrap noise variance for several curves) is reported as the leader, with each
   law's leave-one-layer-out and forward-split (fit the first 2/3, predict the rest) errors. Windows of
   fewer than ``MIN_LAYERS`` layers are always undecided (rejections are still reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from scipy import stats

from .numerics import ols_covariance, percentile_ci, t_interval
from .storage import as_float, json_safe
from .tables import fmt_number, text_table, with_ci

LAWS = ("exponential", "linear", "power", "saturating")
UNDECIDED = "undecided"
NONE = "none"
N_PARAMS = {"exponential": 2, "linear": 2, "power": 3, "saturating": 3}
# The rate parameter of each law; the power exponent depends on the fitted origin (never compare it across models).
RATE_PARAM = {"exponential": "growth_factor", "linear": "relative_slope", "power": "exponent", "saturating": "scale"}
# (3-parameter law, 2-parameter law it contains): power -> exponential as l0 -> inf and = linear at k = 1;
# saturating -> linear as tau -> inf
NESTED = (("power", "exponential"), ("power", "linear"), ("saturating", "linear"))
MIN_LAYERS = 8  # shorter windows: no law is decided
ALPHA = 0.05  # lack of fit: family-wise over the four laws (Bonferroni)
ALPHA_NESTED = 0.01  # a 3-parameter law replaces a 2-parameter law it contains only when p < this
P_REDUCE = 0.2  # ... and reduces to it only when p >= this (in between both stay: undecided)
FORWARD_SHARE = 2 / 3  # the forward split fits this share of the window's first layers
NOISE_BOOTSTRAP = "bootstrap over sequences (replicates projected on each law's residual space)"
NOISE_POLY = "one curve: F test against a degree-{d} polynomial in log space"
LAW_MEANINGS = {
    "exponential": "compounding growth: each layer multiplies the norm by a constant factor",
    "linear": "constant-size writes adding up in a shared direction: the norm grows by a constant amount per layer",
    "power": "n ~ (l + l0)^k with a fitted origin l0; k = 1/2 with l0 fixed at the first write would be independent "
             "writes of constant size",
    "saturating": "growth that levels off towards an asymptote",
    NONE: "no law fits within the noise",
}
_POWER_ORIGINS = np.geomspace(0.05, 1e4, 64)  # l0 + a grid (layers) for the power law's starting value
_SAT_SCALES = np.geomspace(0.2, 1e4, 64)  # tau grid (layers) for the saturating law's starting value
_NULL_REPS = 400  # bootstrap replicates used for the nested tests' null distribution
_PROFILE_ORIGINS = np.geomspace(0.05, 1e5, 48)  # profile grids of the nested tests
_PROFILE_SCALES = np.geomspace(0.2, 1e5, 48)
_MAX_LOG_SCALE = math.log(1e7)  # l0 + a and tau are kept below 1e7 layers (the 2-parameter limits)


# ----------------------------------------------------------------------------------------------
# the four laws: log n(u; theta), its Jacobian, reported parameters
# ----------------------------------------------------------------------------------------------
def _log_model(law: str, theta: np.ndarray, u: np.ndarray) -> np.ndarray:
    """log n at ``u = l - a`` (NaN where the law is not positive). theta: exponential (log n_a, log g);
    linear (n_a, q); power (log A, k, log(l0 + a)); saturating (c, d, log tau)."""
    with np.errstate(all="ignore"):
        if law == "exponential":
            return theta[0] + theta[1] * u
        if law == "linear":
            n = theta[0] + theta[1] * u
        elif law == "power":
            return theta[0] + theta[1] * np.log(u + np.exp(theta[2]))
        else:
            n = theta[0] - theta[1] * np.exp(-u / np.exp(theta[2]))
        return np.where(n > 0, np.log(np.where(n > 0, n, 1.0)), np.nan)


def _jacobian(law: str, theta: np.ndarray, u: np.ndarray) -> np.ndarray:
    """d log n / d theta, ``[k, p]``."""
    if law == "exponential":
        return np.stack([np.ones_like(u), u], axis=1)
    if law == "linear":
        n = theta[0] + theta[1] * u
        return np.stack([1 / n, u / n], axis=1)
    if law == "power":
        z = u + np.exp(theta[2])
        return np.stack([np.ones_like(u), np.log(z), theta[1] * np.exp(theta[2]) / z], axis=1)
    tau = np.exp(theta[2])
    e = np.exp(-u / tau)
    n = theta[0] - theta[1] * e
    return np.stack([1 / n, -e / n, -theta[1] * e * u / tau / n], axis=1)


def _params(law: str, theta: np.ndarray, a: float) -> dict[str, np.ndarray]:
    """Reported parameters from ``theta`` (``[..., p]``, vectorised); ``a`` = the window's first layer."""
    t = np.asarray(theta, dtype=np.float64)
    with np.errstate(all="ignore"):
        if law == "exponential":
            return {"growth_factor": np.exp(t[..., 1]), "amplitude": np.exp(t[..., 0] - a * t[..., 1])}
        if law == "linear":
            return {"intercept": t[..., 0] - a * t[..., 1], "slope": t[..., 1],
                    "relative_slope": t[..., 1] / t[..., 0]}
        if law == "power":
            return {"exponent": t[..., 1], "origin": np.exp(t[..., 2]) - a, "amplitude": np.exp(t[..., 0])}
        tau = np.exp(t[..., 2])
        return {"asymptote": t[..., 0], "drop": t[..., 1], "scale": tau}


def law_curve(law: str, params: dict, layers: Any) -> np.ndarray:
    """The fitted norm ``n(l)`` of one law at ``layers`` from its JSON ``params`` (NaN where undefined)."""
    x = np.asarray(layers, dtype=np.float64)
    p = {k: as_float(v) for k, v in params.items()}
    with np.errstate(all="ignore"):
        if law == "exponential":
            return p["amplitude"] * p["growth_factor"] ** x
        if law == "linear":
            return p["intercept"] + p["slope"] * x
        if law == "power":
            return p["amplitude"] * (x + p["origin"]) ** p["exponent"]
        if law == "saturating":
            a = as_float(params.get("window_start", 0.0))
            return p["asymptote"] - p["drop"] * np.exp(-(x - a) / p["scale"])
    raise ValueError(f"unknown growth law {law!r}; expected one of {LAWS}")


# ----------------------------------------------------------------------------------------------
# least squares in log space
# ----------------------------------------------------------------------------------------------
def _rss(law: str, theta: np.ndarray, u: np.ndarray, y: np.ndarray) -> float:
    r = y - _log_model(law, theta, u)
    return float(r @ r) if np.all(np.isfinite(r)) else math.inf


def _wls(design: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Least squares of ``m`` on ``design`` with weights 1 / m^2 (log-space least squares to first order)."""
    return np.linalg.lstsq(design / m[:, None], np.ones_like(m), rcond=None)[0]


def _start(law: str, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Starting values: exact for the exponential; profile grids for the 3-parameter laws."""
    m = np.exp(y)
    if law == "exponential":
        return np.linalg.lstsq(np.stack([np.ones_like(u), u], 1), y, rcond=None)[0]
    if law == "linear":
        return _wls(np.stack([np.ones_like(u), u], 1), m)
    if law == "power":
        z = u[None, :] + _POWER_ORIGINS[:, None]  # [grid, k]
        lz = np.log(z)
        lzc = lz - lz.mean(1, keepdims=True)
        k = (lzc * (y - y.mean())).sum(1) / (lzc**2).sum(1)
        c = y.mean() - k * lz.mean(1)
        rss = ((y - c[:, None] - k[:, None] * lz) ** 2).sum(1)
        i = int(np.argmin(rss))
        return np.array([c[i], k[i], math.log(_POWER_ORIGINS[i])])
    e = np.exp(-u[None, :] / _SAT_SCALES[:, None])  # [grid, k]
    # weighted least squares of m on [1, -e] with weights 1 / m^2: 2x2 normal equations per grid value
    w = 1.0 / m**2
    s11, s1e, see = w.sum(), (w * -e).sum(1), (w * e * e).sum(1)
    t1, te = (w * m).sum(), (w * m * -e).sum(1)
    det = s11 * see - s1e**2
    with np.errstate(all="ignore"):
        c = (see * t1 - s1e * te) / det
        d = (s11 * te - s1e * t1) / det
        n = c[:, None] - d[:, None] * e
        rss = np.where(np.all(n > 0, axis=1) & np.isfinite(det) & (det > 0),
                       ((y - np.log(np.where(n > 0, n, 1.0))) ** 2).sum(1), np.inf)
    i = int(np.argmin(rss))
    if not np.isfinite(rss[i]):
        return np.array([m.max() * 1.1, m.max(), math.log(max(u[-1], 1.0))])
    return np.array([c[i], d[i], math.log(_SAT_SCALES[i])])


def _refine(law: str, theta: np.ndarray, u: np.ndarray, y: np.ndarray, iters: int = 30) -> tuple[np.ndarray, float]:
    """Levenberg-Marquardt on ``rss_log`` from ``theta``; log-scale parameters kept below ``_MAX_LOG_SCALE``."""
    cur = _rss(law, theta, u, y)
    if law == "exponential" or not math.isfinite(cur):
        return theta, cur
    lam = 1e-3
    for _ in range(iters):
        jac = _jacobian(law, theta, u)
        r = y - _log_model(law, theta, u)
        jtj = jac.T @ jac
        try:
            step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), jac.T @ r)
        except np.linalg.LinAlgError:
            break
        new = theta + step
        if law in ("power", "saturating"):
            new[2] = min(new[2], _MAX_LOG_SCALE)
        new_rss = _rss(law, new, u, y)
        if new_rss < cur:
            done = cur - new_rss <= 1e-9 * max(cur, 1e-300)
            theta, cur, lam = new, new_rss, lam / 3
            if done:
                break
        else:
            lam *= 5
            if lam > 1e10:
                break
    return theta, cur


def fit_law(law: str, u: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """``(theta, rss_log)`` of one law fitted to log values ``y`` at ``u = l - a`` (rss inf when it fails)."""
    if u.size <= N_PARAMS[law] - 1:
        return np.full(N_PARAMS[law], np.nan), math.inf
    return _refine(law, _start(law, u, y), u, y)


def _residual_projector(jac: np.ndarray) -> np.ndarray:
    """``I - J J^+``: the part of a log-space perturbation a linearised refit does not absorb."""
    return np.eye(jac.shape[0]) - jac @ np.linalg.pinv(jac)


def _profile_rss(law: str, u: np.ndarray, logs: np.ndarray, m_ref: np.ndarray) -> np.ndarray:
    """Residual sums of squares ``[n]`` of ``law`` fitted to each row of ``logs`` (``[n, k]`` log curves), profiled
    over a grid of its nonlinear parameter (power: l0; saturating: tau), to first order in log space: the
    exponential and power laws by least squares on log n (exact for a fixed l0), the linear and saturating laws by
    least squares on ``n / m_ref`` (weights 1 / m_ref^2; fixed tau), ``m_ref`` a positive reference curve."""
    one = np.ones_like(u)
    if law == "exponential":
        designs, z = [np.stack([one, u], 1)], logs
    elif law == "power":
        designs, z = [np.stack([one, np.log(u + o)], 1) for o in _PROFILE_ORIGINS], logs
    elif law == "linear":
        designs, z = [np.stack([one, u], 1) / m_ref[:, None]], np.exp(logs) / m_ref
    else:
        designs = [np.stack([one, -np.exp(-u / t)], 1) / m_ref[:, None] for t in _PROFILE_SCALES]
        z = np.exp(logs) / m_ref
    basis = np.linalg.qr(np.stack(designs))[0]  # [g, k, 2] orthonormal columns
    total = (z**2).sum(-1)
    explained = ((z[None, :, :] @ basis) ** 2).sum(-1)  # [g, n]
    return total - explained.max(axis=0)


def _aicc(rss: float, k: int, p: int, sigma2: Optional[float]) -> float:
    """AICc: ``rss / sigma2 + 2p + 2p(p+1)/(k-p-1)`` with a known noise variance (several curves), else
    ``k log(rss / k) + 2p' + 2p'(p'+1)/(k-p'-1)`` with ``p' = p + 1`` (the variance is estimated)."""
    if sigma2 is None:
        p += 1
    if k - p - 1 <= 0 or not math.isfinite(rss):
        return math.inf
    core = rss / sigma2 if sigma2 is not None else k * math.log(max(rss, 1e-300) / k)
    return core + 2 * p + 2 * p * (p + 1) / (k - p - 1)


def _poly_reference(u: np.ndarray, y: np.ndarray) -> tuple[Optional[int], float]:
    """(degree, rss) of the polynomial reference in log space for one curve: degree 5 from 12 layers on,
    degree 4 from 9, None below (no single-curve lack-of-fit test)."""
    k = u.size
    deg = 5 if k >= 12 else (4 if k >= 9 else None)
    if deg is None:
        return None, math.nan
    uc = (u - u.mean()) / max(np.ptp(u), 1.0)
    design = np.stack([uc**p for p in range(deg + 1)], axis=1)
    r = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    return deg, float(r @ r)


# ----------------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------------
@dataclass
class LawFit:
    """The four laws fitted over one window, the decision and what supports it.

    Held in strict-JSON form (non-finite numbers as None). ``laws[name] = {"params", "ci95": {rate parameter: [lo, hi]}, "rss_log", "cv_log", "forward_log", "aicc",
    "lack_of_fit_p", "n_params"}``; ``best``: a law, ``"none"`` or ``"undecided"``; ``rejected``: one entry per
    rejected law ``{"law", "rss_ratio" (its rss_log over the smallest), "p_value", "test"}``, filled even when
    undecided; ``support``: leader, candidates, noise model, thresholds and why undecided.
    """

    window: tuple[int, int]
    laws: dict[str, dict[str, Any]]
    best: str
    rejected: list[dict[str, Any]] = field(default_factory=list)
    support: dict[str, Any] = field(default_factory=dict)

    @property
    def leader(self) -> Optional[str]:
        """The candidate with the smallest AICc, decided or not (None when every law is rejected)."""
        return self.support.get("leader")

    @property
    def rejected_laws(self) -> list[str]:
        return [r["law"] for r in self.rejected]

    def rate(self, law: Optional[str] = None) -> tuple[str, float, tuple[float, float]]:
        """(parameter name, value, 95 % CI) of ``law``'s rate parameter (default: the leader)."""
        law = law or self.leader or "exponential"
        name = RATE_PARAM[law]
        entry = self.laws[law]
        lo, hi = entry["ci95"].get(name, [None, None])
        return name, as_float(entry["params"].get(name)), (as_float(lo), as_float(hi))

    def to_json(self) -> dict:
        """``{"best", "window", "laws", "rejected", "support"}`` in strict JSON (non-finite numbers -> None)."""
        return json_safe({"best": self.best, "window": list(self.window), "laws": self.laws,
                          "rejected": self.rejected, "support": self.support})

    @classmethod
    def from_json(cls, data: dict) -> "LawFit":
        return cls(window=tuple(int(v) for v in data.get("window", (0, 0))), laws=dict(data["laws"]),
                   best=str(data["best"]), rejected=list(data.get("rejected", [])),
                   support=dict(data.get("support", {})))


def _safe_exp(v: float) -> float:
    """exp(v), infinite instead of an overflow."""
    return math.exp(v) if v < 709.0 else math.inf


def _rate_ci_one_curve(law: str, theta: np.ndarray, jac: np.ndarray, resid: np.ndarray, a: float) -> list[float]:
    """Linearised OLS interval of the rate parameter for one curve: ``cov = s^2 (J'J)^-1``, ``s^2 = rss / (k - p)``
    (:func:`normgrowth.numerics.ols_covariance` of the residuals on the Jacobian), t quantile with k - p df; a
    monotone transform of a theta component, else the delta method."""
    k, p = jac.shape
    if k - p <= 0 or not np.all(np.isfinite(resid)):
        return [math.nan, math.nan]
    _, cov, _ = ols_covariance(jac, resid)
    name = RATE_PARAM[law]
    direct: dict[str, tuple[int, Callable[[float], float]]] = {
        "exponential": (1, _safe_exp), "power": (1, float), "saturating": (2, _safe_exp)}
    if law in direct:
        i, f = direct[law]
        lo, hi = t_interval(float(theta[i]), math.sqrt(max(cov[i, i], 0.0)), k - p)
        return [f(lo), f(hi)] if math.isfinite(lo) else [math.nan, math.nan]
    grad = np.zeros(p)
    base = float(_params(law, theta, a)[name])
    for i in range(p):
        h = 1e-6 * max(abs(theta[i]), 1e-8)
        t2 = theta.copy()
        t2[i] += h
        grad[i] = (float(_params(law, t2, a)[name]) - base) / h
    return list(t_interval(base, math.sqrt(max(float(grad @ cov @ grad), 0.0)), k - p))


def fit_laws(layers: Any, mean_curve: Any, boot_curves: Optional[np.ndarray] = None) -> LawFit:
    """Fit the four laws to ``mean_curve`` (positive) over ``layers`` (consecutive) and decide (module docstring).

    ``boot_curves`` (``[n_boot, k]`` bootstrap replicates of the mean curve over sequences): the noise model of
    the lack-of-fit and limit tests and of AICc, and the parameters' CIs (percentiles of the replicates'
    linearised refits ``theta + J^+ (log m* - log m)``). Without them (one curve): an F test against a
    polynomial reference, least-squares AICc, and linearised OLS t intervals.
    """
    x = np.asarray(layers, dtype=np.float64)
    m = np.asarray(mean_curve, dtype=np.float64)
    y = np.log(m)
    k, a = x.size, float(x[0])
    u = x - a
    boot = None if boot_curves is None else np.log(np.asarray(boot_curves, dtype=np.float64))
    dev = None if boot is None else boot - boot.mean(axis=0)
    n_fwd = int(round(FORWARD_SHARE * k))

    fits: dict[str, dict[str, Any]] = {}
    for law in LAWS:
        theta, rss = fit_law(law, u, y)
        ok = math.isfinite(rss)
        jac = _jacobian(law, theta, u) if ok else np.full((k, N_PARAMS[law]), np.nan)
        ok = ok and bool(np.all(np.isfinite(jac)))
        entry: dict[str, Any] = {"theta": theta, "rss": rss if ok else math.inf, "jac": jac, "ok": ok}
        if ok:
            proj = _residual_projector(jac)
            entry["proj"] = proj
            hat = 1.0 - np.diag(proj)
            r = y - _log_model(law, theta, u)
            with np.errstate(all="ignore"):
                entry["cv"] = float(np.sum((r / (1.0 - hat)) ** 2)) if np.all(hat < 1 - 1e-9) else math.inf
            if n_fwd >= N_PARAMS[law] + 1 and k - n_fwd >= 1:
                th_f, rss_f = fit_law(law, u[:n_fwd], y[:n_fwd])
                pred = _log_model(law, th_f, u[n_fwd:]) if math.isfinite(rss_f) else np.full(k - n_fwd, np.nan)
                entry["fwd"] = float(np.sum((y[n_fwd:] - pred) ** 2)) if np.all(np.isfinite(pred)) else math.inf
            else:
                entry["fwd"] = math.nan
        else:
            entry.update(cv=math.inf, fwd=math.inf)
        fits[law] = entry

    # noise model
    if dev is not None:
        null = {law: ((dev @ f["proj"]) ** 2).sum(1) for law, f in fits.items() if f["ok"]}
        sigma2 = float(null["exponential"].mean()) / max(k - 2, 1) if "exponential" in null else None
        noise = NOISE_BOOTSTRAP

        def lof_p(law: str) -> float:
            return float((1 + np.sum(null[law] >= fits[law]["rss"])) / (null[law].size + 1))

        def limit_p(law: str, simple: str) -> float:
            """Parametric bootstrap: the simple law's fit plus bootstrap deviations, both laws profiled."""
            y0 = _log_model(simple, fits[simple]["theta"], u)
            m_ref = np.exp(y0)
            curves = np.vstack([y[None, :], y0 + dev[:_NULL_REPS]])
            gain = _profile_rss(simple, u, curves, m_ref) - _profile_rss(law, u, curves, m_ref)
            return float((1 + np.sum(gain[1:] >= gain[0])) / (gain[1:].size + 1))
    else:
        deg, rss_ref = _poly_reference(u, y)
        sigma2 = None
        noise = NOISE_POLY.format(d=deg) if deg is not None else "one curve: too few layers for a lack-of-fit test"

        def lof_p(law: str) -> float:
            p = N_PARAMS[law]
            if deg is None:
                return math.nan
            df1, df2 = deg + 1 - p, k - deg - 1
            if rss_ref <= 0:
                return 0.0 if fits[law]["rss"] > 1e-24 else 1.0
            f_stat = max(fits[law]["rss"] - rss_ref, 0.0) / df1 / (rss_ref / df2)
            return float(stats.f.sf(f_stat, df1, df2))

        def limit_p(law: str, simple: str) -> float:
            df2 = k - N_PARAMS[law]
            if df2 <= 0:
                return math.nan
            rss_c = fits[law]["rss"]
            gain = max(fits[simple]["rss"] - rss_c, 0.0)
            if rss_c <= 0:
                return 0.0 if gain > 0 else 1.0
            return float(stats.f.sf(gain / (rss_c / df2), 1, df2))

    finite_rss = [f["rss"] for f in fits.values() if math.isfinite(f["rss"])]
    rss_min = min(finite_rss) if finite_rss else math.nan
    laws_out: dict[str, dict[str, Any]] = {}
    rejected: list[dict[str, Any]] = []
    lof_alpha = ALPHA / len(LAWS)
    for law, f in fits.items():
        p_lof = lof_p(law) if f["ok"] else 0.0
        f["p_lof"] = p_lof
        f["aicc"] = _aicc(f["rss"], k, N_PARAMS[law], sigma2)
        params = {n: float(v) for n, v in _params(law, f["theta"], a).items()} if f["ok"] else {}
        if law == "saturating" and params:
            params["window_start"] = a
        laws_out[law] = {"params": params, "ci95": {}, "rss_log": f["rss"], "cv_log": f["cv"], "forward_log": f["fwd"],
                         "aicc": f["aicc"], "lack_of_fit_p": p_lof, "n_params": N_PARAMS[law]}
        if f["ok"] and dev is not None:
            theta_b = f["theta"] + (boot - y) @ np.linalg.pinv(f["jac"]).T
            for n, vals in _params(law, theta_b, a).items():
                ci = percentile_ci(vals)
                laws_out[law]["ci95"][n] = [ci.lo, ci.hi]
        elif f["ok"]:
            resid = y - _log_model(law, f["theta"], u)
            laws_out[law]["ci95"][RATE_PARAM[law]] = _rate_ci_one_curve(law, f["theta"], f["jac"], resid, a)
        if k <= N_PARAMS[law]:
            pass  # as many parameters as layers: nothing to test, the law is left out
        elif not f["ok"]:
            rejected.append({"law": law, "rss_ratio": math.inf, "p_value": 0.0,
                             "test": "the fitted law is not positive over the window"})
        elif p_lof < lof_alpha:
            rejected.append({"law": law, "rss_ratio": f["rss"] / rss_min if rss_min > 0 else math.inf, "p_value": p_lof,
                             "test": f"lack of fit beyond the noise (p < {lof_alpha:.4g})"})

    rejected_names = {r["law"] for r in rejected}
    untestable = {law for law in LAWS if k <= N_PARAMS[law]}
    candidates = [law for law in LAWS if law not in rejected_names and law not in untestable]
    nested: dict[str, Any] = {}
    for law, simple in NESTED:
        if law in candidates and simple in candidates:
            p = limit_p(law, simple)
            nested[f"{law} vs {simple}"] = p
            if p < ALPHA_NESTED and simple not in {r["law"] for r in rejected}:
                f = fits[simple]
                rejected.append({"law": simple, "rss_ratio": f["rss"] / rss_min if rss_min > 0 else math.inf,
                                 "p_value": p, "test": f"{law} improves on it significantly (p < {ALPHA_NESTED})"})
    viable = [law for law in LAWS if law not in {r["law"] for r in rejected} and law not in untestable]
    # a 3-parameter law that does not improve significantly on a viable 2-parameter law it contains reduces to it
    reducible = {law for law, simple in NESTED
                 if law in viable and simple in viable and nested.get(f"{law} vs {simple}", 1.0) >= P_REDUCE}
    candidates = [law for law in viable if law not in reducible]

    reasons: list[str] = []
    pool = candidates
    leader = min(pool, key=lambda law: (fits[law]["aicc"], fits[law]["cv"])) if pool else None
    if not candidates and len(untestable) == len(LAWS):
        reasons.append(f"window has {k} layers: no law can be tested")
        best = UNDECIDED
    elif not candidates:
        best = NONE
    else:
        if k < MIN_LAYERS:
            reasons.append(f"window has {k} layers (< {MIN_LAYERS})")
        if len(candidates) > 1:
            reasons.append(f"{', '.join(candidates)} all fit within the noise")
        best = leader if not reasons else UNDECIDED
    finite = [law for law in LAWS if math.isfinite(fits[law]["aicc"])]
    support = {
        "leader": leader,
        "closest": min(finite, key=lambda law: fits[law]["aicc"]) if finite else None,
        "candidates": candidates,
        "criterion": "decided when the lack-of-fit and nested tests leave one law; the leader is the candidate with "
                     "the smallest AICc (then leave-one-layer-out error)",
        "noise": noise,
        "sigma2_log": sigma2,
        "viable": viable,
        "nested_p": nested,
        "rss_ratio_to_leader": {law: (fits[law]["rss"] / fits[leader]["rss"] if leader and fits[leader]["rss"] > 0
                                      else math.nan) for law in LAWS},
        "thresholds": {"min_layers": MIN_LAYERS, "alpha_lack_of_fit_each": lof_alpha, "alpha_nested": ALPHA_NESTED, "p_reduce": P_REDUCE,
                       "forward_share": FORWARD_SHARE},
        "undecided_because": reasons,
    }
    return LawFit(window=(int(x[0]), int(x[-1])), laws=json_safe(laws_out), best=best, rejected=json_safe(rejected),
                  support=json_safe(support))


# ----------------------------------------------------------------------------------------------
# comparing two fits and printing
# ----------------------------------------------------------------------------------------------
def compare_laws(fit_a: dict, fit_b: dict) -> dict:
    """Whether two GrowthFit JSON objects' laws can be compared, and how.

    Both decided for the same exponential or linear law: the difference of that law's rate parameter
    (growth factor or relative slope) is meaningful and left to the caller (its CI needs the sequences).
    Power: never compared, because the exponent depends on the fitted origin, which differs between fits.
    Saturating, different, none or undecided laws: not compared.
    """
    def law_of(fit: dict) -> str:
        law = fit.get("law")
        return UNDECIDED if not law else str(law.get("best", UNDECIDED))

    law_a, law_b = law_of(fit_a), law_of(fit_b)
    out: dict[str, Any] = {"law_a": law_a, "law_b": law_b, "comparable": False, "law": None, "parameter": None}
    if law_a != law_b:
        out["note"] = f"laws differ ({law_a} vs {law_b}): law rates are not compared"
    elif law_a == "power":
        out["note"] = ("both power, but each fit has its own origin l0 and the exponent depends on it: exponents "
                       "are not compared (only fits with the same fixed origin by construction could be)")
    elif law_a in ("exponential", "linear"):
        out.update(comparable=True, law=law_a, parameter=RATE_PARAM[law_a], note=f"both {law_a}")
    else:
        out["note"] = f"both {law_a}: law rates are not compared"
    return json_safe(out)


def rejected_text(law: Optional[LawFit]) -> str:
    """``"exponential rejected (RSS x4.2)"``, comma-separated; '' when nothing is rejected."""
    if law is None:
        return ""
    return ", ".join(f"{r['law']} rejected (RSS x{fmt_number(r.get('rss_ratio'), '.1f', 'inf')})" for r in law.rejected)


def law_label(law: Optional[LawFit]) -> str:
    """Short text for a table cell: ``"linear"``, ``"none"`` or ``"undecided (power?)"``."""
    if law is None:
        return ""
    if law.best == NONE:
        closest = law.support.get("closest")
        return f"none (closest: {closest})" if closest else NONE
    if law.best != UNDECIDED:
        return law.best
    return f"undecided ({law.leader}?)" if law.leader else UNDECIDED


def format_law_table(laws: dict[str, LawFit]) -> str:
    """One row per (curve, law): rate parameter [95 % CI], rss_log and its ratio to the leader's, lack-of-fit p,
    AICc, leave-one-layer-out and forward-split errors; then each curve's decision and rejections."""
    header = ["curve", "law", "rate parameter [95% CI]", "rss_log", "/leader", "lack-of-fit p", "AICc", "cv_log",
              "forward_log"]
    rows, verdicts = [], []
    for key, lf in laws.items():
        for law in LAWS:
            name, val, ci = lf.rate(law)
            e = lf.laws[law]
            mark = " *" if law == lf.leader else (" (rejected)" if law in lf.rejected_laws else "")
            rows.append([str(key), law + mark, f"{name} {with_ci(val, ci, '.4g')}", fmt_number(e["rss_log"], ".4g"),
                         fmt_number(lf.support.get("rss_ratio_to_leader", {}).get(law), ".2f"),
                         fmt_number(e.get("lack_of_fit_p"), ".3g"), fmt_number(e.get("aicc"), ".1f"),
                         fmt_number(e.get("cv_log"), ".3g"), fmt_number(e.get("forward_log"), ".3g")])
        why = "; ".join(lf.support.get("undecided_because", []))
        meaning = LAW_MEANINGS.get(lf.best, why)
        rej = rejected_text(lf)
        verdicts.append(f"{key}: law {law_label(lf)} ({meaning})" + (f"; {rej}" if rej else "")
                        + ("; power exponents depend on the fitted origin and are not comparable across models"
                           if lf.best == "power" or lf.leader == "power" else ""))
    lines = text_table(header, rows)
    noises = sorted({str(lf.support.get("noise", "")) for lf in laws.values()})
    lines.append(f"* = candidate with the smallest AICc. Noise: {'; '.join(noises)}. A law is rejected when its lack of "
                 f"fit exceeds the noise (p < {ALPHA}/4) or a 3-parameter law containing it improves on it (p < {ALPHA_NESTED}); "
                 f"decided when one law is left, on windows of >= {MIN_LAYERS} layers; AICc, leave-one-out and forward-split "
                 "errors rank the rest (they never decide alone).")
    return "\n".join(lines + verdicts)


def preferred_law(fit_json: dict) -> tuple[str, bool]:
    """(law to draw, decided?) from a GrowthFit JSON: the decided law, else the leader (undecided), else the
    exponential (no law block, or every law rejected)."""
    law = fit_json.get("law")
    if not law:
        return "exponential", False
    if law.get("best") in LAWS:
        return law["best"], True
    leader = (law.get("support") or {}).get("leader")
    return (leader if leader in LAWS else "exponential"), False


def law_rate_text(fit_json: dict, law: Optional[str] = None) -> str:
    """Short text of one law's rate parameter from a GrowthFit JSON: ``+4.5 %/layer [4.1, 4.9]`` (exponential),
    ``+3.2 % of n(a)/layer [..]`` (linear), ``k = 0.55 [..] (l0 = 2.1)`` (power), ``tau = 6.1 [..]`` (saturating)."""
    law = law or preferred_law(fit_json)[0]
    entry = fit_json["law"]["laws"][law]
    name = RATE_PARAM[law]
    value = as_float(entry["params"].get(name))
    lo, hi = (as_float(v) for v in entry.get("ci95", {}).get(name, [None, None]))
    if law == "power":
        return f"k = {with_ci(value, (lo, hi), '.2f')} (l0 = {fmt_number(entry['params'].get('origin'), '.2g')})"
    if law == "saturating":
        return f"tau = {with_ci(value, (lo, hi), '.3g')} layers"
    if law == "exponential":
        value, lo, hi = value - 1.0, lo - 1.0, hi - 1.0
    unit = " %/layer" if law == "exponential" else " % of n(a)/layer"
    ci = with_ci(0.0, (100 * lo, 100 * hi), "+.1f")[len("+0.0"):]
    return f"{fmt_number(100 * value, '+.1f')}{unit}{ci}"


def anchored_exponential(curve: Any, fit_json: dict) -> tuple[np.ndarray, np.ndarray]:
    """The fitted exponential of a GrowthFit JSON drawn over its window: ``n(l) = exp(c) g^l``, ``l = a..b``.

    ``g`` is the fit's growth factor; ``c`` anchors the line to ``curve`` by least squares in log space over
    the window's positive values, ``c = mean_l (log curve[l] - l log g)``. NaN values when unusable.
    """
    a, b = (int(v) for v in fit_json["window"])
    g = as_float(fit_json.get("growth_factor"))
    layers = np.arange(a, b + 1, dtype=np.float64)
    y = np.asarray([as_float(v) for v in curve], dtype=np.float64)[a:b + 1]
    ok = np.isfinite(y) & (y > 0)
    if not (math.isfinite(g) and g > 0) or not ok.any():
        return layers, np.full_like(layers, np.nan)
    c = float(np.mean(np.log(y[ok]) - layers[ok] * math.log(g)))
    return layers, np.exp(c + layers * math.log(g))
