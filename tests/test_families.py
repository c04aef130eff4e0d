"""Every supported decoder family on a tiny random checkpoint (two layers, every parameter random):
logits equal plain HF, collected site norms equal an independent computation from plain HF module hooks,
writes sum to the stream, the family facts are right, and the analyses run."""

from __future__ import annotations

import warnings

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
    assert (res.mlp_act_rate is None) is (family in MOE)  # no single pre-activation in a mixture of experts
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


@pytest.mark.parametrize("family", ["gemma2", "falcon", "qwen3_moe"])
def test_family_report_runs(family, family_dirs, token_file):
    from normgrowth.pipeline import run_report
    from normgrowth.report import format_report_table

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


# ----- weights against the plain HF state dict ------------------------------------------------------
GEMMA_GAIN = {"gemma", "gemma2", "gemma3"}  # HF's Gemma RMSNorm multiplies by 1 + weight
INPUT_NORM_NAME = {"gptj": "ln_1", "bigcode": "ln_1", "olmo2": None}  # others: input_layernorm
MLP_NORM_NAME = {"gptj": "ln_1", "bigcode": "ln_2", "falcon": "input_layernorm", "phi": "input_layernorm",
                 "cohere": "input_layernorm", "gemma2": "pre_feedforward_layernorm",
                 "gemma3": "pre_feedforward_layernorm", "olmo2": None}  # others: post_attention_layernorm


def _gain(block, name, family, d):
    if name is None:
        return torch.ones(d, dtype=torch.float64)
    w = getattr(block.get_submodule(name), "weight", None)
    if w is None:  # OLMo's LayerNorm has no parameters
        return torch.ones(d, dtype=torch.float64)
    return w.detach().double() + (1.0 if family in GEMMA_GAIN else 0.0)


def hf_value_output(family, block, n_heads, n_kv, d_head, d):
    """Per stored K/V head the value rows ``[n_kv, d_head, d]`` and the output projection ``[d, n_heads d_head]``
    (``nn.Linear`` layout, ``y = x W^T``), read from each family's HF parameters."""
    if family == "bloom":  # fused per head: [n_heads, (q, k, v), d_head, d]
        qkv = block.self_attention.query_key_value.weight.view(n_heads, 3, d_head, d)
        return qkv[:, 2], block.self_attention.dense.weight
    if family in ("falcon", "falcon_seq"):  # multi-query: [q heads..., k, v]
        w = block.self_attention.query_key_value.weight
        return w[(n_heads + 1) * d_head:].view(1, d_head, d), block.self_attention.dense.weight
    if family == "bigcode":  # multi-query: [q (d), k (d_head), v (d_head)]
        w = block.attn.c_attn.weight
        return w[d + d_head:].view(1, d_head, d), block.attn.c_proj.weight
    if family == "phi3":  # [q, k, v] stacked rows
        w = block.self_attn.qkv_proj.weight
        return w[(n_heads + n_kv) * d_head:].view(n_kv, d_head, d), block.self_attn.o_proj.weight
    attn = block.attn if family == "gptj" else block.self_attn
    out = {"gptj": "out_proj", "phi": "dense"}.get(family, "o_proj")
    return attn.v_proj.weight.view(n_kv, d_head, d), getattr(attn, out).weight


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_weight_norms_match_hf_state_dict(family, family_dirs, family_model):
    from normgrowth.weights import weight_norms

    model = family_model(family)
    hf = hf_model(family_dirs[family])
    cfg = hf.config
    d = hf.get_input_embeddings().weight.shape[1]
    n_heads = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head
    d_head = d // n_heads
    blocks = hf.get_submodule(HF_BLOCKS.get(family, (LAYERS,))[0])
    multi_query = {"falcon", "falcon_seq", "bigcode"}  # one K/V head
    n_kv = 1 if family in multi_query else (getattr(cfg, "num_key_value_heads", None) or n_heads)
    wn = weight_norms(model)
    for l, block in enumerate(blocks):
        g1 = _gain(block, INPUT_NORM_NAME.get(family, "input_layernorm"), family, d)
        v, o = (t.detach().double() for t in hf_value_output(family, block, n_heads, n_kv, d_head, d))
        for h in range(n_heads):
            kv = h // (n_heads // n_kv)
            w_ov = g1[:, None] * v[kv].T @ o[:, h * d_head:(h + 1) * d_head].T  # x -> x diag(g1) W_V^h W_O^h
            np.testing.assert_allclose(wn.W_OV_heads[l, h], torch.linalg.matrix_norm(w_ov).item(), rtol=1e-6,
                                       err_msg=f"{family} layer {l} head {h}")
        g2 = _gain(block, MLP_NORM_NAME.get(family, "post_attention_layernorm"), family, d)
        if family in MOE:
            experts = block.mlp.experts
            up = experts.gate_up_proj.detach().double().chunk(2, dim=1)[1]  # [E, d_mlp, d]: gate rows come first
            per_expert = [torch.linalg.matrix_norm(up[e] * g2[None, :]).item() for e in range(up.shape[0])]
            np.testing.assert_allclose(wn.experts["W_in"][l], per_expert, rtol=1e-6)
            np.testing.assert_allclose(wn.layers["W_in"][l], np.mean(per_expert), rtol=1e-6)
            router = block.mlp.gate.weight.detach().double()  # [E, d]
            np.testing.assert_allclose(wn.layers["W_router"][l], torch.linalg.matrix_norm(router * g2).item(),
                                       rtol=1e-6)
        if family in PLACEMENT:  # output norms: their gains as their own series
            for key, name in (("gain_attn_out", "post_attention_layernorm"),
                              ("gain_mlp_out", "post_feedforward_layernorm")):
                np.testing.assert_allclose(wn.layers[key][l], _gain(block, name, family, d).norm().item(), rtol=1e-6)
        else:
            assert wn.layers["gain_attn_out"][l] is None and wn.layers["gain_mlp_out"][l] is None
    if family in PLACEMENT:
        assert "gain_attn_out" in wn.fit and "gain_mlp_out" in wn.fit
    if family == "olmo2":
        assert wn.series("gain_attn") is None  # no input norm, nothing folded
    if family == "qwen2":  # q/k/v biases
        b_v = blocks[0].self_attn.v_proj.bias.detach().double()
        np.testing.assert_allclose(wn.layers["b_V"][0], b_v.norm().item(), rtol=1e-6)


