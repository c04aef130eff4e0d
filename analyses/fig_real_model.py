"""Figure 0: the real pretrained model (SmolLM2-135M-Instruct) in one page: norms, local slope, deletion, horizon.

(a) mean L2 norm per layer of resid_post, attn_out and mlp_out (positions >= 1, log axis), resid_post at
position 0 dashed, the resid_post fit window shaded; (b) the local log-slope d log ||resid_post|| / dl per layer
(central differences) with its 95 % bootstrap band, the mean log-slope over the window with its CI, and the
window-sensitivity band (every window of >= 5 layers); the title gives the law block's outcome and the rejected
laws; (c) the pooled reads I and I0 by distance (deletion.json) with the verdict label; (d) the relative excess
loss against the horizon n, live and frozen scales, with 95 % CIs (horizon.json). Reads R/models/<slug>/ of
MODEL (``--model SLUG`` for another); skipped when that folder has no report.json; panels (c) and (d) say so when
their file is absent.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.figure import Figure

from normgrowth.sources import NAMED_MODELS
from normgrowth.tables import with_ci

from common import (NORM_LABEL, PAGE_WIDTH, MissingInput, ModelResults, arr, ci_band, display_name, fnum,
                    log_axis, new_figure, note, positive, read_json, run_figure, save)
from fig_deletion import draw_reads
from fig_horizon import _horizon_text

STEM = "fig_real_model"
MODEL = "smollm2-135m"  # slug of the results folder R/models/<slug>/
SITE_COLORS = {"resid_post": "C0", "attn_out": "C1", "mlp_out": "C2"}


def model_title(doc: dict, slug: str) -> str:
    """``SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32`` from report.json's model and meta.source."""
    model = str(doc.get("model") or slug)
    named = NAMED_MODELS.get(model.lower())
    name = named.filename.split(".")[0] if named else display_name(model, bool(doc.get("ln_free")))
    source = (doc.get("meta") or {}).get("source") or {}
    if source.get("format") == "gguf":
        name += f", {source.get('quantization') or 'quantised'} GGUF {source.get('weights') or 'dequantised'}"
    return name


def draw_norms(ax, report: dict) -> None:
    for site, color in SITE_COLORS.items():
        st = report["sites"].get(site)
        if st is not None:
            ax.plot(positive(arr(st["mean"])), color=color, marker="o", markersize=3, label=site)
    post = report["sites"]["resid_post"]
    ax.plot(positive(arr(post.get("bos_mean"))), color="C0", linestyle="--", linewidth=1.0,
            label="resid_post, position 0")
    a, b = (report.get("fit") or {}).get("resid_post", {}).get("window", (None, None))
    if a is not None:
        ax.axvspan(a, b, color="0.92", zorder=0, label=f"fit window {a}..{b}")
    log_axis(ax)
    ax.set(xlabel="layer", ylabel=NORM_LABEL, title="(a) mean norm per layer (positions ≥ 1)")
    ax.legend(fontsize=7)


def draw_local_slope(ax, fit: dict) -> None:
    loc = fit["local_slope"]
    x, y = arr(loc["layers"]), arr(loc["slope"])
    ax.plot(x, y, color="C0", marker="o", markersize=3, label="local slope d log‖x‖/dl")
    ax.fill_between(x, arr(loc["ci95_lo"]), arr(loc["ci95_hi"]), color="C0", alpha=0.2, linewidth=0)
    a, b = fit["window"]
    s, ci = fnum(fit.get("mean_log_slope")), fit.get("mean_log_slope_ci95") or [None, None]
    if math.isfinite(s):
        ax.hlines(s, a, b, color="black", linewidth=1.2, label=f"mean over {a}..{b}: {with_ci(s, ci, '.3f')}")
        lo, hi = fnum(ci[0]), fnum(ci[1])
        if math.isfinite(lo) and math.isfinite(hi):
            ax.fill_between([a, b], lo, hi, color="black", alpha=0.25, linewidth=0)
    ws = fit.get("window_sensitivity") or {}
    if ws.get("n_windows"):
        ax.axhspan(fnum(ws["min"]), fnum(ws["max"]), color="C3", alpha=0.1, linewidth=0,
                   label=f"windows ≥ {ws.get('min_layers')} layers: {fnum(ws['min']):.3f}..{fnum(ws['max']):.3f}")
    ax.axhline(0, color="0.4", linewidth=0.8)
    law = fit.get("law") or {}
    rejected = ", ".join(r["law"] for r in law.get("rejected") or []) or "none"
    ax.set(xlabel="layer", ylabel="log-slope per layer",
           title=f"(b) resid_post local slope\nlaw: {law.get('best', 'not fitted')}; rejected: {rejected}")
    ax.legend(fontsize=7)


