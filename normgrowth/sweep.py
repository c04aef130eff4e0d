"""Checkpoint sweeps: the report's growth fits (and weight-norm fits, deletion verdict) at many checkpoints.

:func:`expand_checkpoints` turns the command's arguments into an ordered list of :class:`SweepPoint`:

* a local checkpoint directory (it holds a ``config.json``) is one point; its step is read from its name
  when that is ``step-<N>``, ``step<N>`` or ``checkpoint-<N>``;
* a local folder without a ``config.json`` is a parent: every subfolder named ``step-<N>``, ``step<N>`` or
  ``checkpoint-<N>`` is a point, sorted by N (so ``step-10`` follows ``step-9``);
* any other argument is a hub name; with ``revisions`` it gives one point per revision (step read from a
  revision named ``step<N>``), otherwise one point at the default revision.

:class:`SweepResult` holds one JSON document per point (built by :func:`normgrowth.pipeline.run_sweep`)::

    {"checkpoint": str, "revision": str or null, "step": int or null, "series": str,
     "model", "n_layers", "normalization", "ln_free", "n_seqs", "n_tokens",
     "fit": {SITE: F},            # exactly the report's fit objects (normgrowth report --json)
     "weight_fit": {SERIES: F},   # growth fits of the weight-norm series (normgrowth weights)
     "deletion": {"verdict": ...} or null}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Optional, Sequence

import numpy as np

from .errors import NormgrowthError
from .protocol import ResultProtocol
from .storage import as_float
from .tables import text_table, with_ci

STEP_NAME = re.compile(r"^(?:step-?|checkpoint-)(\d+)$")
ARCH_KEYS = (("model_type",), ("n_layer", "num_hidden_layers", "num_layers"), ("n_embd", "hidden_size", "d_model"))


def step_of(name: str) -> Optional[int]:
    """N for a folder or revision named ``step-<N>``, ``step<N>`` or ``checkpoint-<N>``, else None."""
    m = STEP_NAME.match(Path(str(name)).name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class SweepPoint:
    """One checkpoint of a sweep: a local directory or hub name, its revision and training step (if known),
    and ``series`` (the argument it came from; a figure draws one line per series)."""

    checkpoint: str
    revision: Optional[str]
    step: Optional[int]
    series: str

    @property
    def label(self) -> str:
        return self.checkpoint if self.revision is None else f"{self.checkpoint}@{self.revision}"


def _architecture(config_path: Path) -> tuple:
    """(model_type, number of layers, width) read from a ``config.json``."""
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise NormgrowthError(f"cannot read {str(config_path)!r} ({err}): pass a complete checkpoint folder.") from None
    return tuple(next((cfg[k] for k in keys if k in cfg), None) for keys in ARCH_KEYS)


def _parent_points(folder: Path, arg: str) -> list[SweepPoint]:
    found: dict[int, Path] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        step = step_of(sub.name)
        if step is None:
            continue
        if not (sub / "config.json").is_file():
            raise NormgrowthError(f"{str(sub)!r} has no config.json: remove it or complete the checkpoint.")
        if step in found:
            raise NormgrowthError(f"{str(found[step])!r} and {str(sub)!r} both name step {step}: keep one of them.")
        found[step] = sub
    if not found:
        raise NormgrowthError(f"no checkpoints in {arg!r}: pass a checkpoint folder (with config.json) or a folder "
                              "of subfolders named step-<N>, step<N> or checkpoint-<N>.")
    archs = {step: _architecture(path / "config.json") for step, path in found.items()}
    if len(set(archs.values())) > 1:
        desc = ", ".join(f"{found[s].name}: {a[0]} {a[1]} layers x {a[2]}" for s, a in sorted(archs.items()))
        raise NormgrowthError(f"the checkpoints in {arg!r} have different architectures ({desc}): sweep one "
                              "model's checkpoints per folder.")
    return [SweepPoint(str(found[s]), None, s, arg) for s in sorted(found)]


def expand_checkpoints(specs: Sequence[str], revisions: Optional[Sequence[str]] = None) -> list[SweepPoint]:
    """The points of a sweep, in argument order; a parent folder's points sorted by step; a hub name's
    ``revisions`` sorted by step when every one is named ``step<N>`` (else in the order given)."""
    if not specs:
        raise NormgrowthError("no checkpoints given: pass checkpoint folders, parent folders or hub names.")
    revs = [r.strip() for r in (revisions or []) if r and r.strip()]
    points: list[SweepPoint] = []
    for arg in specs:
        path = Path(arg).expanduser()
        if path.is_dir():
            if revs:
                raise NormgrowthError(f"--revisions applies to hub models, but {arg!r} is a local folder: drop "
                                      "--revisions or sweep a hub name.")
            if (path / "config.json").is_file():
                step = step_of(path.name)
                points.append(SweepPoint(str(path), None, step, str(path.parent) if step is not None else arg))
            else:
                points += _parent_points(path, arg)
        elif revs:
            steps = [step_of(r) for r in revs]
            order = sorted(range(len(revs)), key=lambda i: steps[i]) if None not in steps else range(len(revs))
            points += [SweepPoint(arg, revs[i], steps[i], arg) for i in order]
        else:
            points.append(SweepPoint(arg, None, None, arg))
    seen: set[tuple] = set()
    for p in points:
        if (p.checkpoint, p.revision) in seen:
            raise NormgrowthError(f"checkpoint {p.label!r} is listed twice: give each checkpoint once.")
        seen.add((p.checkpoint, p.revision))
    return points


def parse_revisions(text: Optional[str]) -> list[str]:
    """``"step0,step512"`` -> ``["step0", "step512"]`` (empty items dropped)."""
    return [r.strip() for r in (text or "").split(",") if r.strip()]


# ----------------------------------------------------------------------------------------------
# reading a sweep
# ----------------------------------------------------------------------------------------------
def fit_series(points: Iterable[dict], site: str, key: str = "fit") -> dict[str, np.ndarray]:
    """Per point with a step and a fit of ``site`` under ``key`` (``fit`` or ``weight_fit``): arrays
    ``step``, ``g`` (growth factor), ``lo``, ``hi`` (its 95 % CI; NaN where absent), in the points' order."""
    rows = []
    for p in points:
        f = (p.get(key) or {}).get(site)
        if p.get("step") is None or not f:
            continue
        ci = f.get("ci95") or [None, None]
        rows.append((p["step"], f.get("growth_factor"), ci[0], ci[1]))
    return {"step": np.array([r[0] for r in rows], dtype=np.int64),
            "g": np.array([as_float(r[1]) for r in rows]), "lo": np.array([as_float(r[2]) for r in rows]),
            "hi": np.array([as_float(r[3]) for r in rows])}


