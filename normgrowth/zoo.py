"""An offline model pair trained by the project itself: a small GPT-2 and its LayerNorm-free twin.

It mirrors ``gpt2`` vs ``apollo-research/gpt2_noLN`` without the Hugging Face hub:

1. **Text**: English docstrings of the Python standard library, read at run time with :mod:`ast`
   (no module is imported), files walked in sorted order; split into train / held-out by a hash
   of each docstring's text.
2. **Tokenizer**: byte-level BPE trained offline with ``tokenizers``; ``<|endoftext|>`` is BOS, EOS
   and pad. Every sequence starts with BOS.
3. **LN model**: GPT-2 architecture trained deterministically on CPU with AdamW.
4. **LN-free twin** (Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning"): starting
   from the LN model, each LayerNorm in turn (all ``ln_2`` layer by layer, then all ``ln_1``, then
   ``ln_f``) has its per-token standard deviation replaced by a frozen scalar ``sigma_avg`` measured
   on training data just before freezing, ``y = (x - mean(x)) / sigma_avg * w + b``, with
   fine-tuning steps after each freeze.
5. **Storage**: both are ordinary HF GPT-2 checkpoints (safetensors + tokenizer files). The LN-free
   one uses the published format: ``layer_norm_epsilon = 1e12`` and ``w_stored = w * 1e6 / sigma_avg``
   so ``nn.LayerNorm`` computes ``(x - mean) * w_stored / sqrt(var + 1e12) ~ (x - mean) * w / sigma_avg``.

Entry point: :func:`build_pair`, cached in ``out_dir/zoo.json`` by a hash of the settings.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .errors import NormgrowthError

ZOO_FORMAT_VERSION = 1  # bump when the recipe changes so that old caches are rebuilt
BOS_TOKEN = "<|endoftext|>"
LN_FREE_EPS = 1e12  # published LN-free storage: eps = 1e12, weights * 1e6 / sigma_avg
LN_FREE_SCALE = 1e6  # sqrt(LN_FREE_EPS)
# stdlib folders whose files are not read (tests, IDLE, third-party, generated codecs, GUI demos)
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
                       "__pycache__", "turtledemo", "lib2to3", "ensurepip", "encodings", "pydoc_data",
                       "lib-dynload", "__phello__"})

Progress = Callable[[str], Any]


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooSettings:
    """Everything that determines the pair; its hash keys the cache (see :func:`settings_hash`)."""

    n_layer: int = 8
    d_model: int = 128
    n_head: int = 4
    n_ctx: int = 128  # sequence length used for training and evaluation (BOS included)
    vocab_size: int = 4096  # BPE vocabulary, BOS included
    train_steps: int = 700  # AdamW steps of the LN model
    warmup_steps: int = 40
    batch_size: int = 16
    lr: float = 3e-3  # peak learning rate (linear warm-up, cosine decay to lr/10)
    weight_decay: float = 0.1  # on matrices only (not biases, LN gains, embeddings)
    ln_removal_steps_per_site: int = 8  # fine-tuning steps after each frozen LayerNorm
    ln_removal_lr: float = 1e-3  # constant lr while LayerNorms are frozen one at a time
    recovery_steps: int = 60  # fine-tuning after the last LayerNorm is frozen (cosine to lr/10)
    sigma_batches: int = 2  # training batches on which each sigma_avg is measured
    heldout_fraction: float = 0.05  # share of docstrings held out (by a hash of their text)
    max_heldout_seqs: int = 128  # held-out sequences used for losses and norms
    max_chars: Optional[int] = None  # stop reading the stdlib after this many docstring characters
    min_doc_chars: int = 40  # shorter docstrings are dropped
    seed: int = 0
    threads: Optional[int] = 2  # torch threads during the build (None: leave torch's setting)

    @classmethod
    def tiny(cls) -> "ZooSettings":
        """A pair built in a few seconds, for tests (2 layers, width 32, a small slice of the stdlib)."""
        return cls(n_layer=2, d_model=32, n_head=2, n_ctx=32, vocab_size=320, train_steps=12, warmup_steps=2,
                   batch_size=4, lr=3e-3, ln_removal_steps_per_site=2, recovery_steps=2, sigma_batches=1,
                   heldout_fraction=0.1, max_heldout_seqs=8, max_chars=40_000, threads=1)

    def validate(self) -> None:
        if self.n_layer < 1 or self.d_model < 1 or self.n_head < 1 or self.n_ctx < 2 or self.batch_size < 1:
            raise NormgrowthError("zoo settings need n_layer, d_model, n_head, batch_size >= 1 and n_ctx >= 2.")
        if self.d_model % self.n_head:
            raise NormgrowthError(f"zoo settings: d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                                  "choose a head count that divides the width.")
        if self.vocab_size < 258:
            raise NormgrowthError(f"zoo settings: vocab_size={self.vocab_size} is below 258 (256 bytes + BOS + "
                                  "one merge); use a larger vocabulary.")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise NormgrowthError("zoo settings: heldout_fraction must lie strictly between 0 and 1.")
        if self.train_steps < 1 or self.ln_removal_steps_per_site < 0 or self.recovery_steps < 0:
            raise NormgrowthError("zoo settings: train_steps must be >= 1 and the fine-tuning step counts >= 0.")


def settings_hash(settings: ZooSettings) -> str:
    """sha256 of the settings, the recipe version and the Python version (the stdlib text depends on it)."""
    key = {"settings": dataclasses.asdict(settings), "format": ZOO_FORMAT_VERSION,
           "python": ".".join(map(str, sys.version_info[:3]))}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


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
    """Mostly ASCII and mostly letters/spaces: drops encoding tables and non-English docstrings."""
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
def _stdlib_docstrings_cached(max_chars: Optional[int], min_chars: int, root: Optional[str]) -> tuple[tuple[str, ...], int]:
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


def is_heldout(doc: str, fraction: float) -> bool:
    """Deterministic split: held out when ``sha256(doc) mod 10^6 < fraction * 10^6``."""
    return int(hashlib.sha256(doc.encode()).hexdigest()[:12], 16) % 1_000_000 < fraction * 1_000_000


def split_docs(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) in corpus order."""
    train = [d for d in docs if not is_heldout(d, fraction)]
    held = [d for d in docs if is_heldout(d, fraction)]
    return train, held


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
    """Endless fixed-order batches: one seeded permutation of the rows per epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(data.shape[0], generator=gen)
        for start in range(0, data.shape[0] - batch_size + 1, batch_size):
            yield data[order[start:start + batch_size]]


# ----------------------------------------------------------------------------------------------
# LayerNorm removal: pure pieces
# ----------------------------------------------------------------------------------------------
class FrozenLayerNorm(nn.Module):
    """LayerNorm with a frozen scale: ``y = (x - mean(x)) / sigma_avg * weight + bias``.

    ``sigma_avg`` is a constant scalar buffer, so the output is affine in the centred input: nothing
    divides by a token-dependent quantity. ``weight`` and ``bias`` are the original LN parameters
    (same Parameter objects, so an optimiser holding them keeps training them).
    """

    def __init__(self, ln: nn.LayerNorm, sigma_avg: float):
        super().__init__()
        self.weight = ln.weight
        self.bias = ln.bias
        self.register_buffer("sigma_avg", torch.tensor(float(sigma_avg), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-1, keepdim=True)
        return centred / self.sigma_avg.to(x.dtype) * self.weight + self.bias


def token_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token LayerNorm scale ``sqrt(var(x) + eps)`` (biased variance over the last dim), float32."""
    return torch.sqrt(x.float().var(dim=-1, unbiased=False) + eps)


