"""Collected statistics and run metadata, saved as JSON + .npz (atomically, through the result protocol) and
loaded back exactly.

Token conventions for every statistic here: "main" statistics average over real (non-padding) tokens
at positions >= 1; position 0 is reported apart as "bos"; ``position_mean`` covers all positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Optional

import numpy as np

from .errors import NormgrowthError
from .protocol import ResultProtocol
from .storage import atomic_write_bytes, atomic_write_json, json_safe  # noqa: F401  (re-exported)

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
EMBED_SITES = ("embed", "pos_embed")
NO_LN = " (no LN)"


def display_name(model: str, ln_free: bool) -> str:
    """Last path component of a checkpoint path or hub name; LN-free models get " (no LN)" unless the
    name already says so ("noln" / "lnfree", ignoring case, "-" and "_")."""
    name = str(model).rstrip("/\\").replace("\\", "/").split("/")[-1] or str(model)
    low = name.lower().replace("-", "").replace("_", "")
    if ln_free and "noln" not in low and "lnfree" not in low:
        name += NO_LN
    return name
SCHEMA_VERSION = 1
# Per-layer SiteStats arrays that Results.to_frame() lists (statistic column).
FRAME_STATISTICS = ("mean", "std", "centered_mean", "centered_std", "token_std_mean", "log_mean", "median",
                    "centered_median", "bos_mean", "bos_centered_mean", "bos_std")

@dataclass
class SiteStats:
    """Per-layer statistics of one site's per-token L2 norm ||x|| and centred norm ||x - mean(x)||.

    Arrays are [n_layers] unless noted; means are over real tokens at positions >= 1.
    """

    mean: np.ndarray  # mean ||x||
    std: np.ndarray  # standard deviation of ||x|| over tokens (population)
    centered_mean: np.ndarray  # mean ||x - mean_i(x_i)||  (what LayerNorm sees)
    centered_std: np.ndarray  # its standard deviation over tokens
    token_std_mean: np.ndarray  # mean over tokens of the per-token std of the d_model entries
    log_mean: np.ndarray  # mean of log ||x||  (exp of it = geometric mean)
    median: np.ndarray  # median ||x||, from a log-spaced histogram (0.58 % bins)
    centered_median: np.ndarray
    bos_mean: np.ndarray  # ||x|| at position 0, mean over sequences
    bos_centered_mean: np.ndarray
    bos_std: np.ndarray
    position_mean: np.ndarray  # [n_layers, n_positions] mean ||x|| per position (position 0 included)
    seq_mean: np.ndarray  # [n_seqs, n_layers] per-sequence mean ||x|| over that sequence's tokens >= 1
    seq_centered_mean: np.ndarray  # [n_seqs, n_layers]
    hist: np.ndarray  # [n_layers, HIST_BINS] counts of ||x|| in the log-spaced bins of stats.py

    def summary_json(self) -> dict[str, list]:
        """The stable ``S`` object of the report JSON."""
        keys = ("mean", "std", "centered_mean", "centered_std", "token_std_mean", "median", "bos_mean",
                "bos_centered_mean")
        return {k: _tolist(getattr(self, k)) for k in keys}


@dataclass
class HeadStats:
    """Per-head write norms ||z_h W_O^h|| (bias excluded), arrays [n_layers, n_heads]."""

    mean: np.ndarray
    std: np.ndarray
    bos_mean: np.ndarray
    seq_mean: np.ndarray  # [n_seqs, n_layers, n_heads]


@dataclass
class RunMeta:
    """What was run, on what, and how: enough to reproduce a result or to key a cache."""

    model: str
    revision: Optional[str]
    architecture: str
    family: str
    dtype: str
    device: str
    ln_free: bool
    normalization: str  # "LN" | "RMS" | "none"
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    parallel_blocks: bool
    n_seqs: int
    n_tokens: int  # real tokens at positions >= 1 (the main statistics' count)
    n_bos_tokens: int
    data_source: str
    seq_len: Optional[int]
    batch_size: int
    sites: list[str]
    version: str
    schema_version: int = SCHEMA_VERSION
    norm_placement: str = "pre"  # "pre" | "peri" | "post" | "none" (see ModelConfig.norm_placement)
    source: Optional[dict] = None  # LoadedModel.source: {"format": "hf"} or the GGUF quantisation + dequantised dtype
    token_hash: Optional[str] = None  # token_batch_hash of the collected tokens (None in results saved without it)


def token_batch_hash(tokens: Any, attention_mask: Any) -> str:
    """SHA-256 of the token ids with padding set to -1, and of their shape: equal for two runs over the same
    token batch, whatever the model (so their sequences can be paired)."""
    import hashlib

    ids = np.where(np.asarray(attention_mask, dtype=bool), np.asarray(tokens, dtype=np.int64), -1).astype(np.int64)
    h = hashlib.sha256(str(ids.shape).encode())
    h.update(np.ascontiguousarray(ids).tobytes())
    return h.hexdigest()


@dataclass(repr=False)
class Results(ResultProtocol):
    """One collection run (:func:`normgrowth.collect`), following :class:`~normgrowth.protocol.ResultProtocol`:
    ``save(path)`` / ``Results.load(path)`` (``path.json`` + ``path.npz``, hash-checked), ``to_json()`` (the
    report JSON's collection part), ``to_frame()`` and ``summary()``. Its growth fits live a layer up (:func:`normgrowth.fit.fit_site`)."""

    kind: ClassVar[str] = "collection"

    meta: RunMeta
    sites: dict[str, Optional[SiteStats]]  # SITES; None where the architecture has no such site
    embed: dict[str, SiteStats]  # "embed" (token) and, where present, "pos_embed"; n_layers = 1
    heads: Optional[HeadStats]
    mlp_act_rate: Optional[np.ndarray]  # [n_layers] fraction of MLP pre-activations > 0
    seq_n_tokens: np.ndarray  # [n_seqs] tokens >= 1 per sequence (weights of seq_mean rows)
    position_count: np.ndarray  # [n_positions] sequences with a real token at each position
    extra: dict[str, Any] = field(default_factory=dict)  # analyses attach their JSON here (e.g. "fit")

    # ----- JSON view (stable interface) --------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        m = self.meta
        out: dict[str, Any] = {
            "model": m.model, "ln_free": m.ln_free, "normalization": m.normalization,
            "n_layers": m.n_layers, "d_model": m.d_model, "n_seqs": m.n_seqs, "n_tokens": m.n_tokens,
            "sites": {s: (st.summary_json() if st is not None else None) for s, st in self.sites.items()},
            "embed": {s: st.summary_json() for s, st in self.embed.items()},
            "heads": ({"mean": _tolist(self.heads.mean), "std": _tolist(self.heads.std),
                       "bos_mean": _tolist(self.heads.bos_mean)} if self.heads is not None else None),
            "mlp_act_rate": _tolist(self.mlp_act_rate) if self.mlp_act_rate is not None else None,
            "meta": dataclasses.asdict(m),
        }
        out.update(self.extra)
        return out

    # ----- result protocol ------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {"seq_n_tokens": self.seq_n_tokens, "position_count": self.position_count}
        for group, stats in (("site", self.sites), ("embed", self.embed)):
            for name, st in stats.items():
                if st is None:
                    continue
                for f in dataclasses.fields(SiteStats):
                    arrays[f"{group}/{name}/{f.name}"] = getattr(st, f.name)
        if self.heads is not None:
            for f in dataclasses.fields(HeadStats):
                arrays[f"heads/{f.name}"] = getattr(self.heads, f.name)
        if self.mlp_act_rate is not None:
            arrays["mlp_act_rate"] = self.mlp_act_rate
        return arrays

    @classmethod
    def from_saved(cls, doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> "Results":
        """Rebuild from the JSON (meta, site names, analyses' extra keys) and the npz arrays."""
        if "seq_n_tokens" not in arrays or "meta" not in doc:
            raise NormgrowthError("saved result lacks its arrays or metadata (not written by Results.save): "
                                  "collect it again.")
        meta = RunMeta(**doc["meta"])

        def site(group: str, name: str) -> Optional[SiteStats]:
            if f"{group}/{name}/mean" not in arrays:
                return None
            return SiteStats(**{f.name: arrays[f"{group}/{name}/{f.name}"] for f in dataclasses.fields(SiteStats)})

        sites = {s: site("site", s) for s in doc["sites"]}
        embed = {s: site("embed", s) for s in doc.get("embed", {})}
        heads = (HeadStats(**{f.name: arrays[f"heads/{f.name}"] for f in dataclasses.fields(HeadStats)})
                 if "heads/mean" in arrays else None)
        known = set(cls.__dataclass_fields__) | {"model", "ln_free", "normalization", "n_layers", "d_model",
                                                 "n_seqs", "n_tokens", "arrays", "result_kind"}
        extra = {k: v for k, v in doc.items() if k not in known}
        return cls(meta=meta, sites=sites, embed={k: v for k, v in embed.items() if v is not None},
                   heads=heads, mlp_act_rate=arrays.get("mlp_act_rate"), seq_n_tokens=arrays["seq_n_tokens"],
                   position_count=arrays["position_count"], extra=extra)

    def frame_rows(self) -> Iterator[dict[str, Any]]:
        """Long-format rows: every per-layer SiteStats array (``FRAME_STATISTICS``) of every site and of the
        embeddings (layer 0), the per-head write norms (site ``heads``, extra column ``head``) and the MLP
        activation rate (site ``mlp_pre``, statistic ``act_rate``)."""
        model = self.meta.model
        for group in (self.sites, self.embed):
            for name, st in group.items():
                if st is None:
                    continue
                for stat in FRAME_STATISTICS:
                    for layer, value in enumerate(np.asarray(getattr(st, stat), dtype=np.float64)):
                        yield {"model": model, "site": name, "layer": layer, "statistic": stat, "value": float(value)}
        if self.heads is not None:
            for stat in ("mean", "std", "bos_mean"):
                values = np.asarray(getattr(self.heads, stat), dtype=np.float64)
                for (layer, head), value in np.ndenumerate(values):
                    yield {"model": model, "site": "heads", "layer": int(layer), "statistic": stat,
                           "value": float(value), "head": int(head)}
        if self.mlp_act_rate is not None:
            for layer, value in enumerate(np.asarray(self.mlp_act_rate, dtype=np.float64)):
                yield {"model": model, "site": "mlp_pre", "layer": layer, "statistic": "act_rate", "value": float(value)}

    def summary(self) -> str:
        m = self.meta
        lines = [f"{m.model}: {m.family}, {m.normalization}{', LN-free' if m.ln_free else ''}, {layout_text(m)}, "
                 f"{m.n_layers} layers, "
                 f"d_model {m.d_model}; {m.n_seqs} sequences, {m.n_tokens} tokens at positions >= 1 ({m.dtype})"]
        post = self.sites.get("resid_post")
        if post is not None and m.n_layers >= 1:
            lines.append(f"resid_post mean norm {post.mean[0]:.4g} (layer 0) -> {post.mean[-1]:.4g} "
                         f"(layer {m.n_layers - 1})")
        present = [s for s, st in self.sites.items() if st is not None]
        missing = [s for s, st in self.sites.items() if st is None]
        lines.append("sites: " + ", ".join(present) + (f" (absent: {', '.join(missing)})" if missing else ""))
        return "\n".join(lines)


def layout_text(m: RunMeta) -> str:
    """``"<placement>-norm, parallel|sequential blocks"`` for headers."""
    return f"{m.norm_placement}-norm, {'parallel' if m.parallel_blocks else 'sequential'} blocks"


def _tolist(a: Any) -> Any:
    arr = np.asarray(a, dtype=np.float64)
    return [None if not np.isfinite(x) else float(x) for x in arr] if arr.ndim == 1 else [_tolist(r) for r in arr]
