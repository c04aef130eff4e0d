"""Collecting the deletion sums: hooks on every write, per-sequence sums, resume checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..data import TokenBatch, as_token_batch, iter_batches
from ..errors import NormgrowthError
from ..numerics import DEFAULT_N_BOOT
from .estimators import StreamLayout, project_writes, stream_layout, token_sums
from .reads import read_terms, reader_factor
from .results import DeletionResults

_CHUNK_BYTES = 256 * 2**20  # working memory for one chunk of per-token quantities


def _batch_tensors(batch: Any, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask (right-aligned) of anything :func:`normgrowth.data.as_token_batch` accepts, or of an
    object with ``.tokens`` and ``.attention_mask``."""
    if not isinstance(batch, TokenBatch) and hasattr(batch, "tokens"):
        batch = as_token_batch(batch.tokens, model, attention_mask=getattr(batch, "attention_mask", None))
    tb = as_token_batch(batch, model)
    tokens, mask = tb.tokens, tb.attention_mask.bool()
    if tokens.shape[1] < 2 or not bool(mask[:, 1:].any()):
        raise NormgrowthError("the token batch has no real token after position 0: use sequences of at least 2 tokens.")
    return tokens, mask


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """Tokens in the statistics: real (mask True) and not at position 0."""
    valid = mask.clone()
    valid[:, 0] = False
    return valid


def _site_of(label: str) -> tuple[str, int]:
    site, layer = label.split(".")
    return site, int(layer)


class _WriteCollector:
    """Hooks that store the batch's projected writes ``P(w)`` ``[batch, pos, C, d]`` (float32).

    The buffer lives for one batch; it is complete when the final stream is read (``final_in``, the last
    hook of the forward pass). Reader hooks compare each block input and the final stream with the
    running sum of the raw writes (a self-check).
    """

    def __init__(self, model: Any, layout: StreamLayout):
        self.model, self.layout = model, layout
        self.center = bool(model.centers)
        self.writes: Optional[torch.Tensor] = None
        self.stream: Optional[torch.Tensor] = None
        self.done: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None
        self.max_rel_error = 0.0

    def start_batch(self, valid: torch.Tensor) -> None:
        self.valid = valid
        self.writes = self.stream = self.done = None

    def hooks(self) -> list[tuple[str, Optional[int], Callable]]:
        hooks: list[tuple[str, Optional[int], Callable]] = [("embed", None, self._write_hook(0))]
        if self.model.has_pos_embed:
            hooks.append(("pos_embed", None, self._write_hook(0)))
        for layer in range(self.layout.n_layers):
            hooks.append(("attn_out", layer, self._write_hook(1 + 2 * layer)))
            hooks.append(("mlp_out", layer, self._write_hook(2 + 2 * layer)))
            hooks.append(("resid_pre", layer, self._reader_hook(final=False)))
        hooks.append(("final_in", None, self._reader_hook(final=True)))
        return hooks

    def _write_hook(self, index: int) -> Callable:
        def hook(x: torch.Tensor) -> None:
            if self.writes is None:
                b, p, d = x.shape
                self.writes = torch.zeros(b, p, self.layout.n_writes, d, dtype=torch.float32, device=x.device)
                self.stream = torch.zeros(b, p, d, dtype=torch.float32, device=x.device)
            xf = x.float().to(self.writes.device)  # (models spread over several devices)
            self.writes[:, :, index] += project_writes(xf, self.center)
            self.stream += xf
        return hook

    def _reader_hook(self, final: bool) -> Callable:
        def hook(x: torch.Tensor) -> None:
            xf = x.float().to(self.stream.device)
            valid = self.valid.to(xf.device)
            err = (self.stream - xf).norm(dim=-1) / xf.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
            if valid.any():
                self.max_rel_error = max(self.max_rel_error, float(err[valid].max()))
            if final:
                self.done, self.writes, self.stream = self.writes, None, None
        return hook


def reader_normalises(model: Any) -> list[bool]:
    """Per reader (``resid_pre.0`` .. ``resid_pre.{n-1}``, then ``final``): whether what reads it divides by the
    stream's size. Block readers do when the sublayers have input norms (pre / peri placement); with
    output-only placement (OLMo 2) the sublayers read the raw stream. The final stream always passes the
    final norm."""
    return [bool(model.input_norm)] * int(model.n_layers) + [True]


