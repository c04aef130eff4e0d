"""Checkpoint files: one sentence naming the file that is missing, truncated, corrupt or of the wrong shape.

Local Hugging Face checkpoints (safetensors files and shard indexes) and GGUF files are checked before
transformers reads them, so that a bad copy is reported as one line naming the file instead of a deep
traceback; failures that surface inside transformers' own loading are turned into one sentence here too.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import NormgrowthError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def check_checkpoint_files(directory: Path, hf_config: Any = None) -> None:
    """Refuse, in one sentence naming the file, a local checkpoint that cannot load as ``hf_config`` says.

    Checks, in the order HF reads the files: every shard an index names exists; every safetensors
    file's header is complete and describes exactly the file's size (a truncated copy fails this);
    and, given ``hf_config``, every stored tensor whose name the model has has the model's shape.
    """
    directory = Path(directory)
    if (directory / SAFE_INDEX).is_file():
        files = _index_shards(directory / SAFE_INDEX)
    elif (directory / SAFE_WEIGHTS).is_file():
        files = [directory / SAFE_WEIGHTS]
    else:
        if (directory / BIN_INDEX).is_file():
            _index_shards(directory / BIN_INDEX)
        return
    stored = {}
    for path in files:
        for name, shape in safetensors_shapes(path).items():
            stored[name] = (shape, path)
    if hf_config is not None and getattr(hf_config, "quantization_config", None) is None:
        _check_shapes(stored, hf_config)


def _index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise NormgrowthError(f"checkpoint index {str(index)!r} is not a readable weight map: copy or download "
                              "it again.") from None
    for shard in shards:
        if not (index.parent / shard).is_file():
            raise NormgrowthError(f"checkpoint index {str(index)!r} names the shard {shard!r}, which is missing: "
                                  "download the missing file (or the whole checkpoint) again.")
    return [index.parent / shard for shard in shards]


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, after checking that the file is complete.

    Layout: 8 bytes little-endian header length n, n bytes of JSON ``{name: {dtype, shape,
    data_offsets: [begin, end]}}``, then the data; the last ``end`` must reach the end of the file.
    """
    size = path.stat().st_size

    def corrupt(detail: str) -> NormgrowthError:
        return NormgrowthError(f"checkpoint file {str(path)!r} is truncated or corrupt ({detail}): copy or "
                               "download it again.")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise corrupt(f"the header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(e["data_offsets"][1]) for e in entries.values()), default=0)
            shapes = {k: tuple(int(d) for d in e["shape"]) for k, e in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise corrupt("its header is not a valid tensor table") from None
    if 8 + n + end != size:
        raise corrupt(f"{size} bytes where its header describes {8 + n + end}")
    return shapes


def _check_shapes(stored: dict[str, tuple[tuple[int, ...], Path]], hf_config: Any) -> None:
    """Compare stored shapes with those of the model ``hf_config`` builds (on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            meta = AutoModelForCausalLM.from_config(hf_config)
    except Exception:  # a config transformers cannot build fails later, with HF's own message
        return
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    prefix = getattr(meta, "base_model_prefix", "")
    for name, (shape, path) in stored.items():
        key = name if name in expected else f"{prefix}.{name}"
        if key in expected and expected[key] != shape:
            raise NormgrowthError(
                f"checkpoint file {str(path)!r} holds {name} with shape {list(shape)} but config.json implies "
                f"{list(expected[key])}: the weights and config.json come from different models; use matching files.")



# ----------------------------------------------------------------------------------------------
# GGUF files
# ----------------------------------------------------------------------------------------------
GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file's header says, read with the ``gguf`` package's ``GGUFReader``.

    ``file_type``: the quantisation of the file as a whole (``general.file_type``, e.g. ``"Q4_1"``; None
    when the header has none); ``tensor_types``: how many tensors are stored in each ggml type (a
    ``Q4_1`` file keeps its norms in F32, for instance).
    """

    path: str
    architecture: str
    file_type: Optional[str]
    tensor_types: dict[str, int]


def read_gguf_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file ``path``, after checking that every tensor's data lies inside the file.

    A truncated or corrupt file is one sentence naming it (:class:`NormgrowthError`).
    """
    path = Path(path)
    try:
        from gguf import GGUFReader, LlamaFileType
    except ImportError:
        raise NormgrowthError(f"reading the GGUF file {str(path)!r} needs the 'gguf' package: "
                              "pip install gguf.") from None
    size = path.stat().st_size

    def corrupt(detail: str) -> NormgrowthError:
        return NormgrowthError(f"GGUF file {str(path)!r} is truncated or corrupt ({detail}): copy or download it "
                               "again.")

    try:
        reader = GGUFReader(path, "r")
        arch_field = reader.get_field("general.architecture")
        architecture = str(arch_field.contents()) if arch_field is not None else None
        type_field = reader.get_field("general.file_type")
        file_type_id = int(type_field.contents()) if type_field is not None else None
        tensors = list(reader.tensors)
    except Exception as err:  # the reader raises whatever numpy raises on a short or garbled file
        raise corrupt(first_line(err)) from None
    if architecture is None:
        raise corrupt("its header names no general.architecture")
    for tensor in tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise corrupt(f"tensor {tensor.name} ends at byte {end} but the file has {size}")
    file_type = None
    if file_type_id is not None:
        try:
            file_type = LlamaFileType(file_type_id).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type = f"file_type {file_type_id}"
    counts = Counter(t.tensor_type.name for t in tensors)
    return GGUFHeader(path=str(path), architecture=architecture, file_type=file_type,
                      tensor_types=dict(sorted(counts.items())))


def check_gguf_architecture(header: GGUFHeader) -> None:
    """Refuse, in one sentence, a GGUF file whose architecture transformers cannot load from GGUF."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if header.architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise NormgrowthError(
            f"GGUF file {header.path!r} holds a {header.architecture!r} model, which transformers cannot load from "
            f"GGUF: use a GGUF of one of {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}, or a Hugging Face "
            "checkpoint.")


# ----------------------------------------------------------------------------------------------
# failures inside transformers' loading, as one sentence
# ----------------------------------------------------------------------------------------------
def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def weights_error(spec: str, directory: Optional[Path], err: BaseException) -> NormgrowthError:
    """One sentence for a failure inside HF's loading, naming the weight files of a local checkpoint."""
    files = sorted(p.name for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in directory.glob(pattern)
                   ) if directory is not None else []
    where = f" from {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}" if files else ""
    detail = ("stored shapes differ from those config.json implies" if "mismatched_sizes" in str(err)
              else first_line(err))
    return NormgrowthError(f"cannot load the weights of model {spec!r}{where} ({detail}): check that the checkpoint "
                           "is complete and matches its config.json.")


def safetensors_errors() -> tuple[type, ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)



def unmappable_config(spec: str, arch: str, config: Any, err: KeyError) -> NormgrowthError:
    """One sentence naming the config field whose value (the KeyError's key) has no implementation."""
    key = err.args[0] if err.args else None
    path = _field_holding(config.to_dict(), key) if key is not None else None
    what = f"config field {path!r} = {key!r}" if path else f"config value {key!r}"
    return NormgrowthError(f"model {spec!r} ({arch}) has {what}, which transformers / the TransformerLens bridge "
                           "cannot map: use a checkpoint with a supported value of that field.")


def _field_holding(doc: Any, value: Any, prefix: str = "") -> Optional[str]:
    """Dotted path of the first field of a config dict whose value (or key) is ``value``."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            here = f"{prefix}{k}"
            if isinstance(v, (dict, list)):
                found = _field_holding(v, value, here + ".")
                if found:
                    return found
            elif v == value and not isinstance(v, bool):
                return here
    elif isinstance(doc, list):
        for v in doc:
            found = _field_holding(v, value, prefix)
            if found:
                return found
    return None


def config_field_of(err: BaseException) -> Optional[str]:
    """The config attribute an AttributeError / KeyError names (``'X' object has no attribute 'f'``, ``'f'``)."""
    import re

    text = str(err)
    hit = re.search(r"has no attribute '([A-Za-z_][A-Za-z0-9_]*)'", text) or re.fullmatch(r"'([A-Za-z_]\w*)'", text)
    return hit.group(1) if hit else None


