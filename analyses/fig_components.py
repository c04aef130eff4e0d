"""Figure 4: what the blocks write: attention and MLP output norms per layer, and per-head write norms.

First panel: token mean (positions >= 1) of ||attn_out|| (solid) and ||mlp_out|| (dotted) per layer and
model, log axis (attn_out includes the output bias b_O, mlp_out includes b_out). Other panels (one per
model): heat map of the per-head write norm ||z_h W_O^h|| (bias excluded), token mean over positions >= 1,
layers down, heads across, log colour scale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.ticker import MaxNLocator

from common import (NORM_LABEL, PAGE_WIDTH, arr, cli, discover, grid_axes, legend_below, log_axis, new_figure, plain_log_ticks, positive, require,
                    run_figure, save, with_report)

STEM = "fig_components"


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_report(discover(results_dir))
              if m.report["sites"].get("attn_out") is not None or m.report["sites"].get("mlp_out") is not None]
    require(models, "report.json with attn_out/mlp_out statistics", results_dir)
    head_models = [m for m in models if m.report.get("heads")]
    ncols = 3
    n_panels = 1 + len(head_models)
    n_rows = int(np.ceil(n_panels / ncols))
    fig = new_figure(PAGE_WIDTH + 1, 3.5 * n_rows)
    axes = grid_axes(fig, n_panels, ncols)

    ax = axes[0]
    for m in models:
        for site, ls, mk in (("attn_out", "-", "o"), ("mlp_out", ":", "^")):
            st = m.report["sites"].get(site)
            if st is None:
                continue
            mean = arr(st["mean"])
            ax.plot(np.arange(len(mean)), positive(mean), color=m.color, linestyle=ls, marker=mk,
                    label=f"{m.name}: {site}")
    log_axis(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel(NORM_LABEL)
    ax.set_title("block writes: attn_out (—), mlp_out (···)")
    legend_below(ax)

    for ax, m in zip(axes[1:], head_models):
        heads = arr(m.report["heads"]["mean"])  # [n_layers, n_heads]
        finite = heads[np.isfinite(heads) & (heads > 0)]
        if finite.size and finite.max() / finite.min() > 1.5:
            norm = LogNorm(vmin=finite.min(), vmax=finite.max())
            scale = "log colour scale"
        else:
            norm = Normalize(vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
            scale = "linear colour scale"
        image = ax.imshow(np.where(heads > 0, heads, np.nan), aspect="auto", origin="upper", cmap="magma",
                          norm=norm, interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
        ax.grid(False)
        ax.set_title(f"{m.name}: per-head ‖z_h W_O^h‖")
        bar = fig.colorbar(image, ax=ax, shrink=0.9)
        bar.set_label(f"mean ‖z_h W_O^h‖₂ ({scale})")
        if isinstance(norm, LogNorm):
            plain_log_ticks(bar.ax.yaxis)
    fig.suptitle("Attention and MLP write norms per layer, and per-head attention write norms (token means, "
                 "positions ≥ 1)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
