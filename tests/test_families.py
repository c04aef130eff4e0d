"""Every supported decoder family on a tiny random checkpoint (two layers, every parameter random):
logits equal plain HF, collected site norms equal an independent computation from plain HF module hooks,
writes sum to the stream, the family facts are right, and the analyses run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ALL_FAMILIES, FAMILIES, build_tiny, hf_model, randomise_all
from normgrowth.collector import collect
from normgrowth.data import TokenBatch

NEW_FAMILIES = tuple(f for f in ALL_FAMILIES if f not in FAMILIES)

# Where each family's blocks live in the plain HF model, the attention / MLP modules, and the output norms
# whose result is added to the stream (peri / post placement). Read off the HF modeling files.
LAYERS = "model.layers"
HF_BLOCKS = {
    "gptj": ("transformer.h", "attn", "mlp", None, None),
    "bloom": ("transformer.h", "self_attention", "mlp", None, None),
    "falcon": ("transformer.h", "self_attention", "mlp", None, None),
    "falcon_seq": ("transformer.h", "self_attention", "mlp", None, None),
    "gemma2": (LAYERS, "self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3": (LAYERS, "self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": (LAYERS, "self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm"),
    "bigcode": ("transformer.h", "attn", "mlp", None, None),
}
PARALLEL = {"gptj", "falcon", "phi", "cohere"}  # attention and MLP read the same stream; writes added together
SHARED_NORM = {"gptj", "falcon", "phi", "cohere"}  # ... through one shared input norm
LAYER_NORM = {"gptj", "bloom", "falcon", "falcon_seq", "stablelm", "olmo", "phi", "cohere", "starcoder2", "bigcode"}
PLACEMENT = {"gemma2": "peri", "gemma3": "peri", "olmo2": "post"}  # every other family: "pre"
RESIDUAL_INCLUDED = {"bloom"}  # HF's Bloom attention / MLP return write + residual
MOE = {"mixtral": 4, "qwen2_moe": 4, "qwen3_moe": 4, "olmoe": 4}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_tiny(f, root / f, seed=i, n_layers=2, init=lambda m, s=i: randomise_all(m, 100 + s))
            for i, f in enumerate(NEW_FAMILIES)}


@pytest.fixture(scope="session")
def family_model(family_dirs):
    from normgrowth.models import load_model

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(str(family_dirs[name]))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, 100, (4, 10), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 7:] = False
    mask[3, 4:] = False
    tokens[~mask] = 0
    return TokenBatch(tokens, mask, "test")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def hf_writes(path, family, tokens, mask):
    """Per layer from plain HF module hooks: resid_pre (block input), resid_post (block output), attn_out and
    mlp_out as the stream receives them (after any output norm, times Granite's residual multiplier,
    minus the residual Bloom's modules add themselves); resid_mid = resid_pre + attn_out for sequential
    blocks."""
    model = hf_model(path)
    blocks_path, attn_name, mlp_name, attn_norm, mlp_norm = HF_BLOCKS.get(family, (LAYERS, "self_attn", "mlp",
                                                                                   None, None))
    mult = float(getattr(model.config, "residual_multiplier", 1.0) or 1.0)
    blocks = model.get_submodule(blocks_path)
    got: dict[str, list] = {k: [] for k in ("resid_pre", "resid_post", "attn_out", "mlp_out")}
    handles = []

    def write_hook(key):
        def hook(module, args, kwargs, out):
            out = _first(out).detach()
            if family in RESIDUAL_INCLUDED:
                residual = args[1] if len(args) > 1 else kwargs["residual"]
                out = out - residual
            got[key].append(out.reshape(*tokens.shape, -1) * mult)
        return hook

    for block in blocks:
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs: got["resid_pre"].append((args[0] if args else kwargs["hidden_states"]).detach()),
            with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, out: got["resid_post"].append(_first(out).detach())))
        for key, name, norm in (("attn_out", attn_name, attn_norm), ("mlp_out", mlp_name, mlp_norm)):
            handles.append(block.get_submodule(norm or name).register_forward_hook(write_hook(key), with_kwargs=True))
    with torch.no_grad():
        logits = model(tokens, attention_mask=mask.long()).logits
        embeds = model.get_input_embeddings()(tokens)
    for h in handles:
        h.remove()
    if family not in PARALLEL:
        got["resid_mid"] = [p + a for p, a in zip(got["resid_pre"], got["attn_out"])]
    return got, logits, embeds


def _norms(x: torch.Tensor) -> np.ndarray:
    return x.double().norm(dim=-1).numpy()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_logits_sites_and_facts(family, family_dirs, family_model, batch):
    model = family_model(family)
    tokens, mask = batch.tokens, batch.attention_mask
    acts, ref_logits, embeds = hf_writes(family_dirs[family], family, tokens, mask)

    # logits equal plain HF on the real tokens
    with torch.inference_mode():
        ours = model.forward(tokens, attention_mask=mask)
    rel = ((ours - ref_logits)[mask].abs().max() / ref_logits[mask].abs().max()).item()
    assert rel <= 1e-5, f"{family}: logits differ from HF by {rel:.2e} (relative)"

    # the independent HF writes add up to HF's own stream (the reference is consistent)
    for l in range(model.n_layers):
        total = acts["resid_pre"][l] + acts["attn_out"][l] + acts["mlp_out"][l]
        scale = acts["resid_post"][l].abs().max()
        assert ((total - acts["resid_post"][l]).abs().max() / scale).item() <= 1e-5

    # collected norms equal the HF computation, token by token averaged over real positions >= 1
    res = collect(model, batch, batch_size=2)
    main = mask.numpy().copy()
    main[:, 0] = False
    for site, per_layer in acts.items():
        st = res.sites[site]
        assert st is not None, f"{family}: site {site} missing"
        for l, x in enumerate(per_layer):
            norms = _norms(x)
            np.testing.assert_allclose(st.mean[l], norms[main].mean(), rtol=1e-5, err_msg=f"{family} {site}.{l}")
            np.testing.assert_allclose(st.bos_mean[l], norms[:, 0].mean(), rtol=1e-5)
    if family in PARALLEL:
        assert res.sites["resid_mid"] is None
    # the embedding write is what enters the stream (Gemma's sqrt(d) scale, Granite's multiplier, Bloom's LN)
    first = acts["resid_pre"][0]
    if model.has_pos_embed:
        np.testing.assert_allclose(res.embed["embed"].mean[0], _norms(embeds)[main].mean(), rtol=1e-5)
    else:
        np.testing.assert_allclose(res.embed["embed"].mean[0], _norms(first)[main].mean(), rtol=1e-5)

    # facts: placement, parallel blocks, normalisation kind, experts
    meta = res.to_json()["meta"]
    assert meta["norm_placement"] == PLACEMENT.get(family, "pre") == model.norm_placement
    assert meta["parallel_blocks"] is (family in PARALLEL)
    assert model.normalization == ("LN" if family in LAYER_NORM else "RMS") == meta["normalization"]
    assert model.mlp_norm is (family not in SHARED_NORM and family != "olmo2")
    assert model.n_experts == MOE.get(family, 0)
    assert model.input_norm is (family != "olmo2") and model.output_norm is (family in PLACEMENT)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_bridge_writes_sum_to_stream(family, family_model, batch):
    model = family_model(family)
    sites = [(s, l) for l in range(model.n_layers) for s in ("resid_pre", "resid_mid", "resid_post", "attn_out",
                                                              "mlp_out") if model.has_site(s)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, sites=sites)
    for l in range(model.n_layers):
        pre, post = cache[("resid_pre", l)], cache[("resid_post", l)]
        attn, mlp = cache[("attn_out", l)], cache[("mlp_out", l)]
        scale = post.abs().max()
        assert ((pre + attn + mlp - post).abs().max() / scale).item() <= 1e-5
        if model.has_resid_mid:
            mid = cache[("resid_mid", l)]
            assert ((pre + attn - mid).abs().max() / scale).item() <= 1e-5


@pytest.mark.parametrize("family", ["gemma2", "olmo2", "falcon", "qwen3_moe", "phi", "bloom"])
def test_family_report_runs(family, family_dirs, token_file):
    from normgrowth.pipeline import run_report
    from normgrowth.results import format_report_table

    run = run_report(str(family_dirs[family]), str(token_file), batch_size=4)
    doc = run.document()
    assert doc["meta"]["norm_placement"] == PLACEMENT.get(family, "pre")
    assert doc["meta"]["parallel_blocks"] is (family in PARALLEL)
    assert f"{PLACEMENT.get(family, 'pre')}-norm" in format_report_table(run.results)
    assert set(run.fits) == {s for s, st in run.results.sites.items() if st is not None}


def _write_config(path, doc):
    import json

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(doc))
    return str(path)


def test_unsupported_causal_architecture_names_the_families(tmp_path):
    from normgrowth.errors import NormgrowthError
    from normgrowth.models import load_model

    spec = _write_config(tmp_path / "m", {"model_type": "gpt2", "architectures": ["FancyNewForCausalLM"]})
    with pytest.raises(NormgrowthError, match="'FancyNewForCausalLM', which normgrowth does not support: ") as err:
        load_model(spec)
    from normgrowth.models import FAMILIES as SUPPORTED

    assert all(f.label in str(err.value) for f in SUPPORTED.values()) and "\n" not in str(err.value)


def test_encoder_decoder_is_refused_in_one_line(tmp_path):
    from normgrowth.errors import NormgrowthError
    from normgrowth.models import load_model

    spec = _write_config(tmp_path / "t5", {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                                           "is_encoder_decoder": True, "vocab_size": 10, "d_model": 8})
    with pytest.raises(NormgrowthError, match="encoder-decoder model: only decoder-only causal language models"):
        load_model(spec)


def test_unknown_rope_type_names_the_field(tmp_path):
    import json

    from normgrowth.errors import NormgrowthError
    from normgrowth.models import load_model

    path = build_tiny("llama", tmp_path / "rope", n_layers=1)
    cfg = json.loads((path / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(cfg.get(key), dict):
            cfg[key]["rope_type"] = "warp"
    if not any(isinstance(cfg.get(k), dict) for k in ("rope_parameters", "rope_scaling")):
        cfg["rope_scaling"] = {"rope_type": "warp", "factor": 2.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NormgrowthError, match=r"config field 'rope_\w+\.rope_type' = 'warp'.*cannot map"):
        load_model(str(path))