def ln_free_storage_weight(weight: torch.Tensor, sigma_avg: float) -> torch.Tensor:
    """Stored gain of the published LN-free format: ``w * 1e6 / sigma_avg`` (used with eps = 1e12)."""
    return weight * (LN_FREE_SCALE / sigma_avg)


def growth_per_layer(norms: torch.Tensor) -> float:
    """Geometric growth per layer: ``exp(slope)`` of the least-squares line ``log norm_l = a + slope * l``."""
    y = torch.log(norms.double())
    x = torch.arange(len(y), dtype=torch.float64)
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    return float(torch.exp(slope))


# ----------------------------------------------------------------------------------------------
# model plumbing
# ----------------------------------------------------------------------------------------------
def make_config(settings: ZooSettings, bos_id: int, vocab_size: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_layer=settings.n_layer, n_embd=settings.d_model, n_head=settings.n_head,
                      n_positions=settings.n_ctx, vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=bos_id, eos_token_id=bos_id, pad_token_id=bos_id,
                      architectures=["GPT2LMHeadModel"])


def ln_sites(n_layer: int) -> list[str]:
    """Removal order of the LayerNorms: ``h.i.ln_2`` for every layer, then ``h.i.ln_1``, then ``ln_f``."""
    return [f"h.{i}.ln_2" for i in range(n_layer)] + [f"h.{i}.ln_1" for i in range(n_layer)] + ["ln_f"]


