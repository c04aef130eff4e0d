"""Norm removal by fine-tuning (Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning"), for
any pre-norm model of :data:`.layout.LAYOUTS` (GPT-2 with LayerNorm; Llama, Mistral, Qwen2 with RMSNorm).

Each norm in turn (every block's MLP input norm layer by layer, then every attention input norm, then the
final norm) has its per-token scale ``s(x)`` replaced by a frozen scalar ``sigma_avg`` measured on training
data, with fine-tuning steps after each freeze: LayerNorm ``s(x) = sqrt(var(x) + eps)`` and
``y = (x - mean(x)) / sigma_avg * w + b``; RMSNorm ``s(x) = sqrt(mean(x^2) + eps)`` and
``y = x / sigma_avg * w``. The result is stored in the published LN-free format: eps = 1e12 and
``w_stored = w * 1e6 / sigma_avg``, so the ordinary norm module computes
``x_c * w_stored / sqrt(v + 1e12) ~ x_c * w / sigma_avg``. Details: docs/zoo.md.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Callable, Collection, Iterator, Optional, Union

import torch
from torch import nn

from ..errors import NormgrowthError
from .layout import GPT2_LAYOUT, NormLayout, blocks_of, is_rms_norm, layout_of, norm_eps
from .settings import RemovalSchedule, ZooSettings
from .train import Progress, cosine_lr, make_optimizer, train_steps

LN_FREE_EPS = 1e12  # published LN-free storage: eps = 1e12, weights * 1e6 / sigma_avg
LN_FREE_SCALE = 1e6  # sqrt(LN_FREE_EPS)


class FrozenLayerNorm(nn.Module):
    """A LayerNorm or RMSNorm with a frozen scale: ``y = (x - mean(x)) / sigma * weight + bias`` (LayerNorm) or
    ``y = x / sigma * weight`` (RMSNorm: ``centre`` False, no bias).

    ``sigma`` is ``sigma_avg`` at ordinary tokens. At special tokens (``special`` mask: position 0 and every
    separator token) it is ``(1 - phase) sigma_special + phase sigma_avg`` (measured special scale), or, with
    ``live`` (the twin of a trained model), ``s(x)^(1 - phase) sigma_avg^phase`` with ``s(x)`` the token's own
    scale (:func:`token_std`); with ``outlier_ratio`` r, a token whose ``s(x) > r sigma_avg`` counts as special
    too (live only: the massive activations of Llama-family models sit on tokens other than position 0).
    ``phase`` (a buffer, 1 by default, so that without a special scale every token uses ``sigma_avg``) is
    raised to 1 during recovery, which phases the special scale out; at phase 1 the output is affine in the
    centred input and nothing divides by a token-dependent quantity. ``weight`` and ``bias`` are the original
    norm parameters (same Parameter objects, so an optimiser holding them keeps training them).
    """

    def __init__(self, ln: nn.Module, sigma_avg: float, sigma_special: Optional[float] = None, *,
                 live: bool = False, outlier_ratio: Optional[float] = None):
        super().__init__()
        self.centre = not is_rms_norm(ln)
        self.eps = norm_eps(ln)
        self.weight = ln.weight
        self.bias = getattr(ln, "bias", None)
        self.live = live
        self.outlier_ratio = outlier_ratio if live else None
        self.register_buffer("sigma_avg", torch.tensor(float(sigma_avg), dtype=torch.float32))
        special = sigma_avg if sigma_special is None else sigma_special
        self.register_buffer("sigma_special", torch.tensor(float(special), dtype=torch.float32))
        self.register_buffer("phase", torch.tensor(0.0 if live or sigma_special is not None else 1.0))
        self.special: Optional[torch.Tensor] = None  # [batch, pos] bool, set per forward pass

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """The scale per token, shaped to broadcast against ``x``."""
        avg = self.sigma_avg.to(x.dtype)
        if float(self.phase) >= 1.0:
            return avg
        special = self.special if self.special is not None and self.special.shape == x.shape[:-1] else None
        if self.live:
            own = token_std(x, self.eps, self.centre).to(x.dtype)
            mask = own > self.outlier_ratio * avg if self.outlier_ratio else torch.zeros_like(own, dtype=torch.bool)
            if special is not None:
                mask = mask | special
            blended = torch.exp((1 - self.phase) * torch.log(own) + self.phase * torch.log(avg))
            return torch.where(mask, blended, avg).unsqueeze(-1)
        if special is None:
            return avg
        mixed = (1 - self.phase) * self.sigma_special + self.phase * self.sigma_avg
        return torch.where(special.unsqueeze(-1), mixed.to(x.dtype), avg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-1, keepdim=True) if self.centre else x
        y = centred / self.sigma(x) * self.weight
        return y if self.bias is None else y + self.bias


def token_std(x: torch.Tensor, eps: float, centre: bool = True) -> torch.Tensor:
    """Per-token norm scale, float32: LayerNorm ``sqrt(var(x) + eps)`` (biased variance over the last dim);
    RMSNorm (``centre`` False) ``sqrt(mean(x^2) + eps)``."""
    x = x.float()
    second = x.var(dim=-1, unbiased=False) if centre else x.pow(2).mean(dim=-1)
    return torch.sqrt(second + eps)


def ln_free_storage_weight(weight: torch.Tensor, sigma_avg: float) -> torch.Tensor:
    """Stored gain of the published LN-free format: ``w * 1e6 / sigma_avg`` (used with eps = 1e12)."""
    return weight * (LN_FREE_SCALE / sigma_avg)


def removal_order(layout: NormLayout, n_layer: int) -> list[str]:
    """Removal order of the norms (names below ``model.<base>``): every block's MLP input norm, then every
    attention input norm, then the final norm."""
    b = layout.blocks
    return ([f"{b}.{i}.{layout.mlp_norm}" for i in range(n_layer)]
            + [f"{b}.{i}.{layout.attn_norm}" for i in range(n_layer)] + [layout.final_norm])


def ln_sites(n_layer: int) -> list[str]:
    """Removal order of a GPT-2's LayerNorms: ``h.i.ln_2`` for every layer, then ``h.i.ln_1``, then ``ln_f``."""
    return removal_order(GPT2_LAYOUT, n_layer)


