"""Token data for collection: built-in prose and prompts, text files, lists of strings, token-id arrays, HF datasets.

Two built-in sources need no download:

* ``builtin``: real English prose, the Python Language Reference topics that CPython ships as
  ``pydoc_data.topics`` (79 topics, about 465 KB, PSF licence), joined in topic-name order, tokenised
  with the model's tokenizer and cut into consecutive windows: ``n_seqs`` sequences (default 64) of
  ``seq_len`` tokens (default 128; at most the model's context), each BOS + ``seq_len - 1`` tokens of
  running text. Every sequence is full length, so every position has ``n_seqs`` tokens.
* ``prompts``: 59 short English prompts written for this project (news, code, dialogue, fiction,
  lists, math ...), one sequence each, for small models and quick checks.

Every source ends as a :class:`TokenBatch`: right-padded token ids plus an attention mask. Padding is
marked by the mask only, never by token id (GPT-2's pad id equals its BOS id); a left-padded input is
shifted to the right-padded layout, so position 0 is always a sequence's first real token. Text gets
the model's BOS token prepended; pre-tokenised ids are used exactly as given. Position 0 is kept apart
by the collectors (reported as "bos"), whatever token it holds.

:func:`iter_batches` is the one batch iterator (collector, deletion and weights use it);
:func:`as_token_batch` turns whatever a notebook passes to ``normgrowth.collect`` into a TokenBatch.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .errors import NormgrowthError

BUILTIN = "builtin"  # the prose windows (see the module docstring)
PROMPTS = "prompts"  # the 59 built-in prompts
BUILTIN_SEQS = 64  # default number of prose windows
BUILTIN_SEQ_LEN = 128  # default prose window length, BOS included
TOKEN_SUFFIXES = (".npy", ".pt")
TEXT_SUFFIXES = (".txt", ".jsonl")

Source = Union[None, str, "os.PathLike[str]", Sequence[str]]


def right_align(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each row so that its real tokens start at column 0 (a no-op for right padding).

    ``mask`` must mark one contiguous run per row (:func:`check_mask`). Columns after the run are
    padding; their ids are whatever the shift brought there (only the mask marks padding).
    """
    first = mask.to(torch.int8).argmax(1)  # 0 for rows without a real token
    if not bool(first.any()):
        return tokens, mask
    cols = torch.arange(tokens.shape[1], device=tokens.device)
    idx = (cols[None] + first[:, None]).clamp(max=tokens.shape[1] - 1)
    length = mask.sum(1)
    return tokens.gather(1, idx), cols[None] < length[:, None]