def _get_site(model: nn.Module, site: str) -> nn.Module:
    return model.transformer.get_submodule(site)


def _set_site(model: nn.Module, site: str, module: nn.Module) -> None:
    parent, _, name = site.rpartition(".")
    setattr(model.transformer.get_submodule(parent) if parent else model.transformer, name, module)


def measure_sigma_avg(model: nn.Module, site: str, batches: list[torch.Tensor]) -> float:
    """``sigma_avg`` of the LayerNorm at ``site``: mean over all tokens of ``batches`` of
    ``sqrt(var(x) + eps)`` of its input ``x`` (every position, BOS included)."""
    ln = _get_site(model, site)
    eps = float(getattr(ln, "eps", 0.0))
    total, count = 0.0, 0

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal total, count
        std = token_std(args[0].detach(), eps)
        total += float(std.sum(dtype=torch.float64))
        count += std.numel()

    handle = ln.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        handle.remove()
        model.train(was_training)
    return total / count


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() == 2 and "wte" not in name and "wpe" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterator[torch.Tensor], n_steps: int,
                 lr_at: Callable[[int], float], progress: Optional[Progress] = None, label: str = "",
                 report_every: int = 0) -> float:
    """Run ``n_steps`` AdamW steps (grad-norm clip 1.0); return the mean loss of the last steps."""
    model.train()
    recent: list[float] = []
    t0 = time.perf_counter()
    for step in range(n_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = next(batches)
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-10:]
        if progress is not None and report_every and ((step + 1) % report_every == 0 or step + 1 == n_steps):
            per_step = (time.perf_counter() - t0) / (step + 1)
            progress(f"zoo: {label} step {step + 1}/{n_steps} loss {sum(recent) / len(recent):.3f} "
                     f"({per_step:.2f} s/step)")
    model.eval()
    return sum(recent) / len(recent) if recent else float("nan")


