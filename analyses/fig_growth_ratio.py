"""Figure 2: per-layer growth ratio resid_post[l] / resid_post[l-1] with its 95 % CI, per model.

The ratio is of token means of ||resid_post|| (positions >= 1); the band is the percentile bootstrap
over sequences stored in report.json ("layer_ratios"). The thin horizontal segment in each model's colour
is the fitted growth factor over the fit window; the black line at 1 means no growth. A constant ratio is
what an exponential law predicts; a linear law gives ratios falling like 1 + 1/(l + p/q), a power law
1 + k/(l + 1). The legend names the preferred law of each model (see fig_norms).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from normgrowth.laws import preferred_law

from common import (PAGE_WIDTH, arr, cli, discover, fnum, model_legend_handles, new_figure, rate_text, require,
                    run_figure, save, with_report)

STEM = "fig_growth_ratio"
SITE = "resid_post"


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_report(discover(results_dir)) if SITE in (m.report.get("layer_ratios") or {})]
    require(models, f"report.json with {SITE} layer ratios (needs >= 2 layers)", results_dir)
    fig = new_figure(PAGE_WIDTH, 4.2)
    ax = fig.subplots()
    ax.axhline(1.0, color="black", linewidth=0.9, zorder=1)
    handles = model_legend_handles(models)
    for m, h in zip(models, handles):
        lr = m.report["layer_ratios"][SITE]
        ratio, lo, hi = arr(lr["ratio"]), arr(lr["ci95_lo"]), arr(lr["ci95_hi"])
        layers = np.arange(1, len(ratio) + 1)
        ax.plot(layers, ratio, color=m.color, linestyle=m.linestyle, marker=m.marker)
        if np.isfinite(lo).any():
            ax.fill_between(layers, lo, hi, color=m.color, alpha=0.2, linewidth=0)
        fit = (m.report.get("fit") or {}).get(SITE)
        if fit is not None:
            a, b = fit["window"]
            ax.hlines(fnum(fit["growth_factor"]), a + 0.5, b, color=m.color, linewidth=3, alpha=0.35)
            law, decided = preferred_law(fit)
            law_text = f"; law: {law}{'' if decided else '?'}" if fit.get("law") else ""
            h.set_label(f"{m.name}  (fit {a}..{b}: {rate_text(fit)}{law_text})")
    ax.set_xlabel("layer l")
    ax.set_ylabel(f"growth ratio ‖x_l‖ / ‖x_(l-1)‖  ({SITE})")
    ax.set_title(f"Per-layer growth ratio of the mean {SITE} norm (band: 95 % CI, bootstrap over sequences; "
                 "wide bar: fitted factor)")
    ax.legend(handles=handles, loc="best")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
