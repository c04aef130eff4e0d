"""Collectors against an independent computation from the plain HF model, and streaming exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAMILIES, hf_model
from normgrowth.collector import collect, head_write_norms, wo_gram_matrices
from normgrowth.data import TokenBatch, load_tokens
from normgrowth.errors import NonFiniteNormError
from normgrowth.stats import hist_quantile

# Where each family's blocks, attention and MLP live in the plain HF model (independent of the bridge).
HF_LAYOUT = {
    "gpt2": ("transformer.h", "attn", "mlp"),
    "neox": ("gpt_neox.layers", "attention", "mlp"),
    "llama": ("model.layers", "self_attn", "mlp"),
    "opt": ("model.decoder.layers", "self_attn", "fc2"),
    "neo": ("transformer.h", "attn", "mlp"),
}


def hf_activations(path, family, tokens, mask):
    """resid_pre/mid/post, attn_out, mlp_out per layer from plain HF: hidden_states + module hooks."""
    model = hf_model(path)
    blocks_path, attn_name, mlp_name = HF_LAYOUT[family]
    blocks = model.get_submodule(blocks_path)
    got: dict[str, list] = {"attn_out": [], "mlp_out": [], "resid_post_last": []}
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.get_submodule(attn_name).register_forward_hook(
            lambda m, a, out: got["attn_out"].append((out[0] if isinstance(out, tuple) else out).detach())))
        handles.append(block.get_submodule(mlp_name).register_forward_hook(
            lambda m, a, out: got["mlp_out"].append((out[0] if isinstance(out, tuple) else out).detach())))
        if i == len(blocks) - 1:  # HF's last hidden state is after the final norm: hook the last block
            handles.append(block.register_forward_hook(
                lambda m, a, out: got["resid_post_last"].append((out[0] if isinstance(out, tuple) else out).detach())))
    with torch.no_grad():
        hidden = model(tokens, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    n = len(blocks)
    got["mlp_out"] = [x.reshape(*tokens.shape, -1) for x in got["mlp_out"]]  # OPT's fc2 sees [batch*pos, d]
    resid_pre = [hidden[i] for i in range(n)]
    resid_post = [hidden[i + 1] for i in range(n - 1)] + [got["resid_post_last"][0]]
    acts = {"resid_pre": resid_pre, "resid_post": resid_post, "attn_out": got["attn_out"], "mlp_out": got["mlp_out"]}
    if family != "neox":
        acts["resid_mid"] = [resid_pre[i] + got["attn_out"][i] for i in range(n)]
    return acts


def token_norms(x: torch.Tensor, centered: bool = False) -> np.ndarray:
    x = x.double()
    if centered:
        x = x - x.mean(-1, keepdim=True)
    return x.norm(dim=-1).numpy()


@pytest.fixture(scope="module")
def padded_batch():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 100, (5, 12), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 8:] = False
    mask[3, 5:] = False
    tokens[~mask] = 0  # padding id equals a real id (like GPT-2's pad == BOS): only the mask may matter
    return TokenBatch(tokens, mask, "test")


@pytest.mark.parametrize("family", FAMILIES)
def test_norms_match_independent_hf_computation(family, tiny_dirs, loaded, padded_batch):
    model = loaded(family)
    res = collect(model, padded_batch, batch_size=2)
    acts = hf_activations(tiny_dirs[family], family, padded_batch.tokens, padded_batch.attention_mask)
    mask = padded_batch.attention_mask.numpy()
    main = mask.copy()
    main[:, 0] = False
    for site, per_layer in acts.items():
        st = res.sites[site]
        for layer, x in enumerate(per_layer):
            norms, cnorms = token_norms(x), token_norms(x, centered=True)
            np.testing.assert_allclose(st.mean[layer], norms[main].mean(), rtol=1e-4, err_msg=f"{site}.{layer}")
            np.testing.assert_allclose(st.centered_mean[layer], cnorms[main].mean(), rtol=1e-4)
            np.testing.assert_allclose(st.std[layer], norms[main].std(), rtol=1e-3, atol=1e-7)
            np.testing.assert_allclose(st.bos_mean[layer], norms[:, 0].mean(), rtol=1e-4)
            lo, hi = np.quantile(norms[main], [0.5, 0.5], method="lower"), np.quantile(norms[main], 0.5, method="higher")
            assert lo[0] * (1 - 6e-3) <= st.median[layer] <= hi * (1 + 6e-3)  # a median, up to the bin width
            np.testing.assert_allclose(st.log_mean[layer], np.log(norms[main]).mean(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(st.token_std_mean[layer], (cnorms[main] / np.sqrt(model.d_model)).mean(),
                                       rtol=1e-4)
            seq = np.array([norms[i][main[i]].mean() for i in range(len(norms))])
            np.testing.assert_allclose(st.seq_mean[:, layer], seq, rtol=1e-4)
    if family == "neox":
        assert res.sites["resid_mid"] is None
    assert res.meta.n_tokens == int(main.sum())
    np.testing.assert_array_equal(res.seq_n_tokens, main.sum(1))


def test_embedding_writes_sum_to_first_stream(loaded, padded_batch):
    res = collect(loaded("gpt2"), padded_batch, batch_size=5)
    assert set(res.embed) == {"embed", "pos_embed"}
    res_llama = collect(loaded("llama"), padded_batch, batch_size=5)
    assert set(res_llama.embed) == {"embed"}  # rotary: no position write
    np.testing.assert_allclose(res_llama.embed["embed"].mean[0], res_llama.sites["resid_pre"].mean[0], rtol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_head_norms_gram_trick_equals_explicit_product(family, loaded, padded_batch):
    model = loaded(family)
    w_o = model.stacked_weights()["W_O"]
    zs = []
    with torch.inference_mode(), model.hooks([("z", 1, lambda z: zs.append(z.clone()))]):
        model.forward(padded_batch.tokens, padded_batch.attention_mask)
    z = zs[0]
    explicit = torch.einsum("bphd,hdm->hbpm", z.double(), w_o[1].double()).norm(dim=-1)
    trick = head_write_norms(z, wo_gram_matrices(w_o)[1])
    torch.testing.assert_close(trick.double(), explicit, rtol=1e-5, atol=1e-7)
    res = collect(model, padded_batch, batch_size=3)
    main = padded_batch.attention_mask.clone()
    main[:, 0] = False
    np.testing.assert_allclose(res.heads.mean[1], explicit[:, main].mean(-1).numpy(), rtol=1e-5)


def test_streaming_is_independent_of_batch_size(loaded, token_file):
    model = loaded("neo")
    batch = load_tokens(str(token_file), model)
    runs = [collect(model, batch, batch_size=b) for b in (1, 3, 7)]
    ref = runs[0]
    for other in runs[1:]:
        for site in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            a, b = ref.sites[site], other.sites[site]
            for key in ("mean", "std", "centered_mean", "median", "bos_mean", "log_mean"):
                np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-6, err_msg=f"{site} {key}")
            np.testing.assert_allclose(a.seq_mean, b.seq_mean, rtol=1e-6)
            np.testing.assert_allclose(a.position_mean, b.position_mean, rtol=1e-6)
            np.testing.assert_array_equal(a.hist, b.hist)
        np.testing.assert_allclose(ref.heads.mean, other.heads.mean, rtol=1e-6)
        np.testing.assert_allclose(ref.mlp_act_rate, other.mlp_act_rate, rtol=1e-6)


def test_streaming_equals_numpy_on_concatenated_norms(loaded, token_file):
    """Per-token norms captured once; the streamed statistics equal one-shot numpy on their concatenation."""
    model = loaded("gpt2")
    batch = load_tokens(str(token_file), model)
    captured = []
    with torch.inference_mode(), model.hooks([("resid_post", 2, lambda x: captured.append(x.clone()))]):
        for _, tokens, mask in batch.batches(2):
            model.forward(tokens, attention_mask=mask)
    norms = np.concatenate([token_norms(x) for x in captured], 0)  # [n_seqs, pos]
    rest = norms[:, 1:].reshape(-1)
    res = collect(model, batch, batch_size=2)
    st = res.sites["resid_post"]
    np.testing.assert_allclose(st.mean[2], rest.mean(), rtol=1e-6)
    np.testing.assert_allclose(st.std[2], rest.std(), rtol=1e-5)
    np.testing.assert_allclose(st.position_mean[2], norms.mean(0), rtol=1e-6)
    np.testing.assert_allclose(st.median[2], np.median(rest), rtol=6e-3)
    np.testing.assert_allclose(st.seq_mean[:, 2], norms[:, 1:].mean(1), rtol=1e-6)
    assert st.hist[2].sum() == rest.size


def test_padding_and_position_zero_are_masked(loaded):
    """A padded batch gives exactly the statistics of the same sequences run one at a time unpadded."""
    model = loaded("opt")
    gen = torch.Generator().manual_seed(5)
    lengths = [9, 4, 12]
    seqs = [torch.randint(0, 100, (n,), generator=gen) for n in lengths]
    tokens = torch.full((3, 12), 0, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        mask[i, : len(s)] = True
    padded = collect(model, TokenBatch(tokens, mask, "padded"), batch_size=3)
    single = [collect(model, TokenBatch(s[None], torch.ones(1, len(s), dtype=torch.bool), "one"), batch_size=1)
              for s in seqs]
    weights = np.array(lengths) - 1
    for site in ("resid_post", "mlp_out"):
        expected = sum(w * r.sites[site].mean for w, r in zip(weights, single)) / weights.sum()
        np.testing.assert_allclose(padded.sites[site].mean, expected, rtol=1e-5)
        bos = np.mean([r.sites[site].bos_mean for r in single], axis=0)
        np.testing.assert_allclose(padded.sites[site].bos_mean, bos, rtol=1e-5)
    assert padded.meta.n_tokens == sum(weights) and padded.meta.n_bos_tokens == 3


def test_half_precision_accumulates_in_float32(tiny_dirs, padded_batch):
    from normgrowth.models import load_model

    ref = collect(load_model(str(tiny_dirs["gpt2"])), padded_batch)
    half = collect(load_model(str(tiny_dirs["gpt2"]), dtype="bfloat16"), padded_batch)
    assert half.meta.dtype == "bfloat16"
    np.testing.assert_allclose(half.sites["resid_post"].mean, ref.sites["resid_post"].mean, rtol=2e-2)


def test_non_finite_norm_is_reported_with_site_and_layer(tiny_dirs, padded_batch):
    from normgrowth.models import load_model

    model = load_model(str(tiny_dirs["gpt2"]))
    with torch.no_grad():
        model.hf_model.transformer.h[1].mlp.c_proj.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteNormError, match="site mlp_out, layer 1") as info:
        collect(model, padded_batch)
    assert (info.value.site, info.value.layer) == ("mlp_out", 1)


def test_hist_quantile_exact_to_bin_width():
    from normgrowth.stats import histogram_counts

    values = torch.from_numpy(np.random.RandomState(1).lognormal(2.0, 0.7, size=(2, 5001)))
    counts = histogram_counts(values).reshape(2, -1).numpy()
    for q in (0.1, 0.5, 0.9):
        np.testing.assert_allclose(hist_quantile(counts, q), np.quantile(values.numpy(), q, axis=1), rtol=6e-3)


def test_planted_growth_model_collected_and_fitted(tmp_path):
    """A GPT-2 whose stream is exactly g^(l+1) v at resid_post[l]: collect + fit must recover g (within 0.5 %)."""
    from conftest import make_tiny
    from normgrowth.models import load_model
    from normgrowth.fit import fit_growth

    g, n_layers = 1.07, 8
    model = make_tiny("gpt2", seed=0, n_layers=n_layers, init=None, n_embd=16, n_head=2, n_positions=32,
                      vocab_size=50)
    v = torch.randn(16)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(v.expand(50, 16))
        model.transformer.wpe.weight.zero_()
        for layer, block in enumerate(model.transformer.h):
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
            block.mlp.c_fc.weight.zero_()
            block.mlp.c_fc.bias.zero_()  # gelu(0) = 0: the MLP writes only its output bias
            block.mlp.c_proj.bias.copy_((g - 1) * g**layer * v)
    model.save_pretrained(tmp_path / "planted")
    loaded = load_model(str(tmp_path / "planted"))
    tokens = torch.randint(0, 50, (6, 20), generator=torch.Generator().manual_seed(1))
    res = collect(loaded, TokenBatch(tokens, torch.ones_like(tokens, dtype=torch.bool), "planted"), batch_size=4)
    np.testing.assert_allclose(res.sites["resid_post"].mean, g ** np.arange(1, n_layers + 1) * v.norm().item(),
                               rtol=1e-5)
    fit = fit_growth(res.sites["resid_post"].seq_mean, weights=res.seq_n_tokens)
    assert abs(fit.growth_factor / g - 1) < 5e-3
    assert fit.ci95[0] <= fit.growth_factor <= fit.ci95[1]


# ----- the notebook API: what collect accepts ----------------------------------------------------------
WORDS = ("the a cat dog sat ran on under mat tree and then it was big small red blue one two three four five "
         "six seven eight nine ten house car bird fish slept ate jumped over quick slow happy sad day night sun "
         "moon").split()


@pytest.fixture(scope="module")
def gpt2_with_tokenizer(tiny_dirs, tmp_path_factory):
    """The tiny GPT-2 checkpoint plus a word-level tokenizer (BOS id 0) saved beside it."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from normgrowth.models import load_model

    path = tmp_path_factory.mktemp("tok") / "gpt2"
    shutil.copytree(tiny_dirs["gpt2"], path)
    vocab = {"<bos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>").save_pretrained(path)
    return load_model(str(path)), tok


