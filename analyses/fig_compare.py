"""Figure 7: with LayerNorm vs without: norm growth and deletion side by side for one model pair.

The pair: the two models named in R/compare.json when both have a report.json; otherwise the first
LN-free model and, as its partner, the LayerNorm model of the same shape (n_layers, d_model), else the
first LayerNorm model, else the first other model. Panels: (a) mean ||resid_post|| per layer of both
(log axis) with their fitted exponentials (bands) and rates; (b) growth factor per layer with 95 % CI
for every residual site of both, and the difference g_LN - g_noLN with its 95 % CI (from compare.json
when present: independent bootstraps over sequences; otherwise approximated from the two CIs, normal on
the log scale); (c) retention and (d) dilution against distance for both (deletion.json), with 95 % CI
bands.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from common import (NORM_LABEL, PAGE_WIDTH, MissingInput, ModelResults, arr, ci_band, cli, discover, fit_line, fnum, grid_axes,
                    legend_below, log_axis, new_figure, note, positive, rate_text, read_json, require, run_figure,
                    save, with_report)

STEM = "fig_compare"
RESID_SITES = ("resid_pre", "resid_mid", "resid_post")
Z95 = 1.959963984540054


def pick_pair(models: list[ModelResults], compare: Optional[dict]) -> tuple[ModelResults, ModelResults]:
    """(model with normalisation, LN-free model); see the module docstring for the rule."""
    if compare and len(compare.get("models") or []) == 2:
        by_spec = {str(m.report.get("model")): m for m in models}
        a, b = (by_spec.get(str(name)) for name in compare["models"])
        if a is not None and b is not None and a is not b:
            return (b, a) if a.ln_free and not b.ln_free else (a, b)
    free = [m for m in models if m.ln_free]
    normed = [m for m in models if not m.ln_free]
    if not free or not normed:
        raise MissingInput("no pair: needs the report.json of one LN-free model and of one model with "
                           "normalisation")
    b = free[0]

    def shape(m: ModelResults) -> tuple:
        return (m.report.get("n_layers"), m.report.get("d_model"))

    ln = [m for m in normed if m.report.get("normalization") == "LN"]
    twins = [m for m in ln if shape(m) == shape(b)]
    a = (twins or ln or normed)[0]
    return a, b


def approx_difference(fa: dict, fb: dict) -> dict:
    """g_a - g_b with a 95 % CI from the two fits' CIs, each taken as normal on the log scale:
    se_i = (log hi_i - log lo_i) / (2 z), se(g_a - g_b) = sqrt((g_a se_a)^2 + (g_b se_b)^2) (delta method)."""
    ga, gb = fnum(fa["growth_factor"]), fnum(fb["growth_factor"])
    ses = []
    for f in (fa, fb):
        lo, hi = (fnum(v) for v in f["ci95"])
        ses.append((math.log(hi) - math.log(lo)) / (2 * Z95) if lo > 0 and hi > 0 else float("nan"))
    diff = ga - gb
    se = math.sqrt((ga * ses[0]) ** 2 + (gb * ses[1]) ** 2)
    lo, hi = diff - Z95 * se, diff + Z95 * se
    return {"difference": diff, "difference_ci95": [lo, hi], "significant": bool(lo > 0 or hi < 0),
            "method": "≈ from the two CIs"}


def growth_difference(compare: Optional[dict], pair_from_compare: bool, swapped: bool, site: str, fa: dict,
                      fb: dict) -> dict:
    """compare.json's difference for ``site`` (sign flipped if its order is (no LN, LN)), else the approximation."""
    if pair_from_compare and compare:
        diff = ((compare.get("growth") or {}).get(site) or {}).get("difference")
        if isinstance(diff, dict) and diff.get("difference") is not None and diff.get("difference_ci95"):
            d = fnum(diff["difference"])
            lo, hi = (fnum(v) for v in diff["difference_ci95"])
            if swapped:
                d, lo, hi = -d, -hi, -lo
            return {"difference": d, "difference_ci95": [lo, hi], "significant": bool(lo > 0 or hi < 0),
                    "method": diff.get("ci_method") or "from compare.json"}
    return approx_difference(fa, fb)


