"""Shared helpers of the figure scripts: finding saved results, names, colours, rates, saving.

Every figure script reads saved results only (never a model):

* ``R/models/<slug>/report.json``   - ``normgrowth.report.report_document`` (``normgrowth report --json``)
* ``R/models/<slug>/weights.json``  - ``normgrowth.weights.WeightsResult.to_json()`` (``normgrowth weights --json``)
* ``R/models/<slug>/deletion.json`` - ``normgrowth.deletion.DeletionResults.to_json()``
* ``R/compare.json``                - ``normgrowth compare A B --json`` (optional)

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas (no pyplot, so no
global figure registry and no backend switch); style settings are applied only inside
:func:`style` (``matplotlib.rc_context``), never at import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation

from normgrowth.results import SITES, display_name  # noqa: F401  (the figures' site order and model names)
from normgrowth.storage import as_float as fnum  # noqa: F401  (a JSON number or null as a float)
from normgrowth.storage import none_to_nan

DPI = 150
PAGE_WIDTH = 9.0  # inches: readable at page width (fonts >= 8 pt at this size)
NORM_LABEL = "mean ‖x‖₂ (log scale)"

# Tableau-10 minus grey: one colour per model, fixed by the model's rank in the results directory.
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")

_RC = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "figure.titlesize": 10.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.5,
    "lines.markersize": 4,
    "legend.frameon": False,
    "savefig.dpi": DPI,
}


class MissingInput(Exception):
    """Raised by a figure's data step when the results it needs are absent (the script then skips)."""


# ----------------------------------------------------------------------------------------------
# results discovery
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelResults:
    """The saved results of one model directory ``R/models/<slug>``; a document is None when its file is absent."""

    slug: str
    path: Path
    report: Optional[dict] = None
    weights: Optional[dict] = None
    deletion: Optional[dict] = None
    color: str = _COLORS[0]
    _name: Optional[str] = field(default=None, repr=False)

    @property
    def doc(self) -> dict:
        """The first document present (for the model name and flags)."""
        for d in (self.report, self.weights, self.deletion):
            if d is not None:
                return d
        return {}

    @property
    def ln_free(self) -> bool:
        return bool(self.doc.get("ln_free", False))

    @property
    def name(self) -> str:
        return self._name or display_name(self.doc.get("model") or self.slug, self.ln_free)

    @property
    def linestyle(self) -> str:
        return "--" if self.ln_free else "-"

    @property
    def marker(self) -> str:
        return "s" if self.ln_free else "o"


