"""Fit windows: inclusive layer ranges ``a..b``, the default window and "a:b" parsing (docs/fit.md, "Default window")."""

from __future__ import annotations

import math
from typing import Sequence, Union

from normgrowth.errors import NormgrowthError

Window = tuple[int, int]
WindowSpec = Union[Window, Sequence[int], str, None]




def default_window(n_layers: int) -> Window:
    """Default inclusive fit window: a = ceil(n/10), b = n - 1 - ceil(n/8).

    Skips the early jump after the embedding (first ceil(n/10) layers) and the last ceil(n/8)
    layers; n = 48 gives exactly the study's 5..41. If that leaves fewer than 3 layers, the first
    of (1, n-2), (1, n-1), (0, n-1) with at least 3 layers is used; for n < 3, all layers (0, n-1).
    """
    n = int(n_layers)
    if n < 1:
        raise NormgrowthError(f"a norm curve needs at least 1 layer, got {n}; check the input curve.")
    if n < 3:
        return (0, n - 1)
    candidates = [(math.ceil(n / 10), n - 1 - math.ceil(n / 8)), (1, n - 2), (1, n - 1), (0, n - 1)]
    for a, b in candidates:
        if b - a + 1 >= 3:
            return (a, b)
    return (0, n - 1)  # unreachable for n >= 3


def _norm_index(i: int, n_layers: int, text: str) -> int:
    j = i + n_layers if i < 0 else i
    if not 0 <= j < n_layers:
        raise NormgrowthError(
            f"window {text!r} refers to layer {i}, outside 0..{n_layers - 1} (or -{n_layers}..-1) "
            f"for a {n_layers}-layer curve; choose layers inside that range."
        )
    return j


def parse_window(text: str, n_layers: int) -> Window:
    """Parse "a:b" into an inclusive (a, b); negative indices count from the end like Python
    (-1 = last layer), empty sides mean the first/last layer ("5:" = 5..n-1). Needs a < b."""
    if not isinstance(text, str) or text.count(":") != 1:
        raise NormgrowthError(
            f"window {text!r} is not of the form 'a:b' (inclusive layer indices, e.g. '5:41' or '2:-2')."
        )
    left, right = (s.strip() for s in text.split(":"))
    try:
        a = int(left) if left else 0
        b = int(right) if right else n_layers - 1
    except ValueError:
        raise NormgrowthError(
            f"window {text!r} has a non-integer side; use integer layer indices like '5:41' or '2:-2'."
        ) from None
    return _check_window((a, b), n_layers, text)


def _check_window(window: Sequence[int], n_layers: int, text: str | None = None) -> Window:
    text = text if text is not None else f"{window[0]}:{window[1]}"
    a = _norm_index(int(window[0]), n_layers, text)
    b = _norm_index(int(window[1]), n_layers, text)
    if b <= a:
        raise NormgrowthError(
            f"window {text!r} resolves to layers {a}..{b}; a fit needs a < b (at least 2 layers), "
            f"so give the start before the end."
        )
    return (a, b)


def resolve_window(window: WindowSpec, n_layers: int) -> Window:
    """A window spec (None: the default window; "a:b"; a pair) as an inclusive, checked (a, b)."""
    if window is None:
        a, b = default_window(n_layers)
        if b <= a:
            raise NormgrowthError(
                f"a growth fit needs at least 2 layers but the curve has {n_layers}; supply a longer curve."
            )
        return (a, b)
    if isinstance(window, str):
        return parse_window(window, n_layers)
    try:
        if len(window) != 2:
            raise TypeError
        ints = (int(window[0]), int(window[1]))
        if ints[0] != window[0] or ints[1] != window[1]:
            raise TypeError
    except (TypeError, ValueError):
        raise NormgrowthError(
            f"window {window!r} must be a pair of integer layer indices (a, b) or a string 'a:b'."
        ) from None
    return _check_window(ints, n_layers)
