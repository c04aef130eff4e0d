"""Model loading: logits parity with plain HF, model facts, LN-free detection, clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import FAMILIES, STORIES, hf_model, run_main, tiny_config
from normgrowth.errors import NormgrowthError
from normgrowth.models import ModelConfig, load_model, placement_of


# Facts read off the plain HF model, independently of the bridge: the blocks, the MLP's input projection
# (and the axis of its weight holding the hidden width), the learned position embedding if any.
HF_FACTS = {
    "gpt2": ("transformer.h", "mlp.c_fc", 1, "transformer.wpe"),
    "neox": ("gpt_neox.layers", "mlp.dense_h_to_4h", 0, None),
    "llama": ("model.layers", "mlp.up_proj", 0, None),
    "opt": ("model.decoder.layers", "fc1", 0, "model.decoder.embed_positions"),
    "neo": ("transformer.h", "mlp.c_fc", 0, "transformer.wpe"),
}
HF_INPUT_NORM = {"gpt2": "ln_1", "neox": "input_layernorm", "llama": "input_layernorm", "opt": "self_attn_layer_norm",
                 "neo": "ln_1"}  # each block's first input norm


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
    assert llama.gated_mlp and llama.act_fn == "silu" and llama.positional_embedding == "rotary"
    assert loaded("opt").family == "opt" and loaded("neo").family == "gpt-neo"
    assert loaded("neo").eager_attention and not loaded("gpt2").eager_attention  # HF's GPT-Neo has no SDPA
    assert not any(loaded(f).gated_mlp for f in FAMILIES if f != "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_model_config_matches_the_plain_hf_model(family, tiny_dirs, loaded):
    """Sizes and layout facts agree with what the plain HF model's modules and config say."""
    model = loaded(family)
    hf = hf_model(tiny_dirs[family])
    blocks_path, mlp_in, width_axis, pos_path = HF_FACTS[family]
    blocks = hf.get_submodule(blocks_path)
    cfg = hf.config
    assert model.n_layers == len(blocks)
    assert model.d_model == hf.get_input_embeddings().weight.shape[1]
    assert model.vocab_size == hf.get_input_embeddings().weight.shape[0]
    assert model.d_mlp == blocks[0].get_submodule(mlp_in).weight.shape[width_axis]
    assert model.n_heads == getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", None))
    assert model.d_head * model.n_heads == model.d_model
    assert model.has_pos_embed == (pos_path is not None) == model.has_site("pos_embed")
    assert (model.positional_embedding == "standard") == model.has_pos_embed
    assert model.norm_placement == "pre" and model.input_norm and not model.output_norm
    first_norm = hf.get_submodule(blocks_path)[0].get_submodule(HF_INPUT_NORM[family])
    assert model.norm_eps == getattr(first_norm, "eps", getattr(first_norm, "variance_epsilon", None))
    assert model.bos_token_id == cfg.bos_token_id


def test_parallel_blocks_come_from_the_checkpoint_config(tmp_path):
    """A sequential GPT-NeoX (use_parallel_residual=False) has resid_mid; nothing is hard-coded per family."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("neox")
    cfg.use_parallel_residual = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "seq")
    model = load_model(str(tmp_path / "seq"))
    assert not model.parallel_blocks and model.has_site("resid_mid")
    got, tokens = [], torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), model.hooks([("resid_mid", 1, lambda x: got.append(x.clone())),
                                               ("resid_pre", 1, lambda x: got.append(x.clone())),
                                               ("attn_out", 1, lambda x: got.append(x.clone()))]):
        model.forward(tokens)
    pre, attn, mid = got  # forward order
    torch.testing.assert_close(mid, pre + attn, rtol=1e-5, atol=1e-6)


def test_config_is_frozen_and_read_through(loaded):
    model = loaded("gpt2")
    for f in dataclasses.fields(ModelConfig):
        assert getattr(model, f.name) == getattr(model.config, f.name), f.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.ln_free = True
    with pytest.raises(AttributeError):
        model.ln_free = True  # no patching after load
    assert json.loads(json.dumps(model.config.to_json()))["norm_placement"] == "pre"


def test_norm_placement_names():
    """pre: input norms only; peri: input and output norms (Gemma 2); post: output norms only (OLMo 2)."""
    assert placement_of(True, False, ln_free=False) == "pre"
    assert placement_of(True, True, ln_free=False) == "peri"
    assert placement_of(False, True, ln_free=False) == "post"
    assert placement_of(True, False, ln_free=True) == "none"


def test_ln_free_detected_and_eps_untouched(loaded):
    model = loaded("gpt2_lnfree")
    assert model.ln_free and model.normalization == "none" and model.centers and model.norm_placement == "none"
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
    with pytest.raises(NormgrowthError, match="BertForMaskedLM.*encoder model: only decoder-only causal"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_config_without_architectures_maps_model_type(family, tiny_dirs, tmp_path):
    """A config.json with model_type but no architectures loads as transformers' causal-LM class for it."""
    folder = tmp_path / family
    shutil.copytree(tiny_dirs[family], folder)
    doc = json.loads((folder / "config.json").read_text())
    expected_class = doc.pop("architectures")[0]
    (folder / "config.json").write_text(json.dumps(doc))
    model = load_model(str(folder))
    assert model.architecture == expected_class
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(model.forward(tokens), hf_model(tiny_dirs[family])(tokens).logits,
                                   rtol=1e-4, atol=1e-4)