# MLP kind -> family: the random-input MLP output recomputed by calling the HF modules on the same vectors.
RANDOM_MLP = {"gelu": "bigcode", "swiglu": "mistral", "geglu_peri": "gemma2", "moe": "mixtral", "post": "olmo2",
              "parallel_shared": "phi"}


@pytest.mark.parametrize("kind", sorted(RANDOM_MLP))
def test_random_input_mlp_gain_equals_hf_modules(kind, family_dirs, family_model):
    from normgrowth.weights import _random_seed, random_input_gains, standardised_normal

    family = RANDOM_MLP[kind]
    model = family_model(family)
    n_seqs, seq_len, seed = 2, 6, 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OLMo 2 warns that unit-std inputs set its scale
        gains = random_input_gains(model, n_seqs=n_seqs, seq_len=seq_len, seed=seed)
    hf = hf_model(family_dirs[family])
    blocks = hf.get_submodule(HF_BLOCKS.get(family, (LAYERS,))[0])
    d = model.d_model
    for l, block in enumerate(blocks):
        norm_name = MLP_NORM_NAME.get(family, "post_attention_layernorm")
        index = 0 if family in SHARED_NORM else 1  # a shared norm gets the attention's random vectors
        z = standardised_normal((n_seqs, seq_len, d), 1.0, _random_seed(seed, l, index))
        with torch.no_grad():
            x = block.get_submodule(norm_name)(z) if norm_name else z
            out = _first(block.mlp(x))
            if family in PLACEMENT:
                out = block.post_feedforward_layernorm(out)
        expected = out.reshape(n_seqs, seq_len, d)[:, 1:].double().norm(dim=-1).mean().item()
        np.testing.assert_allclose(gains["mlp_out"][l], expected, rtol=1e-5, err_msg=f"{kind} layer {l}")
    assert (gains["mlp_act_rate"] is None) is (family in MOE)



