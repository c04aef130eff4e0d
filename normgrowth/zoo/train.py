"""Training and evaluation of the zoo's GPT-2 models on CPU: config, AdamW, schedule, losses, norms.

Deterministic for fixed settings: ``torch.manual_seed`` before the model is built and a seeded data
order (:func:`normgrowth.zoo.corpus.batch_stream`). Schedules and formulas: docs/zoo.md.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Collection, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..numerics import loglinear_slope
from .settings import ZooSettings

Progress = Callable[[str], Any]


def make_config(settings: ZooSettings, bos_id: int, vocab_size: int) -> Any:
    """``GPT2Config`` of the settings' shape, dropout 0, BOS = EOS = pad = ``bos_id``."""
    from transformers import GPT2Config

    return GPT2Config(n_layer=settings.n_layer, n_embd=settings.d_model, n_head=settings.n_head,
                      n_positions=settings.n_ctx, vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=bos_id, eos_token_id=bos_id, pad_token_id=bos_id,
                      architectures=["GPT2LMHeadModel"])


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95, eps 1e-8); weight decay on 2-D weight matrices only, not on the token
    and position embeddings (``wte``, ``wpe``, ``embed_tokens``; a tied output matrix is the embedding),
    biases or norm gains."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        embedding = any(key in name for key in ("wte", "wpe", "embed_tokens"))
        (decay if p.dim() == 2 and not embedding else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Learning rate at ``step`` (0-based): ``peak (step + 1) / warmup`` during warm-up, then
    ``peak (0.1 + 0.45 (1 + cos(pi f)))`` with ``f = (step - warmup) / (total - warmup)`` capped at 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterator[torch.Tensor], n_steps: int,
                lr_at: Callable[[int], float], progress: Optional[Progress] = None, label: str = "",
                report_every: int = 0, on_step: Optional[Callable[[int], Any]] = None,
                losses: Optional[list] = None, penalty: Optional[Callable[[], torch.Tensor]] = None,
                max_skipped: int = 0, skipped: Optional[list] = None, skip_steps: Collection[int] = ()) -> float:
    """Run ``n_steps`` AdamW steps on the next-token loss (gradient-norm clip 1.0, learning rate
    ``lr_at(step)``), plus ``penalty()`` (called after each forward pass, e.g. a :class:`.ln_removal.ScalePenalty`)
    when given; ``on_step(n)`` after the n-th step; every step's next-token loss is appended to ``losses``;
    return the mean next-token loss of the last 10 finite steps (NaN when there are none).

    A non-finite loss (next-token loss plus penalty) raises :class:`~normgrowth.errors.TrainingDiverged` naming
    the step and ``label`` (before that step's update), unless fewer than ``max_skipped`` steps were skipped
    so far: then the step makes no update and its number (1-based) is appended to ``skipped``. The steps in
    ``skip_steps`` (1-based) draw their batch, learning rate and loss but make no update either (a run that
    mirrors another run's skipped steps)."""
    from ..errors import TrainingDiverged

    model.train()
    recent: list[float] = []
    n_skipped = 0
    t0 = time.perf_counter()
    for step in range(n_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = next(batches)
        loss = model(batch, labels=batch).loss
        total = loss if penalty is None else loss + penalty()
        finite = bool(torch.isfinite(total))
        if not finite and n_skipped >= max_skipped:
            raise TrainingDiverged(float(total.detach()), step + 1, n_steps, label)
        opt.zero_grad(set_to_none=True)
        if finite and step + 1 not in skip_steps:
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            recent = (recent + [loss.item()])[-10:]
        else:
            n_skipped += not finite
            if skipped is not None:
                skipped.append(step + 1)
        if losses is not None:
            losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
            model.train()
        if progress is not None and report_every and ((step + 1) % report_every == 0 or step + 1 == n_steps):
            per_step = (time.perf_counter() - t0) / (step + 1)
            mean = sum(recent) / len(recent) if recent else float("nan")
            progress(f"zoo: {label} step {step + 1}/{n_steps} loss {mean:.3f} ({per_step:.2f} s/step"
                     + (f", {n_skipped} non-finite steps skipped)" if n_skipped else ")"))
    model.eval()
    return sum(recent) / len(recent) if recent else float("nan")


def checkpoint_steps(total: int, n: int) -> list[int]:
    """``n`` log-spaced steps from 0 to ``total``: 0, then ``round(geomspace(max(1, total / 100), total,
    n - 1))`` (duplicates dropped, so fewer when ``total`` is small)."""
    if n <= 0:
        return []
    if n == 1 or total < 1:
        return [0]
    inner = np.geomspace(max(1.0, total / 100), total, n - 1)
    return sorted({0, total, *(int(round(v)) for v in inner)})


def evaluate(model: nn.Module, data: torch.Tensor, batch_size: int = 16) -> dict[str, Any]:
    """One pass over ``data`` [n, n_ctx] with forward hooks on every block (:func:`.layout.blocks_of`):

    * ``loss``: mean next-token cross-entropy (nats) over every predicted position (float64 sum);
    * ``seq_loss``: the same mean per sequence, float64 ``[n_seqs]``;
    * ``seq_norms``: per sequence, the mean L2 norm of each block's output (resid_post) over positions >= 1,
      float64 ``[n_seqs, n_layer]`` (every sequence has the same length, so token weights are equal);
    * ``seq_pos0_norms``: per sequence, the position-0 resid_post L2 norm of each block, float64 ``[n_seqs, n_layer]``;
    * ``pos0_norms``: its mean over sequences, float64 [n_layer].
    """
    from .layout import blocks_of

    blocks = blocks_of(model)
    rows: list[np.ndarray] = []
    pos0: list[np.ndarray] = []
    seq_loss: list[np.ndarray] = []
    current = [np.zeros(0), np.zeros(0)]
    handles = []
    for i, block in enumerate(blocks):
        def hook(module: nn.Module, args: tuple, output: Any, i: int = i) -> None:
            hidden = (output[0] if isinstance(output, tuple) else output).float()
            current[0][:, i] = hidden[:, 1:].norm(dim=-1).double().mean(dim=1).cpu().numpy()
            current[1][:, i] = hidden[:, 0].norm(dim=-1).double().cpu().numpy()
        handles.append(block.register_forward_hook(hook))
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, data.shape[0], batch_size):
                batch = data[start:start + batch_size]
                current[0] = np.zeros((batch.shape[0], len(blocks)))
                current[1] = np.zeros((batch.shape[0], len(blocks)))
                logits = model(batch).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        batch[:, 1:].reshape(-1), reduction="none")
                per_row = nll.view(batch.shape[0], -1).double().sum(dim=1)
                total += float(per_row.sum())
                count += batch[:, 1:].numel()
                seq_loss.append((per_row / (batch.shape[1] - 1)).cpu().numpy())
                rows.append(current[0])
                pos0.append(current[1])
    finally:
        for h in handles:
            h.remove()
    seq_pos0 = np.concatenate(pos0, axis=0)
    return {"loss": total / count, "seq_loss": np.concatenate(seq_loss), "seq_norms": np.concatenate(rows, axis=0),
            "seq_pos0_norms": seq_pos0, "pos0_norms": seq_pos0.mean(axis=0)}


