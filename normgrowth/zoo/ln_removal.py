"""LayerNorm removal by fine-tuning (Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning").

Each LayerNorm of a GPT-2 in turn (all ``ln_2`` layer by layer, then all ``ln_1``, then ``ln_f``) has
its per-token standard deviation replaced by a frozen scalar ``sigma_avg`` measured on training data
just before freezing, ``y = (x - mean(x)) / sigma_avg * w + b``, with fine-tuning steps after each
freeze. The result is stored in the published LN-free format: ``layer_norm_epsilon = 1e12`` and
``w_stored = w * 1e6 / sigma_avg``, so ``nn.LayerNorm`` computes
``(x - mean) * w_stored / sqrt(var + 1e12) ~ (x - mean) * w / sigma_avg``. Details: docs/zoo.md.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..errors import NormgrowthError
from .settings import ZooSettings
from .train import Progress, cosine_lr, make_optimizer, train_steps

LN_FREE_EPS = 1e12  # published LN-free storage: eps = 1e12, weights * 1e6 / sigma_avg
LN_FREE_SCALE = 1e6  # sqrt(LN_FREE_EPS)


class FrozenLayerNorm(nn.Module):
    """LayerNorm with a frozen scale: ``y = (x - mean(x)) / sigma * weight + bias``.

    ``sigma`` is ``sigma_avg`` at ordinary tokens and, at special tokens (``special`` mask: position 0 and
    every BOS/EOS token), ``(1 - phase) sigma_special + phase sigma_avg``; ``phase`` (a buffer, 1 by default,
    so that without a special sigma every token uses ``sigma_avg``) is raised to 1 during recovery, which
    phases the special scale out. The output is affine in the centred input: nothing divides by a
    token-dependent quantity. ``weight`` and ``bias`` are the original LN parameters (same Parameter
    objects, so an optimiser holding them keeps training them).
    """

    def __init__(self, ln: nn.LayerNorm, sigma_avg: float, sigma_special: Optional[float] = None):
        super().__init__()
        self.weight = ln.weight
        self.bias = ln.bias
        self.register_buffer("sigma_avg", torch.tensor(float(sigma_avg), dtype=torch.float32))
        special = sigma_avg if sigma_special is None else sigma_special
        self.register_buffer("sigma_special", torch.tensor(float(special), dtype=torch.float32))
        self.register_buffer("phase", torch.tensor(1.0 if sigma_special is None else 0.0))
        self.special: Optional[torch.Tensor] = None  # [batch, pos] bool, set per forward pass

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """The scale per token, shaped to broadcast against ``x``."""
        avg = self.sigma_avg.to(x.dtype)
        if self.special is None or float(self.phase) >= 1.0 or self.special.shape != x.shape[:-1]:
            return avg
        mixed = (1 - self.phase) * self.sigma_special + self.phase * self.sigma_avg
        return torch.where(self.special.unsqueeze(-1), mixed.to(x.dtype), avg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-1, keepdim=True)
        return centred / self.sigma(x) * self.weight + self.bias


def token_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token LayerNorm scale ``sqrt(var(x) + eps)`` (biased variance over the last dim), float32."""
    return torch.sqrt(x.float().var(dim=-1, unbiased=False) + eps)


def ln_free_storage_weight(weight: torch.Tensor, sigma_avg: float) -> torch.Tensor:
    """Stored gain of the published LN-free format: ``w * 1e6 / sigma_avg`` (used with eps = 1e12)."""
    return weight * (LN_FREE_SCALE / sigma_avg)


def ln_sites(n_layer: int) -> list[str]:
    """Removal order of the LayerNorms: ``h.i.ln_2`` for every layer, then ``h.i.ln_1``, then ``ln_f``."""
    return [f"h.{i}.ln_2" for i in range(n_layer)] + [f"h.{i}.ln_1" for i in range(n_layer)] + ["ln_f"]


def _get_site(model: nn.Module, site: str) -> nn.Module:
    return model.transformer.get_submodule(site)


def _set_site(model: nn.Module, site: str, module: nn.Module) -> None:
    parent, _, name = site.rpartition(".")
    setattr(model.transformer.get_submodule(parent) if parent else model.transformer, name, module)


