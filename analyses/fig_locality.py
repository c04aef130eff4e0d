"""Figure 6c: locality: how far back does each reader read?

Left: per reader L (block input l at depth l + 1, final stream at n_layers + 1), the mean distance of
what it reads, sum_c R(L, c) d(L, c), with R the reading share (solid),
the same with the equal-norm null R0 (open markers, dotted) and with the direct influence I (dashed):
I(L, c) is the change of reader L's normalised input when write c is replaced by its mean on the direct
path c -> L only, normalised to sum to 1 per reader. Below the null means the reader is dominated by
recent writes more than their directions alone would imply (recent writes are bigger). Right: share of
the stream coming from the last k = 1, 2, 4, 8 layers, averaged over the readers that have writes
farther back than k, for R (filled), R0 (hatched) and I (grey edge). Ratio-of-sums estimators on
token-centred writes, positions >= 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from common import PAGE_WIDTH, arr, cli, discover, fnum, legend_below, new_figure, require, run_figure, save, with_deletion

STEM = "fig_locality"


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_deletion(discover(results_dir)) if m.deletion.get("locality")]
    require(models, "deletion.json with locality", results_dir)
    fig = new_figure(PAGE_WIDTH, 4.6)
    ax_d, ax_s = fig.subplots(1, 2, width_ratios=[1.1, 1])
    for m in models:
        loc = m.deletion["locality"]
        depth = arr(m.deletion["reader_layer"])
        ax_d.plot(depth, arr(loc["mean_distance"]), color=m.color, marker=m.marker, linestyle="-",
                  label=f"{m.name}: R")
        ax_d.plot(depth, arr(loc["mean_distance_null"]), color=m.color, marker=m.marker, markerfacecolor="white",
                  linestyle=":", label=f"{m.name}: null R₀")
        if loc.get("mean_distance_influence") is not None:
            ax_d.plot(depth, arr(loc["mean_distance_influence"]), color=m.color, marker="x", linestyle="--",
                      label=f"{m.name}: influence I")
    lim = max(float(np.nanmax(arr(m.deletion["reader_layer"]))) for m in models)
    ax_d.plot([1, lim], [1, lim], color="0.6", linewidth=0.8, zorder=1)
    ax_d.annotate("grey: reads only the embedding (distance = depth)", xy=(0.02, 0.98), xycoords="axes fraction",
                  fontsize=7, color="0.4", va="top")
    ax_d.set_xlabel("reader depth (layers; block input l at l + 1, final last)")
    ax_d.set_ylabel("mean distance read (layers)")
    ax_d.set_title("mean distance of what each reader reads")
    legend_below(ax_d, ncols=2)

    ks = sorted({k for m in models for k in m.deletion["locality"]["share_within"]}, key=int)
    width = 0.8 / (3 * len(models))
    for i, m in enumerate(models):
        loc = m.deletion["locality"]
        real = [fnum(loc["share_within"].get(k)) for k in ks]
        null = [fnum((loc.get("share_within_null") or {}).get(k)) for k in ks]
        infl = [fnum((loc.get("share_within_influence") or {}).get(k)) for k in ks]
        x = np.arange(len(ks)) - 0.4 + width * (3 * i + 0.5)
        ax_s.bar(x, real, width, color=m.color, label=f"{m.name}: R")
        ax_s.bar(x + width, null, width, facecolor="white", edgecolor=m.color, hatch="///", label=f"{m.name}: null R₀")
        ax_s.bar(x + 2 * width, infl, width, color=m.color, alpha=0.45, edgecolor="0.3", label=f"{m.name}: influence I")
    ax_s.set_xticks(np.arange(len(ks)), [f"≤ {k}" for k in ks])
    ax_s.set_ylim(0, 1.05)
    ax_s.set_xlabel("from the last k layers (distance ≤ k)")
    ax_s.set_ylabel("share of the reader's stream")
    ax_s.set_title("share read from nearby writes")
    legend_below(ax_s, ncols=2)
    fig.suptitle("Locality of reading: reading shares R, equal-norm null R₀ and direct influence I (positions ≥ 1)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
