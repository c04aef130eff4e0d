"""Figure 5b: how much of the write growth is in the weights? Outputs on random inputs against real ones.

Random-input pass (normgrowth.weights.random_input_gains): every block's norms see seeded random
vectors (centred std 1; for LN-free models the real inputs' typical std) instead of the stream, so
the attention/MLP output norm per layer reflects the weights alone. Panels: token mean of ||attn_out||
and of ||mlp_out|| per layer, real data (solid, filled markers) vs random inputs (dotted, open markers),
log axes, with the growth fit of each random series in the legend; and the MLP activation rate
(fraction of pre-activations > 0) on real vs random inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from common import (PAGE_WIDTH, arr, cli, discover, grid_axes, legend_below, log_axis, new_figure, positive,
                    rate_text, require, run_figure, save, gains_comparison_doc, with_weights)

STEM = "fig_random_gains"


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_weights(discover(results_dir)) if gains_comparison_doc(m.weights) is not None]
    require(models, "weights.json with the random-input comparison (random_gains)", results_dir)
    fig = new_figure(PAGE_WIDTH + 1.5, 5.4)
    axes = grid_axes(fig, 3, 3)
    for ax, kind, title in ((axes[0], "attn", "attention output"), (axes[1], "mlp", "MLP output")):
        for m in models:
            c = gains_comparison_doc(m.weights)
            real, rnd = arr(c[f"real_{kind}_out"]), arr(c[f"random_{kind}_out"])
            layers = np.arange(len(real))
            fit = (c.get("fit") or {}).get(f"random_{kind}_out")
            ax.plot(layers, positive(real), color=m.color, marker="o", linestyle="-", label=f"{m.name}: real")
            ax.plot(layers, positive(rnd), color=m.color, marker="o", markerfacecolor="white", linestyle=":",
                    label=f"{m.name}: random" + (f", {rate_text(fit)}" if fit else ""))
        log_axis(ax)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"mean ‖{kind}_out‖₂ (log scale)")
        ax.set_title(f"{title}: real vs random inputs")
        legend_below(ax, title="growth fit of the random series [95 % CI]")
    ax = axes[2]
    drawn = False
    for m in models:
        c = gains_comparison_doc(m.weights)
        if c.get("real_act_rate") is not None:
            real = arr(c["real_act_rate"])
            ax.plot(np.arange(len(real)), real, color=m.color, marker="o", linestyle="-", label=f"{m.name}: real")
            drawn = True
        rnd = arr(c.get("random_act_rate"))
        if rnd.size:
            ax.plot(np.arange(len(rnd)), rnd, color=m.color, marker="o", markerfacecolor="white", linestyle=":",
                    label=f"{m.name}: random")
            drawn = True
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of MLP pre-activations > 0")
    ax.set_title("MLP activation rate")
    if drawn:
        legend_below(ax)
    fig.suptitle("Block outputs on real data vs on random inputs (token means, positions ≥ 1)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