def check_mask(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as bool after checking it matches ``tokens`` and marks one contiguous run of real tokens per row."""
    if tuple(mask.shape) != tuple(tokens.shape):
        raise NormgrowthError(f"attention mask shape {tuple(mask.shape)} differs from token shape "
                              f"{tuple(tokens.shape)}: pass one mask entry per token.")
    mask = mask.bool()
    first = mask.to(torch.int8).argmax(1)
    cols = torch.arange(mask.shape[1], device=mask.device)
    run = (cols[None] >= first[:, None]) & (cols[None] < (first + mask.sum(1))[:, None])
    if not torch.equal(run, mask):
        row = int(torch.nonzero((run != mask).any(1))[0])
        raise NormgrowthError(f"row {row} of the attention mask has padding between real tokens: pad on the "
                              "left or on the right only.")
    return mask


def iter_batches(tokens: torch.Tensor, mask: torch.Tensor, batch_size: int
                 ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start, tokens, mask)`` for each slice of at most ``batch_size`` sequences.

    Each slice is right-aligned (:func:`right_align`: left padding is moved to the right) and trimmed
    to its longest sequence, so position 0 is every sequence's first real token and no column is all
    padding.
    """
    if batch_size < 1:
        raise NormgrowthError(f"batch size must be at least 1, got {batch_size}.")
    for start in range(0, tokens.shape[0], batch_size):
        tok, m = right_align(tokens[start:start + batch_size], mask[start:start + batch_size])
        width = max(int(m.sum(1).max()), 1) if m.numel() else 1
        yield start, tok[:, :width], m[:, :width]


@dataclass
class TokenBatch:
    """Token ids ``[n_seqs, seq_len]`` with ``attention_mask`` (True = real token), stored right-padded.

    A left-padded input is shifted on construction (:func:`right_align`); a mask with padding between
    real tokens is refused.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.ndim != 2 or self.tokens.is_floating_point():
            raise NormgrowthError("TokenBatch.tokens must be an integer tensor [n_seqs, seq_len].")
        self.tokens = self.tokens.long()
        mask = check_mask(self.tokens, torch.as_tensor(self.attention_mask))
        self.tokens, self.attention_mask = right_align(self.tokens, mask)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        """Real tokens at positions >= 1 (those the main statistics average over)."""
        return int(self.attention_mask[:, 1:].sum())

    def batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """:func:`iter_batches` over this batch."""
        return iter_batches(self.tokens, self.attention_mask, batch_size)


def as_token_batch(data: Any, model: Any = None, attention_mask: Any = None, n_seqs: Optional[int] = None,
                   seq_len: Optional[int] = None) -> TokenBatch:
    """A :class:`TokenBatch` from what ``normgrowth.collect`` accepts.

    ``data``: a TokenBatch; a torch tensor or numpy array of token ids ``[n_seqs, seq_len]`` (with an
    optional ``attention_mask`` of the same shape, left or right padding); a list of strings (documents,
    tokenised with the model's tokenizer, BOS prepended); or any source :func:`load_tokens` accepts.
    ``n_seqs`` keeps the first sequences, ``seq_len`` the first positions.
    """
    if attention_mask is not None and not isinstance(data, (torch.Tensor, np.ndarray)):
        raise NormgrowthError("attention_mask= goes with token ids (a tensor or array); a TokenBatch carries "
                              "its own mask and text is masked when tokenised.")
    if isinstance(data, TokenBatch):
        if n_seqs is None and seq_len is None:
            return data
        _check_lengths(n_seqs, seq_len)
        return TokenBatch(data.tokens[:n_seqs, :seq_len], data.attention_mask[:n_seqs, :seq_len], data.source)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        ids = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        mask = None
        if attention_mask is not None:
            mask = (attention_mask.detach().cpu().numpy() if isinstance(attention_mask, torch.Tensor)
                    else np.asarray(attention_mask))
        return token_batch_from_ids(ids, f"{type(data).__name__} of token ids", mask, n_seqs=n_seqs, seq_len=seq_len,
                                    n_ctx=getattr(model, "n_ctx", None), vocab_size=getattr(model, "vocab_size", None))
    if isinstance(data, (str, os.PathLike)) or data is None or _is_text_list(data):
        return load_tokens(data, model, n_seqs=n_seqs, seq_len=seq_len)
    raise NormgrowthError(f"cannot collect from a {type(data).__name__}: pass a TokenBatch, token ids [n_seqs, "
                          "seq_len] as a tensor or array, a list of strings, or a data source name.")


def _is_text_list(data: Any) -> bool:
    return isinstance(data, (list, tuple)) and all(isinstance(d, str) for d in data)


def _check_lengths(n_seqs: Optional[int], seq_len: Optional[int]) -> None:
    if n_seqs is not None and n_seqs < 1:
        raise NormgrowthError(f"--n-seqs must be at least 1, got {n_seqs}.")
    if seq_len is not None and seq_len < 2:
        raise NormgrowthError(f"--seq-len must be at least 2 (position 0 is kept apart), got {seq_len}.")


def builtin_prose() -> list[str]:
    """The Python Language Reference topics shipped with CPython (``pydoc_data.topics``, PSF licence), in
    topic-name order: real English prose about a programming language, with code examples."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def builtin_identity(source: str) -> dict[str, str]:
    """What a built-in source is, for cache keys: its name and the SHA-256 of its text."""
    import hashlib

    docs = builtin_prose() if source == BUILTIN else builtin_prompts()
    return {source: hashlib.sha256("\n\n".join(docs).encode()).hexdigest()}


def builtin_prompts() -> list[str]:
    """The 59 English prompts written for this project (news, code, dialogue, fiction, lists, math ...)."""
    text = (Path(__file__).parent / "resources" / "prompts.txt").read_text(encoding="utf-8")
    return [block.strip("\n") for block in text.split("\n\n") if block.strip()]


def load_tokens(source: Source, model: Any = None, n_seqs: Optional[int] = None,
                seq_len: Optional[int] = None, *, tokenizer: Any = None, bos_token_id: Optional[int] = None,
                n_ctx: Optional[int] = None, vocab_size: Optional[int] = None) -> TokenBatch:
    """Load ``source`` for ``model`` (or for an explicit tokenizer / bos id / context / vocabulary).

    source: None or "builtin" (built-in prose windows: ``n_seqs`` x ``seq_len`` tokens, defaults 64 x 128),
    "prompts" (the 59 built-in prompts), a list of strings (one document each), a ``.txt``
    file (documents separated by blank lines), a ``.jsonl`` file (``text`` field), a ``.npy``/``.pt``
    integer array ``[n_seqs, seq_len]`` (used as given: no BOS added), or a Hugging Face dataset name
    (``text`` column, where the hub is reachable). ``n_seqs`` keeps the first n sequences; ``seq_len``
    truncates (the model's context always does, with one warning).
    """
    if model is not None:
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        bos_token_id = bos_token_id if bos_token_id is not None else model.bos_token_id
        n_ctx = n_ctx or model.n_ctx
        vocab_size = vocab_size or model.vocab_size
    _check_lengths(n_seqs, seq_len)
    if isinstance(source, (list, tuple)):
        if not source or not _is_text_list(source):
            raise NormgrowthError("a list of documents must hold at least one string, and only strings.")
        docs = list(source)[:n_seqs] if n_seqs is not None else list(source)
        label = f"{len(source)} text(s) given in Python"
        batch = _tokenize(docs, label, tokenizer, bos_token_id, seq_len, n_ctx)
        return _nonempty(batch, label)
    src = BUILTIN if source in (None, "", BUILTIN) else os.fspath(source)
    path = Path(src).expanduser()
    if src == BUILTIN:
        batch = _prose_windows(tokenizer, bos_token_id, n_seqs or BUILTIN_SEQS, seq_len, n_ctx)
    elif path.suffix.lower() in TOKEN_SUFFIXES:
        batch = _token_file(path, n_seqs, seq_len, n_ctx, vocab_size)
    else:
        if src == PROMPTS:
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
    return _nonempty(batch, src)


def _nonempty(batch: TokenBatch, label: str) -> TokenBatch:
    if len(batch) == 0 or batch.n_tokens == 0:
        raise NormgrowthError(f"data source {label!r} gave no tokens after position 0: use longer or more sequences.")
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
    from .sources import _hub_reachable

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


def _check_text_model(source: str, tokenizer: Any, bos_token_id: Optional[int]) -> None:
    if tokenizer is None:
        raise NormgrowthError(f"this model has no tokenizer, so text data ({source!r}) cannot be used: "
                              "pass token ids [n_seqs, seq_len] (a .npy or .pt file, or a tensor or array).")
    if bos_token_id is None:
        raise NormgrowthError("this model's tokenizer defines no BOS token, which text data needs at position 0: "
                              "pass token ids as a .npy or .pt array instead.")


def _prose_windows(tokenizer: Any, bos_token_id: Optional[int], n_seqs: int, seq_len: Optional[int],
                   n_ctx: Optional[int]) -> TokenBatch:
    """``n_seqs`` rows of BOS + the next ``length - 1`` tokens of :func:`builtin_prose`, consecutive and
    non-overlapping; ``length`` is ``seq_len`` (default :data:`BUILTIN_SEQ_LEN`) capped by ``n_ctx``."""
    _check_text_model(BUILTIN, tokenizer, bos_token_id)
    length = seq_len or BUILTIN_SEQ_LEN
    if n_ctx is not None and length > n_ctx:
        if seq_len is not None:
            warnings.warn(f"--seq-len {seq_len} is longer than the model's context ({n_ctx}): using {n_ctx}.")
        length = n_ctx
    body, ids = length - 1, []
    for doc in builtin_prose():  # tokenised only as far as needed
        ids.extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= n_seqs * body:
            break
    if len(ids) < n_seqs * body:
        raise NormgrowthError(f"the built-in prose holds {len(ids)} tokens for this tokenizer, fewer than {n_seqs} "
                              f"sequences x {body}: ask for at most {len(ids) // body} sequences of this length, "
                              "or pass a text file.")
    rows = [[bos_token_id] + ids[i * body:(i + 1) * body] for i in range(n_seqs)]
    tokens = torch.tensor(rows, dtype=torch.long)
    return TokenBatch(tokens, torch.ones_like(tokens, dtype=torch.bool), BUILTIN)


def _tokenize(docs: Sequence[str], source: str, tokenizer: Any, bos_token_id: Optional[int],
              seq_len: Optional[int], n_ctx: Optional[int]) -> TokenBatch:
    _check_text_model(source, tokenizer, bos_token_id)
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
    return token_batch_from_ids(array, str(path), None, n_seqs, seq_len, n_ctx, vocab_size,
                                what=f"token file {str(path)!r}")


def token_batch_from_ids(ids: np.ndarray, source: str, mask: Optional[np.ndarray] = None, n_seqs: Optional[int] = None,
                         seq_len: Optional[int] = None, n_ctx: Optional[int] = None, vocab_size: Optional[int] = None,
                         what: str = "token ids") -> TokenBatch:
    """A TokenBatch from an integer array ``[n_seqs, seq_len]`` used as given (no BOS added).

    ``mask``: attention mask of the same shape (left or right padding), all real when None. Ids of real
    tokens must lie in ``[0, vocab_size)``; sequences longer than ``n_ctx`` are truncated with a warning.
    """
    _check_lengths(n_seqs, seq_len)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise NormgrowthError(f"{what}: a {ids.dtype} array of shape {ids.shape} was given where an integer "
                              "array [n_seqs, seq_len] is needed.")
    mask = np.ones(ids.shape, dtype=bool) if mask is None else np.asarray(mask)
    if mask.shape != ids.shape:
        raise NormgrowthError(f"attention mask shape {mask.shape} differs from token shape {ids.shape}: pass one "
                              "mask entry per token.")
    mask = mask.astype(bool)
    real = ids[mask]
    if real.size and (real.min() < 0 or (vocab_size is not None and real.max() >= vocab_size)):
        raise NormgrowthError(f"{what}: ids lie in [{real.min()}, {real.max()}] but the model's vocabulary is "
                              f"[0, {vocab_size}): use ids made for this model.")
    batch = TokenBatch(torch.from_numpy(np.ascontiguousarray(ids)).long(), torch.from_numpy(mask), source)
    tokens, mask_t = batch.tokens[:n_seqs], batch.attention_mask[:n_seqs]  # right-aligned
    longest = int(mask_t.sum(1).max()) if mask_t.numel() else 0
    tokens, mask_t = tokens[:, :max(longest, 1)], mask_t[:, :max(longest, 1)]
    if n_ctx is not None and longest > n_ctx and (seq_len is None or seq_len > n_ctx):
        warnings.warn(f"token sequences of length {longest} are longer than the model's context "
                      f"({n_ctx}) and were truncated.")
        tokens, mask_t = tokens[:, :n_ctx], mask_t[:, :n_ctx]
    if seq_len is not None:
        tokens, mask_t = tokens[:, :seq_len], mask_t[:, :seq_len]
    return TokenBatch(tokens, mask_t, source)
