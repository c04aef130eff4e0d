"""Weight norms and random-input gains (normgrowth.weights) against independent computations.

References index the plain HF parameters directly (GPT-2 Conv1D c_attn/c_proj/c_fc, GPT-NeoX
interleaved query_key_value, Llama q/k/v/o_proj with GQA and gate/up/down) and build the folded
matrices explicitly, never through ``stacked_weights``.
"""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import LN_FREE_EPS, LN_FREE_SIGMA, STORIES, make_tiny, randomise_all, scale_to_ln_free
from normgrowth.errors import NormgrowthError
from normgrowth.fit import fit_growth
from normgrowth.models import load_model
from normgrowth.weights import (FIT_SERIES, LAYER_KEYS, compare_gains, comparison_to_json, effective_gain,
                                folded_ov_norms, format_gain_table, format_weight_table, input_std_from_results,
                                random_input_gains, analyse_weights, format_weights, standardised_normal, weight_norms, _random_seed)

PLANTED_G = 1.3
PLANTED_LAYERS = 6


def _build(tmp_path_factory, name: str, family: str, seed: int = 0, edit=None, **kw) -> tuple[str, dict]:
    """A tiny checkpoint of the conftest table, every parameter random, then ``edit(model)``."""

    def init(model):
        randomise_all(model, seed)
        if edit is not None:
            edit(model)

    d = tmp_path_factory.mktemp(name)
    hf = make_tiny(family, seed=seed, init=init, **kw)
    hf.save_pretrained(d)
    sd = {k: v.detach().clone().to(torch.float64) for k, v in hf.state_dict().items()}
    return str(d), sd


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _build(tmp_path_factory, "gpt2", "gpt2")


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    return _build(tmp_path_factory, "neox", "neox", seed=1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build(tmp_path_factory, "llama", "llama", seed=2)


@pytest.fixture(scope="module")
def ln_free(tmp_path_factory):
    """LN-free format from a tiny GPT-2: eps = 1e12, every LN gain stored as g * 1e6 / sigma."""
    d = tmp_path_factory.mktemp("lnfree")
    hf = make_tiny("gpt2", seed=3, init=lambda m: randomise_all(m, 3), layer_norm_epsilon=LN_FREE_EPS)
    originals = scale_to_ln_free(hf, LN_FREE_SIGMA)
    hf.save_pretrained(d)
    sd = {k: v.detach().clone().to(torch.float64) for k, v in hf.state_dict().items()}
    return str(d), sd, originals


@pytest.fixture(scope="module")
def loaded(gpt2, neox, llama, ln_free):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: load_model(spec[0], device="cpu")
                for name, spec in (("gpt2", gpt2), ("neox", neox), ("llama", llama), ("ln_free", ln_free))}


# ----------------------------------------------------------------------------------------------
# references from the plain HF state dict
# ----------------------------------------------------------------------------------------------
def _fro(t):
    return float(torch.linalg.norm(t.reshape(-1)))


def _ov(gain, wv_h, wo_h):
    """||diag(gain) W_V^h W_O^h||_F with the d_model x d_model product built explicitly."""
    return _fro(torch.diag(gain) @ wv_h @ wo_h)


NO_MOE_NO_OUTPUT_NORM = {"W_router": None, "gain_attn_out": None, "gain_mlp_out": None}