def _fmt_g(f: Optional[dict]) -> str:
    if not f:
        return "-"
    return with_ci(f.get("growth_factor"), f.get("ci95"), ".4f", missing="-")


def verdict_label(point: dict) -> str:
    verdict = (point.get("deletion") or {}).get("verdict")
    if isinstance(verdict, dict):
        return str(verdict.get("label", "-"))
    return "-" if verdict is None else str(verdict)


@dataclass
class SweepResult(ResultProtocol):
    """A sweep: one document per point (module docstring), the run settings and the fit window."""

    kind: ClassVar[str] = "sweep"

    points: list[dict]
    settings: dict = field(default_factory=dict)
    window: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        return {"points": self.points, "window": self.window, "settings": self.settings}

    @classmethod
    def from_saved(cls, doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> "SweepResult":
        if not isinstance(doc.get("points"), list):
            raise NormgrowthError("saved sweep has no \"points\" list (another layout): run normgrowth sweep again.")
        return cls(points=doc["points"], settings=doc.get("settings") or {}, window=doc.get("window"))

    def frame_rows(self) -> Iterator[dict[str, Any]]:
        """Per point and fitted site (``fit``) or weight series (``weight_fit``): growth_factor, ci95_lo,
        ci95_hi and percent_per_layer; ``layer`` is None (a fit spans its window)."""
        for p in self.points:
            extra = {"checkpoint": p["checkpoint"], "revision": p.get("revision"), "step": p.get("step"),
                     "series": p.get("series")}
            for source in ("fit", "weight_fit"):
                for site, f in (p.get(source) or {}).items():
                    ci = f.get("ci95") or [None, None]
                    for stat, value in (("growth_factor", f.get("growth_factor")), ("ci95_lo", ci[0]),
                                        ("ci95_hi", ci[1]), ("percent_per_layer", f.get("percent_per_layer"))):
                        yield {"model": p.get("model", p["checkpoint"]), "site": site, "layer": None,
                               "statistic": stat, "value": as_float(value), "source": source,
                               **extra}

    def summary(self) -> str:
        return f"sweep of {len(self.points)} checkpoints\n" + self.text()

    def text(self) -> str:
        """One row per point: step, checkpoint, resid_post and W_OV_mean growth factors with CIs, verdict."""
        header = ("step", "checkpoint", "resid_post g/layer [95% CI]", "resid_pre g/layer [95% CI]",
                  "W_OV_mean g/layer [95% CI]", "deletion verdict")
        rows = [("-" if p.get("step") is None else str(p["step"]),
                 p["checkpoint"] if p.get("revision") is None else f"{p['checkpoint']}@{p['revision']}",
                 _fmt_g((p.get("fit") or {}).get("resid_post")), _fmt_g((p.get("fit") or {}).get("resid_pre")),
                 _fmt_g((p.get("weight_fit") or {}).get("W_OV_mean")), verdict_label(p)) for p in self.points]
        return "\n".join(text_table(header, rows))
