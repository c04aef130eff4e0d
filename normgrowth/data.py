"""Token data for collection: built-in prompts, text files, token-id arrays, HF datasets.

Every source ends as a :class:`TokenBatch`: right-padded token ids plus an attention mask. Padding is
marked by the mask only, never by token id (GPT-2's pad id equals its BOS id). Text gets the model's
BOS token prepended; pre-tokenised arrays are used exactly as given. Position 0 is kept apart by the
collectors (reported as "bos"), whatever token it holds.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import NormgrowthError

BUILTIN = "builtin"
TOKEN_SUFFIXES = (".npy", ".pt")
TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class TokenBatch:
    """Token ids ``[n_seqs, seq_len]`` (right-padded) with ``attention_mask`` (True = real token)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        """Real tokens at positions >= 1 (those the main statistics average over)."""
        return int(self.attention_mask[:, 1:].sum())

    def batches(self, batch_size: int):
        """Yield (tokens, attention_mask) slices of at most ``batch_size`` sequences, trimmed of all-pad columns."""
        for start in range(0, len(self), batch_size):
            mask = self.attention_mask[start:start + batch_size]
            width = int(mask.sum(1).max()) if mask.numel() else 0
            yield self.tokens[start:start + batch_size, :width], mask[:, :width]


def builtin_prompts() -> list[str]:
    """The 59 English prompts written for this project (news, code, dialogue, fiction, lists, math ...)."""
    text = (Path(__file__).parent / "resources" / "prompts.txt").read_text(encoding="utf-8")
    return [block.strip("\n") for block in text.split("\n\n") if block.strip()]


def load_tokens(source: Optional[str], model: Any = None, n_seqs: Optional[int] = None,
                seq_len: Optional[int] = None, *, tokenizer: Any = None, bos_token_id: Optional[int] = None,
                n_ctx: Optional[int] = None, vocab_size: Optional[int] = None) -> TokenBatch:
    """Load ``source`` for ``model`` (or for an explicit tokenizer / bos id / context / vocabulary).

    source: None or "builtin" (built-in prompts), a ``.txt`` file (documents separated by blank lines),
    a ``.jsonl`` file (``text`` field), a ``.npy``/``.pt`` integer array ``[n_seqs, seq_len]`` (used as
    given: no BOS added), or a Hugging Face dataset name (``text`` column, where the hub is reachable).
    ``n_seqs`` keeps the first n sequences; ``seq_len`` truncates (the model's context always does,
    with one warning).
    """
    if model is not None:
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        bos_token_id = bos_token_id if bos_token_id is not None else model.bos_token_id
        n_ctx = n_ctx or model.n_ctx
        vocab_size = vocab_size or model.vocab_size
    if n_seqs is not None and n_seqs < 1:
        raise NormgrowthError(f"--n-seqs must be at least 1, got {n_seqs}.")
    if seq_len is not None and seq_len < 2:
        raise NormgrowthError(f"--seq-len must be at least 2 (position 0 is kept apart), got {seq_len}.")
    src = BUILTIN if source in (None, "", BUILTIN) else str(source)
    path = Path(src).expanduser()
    if src != BUILTIN and path.suffix.lower() in TOKEN_SUFFIXES:
        batch = _token_file(path, n_seqs, seq_len, n_ctx, vocab_size)
    else:
        if src == BUILTIN:
            docs = builtin_prompts()
        elif path.suffix.lower() in TEXT_SUFFIXES or path.exists():
            docs = _text_file(path)
        elif src.startswith((".", "/", "~")) or src.count("/") > 1:
            raise NormgrowthError(f"data file {src!r} does not exist: check the path.")
        else:
            docs = _hf_dataset(src, n_seqs)
        if n_seqs is not None:
            docs = docs[:n_seqs]
        batch = _tokenize(docs, src, tokenizer, bos_token_id, seq_len, n_ctx)
    if len(batch) == 0 or batch.n_tokens == 0:
        raise NormgrowthError(f"data source {src!r} gave no tokens after position 0: use longer or more sequences.")
    return batch


