"""Figure 6d: the effective layer horizon, with the norms' scales live and frozen at their clean values.

Left: relative excess loss loss(n) / clean - 1 (in %) when every reader (each block's attention and MLP
input norms, the final norm) sees only the writes of the last n blocks, older writes replaced by their
token-mean (positions >= 1). Solid: live scales (each norm divides by the scale of its modified input);
dashed: each reader's scale frozen at its clean value for that token (the division removed from the
ablation's effect). The gap between the two is how much of the model's locality passes through the norm.
Grey lines: 1 % and 10 % of clean; the legend gives the horizon within 1 % / 10 % (live, frozen) with
95 % CIs. Right: causal check, mean-ablating one write at a time: relative change of each later reader's
normalised input against distance, live (solid) and frozen (dashed), mean over the ablated writes' pairs.
Bands: 95 % bootstrap CIs over evaluation sequences. Reads R/models/<slug>/horizon.json
(``normgrowth horizon MODEL --json``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path


from common import (PAGE_WIDTH, MissingInput, ModelResults, arr, ci_band, cli, discover, display_name, fnum,
                    legend_below, log_axis, new_figure, note, positive, read_json, run_figure, save)

STEM = "fig_horizon"
THRESHOLDS = ("1%", "10%")


def _models(results_dir: Path) -> list[tuple]:
    """(model results, horizon document) for every model directory with a horizon.json."""
    models = discover(results_dir)
    root = Path(results_dir) / "models"
    known = {m.slug for m in models}
    extra = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in known) if root.is_dir() else []
    for i, path in enumerate(extra):  # a model with a horizon.json only
        models.append(ModelResults(slug=path.name, path=path, color=f"C{(len(models) + i) % 10}"))
    found = [(m, read_json(m.path / "horizon.json")) for m in models]
    found = [(m, doc) for m, doc in found if doc is not None]
    for m, doc in found:
        if not m.doc:
            m._name = display_name(doc.get("model") or m.slug, bool(doc.get("ln_free")))
    if not found:
        raise MissingInput(f"no horizon.json under {Path(results_dir) / 'models'}/*/")
    return found


def _horizon_text(doc: dict, mode: str) -> str:
    parts = []
    for key in THRESHOLDS:
        h = (doc[mode].get("horizon") or {}).get(key)
        if h is None:
            continue
        lo, hi = (fnum(v) for v in h["ci"])
        ci = f" [{lo:g}, {hi:g}]" if math.isfinite(lo) and math.isfinite(hi) else ""
        parts.append(f"{key}: {fnum(h['value']):g}{ci}")
    return ", ".join(parts)


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    models = _models(results_dir)
    fig = new_figure(PAGE_WIDTH, 4.8)
    ax_h, ax_c = fig.subplots(1, 2, width_ratios=[1.2, 1])
    for m, doc in models:
        n = arr(doc["horizons"])
        for mode, style in (("live", "-"), ("frozen", "--")):
            y = 100 * arr(doc[mode]["excess"])
            lo, hi = ci_band(doc[mode]["excess_ci"])
            label = f"{m.name} ({mode}): within {_horizon_text(doc, mode)}"
            bad = [f"{h:g}" for h, c in zip(n, ((doc.get("nonfinite") or {}).get("predictions") or {}).get(mode) or [])
                   if c]
            if bad:
                label += f"; overflow at n={','.join(bad)}"
            ax_h.plot(n, y, color=m.color, linestyle=style, marker=m.marker if mode == "live" else None, label=label)
            if lo.size:
                ax_h.fill_between(n, 100 * lo, 100 * hi, color=m.color, alpha=0.15 if mode == "live" else 0.08,
                                  linewidth=0)
    for q in (1, 10):
        ax_h.axhline(q, color="0.6", linewidth=0.8, zorder=1)
    ax_h.set_yscale("symlog", linthresh=1.0)
    ax_h.set_xlabel("horizon n (blocks each reader sees)")
    ax_h.set_ylabel("excess loss over clean (%, symlog)")
    ax_h.set_title("loss when readers see only the last n blocks")
    legend_below(ax_h, ncols=1)

    drawn = False
    for m, doc in models:
        causal = doc.get("causal")
        if not causal or not causal.get("distance"):
            continue
        d = arr(causal["distance"])
        by = arr(causal["change_by_distance"])
        lo_all, hi_all = arr(causal["change_by_distance_ci"])[..., 0], arr(causal["change_by_distance_ci"])[..., 1]
        share = fnum(causal.get("change_division_share"))
        share_ci = [fnum(v) for v in causal.get("change_division_share_ci") or [None, None]]
        for i, (mode, style) in enumerate((("live", "-"), ("frozen", "--"))):
            label = f"{m.name} ({mode})"
            if mode == "live" and math.isfinite(share):
                label += f": division share {share:.2f} [{share_ci[0]:.2f}, {share_ci[1]:.2f}]"
            ax_c.plot(d, positive(by[i]), color=m.color, linestyle=style, marker=m.marker if i == 0 else None,
                      label=label)
            ax_c.fill_between(d, positive(lo_all[i]), positive(hi_all[i]), color=m.color, alpha=0.12, linewidth=0)
        drawn = True
    if drawn:
        log_axis(ax_c)
        ax_c.set_xlabel("distance from the ablated write to the reader (layers)")
        ax_c.set_ylabel("relative change of the normalised input")
        ax_c.set_title("causal check: mean-ablate one write")
        legend_below(ax_c, ncols=1)
    else:
        note(ax_c, "no causal check in these results")
    fig.suptitle("Effective layer horizon: live vs frozen norm scales (positions ≥ 1; 95 % bootstrap CIs)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