def assert_same_results(a, b):
    for key, arr in a.arrays().items():
        np.testing.assert_array_equal(b.arrays()[key], arr, err_msg=key)


def test_collect_ids_tensor_and_array_give_the_token_batch_numbers(loaded, padded_batch):
    model = loaded("llama")
    ref = collect(model, padded_batch, batch_size=2)
    ids, mask = padded_batch.tokens, padded_batch.attention_mask
    assert_same_results(ref, collect(model, ids, batch_size=2, attention_mask=mask))
    assert_same_results(ref, collect(model, ids.numpy(), batch_size=2, attention_mask=mask.numpy().astype(int)))
    full = collect(model, ids[[0, 2, 4]], batch_size=2)  # no mask: every id is a real token
    assert full.meta.n_tokens == 3 * (ids.shape[1] - 1)


def test_collect_texts_give_the_token_batch_numbers(gpt2_with_tokenizer):
    model, tok = gpt2_with_tokenizer
    texts = ["the cat sat on the mat", "a big red dog ran under the tree and then it slept",
             "one two three", "happy fish jumped over the moon at night"]
    rows = [[0] + tok.encode(t).ids for t in texts]  # BOS, then the words
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    ref = collect(model, TokenBatch(tokens, mask, "manual"), batch_size=3)
    got = collect(model, texts, batch_size=3)
    assert_same_results(ref, got)
    assert got.meta.n_tokens == sum(len(r) - 1 for r in rows)


