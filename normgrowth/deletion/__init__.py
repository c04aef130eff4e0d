"""Deletion by magnitude versus deletion by erasure: how later writes hide earlier ones.

A package by concern: :mod:`.estimators` (pure functions on Gram matrices and the bootstrap), :mod:`.reads`
(pure: what each reader reads of each write, innovation retention, the verdict), :mod:`.results`
(:class:`DeletionResults`, its JSON document and text), :mod:`.collection` (hooks, per-sequence sums, resume
checkpoints, torchrun shards) and :mod:`.ablation` (the mean-ablation check). Every public name is importable
from ``normgrowth.deletion``. Formulas and reading guide: ``docs/deletion.md``.
"""

from .ablation import (DEFAULT_ABLATION_LAYERS, _ablation_hooks, ablation_check, default_ablation_writes,
                       normalize_input, parse_ablate, resolve_ablation_writes)
from .collection import (ReaderMaps, _write_means, _WriteCollector, collect_deletion, deletion_bytes_per_token,
                         reader_maps, reader_normalises)
from .estimators import (MATRICES, MIN_PAIRS, QUANTITIES, SHARE_WITHIN, ZERO_WRITE_TOL, StreamLayout,
                         deletion_quantities, distance_matrix, gram_from_writes, locality, normalized_change,
                         pair_average_by_distance, project_writes, stream_layout, stream_parts, summarize_deletion,
                         token_sums, write_slopes, zero_write_mask)
from .reads import (ERASED_BELOW, FAR_DISTANCE, FRONT_LOADED_MIN, LABELS, NO_INNOVATION_TOL, REINFORCED_ABOVE,
                    SHARE_SPLIT, deletion_verdict, front_share, innovation_factor, innovation_retention,
                    locality_statistics, pooled_retention, read_distance, read_terms, reader_factor, reader_groups,
                    stream_scales)
from .results import (MIN_BOOT_SEQS, DeletionResults, deletion_document, deletion_frame_rows,
                      format_deletion_json, format_deletion_report)

__all__ = [
    "DEFAULT_ABLATION_LAYERS", "ERASED_BELOW", "FAR_DISTANCE", "FRONT_LOADED_MIN", "LABELS", "MATRICES",
    "MIN_BOOT_SEQS", "MIN_PAIRS", "NO_INNOVATION_TOL", "QUANTITIES", "REINFORCED_ABOVE", "SHARE_SPLIT",
    "SHARE_WITHIN", "ZERO_WRITE_TOL", "DeletionResults", "ReaderMaps", "StreamLayout", "ablation_check",
    "collect_deletion", "default_ablation_writes", "deletion_bytes_per_token", "deletion_document",
    "deletion_frame_rows", "deletion_quantities", "deletion_verdict", "distance_matrix", "format_deletion_json",
    "format_deletion_report",
    "front_share", "gram_from_writes", "innovation_factor", "innovation_retention", "locality",
    "locality_statistics", "normalize_input", "normalized_change", "pair_average_by_distance", "parse_ablate",
    "pooled_retention", "project_writes", "read_distance", "read_terms", "reader_factor", "reader_maps",
    "reader_groups", "reader_normalises", "resolve_ablation_writes", "stream_layout", "stream_parts", "stream_scales",
    "summarize_deletion", "token_sums", "write_slopes", "zero_write_mask",
]
