"""Figure 1: mean norm per layer at every residual site, every model: model-free growth first, the law second.

One panel per site (resid_pre, resid_mid, resid_post, attn_out, mlp_out); in each, the token mean of
the L2 norm per layer (positions >= 1) of every model on a log axis. The legend gives the model-free numbers
first: the mean log-slope over the fit's window as % per layer with its 95 % CI and the window-sensitivity
band (range over every window of >= 5 layers skipping the first and last layer). The law is a labelled
interpretation: over the window, the fitted curve of the decided law (the leading law, marked "?", when
undecided; none drawn when every law is rejected) as a wide band; the fitted exponential as a thin dotted line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from normgrowth.laws import NONE, anchored_exponential, law_curve, law_rate_text, preferred_law
from normgrowth.storage import as_float
from normgrowth.tables import fmt_number, with_ci

from common import (NORM_LABEL, PAGE_WIDTH, SITES, arr, cli, discover, grid_axes, log_axis, model_legend_handles,
                    new_figure, note, positive, rate_text, require, run_figure, save, with_report)

STEM = "fig_norms"


def model_free_text(fit: dict) -> str:
    """``+4.8 [4.6, 5.0] %/l, band +2.5..+14.8`` (%/l: % per layer) from a GrowthFit JSON (the exponential fit's rate for a fit
    saved without model-free numbers)."""
    s = as_float(fit.get("mean_log_slope"))
    if not np.isfinite(s):
        return rate_text(fit)
    pct = [100 * np.expm1(as_float(v)) for v in fit.get("mean_log_slope_ci95") or (None, None)]
    text = f"{with_ci(100 * np.expm1(s), pct, '+.1f')} %/l"
    ws = fit.get("window_sensitivity") or {}
    if ws.get("n_windows"):
        text += f", band {fmt_number(ws.get('min_percent'), '+.1f')}..{fmt_number(ws.get('max_percent'), '+.1f')}"
    return text


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = with_report(discover(results_dir))
    require(models, "report.json", results_dir)
    fig = new_figure(PAGE_WIDTH + 1, 6.6)
    axes = grid_axes(fig, len(SITES) + 1, 3)
    for ax, site in zip(axes, SITES):
        drawn = False
        for m in models:
            st = m.report["sites"].get(site)
            if st is None:
                continue
            mean = arr(st["mean"])
            layers = range(len(mean))
            ax.plot(layers, positive(mean), color=m.color, linestyle=m.linestyle, marker=m.marker, markersize=3,
                    alpha=0.85)
            fit = (m.report.get("fit") or {}).get(site)
            if fit is not None:
                law, decided = preferred_law(fit)
                best = (fit.get("law") or {}).get("best")
                text = model_free_text(fit)
                if fit.get("law") and best != NONE:
                    a, b = fit["window"]
                    fx = np.arange(a, b + 1, dtype=float)
                    fy = law_curve(law, fit["law"]["laws"][law]["params"], fx)
                    text += f"; law {law}{'' if decided else '?'} {law_rate_text(fit, law)}"
                else:
                    fx, fy = anchored_exponential(mean, fit)
                    text += "; none fits" if best == NONE else ""
                ax.plot(fx, positive(fy), color=m.color, linewidth=6, alpha=0.25, solid_capstyle="round", zorder=1,
                        label=f"{m.name}: {text}")
                if law != "exponential" or best == NONE:
                    ex, ey = anchored_exponential(mean, fit)
                    ax.plot(ex, ey, color=m.color, linewidth=0.9, linestyle=":", zorder=1)
            drawn = True
        ax.set_title(site)
        if not drawn:
            note(ax, f"no {site} in these models\n(parallel blocks)")
            continue
        log_axis(ax)
        ax.set_xlabel("layer")
        ax.set_ylabel(NORM_LABEL)
        # drawn over the plot, outside the layout: long labels must not shrink the axes
        legend = ax.legend(loc="upper left", fontsize=6, title="mean log-slope [95 % CI], band; law",
                           title_fontsize=6, handlelength=1.2, framealpha=0.85)
        legend.set_in_layout(False)
    legend_ax = axes[-1]
    legend_ax.axis("off")
    legend_ax.legend(handles=model_legend_handles(models), loc="center", title="model (mean over tokens at "
                     "positions ≥ 1)", fontsize=8)
    fig.suptitle("Mean norm per layer at each residual-stream site: model-free growth, then the growth law")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
