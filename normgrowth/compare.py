"""Side-by-side comparison of two models (typically a model and its LN-free twin).

Every row holds each model's value with its 95 % CI and the difference A − B with a 95 % CI:

* growth per site (the tested family): the least-squares growth factor per layer g = exp(slope of log n)
  over each model's window, a model-free average of the log-slope; the difference's CI is a percentile
  bootstrap over sequences (:func:`normgrowth.fit.growth_difference`), **paired** (the same resampled
  sequence indices for both models) when both saw the same token batch (equal hashes of the token ids) and
  independent otherwise; the document says which. Each model's growth law is reported beside it as an
  interpretation; law rates are not compared (power exponents never: they depend on each fit's origin);
* everything else: a normal approximation, SE_i = (hi_i − lo_i) / (2 · 1.96) from each model's own CI,
  CI(A − B) = (A − B) ± 1.96 · sqrt(SE_A² + SE_B²) (:func:`normgrowth.numerics.difference_ci_from_cis`).

The multiple-comparison family is declared: the growth rows of the five sites (resid_pre, resid_mid,
resid_post, attn_out, mlp_out). Each gets a two-sided p-value from the normal approximation z = (A − B) / SE
with SE = (hi − lo) / (2 · 1.96) of the difference's CI, Holm-adjusted over the family (family-wise error 5 %);
a row is significant (raw) when its CI excludes 0 and significant (Holm) when its adjusted p < 0.05.
Every other row is descriptive and labelled so: mean write norms and position-0 rows (CIs shown, outside the
family), weight rows (a fit on one fixed checkpoint: its CI is a regression residual, not sampling) and
deletion rows (geometry only). Position-0 rows are deterministic (no CI) when position 0 holds the same token
in every sequence. Weight rows compare LN-free and LN models in the same units: an LN-free model's folded
weights (gain / sigma_avg, acting on the raw stream) are multiplied per layer by the mean per-token
standard deviation of the stream they read, which makes them gains on the normalised input.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from scipy import stats

from .laws import anchored_exponential
from .numerics import (DEFAULT_N_BOOT, MIN_BOOT_SEQS, Z95, difference_ci_from_cis, excludes_zero, holm_adjust,
                       se_from_ci, weighted_mean_ci)
from .protocol import ResultProtocol
from .results import SITES, Results, display_name
from .storage import as_float, json_safe
from .tables import with_ci

ALPHA = 0.05
FAMILY = "growth rows of the five sites"
DESCRIPTIVE_WEIGHTS = "descriptive: weight-norm fit on one fixed checkpoint (its CI is a regression residual)"
DESCRIPTIVE_GEOMETRY = "descriptive: geometry only (deletion)"
DESCRIPTIVE_OTHER = "descriptive: outside the tested family"
# weight series -> the stream site whose normalisation they read (None: no gain folded in)
WEIGHT_SERIES = {"W_OV_mean": "resid_pre", "W_in": "resid_mid", "W_out": None, "gain_attn": "resid_pre",
                 "gain_mlp": "resid_mid"}


def p_value_from_ci(diff: float, ci: Any) -> Optional[float]:
    """Two-sided p of ``diff`` from its 95 % CI by the normal approximation:
    ``z = diff / SE``, ``SE = (hi - lo) / (2 * 1.96)``, ``p = 2 (1 - Phi(|z|))``; None without a CI."""
    se = se_from_ci(ci)
    if not (math.isfinite(se) and math.isfinite(diff)):
        return None
    if se <= 0:
        return 0.0 if diff != 0 else 1.0
    return float(2 * stats.norm.sf(abs(diff) / se))


def row(label: str, a: float, a_ci: Any, b: float, b_ci: Any, diff: Optional[float] = None,
        diff_ci: Optional[Any] = None, method: str = "normal approximation from each model's CI",
        deterministic: bool = False, role: str = DESCRIPTIVE_OTHER) -> dict[str, Any]:
    """One comparison row; the difference CI comes from the two CIs unless given.

    ``deterministic``: the values are exact (not samples), so the row has no CI and makes no
    significance claim. ``role``: ``FAMILY`` for a tested row (Holm-adjusted with the others), else the
    reason the row is descriptive.
    """
    a_ci = [as_float(x) for x in (a_ci if a_ci is not None else [None, None])]
    b_ci = [as_float(x) for x in (b_ci if b_ci is not None else [None, None])]
    a, b = as_float(a), as_float(b)
    if deterministic:
        a_ci = b_ci = [math.nan, math.nan]
        diff, diff_ci, method = a - b, [math.nan, math.nan], "deterministic (position 0 is the same token everywhere)"
    elif diff is None:
        diff, diff_ci = difference_ci_from_cis(a, a_ci, b, b_ci)
        if not all(math.isfinite(x) for x in diff_ci):
            method = "no CI (descriptive)"
    diff_ci = [as_float(x) for x in diff_ci]
    has_ci = all(math.isfinite(x) for x in diff_ci)
    return {"label": label, "a": a, "a_ci95": a_ci, "b": b, "b_ci95": b_ci, "difference": float(diff),
            "difference_ci95": diff_ci, "significant": bool(has_ci and excludes_zero(diff_ci) and role == FAMILY),
            "ci_excludes_zero": bool(has_ci and excludes_zero(diff_ci)), "has_ci": has_ci,
            "deterministic": bool(deterministic), "method": method, "role": role, "family": role == FAMILY,
            "p_value": p_value_from_ci(float(diff), diff_ci) if has_ci and role == FAMILY else None}


def _growth_row(site: str, fa: dict, fb: dict, gd: dict, laws: dict) -> dict[str, Any]:
    """The growth row of ``site`` (a member of the tested family): least-squares growth factors per layer with
    the bootstrap CI of their difference (paired or independent, ``gd["ci_method"]``); the laws are a note."""
    r = row(f"growth factor per layer, {site}", fa["growth_factor"], fa["ci95"], fb["growth_factor"], fb["ci95"],
            gd["difference"], gd["difference_ci95"], gd.get("ci_method", "bootstrap"), role=FAMILY)
    r["law_note"] = f"laws: {laws.get('law_a')} vs {laws.get('law_b')} ({laws.get('note', '')})"
    return r


def adjust_rows(rows: list[dict[str, Any]], alpha: float = ALPHA) -> None:
    """Add Holm-adjusted p-values (over every row with a p-value: the family's rows) and the adjusted verdict,
    in place."""
    adjusted = holm_adjust([r.get("p_value") for r in rows])
    for r, p in zip(rows, adjusted):
        r["p_holm"] = p
        r["significant_holm"] = bool(p is not None and p < alpha)


def _sentence(r: dict[str, Any], name_a: str, name_b: str) -> str:
    if r.get("deterministic"):
        return (f"{r['label']}: {name_a} {r['a']:.4g} vs {name_b} {r['b']:.4g} (position 0 is the same token in "
                "every sequence: exact values, no CI, no significance claim).")
    if not r.get("family", True):
        diff = with_ci(r["difference"], r["difference_ci95"], ".3g")
        return (f"{r['label']}: {name_a} {r['a']:.4g} vs {name_b} {r['b']:.4g}, A-B {diff} "
                f"({r.get('role', DESCRIPTIVE_OTHER)}; no significance claim).")
    if not r["has_ci"]:
        why = r["method"][len("descriptive: "):] if r["method"].startswith("descriptive: ") else "no CI"
        return f"{r['label']}: {name_a} {r['a']:.4g} vs {name_b} {r['b']:.4g} ({why}: descriptive only)."
    lo, hi = r["difference_ci95"]
    holm = f"Holm-adjusted p = {r['p_holm']:.3g}" if r.get("p_holm") is not None else "no adjusted p"
    if r["significant"]:
        higher = name_a if r["difference"] > 0 else name_b
        after = "significant" if r.get("significant_holm") else "not significant"
        return (f"{r['label']}: {higher} is higher by {abs(r['difference']):.3g} (95 % CI of A-B [{lo:.3g}, {hi:.3g}] "
                f"excludes 0: significant alone; {holm}: {after} after correction for the {r.get('n_tests', '?')} "
                f"{FAMILY}).")
    return f"{r['label']}: no significant difference (95 % CI of A-B [{lo:.3g}, {hi:.3g}] contains 0; {holm})."


def _position0_is_fixed(res: Results) -> bool:
    """True when position 0 holds the same token in every sequence: the norm of position 0 then does not
    vary between sequences (standard deviation <= 1e-6 of its mean at every layer)."""
    st = res.sites.get("resid_post") or next(s for s in res.sites.values() if s is not None)
    sd = np.asarray(st.bos_std, dtype=float)
    scale = np.maximum(np.abs(np.asarray(st.bos_mean, dtype=float)), 1e-30)
    return bool(np.all(sd <= 1e-6 * scale))


def comparable_weight_fit(weights: dict, res: Results, series: str) -> tuple[Optional[dict], str]:
    """The growth fit of a weight series in units comparable across LN and LN-free models.

    LN / RMS models: the stored fit. LN-free: the folded series times ``sigma_l``, the mean per-token
    standard deviation of the stream site the series' normalisation reads (``token_std_mean``),
    refitted over the same window (gains on the normalised input). Returns (fit JSON, units note).
    """
    fit = (weights.get("fit") or {}).get(series)
    site = WEIGHT_SERIES.get(series)
    if not fit or not weights.get("ln_free") or site is None:
        return fit, "as stored"
    from .fit import fit_growth

    if site not in res.sites or res.sites.get(site) is None:
        site = "resid_pre"
    from .weights import WeightNorms

    values = WeightNorms.from_json(weights).series(series)
    sigma = np.asarray(res.sites[site].token_std_mean, dtype=float)
    if values is None or values.shape != sigma.shape or np.any(values <= 0) or np.any(sigma <= 0):
        return None, "not comparable (no per-layer values)"
    return fit_growth(values * sigma, window=tuple(fit["window"])).to_json(), f"x sigma of {site} (gain on N(x))"


def same_token_batch(res_a: Results, res_b: Results) -> tuple[bool, str]:
    """(paired?, why): both runs carry the same hash of their token ids (and as many sequences with the same
    token counts), so sequence s of one run is sequence s of the other."""
    ha, hb = getattr(res_a.meta, "token_hash", None), getattr(res_b.meta, "token_hash", None)
    if not ha or not hb:
        return False, "independent bootstraps: a run carries no token hash, so pairing cannot be checked"
    if ha != hb:
        return False, "independent bootstraps: the two runs saw different token batches"
    if not np.array_equal(np.asarray(res_a.seq_n_tokens), np.asarray(res_b.seq_n_tokens)):
        return False, "independent bootstraps: same tokens but different per-sequence token counts"
    return True, f"paired bootstrap: both runs saw the same token batch (token hash {ha[:12]})"


def _n_seqs(res: Results) -> int:
    return int(np.asarray(res.seq_n_tokens).size)


def compare_documents(res_a: Results, res_b: Results, rep_a: dict, rep_b: dict, weights_a: Optional[dict] = None,
                      weights_b: Optional[dict] = None, del_a: Optional[dict] = None, del_b: Optional[dict] = None,
                      n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The comparison JSON: rows (with sentences, raw and Holm-adjusted verdicts) plus the curves the
    comparison figure needs."""
    from .fit import growth_difference
    from .laws import compare_laws

    name_a, name_b = display_name(res_a.meta.model, res_a.meta.ln_free), display_name(res_b.meta.model, res_b.meta.ln_free)
    rows: list[dict[str, Any]] = []
    warnings_: list[str] = []
    for res, name in ((res_a, name_a), (res_b, name_b)):
        if _n_seqs(res) < MIN_BOOT_SEQS:
            warnings_.append(f"{name}: only {_n_seqs(res)} sequences feed the bootstraps (fewer than "
                             f"{MIN_BOOT_SEQS}): CIs and p-values are unreliable")
    paired, resampling = same_token_batch(res_a, res_b)
    growth: dict[str, Any] = {}
    for site in SITES:
        sa, sb = res_a.sites.get(site), res_b.sites.get(site)
        if sa is None or sb is None or site not in rep_a.get("fit", {}) or site not in rep_b.get("fit", {}):
            continue
        fa, fb = rep_a["fit"][site], rep_b["fit"][site]
        gd = growth_difference(sa.seq_mean, sb.seq_mean, (tuple(fa["window"]), tuple(fb["window"])),
                               weights_a=res_a.seq_n_tokens, weights_b=res_b.seq_n_tokens, n_boot=n_boot, seed=seed,
                               paired=paired)
        laws = compare_laws(fa, fb)
        growth[site] = {"a": fa, "b": fb, "difference": gd, "law": laws}
        if gd.get("n_nonfinite"):
            warnings_.append(f"{site}: {gd['n_nonfinite']} of {gd['n_boot']} bootstrap replicates of the growth "
                             "difference were not finite and were left out of its CI")
        rows.append(_growth_row(site, fa, fb, gd, laws))
    bos: dict[str, Any] = {}
    for site in ("resid_pre", "resid_post"):
        if res_a.sites.get(site) is not None and res_b.sites.get(site) is not None:
            bos[site] = {"a": res_a.sites[site].bos_mean, "b": res_b.sites[site].bos_mean,
                         "a_rest": res_a.sites[site].mean, "b_rest": res_b.sites[site].mean}
    fixed = _position0_is_fixed(res_a) and _position0_is_fixed(res_b)
    post_a, post_b = res_a.sites.get("resid_post"), res_b.sites.get("resid_post")
    if post_a is not None and post_b is not None:
        def bos_ci(res: Results) -> tuple[float, list[float]]:
            st = res.sites["resid_post"]
            m, sd, n = float(st.bos_mean[-1]), float(st.bos_std[-1]), max(res.meta.n_bos_tokens, 1)
            half = Z95 * sd / math.sqrt(n) if n > 1 else math.nan
            return m, [m - half, m + half]

        (ba, ba_ci), (bb, bb_ci) = bos_ci(res_a), bos_ci(res_b)
        rows.append(row("position-0 norm, last resid_post", ba, ba_ci, bb, bb_ci, deterministic=fixed))
        rows.append(row("position-0 / other positions, last resid_post", post_a.bos_mean[-1] / post_a.mean[-1], None,
                        post_b.bos_mean[-1] / post_b.mean[-1], None, deterministic=fixed))
    writes: dict[str, Any] = {}
    for site in ("attn_out", "mlp_out"):
        if res_a.sites.get(site) is None or res_b.sites.get(site) is None:
            continue
        ma, ca = weighted_mean_ci(res_a.sites[site].seq_mean.mean(1), res_a.seq_n_tokens)
        mb, cb = weighted_mean_ci(res_b.sites[site].seq_mean.mean(1), res_b.seq_n_tokens)
        writes[site] = {"a": res_a.sites[site].mean, "b": res_b.sites[site].mean}
        rows.append(row(f"mean {site} norm (average over layers)", ma, ca, mb, cb))
    weight_units: dict[str, Any] = {}
    if weights_a is not None and weights_b is not None:
        for series in WEIGHT_SERIES:
            fa, ua = comparable_weight_fit(weights_a, res_a, series)
            fb, ub = comparable_weight_fit(weights_b, res_b, series)
            if fa and fb:
                weight_units[series] = {"a": ua, "b": ub}
                rows.append(row(f"weight-norm growth per layer, {series}", fa["growth_factor"], fa["ci95"],
                                fb["growth_factor"], fb["ci95"], role=DESCRIPTIVE_WEIGHTS))
    deletion: dict[str, Any] = {}
    if del_a is not None and del_b is not None:
        deletion = _deletion_rows(del_a, del_b, rows, warnings_, (name_a, name_b))
    adjust_rows(rows)
    n_tests = sum(r["p_value"] is not None for r in rows)
    for r in rows:
        r["n_tests"] = n_tests
        r["sentence"] = _sentence(r, name_a, name_b)
    return json_safe({
        "models": [res_a.meta.model, res_b.meta.model], "names": [name_a, name_b],
        "ln_free": [res_a.meta.ln_free, res_b.meta.ln_free],
        "norm_placement": [res_a.meta.norm_placement, res_b.meta.norm_placement],
        "parallel_blocks": [res_a.meta.parallel_blocks, res_b.meta.parallel_blocks], "rows": rows, "growth": growth, "bos": bos,
        "position0_deterministic": fixed, "writes": writes, "weight_units": weight_units, "deletion": deletion,
        "curves": {site: {"a": res_a.sites[site].mean, "b": res_b.sites[site].mean}
                   for site in SITES if res_a.sites.get(site) is not None and res_b.sites.get(site) is not None},
        "sentences": [r["sentence"] for r in rows], "warnings": warnings_, "n_tests": n_tests,
        "family": FAMILY, "paired": paired, "resampling": resampling, "alpha": ALPHA, "method": __doc__.strip().split("\n\n", 1)[1],
    })


def _deletion_rows(da: dict, db: dict, rows: list, warnings_: list, names: tuple[str, str]) -> dict[str, Any]:
    ba, bb = da["by_distance"], db["by_distance"]
    for key, label in (("retention_far", "retention at distance >= 2"),
                       ("excess_dilution_decay_per_layer", "excess-dilution decay per layer (delta/delta0)"),
                       ("dilution_decay_per_layer", "dilution decay per layer of distance"),
                       ("visibility_decay_per_layer", "visibility decay per layer of distance")):
        if key in ba and key in bb:
            rows.append(row(label, ba.get(key), ba.get(key + "_ci95"), bb.get(key), bb.get(key + "_ci95"),
                            role=DESCRIPTIVE_GEOMETRY))
    la, lb = da["locality"], db["locality"]
    for key, label in (("mean_distance", "reading: mean distance (average over readers)"),
                       ("mean_distance_null", "equal-norm null: mean distance"),
                       ("mean_distance_influence", "direct influence: mean distance")):
        if key in la and key in lb:
            rows.append(row(label, _nanmean(la[key]), None, _nanmean(lb[key]), None, role=DESCRIPTIVE_GEOMETRY))
    for doc, name in zip((da, db), names):
        warnings_.extend(f"{name} deletion: {w}" for w in doc.get("warnings", []))
    return {"a": ba, "b": bb, "locality_a": la, "locality_b": lb,
            "verdict_a": da.get("verdict"), "verdict_b": db.get("verdict")}


def _nanmean(values: Any) -> float:
    arr = np.array([np.nan if v is None else v for v in values], dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else math.nan


class ComparisonResult(ResultProtocol):
    """A comparison document (:func:`compare_documents`) with the result protocol."""

    kind = "compare"

    def __init__(self, doc: dict[str, Any]):
        self.doc = doc

    def to_json(self) -> dict[str, Any]:
        return self.doc

    @classmethod
    def from_saved(cls, doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> "ComparisonResult":
        return cls({k: v for k, v in doc.items() if k not in ("result_kind", "arrays")})

    def frame_rows(self) -> Iterable[dict[str, Any]]:
        a, b = self.doc["models"]
        for r in self.doc["rows"]:
            for model, key in ((a, "a"), (b, "b")):
                lo, hi = r[key + "_ci95"]
                yield {"model": model, "site": r["label"], "layer": None, "statistic": "value", "value": r[key],
                       "ci_lo": lo, "ci_hi": hi}
            lo, hi = r["difference_ci95"]
            yield {"model": f"{a} - {b}", "site": r["label"], "layer": None, "statistic": "difference",
                   "value": r["difference"], "ci_lo": lo, "ci_hi": hi, "p_value": r.get("p_value"),
                   "p_holm": r.get("p_holm"), "significant": r["significant"],
                   "significant_holm": r.get("significant_holm")}

    def summary(self) -> str:
        rows = self.doc["rows"]
        sig = [r["label"] for r in rows if r.get("significant_holm")]
        return (f"{self.doc['names'][0]} vs {self.doc['names'][1]}: {len(rows)} rows, {len(sig)} significant "
                f"after Holm correction" + (": " + "; ".join(sig) if sig else ""))


def compare_results(*args: Any, **kwargs: Any) -> ComparisonResult:
    """:func:`compare_documents` wrapped in a :class:`ComparisonResult`."""
    return ComparisonResult(compare_documents(*args, **kwargs))


def format_comparison(doc: dict[str, Any]) -> str:
    placement = doc.get("norm_placement") or [None, None]

    def about(i: int) -> str:
        parts = (["LN-free"] if doc["ln_free"][i] else []) + ([f"{placement[i]}-norm"] if placement[i] else [])
        return f" ({', '.join(parts)})" if parts else ""

    lines = [f"A = {doc['models'][0]}{about(0)}", f"B = {doc['models'][1]}{about(1)}", ""]
    width = max(len(r["label"]) for r in doc["rows"])
    lines.append(f"{'quantity':<{width}}  {'A [95% CI]':>28}  {'B [95% CI]':>28}  {'A - B [95% CI]':>30}  "
                 f"{'p':>8}  {'p Holm':>8}  sig (raw/Holm)")

    def cell(x: Any, ci: list, w: int) -> str:
        return f"{with_ci(x, ci, '.4g'):>{w}}"

    for r in doc["rows"]:
        if r.get("deterministic"):
            sig = "exact"
        elif not r.get("family", True):
            sig = "descriptive"
        elif r["has_ci"]:
            sig = f"{'yes' if r['significant'] else 'no'}/{'yes' if r.get('significant_holm') else 'no'}"
        else:
            sig = "-"
        p = "-" if r.get("p_value") is None else f"{r['p_value']:.3g}"
        ph = "-" if r.get("p_holm") is None else f"{r['p_holm']:.3g}"
        lines.append(f"{r['label']:<{width}}  {cell(r['a'], r['a_ci95'], 28)}  {cell(r['b'], r['b_ci95'], 28)}  "
                     f"{cell(r['difference'], r['difference_ci95'], 30)}  {p:>8}  {ph:>8}  {sig}")
    verdicts = doc.get("deletion") or {}
    if verdicts.get("verdict_a") or verdicts.get("verdict_b"):
        lines.append("")
        for name, key in zip(doc["names"], ("verdict_a", "verdict_b")):
            v = verdicts.get(key)
            if v:
                lines.append(f"deletion verdict, {name}: {v['label']} ({v['reason']})")
    lines.append("")
    if doc.get("resampling"):
        lines.append(f"growth rows: {doc['resampling']}; Holm family: the {doc.get('family', FAMILY)}; "
                     "other rows are descriptive.")
    lines.extend(f"warning: {w}" for w in doc.get("warnings", []))
    lines.extend(doc["sentences"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the comparison figure (the one implementation; analyses/fig_compare.py draws through it)
# ----------------------------------------------------------------------------------------------
def draw_comparison(fig: Any, doc: dict[str, Any], colors: tuple[str, str] = ("#1f77b4", "#d62728")) -> None:
    """Four panels on ``fig`` from a comparison document: (a) resid_post norm per layer (log) with the
    fitted exponential over its window; (b) growth factors with 95 % CIs and Δg = g_A − g_B with the CI
    computed by :func:`compare_documents`; (c) retention and (d) dilution against distance with CI bands."""
    names = doc["names"]
    ax_n, ax_g, ax_r, ax_d = fig.subplots(2, 2).ravel()
    for i, key in enumerate(("a", "b")):
        curve = np.array([np.nan if v is None else v for v in doc["curves"]["resid_post"][key]], dtype=float)
        fit = (doc["growth"].get("resid_post") or {}).get(key)
        label = names[i]
        if fit and fit.get("percent_per_layer") is not None:
            label += f": {fit['percent_per_layer']:+.1f} %/layer"
        ax_n.plot(np.arange(curve.size), curve, "o-", color=colors[i], label=label, ms=3)
        if fit and fit.get("growth_factor"):
            x, y = anchored_exponential(curve, fit)
            ax_n.plot(x, y, color=colors[i], lw=6, alpha=0.25, zorder=1)
    ax_n.set_yscale("log")
    ax_n.set_xlabel("layer")
    ax_n.set_ylabel("mean ‖resid_post‖₂ (log scale)")
    ax_n.set_title("(a) residual norm per layer, fitted exponential (band)")
    ax_n.legend(fontsize=8)
    sites = list(doc["growth"])
    y = np.arange(len(sites))
    for i, key in enumerate(("a", "b")):
        g = np.array([as_float(doc["growth"][s][key]["growth_factor"]) for s in sites], dtype=float)
        ci = np.array([[as_float(v) for v in doc["growth"][s][key]["ci95"]] for s in sites], dtype=float).reshape(-1, 2)
        err = np.abs(np.vstack([g - ci[:, 0], ci[:, 1] - g]))
        ax_g.errorbar(g, y + (0.15 if i == 0 else -0.15), xerr=np.where(np.isfinite(err), err, 0), fmt="o",
                      color=colors[i], capsize=3, label=names[i])
    labels = []
    for s in sites:
        d = doc["growth"][s]["difference"]
        lo, hi = (as_float(v) for v in d["difference_ci95"])
        star = " *" if excludes_zero([lo, hi]) else ""
        labels.append(f"{s}\nΔg = {d['difference']:+.4f}\n[{lo:+.4f}, {hi:+.4f}]{star}")
    ax_g.axvline(1.0, color="black", lw=0.8)
    ax_g.set_yticks(y, labels, fontsize=7.5)
    ax_g.set_ylim(-0.6, max(len(sites), 1) - 0.4)
    ax_g.set_xlabel("growth factor per layer g (95 % CI)")
    how = "paired bootstrap" if doc.get("paired") else "independent bootstraps"
    ax_g.set_title(f"(b) growth factors; Δg = g(A) − g(B), {how} CI; * excludes 0", fontsize=8.5)
    ax_g.legend(fontsize=8)
    dele = doc.get("deletion") or {}
    for ax, q, log, title in ((ax_r, "retention", False, "(c) retention ρ (1 = kept, 0 = erased)"),
                              (ax_d, "dilution", True, "(d) dilution δ = sqrt(Σ‖w̃‖² / Σ‖r̃‖²)")):
        ax.set_title(title)
        if not dele:
            ax.text(0.5, 0.5, "no deletion results", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for i, key in enumerate(("a", "b")):
            by = dele[key]
            d = np.array(by["distance"], dtype=float)
            v = np.array([as_float(x) for x in by[q]], dtype=float)
            ci = np.array([[as_float(x) for x in c] for c in by.get(q + "_ci95", [])], dtype=float).reshape(-1, 2)
            label = names[i]
            verdict = dele.get(f"verdict_{key}")
            if verdict and q == "retention":
                label += f": {verdict['label']}"
            ax.plot(d, v, "o-", color=colors[i], ms=3, label=label)
            if ci.shape[0] == d.size and np.isfinite(ci).any():
                ax.fill_between(d, ci[:, 0], ci[:, 1], color=colors[i], alpha=0.2, lw=0)
        if log:
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="black", lw=0.8, zorder=1)
        ax.set_xlabel("distance (layers)")
        ax.set_ylabel(q + (" (log scale)" if log else ""))
        ax.legend(fontsize=8)
    fig.suptitle(f"{names[0]} vs {names[1]}")


def plot_comparison(doc: dict[str, Any], path: str | Path) -> list[Path]:
    """:func:`draw_comparison` to ``path`` (PNG, 150 dpi) and the same name with ``.pdf``; returns both."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 8.4), layout="constrained")
    FigureCanvasAgg(fig)
    draw_comparison(fig, doc)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = out.with_suffix(".png"), out.with_suffix(".pdf")
    fig.savefig(png, dpi=150)
    fig.savefig(pdf)
    return [png, pdf]


# ----------------------------------------------------------------------------------------------
# replication across seeds
# ----------------------------------------------------------------------------------------------
def across_seeds(docs: list[dict[str, Any]], alpha: float = ALPHA) -> dict[str, Any]:
    """The family's rows across independent seeds (each ``doc`` one seed's comparison, e.g. LN-free twin vs
    the LN-kept control of that seed): seeds are the replication unit, so for each growth row the per-seed
    differences ``d_s = A_s - B_s`` give ``mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n)`` and a one-sample t test of
    mean 0 (``p``; None with fewer than two seeds), Holm-adjusted over the rows present in every seed."""
    from scipy import stats as sps

    from .numerics import t_interval

    if not docs:
        raise ValueError("across_seeds needs at least one comparison document")
    labels = [r["label"] for r in docs[0]["rows"] if r.get("family")]
    labels = [lab for lab in labels if all(any(r["label"] == lab for r in d["rows"]) for d in docs)]
    rows = []
    for lab in labels:
        d = np.array([as_float(next(r for r in doc["rows"] if r["label"] == lab)["difference"]) for doc in docs])
        n = int(np.isfinite(d).sum())
        d = d[np.isfinite(d)]
        mean = float(d.mean()) if n else math.nan
        sd = float(d.std(ddof=1)) if n >= 2 else math.nan
        ci = t_interval(mean, sd / math.sqrt(n), n - 1) if n >= 2 else (math.nan, math.nan)
        p = None
        if n >= 2:
            p = 1.0 if sd == 0 and mean == 0 else (0.0 if sd == 0 else float(2 * sps.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)))
        rows.append({"label": lab, "differences": d.tolist(), "n_seeds": n, "mean": mean, "sd": sd,
                     "ci95": list(ci), "p_value": p})
    for r, p in zip(rows, holm_adjust([r["p_value"] for r in rows])):
        r["p_holm"] = p
        r["significant_holm"] = bool(p is not None and p < alpha)
    return json_safe({"n_seeds": len(docs), "names": docs[0].get("names"), "rows": rows,
                      "method": "per-seed differences A - B; t interval and one-sample t test over seeds (the "
                                "replication unit); Holm over the family's rows"})


def across_seeds_from_files(paths: Iterable[str | Path]) -> dict[str, Any]:
    """:func:`across_seeds` of comparison JSON files (``normgrowth compare ... --json FILE``, one per seed)."""
    import json

    return across_seeds([json.loads(Path(p).read_text()) for p in paths])


def format_across_seeds(summary: dict[str, Any]) -> str:
    """One line per row: mean difference [95 % t CI] over n seeds, p and Holm-adjusted p."""
    lines = [f"across {summary['n_seeds']} seeds (A - B per seed; seeds are the replication unit):"]
    for r in summary["rows"]:
        p = "-" if r["p_value"] is None else f"{r['p_value']:.3g}"
        ph = "-" if r["p_holm"] is None else f"{r['p_holm']:.3g}"
        lines.append(f"  {r['label']}: {with_ci(r['mean'], r['ci95'], '+.4g')} (n = {r['n_seeds']}, p = {p}, "
                     f"Holm p = {ph})")
    return "\n".join(lines)
