"""Figure 8: residual-stream growth (resid_post) of every model in the results directory, with its growth law.

One row per model with a report.json, sorted by growth factor: the log-linear fit's g (point) with its
95 % CI (bar: bootstrap over sequences), the fit window and the rate in % per layer, then the preferred
growth law (exponential, linear or power law, or "undecided" with the leading law) and that law's rate:
its % per layer, its slope in % of the fitted norm at the window's first layer, or its exponent k.
Rows whose preferred law is not the exponential are marked "≠ exp." (their g is a poor summary). Models are
grouped by normalisation placement (report meta ``norm_placement``): input norm only ("pre"), input and
output norms ("peri", Gemma 2/3), output norm only ("post", OLMo 2), LN-free ("none", open squares); each
group has its own marker, and a labelled band. The vertical line at g = 1 means no growth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D

from normgrowth.laws import law_rate_text, preferred_law

from common import PAGE_WIDTH, cli, discover, fnum, new_figure, require, run_figure, save, with_report

STEM = "fig_summary"
SITE = "resid_post"
PLACEMENTS = ("pre", "peri", "post", "none")  # group order, top to bottom of the legend
PLACEMENT_LABEL = {"pre": "input norm (pre)", "peri": "input + output norm (peri)",
                   "post": "output norm only (post)", "none": "LN-free"}
PLACEMENT_MARKER = {"pre": "o", "peri": "D", "post": "^", "none": "s"}


def placement(m) -> str:
    """The model's norm placement from its report meta (older reports: "none" if LN-free, else "pre")."""
    meta = m.report.get("meta") or {}
    found = meta.get("norm_placement")
    if m.ln_free:
        return "none"
    return found if found in PLACEMENT_LABEL else "pre"


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_report(discover(results_dir)) if (m.report.get("fit") or {}).get(SITE)]
    require(models, f"report.json with a {SITE} growth fit", results_dir)
    rows = sorted(models, key=lambda m: (PLACEMENTS.index(placement(m)), fnum(m.report["fit"][SITE]["growth_factor"])))
    fig = new_figure(PAGE_WIDTH, max(2.4, 1.2 + 0.55 * len(rows)))
    ax = fig.subplots()
    for i, m in enumerate(rows):
        fit = m.report["fit"][SITE]
        g = fnum(fit["growth_factor"])
        lo, hi = (fnum(v) for v in fit["ci95"])
        err = np.array([[g - lo], [hi - g]])
        ax.errorbar([g], [i], xerr=np.where(np.isfinite(err), err, 0), fmt=PLACEMENT_MARKER[placement(m)],
                    color=m.color, capsize=3, markerfacecolor="white" if m.ln_free else m.color, markersize=6)
        a, b = fit["window"]
        ci = f" [{100 * (lo - 1):+.2f}, {100 * (hi - 1):+.2f}]" if np.isfinite([lo, hi]).all() else ""
        law, decided = preferred_law(fit)
        if fit.get("law"):
            law_text = (f"law: {law if decided else f'undecided ({law}?)'} {law_rate_text(fit, law)}"
                        + ("  ≠ exp." if decided and law != "exponential" else ""))
        else:
            law_text = "law: not fitted"
        ax.annotate(f"{100 * (g - 1):+.2f} %/layer{ci}, layers {a}..{b}\n{law_text}",
                    xy=(hi if np.isfinite(hi) else g, i),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=7.5, color="0.25")
    groups = [placement(m) for m in rows]
    for k, group in enumerate(PLACEMENTS):
        idx = [i for i, p in enumerate(groups) if p == group]
        if not idx:
            continue
        if idx[0] > 0:
            ax.axhline(idx[0] - 0.5, color="0.6", linewidth=0.6, linestyle=":")
        ax.text(0.995, idx[-1] + 0.35, PLACEMENT_LABEL[group], transform=ax.get_yaxis_transform(), ha="right",
                va="center", fontsize=7, color="0.35", style="italic")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(np.arange(len(rows)), [m.name for m in rows])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.margins(x=0.6)
    ax.set_xlabel(f"growth factor per layer g of the mean {SITE} norm (95 % CI)")
    ax.set_title(f"Residual-stream norm growth per layer ({SITE}): exponential fit and preferred growth law")
    present = [p for p in PLACEMENTS if p in groups]
    ax.legend(handles=[Line2D([], [], marker=PLACEMENT_MARKER[p], color="0.3", linestyle="none",
                              markerfacecolor="white" if p == "none" else "0.3", label=PLACEMENT_LABEL[p])
                       for p in present], loc="upper left", fontsize=7)
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
