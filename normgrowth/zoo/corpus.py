"""Training text and tokens of the zoo: stdlib docstrings, a byte-level BPE tokenizer, packed rows.

The text is the English docstrings of the running interpreter's standard library, read with
:mod:`ast` (no module is imported) in sorted file order and split into train / held-out by a hash
of each docstring's text. Formulas and filters: docs/zoo.md.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..errors import NormgrowthError

BOS_TOKEN = "<|endoftext|>"
# stdlib folders whose files are not read (tests, IDLE, third-party, generated codecs, GUI demos)
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
                       "__pycache__", "turtledemo", "lib2to3", "ensurepip", "encodings", "pydoc_data",
                       "lib-dynload", "__phello__"})


# ----------------------------------------------------------------------------------------------
# text: stdlib docstrings
# ----------------------------------------------------------------------------------------------
def stdlib_files(root: Optional[Path] = None) -> list[Path]:
    """The stdlib's ``.py`` files in sorted order, without tests, IDLE, site-packages and generated code."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise NormgrowthError(f"the Python standard library folder {str(root)!r} does not exist: "
                              "run with a Python installation that ships its .py sources.")
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if set(rel[:-1]) & SKIP_DIRS or rel[-1].startswith("test_"):
            continue
        files.append(path)
    return files


def _is_english_text(text: str) -> bool:
    """At least 99 % ASCII and 70 % letters/whitespace: drops encoding tables and non-English text."""
    ascii_share = sum(ch.isascii() for ch in text) / len(text)
    alpha_share = sum(ch.isalpha() or ch.isspace() for ch in text) / len(text)
    return ascii_share >= 0.99 and alpha_share >= 0.7


def docstrings_from_source(source: str, min_chars: int = 40) -> list[str]:
    """Module, class and function docstrings of one source text (``ast.walk`` order, cleaned)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars and _is_english_text(doc):
                docs.append(doc)
    return docs


def stdlib_docstrings(max_chars: Optional[int] = None, min_chars: int = 40,
                      root: Optional[Path] = None) -> tuple[list[str], int]:
    """Deduplicated English docstrings of the stdlib (first occurrence kept) and the number of files read.

    Files are read in sorted order until ``max_chars`` docstring characters are collected (all when
    None). Cached per process: the stdlib does not change while Python runs.
    """
    docs, n_files = _stdlib_docstrings_cached(max_chars, min_chars, str(root) if root is not None else None)
    return list(docs), n_files


@functools.lru_cache(maxsize=8)
def _stdlib_docstrings_cached(max_chars: Optional[int], min_chars: int,
                              root: Optional[str]) -> tuple[tuple[str, ...], int]:
    seen: set[str] = set()
    docs: list[str] = []
    total = 0
    n_files = 0
    for path in stdlib_files(Path(root) if root is not None else None):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        n_files += 1
        for doc in docstrings_from_source(source, min_chars):
            if doc in seen:
                continue
            seen.add(doc)
            docs.append(doc)
            total += len(doc)
        if max_chars is not None and total >= max_chars:
            break
    return tuple(docs), n_files


def pydoc_topics(min_chars: int = 40) -> list[str]:
    """The help texts of ``pydoc_data.topics`` (the interpreter's ``help()`` topics, shipped with Python), in
    sorted topic order, stripped, at least ``min_chars`` long."""
    from pydoc_data.topics import topics

    texts = [topics[key].strip() for key in sorted(topics)]
    return [t for t in texts if len(t) >= min_chars]


def is_heldout(doc: str, fraction: float) -> bool:
    """Deterministic split: held out when ``int(sha256(doc)[:12], 16) mod 10^6 < fraction * 10^6``."""
    return int(hashlib.sha256(doc.encode()).hexdigest()[:12], 16) % 1_000_000 < fraction * 1_000_000


def split_docs(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) in corpus order."""
    train = [d for d in docs if not is_heldout(d, fraction)]
    held = [d for d in docs if is_heldout(d, fraction)]
    return train, held


def corpus_sha256(docs: list[str]) -> str:
    """First 16 hex digits of sha256 over the docstrings joined by NUL characters."""
    return hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# tokenizer and sequences
# ----------------------------------------------------------------------------------------------
def train_tokenizer(docs: list[str], vocab_size: int) -> Any:
    """Byte-level BPE (GPT-2 style) trained on ``docs``; returns a ``PreTrainedTokenizerFast``
    whose BOS, EOS and pad token are ``<|endoftext|>`` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN,
                                       pad_token=BOS_TOKEN, unk_token=BOS_TOKEN, model_max_length=1_000_000)
    return fast


def pack_sequences(token_lists: list[list[int]], bos_id: int, n_ctx: int) -> torch.Tensor:
    """Pack documents into ``[n, n_ctx]`` rows: the stream ``doc_1 BOS doc_2 BOS ...`` is cut into
    chunks of ``n_ctx - 1`` tokens and each row is ``BOS + chunk`` (a trailing partial chunk is dropped)."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(bos_id)
    chunk = n_ctx - 1
    n = len(stream) // chunk
    if n == 0:
        return torch.empty(0, n_ctx, dtype=torch.long)
    body = torch.tensor(stream[: n * chunk], dtype=torch.long).view(n, chunk)
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), body], dim=1)


def batch_stream(data: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless fixed-order batches: one seeded permutation of the rows per epoch (a trailing
    partial batch of each epoch is skipped)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(data.shape[0], generator=gen)
        for start in range(0, data.shape[0] - batch_size + 1, batch_size):
            yield data[order[start:start + batch_size]]