def _ref_gpt2(sd, n_layers, n_heads, gain_scale=1.0):
    d = sd["transformer.wte.weight"].shape[1]
    dh = d // n_heads
    out = []
    for l in range(n_layers):
        p = f"transformer.h.{l}."
        w_qkv = sd[p + "attn.c_attn.weight"]  # Conv1D [d_model, 3 d_model]: x @ W
        wq, wk, wv = w_qkv[:, :d], w_qkv[:, d:2 * d], w_qkv[:, 2 * d:]
        wo = sd[p + "attn.c_proj.weight"]  # [n_heads*d_head, d_model]
        g1 = sd[p + "ln_1.weight"] * gain_scale
        g2 = sd[p + "ln_2.weight"] * gain_scale
        out.append({
            "W_OV_heads": [_ov(g1, wv[:, h * dh:(h + 1) * dh], wo[h * dh:(h + 1) * dh, :]) for h in range(n_heads)],
            "W_Q": _fro(wq), "W_K": _fro(wk), "W_V": _fro(wv), "W_O": _fro(wo),
            "b_V": _fro(sd[p + "attn.c_attn.bias"][2 * d:]), "b_O": _fro(sd[p + "attn.c_proj.bias"]),
            "W_in": _fro(torch.diag(g2) @ sd[p + "mlp.c_fc.weight"]), "W_gate": None, **NO_MOE_NO_OUTPUT_NORM,
            "W_out": _fro(sd[p + "mlp.c_proj.weight"]),
            "b_in": _fro(sd[p + "mlp.c_fc.bias"]), "b_out": _fro(sd[p + "mlp.c_proj.bias"]),
            "gain_attn": _fro(g1), "gain_mlp": _fro(g2),
        })
    return out, _fro(sd["transformer.ln_f.weight"] * gain_scale)


def _ref_neox(sd, n_layers, n_heads):
    d = sd["gpt_neox.embed_in.weight"].shape[1]
    dh = d // n_heads
    out = []
    for l in range(n_layers):
        p = f"gpt_neox.layers.{l}."
        # nn.Linear [3 d_model, d_model]; output viewed as [n_heads, 3 d_head] -> q, k, v per head
        qkv = sd[p + "attention.query_key_value.weight"].view(n_heads, 3, dh, d)
        wo = sd[p + "attention.dense.weight"]  # [d_model, n_heads*d_head] (out x in)
        g1 = sd[p + "input_layernorm.weight"]
        g2 = sd[p + "post_attention_layernorm.weight"]
        out.append({
            "W_OV_heads": [_ov(g1, qkv[h, 2].T, wo[:, h * dh:(h + 1) * dh].T) for h in range(n_heads)],
            "W_Q": _fro(qkv[:, 0]), "W_K": _fro(qkv[:, 1]), "W_V": _fro(qkv[:, 2]), "W_O": _fro(wo),
            "b_V": _fro(sd[p + "attention.query_key_value.bias"].view(n_heads, 3, dh)[:, 2]),
            "b_O": _fro(sd[p + "attention.dense.bias"]), **NO_MOE_NO_OUTPUT_NORM,
            "W_in": _fro(torch.diag(g2) @ sd[p + "mlp.dense_h_to_4h.weight"].T), "W_gate": None,
            "W_out": _fro(sd[p + "mlp.dense_4h_to_h.weight"]),
            "b_in": _fro(sd[p + "mlp.dense_h_to_4h.bias"]), "b_out": _fro(sd[p + "mlp.dense_4h_to_h.bias"]),
            "gain_attn": _fro(g1), "gain_mlp": _fro(g2),
        })
    return out, _fro(sd["gpt_neox.final_layer_norm.weight"])


def _ref_llama(sd, n_layers, n_heads, n_kv_heads):
    d = sd["model.embed_tokens.weight"].shape[1]
    dh = sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // n_heads
    group = n_heads // n_kv_heads
    out = []
    for l in range(n_layers):
        p = f"model.layers.{l}."
        wq, wk, wv = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")  # [heads*d_head, d_model]
        wo = sd[p + "self_attn.o_proj.weight"]  # [d_model, n_heads*d_head]
        g1 = sd[p + "input_layernorm.weight"]
        g2 = sd[p + "post_attention_layernorm.weight"]
        heads = []
        for h in range(n_heads):
            kv = h // group
            heads.append(_ov(g1, wv[kv * dh:(kv + 1) * dh, :].T, wo[:, h * dh:(h + 1) * dh].T))
        out.append({
            "W_OV_heads": heads, "W_Q": _fro(wq), "W_K": _fro(wk), "W_V": _fro(wv), "W_O": _fro(wo),
            "b_V": None, "b_O": None, **NO_MOE_NO_OUTPUT_NORM,
            "W_in": _fro(torch.diag(g2) @ sd[p + "mlp.up_proj.weight"].T),
            "W_gate": _fro(torch.diag(g2) @ sd[p + "mlp.gate_proj.weight"].T),
            "W_out": _fro(sd[p + "mlp.down_proj.weight"]), "b_in": None, "b_out": None,
            "gain_attn": _fro(g1), "gain_mlp": _fro(g2),
        })
    return out, _fro(sd["model.norm.weight"])


