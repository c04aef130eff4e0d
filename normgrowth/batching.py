"""Batch sizes for large models: an estimate from free memory, and clear out-of-memory errors.

:func:`auto_batch_size` divides a share of the free memory of the device (``torch.cuda.mem_get_info``
on a GPU, ``MemAvailable`` from ``/proc/meminfo`` on the CPU) by the activation footprint of one
sequence in a collection pass (:func:`bytes_per_sequence`):

    bytes/seq = seq_len * [ e * (C_RESID * d_model + C_MLP * d_mlp + C_ATTN * n_heads * seq_len_eager)
                            + (STATS_BYTES_PER_SERIES * K) ]

with ``e`` the bytes of one activation entry (4 for float32, 2 for bf16/fp16), ``seq_len_eager`` =
``seq_len`` when the attention materialises its ``[head, pos, pos]`` scores (eager attention) and 0
with SDPA, ``K`` the per-token series a collector keeps (norms, heads, rates) and the constants
upper bounds of the transient tensors alive at once in one block (counted from the forward pass, see
``benchmarks/README.md``, where the estimate is compared with measured peaks). Half of the free
memory is used (``MEMORY_FRACTION``): allocators cache, other processes allocate, and fragmentation
costs more than the counts show.

:func:`run_with_oom_guard` turns an out-of-memory failure into a one-sentence
:class:`~normgrowth.errors.NormgrowthError` naming a batch size that should fit;
:func:`resolve_batch_size` turns a ``--batch-size`` value (a number or ``auto``) into a number.

Models larger than one GPU: ``normgrowth.models.load_model(spec, device_map="auto")`` spreads the
layers over every visible GPU (through ``accelerate``); inputs go to the embedding's device and the
collectors keep their statistics there. ``auto_batch_size`` then uses the free memory of the GPU
holding the embedding, which is conservative when the other GPUs hold more of the model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import torch

from .errors import NormgrowthError

T = TypeVar("T")

MEMORY_FRACTION = 0.5  # share of the free memory a batch may use
C_RESID = 12  # d_model-wide tensors alive at once (stream, norm output, q/k/v, context, writes, hook temps)
C_MLP = 3  # d_mlp-wide tensors alive at once (pre-activation, activation, hook temporaries)
C_ATTN = 3  # [head, pos, pos] tensors of eager attention (scores, mask added, softmax)
STATS_BYTES_PER_SERIES = 4 + 6 * 8  # collector buffer (float32) + float64 temporaries of TokenStats.update
LOGITS_FLOATS = 3  # float entries per vocabulary item when logits are formed (logits, float32 copy, log-softmax)
DEFAULT_CPU_BYTES = 4 * 2**30  # used when /proc/meminfo cannot be read
MAX_AUTO_BATCH = 1024


def free_memory_bytes(device: Any = None) -> int:
    """Free memory on ``device``: ``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` on the CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return cpu_available_bytes()


def cpu_available_bytes(meminfo: Union[str, Path] = "/proc/meminfo") -> int:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes (DEFAULT_CPU_BYTES where it cannot be read)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return DEFAULT_CPU_BYTES


def activation_bytes(dtype: torch.dtype) -> int:
    """Bytes of one activation entry (norms are computed in float32 from it, see collector.py)."""
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_sequence(d_model: int, d_mlp: int, n_heads: int, seq_len: int, dtype: torch.dtype = torch.float32,
                       eager_attention: bool = False, n_series: int = 0, vocab_size: int = 0) -> int:
    """Upper estimate of the peak activation bytes one sequence of ``seq_len`` tokens adds to a pass.

    See the module docstring for the formula; ``vocab_size`` > 0 adds the logits (for passes that form
    them: the collectors do not).
    """
    e = activation_bytes(dtype)
    per_token = e * (C_RESID * d_model + C_MLP * d_mlp)
    if eager_attention:
        per_token += e * C_ATTN * n_heads * seq_len
    per_token += STATS_BYTES_PER_SERIES * n_series
    per_token += 4 * LOGITS_FLOATS * vocab_size
    return int(seq_len * per_token)


def collector_series(model: Any, heads: bool = True, act_rate: bool = True, n_sites: int = 5) -> int:
    """Per-token series of a default :func:`normgrowth.collect` run (3 per site and layer, heads, rates)."""
    k = 3 * (n_sites * model.n_layers + 2)
    if heads:
        k += model.n_layers * model.n_heads
    if act_rate:
        k += model.n_layers
    return k


def auto_batch_size(model: Any, seq_len: int, device: Any = None, logits: bool = False,
                    free_bytes: Optional[int] = None, extra_bytes_per_token: int = 0) -> int:
    """Sequences per batch that should fit in ``MEMORY_FRACTION`` of the free memory of ``device``.

    ``device`` defaults to the device of the model's inputs; ``logits`` counts the logits too (for
    passes that form them); ``free_bytes`` overrides the measured free memory;
    ``extra_bytes_per_token`` adds what another collector keeps per token (the deletion collector's
    writes, :func:`normgrowth.deletion.deletion_bytes_per_token`). At least 1.
    """
    if seq_len < 1:
        raise NormgrowthError(f"sequence length must be at least 1 to size a batch, got {seq_len}.")
    dev = torch.device(device) if device is not None else _model_device(model)
    free = free_memory_bytes(dev) if free_bytes is None else int(free_bytes)
    per_seq = bytes_per_sequence(
        model.d_model, model.d_mlp, model.n_heads, seq_len, dtype=model.dtype,
        eager_attention=bool(getattr(model, "eager_attention", False)), n_series=collector_series(model),
        vocab_size=model.vocab_size if logits else 0) + int(extra_bytes_per_token) * seq_len
    return int(max(1, min(MAX_AUTO_BATCH, math.floor(MEMORY_FRACTION * free / max(per_seq, 1)))))


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "input_device", None) or getattr(model, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def resolve_batch_size(value: Union[str, int], model: Any, seq_len: int, extra_bytes_per_token: int = 0) -> int:
    """A ``--batch-size`` value: a positive integer (or its string), or ``"auto"`` (:func:`auto_batch_size`)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return auto_batch_size(model, seq_len, extra_bytes_per_token=extra_bytes_per_token)
        try:
            value = int(text)
        except ValueError:
            raise NormgrowthError(f"--batch-size must be a positive integer or 'auto', got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NormgrowthError(f"--batch-size must be a positive integer or 'auto', got {value!r}.")
    return value


# ----------------------------------------------------------------------------------------------
# out-of-memory handling
# ----------------------------------------------------------------------------------------------
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
                 "failed to allocate")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA or CPU allocator, or Python's MemoryError)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(err, RuntimeError):
        text = str(err).lower()
        return any(m in text for m in _OOM_MESSAGES)
    return False


def smaller_batch_size(batch_size: int) -> int:
    """The batch size to suggest after an out-of-memory failure at ``batch_size``: half of it."""
    return max(1, batch_size // 2)


def oom_error(batch_size: int) -> NormgrowthError:
    if batch_size <= 1:
        return NormgrowthError("out of memory at batch size 1: use a shorter --seq-len, --dtype bfloat16, "
                               "or a device with more memory (--device-map auto spreads a model over GPUs).")
    return NormgrowthError(f"out of memory at batch size {batch_size}: rerun with --batch-size "
                           f"{smaller_batch_size(batch_size)}")


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_guard(fn: Callable[[], T], batch_size: int) -> T:
    """``fn()``; an out-of-memory failure becomes a :class:`NormgrowthError` naming a smaller batch size."""
    try:
        return fn()
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(err):
            raise
        _release_cached_memory()
        raise oom_error(batch_size) from None
