"""Results cache: a result is keyed by model, revision, data, settings and code, and reused only on an exact match.

An entry's identity is a canonical JSON of: the analysis kind, the model (hub name + revision, or for a local
directory its absolute path plus the hash of config.json and the size and mtime of every weight file), the
data source (for a file: its path plus a content hash; for a GGUF model file its path, size, mtime and
the hash of its first MiB), and every setting that changes numbers (n_seqs,
seq_len, dtype, sites, the kind's options). Its SHA-256 (:func:`entry_key`) names the entry's files, so one
run has one place. The full key (:func:`cache_key`) adds the hash of the code that computes the kind
(:func:`normgrowth.codehash.code_hash`); each entry records it (:func:`stamp`), and an entry whose recorded key
is not this run's was computed by other code: it is recomputed, never reused, and :func:`stale_reason` says
why in one line. :mod:`normgrowth.pipeline` reads and writes the entries (atomically,
:func:`normgrowth.storage.atomic_write_bytes`), so a half-written entry is never found.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_identity(spec: str, revision: Optional[str] = None) -> dict[str, Any]:
    """A GGUF file (or a name resolving to one) by :func:`normgrowth.sources.gguf_identity` (size, mtime, hash
    of its first MiB); a local directory by its config hash and weight files; a hub name by name + revision."""
    from .sources import gguf_file_of, gguf_identity

    gguf = gguf_file_of(spec)
    if gguf is not None:
        return gguf_identity(gguf)
    path = Path(spec).expanduser()
    if path.is_dir():
        weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for pat in WEIGHT_PATTERNS
                         for p in path.glob(pat))
        config = path / "config.json"
        return {"local": str(path.resolve()), "config": file_digest(config) if config.is_file() else None,
                "weights": weights}
    return {"hub": spec, "revision": revision}


def data_identity(source: Optional[str]) -> dict[str, Any]:
    if source in (None, "", "builtin", "prompts"):
        from .data import builtin_identity

        return builtin_identity(source or "builtin")
    path = Path(str(source)).expanduser()
    if path.is_file():
        return {"file": str(path.resolve()), "sha256": file_digest(path)}
    return {"dataset": str(source)}


def identity(kind: str, spec: str, revision: Optional[str], source: Optional[str],
             settings: dict[str, Any]) -> dict[str, Any]:
    """What a result of ``kind`` is computed from, apart from the code."""
    return {"kind": kind, "model": model_identity(spec, revision), "data": data_identity(source),
            "settings": settings}


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def entry_key(ident: dict[str, Any]) -> str:
    """SHA-256 of the identity: where the entry lives (:func:`cache_path`)."""
    return _digest(ident)


def cache_key(ident: dict[str, Any], code: Optional[str] = None) -> str:
    """SHA-256 of the identity and the code hash of its kind (``code``; default: this package's)."""
    if code is None:
        from .codehash import code_hash

        code = code_hash(ident["kind"])
    return _digest({**ident, "code": code})


def stamp(ident: dict[str, Any]) -> dict[str, str]:
    """What an entry records about the code that computed it: its full key and its kind's code hash."""
    from .codehash import code_hash

    code = code_hash(ident["kind"])
    return {"key": cache_key(ident, code), "code": code}


def stale_reason(recorded: Any, current: dict[str, str]) -> Optional[str]:
    """None when the entry's recorded stamp is ``current``; else why the entry cannot be reused."""
    if recorded == current:
        return None
    if not isinstance(recorded, dict) or "code" not in recorded:
        return "it records no code hash (written by older code)"
    if recorded.get("code") != current["code"]:
        return (f"it was computed by other code (code hash {str(recorded['code'])[:12]}, "
                f"this code {current['code'][:12]})")
    return "it records another cache key"


def cache_path(out_dir: str | Path, kind: str, spec: str, key: str) -> Path:
    """``out_dir/<kind>-<model slug>-<key[:12]>`` (suffix added by the writer)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).name or spec).strip("_")[:60] or "model"
    return Path(out_dir) / f"{kind}-{slug}-{key[:12]}"
