"""LayerNorm removal step by step: resid_post growth and held-out loss of the twin and of the control.

Reads ``R/zoo.json`` (the zoo build's record, copied there by ``make figures``), ``ln_removal_trace``: after
each LayerNorm site is frozen and fine-tuned (``h.i.ln_2``, then ``h.i.ln_1``, then ``ln_f``), and after the
recovery steps, the held-out loss (nats/token) and the growth factor per layer of resid_post (log-linear fit of
the mean over held-out sequences of each sequence's mean ||resid_post|| at positions >= 1, default window; band:
95 % percentile bootstrap over sequences). The control runs the same fine-tuning schedule with LayerNorm kept,
so the gap between the two lines is what removing LayerNorm does beyond the extra training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from common import PAGE_WIDTH, MissingInput, cli, fnum, new_figure, read_json, run_figure, save

STEM = "fig_ln_removal"
LINES = (("twin", "LN-free twin (LayerNorms frozen one by one)", "#d62728", "s"),
         ("control", "control (LayerNorm kept, same schedule)", "#1f77b4", "o"))


def trace_arrays(points: list[dict]) -> dict[str, np.ndarray]:
    """``g``, ``lo``, ``hi`` (growth factor and its CI) and ``loss`` per trace point (NaN where absent)."""
    fits = [p.get("fit") or {} for p in points]
    ci = [f.get("ci95") or [None, None] for f in fits]
    return {"g": np.array([fnum(f.get("growth_factor")) for f in fits]),
            "lo": np.array([fnum(c[0]) for c in ci]), "hi": np.array([fnum(c[1]) for c in ci]),
            "loss": np.array([fnum(p.get("heldout_loss")) for p in points])}


def draw_trace(growth_ax, loss_ax, trace: dict, lines, x: np.ndarray, **style) -> None:
    """Each run of ``lines`` (``(key, label, color, marker)``) with two or more trace points: its growth factor
    with the CI band on ``growth_ax`` and its held-out loss on ``loss_ax``, at ``x[:len(points)]``."""
    for key, label, color, marker in lines:
        points = trace.get(key) or []
        if len(points) < 2:
            continue
        a = trace_arrays(points)
        xs = x[:len(points)]
        growth_ax.plot(xs, a["g"], color=color, marker=marker, label=label, **style)
        ok = np.isfinite(a["lo"]) & np.isfinite(a["hi"])
        if ok.any():
            growth_ax.fill_between(xs[ok], a["lo"][ok], a["hi"][ok], color=color, alpha=0.2, linewidth=0)
        loss_ax.plot(xs, a["loss"], color=color, marker=marker, label=label, **style)


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    meta = read_json(Path(results_dir) / "zoo.json")
    trace = (meta or {}).get("ln_removal_trace")
    if not trace or not trace.get("twin"):
        raise MissingInput(f"no zoo.json with an ln_removal_trace in {results_dir}")
    labels = [p["site"] for p in trace["twin"]]
    x = np.arange(len(labels))
    fig = new_figure(PAGE_WIDTH, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    draw_trace(top, bottom, trace, LINES, x)
    window = (trace["twin"][0].get("fit") or {}).get("window")
    top.set_ylabel("resid_post growth factor per layer")
    top.set_title("Growth as each LayerNorm is removed" + (f" (fit over layers {window[0]}..{window[1]}; "
                                                           "band: 95 % CI, bootstrap over held-out sequences)"
                                                           if window else ""))
    top.legend(loc="best")
    bottom.set_ylabel("held-out loss (nats/token)")
    bottom.set_title("Held-out loss")
    bottom.set_xticks(x)
    bottom.set_xticklabels(labels, rotation=60, ha="right")
    bottom.set_xlabel("after freezing this site and its fine-tuning steps (left: the LN model; right: after recovery)")
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
