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


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart: the header, a rule of dashes, then the rows (lines right-stripped)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def with_ci(value: Any, ci: Any, spec: str = ".3f", missing: str = "nan") -> str:
    """``"value [lo, hi]"`` with every number formatted by ``spec``; the bracket is left out when either end
    of ``ci`` is missing or not finite."""
    lo, hi = (None, None) if ci is None else ci
    text = fmt_number(value, spec, missing)
    if fmt_number(lo, spec, "") and fmt_number(hi, spec, ""):
        text += f" [{fmt_number(lo, spec)}, {fmt_number(hi, spec)}]"
    return text
