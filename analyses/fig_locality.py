"""Figure 6c: the reader x write matrix of reads for one model (the real model when present).

Left: log10 of I(c, L) = sum_t ||W_in,L (gamma_L * P(w_c(t)) / s_L(t))||^2, each write's column divided by its largest
read by a block sublayer (so every write's fall with distance is visible on one scale), for every reader sublayer L
(attention Q, K, V inputs; MLP input) and every write c before it; the unembedding's row (last; its input matrix is
vocabulary-wide) is divided by its own largest read. Right: log10 of I / I0, the part of the read
that the growth of the reader's scale since the write removes (I0: the same read at the scale of the stream the write
was added to). The model is ``results/models/smollm2-135m`` when it has a deletion.json, else the first model.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

from common import PAGE_WIDTH, arr, cli, discover, new_figure, require, run_figure, save, with_deletion

STEM = "fig_locality"
PREFERRED = "smollm2-135m"


def pick(models):
    for m in models:
        if m.slug == PREFERRED:
            return m
    return models[0]


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_deletion(discover(results_dir)) if m.deletion.get("read") is not None]
    require(models, "deletion.json with the read matrices", results_dir)
    m = pick(models)
    doc = m.deletion
    read, read0 = arr(doc["read"]), arr(doc["read_no_growth"])
    block = np.array([r != "unembed" for r in doc["read_readers"]])
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a write no block reads (a zero write): an all-NaN column
        pos = np.where(read > 0, read, np.nan)
        scale = np.where(block[:, None], np.nanmax(np.where(block[:, None], pos, np.nan), 0)[None, :],
                         np.nanmax(pos[~block]) if (~block).any() else np.nan)
        rel = np.log10(pos / scale)
        ratio = np.log10(np.where((read > 0) & (read0 > 0), read / read0, np.nan))
    readers, writes = doc["read_readers"], doc["writes"]
    fig = new_figure(PAGE_WIDTH + 1.5, 5.0)
    axes = fig.subplots(1, 2)
    for ax, mat, title, cmap in ((axes[0], rel, "log10 I(c, L) / largest block read of c", "viridis"),
                                 (axes[1], ratio, "log10 I / I₀ (growth since the write)", "magma")):
        finite = mat[np.isfinite(mat)]
        lo = float(np.percentile(finite, 1)) if finite.size else -1.0
        im = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=lo, vmax=float(finite.max()) if finite.size else 0.0,
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8)
        step = max(1, len(writes) // 16)
        ax.set_xticks(np.arange(0, len(writes), step), writes[::step], rotation=90, fontsize=6)
        rstep = max(1, len(readers) // 16)
        ax.set_yticks(np.arange(0, len(readers), rstep), readers[::rstep], fontsize=6)
        ax.set_xlabel("write c")
        ax.set_ylabel("reader sublayer L")
        ax.set_title(title, fontsize=8)
    v = doc["verdict"]
    fig.suptitle(f"{m.name}: what each reader reads of each older write (verdict: {v['label']})")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
