"""Streaming norm collectors: hooks that reduce each activation to per-token scalars at once.

For every requested (site, layer) a hook turns the activation ``x [batch, pos, d_model]`` into three
per-token numbers, in float32 whatever the model's dtype:

* ``||x||`` (L2 norm), ``||x - mean(x)||`` (centred norm: what LayerNorm divides by, times sqrt(d)),
* ``std(x) = ||x - mean(x)|| / sqrt(d_model)`` (population std over the d_model entries).

Per-head write norms ``||z_h W_O^h||`` come from ``attn.hook_z`` with the per-layer Gram matrices
``G_h = W_O^h W_O^h^T`` (``[n_heads, d_head, d_head]``): ``||z_h W_O^h||^2 = z_h G_h z_h^T``, so no
``[batch, pos, head, d_model]`` tensor is ever built. The MLP activation rate of a token is the fraction
of its pre-activation entries that are > 0 (:func:`mlp_active_fraction`).

The per-token numbers of one batch (``[K, batch, pos]``, a few floats per token) are then folded into
:class:`normgrowth.stats.TokenStats`; nothing of size ``d_model`` outlives its hook.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from . import __version__
from . import resume as ckpt
from . import distributed
from .resume import Checkpoint
from .data import TokenBatch, as_token_batch, iter_batches
from .errors import NonFiniteNormError, NormgrowthError
from .models import LoadedModel
from .results import EMBED_SITES, SITES, HeadStats, Results, RunMeta, SiteStats, token_batch_hash
from .stats import TokenStats, hist_quantile

DEFAULT_SITES = SITES
METRICS = ("norm", "centered", "std")  # per-token numbers kept for every (site, layer)


def norm_metrics(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [3, ...]: ||x||, ||x - mean(x)||, std(x) = ||x - mean(x)|| / sqrt(d), in float32.

    Two passes (mean, then the norm of x - mean): exact however large the mean is. (``var_mean`` is
    ~8x slower on CPU; ||x||^2 - d mean^2 would cancel.)
    """
    x = x.float()
    centered = torch.linalg.vector_norm(x - x.mean(-1, keepdim=True), dim=-1)
    return torch.stack([torch.linalg.vector_norm(x, dim=-1), centered, centered / math.sqrt(x.shape[-1])])


