"""Side-by-side comparison of two models (typically a model and its LN-free twin).

Every row holds each model's value with its 95 % CI and the difference A − B with a 95 % CI:

* growth factors per site: difference by independent bootstraps over each model's sequences
  (:func:`normgrowth.fit.growth_difference`);
* everything else (position-0 norms, mean write norms, weight-norm growth, deletion summaries): a normal
  approximation, SE_i = (hi_i − lo_i) / (2 · 1.96) from each model's own CI,
  CI(A − B) = (A − B) ± 1.96 · sqrt(SE_A² + SE_B²).
A difference is called significant when its CI excludes 0. Rows without CIs are marked descriptive.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .fit import growth_difference
from .results import SITES, Results

Z95 = 1.959963984540054


def _name(spec: str, ln_free: bool) -> str:
    name = Path(str(spec).rstrip("/")).name or str(spec)
    return name + (" (no LN)" if ln_free and "noln" not in name.lower() and "lnfree" not in name.lower() else "")


def _mean_ci(values: np.ndarray, weights: Optional[np.ndarray] = None) -> tuple[float, list[float]]:
    """Weighted mean of per-sequence values with a normal 95 % CI (weighted SE, Kish effective n)."""
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    keep = np.isfinite(v) & (w > 0)
    v, w = v[keep], w[keep]
    mean = float(np.sum(w * v) / np.sum(w))
    if v.size < 2:
        return mean, [math.nan, math.nan]
    n_eff = np.sum(w) ** 2 / np.sum(w**2)
    var = float(np.sum(w * (v - mean) ** 2) / np.sum(w))
    se = math.sqrt(var / max(n_eff - 1, 1))
    return mean, [mean - Z95 * se, mean + Z95 * se]


def row(label: str, a: float, a_ci: Any, b: float, b_ci: Any, diff: Optional[float] = None,
        diff_ci: Optional[Any] = None, method: str = "normal approximation from each model's CI") -> dict[str, Any]:
    """One comparison row; the difference CI comes from the two CIs unless given."""
    a_ci = [float(x) if x is not None else math.nan for x in (a_ci if a_ci is not None else [math.nan] * 2)]
    b_ci = [float(x) if x is not None else math.nan for x in (b_ci if b_ci is not None else [math.nan] * 2)]
    a = float(a) if a is not None else math.nan
    b = float(b) if b is not None else math.nan
    if diff is None:
        diff = a - b
        se = [(hi - lo) / (2 * Z95) for lo, hi in (a_ci, b_ci)]
        if all(np.isfinite(se)):
            half = Z95 * math.sqrt(se[0] ** 2 + se[1] ** 2)
            diff_ci = [diff - half, diff + half]
        else:
            diff_ci, method = [math.nan, math.nan], "no CI (descriptive)"
    diff_ci = [float(x) for x in diff_ci]
    has_ci = all(np.isfinite(diff_ci))
    significant = bool(has_ci and (diff_ci[0] > 0 or diff_ci[1] < 0))
    return {"label": label, "a": a, "a_ci95": a_ci, "b": b, "b_ci95": b_ci, "difference": float(diff),
            "difference_ci95": diff_ci, "significant": significant, "has_ci": has_ci, "method": method}


def _sentence(r: dict[str, Any], name_a: str, name_b: str) -> str:
    if not r["has_ci"]:
        return f"{r['label']}: {name_a} {r['a']:.4g} vs {name_b} {r['b']:.4g} (no CI: descriptive only)."
    lo, hi = r["difference_ci95"]
    if r["significant"]:
        higher = name_a if r["difference"] > 0 else name_b
        return (f"{r['label']}: {higher} is higher by {abs(r['difference']):.3g} "
                f"(95 % CI of A-B [{lo:.3g}, {hi:.3g}] excludes 0: significant).")
    return f"{r['label']}: no significant difference (95 % CI of A-B [{lo:.3g}, {hi:.3g}] contains 0)."


def compare_documents(res_a: Results, res_b: Results, rep_a: dict, rep_b: dict, weights_a: Optional[dict] = None,
                      weights_b: Optional[dict] = None, del_a: Optional[dict] = None, del_b: Optional[dict] = None,
                      n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The comparison JSON: rows (with sentences) plus the curves the comparison figure needs."""
    name_a, name_b = _name(res_a.meta.model, res_a.meta.ln_free), _name(res_b.meta.model, res_b.meta.ln_free)
    rows: list[dict[str, Any]] = []
    growth: dict[str, Any] = {}
    for site in SITES:
        sa, sb = res_a.sites.get(site), res_b.sites.get(site)
        if sa is None or sb is None or site not in rep_a["fit"] or site not in rep_b["fit"]:
            continue
        fa, fb = rep_a["fit"][site], rep_b["fit"][site]
        gd = growth_difference(sa.seq_mean, sb.seq_mean, (tuple(fa["window"]), tuple(fb["window"])),
                               weights_a=res_a.seq_n_tokens, weights_b=res_b.seq_n_tokens, n_boot=n_boot, seed=seed)
        growth[site] = {"a": fa, "b": fb, "difference": gd}
        rows.append(row(f"growth factor per layer, {site}", fa["growth_factor"], fa["ci95"], fb["growth_factor"],
                        fb["ci95"], gd["difference"], gd["difference_ci95"], gd.get("ci_method", "bootstrap")))
    # position 0 against the rest, last layer of resid_post
    post_a, post_b = res_a.sites["resid_post"], res_b.sites["resid_post"]
    bos: dict[str, Any] = {}
    for site in ("resid_pre", "resid_post"):
        bos[site] = {"a": res_a.sites[site].bos_mean, "b": res_b.sites[site].bos_mean,
                     "a_rest": res_a.sites[site].mean, "b_rest": res_b.sites[site].mean}

    def bos_ci(res: Results) -> tuple[float, list[float]]:
        st = res.sites["resid_post"]
        m, sd, n = st.bos_mean[-1], st.bos_std[-1], max(res.meta.n_bos_tokens, 1)
        half = Z95 * sd / math.sqrt(n) if n > 1 else math.nan
        return float(m), [m - half, m + half]

    (ba, ba_ci), (bb, bb_ci) = bos_ci(res_a), bos_ci(res_b)
    rows.append(row("position-0 norm, last resid_post", ba, ba_ci, bb, bb_ci))
    rows.append(row("position-0 / other positions, last resid_post", post_a.bos_mean[-1] / post_a.mean[-1], None,
                    post_b.bos_mean[-1] / post_b.mean[-1], None))
    # write norms: per-sequence mean over layers
    writes: dict[str, Any] = {}
    for site in ("attn_out", "mlp_out"):
        ma, ca = _mean_ci(res_a.sites[site].seq_mean.mean(1), res_a.seq_n_tokens)
        mb, cb = _mean_ci(res_b.sites[site].seq_mean.mean(1), res_b.seq_n_tokens)
        writes[site] = {"a": res_a.sites[site].mean, "b": res_b.sites[site].mean}
        rows.append(row(f"mean {site} norm (average over layers)", ma, ca, mb, cb))
    # weights
    if weights_a is not None and weights_b is not None:
        for series in ("W_OV_mean", "W_in", "W_out", "gain_attn", "gain_mlp"):
            fa, fb = weights_a.get("fit", {}).get(series), weights_b.get("fit", {}).get(series)
            if fa and fb:
                rows.append(row(f"weight-norm growth per layer, {series}", fa["growth_factor"], fa["ci95"],
                                fb["growth_factor"], fb["ci95"]))
    # deletion by magnitude
    deletion: dict[str, Any] = {}
    if del_a is not None and del_b is not None:
        da, db = del_a["by_distance"], del_b["by_distance"]
        deletion = {"a": da, "b": db, "locality_a": del_a["locality"], "locality_b": del_b["locality"]}
        for key, label in (("dilution_decay_per_layer", "dilution decay per layer of distance"),
                           ("visibility_decay_per_layer", "visibility decay per layer of distance"),
                           ("share_explained_by_dilution", "share of the visibility fall explained by dilution")):
            rows.append(row(label, da.get(key), da.get(key + "_ci95"), db.get(key), db.get(key + "_ci95")))
        common = sorted(set(da["distance"]) & set(db["distance"]))
        for d in ([common[0], common[-1]] if common else []):
            ia, ib = da["distance"].index(d), db["distance"].index(d)
            ci_a = da.get("retention_ci95", [[None, None]] * len(da["distance"]))[ia]
            ci_b = db.get("retention_ci95", [[None, None]] * len(db["distance"]))[ib]
            rows.append(row(f"retention at distance {d}", da["retention"][ia], ci_a, db["retention"][ib], ci_b))
        la, lb = del_a["locality"], del_b["locality"]
        rows.append(row("reading: mean distance (average over readers)", _nanmean(la["mean_distance"]), None,
                        _nanmean(lb["mean_distance"]), None))
        rows.append(row("equal-norm null: mean distance", _nanmean(la["mean_distance_null"]), None,
                        _nanmean(lb["mean_distance_null"]), None))
    for r in rows:
        r["sentence"] = _sentence(r, name_a, name_b)
    return {
        "models": [res_a.meta.model, res_b.meta.model], "names": [name_a, name_b],
        "ln_free": [res_a.meta.ln_free, res_b.meta.ln_free], "rows": rows, "growth": growth, "bos": bos,
        "writes": writes, "deletion": deletion,
        "curves": {site: {"a": res_a.sites[site].mean, "b": res_b.sites[site].mean}
                   for site in SITES if res_a.sites.get(site) is not None and res_b.sites.get(site) is not None},
        "sentences": [r["sentence"] for r in rows],
        "method": __doc__.strip().split("\n\n", 1)[1],
    }