def measure_sigma_avg(model: nn.Module, site: str, batches: list[torch.Tensor]) -> float:
    """``sigma_avg`` of the LayerNorm at ``site``: mean over all tokens of ``batches`` of
    ``sqrt(var(x) + eps)`` of its input ``x`` (every position, BOS included; float64 sum)."""
    ln = _get_site(model, site)
    eps = float(getattr(ln, "eps", 0.0))
    total, count = 0.0, 0

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal total, count
        std = token_std(args[0].detach(), eps)
        total += float(std.sum(dtype=torch.float64))
        count += std.numel()

    handle = ln.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        handle.remove()
        model.train(was_training)
    return total / count


def special_mask(ids: torch.Tensor, special_id: Optional[int]) -> torch.Tensor:
    """Tokens that get the special scale: position 0 and every ``special_id`` (BOS = EOS) token."""
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    mask[:, 0] = True
    if special_id is not None:
        mask |= ids == special_id
    return mask


def measure_sigmas(model: nn.Module, sites: list[str], batches: list[torch.Tensor], special_id: Optional[int]
                   ) -> dict[str, tuple[float, float]]:
    """``{site: (sigma_avg, sigma_special)}`` of every LayerNorm in ``sites`` from one set of passes over
    ``batches``: the mean of ``sqrt(var(x) + eps)`` of the LN input over ordinary tokens, and over the
    special tokens of :func:`special_mask` (float64 sums)."""
    sums = {site: [0.0, 0, 0.0, 0] for site in sites}
    current: list[torch.Tensor] = []
    handles = []
    for site in sites:
        ln = _get_site(model, site)
        eps = float(getattr(ln, "eps", 0.0))

        def hook(module: nn.Module, args: tuple, site: str = site, eps: float = eps) -> None:
            std = token_std(args[0].detach(), eps).double()
            mask = current[0]
            acc = sums[site]
            acc[0] += float(std[~mask].sum())
            acc[1] += int((~mask).sum())
            acc[2] += float(std[mask].sum())
            acc[3] += int(mask.sum())
        handles.append(ln.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                current[:] = [special_mask(batch, special_id)]
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {site: (a / max(n, 1), b / max(m, 1)) for site, (a, n, b, m) in sums.items()}


def _set_special(model: nn.Module, mask: Optional[torch.Tensor]) -> None:
    for m in model.modules():
        if isinstance(m, FrozenLayerNorm):
            m.special = mask


def _set_phase(model: nn.Module, phase: float) -> None:
    for m in model.modules():
        if isinstance(m, FrozenLayerNorm):
            m.phase.fill_(phase)


def remove_layernorm(model: nn.Module, batches: Iterator[torch.Tensor], settings: ZooSettings,
                     progress: Optional[Progress] = None, *, special_id: Optional[int] = None,
                     keep_ln: bool = False, on_site: Optional[Callable[[int, str, nn.Module], None]] = None,
                     sigmas_out: Optional[dict] = None) -> dict[str, float]:
    """Freeze every LayerNorm of a GPT-2 ``model`` in place, one site at a time (:func:`ln_sites`).

    ``settings.sigma_before_removal``: every site's scale is measured once, on ``sigma_batches`` batches of
    the unmodified model (else each just before its freeze, with earlier sites frozen, every token
    counted). ``settings.special_sigma`` (with ``special_id``): position 0 and BOS/EOS tokens get their own
    ``sigma_special``, phased out linearly over the recovery steps (ordinary ``sigma_avg`` at the end).
    After each freeze ``ln_removal_steps_per_site`` AdamW steps at the constant ``ln_removal_lr``; after the
    last site ``recovery_steps`` more (cosine to lr/10). ``keep_ln`` runs the same schedule (same batches,
    steps, learning rates) without freezing anything: the control. ``on_site(k, site, model)`` is called
    after each site's steps. Returns ``{site: sigma_avg}``; ``sigmas_out`` (a dict) receives
    ``{site: (sigma_avg, sigma_special or None)}``.
    """
    opt = make_optimizer(model, settings.ln_removal_lr, settings.weight_decay)
    sigmas: dict[str, float] = {}
    sites = ln_sites(len(model.transformer.h))
    for site in sites:
        if not isinstance(_get_site(model, site), nn.LayerNorm):
            raise NormgrowthError(f"site {site} is not a LayerNorm ({type(_get_site(model, site)).__name__}): LN "
                                  "removal needs an ordinary GPT-2 model.")
    special = settings.special_sigma and special_id is not None
    measured: dict[str, tuple[float, float]] = {}
    if settings.sigma_before_removal:
        measured = measure_sigmas(model, sites, [next(batches) for _ in range(max(1, settings.sigma_batches))],
                                  special_id if special else None)
    hook = None
    if special and not keep_ln:
        hook = model.register_forward_pre_hook(
            lambda module, args, kwargs: _set_special(module, special_mask(
                args[0] if args else kwargs["input_ids"], special_id)), with_kwargs=True)
    try:
        for k, site in enumerate(sites):
            ln = _get_site(model, site)
            if settings.sigma_before_removal:
                sigma, sigma_special = measured[site]
            else:
                sigma = measure_sigma_avg(model, site, [next(batches) for _ in range(max(1, settings.sigma_batches))])
                sigma_special = None
            sigmas[site] = sigma
            if sigmas_out is not None:
                sigmas_out[site] = (sigma, sigma_special if special else None)
            if not keep_ln:
                _set_site(model, site, FrozenLayerNorm(ln, sigma, sigma_special if special else None))
            loss = train_steps(model, opt, batches, settings.ln_removal_steps_per_site,
                               lambda s: settings.ln_removal_lr)
            if progress is not None and (k % max(1, len(sites) // 6) == 0 or k == len(sites) - 1):
                what = "kept" if keep_ln else "froze"
                progress(f"zoo: {what} {site} ({k + 1}/{len(sites)}) sigma_avg={sigma:.3g} loss {loss:.3f}")
            if on_site is not None:
                on_site(k, site, model)
        if settings.recovery_steps:
            n = settings.recovery_steps

            def lr_at(s: int) -> float:
                _set_phase(model, (s + 1) / n)  # special scales reach sigma_avg at the last step
                return cosine_lr(s, n, settings.ln_removal_lr, 0)

            train_steps(model, opt, batches, n, lr_at, progress, "control recovery" if keep_ln else
                        "LN-free recovery", math.ceil(n / 2))
        _set_phase(model, 1.0)
    finally:
        if hook is not None:
            hook.remove()
        _set_special(model, None)
    return sigmas


def to_ln_free_storage(model: nn.Module) -> nn.Module:
    """A plain ``GPT2LMHeadModel`` equal to ``model`` (all LayerNorms frozen) in the published LN-free
    format: config ``layer_norm_epsilon = 1e12`` and each gain ``w * 1e6 / sigma_avg`` (bias unchanged)."""
    from transformers import GPT2LMHeadModel

    frozen = {name: m for name, m in model.transformer.named_modules() if isinstance(m, FrozenLayerNorm)}
    left = [name for name, m in model.transformer.named_modules() if isinstance(m, nn.LayerNorm)]
    if left:
        raise NormgrowthError(f"LayerNorms {left} are not frozen yet: run remove_layernorm first.")
    unphased = [name for name, m in frozen.items() if float(m.phase) < 1.0]
    if unphased:
        raise NormgrowthError(f"LayerNorms {unphased} still use a special scale: finish remove_layernorm first.")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.layer_norm_epsilon = LN_FREE_EPS
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith((".sigma_avg", ".sigma_special", ".phase")):
            continue
        prefix, _, leaf = key.rpartition(".")
        sub = prefix[len("transformer."):] if prefix.startswith("transformer.") else None
        if sub in frozen and leaf == "weight":
            value = ln_free_storage_weight(value, float(frozen[sub].sigma_avg))
        state[key] = value.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = GPT2LMHeadModel(config)
    stored.load_state_dict(state, strict=True)
    stored.eval()
    return stored
