"""The scale penalty of the norm removal (ln_removal.ScalePenalty): its value against numpy on the captured
norm inputs, and on a planted massive activation that only the penalty removes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import VOCAB, make_tiny, run_main
from normgrowth.errors import NormgrowthError
from normgrowth.zoo import batch_stream
from normgrowth.zoo.ln_removal import ScalePenalty, _get_site, measure_sigmas, norm_sites, remove_layernorm
from normgrowth.zoo.twin import TwinSettings

SEP = 0
N_CTX = 16
PLANTED = 20.0  # the separator's embedding row is multiplied by this: a massive activation at position 0


def _rows(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, VOCAB, (n, N_CTX), generator=gen)
    rows[:, 0] = SEP
    return rows


def _planted_model(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose separator token (always at position 0) enters the residual stream PLANTED times
    larger than any other token: every norm sees it at about PLANTED x the ordinary scale."""
    torch.manual_seed(seed)
    model = make_tiny("llama", n_layers=2, tie_word_embeddings=False).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[SEP] *= PLANTED
    return model


def _norm_inputs(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, np.ndarray]:
    """The input of every norm site (float64 numpy), from forward pre-hooks."""
    seen: dict[str, np.ndarray] = {}
    handles = [_get_site(model, site).register_forward_pre_hook(
        lambda mod, args, site=site: seen.__setitem__(site, args[0].detach().double().numpy()))
        for site in norm_sites(model)]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _pos0_ratio(model: torch.nn.Module, batch: torch.Tensor, sigmas: dict[str, float]) -> float:
    """Largest position-0 RMS over sigma_avg across the norm sites (numpy)."""
    eps = model.config.rms_norm_eps
    return max(float(np.sqrt((x[:, 0] ** 2).mean(-1) + eps).mean()) / sigmas[site]
               for site, x in _norm_inputs(model, batch).items())


def test_penalty_equals_numpy_on_the_captured_norm_inputs():
    """P = w / |S| * sum_sites mean_rows sum_tokens relu(ln(rms(x) / sigma) - ln m_t)^2 (m_t: the special
    margin at position 0 and separators), recomputed in float64 numpy from the norm inputs; tokens under
    their margin add nothing; no terms outside gradient passes."""
    model = _planted_model()
    batch = _rows(3, 1)
    batch[1, 7] = SEP  # a separator inside a row gets the special margin too
    sites = norm_sites(model)
    sigmas = {site: 0.05 * (k + 1) for k, site in enumerate(sites)}  # different references per site
    weight, margin, special_margin = 0.7, 2.0, 1.2
    inputs = _norm_inputs(model, batch)
    eps = model.config.rms_norm_eps
    margins = np.where(batch.numpy() == SEP, special_margin, margin)
    margins[:, 0] = special_margin
    expected = 0.0
    for site, x in inputs.items():
        ratio = np.sqrt((x ** 2).mean(-1) + eps) / sigmas[site]
        expected += (np.maximum(np.log(ratio) - np.log(margins), 0.0) ** 2).sum(-1).mean()
    expected *= weight / len(sites)
    assert expected > 0
    with ScalePenalty(model, sigmas, weight, margin, special_margin, SEP) as penalty:
        with torch.no_grad():
            model(batch)
        assert float(penalty()) == 0.0  # no gradients, no terms
        model(batch)
        value = penalty()
        assert value.requires_grad
        np.testing.assert_allclose(float(value.detach()), expected, rtol=1e-5)
        assert penalty.history == [0.0, pytest.approx(expected, rel=1e-5)]
        # references so large that no token reaches the margin: exactly zero
        high = ScalePenalty(model, {site: 1e6 for site in sites}, weight, margin)
        model(batch)
        assert float(high()) == 0.0
        high.remove()
    assert all(not m._forward_pre_hooks for m in model.modules())  # the context manager removed its hooks


def _schedule(penalty: float) -> object:
    return TwinSettings.tiny(steps_per_norm=8, recovery_steps=8, lr=0.01, scale_penalty=penalty).removal


@pytest.fixture(scope="module")
def controls():
    """The planted model fine-tuned with its norms kept (the control) on one schedule, with and without the
    penalty: ``{penalty: (ratio before, ratio after, penalty trace)}``."""
    out = {}
    for penalty in (1.0, 0.0):
        model = _planted_model()
        held = _rows(4, 3)
        sigmas = {site: sig for site, (sig, _) in
                  measure_sigmas(model, norm_sites(model), [_rows(4, 2)], SEP).items()}
        before = _pos0_ratio(model, held, sigmas)
        trace: list[float] = []
        sigmas = remove_layernorm(model, batch_stream(_rows(128, 2), 2, 0), _schedule(penalty), special_id=SEP,
                                  keep_ln=True, penalty_trace=trace)
        out[penalty] = (before, _pos0_ratio(model, held, sigmas), trace)
        assert all(not m._forward_pre_hooks for m in model.modules())  # the penalty's hooks are gone
    return out


def test_only_the_penalty_removes_a_planted_massive_activation_under_live_norms(controls):
    """Planted truth: with the norms kept, the next-token loss cannot see the scale of position 0 (RMSNorm
    divides it away), so without the penalty the planted activation (about 15x sigma_avg at its largest
    site) stays above PLANTED/2; with the penalty the same schedule brings it below half its start."""
    before, after, _ = controls[0.0]
    assert before > 0.5 * PLANTED and after > 0.5 * PLANTED
    before, after, trace = controls[1.0]
    assert after < 0.5 * before
    assert len(trace) == _schedule(1.0).fine_tuning_steps(5)
    assert trace[0] > 4 * max(trace[-5:])


@pytest.mark.parametrize("field", ["scale_margin", "special_scale_margin"])
def test_twin_settings_refuse_a_margin_below_one(field):
    with pytest.raises(NormgrowthError, match=f"{field} must be a number >= 1"):
        TwinSettings.tiny(**{field: 0.5}).validate()


def test_penalty_needs_scales_measured_before_removal():
    model = _planted_model()
    schedule = dataclasses.replace(_schedule(1.0), sigma_before_removal=False)
    with pytest.raises(NormgrowthError, match="sigma_before_removal"):
        remove_layernorm(model, batch_stream(_rows(8, 2), 2, 0), schedule, special_id=SEP)


@pytest.mark.parametrize("args, message", [(["--scale-penalty", "-1"], "--scale-penalty must be a number >= 0"),
                                           (["--scale-penalty", "nan"], "--scale-penalty must be a number >= 0")])
def test_cli_refuses_a_bad_penalty_in_one_line(monkeypatch, capsys, tmp_path, args, message):
    code, out, err = run_main(monkeypatch, capsys, "zoo", "twin", str(tmp_path / "missing"), "--out",
                              str(tmp_path / "out"), *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