def evaluation_rows(ev: dict[str, Any], rows: Any) -> dict[str, Any]:
    """An :func:`evaluate` result restricted to ``rows`` (indices or a slice): the per-sequence arrays
    selected, ``loss`` the mean of the selected ``seq_loss`` (every sequence predicts the same number of
    tokens, so this is the mean over their predicted tokens) and ``pos0_norms`` their mean."""
    seq_loss = ev["seq_loss"][rows]
    seq_pos0 = ev["seq_pos0_norms"][rows]
    return {"loss": float(seq_loss.mean()), "seq_loss": seq_loss, "seq_norms": ev["seq_norms"][rows],
            "seq_pos0_norms": seq_pos0, "pos0_norms": seq_pos0.mean(axis=0)}


def heldout_loss(model: nn.Module, data: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of ``data`` [n, n_ctx]
    (:func:`evaluate`)."""
    return evaluate(model, data, batch_size)["loss"]


def resid_post_norms(model: nn.Module, data: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Mean L2 norm of each block's output (resid_post) over all non-position-0 tokens, float32 [n_layer].

    Every sequence has the same length, so this is the mean of :func:`resid_post_seq_norms` over sequences
    (float64 before the cast)."""
    return torch.from_numpy(resid_post_seq_norms(model, data, batch_size).mean(axis=0)).float()


def resid_post_seq_norms(model: nn.Module, data: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Per-sequence mean L2 norm of each block's output over positions >= 1, float64 ``[n_seqs, n_layer]``
    (:func:`evaluate`)."""
    return evaluate(model, data, batch_size)["seq_norms"]


def growth_per_layer(norms: Any) -> float:
    """Geometric growth per layer: ``exp(slope)`` of the least-squares line ``log norm_l = a + slope * l``
    over layers ``l = 0 .. L-1`` (:func:`normgrowth.numerics.loglinear_slope`, unweighted)."""
    y = np.asarray(norms.detach().cpu() if isinstance(norms, torch.Tensor) else norms, dtype=np.float64)
    return math.exp(loglinear_slope(np.arange(y.size), y))
