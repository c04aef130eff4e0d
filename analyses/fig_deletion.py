"""Figure 6a: deletion by magnitude vs by erasure: retention, dilution and its equal-norm null, excess dilution.

For a write c (embedding, attn_out.l, mlp_out.l) read by a reader L (a block input or the final stream)
d = layer(L) - layer(c) layers later, with every write token-centred (w~ = P(w) - its mean over tokens) and
sums over tokens at positions >= 1: retention rho = sum <r~ from c on, w~_c> / sum ||w~_c||^2 (1 = kept,
0 = erased), dilution delta = sqrt(sum ||w~_c||^2 / sum ||r~_L||^2) and its equal-norm null delta0 (every
write rescaled to one norm, directions kept), and the excess dilution delta / delta0. Each curve is the
mean over the (reader, attn/MLP write) pairs at that distance; hollow markers: fewer than 3 pairs (not
pooled anywhere). Bands are 95 % bootstrap CIs over sequences. Legends give each model's verdict and the
excess-dilution decay per layer (fitted per write, mean over writes; > 1: dilution outpaces its null).
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


def draw_quantity(ax, models, quantity: str, log: bool, null: bool = False) -> None:
    for m in models:
        by = m.deletion["by_distance"]
        d, y = arr(by["distance"]), arr(by[quantity])
        used = np.array(by.get("used", [True] * d.size), dtype=bool)
        lo, hi = ci_band(by.get(quantity + "_ci95"))
        if log:
            y, lo, hi = positive(y), positive(lo), positive(hi)
        verdict = (m.deletion.get("verdict") or {}).get("label", "?")
        label = m.name
        if quantity == "retention":
            rf = m.deletion["verdict"]["retention_far"] if "verdict" in m.deletion else {}
            label += f": {verdict}; d ≥ 2: {with_ci(fnum(rf.get('value')), rf.get('ci95'))}"
        elif quantity == "excess_dilution":
            key = "excess_dilution_decay_per_layer"
            label += f": {with_ci(fnum(by.get(key)), by.get(key + '_ci95'), '.4f')}"
        ax.plot(d, y, color=m.color, linestyle=m.linestyle, label=label)
        ax.plot(d[used], y[used], color=m.color, linestyle="none", marker=m.marker)
        ax.plot(d[~used], y[~used], color=m.color, linestyle="none", marker=m.marker, markerfacecolor="white")
        if lo.size == d.size and np.isfinite(lo).any():
            ax.fill_between(d, lo, hi, color=m.color, alpha=0.2, linewidth=0)
        if null and by.get("dilution_null") is not None:
            ax.plot(d, positive(arr(by["dilution_null"])), color=m.color, linestyle=":", label=f"{m.name}: null δ₀")
    if log:
        log_axis(ax)
    ax.set_xlabel("distance (layers)")


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_deletion(discover(results_dir)) if "excess_dilution" in m.deletion["by_distance"]]
    require(models, "deletion.json (token-centred estimators)", results_dir)
    fig = new_figure(PAGE_WIDTH + 1.5, 5.2)
    ax_r, ax_d, ax_x = grid_axes(fig, 3, 3)
    draw_quantity(ax_r, models, "retention", log=False)
    ax_r.axhline(1.0, color="black", linewidth=0.8, zorder=1)
    ax_r.set_ylabel("retention ρ (1 = kept, 0 = erased)")
    ax_r.set_title("retention ρ: erased by later writes?")
    legend_below(ax_r, title="verdict; retention at d ≥ 2 [95 % CI]")
    draw_quantity(ax_d, models, "dilution", log=True, null=True)
    ax_d.set_ylabel("dilution δ (log scale); dotted: null δ₀")
    ax_d.set_title("dilution δ and its equal-norm null δ₀")
    legend_below(ax_d)
    draw_quantity(ax_x, models, "excess_dilution", log=True)
    ax_x.set_ylabel("excess dilution δ/δ₀ (log scale)")
    ax_x.set_title("excess dilution δ/δ₀: outgrown?")
    legend_below(ax_x, title="excess decay per layer [95 % CI] (> 1: outgrown)")
    fig.suptitle("How an earlier write fades from the stream a reader sees, by distance (ratio-of-sums estimators "
                 "on token-centred writes; bands: 95 % CI over sequences)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