def norm_sites(model: nn.Module) -> list[str]:
    """Removal order of the norms of ``model`` (:func:`removal_order` of its layout): 2 L + 1 sites."""
    return removal_order(layout_of(model), len(blocks_of(model)))


def _get_site(model: nn.Module, site: str) -> nn.Module:
    return getattr(model, layout_of(model).base).get_submodule(site)


def _set_site(model: nn.Module, site: str, module: nn.Module) -> None:
    base = getattr(model, layout_of(model).base)
    parent, _, name = site.rpartition(".")
    setattr(base.get_submodule(parent) if parent else base, name, module)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or is_rms_norm(module)


def measure_sigma_avg(model: nn.Module, site: str, batches: list[torch.Tensor]) -> float:
    """``sigma_avg`` of the norm at ``site``: mean over all tokens of ``batches`` of :func:`token_std` of its
    input ``x`` (every position, BOS included; float64 sum)."""
    ln = _get_site(model, site)
    eps, centre = norm_eps(ln), not is_rms_norm(ln)
    total, count = 0.0, 0

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal total, count
        std = token_std(args[0].detach(), eps, centre)
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
    """``{site: (sigma_avg, sigma_special)}`` of every norm in ``sites`` from one set of passes over
    ``batches``: the mean of :func:`token_std` of the norm's input over ordinary tokens, and over the
    special tokens of :func:`special_mask` (float64 sums)."""
    sums = {site: [0.0, 0, 0.0, 0] for site in sites}
    current: list[torch.Tensor] = []
    handles = []
    for site in sites:
        ln = _get_site(model, site)
        eps, centre = norm_eps(ln), not is_rms_norm(ln)

        def hook(module: nn.Module, args: tuple, site: str = site, eps: float = eps, centre: bool = centre) -> None:
            std = token_std(args[0].detach(), eps, centre).double()
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


