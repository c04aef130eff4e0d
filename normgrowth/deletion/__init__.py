"""Deletion by magnitude versus deletion by erasure: how later writes hide earlier ones.

A package by concern: :mod:`.estimators` (pure functions on tensors and arrays), :mod:`.results`
(:class:`DeletionResults`, its JSON document and text), :mod:`.collection` (hooks, per-sequence sums,
resume checkpoints) and :mod:`.ablation` (the mean-ablation check). Every public name is importable from
``normgrowth.deletion``. Formulas and reading guide: ``docs/deletion.md``.
"""

from .ablation import (DEFAULT_ABLATION_LAYERS, _ablation_hooks, ablation_check, default_ablation_writes,
                       normalize_input, parse_ablate, resolve_ablation_writes)
from .collection import (_WriteCollector, _write_means, collect_deletion, deletion_bytes_per_token,
                         reader_normalises)
from .estimators import (EXCESS_DECAY_MIN, MATRICES, MIN_PAIRS, QUANTITIES, RETENTION_KEPT, SHARE_WITHIN,
                         ZERO_WRITE_TOL, StreamLayout, deletion_quantities, deletion_verdict, distance_matrix,
                         gram_from_writes, locality, normalized_change, pair_average_by_distance, project_writes,
                         stream_layout, stream_parts, summarize_deletion, token_sums, write_slopes, zero_write_mask)
from .results import (MIN_BOOT_SEQS, DeletionResults, deletion_document, format_deletion_json,
                      format_deletion_report)

__all__ = [
    "DEFAULT_ABLATION_LAYERS", "EXCESS_DECAY_MIN", "MATRICES", "MIN_BOOT_SEQS", "MIN_PAIRS", "QUANTITIES",
    "RETENTION_KEPT", "SHARE_WITHIN", "ZERO_WRITE_TOL", "DeletionResults", "StreamLayout", "ablation_check",
    "collect_deletion", "default_ablation_writes", "deletion_bytes_per_token", "deletion_document",
    "deletion_quantities", "deletion_verdict", "distance_matrix", "format_deletion_json", "format_deletion_report",
    "gram_from_writes", "locality", "normalize_input", "normalized_change", "pair_average_by_distance",
    "parse_ablate", "project_writes", "reader_normalises", "resolve_ablation_writes", "stream_layout",
    "stream_parts", "summarize_deletion", "token_sums", "write_slopes", "zero_write_mask",
]
