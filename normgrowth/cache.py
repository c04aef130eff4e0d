"""Results cache: a result is keyed by model, revision, data and settings, and reused only on an exact match.

The key is the SHA-256 of a canonical JSON of: the model (hub name + revision; for a local directory its
absolute path plus the hash of config.json and the size and mtime of every weight file; for a GGUF file its
path, size, mtime and the hash of its first MiB), the data source
(for a file: its path plus a content hash), and every setting that changes numbers (n_seqs, seq_len,
dtype, sites, the analysis kind and its options, the package version). :mod:`normgrowth.pipeline` reads and
writes the entries (atomically, :func:`normgrowth.storage.atomic_write_bytes`), so a half-written entry is
never found.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

from . import __version__

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


def cache_key(kind: str, spec: str, revision: Optional[str], source: Optional[str], settings: dict[str, Any]) -> str:
    doc = {"kind": kind, "model": model_identity(spec, revision), "data": data_identity(source),
           "settings": settings, "version": __version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(out_dir: str | Path, kind: str, spec: str, key: str) -> Path:
    """``out_dir/<kind>-<model slug>-<key[:12]>`` (suffix added by the writer)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).name or spec).strip("_")[:60] or "model"
    return Path(out_dir) / f"{kind}-{slug}-{key[:12]}"
