"""The causal check: mean-ablate one write at a time and measure the change at every later reader and the output."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from ..data import iter_batches
from ..errors import NormgrowthError
from .collection import _batch_tensors, _site_of, _valid, _write_sums, reader_normalises
from .estimators import stream_layout

DEFAULT_ABLATION_LAYERS = 6  # number of blocks in the default ablation spread


def default_ablation_writes(n_layers: int, n_spread: int = DEFAULT_ABLATION_LAYERS) -> list[str]:
    """attn_out and mlp_out of about ``n_spread`` blocks spread evenly from the first to the last."""
    layers = sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(n_spread, n_layers))})
    return [f"{site}.{layer}" for layer in layers for site in ("attn_out", "mlp_out")]


def parse_ablate(text: str, model: Any) -> list[str]:
    """Writes to ablate from a comma-separated list, in forward order, without duplicates.

    Items: a block number ``l`` (0-based; both ``attn_out.l`` and ``mlp_out.l``), a write label
    (``embed``, ``attn_out.l``, ``mlp_out.l``), ``default`` (attn and MLP writes of ~6 evenly spread
    blocks) or ``all`` (every write).
    """
    layout = stream_layout(model.n_layers)
    n = model.n_layers
    items = [t.strip() for t in str(text).split(",")]
    if not str(text).strip() or any(not t for t in items):
        raise NormgrowthError(f"--ablate {text!r} is empty or has an empty item: give block numbers like 0,3,6 "
                              "or write labels like embed,mlp_out.3.")
    chosen: set[str] = set()
    for item in items:
        low = item.lower()
        if low == "default":
            chosen.update(default_ablation_writes(n))
        elif low == "all":
            chosen.update(layout.writes)
        elif low.lstrip("+").isdigit():
            layer = int(low)
            if not 0 <= layer < n:
                raise NormgrowthError(f"--ablate block {layer} is out of range: this model has blocks 0..{n - 1}.")
            chosen.update({f"attn_out.{layer}", f"mlp_out.{layer}"})
        elif low in layout.writes:
            chosen.add(low)
        else:
            raise NormgrowthError(f"--ablate item {item!r} is not understood: use block numbers 0..{n - 1}, write "
                                  "labels (embed, attn_out.L, mlp_out.L), 'default' or 'all'.")
    return [w for w in layout.writes if w in chosen]


def resolve_ablation_writes(model: Any, writes: Any) -> list[str]:
    """Normalise ``writes`` (None/"default", a string for :func:`parse_ablate`, or labels / block numbers)."""
    if writes is None or writes is True:
        return default_ablation_writes(model.n_layers)
    if isinstance(writes, str):
        return parse_ablate(writes, model)
    return parse_ablate(",".join(str(w) for w in writes), model)


def normalize_input(x: torch.Tensor, centers: bool, eps: float) -> torch.Tensor:
    """``N(x)``: the model's normalisation without gain, float32.

    Centring models (LN, LN-free): ``(x - mean) / sqrt(var + eps)``; RMSNorm: ``x / sqrt(mean(x^2) + eps)``.
    """
    x = x.float()
    if centers:
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _replace_after_bos(value: torch.Tensor) -> Callable:
    def hook(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, 1:] = value.to(device=x.device, dtype=x.dtype)
        return out
    return hook


def _ablation_hooks(model: Any, label: str, mean_vec: torch.Tensor) -> list[tuple[str, Optional[int], Callable]]:
    if label == "embed":
        hooks = [("embed", None, _replace_after_bos(mean_vec))]
        if model.has_pos_embed:  # the combined write becomes the mean of (token + position) embeddings
            hooks.append(("pos_embed", None, _replace_after_bos(torch.zeros_like(mean_vec))))
        return hooks
    site, layer = _site_of(label)
    return [(site, layer, _replace_after_bos(mean_vec))]


def ablation_check(model: Any, batch: Any, writes: Any = None, batch_size: int = 8,
                   progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Mean-ablate one write at a time and measure the change downstream.

    The write is replaced at every position except 0 by its mean over real tokens at positions >= 1
    (first pass). At every reader: mean over tokens (position 0 and padding excluded) of
    ``||N(r_ablated) - N(r_clean)|| / ||N(r_clean)||`` (:func:`normalize_input`); at the output:
    mean ``KL(p_clean || p_ablated)`` of the next-token distribution. Returns ``writes``,
    ``distance`` (1 .. n_layers+1), ``normalized_input_change [write][distance]`` (None where no reader
    lies that far), ``final_kl [write]``, plus ``readers`` and ``reader_change [write][reader]``.
    """
    from .. import distributed

    tokens, mask = _batch_tensors(batch, model)
    rank, world_size = distributed.world()
    lo, hi = distributed.shard_batches(tokens.shape[0], batch_size, rank, world_size)
    tokens, mask = tokens[lo:hi], mask[lo:hi]
    layout = stream_layout(model.n_layers)
    labels = resolve_ablation_writes(model, writes)
    n_r = len(layout.readers)
    reader_sites = [("resid_pre", layer) for layer in range(model.n_layers)] + [("final_in", None)]
    eps = float(model.norm_eps)
    change_sum = np.zeros((len(labels), n_r))
    kl_sum = np.zeros(len(labels))
    n_valid = 0
    with torch.inference_mode():
        sums, count = _write_sums(model, tokens, mask, labels, batch_size)
        total, count = distributed.sum_over_ranks(np.stack([sums[lab].numpy() for lab in labels]), count)
        means = {lab: torch.from_numpy(total[i]) / max(count, 1) for i, lab in enumerate(labels)}
        state: dict[str, Any] = {}

        normalises = reader_normalises(model)

        def reader_hook(r: int) -> Callable:
            def hook(x: torch.Tensor) -> None:
                normed = normalize_input(x, model.centers, eps) if normalises[r] else x.float()
                if state["mode"] == "clean":
                    state["clean"][r] = normed
                else:
                    ref = state["clean"][r]
                    rel = (normed - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
                    state["change"][r] = float(rel[state["valid"].to(rel.device)].double().sum())
            return hook

        readers = [(site, layer, reader_hook(r)) for r, (site, layer) in enumerate(reader_sites)]
        done = 0
        for _, tok, m in iter_batches(tokens, mask, batch_size):
            valid = _valid(m)
            state.update(mode="clean", clean={}, valid=valid)
            with model.hooks(readers):
                clean_logp = torch.log_softmax(model.forward(tok, attention_mask=m).float(), -1)
            n_valid += int(valid.sum())
            for i, lab in enumerate(labels):
                state.update(mode="ablated", change={})
                with model.hooks(readers + _ablation_hooks(model, lab, means[lab])):
                    logp = torch.log_softmax(model.forward(tok, attention_mask=m).float(), -1)
                for r, v in state["change"].items():
                    change_sum[i, r] += v
                kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
                kl_sum[i] += float(kl[valid.to(kl.device)].double().sum())
            done += tok.shape[0]
            if progress is not None:
                progress(done, tokens.shape[0])
    merged, n_valid = distributed.sum_over_ranks(np.concatenate([change_sum.ravel(), kl_sum]), n_valid)
    change_sum, kl_sum = merged[:change_sum.size].reshape(change_sum.shape), merged[change_sum.size:]
    reader_change = change_sum / max(n_valid, 1)
    max_d = model.n_layers + 1
    distances = list(range(1, max_d + 1))
    by_d = []
    for lab, row in zip(labels, reader_change):
        wl = layout.write_layer[layout.writes.index(lab)]
        cells = []
        for d in distances:
            rl = wl + d
            cells.append(float(row[layout.reader_layer.index(rl)]) if rl in layout.reader_layer else None)
        by_d.append(cells)
    return {
        "writes": labels, "distance": distances, "normalized_input_change": by_d,
        "final_kl": [float(x) / max(n_valid, 1) for x in kl_sum],
        "readers": list(layout.readers), "reader_change": reader_change.tolist(), "n_tokens": n_valid,
        "ablated_positions": "all positions except 0", "run": True,
    }