def _assert_matches(doc, ref_layers, ref_final, rtol=1e-6):
    assert len(doc["layers"]) == len(ref_layers)
    for l, (got, want) in enumerate(zip(doc["layers"], ref_layers)):
        assert set(got) == set(want), l
        np.testing.assert_allclose(got["W_OV_heads"], want["W_OV_heads"], rtol=rtol, err_msg=f"layer {l} W_OV")
        for key in LAYER_KEYS:
            if want[key] is None:
                assert got[key] is None, (l, key)
            else:
                assert got[key] == pytest.approx(want[key], rel=rtol), (l, key)
    assert doc["gain_final"] == pytest.approx(ref_final, rel=rtol)


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
def test_folded_ov_norms_equals_explicit_product():
    gen = torch.Generator().manual_seed(0)
    gain = torch.rand(16, generator=gen) + 0.5
    wv, wo = torch.randn(3, 16, 4, generator=gen), torch.randn(3, 4, 16, generator=gen)
    want = [_fro(torch.diag(gain.double()) @ wv[h].double() @ wo[h].double()) for h in range(3)]
    np.testing.assert_allclose(folded_ov_norms(gain, wv, wo).numpy(), want, rtol=1e-10)


def test_effective_gain():
    g = torch.tensor([2e6, 4e6])
    assert effective_gain(g, 1e12, ln_free=True).tolist() == pytest.approx([2.0, 4.0])
    assert effective_gain(g, 1e-5, ln_free=False).tolist() == pytest.approx([2e6, 4e6])