class ScalePenalty:
    """Auxiliary loss that holds every norm's input near the frozen scale that replaces (or would replace) it:

        P = weight / |S| * sum_sites 1/B * sum_{rows, tokens} relu(ln(s(x_t) / sigma_site) - ln m_t)^2

    with ``s`` the :func:`token_std` of the site's input ``x_t`` (gradients flow through it), ``sigma_site``
    the site's ordinary-token ``sigma_avg``, ``S`` the sites, ``B`` the rows of the batch, and the margin
    ``m_t`` = ``margin`` at ordinary tokens and ``special_margin`` (None: ``margin``) at the tokens of
    :func:`special_mask` (position 0 and ``special_id`` tokens). Tokens below ``m_t * sigma_site`` cost
    nothing; a massive activation costs ``(ln(ratio / m_t))^2`` per site it passes (position 0 of
    SmolLM2-135M, about 180 x sigma_avg: about 27 each at margin 1). It is the same for a live norm and a
    frozen one (the input is what it measures), so twin and control train on the same objective.

    Forward pre-hooks on the module at every site (:meth:`attach` re-hooks a site whose module was
    replaced) and on the model (the special mask of each batch). Terms accumulate only in passes with
    gradients enabled; calling the object returns the accumulated penalty (a 0-d tensor), appends its value
    to ``history`` and starts a new accumulation. Use it as a context manager: the hooks are removed on exit."""

    def __init__(self, model: nn.Module, sigmas: dict[str, float], weight: float, margin: float,
                 special_margin: Optional[float] = None, special_id: Optional[int] = None):
        self.model, self.weight = model, float(weight)
        self.log_sigma = {site: math.log(sigma) for site, sigma in sigmas.items()}
        self.log_margin = math.log(margin)
        self.log_special_margin = math.log(special_margin if special_margin is not None else margin)
        self.special_id = special_id
        self.log_margins: Optional[torch.Tensor] = None  # [batch, pos], set per forward pass
        self.terms: list[torch.Tensor] = []
        self.history: list[float] = []
        self.handles: dict[str, Any] = {}
        self.model_handle = model.register_forward_pre_hook(self._set_margins, with_kwargs=True)
        for site in sigmas:
            self.attach(site)

    def _set_margins(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        special = special_mask(ids, self.special_id)
        self.log_margins = torch.where(special, self.log_special_margin, self.log_margin).to(torch.float32)

    def attach(self, site: str) -> None:
        """Hook the module now at ``site`` (a norm or a :class:`FrozenLayerNorm`)."""
        if site in self.handles:
            self.handles.pop(site).remove()
        module = _get_site(self.model, site)
        if isinstance(module, FrozenLayerNorm):
            eps, centre = module.eps, module.centre
        else:
            eps, centre = norm_eps(module), not is_rms_norm(module)
        log_sigma = self.log_sigma[site]

        def hook(mod: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled():
                excess = torch.relu(torch.log(token_std(args[0], eps, centre)) - log_sigma - self.log_margins)
                self.terms.append(excess.pow(2).sum(dim=-1).mean())
        self.handles[site] = module.register_forward_pre_hook(hook)

    def __call__(self) -> torch.Tensor:
        value = self.weight * torch.stack(self.terms).sum() / len(self.log_sigma) if self.terms else torch.zeros(())
        self.terms = []
        self.history.append(float(value.detach()))
        return value

    def remove(self) -> None:
        for handle in [*self.handles.values(), self.model_handle]:
            handle.remove()
        self.handles.clear()
        self.terms = []

    def __enter__(self) -> "ScalePenalty":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _set_special(model: nn.Module, mask: Optional[torch.Tensor]) -> None:
    for m in model.modules():
        if isinstance(m, FrozenLayerNorm):
            m.special = mask


def _set_phase(model: nn.Module, phase: float) -> None:
    for m in model.modules():
        if isinstance(m, FrozenLayerNorm):
            m.phase.fill_(phase)


def block_phase(fraction: float, block: int, n_blocks: int, window: Optional[float]) -> float:
    """Phase of the special scale of the norms at ``block`` when ``fraction`` of the recovery is done.

    ``window`` None: every norm has phase ``fraction`` (all phased out together). Otherwise block by
    block from the embedding up: ``clip((fraction (n_blocks - 1 + window) - block) / window, 0, 1)``, so
    block ``b``'s phase rises from 0 to 1 while the fraction goes from ``b / (n_blocks - 1 + window)`` to
    ``(b + window) / (n_blocks - 1 + window)``: about ``window`` blocks are in transition at a time, every
    block below them is at phase 1 and every block above at 0; at fraction 1 every phase is 1. ``n_blocks``
    counts the final norm as a block of its own (the last)."""
    if window is None:
        return fraction
    return min(1.0, max(0.0, (fraction * (n_blocks - 1 + window) - block) / window))


def site_blocks(model: nn.Module) -> dict[str, int]:
    """``{site: block}`` for every norm site of ``model`` (:func:`norm_sites`): a block's attention and MLP
    input norms have its index, the final norm ``n_layer``."""
    layout = layout_of(model)
    n_layer = len(blocks_of(model))
    blocks = {f"{layout.blocks}.{i}.{name}": i for i in range(n_layer) for name in (layout.mlp_norm, layout.attn_norm)}
    return {site: blocks.get(site, n_layer) for site in norm_sites(model)}


def _set_phases(model: nn.Module, fraction: float, window: Optional[float]) -> None:
    """Set every frozen norm's phase to :func:`block_phase` of its block."""
    blocks = site_blocks(model)
    n_blocks = max(blocks.values()) + 1
    for site, block in blocks.items():
        module = _get_site(model, site)
        if isinstance(module, FrozenLayerNorm):
            module.phase.fill_(block_phase(fraction, block, n_blocks, window))


class ScheduleLog:
    """What one removal run consumed, in order: every batch drawn (first 16 hex digits of the sha256 of its
    int64 token ids, with the phase that drew it: ``sigma``, ``site <k>`` or ``recovery``) and the
    learning rate of every optimiser step. Twin and control must log the same lists."""

    def __init__(self) -> None:
        self.phase = "sigma"
        self.batches: list[list[str]] = []
        self.lrs: list[list[Any]] = []

    def batches_from(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for batch in batches:
            digest = hashlib.sha256(batch.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
            self.batches.append([self.phase, digest])
            yield batch

    def lr(self, lr_at: Callable[[int], float]) -> Callable[[int], float]:
        """``lr_at`` that also logs its value once per step (the training loop asks once per parameter group)."""
        logged_steps: set[int] = set()

        def logged(step: int) -> float:
            value = lr_at(step)
            if step not in logged_steps:
                logged_steps.add(step)
                self.lrs.append([self.phase, float(value)])
            return value
        return logged

    def to_json(self) -> dict:
        """``{"batches": [[phase, sha], ...], "lrs": [[phase, lr], ...], "n_steps", "sha256"}`` (``sha256``:
        first 16 hex digits over both lists as JSON)."""
        import json

        body = {"batches": self.batches, "lrs": self.lrs}
        digest = hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]
        return {**body, "n_steps": len(self.lrs), "sha256": digest}


def remove_layernorm(model: nn.Module, batches: Iterator[torch.Tensor],
                     settings: Union[RemovalSchedule, ZooSettings], progress: Optional[Progress] = None, *,
                     special_id: Optional[int] = None, keep_ln: bool = False,
                     on_site: Optional[Callable[[int, str, nn.Module], None]] = None,
                     sigmas_out: Optional[dict] = None, log: Optional[ScheduleLog] = None,
                     recovery_trace: Optional[list] = None, penalty_trace: Optional[list] = None,
                     skipped_out: Optional[list] = None, skip_steps: Collection[int] = ()) -> dict[str, float]:
    """Freeze every norm of ``model`` (a layout of :data:`LAYOUTS`) in place, one site at a time
    (:func:`norm_sites`).

    ``settings`` is a :class:`RemovalSchedule` (or ``ZooSettings``, whose ``removal`` is used).
    ``sigma_before_removal``: every site's scale is measured once, on ``sigma_batches`` batches of the
    unmodified model (else each just before its freeze, with earlier sites frozen, every token counted).
    ``special_sigma`` (with ``special_id``): position 0 and ``special_id`` tokens get their own
    ``sigma_special``, phased out linearly over the recovery steps (ordinary ``sigma_avg`` at the end);
    ``special_scale == "live"``: they (and, with ``outlier_ratio``, every token whose scale exceeds
    ``outlier_ratio * sigma_avg``) keep their own per-token scale, phased out geometrically
    (:class:`FrozenLayerNorm`).
    After each freeze ``steps_per_site`` AdamW steps at the constant ``lr``; after the last site
    ``recovery_steps`` more (cosine to lr/10), at step ``s`` with the special scale's phase
    :func:`block_phase` of ``(s + 1) / recovery_steps`` and ``phase_window``. ``keep_ln`` runs the same schedule (same batches, steps,
    learning rates) without freezing anything: the control. ``scale_penalty`` > 0 adds the
    :class:`ScalePenalty` (reference: the measured ``sigma_avg``) to every step's loss, for the twin and the
    control alike; ``penalty_trace`` (a list) receives its value at every step. ``on_site(k, site, model)``
    is called after each site's steps; ``log`` records the batches and learning rates; ``recovery_trace``
    (a list) receives ``[step, fraction of the recovery done, training loss]`` for every recovery step. The twin's
    recovery skips up to ``recovery_max_skipped`` steps whose loss is not finite (no update; their numbers go
    to ``skipped_out``); ``skip_steps`` (recovery steps, 1-based) make no update either, so that the control
    (``keep_ln``) can mirror the twin's skipped steps. Returns
    ``{site: sigma_avg}``; ``sigmas_out`` (a dict) receives ``{site: (sigma_avg, sigma_special or None)}``.
    A diverging fine-tuning raises :class:`~normgrowth.errors.TrainingDiverged` (the special-scale hook
    removed, the model left as it was before the failed step).
    """
    schedule: RemovalSchedule = getattr(settings, "removal", settings)
    log = log if log is not None else ScheduleLog()
    batches = log.batches_from(batches)
    sites = norm_sites(model)
    for site in sites:
        if not _is_norm(_get_site(model, site)):
            kind = type(_get_site(model, site)).__name__
            raise NormgrowthError(f"site {site} is not a LayerNorm or RMSNorm ({kind}):"
                                  " norm removal needs a model whose norms are all unfrozen.")
    if schedule.scale_penalty > 0 and not schedule.sigma_before_removal:
        raise NormgrowthError("the scale penalty needs every norm's scale measured before the removal "
                              "(sigma_before_removal).")
    opt = make_optimizer(model, schedule.lr, schedule.weight_decay)
    sigmas: dict[str, float] = {}
    special = schedule.special_sigma and special_id is not None
    measured: dict[str, tuple[float, float]] = {}
    log.phase = "sigma"
    if schedule.sigma_before_removal:
        measured = measure_sigmas(model, sites, [next(batches) for _ in range(max(1, schedule.sigma_batches))],
                                  special_id if special else None)
    penalty = (ScalePenalty(model, {site: measured[site][0] for site in sites}, schedule.scale_penalty,
                            schedule.scale_margin, schedule.special_scale_margin, special_id)
               if schedule.scale_penalty > 0 else None)
    hook = None
    if special and not keep_ln:
        hook = model.register_forward_pre_hook(
            lambda module, args, kwargs: _set_special(module, special_mask(
                args[0] if args else kwargs["input_ids"], special_id)), with_kwargs=True)
    try:
        for k, site in enumerate(sites):
            ln = _get_site(model, site)
            log.phase = "sigma"
            if schedule.sigma_before_removal:
                sigma, sigma_special = measured[site]
            else:
                sigma = measure_sigma_avg(model, site, [next(batches) for _ in range(max(1, schedule.sigma_batches))])
                sigma_special = None
            sigmas[site] = sigma
            if sigmas_out is not None:
                sigmas_out[site] = (sigma, sigma_special if special else None)
            if not keep_ln:
                live = schedule.special_scale == "live"
                frozen = FrozenLayerNorm(ln, sigma, sigma_special if special else None, live=live,
                                         outlier_ratio=schedule.outlier_ratio)
                _set_site(model, site, frozen.to(ln.weight.device))
                if penalty is not None:
                    penalty.attach(site)
            log.phase = f"site {k}"
            loss = train_steps(model, opt, batches, schedule.steps_per_site, log.lr(lambda s: schedule.lr),
                               label=f"{'kept' if keep_ln else 'froze'} {site}", penalty=penalty)
            if progress is not None and (k % max(1, len(sites) // 6) == 0 or k == len(sites) - 1):
                what = "kept" if keep_ln else "froze"
                progress(f"zoo: {what} {site} ({k + 1}/{len(sites)}) sigma_avg={sigma:.3g} loss {loss:.3f}")
            if on_site is not None:
                on_site(k, site, model)
        if schedule.recovery_steps:
            n = schedule.recovery_steps
            phase_at = lambda s: (s + 1) / n  # noqa: E731  (special scales reach sigma_avg at the last step)

            def lr_at(s: int) -> float:
                _set_phases(model, phase_at(s), schedule.phase_window)
                return cosine_lr(s, n, schedule.lr, 0)

            log.phase = "recovery"
            losses: list[float] = []
            try:
                train_steps(model, opt, batches, n, log.lr(lr_at), progress, "control recovery" if keep_ln else
                            "norm-free recovery", math.ceil(n / 2), losses=losses, penalty=penalty,
                            max_skipped=0 if keep_ln else schedule.recovery_max_skipped, skipped=skipped_out,
                            skip_steps=skip_steps)
            finally:
                if recovery_trace is not None:
                    recovery_trace.extend([s + 1, phase_at(s), loss] for s, loss in enumerate(losses))
        _set_phase(model, 1.0)
    finally:
        if hook is not None:
            hook.remove()
        _set_special(model, None)
        if penalty is not None:
            penalty.remove()
            if penalty_trace is not None:
                penalty_trace.extend(penalty.history)
    return sigmas


def first_runaway(model: nn.Module, row: torch.Tensor, ratio: float = 1e3) -> Optional[dict]:
    """Where a row's residual runs away in ``model`` (norms frozen at phase 1): the first norm site, in
    forward order, at which some token's scale ``s(x_t)`` (:func:`token_std`) exceeds ``ratio * sigma_avg``
    or is not finite, as ``{"site", "block", "position", "token_id", "ratio"}`` (the first such position;
    ``ratio`` None when not finite); None when no site has one. ``row``: token ids ``[n_ctx]``."""
    blocks = site_blocks(model)
    found: list[dict] = []
    handles = []
    for site in blocks:
        module = _get_site(model, site)

        def hook(mod: nn.Module, args: tuple, site: str = site) -> None:
            if found:
                return
            r = (token_std(args[0], mod.eps, mod.centre) / mod.sigma_avg)[0]
            bad = ~torch.isfinite(r) | (r > ratio)
            if bool(bad.any()):
                pos = int(bad.nonzero()[0])
                value = float(r[pos])
                found.append({"site": site, "block": blocks[site], "position": pos, "token_id": int(row[pos]),
                              "ratio": value if math.isfinite(value) else None})
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(row[None])
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def to_ln_free_storage(model: nn.Module) -> nn.Module:
    """A plain model of ``model``'s class equal to ``model`` (all norms frozen) in the published LN-free
    format: the config's norm eps (``layer_norm_epsilon`` / ``rms_norm_eps``) = 1e12 and each gain
    ``w * 1e6 / sigma_avg`` (bias unchanged)."""
    layout = layout_of(model)
    base = getattr(model, layout.base)
    frozen = {name: m for name, m in base.named_modules() if isinstance(m, FrozenLayerNorm)}
    left = [name for name, m in base.named_modules() if _is_norm(m)]
    if left:
        raise NormgrowthError(f"norms {left} are not frozen yet: run remove_layernorm first.")
    unphased = [name for name, m in frozen.items() if float(m.phase) < 1.0]
    if unphased:
        raise NormgrowthError(f"norms {unphased} still use a special scale: finish remove_layernorm first.")
    config = model.config.__class__.from_dict(model.config.to_dict())
    setattr(config, layout.eps_field, LN_FREE_EPS)
    state = {}
    head = layout.base + "."
    for key, value in model.state_dict().items():
        if key.endswith((".sigma_avg", ".sigma_special", ".phase")):
            continue
        prefix, _, leaf = key.rpartition(".")
        sub = prefix[len(head):] if prefix.startswith(head) else None
        if sub in frozen and leaf == "weight":
            value = ln_free_storage_weight(value, float(frozen[sub].sigma_avg))
        state[key] = value.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = type(model)(config)
    stored.load_state_dict(state, strict=True)
    stored.eval()
    return stored
