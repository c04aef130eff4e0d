"""The offline model pair: corpus, tokenizer, LN removal, LN-free storage format, cache.

The session's tiny zoo (ZooSettings.tiny(), conftest.tiny_zoo) is checked against plain Hugging Face,
torch's own LayerNorm, numpy and normgrowth.models.load_model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import NO_DROPOUT, make_tiny
from normgrowth import zoo
from normgrowth.errors import NormgrowthError
from normgrowth.models import load_model
from normgrowth.zoo import (FrozenLayerNorm, ZooSettings, build_pair, growth_per_layer, ln_sites,
                            measure_sigma_avg, pack_sequences, remove_layernorm, resid_post_norms,
                            to_ln_free_storage)

TINY = ZooSettings.tiny()
BUILT = ["control", "ln", "noln", "train", "zoo.json"]
TEXT = "Return the number of items in the collection, counting duplicates."


@pytest.fixture(scope="module")
def pair(tiny_zoo):
    """The session's tiny zoo (conftest.tiny_zoo): folder, build result, progress messages."""
    return tiny_zoo[:3]


def _hf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _tokens(tokenizer, text=TEXT):
    """BOS + the tokens of ``text``, cut to the tiny model's context."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:TINY.n_ctx]])


def _tiny_gpt2(seed=0, n_layer=2):
    """A random-init GPT-2 of the shared tiny shape, without dropout (HF's own init)."""
    return make_tiny("gpt2", seed=seed, n_layers=n_layer, init=None, **NO_DROPOUT).eval()


# ----- pure pieces ------------------------------------------------------------------------------
def test_frozen_layernorm_equals_torch_layernorm_at_its_sigma_and_is_affine():
    """Where a token's std is exactly sigma_avg, torch's own LayerNorm (eps 0) gives the same output;
    elsewhere the map is affine in the centred input (scales with it, ignores a constant shift)."""
    ln = nn.LayerNorm(6, eps=0.0)
    with torch.no_grad():
        ln.weight.copy_(torch.linspace(0.5, 2.0, 6))
        ln.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    sigma = 2.5
    frozen = FrozenLayerNorm(ln, sigma_avg=sigma).double()
    reference = copy.deepcopy(ln).double()
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    centred = x - x.mean(-1, keepdim=True)
    at_sigma = 7.0 + centred * sigma / centred.std(-1, unbiased=False, keepdim=True)  # every token std = sigma
    with torch.no_grad():
        torch.testing.assert_close(frozen(at_sigma), reference(at_sigma), rtol=1e-12, atol=1e-12)
        b = ln.bias.double()
        torch.testing.assert_close(frozen(3.0 * centred) - b, 3.0 * (frozen(centred) - b), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(frozen(x + 4.0), frozen(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(reference(3.0 * centred) - b, 3.0 * (reference(centred) - b))  # LN is not
    assert frozen.weight is ln.weight and frozen.bias is ln.bias  # the optimiser keeps training them


def test_growth_per_layer_recovers_planted_factor():
    norms = 3.0 * 1.05 ** torch.arange(10, dtype=torch.float32)
    assert growth_per_layer(norms) == pytest.approx(1.05, rel=1e-6)
    assert growth_per_layer(torch.full((5,), 2.0)) == pytest.approx(1.0)
    noisy = 3.0 * 1.05 ** np.arange(10) * np.exp(np.random.RandomState(0).normal(0, 0.1, 10))
    slope = np.polyfit(np.arange(10), np.log(noisy), 1)[0]  # numpy's least squares on log norms
    assert growth_per_layer(torch.tensor(noisy)) == pytest.approx(np.exp(slope), rel=1e-10)


def test_learning_rate_schedule_at_known_points():
    """Linear warm-up to the peak, then cosine from the peak to a tenth of it, flat afterwards."""
    peak, warmup, total = 2.0, 4, 24
    assert [zoo.cosine_lr(s, total, peak, warmup) for s in range(warmup)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert zoo.cosine_lr(warmup, total, peak, warmup) == pytest.approx(peak)
    assert zoo.cosine_lr(warmup + 10, total, peak, warmup) == pytest.approx(peak * 0.55)  # half-way: mean
    assert zoo.cosine_lr(total, total, peak, warmup) == pytest.approx(peak * 0.1)
    assert zoo.cosine_lr(total + 50, total, peak, warmup) == pytest.approx(peak * 0.1)


def test_pack_sequences_starts_every_row_with_bos():
    data = pack_sequences([[5, 6, 7], [8, 9]], bos_id=0, n_ctx=3)
    # stream 5 6 7 0 8 9 0 cut into chunks of 2: (5,6) (7,0) (8,9); trailing (0) dropped
    assert data.tolist() == [[0, 5, 6], [0, 7, 0], [0, 8, 9]]


def test_docstrings_from_source_and_split():
    source = ('"""Module docstring that is long enough to be kept by the filter."""\n'
              'class A:\n    """Class docstring that is also long enough to be kept."""\n'
              '    def f(self):\n        """Method docstring, long enough to be kept as well."""\n'
              'def g():\n    """short"""\n')
    docs = zoo.docstrings_from_source(source, min_chars=20)
    assert docs == ["Module docstring that is long enough to be kept by the filter.",
                    "Class docstring that is also long enough to be kept.",
                    "Method docstring, long enough to be kept as well."]
    assert zoo.docstrings_from_source("def broken(:\n") == []
    many = [f"document number {i}" for i in range(400)]
    train, held = zoo.split_docs(many, 0.1)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 400
    assert 10 < len(held) < 80  # about 10%
    assert zoo.split_docs(many, 0.1) == (train, held)


def test_stdlib_corpus_is_deterministic_and_skips_tests():
    files = zoo.stdlib_files()
    assert files == sorted(files) and files
    assert not any(set(f.parts) & {"test", "idlelib", "site-packages"} for f in files)
    first, n_files = zoo.stdlib_docstrings(max_chars=20_000)
    again, _ = zoo.stdlib_docstrings(max_chars=20_000)
    assert first == again and sum(map(len, first)) >= 20_000 and n_files >= 1
    assert len(set(first)) == len(first)


def test_tokenizer_training_is_deterministic():
    docs, _ = zoo.stdlib_docstrings(max_chars=20_000)
    a = zoo.train_tokenizer(docs, 300)
    b = zoo.train_tokenizer(docs, 300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.bos_token == "<|endoftext|>" and a.bos_token_id == 0 == a.eos_token_id == a.pad_token_id


def test_settings_validation():
    with pytest.raises(NormgrowthError):
        ZooSettings(d_model=30, n_head=4).validate()
    with pytest.raises(NormgrowthError):
        ZooSettings(vocab_size=100).validate()
    with pytest.raises(NormgrowthError):
        build_pair("/nonexistent-unused", dataclasses.replace(TINY, heldout_fraction=0.0))
    assert zoo.settings_hash(TINY) == zoo.settings_hash(ZooSettings.tiny())
    assert zoo.settings_hash(TINY) != zoo.settings_hash(dataclasses.replace(TINY, seed=1))


def test_measure_sigma_avg_matches_hidden_states():
    model = _tiny_gpt2()
    batch = torch.randint(0, 50, (3, 10))
    # h.0.ln_1 reads the embedding output, HF's hidden_states[0]
    with torch.no_grad():
        emb = model(batch, output_hidden_states=True).hidden_states[0].numpy().astype(np.float64)
    expected = np.mean(np.sqrt(np.var(emb, axis=-1) + model.config.layer_norm_epsilon))
    assert measure_sigma_avg(model, "h.0.ln_1", [batch]) == pytest.approx(float(expected), rel=1e-5)


def test_remove_layernorm_freezes_every_site_and_storage_matches():
    model = _tiny_gpt2(n_layer=3)
    data = torch.randint(1, 50, (32, 16), generator=torch.Generator().manual_seed(0))
    data[:, 0] = 0
    settings = dataclasses.replace(TINY, n_layer=3, ln_removal_steps_per_site=1, recovery_steps=1,
                                   ln_removal_lr=1e-3, batch_size=4)
    sigmas = remove_layernorm(model, zoo.batch_stream(data, 4, 0), settings)
    assert list(sigmas) == ln_sites(3) == ["h.0.ln_2", "h.1.ln_2", "h.2.ln_2", "h.0.ln_1", "h.1.ln_1",
                                           "h.2.ln_1", "ln_f"]
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert sum(isinstance(m, FrozenLayerNorm) for m in model.modules()) == 7
    stored = to_ln_free_storage(model)
    assert stored.config.layer_norm_epsilon == 1e12
    x = 3.0 * torch.randn(5, model.config.n_embd, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for site, sigma in sigmas.items():
            # torch's LayerNorm with the stored gain and eps computes the frozen site's map
            stored_ln = copy.deepcopy(stored.transformer.get_submodule(site)).double()
            frozen = copy.deepcopy(model.transformer.get_submodule(site)).double()
            assert isinstance(stored_ln, nn.LayerNorm) and frozen.sigma_avg == pytest.approx(sigma)
            torch.testing.assert_close(stored_ln(x), frozen(x), rtol=1e-6, atol=1e-8)
        diff = (stored(data).logits - model(data).logits).abs().max()
    assert float(diff) <= 1e-4
    with pytest.raises(NormgrowthError):
        to_ln_free_storage(_tiny_gpt2())  # LayerNorms not frozen yet


# ----- the built pair ------------------------------------------------------------------------------
def test_build_writes_both_checkpoints_and_record(pair):
    out, result, messages = pair
    assert result["cached"] is False
    assert Path(result["ln"]) == out / "ln" and Path(result["noln"]) == out / "noln"
    meta = json.loads((out / "zoo.json").read_text())
    assert meta["settings"] == dataclasses.asdict(TINY)
    assert meta["settings_hash"] == zoo.settings_hash(TINY) == result["settings_hash"]
    assert meta["ln_heldout_loss"] == result["ln_heldout_loss"]
    assert meta["noln_heldout_loss"] == pytest.approx(meta["frozen_ln_heldout_loss"], abs=1e-4)
    assert len(meta["resid_post_norm"]["ln"]) == TINY.n_layer
    assert any("step" in m and "loss" in m for m in messages)
    assert not list(out.glob(".building-*"))  # temp build folder removed


def test_checkpoints_load_with_transformers_and_have_bos(pair):
    out, _, _ = pair
    for name in ("ln", "noln"):
        model, tok = _hf(out / name)
        assert tok.bos_token == "<|endoftext|>" and tok.bos_token_id is not None
        assert model.config.bos_token_id == tok.bos_token_id
        assert model.config.n_layer == TINY.n_layer and model.config.n_embd == TINY.d_model
        assert tok.decode(tok(TEXT, add_special_tokens=False)["input_ids"]) == TEXT
    assert _hf(out / "ln")[0].config.layer_norm_epsilon == pytest.approx(1e-5)
    assert _hf(out / "noln")[0].config.layer_norm_epsilon == 1e12


def test_load_model_detects_ln_free_and_matches_hf(pair):
    out, _, _ = pair
    ln = load_model(str(out / "ln"), device="cpu")
    assert not ln.ln_free and ln.normalization == "LN"
    noln = load_model(str(out / "noln"), device="cpu")
    assert noln.ln_free and noln.normalization == "none" and noln.norm_eps == 1e12
    assert noln.bos_token_id == noln.tokenizer.bos_token_id
    hf, tok = _hf(out / "noln")
    tokens = _tokens(tok)
    with torch.no_grad():
        diff = (noln.forward(tokens).float() - hf(tokens).logits.float()).abs().max()
    assert float(diff) <= 1e-4


def test_stored_layernorms_are_linear_in_centred_input(pair):
    """Every stored LN is affine in the centred input (float64 copies, so rounding does not blur it):
    LN(c x_c) - b == c (LN(x_c) - b) and LN(x) == x_c * w_stored / 1e6 + b."""
    out, _, _ = pair
    noln, _ = _hf(out / "noln")
    ln, _ = _hf(out / "ln")
    torch.manual_seed(0)
    x = torch.randn(7, TINY.d_model, dtype=torch.float64) * 5.0
    x_centred = x - x.mean(-1, keepdim=True)
    c = 10.0

    def lns(model):
        return [copy.deepcopy(m).double() for m in model.modules() if isinstance(m, nn.LayerNorm)]

    assert len(lns(noln)) == 2 * TINY.n_layer + 1
    with torch.no_grad():
        for m in lns(noln):
            assert m.eps >= 1e6
            torch.testing.assert_close(m(c * x_centred) - m.bias, c * (m(x_centred) - m.bias), rtol=1e-7, atol=1e-9)
            torch.testing.assert_close(m(x), x_centred * m.weight / 1e6 + m.bias, rtol=1e-7, atol=1e-9)
        # the same check fails for an ordinary LayerNorm (scale-invariant, not linear)
        m = lns(ln)[0]
        assert not torch.allclose(m(c * x_centred) - m.bias, c * (m(x_centred) - m.bias), rtol=1e-3)


def test_recorded_heldout_losses_recomputed_from_checkpoints(pair):
    out, result, _ = pair
    docs, _ = zoo.stdlib_docstrings(TINY.max_chars, TINY.min_doc_chars)
    _, held = zoo.split_docs(docs, TINY.heldout_fraction)
    for name in ("ln", "noln"):
        model, tok = _hf(out / name)
        data = pack_sequences(tok(held, add_special_tokens=False)["input_ids"], tok.bos_token_id,
                              TINY.n_ctx)[:TINY.max_heldout_seqs]
        with torch.no_grad():
            loss = model(data, labels=data).loss  # HF's own shifted cross-entropy
        assert float(loss) == pytest.approx(result[f"{name}_heldout_loss"], abs=1e-4)
        if name == "ln":
            norms = resid_post_norms(model, data)
            assert norms.tolist() == pytest.approx(result["meta"]["resid_post_norm"]["ln"], rel=1e-4)


def test_resid_post_norms_match_load_model_hooks(pair):
    out, _, _ = pair
    loaded = load_model(str(out / "ln"), device="cpu")
    tokens = _tokens(loaded.tokenizer).repeat(2, 1)
    tokens[1, 1:] = tokens[1, 1:].flip(0)
    captured: dict[int, torch.Tensor] = {}
    hooks = [("resid_post", layer, lambda act, layer=layer: captured.__setitem__(layer, act.detach()))
             for layer in range(loaded.n_layers)]
    with torch.no_grad(), loaded.hooks(hooks):
        loaded.forward(tokens)
    expected = torch.stack([captured[layer][:, 1:].float().norm(dim=-1).mean() for layer in range(loaded.n_layers)])
    torch.testing.assert_close(resid_post_norms(loaded.hf_model, tokens), expected, rtol=1e-5, atol=1e-6)


def test_cache_reused_then_rebuilt_when_settings_change(pair, tmp_path):
    out, result, _ = pair
    weights = out / "ln" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    messages: list[str] = []
    again = build_pair(out, TINY, progress=messages.append)
    assert again["cached"] is True and weights.stat().st_mtime_ns == mtime
    assert any("reusing" in m for m in messages)
    # the same settings in a fresh folder give bit-identical checkpoints (deterministic build)
    first = build_pair(tmp_path, TINY, progress=None)
    assert first["cached"] is False
    assert first["meta"]["weights_sha256"] == result["meta"]["weights_sha256"]
    assert first["ln_heldout_loss"] == result["ln_heldout_loss"]
    # a changed setting rebuilds
    changed = dataclasses.replace(TINY, seed=1)
    rebuilt = build_pair(tmp_path, changed, progress=None)
    assert rebuilt["cached"] is False and rebuilt["settings_hash"] != first["settings_hash"]
    assert json.loads((tmp_path / "zoo.json").read_text())["settings"]["seed"] == 1
    assert rebuilt["meta"]["weights_sha256"]["ln"] != first["meta"]["weights_sha256"]["ln"]
    assert zoo.read_cache(tmp_path, TINY) is None and zoo.read_cache(tmp_path, changed) is not None


def test_interrupted_or_corrupt_build_never_looks_valid(pair, tmp_path, monkeypatch):
    out, _, _ = pair
    for name in BUILT:
        (shutil.copytree if name != "zoo.json" else shutil.copy)(out / name, tmp_path / name)
    assert zoo.read_cache(tmp_path, TINY) is not None
    # a build that dies half-way leaves no record for its settings, no temp folder, and the old pair intact
    stale = tmp_path / ".building-999999999-x"  # left by a killed build whose process is gone
    stale.mkdir()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo.build, "remove_layernorm", boom)
    changed = dataclasses.replace(TINY, seed=2)
    with pytest.raises(KeyboardInterrupt):
        build_pair(tmp_path, changed, progress=None)
    monkeypatch.undo()
    assert zoo.read_cache(tmp_path, changed) is None
    assert zoo.read_cache(tmp_path, TINY) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == BUILT
    # a corrupted checkpoint invalidates the cache and is rebuilt
    weights = tmp_path / "noln" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert zoo.read_cache(tmp_path, TINY) is None
    rebuilt = build_pair(tmp_path, TINY, progress=None)
    assert rebuilt["cached"] is False and zoo.read_cache(tmp_path, TINY) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == BUILT


# ----- training checkpoints, the control, the published-recipe details ----------------------------
def test_checkpoint_steps_are_log_spaced_with_ends():
    steps = zoo.checkpoint_steps(700, 8)
    assert steps[0] == 0 and steps[-1] == 700 and len(steps) == 8
    ratios = np.diff(np.log(steps[1:]))
    assert np.allclose(ratios, ratios.mean(), rtol=0.1)  # equal steps in log space (rounded)
    assert zoo.checkpoint_steps(700, 0) == [] and zoo.checkpoint_steps(3, 8) == [0, 1, 2, 3]


def test_training_checkpoints_are_the_model_at_those_steps(pair):
    from safetensors.torch import load_file

    out, result, _ = pair
    meta = result["meta"]
    steps = meta["train_checkpoint_steps"]
    assert steps == zoo.checkpoint_steps(TINY.train_steps, TINY.train_checkpoints)
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(f"step-{n}" for n in steps)
    last = load_file(out / "train" / f"step-{TINY.train_steps}" / "model.safetensors")
    final = load_file(out / "ln" / "model.safetensors")
    assert all(torch.equal(last[k], final[k]) for k in final)
    # step 0 is the untrained model: GPT2LMHeadModel of the same config right after torch.manual_seed(seed)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(TINY.seed)
    init = GPT2LMHeadModel(GPT2Config.from_pretrained(out / "ln")).state_dict()
    first = load_file(out / "train" / "step-0" / "model.safetensors")
    assert all(torch.equal(first[k], init[k]) for k in first)
    assert not torch.equal(first["transformer.h.0.mlp.c_fc.weight"], final["transformer.h.0.mlp.c_fc.weight"])


def test_control_is_the_ln_model_trained_on_the_twins_schedule(tiny_zoo):
    """What the build's optimisers were fed (recorded by conftest.tiny_zoo): the control took exactly the
    twin's batches at the twin's learning rates, (2L+1) x steps_per_site steps at the constant removal lr
    then the recovery steps; it keeps ordinary LayerNorms and was trained away from the LN model."""
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    out, result, _, fine_tunings = tiny_zoo
    twin, control = fine_tunings
    n_site_steps = (2 * TINY.n_layer + 1) * TINY.ln_removal_steps_per_site
    assert control == twin and len(twin) == n_site_steps + TINY.recovery_steps
    lrs = [lr for lr, _ in twin]
    assert lrs[:n_site_steps] == [TINY.ln_removal_lr] * n_site_steps
    assert lrs[n_site_steps] == TINY.ln_removal_lr and lrs[-1] < lrs[n_site_steps]  # the cosine decays
    assert len({sha for _, sha in twin}) > 1  # a stream of batches, not one repeated
    hf = GPT2LMHeadModel.from_pretrained(out / "control")
    assert hf.config.layer_norm_epsilon == 1e-5 and not any(isinstance(m, FrozenLayerNorm) for m in hf.modules())
    assert load_model(str(out / "control")).ln_free is False
    control_w, ln_w = load_file(out / "control" / "model.safetensors"), load_file(out / "ln" / "model.safetensors")
    assert any(not torch.equal(control_w[k], ln_w[k]) for k in ln_w)
    meta = result["meta"]
    assert meta["recipe"]["fine_tuning_steps"] == n_site_steps + TINY.recovery_steps
    assert result["control_heldout_loss"] == pytest.approx(meta["ln_removal_trace"]["control"][-1]["heldout_loss"])


def test_sigmas_measured_apart_for_special_tokens():
    """measure_sigmas against numpy on HF's hidden_states[0] (the input of h.0.ln_1): ordinary tokens and
    special ones (position 0 and every id 0) averaged separately."""
    model = _tiny_gpt2()
    batch = torch.randint(1, 50, (3, 10), generator=torch.Generator().manual_seed(3))
    batch[:, 0] = 0
    batch[1, 5] = 0
    with torch.no_grad():
        emb = model(batch, output_hidden_states=True).hidden_states[0].numpy().astype(np.float64)
    std = np.sqrt(np.var(emb, axis=-1) + model.config.layer_norm_epsilon)
    special = np.zeros(batch.shape, dtype=bool)
    special[:, 0] = True
    special[1, 5] = True
    got = zoo.measure_sigmas(model, ["h.0.ln_1", "ln_f"], [batch], special_id=0)
    assert got["h.0.ln_1"][0] == pytest.approx(std[~special].mean(), rel=1e-5)
    assert got["h.0.ln_1"][1] == pytest.approx(std[special].mean(), rel=1e-5)


def test_frozen_layernorm_special_scale_is_phased_out():
    ln = nn.LayerNorm(4, eps=0.0)
    frozen = FrozenLayerNorm(ln, sigma_avg=2.0, sigma_special=8.0)
    x = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))
    frozen.special = torch.tensor([[True, False, False]])
    centred = x - x.mean(-1, keepdim=True)
    with torch.no_grad():
        y0 = frozen(x)
        torch.testing.assert_close(y0[0, 0], centred[0, 0] / 8.0 * ln.weight + ln.bias)
        torch.testing.assert_close(y0[0, 1:], centred[0, 1:] / 2.0 * ln.weight + ln.bias)
        frozen.phase.fill_(0.5)
        torch.testing.assert_close(frozen(x)[0, 0], centred[0, 0] / 5.0 * ln.weight + ln.bias)
        frozen.phase.fill_(1.0)
        torch.testing.assert_close(frozen(x), centred / 2.0 * ln.weight + ln.bias)


def test_removal_trace_and_recipe_recorded(pair):
    out, result, _ = pair
    meta = json.loads((out / "zoo.json").read_text())
    sites = ln_sites(TINY.n_layer)
    twin, control = meta["ln_removal_trace"]["twin"], meta["ln_removal_trace"]["control"]
    assert [p["site"] for p in twin] == ["LN model"] + sites + ["recovery"] == [p["site"] for p in control]
    assert twin[0] == control[0] and twin[0]["heldout_loss"] == pytest.approx(meta["ln_heldout_loss"])
    assert twin[-1]["heldout_loss"] == pytest.approx(meta["noln_heldout_loss"], abs=1e-6)
    assert all(p["fit"]["window"] == [0, TINY.n_layer - 1] for p in twin)
    assert twin[-1]["resid_post_norm"] == pytest.approx(meta["resid_post_norm"]["noln"], rel=1e-4)
    assert set(meta["sigma_special"]) == set(sites) and set(meta["growth_per_layer"]) == {"ln", "noln", "control"}
    assert "before any removal" in meta["recipe"]["sigma"] and meta["recipe"]["special_sigma"]


def test_two_seeds_and_their_spread(pair, tmp_path):
    from normgrowth.zoo import build_seeds, seed_summary

    out, _, _ = pair
    for name in BUILT:  # seed 0 is the session's pair: reused, only seed 1 is trained
        (shutil.copytree if name != "zoo.json" else shutil.copy)(out / name, tmp_path / name)
    results = build_seeds(tmp_path, TINY, n_seeds=2, progress=None)
    assert results[0]["cached"] is True and results[1]["cached"] is False
    assert [r["meta"]["settings"]["seed"] for r in results] == [0, 1]
    assert Path(results[1]["noln"]) == tmp_path / "seeds" / "seed-1" / "noln"
    summary = json.loads((tmp_path / "seeds.json").read_text())
    d = [r["meta"]["ln_removal_trace"]["twin"][-1]["fit"]["growth_factor"]
         - r["meta"]["ln_removal_trace"]["control"][-1]["fit"]["growth_factor"] for r in results]
    assert [s["twin_minus_control"] for s in summary["seeds"]] == pytest.approx(d)
    from scipy import stats

    half = stats.t.ppf(0.975, 1) * np.std(d, ddof=1) / np.sqrt(2)
    assert summary["twin_minus_control_ci95"] == pytest.approx([np.mean(d) - half, np.mean(d) + half])
    assert seed_summary([results[0]["meta"]])["twin_minus_control_ci95"] is None
    with pytest.raises(NormgrowthError):
        build_seeds(tmp_path, TINY, n_seeds=0)


def test_fig_ln_removal_draws_the_recorded_trace(pair, tmp_path, capsys):
    import importlib
    import sys

    from matplotlib.image import imread

    folder = str(Path(__file__).resolve().parents[1] / "analyses")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    fig = importlib.import_module("fig_ln_removal")
    out, result, _ = pair
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(out / "zoo.json", results / "zoo.json")
    twin = fig.trace_arrays(result["meta"]["ln_removal_trace"]["twin"])
    assert twin["loss"][-1] == pytest.approx(result["noln_heldout_loss"], abs=1e-6)
    assert np.all(twin["lo"] <= twin["g"]) and np.all(twin["g"] <= twin["hi"])
    paths = fig.main(results, tmp_path / "figures")
    assert [p.name for p in paths] == ["fig_ln_removal.png", "fig_ln_removal.pdf"]
    assert imread(paths[0])[..., :3].std() > 0.05
    assert fig.main(tmp_path / "none", tmp_path / "figures") == []
    assert "fig_ln_removal: skipped" in capsys.readouterr().out