def draw_deletion(ax, m: ModelResults) -> None:
    if not ((m.deletion or {}).get("locality") or {}).get("by_distance"):
        note(ax, f"no deletion.json reads under {m.path.name}/")
        ax.set_title("(c) deletion: reads by distance")
        return
    draw_reads(ax, m)
    v, share = m.deletion["verdict"], m.deletion.get("magnitude_share") or {}
    flags = f" ({', '.join(v['flags'])})" if v.get("flags") else ""
    ax.set_title(f"(c) deletion verdict: {v['label']}{flags}; magnitude share "
                 f"{with_ci(fnum(share.get('value')), share.get('value_ci95'))}", fontsize=8)


def draw_horizon(ax, doc: Optional[dict]) -> None:
    ax.set_title("(d) loss when readers see only the last n blocks")
    if doc is None:
        note(ax, "no horizon.json")
        return
    n = arr(doc["horizons"])
    for mode, style in (("live", "-"), ("frozen", "--")):
        lo, hi = ci_band(doc[mode]["excess_ci"])
        overflow = ((doc.get("nonfinite") or {}).get("predictions") or {}).get(mode) or []
        bad = ",".join(f"{h:g}" for h, c in zip(n, overflow) if c)
        ax.plot(n, 100 * arr(doc[mode]["excess"]), color="C0", linestyle=style, marker="o" if mode == "live" else "s",
                markerfacecolor="none" if mode == "frozen" else None,
                label=f"{mode}: within {_horizon_text(doc, mode)}" + (f"; overflow at n={bad}" if bad else ""))
        if lo.size:
            ax.fill_between(n, 100 * lo, 100 * hi, color="C0", alpha=0.15 if mode == "live" else 0.08, linewidth=0)
    for q in (1, 10):
        ax.axhline(q, color="0.6", linewidth=0.8, zorder=1)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set(xlabel="horizon n (blocks each reader sees)", ylabel="excess loss over clean (%, symlog)")
    ax.legend(fontsize=7)


def build(path: Path) -> Figure:
    """The four panels of the model folder ``path`` (raises MissingInput when it has no report.json)."""
    report = read_json(path / "report.json")
    if report is None:
        raise MissingInput(f"no report.json under {path}/")
    m = ModelResults(slug=path.name, path=path, report=report, deletion=read_json(path / "deletion.json"))
    fig = new_figure(PAGE_WIDTH, 7.6)
    axes = fig.subplots(2, 2).ravel()
    draw_norms(axes[0], report)
    draw_local_slope(axes[1], report["fit"]["resid_post"])
    draw_deletion(axes[2], m)
    draw_horizon(axes[3], read_json(path / "horizon.json"))
    fig.suptitle(f"{model_title(report, path.name)}\nnorm growth, local slope, deletion, horizon "
                 "(95 % bootstrap CIs over sequences)")
    return fig


def draw(results_dir: Path, out_dir: Path, model: str = MODEL) -> list[Path]:
    return save(build(Path(results_dir) / "models" / model), out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures", model: str = MODEL) -> list[Path]:
    return run_figure(STEM, lambda r, o: draw(r, o, model), results_dir, out_dir)


def cli_main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results directory (default: results)")
    parser.add_argument("--out", default="figures", help="output directory for PNG and PDF (default: figures)")
    parser.add_argument("--model", default=MODEL, help=f"slug of the model folder R/models/<slug>/ (default: {MODEL})")
    args = parser.parse_args(argv)
    return main(args.results, args.out, args.model)


if __name__ == "__main__":
    cli_main(sys.argv[1:])