def deletion_bytes_per_token(model: Any) -> int:
    """Bytes per token the deletion collector keeps beyond a norm-collection pass: the float32 writes
    ``[C, d_model]`` and their running sum, their float64 copies (raw and centred), the readers' float64
    streams ``[R, d_model]`` and the float64 ``[C, C]`` / ``[R, C]`` terms (C = 2 n_layers + 1). For
    ``--batch-size auto``."""
    lay = stream_layout(model.n_layers)
    n_c, n_r, d = lay.n_writes, len(lay.readers), model.d_model
    return 4 * (n_c + 1) * d + 16 * n_c * d + 8 * n_r * d + 8 * (2 * n_c * n_c + 4 * n_r * n_c)


@dataclass(frozen=True)
class ReaderMaps:
    """The reader sublayers of :mod:`.reads`: names, writes before each (``k``), whether each divides by the
    stream's size, and each factor ``F_L`` ``[d, d]`` (:func:`.reads.reader_factor`)."""

    names: tuple[str, ...]
    k: tuple[int, ...]
    normalises: tuple[bool, ...]
    factors: tuple[torch.Tensor, ...]


def reader_maps(model: Any) -> ReaderMaps:
    """Per block: the attention (Q, K, V input weights, stored K/V heads, through ``ln1``) and the dense MLP
    (gate and up, or the input weights, through ``ln2``); then the unembedding through the final norm.
    Sublayers without an input norm (output-only placement) read the raw stream: gain 1. LN-free checkpoints
    divide by the constant ``sqrt(eps)``: their readers read the raw stream (``s = 1``) with gain
    ``stored / sqrt(eps)``. Mixture-of-experts MLPs are left out (no single input matrix)."""
    n, d = int(model.n_layers), int(model.d_model)
    w = model.stacked_weights(["W_Q", "W_K_stored", "W_V_stored", "W_in", "W_gate", "ln1_w", "ln2_w", "lnf_w"])
    offset = float(model.norm_gain_offset)
    ones = torch.ones(d)
    ln_free = bool(model.ln_free)
    normalises = [False] * (n + 1) if ln_free else reader_normalises(model)
    divisor = math.sqrt(float(model.norm_eps)) if ln_free else 1.0

    def gain(key: str, layer: int, norm: bool) -> torch.Tensor:
        g = w.get(key)
        if g is None or not (norm or ln_free):
            return ones
        return (g[layer].float() + offset) / divisor

    def heads(x: torch.Tensor) -> torch.Tensor:  # [head, d, d_head] -> [d, head * d_head]
        return x.permute(1, 0, 2).reshape(x.shape[1], -1)

    names, ks, norms, factors = [], [], [], []
    for layer in range(n):
        qkv = torch.cat([heads(w[key][layer].float()) for key in ("W_Q", "W_K_stored", "W_V_stored")], 1)
        names.append(f"attn.{layer}")
        ks.append(1 + 2 * layer)
        norms.append(normalises[layer])
        factors.append(reader_factor(qkv, gain("ln1_w", layer, normalises[layer])))
        if w.get("W_in") is None:
            continue
        mlp_in = w["W_in"][layer].float()
        if w.get("W_gate") is not None:
            mlp_in = torch.cat([w["W_gate"][layer].float(), mlp_in], 1)
        names.append(f"mlp.{layer}")
        ks.append(1 + 2 * layer if model.parallel_blocks else 2 + 2 * layer)
        norms.append(normalises[layer])
        factors.append(reader_factor(mlp_in, gain("ln2_w", layer, normalises[layer])))
    unembed = model.hf_model.get_output_embeddings().weight.detach().float().T  # [d, vocab]
    names.append("unembed")
    ks.append(2 * n + 1)
    norms.append(normalises[n])
    factors.append(reader_factor(unembed, gain("lnf_w", 0, True)))
    return ReaderMaps(tuple(names), tuple(ks), tuple(norms), tuple(f.to(model.input_device) for f in factors))


READ_COST_FULL = 1e8  # multiply-adds per token up to which the reads use every token


