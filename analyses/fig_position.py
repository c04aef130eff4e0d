"""Figure 3: position 0 against the other positions, and the norm as a function of position.

Left panel: mean ||resid_post|| per layer over tokens at positions >= 1 (solid) and at position 0
(open markers, dotted), per model, log axis. Other panels (one per model): mean ||resid_post|| per
position for a few layers (colour = layer), log axis; position 0 is the leftmost point. A position is
drawn only where at least half of the sequences reach it (position_count), so the tail stays readable.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from common import (NORM_LABEL, PAGE_WIDTH, arr, cli, discover, grid_axes, log_axis, new_figure, positive, require,
                    run_figure, save, with_report)

STEM = "fig_position"
SITE = "resid_post"
N_LAYER_CURVES = 5
MIN_SEQ_SHARE = 0.5


def curve_layers(n_layers: int, k: int = N_LAYER_CURVES) -> list[int]:
    """About ``k`` layers spread evenly from the first to the last."""
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(k, n_layers))})


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_report(discover(results_dir)) if (m.report.get("position") or {}).get(SITE)]
    require(models, f"report.json with {SITE} position curves", results_dir)
    ncols = 3
    n_panels = 1 + len(models)
    fig = new_figure(PAGE_WIDTH + 1, 3.4 * int(np.ceil(n_panels / ncols)))
    axes = grid_axes(fig, n_panels, ncols)

    ax = axes[0]
    for m in models:
        st = m.report["sites"][SITE]
        mean, bos = arr(st["mean"]), arr(st["bos_mean"])
        layers = np.arange(len(mean))
        ax.plot(layers, positive(mean), color=m.color, linestyle="-", marker=m.marker, label=f"{m.name}: pos ≥ 1")
        ax.plot(layers, positive(bos), color=m.color, linestyle=":", marker=m.marker, markerfacecolor="white",
                label=f"{m.name}: pos 0")
    log_axis(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel(NORM_LABEL)
    ax.set_title(f"{SITE}: position 0 vs positions ≥ 1")
    ax.legend(fontsize=7)

    cmap = colormaps["viridis"]
    for ax, m in zip(axes[1:], models):
        pos = arr(m.report["position"][SITE])  # [n_layers, n_positions]
        count = arr(m.report.get("position_count") or np.full(pos.shape[1], 1.0))
        keep = count >= MIN_SEQ_SHARE * np.nanmax(count) if count.size else np.ones(pos.shape[1], bool)
        positions = np.arange(pos.shape[1])[keep]
        chosen = curve_layers(pos.shape[0])
        for i, layer in enumerate(chosen):
            color = cmap(i / max(len(chosen) - 1, 1) * 0.9)
            y = positive(pos[layer][keep])
            ax.plot(positions, y, color=color, linewidth=1.1)
            if positions.size and positions[0] == 0:
                ax.plot([0], [y[0]], color=color, marker="o", markersize=5, linestyle="none")
            if positions.size:
                tail = y[-max(1, positions.size // 10):]
                ax.annotate(f"L{layer}", xy=(positions[-1], np.nanmean(tail)), xytext=(3, 0),
                            textcoords="offset points", va="center", fontsize=8, color=color)
        log_axis(ax)
        ax.set_xlabel("position (0 = first token)")
        ax.set_ylabel(NORM_LABEL)
        ax.set_title(m.name)
        ax.margins(x=0.1)
    fig.suptitle(f"Position 0 (BOS) against the rest (left), and the mean {SITE} norm by position for a few "
                 "layers L (other panels; dot = position 0)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