def deletion_curves(m: ModelResults, compare: Optional[dict], side: Optional[str]) -> Optional[dict]:
    if m.deletion is not None:
        return m.deletion["by_distance"]
    if compare and side:
        by = (compare.get("deletion") or {}).get(side)
        if isinstance(by, dict) and "distance" in by:
            return by
    return None


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = with_report(discover(results_dir))
    require(models, "report.json", results_dir)
    compare = read_json(results_dir / "compare.json")
    a, b = pick_pair(models, compare)
    names = [str(n) for n in (compare or {}).get("models") or []]
    from_compare = names == [str(a.report["model"]), str(b.report["model"])] or \
        names == [str(b.report["model"]), str(a.report["model"])]
    swapped = from_compare and names[0] == str(b.report["model"])
    sides = ({a.slug: "b" if swapped else "a", b.slug: "a" if swapped else "b"} if from_compare else {})

    fig = new_figure(PAGE_WIDTH + 1, 8.4)
    ax_n, ax_g, ax_r, ax_d = grid_axes(fig, 4, 2)

    for m in (a, b):
        mean = arr(m.report["sites"]["resid_post"]["mean"])
        fit = (m.report.get("fit") or {}).get("resid_post")
        ax_n.plot(np.arange(len(mean)), positive(mean), color=m.color, linestyle=m.linestyle, marker=m.marker,
                  label=f"{m.name}" + (f": {rate_text(fit)}" if fit else ""))
        if fit:
            fx, fy = fit_line(mean, fit)
            ax_n.plot(fx, fy, color=m.color, linewidth=6, alpha=0.25, solid_capstyle="round", zorder=1)
    log_axis(ax_n)
    ax_n.set_xlabel("layer")
    ax_n.set_ylabel(NORM_LABEL)
    ax_n.set_title("(a) resid_post norm, fitted exponential (band)")
    ax_n.legend(title="growth fit [95 % CI]")

    sites = [s for s in RESID_SITES if (a.report.get("fit") or {}).get(s) and (b.report.get("fit") or {}).get(s)]
    y = np.arange(len(sites))
    for k, (m, offset) in enumerate(((a, 0.15), (b, -0.15))):
        g = np.array([fnum(m.report["fit"][s]["growth_factor"]) for s in sites])
        ci = np.array([[fnum(v) for v in m.report["fit"][s]["ci95"]] for s in sites]).reshape(-1, 2)
        err = np.abs(np.vstack([g - ci[:, 0], ci[:, 1] - g]))
        ax_g.errorbar(g, y + offset, xerr=np.where(np.isfinite(err), err, 0), fmt=m.marker, color=m.color,
                      capsize=3, label=m.name)
    labels, method = [], ""
    for s in sites:
        diff = growth_difference(compare, from_compare, swapped, s, a.report["fit"][s], b.report["fit"][s])
        lo, hi = diff["difference_ci95"]
        star = " *" if diff["significant"] else ""
        labels.append(f"{s}\nΔg = {diff['difference']:+.4f}\n[{lo:+.4f}, {hi:+.4f}]{star}")
        method = diff["method"]
    ax_g.axvline(1.0, color="black", linewidth=0.8)
    ax_g.set_yticks(y, labels, fontsize=7.5)
    ax_g.set_ylim(-0.6, len(sites) - 0.4)
    ax_g.margins(x=0.15)
    ax_g.set_xlabel("growth factor per layer g (95 % CI)")
    ax_g.set_title(f"(b) growth factors; Δg = g({a.name}) − g({b.name})", fontsize=8.5)
    legend_below(ax_g, ncols=2, title=f"Δg 95 % CI: {method}; * = excludes 0")

    curves = {m.slug: deletion_curves(m, compare, sides.get(m.slug)) for m in (a, b)}
    for ax, q, log, title in ((ax_r, "retention", False, "(c) retention ρ (1 = not erased)"),
                              (ax_d, "dilution", True, "(d) dilution δ = ‖P(w)‖ / ‖P(r)‖")):
        ax.set_title(title)
        drawn = False
        for m in (a, b):
            by = curves[m.slug]
            if by is None or by.get(q) is None:
                continue
            d, v = arr(by["distance"]), arr(by[q])
            lo, hi = ci_band(by.get(q + "_ci95"))
            label = m.name
            key = f"{q}_decay_per_layer"
            if by.get(key) is not None and q == "dilution":
                label += f": decay factor {fnum(by[key]):.3f}/layer"
            if log:
                v, lo, hi = positive(v), positive(lo), positive(hi)
            ax.plot(d, v, color=m.color, linestyle=m.linestyle, marker=m.marker, label=label)
            if lo.size == d.size and np.isfinite(lo).any():
                ax.fill_between(d, lo, hi, color=m.color, alpha=0.2, linewidth=0)
            drawn = True
        if not drawn:
            note(ax, "no deletion.json for this pair")
            continue
        if log:
            log_axis(ax)
        else:
            ax.axhline(1.0, color="black", linewidth=0.8, zorder=1)
        ax.set_xlabel("distance (layers)")
        ax.set_ylabel(q + (" (log scale)" if log else ""))
        ax.legend()
    fig.suptitle(f"With vs without LayerNorm: {a.name} vs {b.name}")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
