"""The offline zoo: models the project trains itself, kept apart from the analysis code.

The pair built here mirrors ``gpt2`` vs ``apollo-research/gpt2_noLN`` without the Hugging Face hub:

1. **Text** (:mod:`.corpus`): English docstrings of the Python standard library, read with
   :mod:`ast`, split into train / held-out by a hash of each docstring's text.
2. **Tokenizer** (:mod:`.corpus`): byte-level BPE trained offline; ``<|endoftext|>`` is BOS, EOS and
   pad. Every sequence starts with BOS.
3. **LN model** (:mod:`.train`): GPT-2 architecture trained deterministically on CPU with AdamW.
4. **LN-free twin** (:mod:`.ln_removal`): each LayerNorm in turn replaced by a frozen-scale one and
   fine-tuned, then stored in the published LN-free format (eps 1e12, gains ``w * 1e6 / sigma_avg``).
5. **Build and cache** (:mod:`.build`): :func:`build_pair` writes ``ln/``, ``noln/`` (ordinary HF
   GPT-2 checkpoints) and ``zoo.json``, keyed by :func:`settings_hash`.

6. **Norm-free twin of a trained model** (:mod:`.twin`, imported on its own): every norm of a GPT-2 or
   Llama-architecture model removed one at a time, and a control fine-tuned on the same schedule.

The analysis package never imports this subpackage; only ``normgrowth zoo build`` and ``zoo twin`` do. Recipe and
measurements: docs/zoo.md.
"""

from .build import build_pair, build_seeds, checkpoint_names, read_cache, recipe, seed_summary
from .corpus import (BOS_TOKEN, batch_stream, docstrings_from_source, is_heldout, pack_sequences, pydoc_topics,
                     split_docs, stdlib_docstrings, stdlib_files, train_tokenizer)
from .layout import LAYOUTS, NormLayout, blocks_of, is_rms_norm, layout_of, norm_eps
from .ln_removal import (LN_FREE_EPS, LN_FREE_SCALE, FrozenLayerNorm, ScheduleLog, ln_free_storage_weight, ln_sites,
                         measure_sigma_avg, measure_sigmas, norm_sites, remove_layernorm, removal_order, special_mask,
                         to_ln_free_storage, token_std)
from .settings import ZOO_FORMAT_VERSION, RemovalSchedule, ZooSettings, settings_hash
from .train import (checkpoint_steps, cosine_lr, evaluate, growth_per_layer, heldout_loss, make_config, make_optimizer,
                    resid_post_norms, resid_post_seq_norms, train_steps)

__all__ = [
    "BOS_TOKEN", "build_seeds", "seed_summary", "checkpoint_names", "checkpoint_steps", "measure_sigmas", "recipe", "resid_post_seq_norms",
    "special_mask", "FrozenLayerNorm", "LN_FREE_EPS", "LN_FREE_SCALE", "ZOO_FORMAT_VERSION", "ZooSettings",
    "batch_stream", "build_pair", "cosine_lr", "docstrings_from_source", "growth_per_layer", "heldout_loss",
    "is_heldout", "ln_free_storage_weight", "ln_sites", "make_config", "make_optimizer", "measure_sigma_avg",
    "pack_sequences", "read_cache", "remove_layernorm", "resid_post_norms", "settings_hash", "split_docs",
    "stdlib_docstrings", "stdlib_files", "to_ln_free_storage", "token_std", "train_steps", "train_tokenizer",
    "LAYOUTS", "NormLayout", "blocks_of", "is_rms_norm", "layout_of", "norm_eps", "ScheduleLog", "norm_sites",
    "removal_order", "RemovalSchedule", "evaluate", "pydoc_topics",
]
