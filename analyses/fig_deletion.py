"""Figure 6a: deletion by magnitude vs by erasure: retention, dilution and visibility against distance.

For a write c (embedding, attn_out.l, mlp_out.l) read by a reader L (a block input or the final stream)
d = layer(L) - layer(c) layers later, per token, with P the model's normalisation projection:
retention rho = what is left of P(w_c) along its own direction in P(r_L) (1 = nothing erased),
dilution delta = ||P(w_c)|| / ||P(r_L)|| (how small the write is next to the stream), visibility
nu = rho * delta. Each curve is the mean over all (reader, write) pairs at that distance of the token
means (positions >= 1); bands are 95 % bootstrap CIs over sequences. Legends give the fitted decay per
layer (exp(-slope) of log nu or log delta against d; > 1 means it falls) and the share of the fall of
visibility explained by dilution.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from common import (PAGE_WIDTH, arr, ci_band, cli, discover, fnum, grid_axes, legend_below, log_axis, new_figure,
                    positive, require, run_figure, save, with_deletion)

STEM = "fig_deletion"


def with_ci(x: float, ci: list, spec: str = ".3f") -> str:
    lo, hi = (fnum(v) for v in (ci or [None, None]))
    if not math.isfinite(x):
        return "n/a"
    if math.isfinite(lo) and math.isfinite(hi):
        return f"{x:{spec}} [{lo:{spec}}, {hi:{spec}}]"
    return f"{x:{spec}}"


def draw_quantity(ax, models, quantity: str, log: bool) -> None:
    for m in models:
        by = m.deletion["by_distance"]
        d, y = arr(by["distance"]), arr(by[quantity])
        lo, hi = ci_band(by.get(quantity + "_ci95"))
        if log:
            y, lo, hi = positive(y), positive(lo), positive(hi)
        label = m.name
        if quantity in ("dilution", "visibility"):
            key = f"{quantity}_decay_per_layer"
            label += f": {with_ci(fnum(by.get(key)), by.get(key + '_ci95'))}"
        elif quantity == "retention":
            key = "share_explained_by_dilution"
            label += f": share by dilution {with_ci(fnum(by.get(key)), by.get(key + '_ci95'), '.2f')}"
        ax.plot(d, y, color=m.color, linestyle=m.linestyle, marker=m.marker, label=label)
        if lo.size == d.size and np.isfinite(lo).any():
            ax.fill_between(d, lo, hi, color=m.color, alpha=0.2, linewidth=0)
    if log:
        log_axis(ax)
    ax.set_xlabel("distance (layers)")


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = with_deletion(discover(results_dir))
    require(models, "deletion.json", results_dir)
    fig = new_figure(PAGE_WIDTH + 1.5, 5.2)
    ax_r, ax_d, ax_v = grid_axes(fig, 3, 3)
    draw_quantity(ax_r, models, "retention", log=False)
    ax_r.axhline(1.0, color="black", linewidth=0.8, zorder=1)
    ax_r.set_ylabel("retention ρ (1 = not erased)")
    ax_r.set_title("retention ρ: erased by later writes?")
    legend_below(ax_r, title="share of the fall of ν explained by δ [95 % CI]")
    draw_quantity(ax_d, models, "dilution", log=True)
    ax_d.set_ylabel("dilution δ = ‖P(w)‖ / ‖P(r)‖ (log scale)")
    ax_d.set_title("dilution δ: outgrown by the stream?")
    legend_below(ax_d, title="decay factor per layer [95 % CI] (> 1: falls)")
    draw_quantity(ax_v, models, "visibility", log=True)
    ax_v.set_ylabel("visibility ν = ρ·δ (log scale)")
    ax_v.set_title("visibility ν = ρ δ")
    legend_below(ax_v, title="decay factor per layer [95 % CI] (> 1: falls)")
    fig.suptitle("How an earlier write fades from the stream a reader sees, by distance (mean over reader-write "
                 "pairs; bands: 95 % CI over sequences)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
