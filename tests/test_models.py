"""Model loading: logits parity with plain HF, LN-free detection, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAMILIES, STORIES, hf_model
from normgrowth.errors import NormgrowthError
from normgrowth.models import load_model


@pytest.mark.parametrize("name", [*FAMILIES, "gpt2_lnfree"])
def test_bridge_logits_equal_hf(name, tiny_dirs, loaded):
    model = loaded(name)
    tokens = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 7:] = False  # right padding must not change the real tokens' logits
    with torch.inference_mode():
        ours = model.forward(tokens, attention_mask=mask)
        ref = hf_model(tiny_dirs[name])(tokens, attention_mask=mask.long()).logits
    assert ours.shape == ref.shape
    diff = (ours - ref)[mask].abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"


def test_family_facts(loaded):
    assert loaded("neox").parallel_blocks and not loaded("neox").has_site("resid_mid")
    assert loaded("gpt2").has_site("resid_mid") and loaded("gpt2").has_pos_embed
    llama = loaded("llama")
    assert (llama.normalization, llama.centers, llama.n_kv_heads, llama.n_heads) == ("RMS", False, 2, 4)
    assert loaded("opt").family == "opt" and loaded("neo").family == "gpt-neo"


def test_ln_free_detected_and_eps_untouched(loaded):
    model = loaded("gpt2_lnfree")
    assert model.ln_free and model.normalization == "none" and model.centers
    for which in ("ln1", "ln2", "ln_final"):
        for module in model.norm_modules(which):
            assert module.eps == 1e12  # nothing overwrote it
            assert module.weight.abs().median().item() > 1e4
    assert not loaded("gpt2").ln_free and loaded("gpt2").normalization == "LN"
    # and the LN-free normalisation is (x - mean) * w_orig / sigma: linear in the centred input
    ln = model.norm_modules("ln1")[0]
    x = torch.randn(5, model.d_model)
    x = x - x.mean(-1, keepdim=True)
    with torch.no_grad():
        assert torch.allclose((ln(3 * x) - ln.bias), 3 * (ln(x) - ln.bias), rtol=1e-4, atol=1e-5)
        expected = x * ln.weight / 1e6
        assert torch.allclose(ln(x) - ln.bias, expected, rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(not STORIES.is_dir(), reason="stories260K fixture not present")
def test_real_llama_fixture_parity():
    model = load_model(str(STORIES))
    tokens = torch.from_numpy(np.load(STORIES / "samples.npy")[:4, :64])
    with torch.inference_mode():
        ours = model.forward(tokens)
        ref = hf_model(STORIES)(tokens).logits
    assert (ours - ref).abs().max().item() <= 1e-4
    assert model.tokenizer is None and model.bos_token_id == 1 and model.n_kv_heads == 4


def test_missing_directory_error(tmp_path):
    with pytest.raises(NormgrowthError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(NormgrowthError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"],
                                                      "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 8}))
    with pytest.raises(NormgrowthError, match="BertForMaskedLM.*does not support.*GPT-2"):
        load_model(str(tmp_path))


def test_unreachable_hub_name():
    with pytest.raises(NormgrowthError, match="hub cannot be reached.*local checkpoint"):
        load_model("someone/not-a-real-model")


def test_bad_dtype_and_device(tiny_dirs):
    with pytest.raises(NormgrowthError, match="unknown dtype"):
        load_model(str(tiny_dirs["gpt2"]), dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(NormgrowthError, match="no CUDA GPU"):
            load_model(str(tiny_dirs["gpt2"]), device="cuda")
