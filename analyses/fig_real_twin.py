"""A real model's norm-free twin against its same-schedule control: removal trace, norms, horizon.

Reads ``R/real-twin/trace.json`` (``twin.json`` of ``normgrowth zoo twin``, copied by ``make real-twin``):

* removal trace: after each norm is frozen and fine-tuned (MLP input norms, then attention input norms, then
  the final norm) and after the recovery, the growth factor per layer of resid_post (log-linear fit of the
  mean over traced held-out sequences of each sequence's mean ||resid_post|| at positions >= 1, default
  window; band: 95 % percentile bootstrap over sequences) and the held-out loss (nats/token), twin and control;
* norms: mean ||resid_post|| per block at positions >= 1 and at position 0 (held-out rows) of the base model,
  the twin and the control, finished (solid) and after the last norm's steps (dashed: the twin still divides
  position 0, separators and outlier tokens by their own scale);
* the recovery (where recorded): the twin's training loss per step while the special scale is phased out,
  the steps skipped for a non-finite loss, and where it failed;
* the scale penalty (where recorded): its value at every fine-tuning step of twin and control;
* horizon (where ``R/real-twin/<twin|control>/horizon.json`` exist): the held-out loss above clean when only
  the last n layers' writes are kept, with the norms' scales live and frozen, twin and control.

A build whose recovery diverged (``twin-failed.json``, copied to ``trace.json`` by ``make real-twin``) has
no finished twin: its panels show what was recorded up to the divergence.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from common import PAGE_WIDTH, MissingInput, cli, new_figure, read_json, run_figure, save
from fig_ln_removal import draw_trace

STEM = "fig_real_twin"
RUNS = (("twin", "norm-free twin (norms frozen one by one)", "#d62728", "s"),
        ("control", "control (norms kept, same schedule)", "#1f77b4", "o"))
BASE = ("base", "base model", "0.4", "^")


SHORT = (("layers.", ""), ("post_attention_layernorm", "MLP-in"), ("input_layernorm", "attn-in"))


def short_site(site: str) -> str:
    """``layers.3.post_attention_layernorm`` -> ``3.MLP-in`` (tick labels)."""
    for old, new in SHORT:
        site = site.replace(old, new)
    return site


def horizon_excess(doc: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"live" | "frozen": (n, excess loss in %)}`` of a horizon JSON: the loss excess over clean when only
    the last ``n`` layers' writes are kept (``horizons``, ``<scales>.excess``), where both are present."""
    n = doc.get("horizons")
    out = {}
    for scales in ("live", "frozen"):
        excess = (doc.get(scales) or {}).get("excess")
        if n and excess and len(excess) == len(n):
            out[scales] = (np.asarray(n, dtype=float), 100 * np.asarray(excess, dtype=float))
    return out


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    folder = Path(results_dir) / "real-twin"
    record = read_json(folder / "trace.json")
    trace = (record or {}).get("ln_removal_trace")
    if not trace or not trace.get("twin"):
        raise MissingInput(f"no real-twin/trace.json with a removal trace in {results_dir}")
    horizons = {name: read_json(folder / name / "horizon.json") for name, *_ in RUNS}
    curves = {name: horizon_excess(doc) for name, doc in horizons.items() if doc}
    has_horizon = any(curves.values())
    recovery = np.asarray(record.get("recovery_trace") or [], dtype=float).reshape(-1, 3)
    penalty = {name: np.asarray(v, dtype=float) for name, v in (record.get("scale_penalty_trace") or {}).items() if v}
    n_bottom = bool(recovery.size) + bool(penalty) + has_horizon
    rows = 2 + (n_bottom + 1) // 2
    fig = new_figure(PAGE_WIDTH, 3.2 * rows + 1.0)
    axes = fig.subplots(rows, 2, squeeze=False)
    labels = [p["site"] for p in trace["twin"]]
    x = np.arange(len(labels))
    draw_trace(axes[0, 0], axes[0, 1], trace, RUNS, x, markersize=3)
    window = (trace["twin"][0].get("fit") or {}).get("window")
    axes[0, 0].set_ylabel("resid_post growth factor per layer")
    axes[0, 0].set_title("Growth as each norm is removed" + (f" (layers {window[0]}..{window[1]})" if window else ""))
    axes[0, 1].set_ylabel("held-out loss (nats/token)")
    axes[0, 1].set_title("Held-out loss as each norm is removed")
    step = max(1, len(labels) // 12)
    for ax in axes[0]:
        ax.set_xticks(x[::step])
        ax.set_xticklabels([short_site(labels[i]) for i in x[::step]], rotation=60, ha="right", fontsize=6)
        ax.set_xlabel("after this norm and its fine-tuning steps")
    axes[0, 0].legend(loc="best", fontsize=7)
    after = record.get("after_freezing") or {}
    summaries = [(record.get(name) or {}, label, color, marker, "-") for name, label, color, marker in (BASE,) + RUNS]
    summaries += [(after.get(name) or {}, f"{name} after the last norm", color, marker, "--")
                  for name, _, color, marker in RUNS if after.get(name) != record.get(name)]  # not drawn twice
    for summary, label, color, marker, style in summaries:
        if not summary.get("resid_post_norm"):
            continue
        loss = summary.get("heldout_loss")
        tag = f"{label} (loss {loss:.3f})" if isinstance(loss, (int, float)) else label
        layers = np.arange(len(summary["resid_post_norm"]))
        for ax, key in ((axes[1, 0], "resid_post_norm"), (axes[1, 1], "pos0_norm")):
            ax.plot(layers, summary[key], color=color, marker=marker, markersize=3, linestyle=style, label=tag)
    for ax, what in ((axes[1, 0], "positions >= 1"), (axes[1, 1], "position 0")):
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("mean ||resid_post||")
        ax.set_title(f"Residual norm per block, {what} (held-out rows)")
    axes[1, 0].legend(loc="best", fontsize=7)
    bottom = [ax for row in axes[2:] for ax in row]
    if recovery.size:
        ax = bottom.pop(0)
        ax.plot(recovery[:, 0], recovery[:, 2], color=RUNS[0][2], marker=RUNS[0][3], markersize=2,
                label="twin, training loss")
        skipped = record.get("recovery_skipped_steps") or []
        if skipped:
            ax.plot(skipped, np.full(len(skipped), np.nanmin(recovery[:, 2])), linestyle="none", marker="|",
                    markersize=8, color="k", label=f"non-finite loss, step skipped ({len(skipped)})")
        diverged = record.get("diverged")
        if diverged:
            ax.axvline(diverged["step"], color="k", linestyle=":", linewidth=1,
                       label=f"failed (step {diverged['step']} of {diverged['of']})")
        ax.set_yscale("log")
        window = (record.get("settings") or {}).get("phase_window")
        ax.set_xlabel("recovery step (special scale phased out " + (f"block by block, {window:g} at a time)"
                                                                    if window else "in every norm together)"))
        ax.set_ylabel("training loss (nats/token)")
        ax.set_title("Recovery: the special-token scale phased out")
        ax.legend(loc="best", fontsize=7)
    if penalty:
        settings = record.get("settings") or {}
        ax = bottom.pop(0)
        for name, label, color, marker in RUNS:
            if name in penalty:
                values = penalty[name]
                ax.plot(np.arange(1, values.size + 1), np.maximum(values, 1e-6), color=color, linewidth=1, label=label)
        ax.axvline(len(record.get("sites", [])) * settings.get("steps_per_norm", 0) + 0.5,
                   color="k", linestyle=":", linewidth=1, label="last norm frozen")
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("scale penalty (floored at 1e-6)")
        margin, special = settings.get("scale_margin", "m"), settings.get("special_scale_margin")
        ax.set_title(f"Scale penalty (margin {margin}"
                     + (f", {special} at position 0)" if special not in (None, margin) else ")"), fontsize=9)
        ax.legend(loc="best", fontsize=7)
    if has_horizon:
        ax = bottom.pop(0)
        for name, label, color, marker in RUNS:
            for scales, style in (("live", "-"), ("frozen", "--")):
                if scales in curves.get(name, {}):
                    n, excess = curves[name][scales]
                    ax.plot(n, excess, color=color, marker=marker, markersize=3, linestyle=style,
                            label=f"{name}, {scales} scales")
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_xlabel("n: only the last n layers' writes kept")
        ax.set_ylabel("held-out loss above clean (%)")
        ax.set_title("Effective layer horizon (live and frozen norm scales)")
        ax.legend(loc="best", fontsize=7)
    for ax in bottom:
        ax.set_visible(False)
    steps = record.get("fine_tuning_steps")
    status = "" if record.get("twin_built", True) else " (recovery diverged: no finished twin)"
    fig.suptitle(f"{record.get('source', 'model')}: norm-free twin vs control, {len(record.get('sites', []))} norms "
                 f"removed, {steps} fine-tuning steps per run{status}", fontsize=9)
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
