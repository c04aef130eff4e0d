"""Collecting the deletion sums: hooks on every write, per-sequence sums, resume checkpoints."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..data import TokenBatch, as_token_batch, iter_batches
from ..errors import NormgrowthError
from ..numerics import DEFAULT_N_BOOT
from .estimators import StreamLayout, project_writes, stream_layout, token_sums
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


def collect_deletion(model: Any, batch: Any, batch_size: int = 8, ablate: Any = None,
                     progress: Optional[Callable[[int, int], None]] = None, n_boot: int = DEFAULT_N_BOOT,
                     seed: int = 0, checkpoint: Any = None) -> DeletionResults:
    """Stream the deletion sums of ``model`` over ``batch`` (two passes: write means, then sums).

    Position 0 and padding are excluded; per-token terms in float64 (:func:`token_sums`), sums in
    float64. ``ablate``: None (no causal check), "default", or write labels / layer numbers for
    :func:`ablation_check`. ``progress(n_done, n_total)`` is called after each batch of the second pass.
    ``checkpoint`` (a :class:`normgrowth.checkpoint.Checkpoint`): the write means once the first pass
    is done and the per-sequence sums every ``checkpoint.every`` batches of the second are saved, and a
    saved state of the same run is resumed; removed at the end.
    """
    tokens, mask = _batch_tensors(batch, model)
    layout = stream_layout(model.n_layers)
    n_seqs = tokens.shape[0]
    n_r, n_c, d = len(layout.readers), layout.n_writes, model.d_model
    from .ablation import ablation_check, resolve_ablation_writes

    ablation_writes = resolve_ablation_writes(model, ablate) if ablate is not None else None
    eps = float(model.norm_eps)
    resume = _DeletionCheckpoint(checkpoint, batch_size, n_seqs, (n_c, d))
    raw_mean = resume.raw_mean
    if raw_mean is None:
        with torch.inference_mode():
            means = _write_means(model, tokens, mask, layout.writes, batch_size)
        raw_mean = torch.stack([means[w] for w in layout.writes])  # [C, d] float64
        resume.save(raw_mean, 0, {})
    write_mean = raw_mean - raw_mean.mean(-1, keepdim=True) if model.centers else raw_mean
    mean_gram = (write_mean @ write_mean.T).numpy()
    seq_gram = np.zeros((n_seqs, n_c, n_c))
    seq_infl = np.zeros((n_seqs, n_r, n_c))
    seq_fnorm = np.zeros((n_seqs, n_r))
    seq_n_tokens = _valid(mask).sum(1).numpy().astype(np.int64)
    collector = _WriteCollector(model, layout)
    done = resume.restore(seq_gram, seq_infl, seq_fnorm, collector)
    normalises = reader_normalises(model)
    chunk = max(1, _CHUNK_BYTES // (8 * (3 * n_c * d + n_r * d + 2 * n_c * n_c + 4 * n_r * n_c)))
    n_batches = 0
    with torch.inference_mode(), model.hooks(collector.hooks()):
        for start, tok, m in iter_batches(tokens[done:], mask[done:], batch_size):
            start += done
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
            w_valid = writes[valid_d]  # [n_valid, C, d]
            del writes
            g_sum = torch.zeros(tok.shape[0], n_c, n_c, dtype=torch.float64, device=acc_dev)
            i_sum = torch.zeros(tok.shape[0], n_r, n_c, dtype=torch.float64, device=acc_dev)
            f_sum = torch.zeros(tok.shape[0], n_r, dtype=torch.float64, device=acc_dev)
            for lo in range(0, w_valid.shape[0], chunk):
                gram, change, size = token_sums(w_valid[lo:lo + chunk], write_mean, layout.reader_index, eps,
                                                normalises)
                ids = seq_id[lo:lo + chunk]
                g_sum.index_add_(0, ids, gram.to(acc_dev))
                i_sum.index_add_(0, ids, change.to(acc_dev))
                f_sum.index_add_(0, ids, size.to(acc_dev))
            stop = start + tok.shape[0]
            seq_gram[start:stop] = g_sum.cpu().numpy()
            seq_infl[start:stop] = i_sum.cpu().numpy()
            seq_fnorm[start:stop] = f_sum.cpu().numpy()
            n_batches += 1
            if resume.due(n_batches) and stop < n_seqs:
                resume.save(raw_mean, stop, {"seq_gram": seq_gram[:stop], "seq_infl": seq_infl[:stop],
                                             "seq_fnorm": seq_fnorm[:stop],
                                             "max_rel_error": np.float64(collector.max_rel_error)})
            if progress is not None:
                progress(stop, n_seqs)
    res = DeletionResults(
        model=str(model.spec), ln_free=bool(model.ln_free), normalization=str(model.normalization),
        centers=bool(model.centers), n_layers=int(model.n_layers), d_model=int(d), norm_eps=eps, layout=layout,
        norm_placement=str(model.norm_placement), parallel_blocks=bool(model.parallel_blocks),
        seq_gram=seq_gram, seq_n_tokens=seq_n_tokens, seq_infl=seq_infl, seq_fnorm=seq_fnorm, mean_gram=mean_gram,
        max_write_sum_rel_error=collector.max_rel_error, data_source=str(getattr(batch, "source", "")),
        n_boot=n_boot, seed=seed)
    if ablation_writes:
        res.ablation = ablation_check(model, batch, writes=ablation_writes, batch_size=batch_size)
    resume.remove()
    return res


class _DeletionCheckpoint:
    """Saving and resuming :func:`collect_deletion`'s state (:mod:`normgrowth.checkpoint`): the raw write
    means ``[C, d]`` after the first pass, then the per-sequence sums of the sequences done."""

    def __init__(self, checkpoint: Any, batch_size: int, n_seqs: int, mean_shape: tuple[int, int]):
        self.checkpoint, self.raw_mean, self.state, self.done = checkpoint, None, {}, 0
        self.every = None if checkpoint is None else checkpoint.every
        if checkpoint is None:
            return
        import time

        from .. import checkpoint as ckpt
        from ..distributed import world

        self._ckpt, self._started = ckpt, time.perf_counter()
        self.path = checkpoint.path(*world())
        self.ident = ckpt.identity(checkpoint.key, kind="deletion", batch_size=batch_size, n_sequences=n_seqs)
        done, state, why = ckpt.load(self.path, self.ident)
        if state is not None and tuple(state.get("raw_mean", np.zeros(0)).shape) != mean_shape:
            state, why = None, "with other shapes"
        if state is not None:
            self.raw_mean, self.state, self.done = torch.from_numpy(state.pop("raw_mean")), state, done
            checkpoint.say(f"resuming at sequence {done} of {n_seqs}" if done else
                           "resuming after the first pass (write means)")
        elif why:
            checkpoint.say(f"ignoring checkpoint {self.path} {why}; starting afresh")

    def restore(self, seq_gram: np.ndarray, seq_infl: np.ndarray, seq_fnorm: np.ndarray, collector: Any) -> int:
        """Put the saved per-sequence sums back; the number of sequences done (the second pass starts)."""
        if self.checkpoint is not None:
            import time

            self._started = time.perf_counter()
        if self.done:
            seq_gram[:self.done] = self.state["seq_gram"]
            seq_infl[:self.done] = self.state["seq_infl"]
            seq_fnorm[:self.done] = self.state["seq_fnorm"]
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
            self.every = max(1, int(self._ckpt.DEFAULT_EVERY_SECONDS / max(per_batch, 1e-9)))
        return n_batches % self.every == 0

    def save(self, raw_mean: torch.Tensor, done: int, arrays: dict[str, np.ndarray]) -> None:
        if self.checkpoint is not None:
            self._ckpt.save(self.path, self.ident, done, {"raw_mean": raw_mean.numpy(), **arrays})

    def remove(self) -> None:
        if self.checkpoint is not None:
            self._ckpt.remove(self.path)


def _write_means(model: Any, tokens: torch.Tensor, mask: torch.Tensor, labels: Sequence[str],
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Mean vector of each write over real tokens at positions >= 1 (float64)."""
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
    return {lab: s / max(n, 1) for lab, s in sums.items()}