def test_standardised_normal_is_seeded_and_exact():
    z = standardised_normal((2, 5, 64), 3.0, seed=7)
    assert torch.equal(z, standardised_normal((2, 5, 64), 3.0, seed=7))
    assert not torch.equal(z, standardised_normal((2, 5, 64), 3.0, seed=8))
    torch.testing.assert_close(z.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(-1, unbiased=False), torch.full((2, 5), 3.0), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# weight norms against the HF state dict
# ----------------------------------------------------------------------------------------------
def test_weight_norms_gpt2(gpt2, loaded):
    wn = weight_norms(loaded["gpt2"])
    doc = wn.to_json()
    json.dumps(doc)  # strict JSON
    assert set(doc) == {"layers", "gain_final", "fit", "fit_skipped", "model", "ln_free", "normalization", "experts",
                        "norm_placement", "parallel_blocks", "source"}
    assert doc["experts"] is None and doc["source"] == {"format": "hf"}
    assert doc["ln_free"] is False and doc["normalization"] == "LN"
    _assert_matches(doc, *_ref_gpt2(gpt2[1], 3, 4))
    absent = {"W_gate", "W_router", "gain_attn_out", "gain_mlp_out"}  # no gated MLP, no experts, no output norms
    assert set(doc["fit"]) == set(FIT_SERIES) - absent
    assert doc["fit_skipped"] == {k: "not in this checkpoint" for k in absent}
    ref_w_in = [row["W_in"] for row in _ref_gpt2(gpt2[1], 3, 4)[0]]
    assert doc["fit"]["W_in"]["growth_factor"] == pytest.approx(fit_growth(ref_w_in).growth_factor, rel=1e-6)
    text = format_weight_table(wn)
    assert "W_OV_mean" in text and "not fitted: W_gate" in text


def test_weight_norms_neox_parallel(neox, loaded):
    m = loaded["neox"]
    assert m.parallel_blocks
    _assert_matches(weight_norms(m).to_json(), *_ref_neox(neox[1], 3, 4))


def test_weight_norms_llama_gqa(llama, loaded):
    m = loaded["llama"]
    assert (m.n_heads, m.n_kv_heads) == (4, 2)
    wn = weight_norms(m)
    doc = wn.to_json()
    _assert_matches(doc, *_ref_llama(llama[1], 3, 4, 2))
    assert doc["layers"][0]["b_O"] is None and doc["layers"][0]["W_gate"] is not None
    assert "W_gate" in doc["fit"]
    assert set(doc["fit_skipped"]) == {"b_V", "b_O", "b_in", "b_out", "W_router", "gain_attn_out", "gain_mlp_out"}


def test_weight_norms_ln_free_use_effective_gain(ln_free, loaded):
    d, sd, originals = ln_free
    m = loaded["ln_free"]
    assert m.ln_free and m.norm_eps == 1e12
    doc = weight_norms(m).to_json()
    assert doc["ln_free"] is True
    # stored gain g*1e6/sigma, effective gain g/sigma: the reference folds g/sigma from the original g
    orig_sd = dict(sd)
    orig_sd.update(originals)
    _assert_matches(doc, *_ref_gpt2(orig_sd, 3, 4, gain_scale=1.0 / LN_FREE_SIGMA), rtol=1e-5)
    gains = [row["gain_attn"] for row in doc["layers"]] + [doc["gain_final"]]
    assert max(gains) < 20  # ~ sqrt(32) * 1 / 3, nowhere near the 1e6 storage factor


def test_ln_free_effective_gain_is_the_actual_scale(ln_free, loaded):
    """The LN-free norm really computes (x - mean) * g_eff + b with g_eff = g_stored / sqrt(eps)."""
    m = loaded["ln_free"]
    ln = m.norm_modules("ln1")[1]
    x = 50.0 * torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    g_eff = effective_gain(ln.weight.detach(), 1e12, True).float()
    want = (x - x.mean(-1, keepdim=True)) * g_eff + ln.bias.detach()
    torch.testing.assert_close(ln(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_eff.double(), ln_free[2]["transformer.h.1.ln_1.weight"] / LN_FREE_SIGMA,
                               rtol=1e-6, atol=0)


def test_planted_growth_factor(tmp_path_factory):
    """Identical layers, layer l's attention c_proj and MLP c_proj (weights and biases) scaled by g**l."""

    def plant(hf):
        blocks = hf.transformer.h
        with torch.no_grad():
            for l in range(1, len(blocks)):
                blocks[l].load_state_dict(blocks[0].state_dict())
            for l, blk in enumerate(blocks):
                for lin in (blk.attn.c_proj, blk.mlp.c_proj):
                    lin.weight.mul_(PLANTED_G ** l)
                    lin.bias.mul_(PLANTED_G ** l)

    d, _ = _build(tmp_path_factory, "planted", "gpt2", seed=4, edit=plant, n_layers=PLANTED_LAYERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wn = weight_norms(load_model(d, device="cpu"))
    for series in ("W_out", "b_out", "W_O", "b_O", "W_OV_mean"):
        assert wn.fit[series].growth_factor == pytest.approx(PLANTED_G, rel=1e-6), series
    for series in ("W_in", "W_Q", "b_in", "gain_attn", "gain_mlp"):
        assert wn.fit[series].growth_factor == pytest.approx(1.0, abs=1e-6), series
    assert wn.fit["W_out"].ci_method == "regression standard error"


def test_stories260k_against_state_dict():
    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260K fixture not present")
    from safetensors.torch import load_file

    sd = {k: v.to(torch.float64) for k, v in load_file(str(STORIES / "model.safetensors")).items()}
    m = load_model(str(STORIES), device="cpu")
    wn = weight_norms(m)
    _assert_matches(wn.to_json(), *_ref_llama(sd, m.n_layers, m.n_heads, m.n_kv_heads))
    gains = random_input_gains(m, n_seqs=2, seq_len=32)
    assert np.all(np.isfinite(gains["attn_out"])) and np.all(np.isfinite(gains["mlp_out"]))
    assert all(0 < r < 1 for r in gains["mlp_act_rate"])


# ----------------------------------------------------------------------------------------------
# random-input gains
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "ln_free"])
def test_random_input_gains_run(name, loaded):
    m = loaded[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = random_input_gains(m, n_seqs=2, seq_len=16, seed=1)
    json.dumps(g)
    for key in ("attn_out", "mlp_out", "mlp_act_rate"):
        assert len(g[key]) == m.n_layers
    assert all(math.isfinite(v) and v > 0 for v in g["attn_out"] + g["mlp_out"])
    assert all(0 < r < 1 for r in g["mlp_act_rate"])
    assert g["n_tokens"] == 2 * 15


def _hf_attn_mlp_gpt2(hf, layer, shape, std, seed):
    blk = hf.transformer.h[layer]
    z1 = standardised_normal(shape, std, _random_seed(seed, layer, 0))
    z2 = standardised_normal(shape, std, _random_seed(seed, layer, 1))
    attn = blk.attn(blk.ln_1(z1))[0]
    pre = blk.mlp.c_fc(blk.ln_2(z2))
    mlp = blk.mlp(blk.ln_2(z2))
    return attn, mlp, pre


def test_random_input_gains_match_plain_hf_gpt2(loaded):
    m = loaded["gpt2"]
    g = random_input_gains(m, n_seqs=2, seq_len=16, seed=5)
    with torch.no_grad():
        for l in range(m.n_layers):
            attn, mlp, pre = _hf_attn_mlp_gpt2(m.hf_model, l, (2, 16, 32), 1.0, 5)
            assert g["attn_out"][l] == pytest.approx(float(attn[:, 1:].norm(dim=-1).mean()), rel=1e-5)
            assert g["mlp_out"][l] == pytest.approx(float(mlp[:, 1:].norm(dim=-1).mean()), rel=1e-5)
            assert g["mlp_act_rate"][l] == pytest.approx(float((pre[:, 1:] > 0).double().mean()), abs=1e-12)


def test_random_input_gains_match_plain_hf_llama_rotary(loaded):
    """Llama: attention on the random input with rotary q/k at the real positions, gated MLP."""
    m = loaded["llama"]
    g = random_input_gains(m, n_seqs=2, seq_len=16, seed=6)
    hf = m.hf_model.model
    pos = torch.arange(16)[None].expand(2, 16)
    with torch.no_grad():
        for l in range(m.n_layers):
            layer = hf.layers[l]
            x1 = layer.input_layernorm(standardised_normal((2, 16, 32), 1.0, _random_seed(6, l, 0)))
            cos_sin = hf.rotary_emb(x1, pos)
            attn = layer.self_attn(hidden_states=x1, position_embeddings=cos_sin, attention_mask=None)[0]
            x2 = layer.post_attention_layernorm(standardised_normal((2, 16, 32), 1.0, _random_seed(6, l, 1)))
            mlp = layer.mlp(x2)
            gate = layer.mlp.gate_proj(x2)
            assert g["attn_out"][l] == pytest.approx(float(attn[:, 1:].norm(dim=-1).mean()), rel=1e-5)
            assert g["mlp_out"][l] == pytest.approx(float(mlp[:, 1:].norm(dim=-1).mean()), rel=1e-5)
            assert g["mlp_act_rate"][l] == pytest.approx(float((gate[:, 1:] > 0).double().mean()), abs=1e-12)


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox"])
def test_random_input_scale_does_not_matter_for_ln_and_rms(name, loaded):
    m = loaded[name]
    unit = random_input_gains(m, n_seqs=2, seq_len=16, seed=2)
    big = random_input_gains(m, n_seqs=2, seq_len=16, seed=2, input_std=10.0)
    assert big["input_std"]["attn"] == [10.0] * m.n_layers
    for key in ("attn_out", "mlp_out", "mlp_act_rate"):
        np.testing.assert_allclose(big[key], unit[key], rtol=1e-4, err_msg=key)


def test_random_input_scale_matters_for_ln_free(loaded):
    m = loaded["ln_free"]
    with pytest.warns(UserWarning, match="LN-free"):
        unit = random_input_gains(m, n_seqs=2, seq_len=16, seed=2)
    big = random_input_gains(m, n_seqs=2, seq_len=16, seed=2, input_std=10.0)
    assert big["input_std_source"] == "given"
    # the LN-free norm is linear: the MLP's input grows 10x, so its output changes a lot
    ratio = np.asarray(big["mlp_out"]) / np.asarray(unit["mlp_out"])
    assert np.all(ratio > 2.0)


def test_input_std_validation(loaded):
    m = loaded["gpt2"]
    with pytest.raises(NormgrowthError):
        random_input_gains(m, n_seqs=1, seq_len=8, input_std=[1.0, 2.0])
    with pytest.raises(NormgrowthError):
        random_input_gains(m, n_seqs=1, seq_len=8, input_std={"attn": 1.0})
    with pytest.raises(NormgrowthError):
        random_input_gains(m, n_seqs=1, seq_len=8, input_std=-1.0)
    with pytest.raises(NormgrowthError):
        random_input_gains(m, n_seqs=1, seq_len=1000)
    per_norm = random_input_gains(m, n_seqs=1, seq_len=8, input_std={"attn": [1, 2, 3], "mlp": 4.0})
    assert per_norm["input_std"] == {"attn": [1.0, 2.0, 3.0], "mlp": [4.0, 4.0, 4.0]}


def _fake_results(n_layers, attn_mean, mlp_mean, act, centered=None, parallel=False):
    site = lambda mean: SimpleNamespace(mean=np.asarray(mean), centered_mean=np.asarray(mean))  # noqa: E731
    sites = {"attn_out": site(attn_mean), "mlp_out": site(mlp_mean),
             "resid_pre": SimpleNamespace(centered_mean=np.asarray(centered[0])) if centered else None,
             "resid_mid": SimpleNamespace(centered_mean=np.asarray(centered[1])) if centered else None}
    return SimpleNamespace(sites=sites, mlp_act_rate=np.asarray(act))


def test_compare_gains():
    rnd = {"attn_out": [1.0, 2.0, 4.0, 8.0], "mlp_out": [2.0, 2.0, 2.0, 2.0], "mlp_act_rate": [0.5, 0.4, 0.3, 0.2]}
    res = _fake_results(4, [3.0, 3.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4])
    c = compare_gains(rnd, res)
    np.testing.assert_allclose(c["ratio_attn"], [3.0, 1.5, 0.75, 0.375])
    np.testing.assert_allclose(c["ratio_mlp"], [0.5, 1.0, 1.5, 2.0])
    assert c["real_act_rate"] == [0.1, 0.2, 0.3, 0.4] and c["random_act_rate"] == [0.5, 0.4, 0.3, 0.2]
    assert c["fit"]["random_attn_out"].growth_factor == pytest.approx(2.0, rel=1e-12)
    assert c["fit"]["random_mlp_out"].growth_factor == pytest.approx(1.0, rel=1e-12)
    doc = comparison_to_json(c)
    json.dumps(doc)
    assert doc["fit"]["random_attn_out"]["growth_factor"] == pytest.approx(2.0)
    assert "real/rand" in format_gain_table(c)
    with pytest.raises(NormgrowthError):
        compare_gains(rnd, _fake_results(3, [1.0] * 3, [1.0] * 3, [0.5] * 3))


def test_input_std_from_results_and_analyse_weights(loaded):
    m = loaded["ln_free"]
    d = math.sqrt(m.d_model)
    res = _fake_results(3, [3.0] * 3, [2.0] * 3, [0.5] * 3, centered=([d, 2 * d, 3 * d], [4 * d, 5 * d, 6 * d]))
    std = input_std_from_results(res, m)
    np.testing.assert_allclose(std["attn"], [1, 2, 3])
    np.testing.assert_allclose(std["mlp"], [4, 5, 6])
    result = analyse_weights(m, results=res, n_seqs=2, seq_len=16)
    out, text = result.to_json(), format_weights(result)
    json.dumps(out)
    assert out["random_inputs"]["input_std"] == {"attn": [1.0, 2.0, 3.0], "mlp": [4.0, 5.0, 6.0]}
    assert out["comparison"]["real_attn_out"] == [3.0] * 3
    assert "random-input gains vs real" in text and "effective gains" in text


def test_ln_free_in_float16_is_refused(ln_free):
    """LN-free gains are stored x1e6/sigma (~3e5 here), beyond float16's 65504: loading says so instead of inf/NaN."""
    with pytest.raises(NormgrowthError, match="overflow float16"):
        load_model(ln_free[0], device="cpu", dtype="float16")
