"""Reading a per-layer norm curve measured elsewhere (e.g. a published one) from CSV or JSON: ``read_curve``.

Formats and checks: docs/fit.md, "Curve files".
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from normgrowth.errors import NormgrowthError




def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _assemble(layers: list, values: list, path: Path) -> np.ndarray:
    """Sort (layer, value) pairs by layer; layers must be exactly 0..n-1."""
    layer_ints = []
    for raw in layers:
        try:
            f = float(raw)
        except (TypeError, ValueError):
            raise NormgrowthError(f"{path}: layer {raw!r} is not an integer; number layers 0..n-1.") from None
        if isinstance(raw, bool) or not math.isfinite(f) or f != int(f) or f < 0:
            raise NormgrowthError(f"{path}: layer {raw!r} is not a non-negative integer; number layers 0..n-1.")
        layer_ints.append(int(f))
    seen: set[int] = set()
    for layer in layer_ints:
        if layer in seen:
            raise NormgrowthError(f"{path}: layer {layer} appears more than once; give one value per layer.")
        seen.add(layer)
    missing = sorted(set(range(max(layer_ints) + 1)) - seen)
    if missing:
        shown = ", ".join(str(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise NormgrowthError(
            f"{path}: layer(s) {shown} missing; layers must be numbered 0..n-1 with one value each."
        )
    order = np.argsort(layer_ints)
    return np.asarray(values, dtype=np.float64)[order]


def _check_values(values: list, path: Path, where: list[str], json_types: bool = False) -> list[float]:
    out = []
    for raw, loc in zip(values, where):
        if isinstance(raw, bool) or raw is None or (json_types and not isinstance(raw, (int, float))):
            raise NormgrowthError(f"{path}: value {raw!r} at {loc} is not a number; give numeric norms.")
        try:
            f = float(raw)
        except (TypeError, ValueError):
            raise NormgrowthError(f"{path}: value {raw!r} at {loc} is not a number; give numeric norms.") from None
        if not math.isfinite(f):
            raise NormgrowthError(f"{path}: value {raw!r} at {loc} is not finite; give finite norms.")
        out.append(f)
    return out


def _read_json_curve(text: str, path: Path) -> np.ndarray:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise NormgrowthError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); fix the file.") from None
    if isinstance(data, list):
        if not data:
            raise NormgrowthError(f"{path}: the JSON list is empty; give one norm per layer.")
        return np.asarray(_check_values(data, path, [f"index {i}" for i in range(len(data))], json_types=True))
    if isinstance(data, dict) and "layer" in data and "value" in data:
        layers, values = data["layer"], data["value"]
        if not isinstance(layers, list) or not isinstance(values, list) or len(layers) != len(values):
            raise NormgrowthError(f"{path}: 'layer' and 'value' must be JSON lists of the same length.")
        if not values:
            raise NormgrowthError(f"{path}: 'layer' and 'value' are empty; give one norm per layer.")
        vals = _check_values(values, path, [f"layer {layer!r}" for layer in layers], json_types=True)
        return _assemble(layers, vals, path)
    raise NormgrowthError(
        f"{path}: JSON must be a list of numbers or an object with 'layer' and 'value' lists."
    )


def _read_csv_curve(text: str, path: Path, column: Optional[str] = None) -> np.ndarray:
    rows = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not cells or all(c == "" for c in cells) or cells[0].startswith("#"):
            continue
        rows.append((lineno, cells))
    if not rows:
        raise NormgrowthError(f"{path}: the file has no data rows; give one norm per layer.")
    header = None
    first_line, first = rows[0]
    if not all(_is_number(c) for c in first):
        header = [c.lower() for c in first]
        rows = rows[1:]
        if not rows:
            raise NormgrowthError(f"{path}: the file has a header but no data rows; give one norm per layer.")
    n_cols = len(header) if header is not None else len(first)
    for lineno, cells in rows:
        if len(cells) != n_cols:
            raise NormgrowthError(
                f"{path}: line {lineno} has {len(cells)} column(s), expected {n_cols}; every row needs the same columns."
            )
    if column is not None:
        if header is None or column.lower() not in header:
            have = ", ".join(header) if header else "no header"
            raise NormgrowthError(f"{path}: no column {column!r} (columns: {have}); name one of the header's columns.")
        vi = header.index(column.lower())
        values = _check_values([c[vi] for _, c in rows], path, [f"line {ln}" for ln, _ in rows])
        if "layer" in header:
            return _assemble([c[header.index("layer")] for _, c in rows], values, path)
        return np.asarray(values)
    if n_cols == 1:
        return np.asarray(_check_values([c[0] for _, c in rows], path, [f"line {ln}" for ln, _ in rows]))
    if header is None:
        raise NormgrowthError(
            f"{path}: a CSV with {n_cols} columns needs a header naming 'layer' and 'value' columns."
        )
    if "layer" not in header or "value" not in header:
        raise NormgrowthError(
            f"{path}: the CSV header {','.join(header)!r} lacks a 'layer' or 'value' column; name them so or "
            f"choose the column to fit (--column NAME)."
        )
    li, vi = header.index("layer"), header.index("value")
    layers = [c[li] for _, c in rows]
    vals = _check_values([c[vi] for _, c in rows], path, [f"line {ln}" for ln, _ in rows])
    return _assemble(layers, vals, path)


def read_curve(path: str | Path, column: Optional[str] = None) -> np.ndarray:
    """Read a norm curve [n_layers] (float64) from CSV or JSON.

    CSV: one column of values (optional one-word header), or a header with 'layer' and 'value'
    columns (rows in any order, sorted by layer), or with ``column`` the header's column of that name
    (sorted by a 'layer' column when there is one). JSON: a list of numbers, or {"layer": [...],
    "value": [...]}. Format from the suffix (.json / .csv), otherwise sniffed from the first character.
    Layers must be 0..n-1 exactly once; values finite.
    """
    p = Path(path)
    if not p.exists():
        raise NormgrowthError(f"curve file {p} does not exist; check the path.")
    if not p.is_file():
        raise NormgrowthError(f"curve path {p} is not a file; give a CSV or JSON file.")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise NormgrowthError(f"cannot read curve file {p} ({err}); give a UTF-8 CSV or JSON file.") from None
    stripped = text.strip()
    if not stripped:
        raise NormgrowthError(f"curve file {p} is empty; give one norm per layer as CSV or JSON.")
    suffix = p.suffix.lower()
    is_json = suffix == ".json" or (suffix != ".csv" and stripped[0] in "[{")
    if is_json and column is not None:
        raise NormgrowthError(f"{p}: a column can only be chosen in a CSV file; drop the column option for JSON.")
    return _read_json_curve(stripped, p) if is_json else _read_csv_curve(stripped, p, column)