def test_collect_texts_without_tokenizer_is_one_clear_error(loaded):
    from normgrowth.errors import NormgrowthError

    with pytest.raises(NormgrowthError, match="no tokenizer.*token ids"):
        collect(loaded("gpt2"), ["some text"])
    with pytest.raises(NormgrowthError, match="cannot collect from a dict"):
        collect(loaded("gpt2"), {"tokens": [1, 2]})
    with pytest.raises(NormgrowthError, match="integer array"):
        collect(loaded("gpt2"), torch.zeros(4))


def test_left_padding_gives_the_unpadded_numbers(loaded):
    """Sequences left-padded into one batch give what each gives alone, unpadded."""
    model = loaded("gpt2")
    gen = torch.Generator().manual_seed(8)
    lengths = [5, 11, 8]
    seqs = [torch.randint(0, 100, (n,), generator=gen) for n in lengths]
    tokens = torch.full((3, 11), 7, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, 11 - len(s):] = s
        mask[i, 11 - len(s):] = True
    left = collect(model, tokens, attention_mask=mask, batch_size=3)
    alone = [collect(model, s[None], batch_size=1) for s in seqs]
    for site in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
        seq = np.concatenate([r.sites[site].seq_mean for r in alone])
        np.testing.assert_allclose(left.sites[site].seq_mean, seq, rtol=1e-5, err_msg=site)
        bos = np.mean([r.sites[site].bos_mean for r in alone], axis=0)
        np.testing.assert_allclose(left.sites[site].bos_mean, bos, rtol=1e-5)
    np.testing.assert_array_equal(left.seq_n_tokens, np.array(lengths) - 1)


