"""Figure 6b: where each reader's stream comes from: the reading-share matrix and its equal-norm null.

Reading share R(L, c) = sum <w~_c, r~_L> / sum ||r~_L||^2 (sums over tokens at positions >= 1 of token-centred
projected writes w~ and stream r~): the part of the stream read by reader L (rows: block inputs
resid_pre.l and the final stream) that write c (columns: embedding, then attn_out.l and mlp_out.l in
forward order) contributes; each row sums to 1 and cells can be negative (a write pointing against the
rest). Right of each model: the same
matrix after every write is rescaled to one common norm (directions kept), i.e. what the reading would
be if writes did not differ in size. Grey: the write comes after the reader. Shared diverging colour
scale per model, symmetric about 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize

from common import PAGE_WIDTH, arr, cli, discover, new_figure, require, run_figure, save, with_deletion

STEM = "fig_reading"
MAX_TICKS = 26


def short_write(label: str) -> str:
    """embed -> "emb", attn_out.3 -> "a3", mlp_out.3 -> "m3"."""
    if label == "embed":
        return "emb"
    site, layer = label.split(".")
    return ("a" if site.startswith("attn") else "m") + layer


def short_reader(label: str) -> str:
    return "final" if label == "final" else label.split(".")[-1]


def thin(n: int, max_ticks: int = MAX_TICKS) -> np.ndarray:
    step = max(1, int(np.ceil(n / max_ticks)))
    return np.arange(0, n, step)


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_deletion(discover(results_dir)) if m.deletion.get("reading") is not None]
    require(models, "deletion.json with the reading matrices", results_dir)
    fig = new_figure(PAGE_WIDTH + 1, 3.4 * len(models) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(models), 2, squeeze=False))
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.88")
    for row, m in zip(axes, models):
        reading, null = arr(m.deletion["reading"]), arr(m.deletion["reading_null"])
        both = np.concatenate([reading[np.isfinite(reading)], null[np.isfinite(null)]])
        vmax = max(float(np.max(np.abs(both))) if both.size else 1.0, 1e-6)
        norm = Normalize(vmin=-vmax, vmax=vmax)
        writes = [short_write(w) for w in m.deletion["writes"]]
        readers = [short_reader(r) for r in m.deletion["readers"]]
        for ax, matrix, title in ((row[0], reading, "reading share R"), (row[1], null, "equal-norm null R₀")):
            image = ax.imshow(matrix, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
            xt, yt = thin(len(writes)), thin(len(readers), 20)
            ax.set_xticks(xt, [writes[i] for i in xt], rotation=90 if len(xt) > 12 else 0, fontsize=7)
            ax.set_yticks(yt, [readers[i] for i in yt], fontsize=7)
            ax.set_xlabel("write (emb = embedding, aL / mL = attn / MLP of block L)")
            ax.set_ylabel("reader (block input L, final)")
            ax.set_title(f"{m.name}: {title}")
            ax.grid(False)
        bar = fig.colorbar(image, ax=list(row), shrink=0.9)
        bar.set_label("share of ‖P(r)‖² (row sums to 1)")
    fig.suptitle("Reading shares: which writes make up each reader's stream (ratio of sums, positions ≥ 1)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
