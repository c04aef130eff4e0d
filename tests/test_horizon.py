"""The effective layer horizon and the causal check against plain-HF references and planted models.

References are written with forward hooks on the HF model's own modules (a second copy of the
checkpoint, never the bridge): the stream entering each decoder layer, the norms' inputs, and for frozen
scales a norm recomputed with the clean scale ``sqrt(mean P(x)^2 + eps)``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import STORIES, VOCAB, build_tiny, hf_model

from normgrowth.errors import NormgrowthError
from normgrowth.horizon import (HorizonResult, clean_pass, collect_horizon, default_horizons, horizon_logits,
                                horizon_within, parse_horizons, stream_means)
from normgrowth.models import load_model

N_SEQS, SEQ_LEN = 8, 12
N_CALIB = 2  # collect_horizon's default split of 8 sequences: ceil(0.25 * 8)


def _tokens(seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.from_numpy(np.random.RandomState(seed).randint(1, vocab, size=(N_SEQS, SEQ_LEN))).long()


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------
def test_grid_and_parsing():
    assert default_horizons(30) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 30]
    assert default_horizons(5) == [1, 2, 3, 4, 5]
    assert parse_horizons("4,1,4", 6) == [1, 4, 6]
    for bad in ("0", "7", "a", "1,,2"):
        with pytest.raises(NormgrowthError, match="--horizons"):
            parse_horizons(bad, 6)


def test_horizon_within_planted_curves():
    grid = [1, 2, 4, 8]
    excess = np.array([[0.5, 0.2, 0.05, 0.0],  # falls steadily
                       [0.005, 0.3, 0.005, 0.0],  # within 1 % at n=1, but not from there on
                       [np.nan, 0.001, 0.0, 0.0]])  # NaN counts as outside
    assert horizon_within(excess, grid, 0.01).tolist() == [8, 4, 2]
    assert horizon_within(excess, grid, 0.10).tolist() == [4, 4, 2]


# ----------------------------------------------------------------------------------------------
# plain-HF references
# ----------------------------------------------------------------------------------------------
def _parts(model: torch.nn.Module):
    """(decoder layers, [(attention reader, MLP reader)] per layer, final norm) of a GPT-2, Llama or OLMo 2 HF
    model: the input norms, or for OLMo 2 (norms after the sublayers) the attention and MLP modules."""
    if hasattr(model, "transformer"):
        h = model.transformer.h
        return list(h), [(b.ln_1, b.ln_2) for b in h], model.transformer.ln_f
    layers = model.model.layers
    if type(model).__name__.startswith("Olmo2"):
        return list(layers), [(b.self_attn, b.mlp) for b in layers], model.model.norm
    return list(layers), [(b.input_layernorm, b.post_attention_layernorm) for b in layers], model.model.norm


def _first_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _replace_first(args, kwargs, value):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _norm_scale(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean P(x)^2 + eps)`` with P the centring of a LayerNorm (identity for RMSNorm)."""
    x = x.float()
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _frozen_norm(norm: torch.nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = x.float()
    if isinstance(norm, torch.nn.LayerNorm):
        return norm.weight * (x - x.mean(-1, keepdim=True)) / scale + norm.bias
    return norm.weight * (x / scale)


def _hf_means(model, calib: torch.Tensor) -> list[torch.Tensor]:
    """Mean of the stream entering each layer over calibration tokens at positions >= 1."""
    with torch.no_grad():
        hs = model(calib, output_hidden_states=True).hidden_states
    return [h[:, 1:].reshape(-1, h.shape[-1]).double().mean(0).float() for h in hs[:-1]]


def _hf_reference_logits(model, tokens: torch.Tensor, n: int, means, frozen: bool) -> torch.Tensor:
    """Logits with every reader (attention norm, MLP norm, final norm of block L = n_layers) reading
    ``r - (x_b - mean x_b)`` at positions >= 1, ``b = L - n`` (nothing when b <= 0), with HF hooks."""
    layers, norms, final = _parts(model)
    n_layers = len(layers)
    handles, pre, clean_scale = [], {}, {}
    all_norms = [(L, which, norm) for L, pair in enumerate(norms) for which, norm in zip("am", pair)]
    all_norms.append((n_layers, "f", final))
    divides = {(L, w) for L, w, norm in all_norms if "norm" in type(norm).__name__.lower()}
    if frozen:  # clean scales of every norm from a clean pass
        def record(key, norm):
            def hook(mod, args, kwargs):
                clean_scale[key] = _norm_scale(norm, _first_arg(args, kwargs))
            return hook
        handles = [norm.register_forward_pre_hook(record((L, w), norm), with_kwargs=True) for L, w, norm in all_norms
                   if (L, w) in divides]
        with torch.no_grad():
            model(tokens)
        for h in handles:
            h.remove()
        handles = []

    def keep(b):
        def hook(mod, args, kwargs):
            pre[b] = _first_arg(args, kwargs).detach().clone()
        return hook

    def modify(L):
        b = L - n

        def hook(mod, args, kwargs):
            x = _first_arg(args, kwargs)
            if b <= 0:
                return None
            y = x.clone()
            y[:, 1:] = x[:, 1:] - pre[b][:, 1:] + means[b]
            return _replace_first(args, kwargs, y)
        return hook

    def freeze(key, norm):
        def hook(mod, args, kwargs, output):
            return _frozen_norm(norm, _first_arg(args, kwargs), clean_scale[key]).to(output.dtype)
        return hook

    for b, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(keep(b), with_kwargs=True))
    for L, w, norm in all_norms:
        handles.append(norm.register_forward_pre_hook(modify(L), with_kwargs=True))
        if frozen and (L, w) in divides:
            handles.append(norm.register_forward_hook(freeze((L, w), norm), with_kwargs=True))
    try:
        with torch.no_grad():
            return model(tokens).logits.float()
    finally:
        for h in handles:
            h.remove()


