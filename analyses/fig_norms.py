"""Figure 1: mean norm per layer at every residual site, every model, with the preferred growth law.

One panel per site (resid_pre, resid_mid, resid_post, attn_out, mlp_out); in each, the token mean of
the L2 norm per layer (positions >= 1) of every model on a log axis and, over the fit's window, the
fitted curve of the preferred law (exponential, linear or power law; the leading law, marked "?", when
the choice is undecided) as a wide band with its rate and 95 % CI in the legend. When that law is not
the exponential, the fitted exponential is drawn as a thin dotted line for reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from normgrowth.laws import anchored_exponential, law_curve, preferred_law, rate_text as law_rate_text

from common import (NORM_LABEL, PAGE_WIDTH, SITES, arr, cli, discover, grid_axes, log_axis, model_legend_handles,
                    new_figure, note, positive, rate_text, require, run_figure, save, with_report)

STEM = "fig_norms"


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
                if fit.get("law"):
                    a, b = fit["window"]
                    fx = np.arange(a, b + 1, dtype=float)
                    fy = law_curve(law, fit["law"]["laws"][law]["params"], fx)
                    text = f"{law}{'' if decided else '?'} {law_rate_text(fit, law)}"
                else:
                    fx, fy = anchored_exponential(mean, fit)
                    text = f"exponential {rate_text(fit)}"
                ax.plot(fx, positive(fy), color=m.color, linewidth=6, alpha=0.25, solid_capstyle="round", zorder=1,
                        label=f"{m.name}: {text}")
                if law != "exponential":
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
        ax.legend(loc="best", fontsize=7, title="law fit (band), 95 % CI; dotted: exp.", handlelength=1.8)
    legend_ax = axes[-1]
    legend_ax.axis("off")
    legend_ax.legend(handles=model_legend_handles(models), loc="center", title="model (mean over tokens at "
                     "positions ≥ 1)", fontsize=8)
    fig.suptitle("Mean norm per layer at each residual-stream site, with the preferred growth law's fit")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