def read_token_stride(reader_k: Sequence[int], d_model: int) -> int:
    """The reads' fixed token subsample: every token (1) when they cost at most :data:`READ_COST_FULL`
    multiply-adds per token (``sum_L k_L d^2``), else every 4th position (1, 5, 9, ...)."""
    return 1 if sum(reader_k) * d_model**2 <= READ_COST_FULL else 4


def collect_deletion(model: Any, batch: Any, batch_size: int = 8, ablate: Any = None,
                     progress: Optional[Callable[[int, int], None]] = None, n_boot: int = DEFAULT_N_BOOT,
                     seed: int = 0, checkpoint: Any = None) -> DeletionResults:
    """Stream the deletion sums of ``model`` over ``batch`` (two passes: write means, then sums).

    Position 0 and padding are excluded; per-token terms in float64 (:func:`token_sums`,
    :func:`.reads.read_terms`), sums in float64. ``ablate``: None (no causal check), "default", or write labels /
    layer numbers for :func:`ablation_check`. ``progress(n_done, n_total)`` is called after each batch of the
    second pass with this process's counts. ``checkpoint`` (a :class:`normgrowth.resume.Checkpoint`): the
    write means once the first pass is done and the per-sequence sums every ``checkpoint.every`` batches of the
    second are saved, and a saved state of the same run is resumed; removed at the end. Under ``torchrun`` each
    rank collects a contiguous block of whole batches (:func:`normgrowth.distributed.shard_batches`); the write
    sums and the per-sequence rows are merged exactly, and every rank returns the same result.
    """
    from .. import distributed
    from .ablation import ablation_check, resolve_ablation_writes

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise NormgrowthError(f"batch size must be a positive integer, got {batch_size!r}.")
    tokens, mask = _batch_tensors(batch, model)
    layout = stream_layout(model.n_layers)
    n_seqs = tokens.shape[0]
    n_r, n_c, d = len(layout.readers), layout.n_writes, model.d_model
    ablation_writes = resolve_ablation_writes(model, ablate) if ablate is not None else None
    eps = float(model.norm_eps)
    rank, world_size = distributed.world()
    lo, hi = distributed.shard_batches(n_seqs, batch_size, rank, world_size)
    maps = reader_maps(model)
    n_rs = len(maps.names)
    stride = read_token_stride(maps.k, d)
    resume = _DeletionCheckpoint(checkpoint, batch_size, n_seqs, (n_c, d), (lo, hi))
    seq_gram = np.zeros((hi - lo, n_c, n_c))
    seq_infl = np.zeros((hi - lo, n_r, n_c))
    seq_fnorm = np.zeros((hi - lo, n_r))
    seq_read = np.zeros((hi - lo, n_rs, n_c))
    seq_read0 = np.zeros((hi - lo, n_rs, n_c))
    seq_n_tokens = _valid(mask).sum(1).numpy().astype(np.int64)
    collector = _WriteCollector(model, layout)
    error: Optional[BaseException] = None
    try:
        raw_mean = resume.raw_mean
        if raw_mean is None:
            with torch.inference_mode():
                sums, count = _write_sums(model, tokens[lo:hi], mask[lo:hi], layout.writes, batch_size)
            sums, count = distributed.sum_over_ranks(np.stack([sums[w].numpy() for w in layout.writes]), count)
            raw_mean = torch.from_numpy(sums) / max(count, 1)  # [C, d] float64
            resume.save(raw_mean, 0, {})
        write_mean = raw_mean - raw_mean.mean(-1, keepdim=True) if model.centers else raw_mean
        done = resume.restore({"seq_gram": seq_gram, "seq_infl": seq_infl, "seq_fnorm": seq_fnorm,
                               "seq_read": seq_read, "seq_read0": seq_read0}, collector)
        normalises = reader_normalises(model)
        per_token = 3 * n_c * d + n_r * d + 2 * n_c * n_c + 4 * n_r * n_c + 3 * n_rs * n_c + n_c * d // 2
        chunk = max(1, _CHUNK_BYTES // (8 * per_token))
        n_batches = 0
        with torch.inference_mode(), model.hooks(collector.hooks()):
            for start, tok, m in iter_batches(tokens[lo + done:hi], mask[lo + done:hi], batch_size):
                start += done  # row within this rank's block
                valid = _valid(m)
                collector.start_batch(valid)
                model.forward(tok, attention_mask=m, logits=False)  # the stream only
                if collector.done is None:
                    raise RuntimeError("the final_in hook did not fire: the writes were not all seen")
                writes = collector.done
                collector.done = None
                dev = writes.device
                acc_dev = dev if dev.type in ("cpu", "cuda") else torch.device("cpu")
                valid_d = valid.to(dev)
                seq_id = torch.arange(tok.shape[0], device=dev)[:, None].expand_as(valid_d)[valid_d].to(acc_dev)
                pos = torch.arange(tok.shape[1], device=dev)[None, :].expand_as(valid_d)[valid_d]
                read_rows = ((pos - 1) % stride == 0).to(acc_dev)  # the reads' fixed token subsample
                w_valid = writes[valid_d]  # [n_valid, C, d]
                del writes
                sums_b = {key: torch.zeros((tok.shape[0],) + shape, dtype=torch.float64, device=acc_dev)
                          for key, shape in (("gram", (n_c, n_c)), ("infl", (n_r, n_c)), ("fnorm", (n_r,)),
                                             ("read", (n_rs, n_c)), ("read0", (n_rs, n_c)))}
                for a in range(0, w_valid.shape[0], chunk):
                    part = w_valid[a:a + chunk]
                    gram, change, size = token_sums(part, write_mean, layout.reader_index, eps, normalises)
                    ids = seq_id[a:a + chunk]
                    for key, val in (("gram", gram), ("infl", change), ("fnorm", size)):
                        sums_b[key].index_add_(0, ids, val.to(acc_dev))
                    sel = read_rows[a:a + chunk]
                    if bool(sel.any()):
                        read, read0 = read_terms(part[sel.to(part.device)], maps.factors, maps.k, maps.normalises, eps)
                        sums_b["read"].index_add_(0, ids[sel], read.to(acc_dev))
                        sums_b["read0"].index_add_(0, ids[sel], read0.to(acc_dev))
                stop = start + tok.shape[0]
                for arr, key in ((seq_gram, "gram"), (seq_infl, "infl"), (seq_fnorm, "fnorm"), (seq_read, "read"),
                                 (seq_read0, "read0")):
                    arr[start:stop] = sums_b[key].cpu().numpy()
                n_batches += 1
                if resume.due(n_batches) and lo + stop < hi:
                    resume.save(raw_mean, stop, {"seq_gram": seq_gram[:stop], "seq_infl": seq_infl[:stop],
                                                 "seq_fnorm": seq_fnorm[:stop], "seq_read": seq_read[:stop],
                                                 "seq_read0": seq_read0[:stop],
                                                 "max_rel_error": np.float64(collector.max_rel_error)})
                if progress is not None:
                    progress(stop, hi - lo)
    except Exception as err:  # shared with the other ranks before raising (no rank left waiting)
        error = err
    distributed.raise_on_any_rank(error, world_size)
    seq_gram, seq_infl, seq_fnorm, seq_read, seq_read0 = distributed.gather_rows(
        [seq_gram, seq_infl, seq_fnorm, seq_read, seq_read0])
    max_rel_error = distributed.max_over_ranks(collector.max_rel_error)
    res = DeletionResults(
        model=str(model.spec), ln_free=bool(model.ln_free), normalization=str(model.normalization),
        centers=bool(model.centers), n_layers=int(model.n_layers), d_model=int(d), norm_eps=eps, layout=layout,
        norm_placement=str(model.norm_placement), parallel_blocks=bool(model.parallel_blocks),
        seq_gram=seq_gram, seq_n_tokens=seq_n_tokens, seq_infl=seq_infl, seq_fnorm=seq_fnorm,
        mean_gram=(write_mean @ write_mean.T).numpy(), max_write_sum_rel_error=max_rel_error,
        data_source=str(getattr(batch, "source", "")), n_boot=n_boot, seed=seed, seq_read=seq_read,
        seq_read0=seq_read0, read_readers=maps.names, read_reader_k=maps.k, read_token_stride=stride,
        shards=distributed.all_gather([lo, hi]))
    if ablation_writes:
        res.ablation = ablation_check(model, batch, writes=ablation_writes, batch_size=batch_size)
    resume.remove()
    return res


class _DeletionCheckpoint:
    """Saving and resuming :func:`collect_deletion`'s state (:mod:`normgrowth.resume`): the raw write
    means ``[C, d]`` after the first pass, then the per-sequence sums of this rank's sequences done."""

    def __init__(self, checkpoint: Any, batch_size: int, n_seqs: int, mean_shape: tuple[int, int],
                 block: tuple[int, int]):
        self.checkpoint, self.raw_mean, self.state, self.done = checkpoint, None, {}, 0
        self.every = None if checkpoint is None else checkpoint.every
        if checkpoint is None:
            return
        import time

        from .. import resume as ckpt
        from ..distributed import world

        self._ckpt, self._started = ckpt, time.perf_counter()
        self.path = checkpoint.path(*world())
        self.ident = ckpt.identity(checkpoint.key, kind="deletion", batch_size=batch_size, n_sequences=n_seqs,
                                   block=list(block), estimator="reads")
        done, state, why = ckpt.load(self.path, self.ident)
        if state is not None and tuple(state.get("raw_mean", np.zeros(0)).shape) != mean_shape:
            state, why = None, "with other shapes"
        if state is not None:
            self.raw_mean, self.state, self.done = torch.from_numpy(state.pop("raw_mean")), state, done
            checkpoint.say(f"resuming at sequence {block[0] + done} of {n_seqs}" if done else
                           "resuming after the first pass (write means)")
        elif why:
            checkpoint.say(f"ignoring checkpoint {self.path} {why}; starting afresh")

    def restore(self, arrays: dict[str, np.ndarray], collector: Any) -> int:
        """Put the saved per-sequence sums back into ``arrays``; the number of this rank's sequences done."""
        if self.checkpoint is not None:
            import time

            self._started = time.perf_counter()
        if self.done:
            for key, arr in arrays.items():
                arr[:self.done] = self.state[key]
            collector.max_rel_error = float(self.state["max_rel_error"])
        return self.done

    def due(self, n_batches: int) -> bool:
        """A checkpoint after this batch: every ``every`` batches (None: sized to about
        ``DEFAULT_EVERY_SECONDS`` of work after the first batch)."""
        if self.checkpoint is None:
            return False
        if self.every is None:
            import time

            per_batch = (time.perf_counter() - self._started) / n_batches
            self.every = self._ckpt.batches_between(per_batch)
        return n_batches % self.every == 0

    def save(self, raw_mean: torch.Tensor, done: int, arrays: dict[str, np.ndarray]) -> None:
        if self.checkpoint is not None:
            self._ckpt.save(self.path, self.ident, done, {"raw_mean": raw_mean.numpy(), **arrays})

    def remove(self) -> None:
        if self.checkpoint is not None:
            self._ckpt.remove(self.path)


def _write_sums(model: Any, tokens: torch.Tensor, mask: torch.Tensor, labels: Sequence[str],
                batch_size: int) -> tuple[dict[str, torch.Tensor], int]:
    """Sum of each write over real tokens at positions >= 1 (float64), and the number of those tokens."""
    sums = {lab: torch.zeros(model.d_model, dtype=torch.float64) for lab in labels}
    state: dict[str, torch.Tensor] = {}

    def adder(label: str) -> Callable:
        def hook(x: torch.Tensor) -> None:
            v = state["valid"].to(x.device)
            sums[label] += x.float()[v].double().sum(0).cpu()
        return hook

    hooks = []
    for lab in labels:
        if lab == "embed":
            hooks.append(("embed", None, adder(lab)))
            if model.has_pos_embed:
                hooks.append(("pos_embed", None, adder(lab)))
        else:
            site, layer = _site_of(lab)
            hooks.append((site, layer, adder(lab)))
    n = 0
    with model.hooks(hooks):
        for _, tok, m in iter_batches(tokens, mask, batch_size):
            state["valid"] = _valid(m)
            n += int(state["valid"].sum())
            model.forward(tok, attention_mask=m, logits=False)
    return sums, n


def _write_means(model: Any, tokens: torch.Tensor, mask: torch.Tensor, labels: Sequence[str],
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Mean vector of each write over real tokens at positions >= 1 (float64)."""
    sums, n = _write_sums(model, tokens, mask, labels, batch_size)
    return {lab: s / max(n, 1) for lab, s in sums.items()}
