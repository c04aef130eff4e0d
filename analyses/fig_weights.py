"""Figure 5a: do the weights grow with depth? Frobenius norms of each layer's weights, with growth fits.

Panels (log axes, one colour per model): ||W_OV^h||_F = ||diag(g1) W_V^h W_O^h||_F for every head
(points) and its mean over heads (line); ||diag(g2) W_in||_F (and the gated MLP's ||diag(g2) W_gate||_F);
||W_out||_F; the norm gains ||g1|| (attention's norm) and ||g2|| (MLP's norm). g1/g2 are the effective
gains (LN-free: g_stored / sqrt(eps)). The wide translucent band on each series is the fitted
exponential over its window; the legend gives its rate "+x.x %/layer [95 % CI]" (regression-SE CI: one
curve per model, no sequences to resample).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from normgrowth.laws import anchored_exponential

from common import (PAGE_WIDTH, arr, cli, discover, grid_axes, legend_below, log_axis, new_figure, note, positive,
                    rate_text, require, run_figure, save, weight_norms_doc, with_weights)

STEM = "fig_weights"

# panel title, y label, [(series key, marker, linestyle, series label)]
PANELS = (
    ("attention OV circuit (per head)", "‖diag(g₁) W_V^h W_O^h‖_F (log scale)", [("W_OV_mean", "o", "-", "head mean")]),
    ("MLP input (gain folded in)", "‖diag(g₂) W‖_F (log scale)", [("W_in", "o", "-", "W_in"), ("W_gate", "^", ":", "W_gate")]),
    ("MLP output", "‖W_out‖_F (log scale)", [("W_out", "o", "-", "W_out")]),
    ("norm gains", "‖g‖₂ (log scale)", [("gain_attn", "o", "-", "g₁ (attn)"), ("gain_mlp", "^", ":", "g₂ (MLP)")]),
)


def series(wn: dict, key: str) -> Optional[np.ndarray]:
    """Per-layer values of a WeightNorms series (W_OV_mean = mean over heads); None when absent."""
    layers = wn["layers"]
    if key == "W_OV_mean":
        return np.array([np.mean(arr(row["W_OV_heads"])) for row in layers])
    values = [row.get(key) for row in layers]
    if all(v is None for v in values):
        return None
    return arr(values)


def draw_series(ax: Any, m: Any, wn: dict, key: str, marker: str, ls: str, label: str, multi: bool) -> bool:
    y = series(wn, key)
    if y is None:
        return False
    layers = np.arange(len(y))
    fit = (wn.get("fit") or {}).get(key)
    text = f"{m.name}{' ' + label if multi else ''}" + (f": {rate_text(fit)}" if fit is not None else "")
    ax.plot(layers, positive(y), color=m.color, marker=marker, linestyle=ls if not m.ln_free else "--",
            markersize=3.5, label=text)
    if fit is not None:
        fx, fy = anchored_exponential(y, fit)
        ax.plot(fx, fy, color=m.color, linewidth=6, alpha=0.22, solid_capstyle="round", zorder=1)
    return True


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_weights(discover(results_dir)) if weight_norms_doc(m.weights) is not None]
    require(models, "weights.json with per-layer weight norms", results_dir)
    fig = new_figure(PAGE_WIDTH + 1, 10.0)
    axes = grid_axes(fig, len(PANELS), 2)
    for ax, (title, ylabel, keys) in zip(axes, PANELS):
        drawn = False
        for m in models:
            wn = weight_norms_doc(m.weights)
            if keys[0][0] == "W_OV_mean":
                ov = arr([row["W_OV_heads"] for row in wn["layers"]])  # [n_layers, n_heads]
                n_layers, n_heads = ov.shape
                jitter = np.linspace(-0.18, 0.18, n_heads) if n_heads > 1 else np.zeros(1)
                xs = np.arange(n_layers)[:, None] + jitter[None, :]
                ax.scatter(xs.ravel(), positive(ov.ravel()), s=6, color=m.color, alpha=0.35, linewidths=0)
            for key, marker, ls, label in keys:
                drawn |= draw_series(ax, m, wn, key, marker, ls, label, multi=len(keys) > 1)
        ax.set_title(title)
        if not drawn:
            note(ax, "not in these checkpoints")
            continue
        log_axis(ax)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        legend_below(ax, title="per-layer growth fit over the band's layers [95 % CI]")
    fig.suptitle("Weight norms per layer (Frobenius; gains folded into the matrices that read the normalised "
                 "stream) with log-linear fits (band)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
