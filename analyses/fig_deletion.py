"""Figure 6a: what each reader reads of an older write, how much of its fall the stream's growth explains, and
whether later writes erase what is new in it.

Per model (one row): left, the reads by distance d (layers) pooled over writes, sum_c I(c, c+d) / sum_c I(c, c+1/2)
(solid) and the same for the no-growth counterfactual I0 (dashed: each write read at the scale of the stream it was
added to), with I(c, L) = sum_t ||W_in,L (gamma_L * P(w_c(t)) / s_L(t))||^2 over every block reader sublayer (Q, K, V;
MLP input); middle, the magnitude share by distance, (log read - log read0 + log read0(1/2)) / log read, and the pooled
share (ratio of the ||w||^2-weighted magnitude and locality slopes) as a band; right, the innovation retention per
write at d >= 2 (the write's residual on every earlier write, kept at later readers: 1 kept, 0 erased), with the
pooled values under both weightings and the median as the sensitivity band. Bands and bars: 95 % bootstrap CIs over
sequences. Titles give each model's verdict label and flags.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from normgrowth.tables import with_ci

from common import (PAGE_WIDTH, arr, ci_band, cli, discover, fnum, log_axis, new_figure, positive, require, run_figure,
                    save, with_deletion)

STEM = "fig_deletion"


def draw_reads(ax, m) -> None:
    by = m.deletion["locality"]["by_distance"]
    d = arr(by["distance"])
    for key, style, name in (("read", "-", "I (live scale)"), ("read_no_growth", "--", "I₀ (no growth)")):
        y = positive(arr(by[key]))
        lo, hi = ci_band(by.get(key + "_ci95"))
        ax.plot(d, y, color=m.color, linestyle=style, marker=m.marker, label=name)
        if lo.size == d.size:
            ax.fill_between(d, positive(lo), positive(hi), color=m.color, alpha=0.2, linewidth=0)
    if d.size:
        log_axis(ax)
    loc = m.deletion["locality"]
    ax.set_title(f"reads by distance; locality slope {with_ci(fnum(loc.get('slope')), loc.get('slope_ci95'))}",
                 fontsize=8)
    ax.set_xlabel("distance (layers)")
    ax.set_ylabel("pooled read / read at d = 1/2")
    ax.legend(fontsize=7)


def draw_share(ax, m) -> None:
    sh = m.deletion["magnitude_share"]
    by = sh.get("by_distance") or {"distance": [], "share": [], "share_ci95": []}
    d, y = arr(by["distance"]), arr(by["share"])
    lo, hi = ci_band(by.get("share_ci95"))
    ax.plot(d, y, color=m.color, marker=m.marker, label="by distance")
    if lo.size == d.size:
        ax.fill_between(d, lo, hi, color=m.color, alpha=0.2, linewidth=0)
    v, ci = fnum(sh.get("value")), sh.get("value_ci95") or [None, None]
    if math.isfinite(v):
        ax.axhline(v, color="black", linewidth=1.0, label=f"pooled {with_ci(v, ci)}")
        clo, chi = fnum(ci[0]), fnum(ci[1])
        if math.isfinite(clo) and math.isfinite(chi):
            ax.axhspan(clo, chi, color="0.5", alpha=0.25, linewidth=0)
    ax.axhline(0.5, color="0.4", linestyle=":", linewidth=0.8)
    ax.set_title("magnitude share (0.5: magnitude / direction split)", fontsize=8)
    ax.set_xlabel("distance (layers)")
    ax.set_ylabel("share of the fall due to growth")
    ax.legend(fontsize=7)


def draw_retention(ax, m) -> None:
    ir = m.deletion["innovation_retention"]
    rows = [r for r in ir["per_write"] if r["in_pool"]]
    x = np.arange(len(rows))
    y = arr([r["retention"] for r in rows])
    ci = arr([r["retention_ci95"] for r in rows]).reshape(-1, 2) if rows else np.zeros((0, 2))
    ax.errorbar(x, y, yerr=np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y])) if rows else None, color=m.color,
                marker=m.marker, linestyle="none", markersize=3, label="per write")
    for key, style, name in (("pooled", "-", "pooled, ||u||² weights"),
                             ("pooled_write_weighted", "--", "pooled, ||w||² weights"), ("median", ":", "median")):
        v = fnum(ir.get(key))
        if math.isfinite(v):
            ax.axhline(v, color="black", linestyle=style, linewidth=1.0,
                       label=f"{name} {with_ci(v, ir.get(key + '_ci95'))}")
    vals = [fnum(ir.get(k)) for k in ("pooled", "pooled_write_weighted", "median")]
    vals = [v for v in vals if math.isfinite(v)]
    if vals:
        ax.axhspan(min(vals), max(vals), color="0.5", alpha=0.2, linewidth=0)
    ax.axhline(0.8, color="0.4", linestyle=":", linewidth=0.8)
    ax.set_xticks(x, [r["write"] for r in rows], rotation=90, fontsize=5)
    ax.set_title(f"innovation retention, d ≥ {ir.get('far_distance', 2)} "
                 f"({ir.get('n_no_innovation', 0)} without innovation)", fontsize=8)
    ax.set_ylabel("kept share of the write's innovation")
    ax.legend(fontsize=6)


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = [m for m in with_deletion(discover(results_dir))
              if (m.deletion.get("locality") or {}).get("by_distance") and m.deletion.get("innovation_retention")]
    require(models, "deletion.json with reads and innovation retention", results_dir)
    fig = new_figure(PAGE_WIDTH + 1.5, 2.6 * len(models) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(models), 3, squeeze=False))
    for row, m in zip(axes, models):
        v = m.deletion["verdict"]
        flags = f" (flags: {', '.join(v.get('flags') or [])})" if v.get("flags") else ""
        draw_reads(row[0], m)
        draw_share(row[1], m)
        draw_retention(row[2], m)
        row[0].annotate(f"{m.name}: {v['label']}{flags}", xy=(0.0, 1.16), xycoords="axes fraction", fontsize=9,
                        fontweight="bold")
    fig.suptitle("Deletion measured where it acts: reads I and I₀ by distance, the magnitude share, innovation "
                 "retention (95 % CIs over sequences)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
