"""Resume state: streaming state written atomically every few batches, so a killed run resumes.

A checkpoint is one ``.npz`` (written with :func:`normgrowth.storage.atomic_write_bytes`, so it is
either the previous one or the new one, never torn) next to the cached result it will become:
``<cache entry>.ckpt.npz``, or ``<cache entry>.ckpt-r<rank>of<world>.npz`` for each rank of a data
parallel run. It holds the accumulators' :meth:`state_dict` arrays and a JSON header with the identity
of the run (the result's cache key, the hash of the code that computes it
(:func:`normgrowth.codehash.code_hash`), batch size, the rank's block of sequences) and how many of the
block's sequences are done. A checkpoint is resumed only when its identity is exactly this run's: results
from other settings or other code are never mixed. Because the batches after the checkpoint are the very
batches an uninterrupted run makes, and the float64 accumulators are restored bit for bit, a resumed run
ends with exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .storage import atomic_write_bytes

HEADER = "__checkpoint__"
DEFAULT_EVERY_SECONDS = 180.0  # --checkpoint-every default: about this much work between checkpoints


def batches_between(seconds_per_batch: float) -> int:
    """The default cadence: batches between checkpoints, about DEFAULT_EVERY_SECONDS of work (at least 1)."""
    return max(1, int(DEFAULT_EVERY_SECONDS / max(seconds_per_batch, 1e-9)))


@dataclass
class Checkpoint:
    """Where and how often one collection checkpoints. ``every``: batches between checkpoints (None: a
    count sized to about DEFAULT_EVERY_SECONDS from the time the first batches take); ``key``: the
    identity of the result (its cache key)."""

    base: Path
    key: str
    every: Optional[int] = None
    note: Optional[Callable[[str], None]] = None  # where "resuming at ..." lines go

    def path(self, rank: int = 0, world_size: int = 1) -> Path:
        suffix = ".ckpt.npz" if world_size == 1 else f".ckpt-r{rank}of{world_size}.npz"
        return Path(str(self.base) + suffix)

    def say(self, text: str) -> None:
        if self.note is not None:
            self.note(text)


def identity(key: str, **settings: Any) -> dict[str, Any]:
    """The header fields that must match for a checkpoint to be resumed: ``key``, the code hash of the
    checkpoint's ``kind`` (a setting: ``"collection"`` or ``"deletion"``) and the other ``settings``."""
    from .codehash import code_hash

    return {"key": key, "code": code_hash(settings["kind"]), **settings}


def save(path: Path, ident: dict[str, Any], done: int, state: dict[str, np.ndarray]) -> None:
    """Atomically write ``state`` with the header ``ident`` + ``done`` to ``path``."""
    header = json.dumps({**ident, "done": int(done)}, sort_keys=True).encode()
    buf = io.BytesIO()
    np.savez(buf, **{HEADER: np.frombuffer(header, dtype=np.uint8)}, **state)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path, ident: dict[str, Any]) -> tuple[Optional[int], Optional[dict[str, np.ndarray]], str]:
    """``(done, state, why)``: the saved progress and state when ``path`` holds a readable checkpoint
    of exactly ``ident``; otherwise ``(None, None, reason)`` (reason empty when there is no file)."""
    if not path.is_file():
        return None, None, ""
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(npz[HEADER].tobytes().decode())
            state = {k: npz[k] for k in npz.files if k != HEADER}
    except Exception:  # torn by a foreign writer, another format: never trusted
        return None, None, "unreadable"
    done = header.pop("done", None)
    if header != json.loads(json.dumps(ident, sort_keys=True)) or not isinstance(done, int):
        differ = sorted(k for k in set(header) | set(ident) if header.get(k) != ident.get(k))
        if "code" in differ:
            return None, None, (f"written by other code (code hash {str(header.get('code'))[:12]}, "
                                f"this code {str(ident.get('code'))[:12]})")
        return None, None, f"from other settings ({', '.join(differ)})"
    return done, state, ""


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