# ----- deletion, weights, compare on the families ------------------------------------------------------
def test_raw_readers_use_the_unnormalised_stream():
    """token_sums for a reader that reads the raw stream (output-only placement): ||w~_c|| and ||a_L||."""
    from normgrowth.deletion import token_sums

    gen = torch.Generator().manual_seed(0)
    writes = torch.randn(5, 4, 8, generator=gen, dtype=torch.float64)  # [tokens, writes, d]
    mean = writes.mean(0)
    reader_index = [1, 3, 4]
    _, change, size = token_sums(writes, mean, reader_index, 1e-5, normalises=[False, True, False])
    w = (writes - mean).numpy()
    a = np.cumsum(writes.numpy(), axis=1)
    for r, k in enumerate(reader_index):
        if r == 1:
            continue
        np.testing.assert_allclose(size[:, r].numpy(), np.linalg.norm(a[:, k - 1], axis=-1), rtol=1e-12)
        for c in range(4):
            expected = np.linalg.norm(w[:, c], axis=-1) if c < k else np.zeros(5)
            np.testing.assert_allclose(change[:, r, c].numpy(), expected, rtol=1e-12, atol=1e-15)
    # the normalising reader: ||N(a) - N(a - w~)|| with N(x) = x / sqrt(mean(x^2) + eps)
    def n(x):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5)
    a1 = a[:, 2]
    for c in range(3):
        np.testing.assert_allclose(change[:, 1, c].numpy(), np.linalg.norm(n(a1) - n(a1 - w[:, c]), axis=-1),
                                   rtol=1e-9)


@pytest.mark.parametrize("family", ["olmo2", "mixtral"])
def test_family_deletion_and_weights_run(family, family_dirs, token_file):
    from normgrowth.pipeline import run_deletion, run_weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few sequences: bootstrap warnings
        run = run_deletion(str(family_dirs[family]), str(token_file), batch_size=4, ablate="0")
        doc = run.document()
        weights = run_weights(str(family_dirs[family]), str(token_file), batch_size=4, random_seqs=2, random_len=6)
    assert doc["max_write_sum_rel_error"] < 1e-5  # the writes sum to every reader's stream
    assert doc["norm_placement"] == PLACEMENT.get(family, "pre")
    assert doc["parallel_blocks"] is (family in PARALLEL)
    assert doc["ablation"]["run"] and doc["ablation"]["writes"] == ["attn_out.0", "mlp_out.0"]
    assert doc["centers"] is (family in LAYER_NORM)
    wdoc = weights.document()
    assert wdoc["norm_placement"] == PLACEMENT.get(family, "pre") and wdoc["parallel_blocks"] is (family in PARALLEL)
    assert wdoc["comparison"] is not None and len(wdoc["weights"]["layers"]) == 2
    assert (wdoc["weights"]["experts"] is not None) is (family in MOE)


def test_compare_runs_across_placements(family_dirs, token_file):
    from normgrowth.pipeline import run_compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_compare(str(family_dirs["gemma2"]), str(family_dirs["olmo2"]), str(token_file), batch_size=4)
    doc = run.document()
    assert doc["norm_placement"] == ["peri", "post"] and doc["parallel_blocks"] == [False, False]


def test_ln_free_rmsnorm_is_detected(tmp_path):
    """An RMSNorm model whose norms divide by a constant (eps 1e12, gains x 1e6 / sigma) is normalisation "none"."""
    from conftest import LN_FREE_SIGMA, make_tiny, scale_to_ln_free
    from normgrowth.models import load_model

    hf = make_tiny("mistral", n_layers=2, rms_norm_eps=1e12)
    scale_to_ln_free(hf, LN_FREE_SIGMA)
    hf.save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    assert (model.normalization, model.norm_placement, model.ln_free, model.centers) == ("none", "none", True, False)
    tokens = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = hf_model(tmp_path / "m")(tokens).logits
        assert ((model.forward(tokens) - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_every_analysis_runs(family, family_model, batch):
    """report document, weights (with random inputs against real data) and deletion (with an ablation) on
    every family; the writes sum to every reader's stream."""
    from normgrowth.deletion import collect_deletion
    from normgrowth.report import report_document
    from normgrowth.weights import analyse_weights

    model = family_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few sequences: bootstrap warnings
        res = collect(model, batch, batch_size=4)
        rep = report_document(res)
        weights = analyse_weights(model, res, n_seqs=2, seq_len=6).to_json()
        deletion = collect_deletion(model, batch, batch_size=4, ablate="1", n_boot=50)
        doc = deletion.to_json()
    assert rep["meta"]["norm_placement"] == PLACEMENT.get(family, "pre")
    for key in ("ratio_attn", "ratio_mlp"):
        assert np.isfinite(weights["comparison"][key]).all()
    assert deletion.max_write_sum_rel_error < 1e-5
    assert doc["ablation"]["writes"] == ["attn_out.1", "mlp_out.1"] and doc["verdict"]["label"]