def test_any_subset_of_sites_goes_through_the_report(loaded, padded_batch):
    import json

    from normgrowth.report import report_document
    from normgrowth.report import format_report_table
    from normgrowth.storage import json_safe

    model = loaded("gpt2")
    full = collect(model, padded_batch, batch_size=2)
    part = collect(model, padded_batch, batch_size=2, sites=["resid_post"], heads=False, act_rate=False)
    np.testing.assert_allclose(part.sites["resid_post"].mean, full.sites["resid_post"].mean, rtol=1e-6)
    doc = json.loads(json.dumps(json_safe(report_document(part))))
    assert [s for s, v in doc["sites"].items() if v is not None] == ["resid_post"]
    assert set(doc["fit"]) == {"resid_post"} and set(doc["layer_ratios"]) == {"resid_post"}
    assert doc["appendix1"] is None and doc["position"]["resid_pre"] is None
    assert doc["heads"] is None and doc["mlp_act_rate"] is None
    row = format_report_table(part).splitlines()[4].split()  # layer 0: layer, 5 sites, bos
    assert row[0] == "0" and row[1] == "-" and row[3] != "-"


@pytest.mark.parametrize("family, pre_module", [("gpt2", "mlp.c_fc"), ("llama", "mlp.gate_proj"), ("opt", "fc1")])
def test_mlp_activation_rate_equals_plain_hf(family, pre_module, tiny_dirs, loaded, padded_batch):
    """mlp_act_rate = mean over real tokens >= 1 of the fraction of pre-activation entries > 0, where the
    pre-activation is the input of the MLP's nonlinearity, read from plain HF modules."""
    model = loaded(family)
    hf = hf_model(tiny_dirs[family])
    blocks = hf.get_submodule(HF_LAYOUT[family][0])
    pres = []
    handles = [b.get_submodule(pre_module).register_forward_hook(lambda m, a, out: pres.append(out.detach()))
               for b in blocks]
    tokens, mask = padded_batch.tokens, padded_batch.attention_mask
    with torch.no_grad():
        hf(tokens, attention_mask=mask.long())
    for h in handles:
        h.remove()
    main = mask.clone()
    main[:, 0] = False
    expected = [(p.reshape(*tokens.shape, -1) > 0).double().mean(-1)[main].mean().item() for p in pres]
    res = collect(model, padded_batch, batch_size=2)
    np.testing.assert_allclose(res.mlp_act_rate, expected, rtol=1e-6)


def test_mlp_active_fraction_counts_entries_above_zero():
    from normgrowth.collector import mlp_active_fraction

    pre = torch.tensor([[0.0, -0.0, 1e-30, -1e-30, 3.0, -2.0, float("inf"), 5.0],
                        [float("-inf"), 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0],
                        [float("nan"), 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    got = mlp_active_fraction(pre)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), [4 / 8, 6 / 8, 7 / 8])
    np.testing.assert_array_equal(got.numpy(), (pre.numpy() > 0).mean(-1).astype(np.float32))


def test_collect_is_a_function_on_every_access():
    import subprocess
    import sys

    code = ("import inspect, normgrowth; a = normgrowth.collect; b = normgrowth.collect; "
            "import normgrowth.collector as c; "
            "print(inspect.isfunction(a), inspect.isfunction(b), a is b is c.collect, normgrowth.collect is c.collect)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True"] * 4, proc.stdout + proc.stderr
