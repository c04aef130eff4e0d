"""Settings of the offline zoo and the hash that keys its cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Optional

from ..errors import NormgrowthError

ZOO_FORMAT_VERSION = 2  # part of the cache key: a change of recipe must change this number


@dataclass(frozen=True)
class RemovalSchedule:
    """The fine-tuning schedule of a norm removal (twin) and of its control (docs/zoo.md).

    ``steps_per_site`` AdamW steps at the constant ``lr`` after each frozen norm, then ``recovery_steps``
    (cosine from ``lr`` to ``lr/10``) while the special scale is phased out; the scales come from
    ``sigma_batches`` training batches (of the unmodified model when ``sigma_before_removal``); the special
    tokens' scale is ``special_scale`` (see :class:`.ln_removal.FrozenLayerNorm`). With ``scale_penalty``
    > 0 every step's loss adds ``scale_penalty`` times the scale penalty of :class:`.ln_removal.ScalePenalty`
    (norm inputs above ``scale_margin`` times their site's ``sigma_avg``; needs ``sigma_before_removal``).
    ``phase_window`` W phases the special scale out block by block from the embedding up
    (:func:`.ln_removal.block_phase`); None phases every norm out together. Up to ``recovery_max_skipped``
    recovery steps whose loss is inf or NaN make no update (:func:`.train.train_steps`) before the run counts
    as diverged."""

    steps_per_site: int
    lr: float
    weight_decay: float
    recovery_steps: int
    sigma_batches: int
    sigma_before_removal: bool = True
    special_sigma: bool = True
    special_scale: str = "measured"  # "measured" sigma_special, or "live": the token's own scale until phased out
    outlier_ratio: Optional[float] = None  # live only: tokens above ratio * sigma_avg are special too
    scale_penalty: float = 0.0  # weight of the auxiliary scale penalty in every fine-tuning step (0: none)
    scale_margin: float = 2.0  # the penalty counts norm inputs whose scale exceeds this multiple of sigma_avg
    special_scale_margin: Optional[float] = None  # the same at position 0 and special_id tokens (None: scale_margin)
    phase_window: Optional[float] = None  # blocks over which each block's phase rises (None: all norms together)
    recovery_max_skipped: int = 0  # recovery steps with a non-finite loss that make no update instead of failing

    def fine_tuning_steps(self, n_sites: int) -> int:
        """Optimiser steps of one run: ``n_sites * steps_per_site + recovery_steps``."""
        return n_sites * self.steps_per_site + self.recovery_steps


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
    sigma_before_removal: bool = True  # measure every site's sigma on the model before any removal
    special_sigma: bool = True  # own sigma for position 0 / BOS / EOS tokens, phased out during recovery
    control: bool = True  # also fine-tune the LN model on the twin's schedule with LayerNorm kept
    train_checkpoints: int = 8  # LN-model checkpoints saved during training (log-spaced, step 0 and last included)
    heldout_fraction: float = 0.05  # share of docstrings held out (by a hash of their text)
    max_heldout_seqs: int = 128  # held-out sequences used for losses and norms
    max_chars: Optional[int] = None  # stop reading the stdlib after this many docstring characters
    min_doc_chars: int = 40  # shorter docstrings are dropped
    seed: int = 0
    threads: Optional[int] = 2  # torch threads during the build (None: leave torch's setting)

    @property
    def removal(self) -> RemovalSchedule:
        """The LN removal schedule of the twin and the control."""
        return RemovalSchedule(self.ln_removal_steps_per_site, self.ln_removal_lr, self.weight_decay,
                               self.recovery_steps, self.sigma_batches, self.sigma_before_removal,
                               self.special_sigma)

    @classmethod
    def tiny(cls) -> "ZooSettings":
        """A pair built in a few seconds, for tests (2 layers, width 32, a small slice of the stdlib)."""
        return cls(n_layer=2, d_model=32, n_head=2, n_ctx=32, vocab_size=320, train_steps=12, warmup_steps=2,
                   batch_size=4, lr=3e-3, ln_removal_steps_per_site=2, recovery_steps=2, sigma_batches=1,
                   heldout_fraction=0.1, max_heldout_seqs=8, max_chars=40_000, threads=1,
                   train_checkpoints=4)

    def validate(self) -> None:
        """Raise :class:`NormgrowthError` for settings that cannot build a pair."""
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
        if self.train_checkpoints < 0:
            raise NormgrowthError("zoo settings: train_checkpoints must be >= 0 (0: none saved).")
        if self.train_steps < 1 or self.ln_removal_steps_per_site < 0 or self.recovery_steps < 0:
            raise NormgrowthError("zoo settings: train_steps must be >= 1 and the fine-tuning step counts >= 0.")


def python_version() -> str:
    """``major.minor.micro`` of the running interpreter (its stdlib is the corpus)."""
    return ".".join(map(str, sys.version_info[:3]))


def settings_hash(settings: ZooSettings) -> str:
    """First 16 hex digits of sha256 over the settings, the recipe version and the Python version
    (the stdlib text depends on it), serialised as sorted-key JSON."""
    key = {"settings": dataclasses.asdict(settings), "format": ZOO_FORMAT_VERSION, "python": python_version()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
