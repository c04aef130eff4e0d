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
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import NormgrowthError
from .settings import ZooSettings
from .train import Progress, cosine_lr, make_optimizer, train_steps

LN_FREE_EPS = 1e12  # published LN-free storage: eps = 1e12, weights * 1e6 / sigma_avg
LN_FREE_SCALE = 1e6  # sqrt(LN_FREE_EPS)


class FrozenLayerNorm(nn.Module):
    """LayerNorm with a frozen scale: ``y = (x - mean(x)) / sigma_avg * weight + bias``.

    ``sigma_avg`` is a constant scalar buffer, so the output is affine in the centred input: nothing
    divides by a token-dependent quantity. ``weight`` and ``bias`` are the original LN parameters
    (same Parameter objects, so an optimiser holding them keeps training them).
    """

    def __init__(self, ln: nn.LayerNorm, sigma_avg: float):
        super().__init__()
        self.weight = ln.weight
        self.bias = ln.bias
        self.register_buffer("sigma_avg", torch.tensor(float(sigma_avg), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-1, keepdim=True)
        return centred / self.sigma_avg.to(x.dtype) * self.weight + self.bias


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


def remove_layernorm(model: nn.Module, batches: Iterator[torch.Tensor], settings: ZooSettings,
                     progress: Optional[Progress] = None) -> dict[str, float]:
    """Freeze every LayerNorm of a GPT-2 ``model`` in place, one site at a time (:func:`ln_sites`).

    For each site: measure ``sigma_avg`` on ``settings.sigma_batches`` batches, swap the LayerNorm for
    :class:`FrozenLayerNorm`, then fine-tune ``ln_removal_steps_per_site`` steps at the constant
    ``ln_removal_lr``; after the last site fine-tune ``recovery_steps`` more (cosine to lr/10).
    Returns ``{site: sigma_avg}``.
    """
    opt = make_optimizer(model, settings.ln_removal_lr, settings.weight_decay)
    sigmas: dict[str, float] = {}
    sites = ln_sites(len(model.transformer.h))
    for k, site in enumerate(sites):
        ln = _get_site(model, site)
        if not isinstance(ln, nn.LayerNorm):
            raise NormgrowthError(f"site {site} is not a LayerNorm ({type(ln).__name__}): LN removal needs an "
                                  "ordinary GPT-2 model.")
        sigma = measure_sigma_avg(model, site, [next(batches) for _ in range(max(1, settings.sigma_batches))])
        sigmas[site] = sigma
        _set_site(model, site, FrozenLayerNorm(ln, sigma))
        loss = train_steps(model, opt, batches, settings.ln_removal_steps_per_site,
                           lambda s: settings.ln_removal_lr)
        if progress is not None and (k % max(1, len(sites) // 6) == 0 or k == len(sites) - 1):
            progress(f"zoo: froze {site} ({k + 1}/{len(sites)}) sigma_avg={sigma:.3g} loss {loss:.3f}")
    if settings.recovery_steps:
        train_steps(model, opt, batches, settings.recovery_steps,
                    lambda s: cosine_lr(s, settings.recovery_steps, settings.ln_removal_lr, 0),
                    progress, "LN-free recovery", math.ceil(settings.recovery_steps / 2))
    return sigmas


def to_ln_free_storage(model: nn.Module) -> nn.Module:
    """A plain ``GPT2LMHeadModel`` equal to ``model`` (all LayerNorms frozen) in the published LN-free
    format: config ``layer_norm_epsilon = 1e12`` and each gain ``w * 1e6 / sigma_avg`` (bias unchanged)."""
    from transformers import GPT2LMHeadModel

    frozen = {name: m for name, m in model.transformer.named_modules() if isinstance(m, FrozenLayerNorm)}
    left = [name for name, m in model.transformer.named_modules() if isinstance(m, nn.LayerNorm)]
    if left:
        raise NormgrowthError(f"LayerNorms {left} are not frozen yet: run remove_layernorm first.")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.layer_norm_epsilon = LN_FREE_EPS
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(".sigma_avg"):
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