def _nanmean(values: Any) -> float:
    arr = np.array([np.nan if v is None else v for v in values], dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else math.nan


def format_comparison(doc: dict[str, Any]) -> str:
    a, b = doc["names"]
    lines = [f"A = {doc['models'][0]}{' (LN-free)' if doc['ln_free'][0] else ''}",
             f"B = {doc['models'][1]}{' (LN-free)' if doc['ln_free'][1] else ''}", ""]
    width = max(len(r["label"]) for r in doc["rows"])
    lines.append(f"{'quantity':<{width}}  {'A [95% CI]':>28}  {'B [95% CI]':>28}  {'A - B [95% CI]':>30}  sig")

    def cell(x: float, ci: list[float], w: int) -> str:
        text = f"{x:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if all(np.isfinite(ci)) else "")
        return f"{text:>{w}}"

    for r in doc["rows"]:
        sig = "yes" if r["significant"] else ("no" if r["has_ci"] else "-")
        lines.append(f"{r['label']:<{width}}  {cell(r['a'], r['a_ci95'], 28)}  {cell(r['b'], r['b_ci95'], 28)}  "
                     f"{cell(r['difference'], r['difference_ci95'], 30)}  {sig}")
    lines.append("")
    lines.extend(doc["sentences"])
    return "\n".join(lines)


def plot_comparison(doc: dict[str, Any], path: str | Path) -> list[Path]:
    """Three panels: resid_post norm per layer (log), growth factors with CIs, retention/dilution by distance.

    Writes ``path`` (PNG, 150 dpi) and the same name with ``.pdf``; returns both paths.
    """
    from matplotlib.figure import Figure

    names = doc["names"]
    colors = ["tab:blue", "tab:orange"]
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax_norm, ax_growth, ax_del = fig.subplots(1, 3)
    for i, key in enumerate(("a", "b")):
        curve = np.array(doc["curves"]["resid_post"][key], dtype=float)
        fit = doc["growth"].get("resid_post", {}).get(key)
        label = names[i]
        if fit:
            label += f": {fit['percent_per_layer']:+.1f} %/layer"
        ax_norm.plot(np.arange(len(curve)), curve, "o-", color=colors[i], label=label, ms=3)
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("layer")
    ax_norm.set_ylabel("mean ‖resid_post‖₂ (log scale)")
    ax_norm.set_title("residual norm per layer")
    ax_norm.legend(fontsize=8)
    sites = list(doc["growth"])
    for i, key in enumerate(("a", "b")):
        g = np.array([doc["growth"][s][key]["growth_factor"] for s in sites], dtype=float)
        ci = np.array([doc["growth"][s][key]["ci95"] for s in sites], dtype=float)
        x = np.arange(len(sites)) + (i - 0.5) * 0.25
        ax_growth.errorbar(x, g, yerr=[g - ci[:, 0], ci[:, 1] - g], fmt="o", color=colors[i], label=names[i], capsize=3)
    ax_growth.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_growth.set_xticks(np.arange(len(sites)), sites, rotation=30, fontsize=8)
    ax_growth.set_ylabel("growth factor per layer (95 % CI)")
    ax_growth.set_title("fitted growth")
    ax_growth.legend(fontsize=8)
    if doc.get("deletion"):
        for i, key in enumerate(("a", "b")):
            by = doc["deletion"][key]
            d = np.array(by["distance"], dtype=float)
            ax_del.plot(d, np.array(by["retention"], dtype=float), "o-", color=colors[i], ms=3,
                        label=f"{names[i]} retention ρ")
            ax_del.plot(d, np.array(by["dilution"], dtype=float), "s--", color=colors[i], ms=3,
                        label=f"{names[i]} dilution δ")
        ax_del.set_yscale("log")
        ax_del.set_xlabel("distance (layers)")
        ax_del.set_ylabel("mean over (reader, write) pairs (log)")
        ax_del.set_title("deletion by magnitude")
        ax_del.legend(fontsize=7)
    else:
        ax_del.set_axis_off()
        ax_del.text(0.5, 0.5, "no deletion results", ha="center", va="center")
    fig.suptitle(f"{names[0]} vs {names[1]}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = out.with_suffix(".png"), out.with_suffix(".pdf")
    fig.savefig(png, dpi=150)
    fig.savefig(pdf)
    return [png, pdf]
