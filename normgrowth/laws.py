"""Which growth law describes a norm curve: exponential, linear or power law (pure numpy, no model code).

Over an inclusive window of layers ``l = a..b`` three two-parameter laws are fitted to the curve ``m[l]``:

* exponential: ``log m = alpha + beta l`` (least squares in log space), ``g = exp(beta)``;
* linear:      ``m = p + q l`` (least squares on ``m``);
* power:       ``log m = log A + k log(l + 1)`` (least squares in log space).

Every law is scored by the same number, its residual sum of squares in log space
``rss_log = sum_l (log m[l] - log fit[l])^2`` (infinite when a fitted line is not positive at some layer
of the window). Equal parameter counts make the smallest ``rss_log`` the preferred law; it is reported as
decided only when the window has at least ``MIN_LAYERS`` layers, the runner-up's ``rss_log`` is at
least ``MIN_RSS_RATIO`` times the leader's (one curve: at least ``max(MIN_RSS_RATIO, F_0.95(k-2, k-2))``
times), and the leader also wins in at least ``MIN_SUPPORT`` of the bootstrap replicates over
sequences (several curves) or ``MIN_LOO_SUPPORT`` of the leave-one-layer-out refits (one curve).
Otherwise ``best = "undecided"``. See docs/fit.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from scipy import stats

from .numerics import difference_ci_from_cis, fit_line, percentile_ci, polyfit_rows, t_interval
from .storage import json_safe
from .tables import fmt_number, text_table

LAWS = ("exponential", "linear", "power")
UNDECIDED = "undecided"
# The scale-free rate parameter of each law (what is compared between models, with its CI).
RATE_PARAM = {"exponential": "growth_factor", "linear": "relative_slope", "power": "exponent"}
MIN_LAYERS = 5  # fewer layers: three 2-parameter laws cannot be told apart (2 or fewer residual df)
MIN_RSS_RATIO = 1.5  # runner-up rss_log / leader rss_log needed for a decision
MIN_SUPPORT = 0.95  # share of bootstrap replicates the leader must win
MIN_LOO_SUPPORT = 0.9  # share of leave-one-layer-out refits the leader must win (one curve)
SUPPORT_BOOTSTRAP = "bootstrap over sequences"
SUPPORT_LOO = "leave-one-layer-out"
LAW_MEANINGS = {
    "exponential": "compounding growth: each layer multiplies the norm by a constant factor",
    "linear": "constant-size writes adding up in a shared direction: the norm grows by a constant amount per layer",
    "power": "n ~ (l + 1)^k; k = 1/2 is the accumulation of independent writes of constant size",
}


# ----------------------------------------------------------------------------------------------
# vectorised fits of the three laws
# ----------------------------------------------------------------------------------------------
def fit_law_rows(layers: Any, curves: Any) -> dict[str, dict[str, np.ndarray]]:
    """Fit each law to every row of ``curves`` (``[..., k]``, positive) over ``layers`` (``[k]``).

    Returns ``{law: {"params": {name: array[...]}, "rss_log": array[...], "log_fit": array[..., k]}}``:
    exponential ``growth_factor = exp(beta)``, ``amplitude = exp(alpha)`` (the fit at l = 0);
    linear ``intercept = p``, ``slope = q``, ``relative_slope = q / (p + q a)`` (slope over the fitted
    norm at the window's first layer ``a``); power ``exponent = k``, ``amplitude = A``.
    """
    x = np.asarray(layers, dtype=np.float64)
    m = np.asarray(curves, dtype=np.float64)
    y = np.log(m)
    out: dict[str, dict[str, Any]] = {}

    c = polyfit_rows(x, y, 1)
    beta, alpha = c[..., 1], c[..., 0] - c[..., 1] * x.mean()
    log_fit = alpha[..., None] + beta[..., None] * x
    out["exponential"] = {"params": {"growth_factor": np.exp(beta), "amplitude": np.exp(alpha)},
                          "rss_log": ((y - log_fit) ** 2).sum(-1), "log_fit": log_fit}

    c = polyfit_rows(x, m, 1)
    q, p = c[..., 1], c[..., 0] - c[..., 1] * x.mean()
    line = p[..., None] + q[..., None] * x
    positive = np.all(line > 0, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_line = np.where(line > 0, np.log(np.where(line > 0, line, 1.0)), -np.inf)
        rss = np.where(positive, ((y - np.where(line > 0, log_line, 0.0)) ** 2).sum(-1), np.inf)
        start = p + q * x[0]
        rel = np.where(start > 0, q / np.where(start > 0, start, 1.0), np.nan)
    out["linear"] = {"params": {"intercept": p, "slope": q, "relative_slope": rel}, "rss_log": rss,
                     "log_fit": log_line}

    lx = np.log(x + 1.0)
    c = polyfit_rows(lx, y, 1)
    k, log_a = c[..., 1], c[..., 0] - c[..., 1] * lx.mean()
    log_fit = log_a[..., None] + k[..., None] * lx
    out["power"] = {"params": {"exponent": k, "amplitude": np.exp(log_a)},
                    "rss_log": ((y - log_fit) ** 2).sum(-1), "log_fit": log_fit}
    return out


def law_curve(law: str, params: dict, layers: Any) -> np.ndarray:
    """The fitted norm ``n(l)`` of one law at ``layers`` from its JSON ``params`` (NaN where undefined):
    exponential ``amplitude * growth_factor^l``, linear ``intercept + slope l``, power ``amplitude (l+1)^exponent``."""
    x = np.asarray(layers, dtype=np.float64)
    p = {k: (math.nan if v is None else float(v)) for k, v in params.items()}
    if law == "exponential":
        return p["amplitude"] * p["growth_factor"] ** x
    if law == "linear":
        return p["intercept"] + p["slope"] * x
    if law == "power":
        return p["amplitude"] * (x + 1.0) ** p["exponent"]
    raise ValueError(f"unknown growth law {law!r}; expected one of {LAWS}")


def anchored_exponential(curve: Any, fit_json: dict) -> tuple[np.ndarray, np.ndarray]:
    """The fitted exponential of a GrowthFit JSON drawn over its window: ``n(l) = exp(c) g^l``, ``l = a..b``.

    ``g`` is the fit's growth factor; ``c`` anchors the line to ``curve`` by least squares in log space over
    the window's positive values, ``c = mean_l (log curve[l] - l log g)`` (the intercept of the log-linear
    fit when ``curve`` is the fitted mean curve). NaN values when ``g`` or the curve is unusable.
    """
    a, b = (int(x) for x in fit_json["window"])
    g = math.nan if fit_json.get("growth_factor") is None else float(fit_json["growth_factor"])
    layers = np.arange(a, b + 1, dtype=np.float64)
    y = np.asarray([math.nan if v is None else v for v in curve], dtype=np.float64)[a:b + 1]
    ok = np.isfinite(y) & (y > 0)
    if not (math.isfinite(g) and g > 0) or not ok.any():
        return layers, np.full_like(layers, np.nan)
    c = float(np.mean(np.log(y[ok]) - layers[ok] * math.log(g)))
    return layers, np.exp(c + layers * math.log(g))


def relative_slope_ci(layers: Any, curve: Any, level: float = 0.95) -> tuple[float, float]:
    """Delta-method t interval of r = q / n0 for one curve: OLS of ``n = n0 + q (l - a)`` (``a`` = first
    layer), ``Var r ~ Var q / n0^2 + q^2 Var n0 / n0^4 - 2 q Cov(n0, q) / n0^3`` with the OLS covariance
    ``s^2 (X'X)^-1``, ``s^2 = RSS / (k - 2)``, and ``t_{(1+level)/2, k-2}``; NaN when k < 3 or n0 <= 0."""
    x = np.asarray(layers, dtype=np.float64)
    y = np.asarray(curve, dtype=np.float64)
    k = x.size
    if k < 3:
        return (math.nan, math.nan)
    design = np.stack([np.ones(k), x - x[0]], axis=1)
    (n0, q), *_ = np.linalg.lstsq(design, y, rcond=None)
    if n0 <= 0:
        return (math.nan, math.nan)
    resid = y - design @ np.array([n0, q])
    cov = float(resid @ resid) / (k - 2) * np.linalg.inv(design.T @ design)
    var = cov[1, 1] / n0**2 + q**2 * cov[0, 0] / n0**4 - 2 * q * cov[0, 1] / n0**3
    return t_interval(float(q / n0), math.sqrt(max(var, 0.0)), k - 2, level)


def single_curve_ratio(k: int) -> float:
    """RSS ratio a single curve's leader needs: max(MIN_RSS_RATIO, F_{0.95}(k - 2, k - 2)), the ratio two
    independent residual sums with k - 2 df each exceed with 5 % probability when the laws fit equally well."""
    if k <= 2:
        return math.inf
    return max(MIN_RSS_RATIO, float(stats.f.ppf(0.95, k - 2, k - 2)))


def _winners(rss: np.ndarray) -> np.ndarray:
    """Index of the smallest rss per row ([..., n_laws]); -1 where no law has a finite rss."""
    finite = np.isfinite(rss)
    idx = np.argmin(np.where(finite, rss, np.inf), axis=-1)
    return np.where(finite.any(axis=-1), idx, -1)


def _shares(winners: np.ndarray) -> dict[str, float]:
    n = max(int(winners.size), 1)
    return {law: float(np.sum(winners == i)) / n for i, law in enumerate(LAWS)}


# ----------------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------------
@dataclass
class LawFit:
    """The three laws fitted over one window, the preferred one and the support for that choice.

    ``laws[name] = {"params": {...}, "ci95": {rate param: [lo, hi]}, "rss_log": float, "cv_log": float}``
    (``cv_log``: leave-one-layer-out prediction error of log m, summed over the window);
    ``best``: a law name or ``"undecided"``; ``support``: how the choice was checked (see :func:`fit_laws`).
    """

    window: tuple[int, int]
    laws: dict[str, dict[str, Any]]
    best: str
    support: dict[str, Any] = field(default_factory=dict)

    @property
    def leader(self) -> Optional[str]:
        """The law with the smallest log-space RSS, decided or not (None when no law fits)."""
        return self.support.get("leader")

    def rate(self, law: Optional[str] = None) -> tuple[str, float, tuple[float, float]]:
        """(parameter name, value, 95 % CI) of ``law``'s rate parameter (default: the leader)."""
        law = law or self.leader or "exponential"
        name = RATE_PARAM[law]
        entry = self.laws[law]
        lo, hi = entry["ci95"].get(name, [None, None])
        f = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return name, f(entry["params"].get(name)), (f(lo), f(hi))

    def to_json(self) -> dict:
        """``{"best", "laws", "support", "window"}`` in strict JSON (non-finite numbers -> None)."""
        return json_safe({"best": self.best, "window": list(self.window), "laws": self.laws, "support": self.support})

    @classmethod
    def from_json(cls, data: dict) -> "LawFit":
        return cls(window=tuple(int(v) for v in data.get("window", (0, 0))), laws=dict(data["laws"]),
                   best=str(data["best"]), support=dict(data.get("support", {})))


def fit_laws(layers: Any, mean_curve: Any, boot_curves: Optional[np.ndarray] = None) -> LawFit:
    """Fit the three laws to ``mean_curve`` over ``layers`` and decide which describes it.

    ``boot_curves`` (``[n_boot, k]`` bootstrap replicates of the mean curve over sequences): the CI of
    every parameter is the percentile interval over replicates and ``support["wins"]`` is the share of
    replicates in which each law has the smallest ``rss_log``. Without them (one curve): the CI of each
    rate parameter is the OLS t interval of its fit (exponential and power on log m, linear on m, with a
    delta-method interval for ``relative_slope``, :func:`relative_slope_ci`) and ``support["wins"]`` is
    the share of the ``k`` leave-one-layer-out refits each law wins. ``support["loo_wins"]`` and each law's ``cv_log`` come from the leave-one-layer-out
    refits in both cases. Decision rule: module docstring.
    """
    x = np.asarray(layers, dtype=np.float64)
    m = np.asarray(mean_curve, dtype=np.float64)
    k = x.size
    point = fit_law_rows(x, m)
    rss = np.array([float(point[law]["rss_log"]) for law in LAWS])

    # leave-one-layer-out: refit on k - 1 layers, predict the left-out layer
    loo_win = np.full(k, -1)
    cv = np.zeros(len(LAWS))
    if k >= 4:
        for j in range(k):
            keep = np.arange(k) != j
            sub = fit_law_rows(x[keep], m[keep])
            loo_win[j] = _winners(np.array([float(sub[law]["rss_log"]) for law in LAWS]))
            for i, law in enumerate(LAWS):
                pred = float(law_curve(law, {n: float(v) for n, v in sub[law]["params"].items()}, x[j]))
                cv[i] += (math.log(m[j]) - math.log(pred)) ** 2 if pred > 0 else math.inf
    else:
        cv[:] = math.nan

    laws: dict[str, dict[str, Any]] = {}
    for i, law in enumerate(LAWS):
        params = {n: float(v) for n, v in point[law]["params"].items()}
        laws[law] = {"params": params, "ci95": {}, "rss_log": float(rss[i]), "cv_log": float(cv[i])}

    if boot_curves is not None:
        boot = fit_law_rows(x, np.asarray(boot_curves, dtype=np.float64))
        boot_rss = np.stack([boot[law]["rss_log"] for law in LAWS], axis=-1)
        wins = _winners(boot_rss)
        for law in LAWS:
            for name, vals in boot[law]["params"].items():
                ci = percentile_ci(np.where(np.isfinite(boot[law]["rss_log"]), vals, np.nan))
                laws[law]["ci95"][name] = [ci.lo, ci.hi]
            laws[law]["n_nonfinite"] = int(np.sum(~np.isfinite(boot[law]["rss_log"])))
        method, n_support, shares = SUPPORT_BOOTSTRAP, int(wins.size), _shares(wins)
        need = MIN_SUPPORT
    else:
        if k >= 3:
            lines = {"exponential": ("growth_factor", x, np.log(m), math.exp),
                     "linear": ("slope", x, m, float),
                     "power": ("exponent", np.log(x + 1.0), np.log(m), float)}
            for law, (name, xx, yy, transform) in lines.items():
                lo, hi = fit_line(xx, yy).slope_ci()
                laws[law]["ci95"][name] = [transform(v) if math.isfinite(v) else math.nan for v in (lo, hi)]
            laws["linear"]["ci95"]["relative_slope"] = list(relative_slope_ci(x, m))
        method, n_support = SUPPORT_LOO, int(k) if k >= 4 else 0
        shares = _shares(loo_win) if k >= 4 else {law: math.nan for law in LAWS}
        need = MIN_LOO_SUPPORT

    order = [i for i in np.argsort(rss) if math.isfinite(rss[i])]
    leader = LAWS[order[0]] if order else None
    runner = LAWS[order[1]] if len(order) > 1 else None
    if leader is None:
        ratio = math.nan
    elif runner is None:
        ratio = math.inf
    else:
        ratio = rss[order[1]] / rss[order[0]] if rss[order[0]] > 0 else (math.inf if rss[order[1]] > 0 else 1.0)
    need_ratio = MIN_RSS_RATIO if boot_curves is not None else single_curve_ratio(k)
    reasons = []
    if k < MIN_LAYERS:
        reasons.append(f"window has {k} layers (< {MIN_LAYERS})")
    if leader is not None and not ratio >= need_ratio:
        reasons.append(f"runner-up {runner} fits almost as well (rss ratio {ratio:.2f} < {need_ratio:.2f})")
    if leader is not None and not shares.get(leader, math.nan) >= need:
        reasons.append(f"{leader} wins only {shares.get(leader, math.nan):.0%} of {method} fits (< {need:.0%})")
    if leader is None:
        reasons.append("no law fits (non-positive fitted values)")
    best = leader if (leader is not None and not reasons) else UNDECIDED
    support = {
        "criterion": "smallest rss_log (all laws have 2 parameters)",
        "leader": leader,
        "runner_up": runner,
        "rss_ratio": ratio,
        "rss_ratio_to_leader": {law: (rss[i] / rss[order[0]] if order and rss[order[0]] > 0 else math.nan)
                                for i, law in enumerate(LAWS)},
        "method": method,
        "n": n_support,
        "wins": shares,
        "loo_wins": _shares(loo_win) if k >= 4 else {law: math.nan for law in LAWS},
        "thresholds": {"min_layers": MIN_LAYERS, "min_rss_ratio": need_ratio, "min_support": need},
        "undecided_because": reasons,
    }
    return LawFit(window=(int(x[0]), int(x[-1])), laws=laws, best=best, support=support)


# ----------------------------------------------------------------------------------------------
# comparing two fits and printing
# ----------------------------------------------------------------------------------------------
def compare_laws(fit_a: dict, fit_b: dict) -> dict:
    """Compare two GrowthFit JSON objects like with like.

    Both preferred laws equal (or both without a ``law`` entry, i.e. exponential fits only): the
    difference of that law's rate parameter (growth factor, relative slope or exponent), A - B, with a
    normal-approximation 95 % CI from the two CIs (:func:`normgrowth.numerics.difference_ci_from_cis`).
    Different or undecided laws: ``comparable = False`` and no difference; the rates would measure
    different things.
    """
    def law_of(fit: dict) -> str:
        law = fit.get("law")
        return "exponential" if not law else str(law.get("best", UNDECIDED))

    law_a, law_b = law_of(fit_a), law_of(fit_b)
    out: dict[str, Any] = {"law_a": law_a, "law_b": law_b, "comparable": False, "law": None, "parameter": None,
                           "a": None, "b": None, "difference": None, "difference_ci95": [None, None]}
    if law_a != law_b or law_a == UNDECIDED:
        out["note"] = (f"preferred laws differ ({law_a} vs {law_b}); rates are not compared"
                       if law_a != law_b else "no decided law for either; rates are not compared")
        return json_safe(out)
    name = RATE_PARAM[law_a]

    def value_ci(fit: dict) -> tuple[float, list]:
        if name == "growth_factor" and not fit.get("law"):
            return fit["growth_factor"], fit["ci95"]
        entry = fit["law"]["laws"][law_a]
        return entry["params"][name], entry["ci95"].get(name, [None, None])

    (va, ca), (vb, cb) = value_ci(fit_a), value_ci(fit_b)
    fa = math.nan if va is None else float(va)
    fb = math.nan if vb is None else float(vb)
    diff, ci = difference_ci_from_cis(fa, ca, fb, cb)
    out.update(comparable=True, law=law_a, parameter=name, a=fa, b=fb, difference=diff, difference_ci95=list(ci),
               note=f"both {law_a}: {name} compared")
    return json_safe(out)


def law_label(law: Optional[LawFit]) -> str:
    """Short text for a table cell: ``"linear"``, or ``"undecided (power?)"`` with the leader."""
    if law is None:
        return ""
    if law.best != UNDECIDED:
        return law.best
    return f"undecided ({law.leader}?)" if law.leader else UNDECIDED


def format_law_table(laws: dict[str, LawFit]) -> str:
    """One row per (curve, law): rate parameter [95 % CI], rss_log, its ratio to the leader's, LOO-CV
    error and the share of support fits won; then each curve's verdict."""
    header = ["curve", "law", "rate parameter [95% CI]", "rss_log", "/leader", "cv_log", "wins"]
    rows = []
    verdicts = []
    for key, lf in laws.items():
        for law in LAWS:
            name, val, (lo, hi) = lf.rate(law)
            entry = lf.laws[law]
            rows.append([str(key), law + (" *" if law == lf.leader else ""),
                         f"{name} {fmt_number(val, '.4g')} [{fmt_number(lo, '.4g')}, {fmt_number(hi, '.4g')}]",
                         fmt_number(entry["rss_log"], ".4g"), fmt_number(lf.support["rss_ratio_to_leader"].get(law), ".2f"),
                         fmt_number(entry.get("cv_log"), ".4g"), fmt_number(lf.support["wins"].get(law), ".0%")])
        why = "; ".join(lf.support.get("undecided_because", []))
        verdicts.append(f"{key}: preferred law {lf.best}" + (f" ({why})" if why else f" ({LAW_MEANINGS[lf.best]})")
                        + ("" if lf.best in ("exponential", UNDECIDED) else "; the exponential is NOT the preferred law"))
    lines = text_table(header, rows)
    methods = sorted({lf.support.get("method", "") for lf in laws.values()})
    lines.append("* = smallest rss_log (sum of squared log residuals); wins: share of "
                 f"{' / '.join(methods)} fits won. Decided when the window has >= {MIN_LAYERS} layers and "
                 f"either (bootstrap) rss ratio >= {MIN_RSS_RATIO} and wins >= {MIN_SUPPORT:.0%}, or (one curve) "
                 f"rss ratio >= max({MIN_RSS_RATIO}, F95(k-2, k-2)) and wins >= {MIN_LOO_SUPPORT:.0%}.")
    return "\n".join(lines + verdicts)


def preferred_law(fit_json: dict) -> tuple[str, bool]:
    """(law to draw, decided?) from a GrowthFit JSON: the decided law, else the leader (undecided), else
    the exponential (a fit without a ``law`` entry)."""
    law = fit_json.get("law")
    if not law:
        return "exponential", False
    if law.get("best") in LAWS:
        return law["best"], True
    leader = (law.get("support") or {}).get("leader")
    return (leader if leader in LAWS else "exponential"), False


def rate_text(fit_json: dict, law: Optional[str] = None) -> str:
    """Short text of one law's rate from a GrowthFit JSON: ``+4.5 %/layer [4.1, 4.9]`` (exponential),
    ``+3.2 % of n(a)/layer [..]`` (linear: relative slope), ``k = 0.55 [0.51, 0.60]`` (power)."""
    law = law or preferred_law(fit_json)[0]
    f = lambda v: math.nan if v is None else float(v)  # noqa: E731
    if law == "exponential" and not fit_json.get("law"):
        value, (lo, hi) = f(fit_json.get("growth_factor")), [f(v) for v in fit_json.get("ci95", [None, None])]
    else:
        entry = fit_json["law"]["laws"][law]
        name = RATE_PARAM[law]
        value = f(entry["params"].get(name))
        lo, hi = (f(v) for v in entry.get("ci95", {}).get(name, [None, None]))
    ci_ok = math.isfinite(lo) and math.isfinite(hi)
    if law == "power":
        return f"k = {value:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if ci_ok else "")
    if law == "exponential":
        value, lo, hi = value - 1.0, lo - 1.0, hi - 1.0
    unit = " %/layer" if law == "exponential" else " % of n(a)/layer"
    return f"{100 * value:+.1f}{unit}" + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if ci_ok else "")