def _text_file(path: Path) -> list[str]:
    if not path.is_file():
        raise NormgrowthError(f"data file {str(path)!r} does not exist: check the path.")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                docs.append(str(record["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise NormgrowthError(f"line {i} of {str(path)!r} is not a JSON object with a \"text\" field: "
                                      "fix the file or use a .txt file.") from None
    else:
        docs = [block.strip("\n") for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]
    if not docs:
        raise NormgrowthError(f"data file {str(path)!r} holds no text: give a file with at least one document.")
    return docs


def _hf_dataset(name: str, n_seqs: Optional[int]) -> list[str]:
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        raise NormgrowthError(f"data source {name!r} is neither a file nor 'builtin', and reading Hugging Face "
                              "datasets needs the 'datasets' package: pip install datasets, or pass a local file.") from None
    from .models import _hub_reachable

    if not _hub_reachable():
        raise NormgrowthError(f"dataset {name!r} is not a local file and the Hugging Face hub cannot be reached: "
                              "pass a local .txt/.jsonl/.npy file.")
    import datasets as hfd

    try:
        ds = hfd.load_dataset(name, split="train", streaming=True)
        docs = []
        for row in ds:
            docs.append(str(row["text"]))
            if len(docs) >= (n_seqs or 256):
                break
    except Exception as err:  # network / schema problems from a third-party library
        raise NormgrowthError(f"cannot read dataset {name!r} ({str(err).splitlines()[0][:150]}): check the name.") from None
    return docs


def _tokenize(docs: Sequence[str], source: str, tokenizer: Any, bos_token_id: Optional[int],
              seq_len: Optional[int], n_ctx: Optional[int]) -> TokenBatch:
    if tokenizer is None:
        raise NormgrowthError(f"this model has no tokenizer, so text data ({source!r}) cannot be used: "
                              "pass token ids as a .npy or .pt array [n_seqs, seq_len].")
    if bos_token_id is None:
        raise NormgrowthError("this model's tokenizer defines no BOS token, which text data needs at position 0: "
                              "pass token ids as a .npy or .pt array instead.")
    limit = min(x for x in (seq_len, n_ctx) if x is not None) if (seq_len or n_ctx) else None
    rows, over_ctx = [], 0
    for doc in docs:
        ids = [bos_token_id] + list(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if n_ctx is not None and len(ids) > n_ctx and (seq_len is None or seq_len > n_ctx):
            over_ctx += 1
        rows.append(ids[:limit] if limit else ids)
    if over_ctx:
        warnings.warn(f"{over_ctx} sequence(s) longer than the model's context ({n_ctx}) were truncated.")
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return TokenBatch(tokens, mask, source)


def _token_file(path: Path, n_seqs: Optional[int], seq_len: Optional[int], n_ctx: Optional[int],
                vocab_size: Optional[int]) -> TokenBatch:
    if not path.is_file():
        raise NormgrowthError(f"token file {str(path)!r} does not exist: check the path.")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            array = loaded.numpy() if torch.is_tensor(loaded) else np.asarray(loaded)
    except Exception as err:  # corrupt or foreign file
        raise NormgrowthError(f"cannot read token file {str(path)!r} ({type(err).__name__}): save an integer "
                              "array [n_seqs, seq_len] with numpy.save or torch.save.") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise NormgrowthError(f"token file {str(path)!r} holds a {array.dtype} array of shape {array.shape}: "
                              "it must be an integer array [n_seqs, seq_len].")
    if array.size and (array.min() < 0 or (vocab_size is not None and array.max() >= vocab_size)):
        raise NormgrowthError(f"token file {str(path)!r} has ids in [{array.min()}, {array.max()}] but the model's "
                              f"vocabulary is [0, {vocab_size}): use ids made for this model.")
    if n_seqs is not None:
        array = array[:n_seqs]
    if n_ctx is not None and array.shape[1] > n_ctx and (seq_len is None or seq_len > n_ctx):
        warnings.warn(f"token sequences of length {array.shape[1]} are longer than the model's context "
                      f"({n_ctx}) and were truncated.")
        array = array[:, :n_ctx]
    if seq_len is not None:
        array = array[:, :seq_len]
    tokens = torch.from_numpy(np.ascontiguousarray(array)).long()
    return TokenBatch(tokens, torch.ones_like(tokens, dtype=torch.bool), str(path))
