"""The result protocol every result type follows (collection, weights, deletion, compare, sweep).

A result is a dataclass that implements:

* ``to_json() -> dict``: the stable, strict-JSON view (what ``--json`` writes);
* ``arrays() -> dict[str, np.ndarray]``: bulk arrays kept out of the JSON (may be empty);
* ``from_saved(doc, arrays)`` (classmethod): rebuild from what :meth:`ResultProtocol.save` wrote;
* ``frame_rows() -> iterable of dict``: long-format rows with at least the keys
  ``model, site, layer, statistic, value`` (extra keys become extra columns);
* ``summary() -> str``: a few readable lines.

and inherits ``save`` / ``load`` (JSON + npz, each written atomically, the JSON recording the npz's
SHA-256 so that a torn write is detected, never read), ``to_frame`` (a pandas DataFrame) and a short
``__repr__``. A cache entry's JSON also records the code that computed it under ``"cache"``
(:func:`normgrowth.cache.stamp`): :meth:`ResultProtocol.save` writes it when given, :func:`saved_stamp` reads
it, and :meth:`ResultProtocol.load` leaves it out of the result.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Optional, TypeVar

from .errors import NormgrowthError
from .storage import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:  # numpy is imported where arrays are written or read, so that importing this stays light
    import numpy as np

FRAME_COLUMNS = ("model", "site", "layer", "statistic", "value")
STAMP_KEY = "cache"  # a cache entry's record of the code that computed it
R = TypeVar("R", bound="ResultProtocol")


def result_base(path: str | os.PathLike) -> Path:
    """``path`` without a ``.json`` / ``.npz`` suffix (both files share this base)."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".npz") else p


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def saved_stamp(path: str | os.PathLike) -> Any:
    """The cache stamp recorded in the saved JSON at ``path`` (None when absent or unreadable)."""
    try:
        doc = json.loads(result_base(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return doc.get(STAMP_KEY) if isinstance(doc, dict) else None


class ResultProtocol:
    """Mixin giving save / load / to_frame / __repr__ on top of the methods listed in the module doc."""

    kind: ClassVar[str] = "result"

    # ---- to implement -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def from_saved(cls: type[R], doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> R:
        raise NotImplementedError

    def frame_rows(self) -> Iterable[dict[str, Any]]:
        raise NotImplementedError

    def summary(self) -> str:
        raise NotImplementedError

    # ---- provided -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, stamp: Optional[dict[str, Any]] = None) -> Path:
        """Write ``<path>.npz`` (when there are arrays) then ``<path>.json`` (with the cache ``stamp`` when
        given); returns the JSON path."""
        base = result_base(path)
        doc = dict(self.to_json())
        doc["result_kind"] = self.kind
        if stamp is not None:
            doc[STAMP_KEY] = stamp
        arrays = self.arrays()
        if arrays:
            raw = npz_bytes(arrays)
            atomic_write_bytes(base.with_suffix(".npz"), raw)
            doc["arrays"] = {"file": base.with_suffix(".npz").name, "sha256": hashlib.sha256(raw).hexdigest()}
        atomic_write_json(base.with_suffix(".json"), doc)
        return base.with_suffix(".json")

    @classmethod
    def load(cls: type[R], path: str | os.PathLike) -> R:
        """Read what :meth:`save` wrote; a missing file, another result kind or a JSON whose npz hash does
        not match is a :class:`NormgrowthError` naming the file."""
        base = result_base(path)
        jpath = base.with_suffix(".json")
        if not jpath.is_file():
            raise NormgrowthError(f"no saved {cls.kind} result at {str(jpath)!r}: compute it first (e.g. with --out).")
        try:
            doc = json.loads(jpath.read_text())
        except (OSError, ValueError) as err:
            raise NormgrowthError(f"saved result {str(jpath)!r} is not readable JSON ({err}); delete it and "
                                  "compute it again.") from None
        if doc.get("result_kind", cls.kind) != cls.kind:
            raise NormgrowthError(f"{str(jpath)!r} holds a {doc.get('result_kind')!r} result, not {cls.kind!r}; "
                                  "load it with the matching class.")
        arrays: dict[str, np.ndarray] = {}
        if "arrays" in doc:
            npath = base.with_suffix(".npz")
            raw = npath.read_bytes() if npath.is_file() else b""
            if doc["arrays"].get("sha256") != hashlib.sha256(raw).hexdigest():
                raise NormgrowthError(f"saved result {str(jpath)!r} does not match its .npz (interrupted write?): "
                                      "delete both files and compute it again.")
            import numpy as np

            with np.load(npath, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        doc.pop(STAMP_KEY, None)
        return cls.from_saved(doc, arrays)

    def to_frame(self):
        """Long-format pandas DataFrame: one row per (model, site, layer, statistic) value."""
        import pandas as pd

        rows = list(self.frame_rows())
        cols = list(FRAME_COLUMNS) + sorted({k for r in rows for k in r} - set(FRAME_COLUMNS))
        return pd.DataFrame(rows, columns=cols)

    def __repr__(self) -> str:
        first = self.summary().splitlines()
        return f"<{type(self).__name__}: {first[0] if first else ''}>"
