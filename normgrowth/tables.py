"""Plain-text tables for the commands' output: one layout, one way to print a number that may be missing, one
way to print a value with its confidence interval."""

from __future__ import annotations

import math
from typing import Any, Sequence


def fmt_number(x: Any, spec: str, missing: str = "nan") -> str:
    """``format(x, spec)``, or ``missing`` when ``x`` is None, not a number, NaN or infinite."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return missing
    return format(value, spec) if math.isfinite(value) else missing


def fmt_with_ci(x: Any, ci: Any, spec: str = ".3f", missing: str = "-") -> str:
    """``value [lo, hi]`` (each with ``spec``) when both CI ends are finite numbers, else the value alone."""
    lo, hi = (list(ci) + [None, None])[:2] if isinstance(ci, (list, tuple)) else (None, None)
    ends = [fmt_number(v, spec, missing="") for v in (lo, hi)]
    value = fmt_number(x, spec, missing)
    return f"{value} [{ends[0]}, {ends[1]}]" if all(ends) else value


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart: the header, a rule of dashes, then the rows (lines right-stripped)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