def mlp_active_fraction(pre: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[..., d_mlp] -> [...]: the fraction of entries > 0 (a NaN entry is not > 0), in float32.

    relu(x).sign() is 1 exactly where x > 0 and 0 elsewhere (NaN included); summing it is about 2x
    faster on the CPU than (x > 0).sum. ``out`` receives the result.
    """
    positive = torch.relu(pre).sign_()
    return torch.sum(positive, -1, dtype=torch.float32, out=out).div_(pre.shape[-1])


def head_write_norms(z: torch.Tensor, wo_gram: torch.Tensor) -> torch.Tensor:
    """||z_h W_O^h|| per head: sqrt(z_h G_h z_h^T) with G_h = W_O^h W_O^h^T.

    z [batch, pos, n_heads, d_head], wo_gram [n_heads, d_head, d_head] -> [n_heads, batch, pos] (float32).
    """
    z = z.float()
    sq = torch.einsum("bphd,hde,bphe->hbp", z, wo_gram, z)
    return sq.clamp(min=0).sqrt()


def wo_gram_matrices(w_o: torch.Tensor) -> torch.Tensor:
    """W_O [n_layers, n_heads, d_head, d_model] -> G [n_layers, n_heads, d_head, d_head] in float32."""
    w = w_o.float()
    return torch.einsum("lhdm,lhem->lhde", w, w)


_FORWARD_RANK = {"embed": -2, "pos_embed": -1, "resid_pre": 0, "head_write": 1, "attn_out": 2, "resid_mid": 3,
                 "mlp_act_rate": 4, "mlp_out": 5, "resid_post": 6}


def _forward_order(site: str, layer: int) -> tuple[int, int]:
    """Sort key: where (site, layer) is computed in the forward pass."""
    return (layer if site not in ("embed", "pos_embed") else -1, _FORWARD_RANK[site])


@dataclass
class _Series:
    """Where one (site, layer)'s rows live in the per-batch value buffer."""

    site: str
    layer: int
    row: int  # first of len(METRICS) rows


class NormCollector:
    """Owns the hooks and the streaming statistics of one collection run.

    Usage: ``with model.hooks(c.hooks()): model.forward(...)`` then ``c.end_batch(mask)`` per batch,
    and ``c.results(...)`` at the end. :func:`collect` does all of this.
    """

    def __init__(self, model: LoadedModel, sites: Sequence[str], heads: bool, act_rate: bool, n_positions: int,
                 one_pass: Optional[bool] = None, expected_sequences: int = 0):
        """``one_pass``: per-token norms from ``var_mean`` (one read of each activation; the default on
        GPUs, where it is one kernel) instead of two exact passes (the default on the CPU, where
        ``var_mean`` is ~8x slower than a norm). Both are exact up to float32 rounding."""
        self.model = model
        self.sites = [s for s in sites if model.has_site(s)]
        self.series: list[_Series] = []
        row = 0
        # norm series first (they get histograms and log-means), then heads, then activation rates
        for site in [s for s in EMBED_SITES if model.has_site(s)]:
            self.series.append(_Series(site, 0, row))
            row += len(METRICS)
        for site in self.sites:
            for layer in range(model.n_layers):
                self.series.append(_Series(site, layer, row))
                row += len(METRICS)
        self.n_norm_rows = row
        self.head_row = row
        if heads:
            row += model.n_layers * model.n_heads
            w_o = model.stacked_weights(["W_O"])["W_O"]
            self.wo_gram = wo_gram_matrices(w_o)  # on the weights' device(s)
        self.heads = heads
        self.act_row = row
        self.act_rate = act_rate and model.has_site("mlp_pre")  # a mixture of experts has no mlp_pre
        if self.act_rate:
            row += model.n_layers
        self.n_rows = row
        self.n_positions = n_positions
        self.device = model.input_device
        self.one_pass = self.device.type == "cuda" if one_pass is None else bool(one_pass)
        self.stats = self.new_stats(expected_sequences)
        self._values: Optional[torch.Tensor] = None  # this batch's [K, b, p] values (None: no hook fired yet)
        self._spare: Optional[torch.Tensor] = None  # last batch's buffer, reused (no allocation per batch)
        self._filled = torch.zeros(row, dtype=torch.bool)
        self._last_post: Optional[tuple] = None  # (layer, weakref to resid_post, its row) of this batch

    def new_stats(self, expected_sequences: int = 0) -> TokenStats:
        """Empty accumulators for this collector's series."""
        return TokenStats(self.n_rows, self.n_positions, self.device, hist_series=self.n_norm_rows,
                          log_series=self.n_norm_rows, expected_sequences=expected_sequences)

    # ----- hooks --------------------------------------------------------------------------------
    def hooks(self) -> list[tuple[str, Optional[int], Callable]]:
        hooks: list[tuple[str, Optional[int], Callable]] = []
        for s in self.series:
            hooks.append((s.site, s.layer if s.site not in EMBED_SITES else None, self._norm_hook(s.site, s.layer, s.row)))
        if self.heads:
            for layer in range(self.model.n_layers):
                hooks.append(("z", layer, self._head_hook(layer)))
        if self.act_rate:
            for layer in range(self.model.n_layers):
                hooks.append(("mlp_pre", layer, self._act_hook(layer)))
        return hooks

    def _buffer(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        if self._values is None:  # first hook of a batch: reuse last batch's buffer when the shape matches
            keep = self._spare is not None and self._spare.shape[1:] == shape[:2]
            self._values = self._spare if keep else torch.empty(self.n_rows, shape[0], shape[1],
                                                                  dtype=torch.float32, device=self.device)
            self._spare = None
        return self._values

    # The hooks write raw per-token values straight into the batch buffer (``out=`` where the
    # activation is on the buffer's device) and leave what is cheaper to do once per batch over all
    # rows to :meth:`_finish_rows`: std = centred / sqrt(d) and the sqrt of the squared head norms. No
    # hook synchronises with the device.
    def _norm_hook(self, site: str, layer: int, row: int) -> Callable:
        def hook(x: torch.Tensor) -> None:
            buf = self._buffer(x.shape, x.device)
            if site == "resid_pre" and self._reuse_post(layer, x, buf, row):
                return
            xf = x.float()  # a no-op for float32 models; half precision is normed in float32
            if self.one_pass:  # raw rows: mean, population variance (one read of x)
                var, mean = torch.var_mean(xf, dim=-1, correction=0)
                buf[row] = mean.to(buf.device)
                buf[row + 1] = var.to(buf.device)
            elif x.device == buf.device:  # rows: ||x||, ||x - mean|| (exact two-pass)
                torch.linalg.vector_norm(xf, dim=-1, out=buf[row])
                torch.linalg.vector_norm(xf - xf.mean(-1, keepdim=True), dim=-1, out=buf[row + 1])
            else:  # a layer on another device (device_map)
                buf[row] = torch.linalg.vector_norm(xf, dim=-1).to(buf.device)
                buf[row + 1] = torch.linalg.vector_norm(xf - xf.mean(-1, keepdim=True), dim=-1).to(buf.device)
            self._filled[row:row + len(METRICS)] = True  # the third row is derived in _finish_rows
            if site == "resid_post":
                self._last_post = (layer, weakref.ref(x), row)

        return hook

    def _reuse_post(self, layer: int, x: torch.Tensor, buf: torch.Tensor, row: int) -> bool:
        """resid_pre of block l+1 is the very tensor that left block l: copy its two norm rows."""
        last = self._last_post
        if last is None or last[0] != layer - 1 or last[1]() is not x:
            return False
        post_row = last[2]
        buf[row:row + 2] = buf[post_row:post_row + 2]
        self._filled[row:row + len(METRICS)] = True
        return True

    def _head_hook(self, layer: int) -> Callable:
        row = self.head_row + layer * self.model.n_heads

        def hook(z: torch.Tensor) -> None:
            if z.dim() == 3:  # [batch, pos, n_heads * d_head] in some adapters
                z = z.view(*z.shape[:2], self.model.n_heads, -1)
            buf = self._buffer(z.shape, z.device)
            gram = self.wo_gram[layer].to(z.device)
            zf = z.float()
            sq = torch.einsum("bphd,hde->bphe", zf, gram).mul_(zf).sum(-1)  # z_h G_h z_h^T, one temporary
            buf[row:row + self.model.n_heads] = sq.permute(2, 0, 1).to(buf.device)
            self._filled[row:row + self.model.n_heads] = True

        return hook

    def _act_hook(self, layer: int) -> Callable:
        row = self.act_row + layer

        def hook(pre: torch.Tensor) -> None:
            buf = self._buffer(pre.shape, pre.device)
            if pre.device == buf.device:
                mlp_active_fraction(pre, out=buf[row])
            else:
                buf[row] = mlp_active_fraction(pre).to(buf.device)
            self._filled[row] = True

        return hook

    def _finish_rows(self, values: torch.Tensor) -> None:
        """Once per batch, over all rows at once: norm rows and the sqrt of squared head norms."""
        n_series = self.n_norm_rows // len(METRICS)
        if n_series:
            d = self.model.d_model
            rows = values[:self.n_norm_rows].view(n_series, len(METRICS), *values.shape[1:])
            if self.one_pass:  # (mean, var) -> ||x|| = sqrt(d (var + mean^2)), ||x - mean|| = sqrt(d var)
                mean, var = rows[:, 0].clone(), rows[:, 1]
                torch.sqrt(var, out=rows[:, 2])  # std
                torch.mul(rows[:, 2], math.sqrt(d), out=rows[:, 1])
                torch.sqrt(mean.square_().add_(rows[:, 2].square()).mul_(d), out=rows[:, 0])
            else:
                torch.mul(rows[:, 1], 1.0 / math.sqrt(d), out=rows[:, 2])
        if self.heads:
            values[self.head_row:self.act_row].clamp_(min=0).sqrt_()

    # ----- per batch ------------------------------------------------------------------------------
    def end_batch(self, valid: torch.Tensor) -> None:
        """Fold this batch's per-token values into the streaming statistics; check for inf/NaN first."""
        values = self._values
        self._last_post = None
        if values is None or not bool(self._filled.all()):
            missing = [self.row_label(int(i)) for i in torch.nonzero(~self._filled).flatten()[:3]]
            raise RuntimeError(f"hooks did not fire for {missing}: the bridge's hook layout changed")
        self._finish_rows(values)
        valid = valid.to(values.device)
        bad = (~torch.isfinite(values) & valid[None]).sum((1, 2))
        if bool(bad.any()):
            rows = [int(r) for r in torch.nonzero(bad).flatten()]
            row = min(rows, key=lambda r: _forward_order(*self.row_label(r)))  # the first to overflow
            site, layer = self.row_label(row)
            raise NonFiniteNormError(site, layer, int(bad[row]), str(self.model.dtype).replace("torch.", ""))
        self.stats.update(values, valid)
        self._spare, self._values = values, None
        self._filled[:] = False

    def row_label(self, row: int) -> tuple[str, int]:
        if row < self.n_norm_rows:
            s = self.series[row // len(METRICS)]
            return s.site, s.layer
        if row < self.act_row:
            return "head_write", (row - self.head_row) // self.model.n_heads
        return "mlp_act_rate", row - self.act_row

    # ----- read-out -------------------------------------------------------------------------------
    def site_stats(self, rows: list[int]) -> SiteStats:
        st = self.stats
        norm = np.array(rows)
        cen = norm + 1
        std = norm + 2
        mean = st.main.mean.cpu().numpy()
        var = st.main.variance().cpu().numpy()
        bos_mean = st.bos.mean.cpu().numpy()
        bos_var = st.bos.variance().cpu().numpy()
        hist = st.hist_counts()
        seq = st.seq_means()
        pos = st.position_mean()
        log_mean = st.log_mean()
        return SiteStats(
            mean=mean[norm], std=np.sqrt(var[norm]), centered_mean=mean[cen], centered_std=np.sqrt(var[cen]),
            token_std_mean=mean[std], log_mean=log_mean[norm], median=hist_quantile(hist[norm], 0.5),
            centered_median=hist_quantile(hist[cen], 0.5), bos_mean=bos_mean[norm],
            bos_centered_mean=bos_mean[cen], bos_std=np.sqrt(bos_var[norm]), position_mean=pos[norm],
            seq_mean=seq[:, norm], seq_centered_mean=seq[:, cen], hist=hist[norm],
        )

    def results(self, batch: TokenBatch, batch_size: int, seq_len: Optional[int]) -> Results:
        m = self.model
        sites: dict[str, Optional[SiteStats]] = {}
        for site in DEFAULT_SITES:
            rows = [s.row for s in self.series if s.site == site]
            sites[site] = self.site_stats(rows) if rows else None
        embed = {s.site: self.site_stats([s.row]) for s in self.series if s.site in EMBED_SITES}
        st = self.stats
        heads = None
        if self.heads:
            sl = slice(self.head_row, self.head_row + m.n_layers * m.n_heads)
            shape = (m.n_layers, m.n_heads)
            heads = HeadStats(
                mean=st.main.mean[sl].cpu().numpy().reshape(shape),
                std=np.sqrt(st.main.variance()[sl].cpu().numpy()).reshape(shape),
                bos_mean=st.bos.mean[sl].cpu().numpy().reshape(shape),
                seq_mean=st.seq_means()[:, sl].reshape(-1, *shape),
            )
        act = st.main.mean[self.act_row:self.act_row + m.n_layers].cpu().numpy() if self.act_rate else None
        meta = RunMeta(
            model=m.spec, revision=m.revision, architecture=m.architecture, family=m.family,
            dtype=str(m.dtype).replace("torch.", ""), device=str(self.device), ln_free=m.ln_free,
            normalization=m.normalization, n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads,
            d_head=m.d_head, parallel_blocks=m.parallel_blocks, n_seqs=len(batch), n_tokens=st.count,
            n_bos_tokens=st.bos_count, data_source=batch.source, seq_len=seq_len, batch_size=batch_size,
            sites=list(self.sites), version=__version__, norm_placement=m.norm_placement, source=m.source,
            token_hash=token_batch_hash(batch.tokens.cpu().numpy(), batch.attention_mask.cpu().numpy()),
        )
        return Results(meta=meta, sites=sites, embed=embed, heads=heads, mlp_act_rate=act,
                       seq_n_tokens=st.seq_counts(), position_count=st.pos_count.cpu().numpy())


def collect(model: LoadedModel, data: Any, batch_size: int = 8, sites: Sequence[str] = DEFAULT_SITES,
            heads: bool = True, act_rate: bool = True, seq_len: Optional[int] = None,
            progress: Optional[Callable[[int, int], None]] = None, *, attention_mask: Any = None,
            n_seqs: Optional[int] = None, checkpoint: Optional[Checkpoint] = None) -> Results:
    """Run ``model`` over ``data`` and return streamed norm statistics (see the module docstring).

    ``data``: a :class:`~normgrowth.data.TokenBatch`; token ids ``[n_seqs, seq_len]`` as a torch tensor
    or numpy array (``attention_mask`` of the same shape optional, left or right padding); a list of
    strings (tokenised with the model's tokenizer, BOS prepended); or a source name / path that
    :func:`~normgrowth.data.load_tokens` reads. ``n_seqs`` / ``seq_len`` keep the first sequences /
    positions. ``sites`` may be any subset of :data:`DEFAULT_SITES`; sites not asked for, or that the
    architecture lacks (``resid_mid`` in parallel blocks), are reported as None.
    ``progress(n_done, n_total)`` is called after each batch with this process's sequence counts.

    ``checkpoint``: save the accumulators every ``checkpoint.every`` batches and resume from a saved
    checkpoint of the same run (:mod:`normgrowth.resume`); it is removed once the results are built.
    Under ``torchrun`` each rank collects a contiguous block of whole batches and every rank returns
    the merged results of all ranks (:mod:`normgrowth.distributed`).
    """
    unknown = [s for s in sites if s not in DEFAULT_SITES]
    if unknown:
        raise NormgrowthError(f"unknown site(s) {unknown}: choose from {', '.join(DEFAULT_SITES)}.")
    if batch_size < 1:
        raise NormgrowthError(f"batch size must be at least 1, got {batch_size}.")
    batch = as_token_batch(data, model, attention_mask=attention_mask, n_seqs=n_seqs, seq_len=seq_len)
    rank, world_size = distributed.world()
    lo, hi = distributed.shard_batches(len(batch), batch_size, rank, world_size)
    collector = NormCollector(model, sites, heads, act_rate, n_positions=batch.tokens.shape[1],
                              expected_sequences=hi - lo)
    collector.stats.first_sequence = lo
    done = 0  # sequences of this rank's block [lo, hi) folded in
    path, ident = None, {}
    if checkpoint is not None:
        path = checkpoint.path(rank, world_size)
        ident = ckpt.identity(checkpoint.key, kind="collection", batch_size=batch_size, block=[lo, hi],
                              n_sequences=len(batch), sites=list(sites), heads=heads, act_rate=act_rate)
        saved, state, why = ckpt.load(path, ident)
        if state is not None:
            try:
                collector.stats.load_state_dict(state)
                done = saved
                checkpoint.say(f"resuming at sequence {lo + done} of {len(batch)}" if world_size == 1 else
                               f"rank {rank}: resuming at sequence {lo + done} of {lo}..{hi}")
            except (KeyError, ValueError):  # same identity but other shapes: a foreign file
                collector.stats = collector.new_stats(hi - lo)
                collector.stats.first_sequence = lo
                why = "with other shapes"
        if why:
            checkpoint.say(f"ignoring checkpoint {path} {why}; starting afresh")
    if progress is not None and done:
        progress(done, hi - lo)
    error: Optional[BaseException] = None
    try:
        every = None if checkpoint is None else checkpoint.every
        started, n_batches = time.perf_counter(), 0
        with torch.inference_mode(), model.hooks(collector.hooks()):
            for _, tokens, mask in iter_batches(batch.tokens[lo + done:hi], batch.attention_mask[lo + done:hi],
                                                batch_size):
                model.forward(tokens, attention_mask=mask, logits=False)  # the stream only: no unembedding
                collector.end_batch(mask)
                done += tokens.shape[0]
                n_batches += 1
                if checkpoint is not None:
                    if every is None:
                        every = ckpt.batches_between((time.perf_counter() - started) / n_batches)
                    if n_batches % every == 0 and lo + done < hi:
                        ckpt.save(path, ident, done, collector.stats.state_dict())
                if progress is not None:
                    progress(done, hi - lo)
    except Exception as err:  # shared with the other ranks before raising (no rank left waiting)
        error = err
    distributed.raise_on_any_rank(error, world_size)
    distributed.merge_token_stats(collector.stats)
    results = collector.results(batch, batch_size, seq_len)
    if path is not None:
        ckpt.remove(path)
    return results
