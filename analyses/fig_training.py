"""Growth over training: the fitted growth factor per layer of each site, and of the weight norms, against step.

Reads every ``R/sweep*.json`` (``normgrowth sweep ... --json``), one row of panels per series (a parent folder
of checkpoints or a hub model). Left: the report's growth factor per site (log-linear fit over the default
window) at each checkpoint, band = its 95 % CI (bootstrap over sequences). Right: the growth factor per
layer of the weight-norm series W_OV (head mean of ||diag(g1) W_V^h W_O^h||_F), W_in and W_out, band = the
regression interval of that single curve. x is the training step on a log scale (linear below 1, so that
step 0 shows).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from common import PAGE_WIDTH, SITES, MissingInput, cli, new_figure, read_json, run_figure, save
from normgrowth.sweep import fit_series

STEM = "fig_training"
WEIGHT_SERIES = ("W_OV_mean", "W_in", "W_out")
COLORS = ("#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd")


def sweep_series(results_dir: Path) -> list[tuple[str, list[dict]]]:
    """``[(series name, points with a step, in step order)]`` from every ``R/sweep*.json``."""
    found: list[tuple[str, list[dict]]] = []
    for path in sorted(Path(results_dir).glob("sweep*.json")):
        doc = read_json(path)
        groups: dict[str, list[dict]] = {}
        for p in (doc or {}).get("points") or []:
            if p.get("step") is not None:
                groups.setdefault(str(p.get("series") or p["checkpoint"]), []).append(p)
        for name, points in groups.items():
            if len(points) >= 2:
                found.append((name, sorted(points, key=lambda p: p["step"])))
    return found


def _band(ax, s: dict, color: str, label: str) -> None:
    x = s["step"].astype(float)
    ax.plot(x, s["g"], color=color, marker="o", label=label)
    ok = np.isfinite(s["lo"]) & np.isfinite(s["hi"])
    if ok.any():
        ax.fill_between(x[ok], s["lo"][ok], s["hi"][ok], color=color, alpha=0.18, linewidth=0)


def _short(name: str) -> str:
    parts = name.rstrip("/").replace("\\", "/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else name


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    series = sweep_series(results_dir)
    if not series:
        raise MissingInput(f"no sweep*.json with two or more stepped checkpoints in {results_dir}")
    fig = new_figure(PAGE_WIDTH, 1.0 + 3.0 * len(series))
    axes = np.atleast_2d(fig.subplots(len(series), 2, squeeze=False))
    for (name, points), (left, right) in zip(series, axes):
        for site, color in zip(SITES, COLORS):
            s = fit_series(points, site)
            if s["step"].size:
                _band(left, s, color, site)
        for key, color in zip(WEIGHT_SERIES, COLORS):
            s = fit_series(points, key, key="weight_fit")
            if s["step"].size:
                _band(right, s, color, key)
        for ax in (left, right):
            ax.set_xscale("symlog", linthresh=1.0)
            ax.axhline(1.0, color="black", linewidth=0.8, zorder=1)
            ax.set_xlabel("training step (log scale; step 0 at left)")
            ax.legend(loc="best", ncol=2)
        left.set_ylabel("growth factor per layer")
        left.set_title(f"{_short(name)}: residual-stream growth (band: 95 % CI)")
        right.set_ylabel("weight-norm growth factor per layer")
        right.set_title(f"{_short(name)}: weight-norm growth (band: 95 % CI)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
