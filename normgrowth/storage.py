"""Files: the one atomic write (temporary file, fsync, rename), NaN-safe JSON and JSON numbers back to floats.

A reader never sees a half-written file: data goes to a temporary file in the target's directory,
is flushed and fsynced, then renamed over the target (``os.replace`` is atomic on POSIX), and the
directory is fsynced so the rename itself survives a crash.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """Recursively turn numpy/torch values into Python ones and non-finite floats into None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor, without importing torch
        obj = obj.detach().cpu().numpy()
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays and scalars
        obj = obj.tolist()
        if isinstance(obj, list):
            return [json_safe(v) for v in obj]
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def as_float(x: Any) -> float:
    """``float(x)``, NaN for None (a JSON null: a number that was missing or not finite)."""
    return math.nan if x is None else float(x)


def none_to_nan(values: Any) -> Any:
    """Nested lists with every None (JSON null) replaced by NaN, ready for ``np.asarray(..., dtype=float)``."""
    if isinstance(values, (list, tuple)):
        return [none_to_nan(v) for v in values]
    return math.nan if values is None else values


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def to_json_text(doc: Any, indent: int = 1) -> str:
    """Strict JSON text of ``doc`` (through :func:`json_safe`), newline-terminated."""
    return json.dumps(json_safe(doc), indent=indent, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, doc: Any, indent: int = 1) -> None:
    """:func:`atomic_write_bytes` of :func:`to_json_text`."""
    atomic_write_bytes(path, to_json_text(doc, indent).encode())


def nan_to_none(x: Any) -> Any:
    """The inverse of :func:`as_float` for one number: NaN or infinite -> None, else a float."""
    return None if x is None or not math.isfinite(float(x)) else float(x)