def heldout_loss(model: nn.Module, data: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of ``data`` [n, n_ctx]."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, data.shape[0], batch_size):
            batch = data[start:start + batch_size]
            logits = model(batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    batch[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    return total / count


def resid_post_norms(model: nn.Module, data: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Mean L2 norm of each block's output (resid_post) over all non-position-0 tokens, float32 [n_layer].

    Read with forward hooks on ``transformer.h[i]`` (HF's ``hidden_states[-1]`` is after ``ln_f``)."""
    blocks = model.transformer.h
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0
    handles = []
    for i, block in enumerate(blocks):
        def hook(module: nn.Module, args: tuple, output: Any, i: int = i) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            sums[i] += float(hidden[:, 1:].float().norm(dim=-1).sum(dtype=torch.float64))
        handles.append(block.register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, data.shape[0], batch_size):
                batch = data[start:start + batch_size]
                model(batch)
                count += batch[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / count).float()


def remove_layernorm(model: nn.Module, batches: Iterator[torch.Tensor], settings: ZooSettings,
                     progress: Optional[Progress] = None) -> dict[str, float]:
    """Freeze every LayerNorm of a GPT-2 ``model`` in place, one site at a time (:func:`ln_sites`).

    For each site: measure ``sigma_avg`` on ``settings.sigma_batches`` batches, swap the LayerNorm for
    :class:`FrozenLayerNorm`, then fine-tune ``ln_removal_steps_per_site`` steps; after the last site
    fine-tune ``recovery_steps`` more. Returns ``{site: sigma_avg}``.
    """
    opt = _optimizer(model, settings.ln_removal_lr, settings.weight_decay)
    sigmas: dict[str, float] = {}
    sites = ln_sites(len(model.transformer.h))
    for k, site in enumerate(sites):
        ln = _get_site(model, site)
        if not isinstance(ln, nn.LayerNorm):
            raise NormgrowthError(f"site {site} is not a LayerNorm ({type(ln).__name__}): LN removal needs an "
                                  "ordinary GPT-2 model.")
        sigma = measure_sigma_avg(model, site, [next(batches) for _ in range(max(1, settings.sigma_batches))])
        sigmas[site] = sigma
        _set_site(model, site, FrozenLayerNorm(ln, sigma))
        loss = _train_steps(model, opt, batches, settings.ln_removal_steps_per_site,
                            lambda s: settings.ln_removal_lr)
        if progress is not None and (k % max(1, len(sites) // 6) == 0 or k == len(sites) - 1):
            progress(f"zoo: froze {site} ({k + 1}/{len(sites)}) sigma_avg={sigma:.3g} loss {loss:.3f}")
    if settings.recovery_steps:
        _train_steps(model, opt, batches, settings.recovery_steps,
                     lambda s: _cosine_lr(s, settings.recovery_steps, settings.ln_removal_lr, 0),
                     progress, "LN-free recovery", math.ceil(settings.recovery_steps / 2))
    return sigmas


def to_ln_free_storage(model: nn.Module) -> nn.Module:
    """A plain ``GPT2LMHeadModel`` equal to ``model`` (all LayerNorms frozen) in the published LN-free
    format: config ``layer_norm_epsilon = 1e12`` and each gain ``w * 1e6 / sigma_avg`` (bias unchanged)."""
    from transformers import GPT2LMHeadModel

    frozen = {name: m for name, m in model.transformer.named_modules() if isinstance(m, FrozenLayerNorm)}
    left = [name for name, m in model.transformer.named_modules() if isinstance(m, nn.LayerNorm)]
    if left:
        raise NormgrowthError(f"LayerNorms {left} are not frozen yet: run remove_layernorm first.")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.layer_norm_epsilon = LN_FREE_EPS
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(".sigma_avg"):
            continue
        prefix, _, leaf = key.rpartition(".")
        sub = prefix[len("transformer."):] if prefix.startswith("transformer.") else None
        if sub in frozen and leaf == "weight":
            value = ln_free_storage_weight(value, float(frozen[sub].sigma_avg))
        state[key] = value.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = GPT2LMHeadModel(config)
    stored.load_state_dict(state, strict=True)
    stored.eval()
    return stored


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_checkpoint(model: nn.Module, tokenizer: Any, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"save_pretrained wrote no {weights}")
    return _sha256_file(weights)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_cache(out_dir: Path, settings: ZooSettings) -> Optional[dict]:
    """The recorded build when ``out_dir/zoo.json`` has this settings hash and both checkpoints are
    complete (weights' sha256 as recorded); otherwise None."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "zoo.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("settings_hash") != settings_hash(settings):
        return None
    for name in ("ln", "noln"):
        ckpt = out_dir / name
        weights = ckpt / "model.safetensors"
        if not ((ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file() and weights.is_file()):
            return None
        if _sha256_file(weights) != meta.get("weights_sha256", {}).get(name):
            return None
    return meta


def _remove_stale_builds(out_dir: Path) -> None:
    """Delete ``.building-<pid>-*`` folders left by killed builds (their process no longer runs)."""
    for tmp in out_dir.glob(".building-*"):
        try:
            pid = int(tmp.name.split("-")[1])
            os.kill(pid, 0)
            alive = True
        except (ValueError, IndexError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning chatter and progress bars during the build."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _result(out_dir: Path, meta: dict, cached: bool) -> dict:
    return {"ln": str(out_dir / "ln"), "noln": str(out_dir / "noln"), "zoo_json": str(out_dir / "zoo.json"),
            "ln_heldout_loss": meta["ln_heldout_loss"], "noln_heldout_loss": meta["noln_heldout_loss"],
            "settings_hash": meta["settings_hash"], "cached": cached, "meta": meta}


# ----------------------------------------------------------------------------------------------
# the build
# ----------------------------------------------------------------------------------------------
def build_pair(out_dir: str | os.PathLike, settings: ZooSettings = ZooSettings(), progress: Optional[Progress] = print,
               force: bool = False) -> dict:
    """Train the LN model and its LN-free twin into ``out_dir/ln`` and ``out_dir/noln`` (HF checkpoints).

    Returns ``{"ln", "noln", "zoo_json": paths, "ln_heldout_loss", "noln_heldout_loss": nats/token,
    "settings_hash", "cached": bool, "meta": contents of zoo.json}``. When ``out_dir/zoo.json`` has the
    same settings hash and both checkpoints are intact, nothing is rebuilt (``cached`` is True) unless
    ``force``. Checkpoints are built in a temporary folder and renamed into place; ``zoo.json`` is
    written last, so an interrupted build never looks complete.
    """
    settings.validate()
    say: Progress = progress if progress is not None else (lambda msg: None)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not force:
        meta = read_cache(out_dir, settings)
        if meta is not None:
            say(f"zoo: reusing the cached pair in {out_dir} (settings hash {meta['settings_hash']})")
            return _result(out_dir, meta, cached=True)
    _remove_stale_builds(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{os.getpid()}-", dir=out_dir))
    old_threads = torch.get_num_threads()
    try:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        with _quiet_transformers():
            meta = _build_into(tmp, settings, say)
        # swap in: invalidate the old record first, then move checkpoints, then write the record
        (out_dir / "zoo.json").unlink(missing_ok=True)
        for name in ("ln", "noln"):
            if (out_dir / name).exists():
                os.replace(out_dir / name, tmp / f"old-{name}")
            os.replace(tmp / name, out_dir / name)
        _write_json_atomic(out_dir / "zoo.json", meta)
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"zoo: wrote {out_dir / 'ln'} and {out_dir / 'noln'} in {meta['seconds']['total']:.0f} s")
    return _result(out_dir, meta, cached=False)


def _build_into(tmp: Path, settings: ZooSettings, say: Progress) -> dict:
    from transformers import GPT2LMHeadModel

    t_start, cpu_start = time.perf_counter(), time.process_time()
    seconds: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        seconds[name] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    t = time.perf_counter()
    docs, n_files = stdlib_docstrings(settings.max_chars, settings.min_doc_chars)
    train_docs, held_docs = split_docs(docs, settings.heldout_fraction)
    corpus_sha = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]
    say(f"zoo: {len(docs)} docstrings from {n_files} stdlib files ({sum(map(len, docs)) / 1e6:.2f} M chars), "
        f"{len(held_docs)} held out")
    t = lap("corpus", t)

    tokenizer = train_tokenizer(train_docs, settings.vocab_size)
    bos_id = tokenizer.bos_token_id
    vocab_size = len(tokenizer)
    train_ids = tokenizer(train_docs, add_special_tokens=False)["input_ids"]
    held_ids = tokenizer(held_docs, add_special_tokens=False)["input_ids"]
    train_data = pack_sequences(train_ids, bos_id, settings.n_ctx)
    held_data = pack_sequences(held_ids, bos_id, settings.n_ctx)[: settings.max_heldout_seqs]
    if train_data.shape[0] < settings.batch_size or held_data.shape[0] == 0:
        raise NormgrowthError(
            f"the docstring corpus gives {train_data.shape[0]} training and {held_data.shape[0]} held-out "
            f"sequences of {settings.n_ctx} tokens, too few for batch_size={settings.batch_size}: raise "
            "max_chars or lower n_ctx/batch_size.")
    say(f"zoo: tokenizer vocab {vocab_size}; {train_data.shape[0]} training and {held_data.shape[0]} "
        f"held-out sequences of {settings.n_ctx} tokens")
    t = lap("tokenizer", t)

    torch.manual_seed(settings.seed)
    config = make_config(settings, bos_id, vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(config)
    batches = batch_stream(train_data, settings.batch_size, settings.seed)
    opt = _optimizer(model, settings.lr, settings.weight_decay)
    _train_steps(model, opt, batches, settings.train_steps,
                 lambda s: _cosine_lr(s, settings.train_steps, settings.lr, settings.warmup_steps),
                 say, "LN model", math.ceil(settings.train_steps / 7))
    ln_loss = heldout_loss(model, held_data)
    ln_norms = resid_post_norms(model, held_data)
    say(f"zoo: LN model held-out loss {ln_loss:.4f}")
    ln_sha = _save_checkpoint(model, tokenizer, tmp / "ln")
    t = lap("train_ln", t)

    sigmas = remove_layernorm(model, batches, settings, say)
    frozen_loss = heldout_loss(model, held_data)
    stored = to_ln_free_storage(model)
    noln_loss = heldout_loss(stored, held_data)
    if not abs(noln_loss - frozen_loss) <= 1e-4 * max(1.0, abs(frozen_loss)):
        raise RuntimeError(f"stored LN-free model loss {noln_loss} differs from the frozen-LN model's {frozen_loss}")
    noln_norms = resid_post_norms(stored, held_data)
    say(f"zoo: LN-free model held-out loss {noln_loss:.4f} (LN model {ln_loss:.4f})")
    noln_sha = _save_checkpoint(stored, tokenizer, tmp / "noln")
    t = lap("remove_ln", t)
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    seconds["cpu_total"] = round(time.process_time() - cpu_start, 2)  # CPU time of all threads

    return {
        "settings": dataclasses.asdict(settings), "settings_hash": settings_hash(settings),
        "format_version": ZOO_FORMAT_VERSION, "python": ".".join(map(str, sys.version_info[:3])),
        "corpus": {"n_files": n_files, "n_docs": len(docs), "n_train_docs": len(train_docs),
                   "n_heldout_docs": len(held_docs), "n_chars": sum(map(len, docs)), "sha256": corpus_sha,
                   "n_train_seqs": int(train_data.shape[0]), "n_heldout_seqs": int(held_data.shape[0]),
                   "train_tokens": int(train_data.numel())},
        "vocab_size": vocab_size, "bos_token_id": bos_id,
        "ln_heldout_loss": ln_loss, "noln_heldout_loss": noln_loss, "frozen_ln_heldout_loss": frozen_loss,
        "sigma_avg": sigmas,
        "resid_post_norm": {"ln": [round(float(v), 5) for v in ln_norms],
                            "noln": [round(float(v), 5) for v in noln_norms]},
        "growth_per_layer": {"ln": growth_per_layer(ln_norms), "noln": growth_per_layer(noln_norms)},
        "weights_sha256": {"ln": ln_sha, "noln": noln_sha},
        "threads": torch.get_num_threads(), "seconds": seconds,
    }