def read_json(path: Path) -> Optional[dict]:
    """The JSON document at ``path``, or None when the file does not exist (a malformed file raises)."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def discover(results_dir: str | Path) -> list[ModelResults]:
    """Every ``R/models/<slug>/`` with at least one of report/weights/deletion.json.

    Order: models with LayerNorm (or RMSNorm) first, LN-free after, each by display name; colours are
    assigned in that order, so a model keeps its colour in every figure of the same results directory.
    Display names that collide get their slug appended.
    """
    root = Path(results_dir) / "models"
    found: list[ModelResults] = []
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            mr = ModelResults(slug=d.name, path=d, report=read_json(d / "report.json"),
                              weights=read_json(d / "weights.json"), deletion=read_json(d / "deletion.json"))
            if mr.report is not None or mr.weights is not None or mr.deletion is not None:
                found.append(mr)
    found.sort(key=lambda m: (m.ln_free, m.name.lower(), m.slug))
    names = [m.name for m in found]
    for i, m in enumerate(found):
        if names.count(names[i]) > 1:
            m._name = f"{names[i]} [{m.slug}]"
        m.color = _COLORS[i % len(_COLORS)]
    return found


def with_report(models: Sequence[ModelResults]) -> list[ModelResults]:
    return [m for m in models if m.report is not None]


def with_weights(models: Sequence[ModelResults]) -> list[ModelResults]:
    return [m for m in models if m.weights is not None]


def with_deletion(models: Sequence[ModelResults]) -> list[ModelResults]:
    return [m for m in models if m.deletion is not None]


def require(models: Sequence[ModelResults], what: str, results_dir: str | Path) -> None:
    """Raise :class:`MissingInput` when ``models`` is empty."""
    if not models:
        raise MissingInput(f"no {what} under {Path(results_dir) / 'models'}/*/")


# ----------------------------------------------------------------------------------------------
# weights.json: {"model", "ln_free", "normalization", "weights": WeightNorms JSON, "random_inputs", "comparison"}
# ----------------------------------------------------------------------------------------------
def weight_norms_doc(doc: dict) -> Optional[dict]:
    """The weight norms (``doc["weights"]``, ``WeightNorms.to_json()``); None when absent."""
    inner = doc.get("weights")
    return inner if isinstance(inner, dict) and "layers" in inner else None


def gains_comparison_doc(doc: dict) -> Optional[dict]:
    """The random-vs-real comparison (``doc["comparison"]``, ``compare_gains`` in JSON form); None when absent
    (no random inputs, or no real data to compare with)."""
    inner = doc.get("comparison")
    return inner if isinstance(inner, dict) and "random_attn_out" in inner else None


# ----------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------
def arr(values: Any) -> np.ndarray:
    """A float array from JSON lists (None -> NaN)."""
    if values is None:
        return np.array([], dtype=float)
    return np.array(none_to_nan(values), dtype=float)


def rate_text(fit: dict) -> str:
    """``+x.x %/layer [lo, hi]`` from a GrowthFit JSON (CI omitted when undefined)."""
    pct = 100.0 * (fnum(fit["growth_factor"]) - 1.0)
    lo, hi = (fnum(v) for v in fit.get("ci95", [None, None]))
    digits = 1 if abs(pct) >= 0.95 or pct == 0 else 2
    text = f"{pct:+.{digits}f} %/layer"
    if math.isfinite(lo) and math.isfinite(hi):
        text += f" [{100 * (lo - 1):+.{digits}f}, {100 * (hi - 1):+.{digits}f}]"
    return text


def ci_band(ci: Any) -> tuple[np.ndarray, np.ndarray]:
    """``[[lo, hi], ...]`` -> (lo array, hi array)."""
    c = arr(ci)
    if c.ndim != 2 or c.shape[1] != 2:
        return np.array([]), np.array([])
    return c[:, 0], c[:, 1]


class _PlainLogFormatter(LogFormatterSciNotation):
    """Log-axis tick labels as plain numbers ("0.15", "20") instead of "1.5×10⁻¹"; the parent decides
    which ticks get a label (decades, and minor ticks when the axis spans less than a decade or so)."""

    def __call__(self, x: float, pos: Optional[int] = None) -> str:
        return f"{x:.3g}" if super().__call__(x, pos) else ""


def log_axis(ax: Any, which: str = "y") -> None:
    """Log scale on ``which`` ("x" or "y") with plain-number tick labels; call it after plotting (an axis
    spanning less than 10^0.8 gets evenly spaced round ticks)."""
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis = ax.yaxis if which == "y" else ax.xaxis
    plain_log_ticks(axis)
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    if 0 < lo < hi < lo * 10 ** 0.8:  # under a decade: evenly spaced round ticks read better than 2, 3, ... 9 x 10^k
        from matplotlib.ticker import MaxNLocator, NullLocator

        axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        axis.set_major_formatter(FuncFormatter(lambda v, pos: f"{v:.3g}"))
        axis.set_minor_locator(NullLocator())


def plain_log_ticks(axis: Any) -> None:
    """Plain-number labels on an axis that is already logarithmic (e.g. ``colorbar.ax.yaxis`` of a LogNorm)."""
    axis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 1)))


def positive(y: np.ndarray) -> np.ndarray:
    """NaN where ``y <= 0`` (so a log axis draws no point there)."""
    y = np.asarray(y, dtype=float)
    return np.where(y > 0, y, np.nan)


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def style() -> Iterator[None]:
    """The figure style (fonts >= 8 pt, light grid), applied only inside the block."""
    with matplotlib.rc_context(_RC):
        yield


def new_figure(width: float = PAGE_WIDTH, height: float = 4.0, **gridspec: Any) -> Figure:
    """A Figure on the Agg canvas (no pyplot state); use ``fig.subplots`` / ``fig.add_subplot``."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def grid_axes(fig: Figure, n: int, ncols: int, **kw: Any) -> list:
    """``n`` axes on a grid of ``ncols`` columns; the unused cells are removed."""
    nrows = max(1, math.ceil(n / ncols))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, **kw)).ravel()
    for ax in axes[n:]:
        ax.remove()
    return list(axes[:n])


def save(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.pdf`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=DPI)
    fig.set_layout_engine("none")  # keep the layout computed for the PNG (same size in inches) for the PDF
    fig.savefig(paths[1], dpi=DPI)
    return paths


def model_legend_handles(models: Sequence[ModelResults]) -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=m.color, linestyle=m.linestyle, marker=m.marker, label=m.name) for m in models]


def legend_below(ax: Any, **kw: Any) -> Any:
    """A legend under the axes (outside the data area; constrained layout makes room for it)."""
    from matplotlib.transforms import ScaledTranslation

    kw.setdefault("fontsize", 7)
    below_labels = ax.transAxes + ScaledTranslation(0, -0.48, ax.figure.dpi_scale_trans)  # 0.48 in under the axes
    return ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below_labels,
                     borderaxespad=0.0, **kw)


def note(ax: Any, text: str) -> None:
    """Grey explanatory text in an otherwise empty panel."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def run_figure(script: str, draw: Callable[[Path, Path], list[Path]], results_dir: str | Path,
               out_dir: str | Path) -> list[Path]:
    """Call ``draw(results_dir, out_dir)`` in the figure style; print a note and return [] on MissingInput.

    Any other exception propagates.
    """
    try:
        with style():
            paths = draw(Path(results_dir), Path(out_dir))
    except MissingInput as missing:
        print(f"{script}: skipped ({missing})")
        return []
    for p in paths:
        print(f"{script}: wrote {p}")
    return paths


def cli(main: Callable[[str | Path, str | Path], list[Path]], description: str,
        argv: Optional[Sequence[str]] = None) -> list[Path]:
    """``--results R --out F`` command line for a figure script's ``main``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results", default="results", help="results directory (default: results)")
    parser.add_argument("--out", default="figures", help="output directory for PNG and PDF (default: figures)")
    args = parser.parse_args(argv)
    return main(args.results, args.out)