def test_config_without_architectures_of_an_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2,
                                                      "intermediate_size": 8}))
    # transformers' own table maps bert to BertLMHeadModel, which no family row supports
    with pytest.raises(NormgrowthError, match="architecture 'BertLMHeadModel', which normgrowth does not support"):
        load_model(str(tmp_path))


def test_public_names_importable_from_models():
    """The split modules' public names stay importable from normgrowth.models."""
    import normgrowth.models as models
    from normgrowth import checkpoint_files, families, native_attention, sources

    for module, names in ((checkpoint_files, ["check_checkpoint_files", "safetensors_shapes", "read_gguf_header"]),
                          (families, ["FAMILIES", "Family", "Refusal", "supported_architecture"]),
                          (sources, ["load_config", "resolve_source", "NAMED_MODELS"])):
        for name in names:
            assert getattr(models, name) is getattr(module, name), name
    assert models.use_native_attention is native_attention.use_native_attention


def test_unreachable_hub_name():
    with pytest.raises(NormgrowthError, match="hub cannot be reached.*local checkpoint"):
        load_model("someone/not-a-real-model")


def test_bad_dtype_and_device(tiny_dirs):
    with pytest.raises(NormgrowthError, match="unknown dtype"):
        load_model(str(tiny_dirs["gpt2"]), dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(NormgrowthError, match="no CUDA GPU"):
            load_model(str(tiny_dirs["gpt2"]), device="cuda")


# ----- corrupt or partial checkpoints: one line naming the file, exit code 2 --------------------------
def _corrupt(kind, source, target):
    """A copy of the checkpoint ``source`` broken in one way."""
    from transformers import AutoModelForCausalLM

    if kind == "missing shard":
        AutoModelForCausalLM.from_pretrained(source).save_pretrained(target, max_shard_size="20KB")
        index = json.loads((target / "model.safetensors.index.json").read_text())
        shard = sorted(set(index["weight_map"].values()))[1]
        (target / shard).unlink()
        return target / shard
    shutil.copytree(source, target)
    if kind == "bin, wrong shape":  # a legacy torch.save checkpoint: HF's loader finds the mismatch
        from safetensors.torch import load_file

        torch.save(load_file(target / "model.safetensors"), target / "pytorch_model.bin")
        (target / "model.safetensors").unlink()
    if kind == "truncated":
        weights = target / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) * 2 // 3])
        return weights
    config = json.loads((target / "config.json").read_text())
    config["n_inner"] = 2 * 4 * config["n_embd"]  # the stored MLP is 4 * n_embd wide
    (target / "config.json").write_text(json.dumps(config))
    return target / ("pytorch_model.bin" if kind.startswith("bin") else "model.safetensors")


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is truncated or corrupt"),
    ("missing shard", "which is missing"),
    ("wrong shape", "with shape .* but config.json implies"),
    ("bin, wrong shape", "stored shapes differ from those config.json implies"),
])
def test_corrupt_checkpoint_is_one_line_naming_the_file(kind, message, tiny_dirs, token_file, tmp_path, monkeypatch,
                                                      capsys):
    import re

    bad = _corrupt(kind, tiny_dirs["gpt2"], tmp_path / "ckpt")
    code, _, err = run_main(monkeypatch, capsys, "report", tmp_path / "ckpt", "--data", token_file,
                         "--out", tmp_path / "cache")
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert bad.name in lines[0] and re.search(message, lines[0]), lines[0]


def test_intact_sharded_checkpoint_loads(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]).save_pretrained(tmp_path / "s", max_shard_size="20KB")
    assert len(list((tmp_path / "s").glob("*.safetensors"))) > 1
    model = load_model(str(tmp_path / "s"))
    tokens = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model.forward(tokens), hf_model(tiny_dirs["gpt2"])(tokens).logits)