def _mean_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cross-entropy of the predictions at positions 1 .. T-2 (targets 2 .. T-1)."""
    logp = torch.log_softmax(logits[:, 1:-1].double(), -1)
    return float(-logp.gather(-1, tokens[:, 2:, None])[..., 0].mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("horizon")
    return {fam: build_tiny(fam, root / fam, seed=3, n_layers=3) for fam in ("llama", "gpt2", "olmo2")}


def test_full_horizon_is_the_clean_model(tiny):
    path = tiny["llama"]
    model = load_model(str(path))
    tok = _tokens()
    mask = torch.ones_like(tok, dtype=torch.bool)
    means = stream_means(model, tok[:N_CALIB], mask[:N_CALIB], 4)
    clean, scales = clean_pass(model, tok, mask)
    live = horizon_logits(model, tok, mask, model.n_layers, means)
    frozen = horizon_logits(model, tok, mask, model.n_layers, means, frozen=True, clean_scales=scales)
    assert torch.equal(live, clean)
    with torch.no_grad():
        plain = hf_model(path)(tok).logits.float()
    torch.testing.assert_close(live, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen, plain, rtol=1e-5, atol=1e-5)
    # a shorter horizon does change the logits
    assert not torch.allclose(horizon_logits(model, tok, mask, 1, means), plain, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "olmo2"])
def test_horizon_loss_matches_plain_hf(tiny, family):
    path = tiny[family]
    model = load_model(str(path))
    tok = _tokens(1)
    res = collect_horizon(model, tok, horizons="1,2", causal_writes="mlp_out.0", n_boot=20)
    doc = res.to_json()
    assert res.n_calib == N_CALIB and doc["horizons"] == [1, 2, 3]
    ref_model = hf_model(path)
    means = _hf_means(ref_model, tok[:N_CALIB])
    ev = tok[N_CALIB:]
    with torch.no_grad():
        clean_logits = ref_model(ev).logits.float()
    assert doc["clean_loss"] == pytest.approx(_mean_loss(clean_logits, ev), abs=1e-5)
    for mode in ("live", "frozen"):
        for i, n in enumerate((1, 2)):
            ref = _mean_loss(_hf_reference_logits(ref_model, ev, n, means, frozen=mode == "frozen"), ev)
            assert doc[mode]["loss"][i] == pytest.approx(ref, abs=1e-5), (mode, n)
        assert doc[mode]["loss"][-1] == doc["clean_loss"]
    assert abs(doc["live"]["loss"][0] - doc["frozen"]["loss"][0]) > 1e-4  # the two curves differ here

    # causal check: mean-ablate mlp_out.0 at positions >= 1 with an HF forward hook on the MLP
    mlp = _parts(ref_model)[0][0].mlp
    store = []
    h = mlp.register_forward_hook(lambda mod, args, out: store.append(out[:, 1:].reshape(-1, out.shape[-1])))
    with torch.no_grad():
        ref_model(tok[:N_CALIB])
    h.remove()
    mean = torch.cat(store).double().mean(0).float()

    def ablate(mod, args, out):
        out = out.clone()
        out[:, 1:] = mean
        return out

    h = mlp.register_forward_hook(ablate)
    with torch.no_grad():
        logp = torch.log_softmax(ref_model(ev).logits.double(), -1)
    h.remove()
    clean_logp = torch.log_softmax(clean_logits.double(), -1)
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)[:, 1:].mean()
    assert doc["causal"]["kl"][0][0] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2", "olmo2"])
def test_replayed_clean_blocks_change_nothing_and_skip_the_shared_prefix(tiny, family):
    """Passes that replay the blocks they share with the clean pass give the results of passes that compute
    every block (live bitwise; frozen to float32 rounding), and the replayed blocks' insides do not run."""
    model = load_model(str(tiny[family]))
    tok = _tokens(2)
    writes = "embed,attn_out.1,mlp_out.2"
    calls = {"n": 0}

    def count(x):
        calls["n"] += 1

    docs, counts = {}, {}
    for reuse in (False, True):
        calls["n"] = 0
        with model.hooks([("mlp_in", 0, count)]):
            res = collect_horizon(model, tok, horizons="1,2", causal_writes=writes, n_boot=20,
                                  reuse_clean_blocks=reuse)
        docs[reuse], counts[reuse] = res, calls["n"]
    full, replayed = docs[False], docs[True]
    np.testing.assert_array_equal(replayed.seq_loss[:, 0], full.seq_loss[:, 0])
    np.testing.assert_array_equal(replayed.seq_kl[:, 0], full.seq_kl[:, 0])
    np.testing.assert_allclose(replayed.seq_loss[:, 1], full.seq_loss[:, 1], rtol=1e-6)
    # the full frozen pass's own rounding (its prefix goes through the frozen-scale hooks) shows in a KL (a
    # difference of log-probabilities) and in the readers' change before the write (0 when replayed) as an
    # absolute error of about 1e-7 per token, summed over 10 tokens
    np.testing.assert_allclose(replayed.seq_kl[:, 1], full.seq_kl[:, 1], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(replayed.seq_change, full.seq_change, rtol=1e-5, atol=2e-6)
    # block 0 is replayed in both horizons' passes (2 x 2) and in the attn_out.1 and mlp_out.2 ablations (2 x 2)
    # of each of the 2 evaluation batches of 4 (8 sequences, 2 for calibration); the embedding ablation computes it
    assert counts[False] - counts[True] == 2 * (2 * 2 + 2 * 2)
    # the model is left as it was
    clean, _ = clean_pass(model, tok, torch.ones_like(tok, dtype=torch.bool))
    with torch.no_grad():
        plain = hf_model(tiny[family])(tok).logits.float()
    torch.testing.assert_close(clean, plain, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# planted models: division the only mechanism / LN-free
# ----------------------------------------------------------------------------------------------
def _planted(path, ln_free: bool, read_old: bool):
    """A 2-block Llama with hand-set weights, d = 12 in three subspaces: A (0-3, read by the unembedding),
    B (4-7, the embedding's token-varying magnitudes, read by nothing), C (8-11, the embedding's token
    identity, read by block 1's MLP, which writes into A). Block 0 and both attentions write nothing.

    With horizon 1 the final norm sees the embedding replaced by its mean; the unembedding reads only A
    (``read_old`` False), so the loss can change only through the final norm's scale: live differs from
    clean, frozen does not. With ``read_old`` the unembedding also reads C (the old write itself) and
    the norms are stored LN-free (``ln_free``: eps 1e12, gains 1e6): the loss changes, equally both ways."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=12, intermediate_size=8, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      rms_norm_eps=1e12 if ln_free else 1e-6, tie_word_embeddings=False, bos_token_id=0,
                      eos_token_id=0)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, 8:12] = torch.randn(16, 4, generator=gen)
        magnitude = torch.logspace(-1, 1, 16)[torch.randperm(16, generator=gen)]  # 0.1 .. 10, token-varying
        emb[:, 4:8] = torch.randn(16, 4, generator=gen) * magnitude[:, None]
        gain = 1e6 if ln_free else 1.0
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(gain)
            layer.post_attention_layernorm.weight.fill_(gain)
        model.model.norm.weight.fill_(gain)
        mlp = model.model.layers[1].mlp
        mlp.gate_proj.weight[:, 8:12] = 2 * torch.randn(8, 4, generator=gen)
        mlp.up_proj.weight[:, 8:12] = 2 * torch.randn(8, 4, generator=gen)
        mlp.down_proj.weight[0:4, :] = torch.randn(4, 8, generator=gen)
        model.lm_head.weight[:, 0:4] = 3 * torch.randn(16, 4, generator=gen)
        if read_old:
            model.lm_head.weight[:, 8:12] = 3 * torch.randn(16, 4, generator=gen)
    model.save_pretrained(path)
    return path


def test_planted_division_only_shows_a_gap_and_ln_free_shows_none(tmp_path):
    tok = _tokens(2, vocab=16)
    division = load_model(str(_planted(tmp_path / "division", ln_free=False, read_old=False)))
    doc = collect_horizon(division, tok, horizons="1", causal_writes=None, n_boot=50).to_json()
    assert abs(doc["frozen"]["excess"][0]) < 1e-6  # the readers' weights ignore the old write
    assert abs(doc["live"]["excess"][0]) > 1e-2  # ... but its magnitude reaches them through the division
    assert doc["gap"]["excess_gap_ci"][0][0] > 0 or doc["gap"]["excess_gap_ci"][0][1] < 0

    direction = load_model(str(_planted(tmp_path / "direction", ln_free=True, read_old=True)))
    assert direction.ln_free
    doc = collect_horizon(direction, tok, horizons="1", causal_writes="embed", n_boot=50).to_json()
    assert abs(doc["live"]["excess"][0]) > 1e-2  # the old write is read directly: its loss changes without the norm
    assert doc["frozen"]["excess"][0] == pytest.approx(doc["live"]["excess"][0], rel=1e-5, abs=1e-7)
    kl = doc["causal"]["kl"]
    assert kl[1][0] == pytest.approx(kl[0][0], rel=1e-5)


def test_frozen_equals_live_on_ln_free_checkpoint(tmp_path):
    path = build_tiny("gpt2", tmp_path / "lnfree", seed=4, n_layers=3, ln_free=True)
    model = load_model(str(path))
    assert model.ln_free
    doc = collect_horizon(model, _tokens(3), horizons="1,2", causal_writes="embed,mlp_out.1", n_boot=20).to_json()
    np.testing.assert_allclose(doc["frozen"]["loss"], doc["live"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(doc["causal"]["kl"][1], doc["causal"]["kl"][0], rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# result round trip, bad input, a real trained model
# ----------------------------------------------------------------------------------------------
def test_result_round_trip_and_bad_input(tiny, tmp_path):
    model = load_model(str(tiny["gpt2"]))
    res = collect_horizon(model, _tokens(4), horizons="1", causal_writes="embed", n_boot=20)
    back = HorizonResult.load(res.save(tmp_path / "h"))
    assert back.to_json() == res.to_json()
    rows = list(back.frame_rows())
    assert {"model", "site", "layer", "statistic", "value"} <= set(rows[0])
    assert "horizon" in back.text() and "division share" in back.text()
    with pytest.raises(NormgrowthError, match="at least 2 sequences"):
        collect_horizon(model, _tokens(4)[:1], causal_writes=None)
    with pytest.raises(NormgrowthError, match="--horizons"):
        collect_horizon(model, _tokens(4), horizons="9", causal_writes=None)


@pytest.mark.skipif(not STORIES.is_dir(), reason="stories260K fixture not present")
def test_stories260k_live_and_frozen_curves_end_at_clean():
    model = load_model(str(STORIES))
    ids = torch.from_numpy(np.load(STORIES / "samples.npy")[:8, :32])
    doc = collect_horizon(model, ids, horizons="1,3", causal_writes=None, n_boot=50).to_json()
    assert doc["live"]["loss"][-1] == doc["clean_loss"] == doc["frozen"]["loss"][-1]
    # a trained model loses a lot when its blocks read only the previous block
    assert doc["live"]["excess"][0] > 0.1 and doc["frozen"]["excess"][0] > 0.1


def test_cli_writes_json_and_reuses_the_cache(tiny, tmp_path):
    import json

    from typer.testing import CliRunner

    from normgrowth.cli import app
    from normgrowth.pipeline import run_horizon

    data = tmp_path / "tokens.npy"
    np.save(data, _tokens(5).numpy())
    args = ["horizon", str(tiny["gpt2"]), "--data", str(data), "--horizons", "1", "--causal", "embed",
            "--out", str(tmp_path / "cache")]
    first = CliRunner().invoke(app, args + ["--json", str(tmp_path / "h.json")], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    doc = json.loads((tmp_path / "h.json").read_text())
    assert doc["horizons"] == [1, 3] and doc["causal"]["writes"] == ["embed"]
    assert "effective layer horizon" in first.output
    again = run_horizon(str(tiny["gpt2"]), str(data), horizons="1", causal="embed", out=tmp_path / "cache")
    assert again.cached and again.document()["live"]["loss"] == doc["live"]["loss"]
    with pytest.raises(NormgrowthError, match="--horizons"):
        run_horizon(str(tiny["gpt2"]), str(data), horizons="0", out=tmp_path / "cache2")
    assert not (tmp_path / "cache2").exists() or not any((tmp_path / "cache2").glob("horizon-*.json"))
