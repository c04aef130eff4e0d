"""Tests for normgrowth.deletion: planted streams, numpy re-computations, tiny random models of each family."""

from __future__ import annotations

import json
import math
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from normgrowth.deletion import (QUANTITIES, _ablation_hooks, _GramCollector, _write_means, ablation_check,
                                 collect_deletion, deletion_quantities, dilution_share, distance_matrix,
                                 format_deletion_report, gram_from_writes, locality, log_linear_slope,
                                 pair_average_by_distance, parse_ablate, stream_layout, summarize_deletion)
from normgrowth.errors import NormgrowthError
from normgrowth.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore:Mean of empty slice")

STORIES = Path(__file__).parents[2] / "shared" / "fixtures" / "stories260K"


# ----------------------------------------------------------------------------------------------
# independent numpy reference (explicit writes, no Gram matrix)
# ----------------------------------------------------------------------------------------------
def direct_quantities(writes: np.ndarray, reader_index, center: bool) -> dict[str, np.ndarray]:
    """rho, delta, nu, R, R0 from explicit writes [T, C, d], token by token, in float64."""
    w = np.asarray(writes, dtype=np.float64)
    P = w - w.mean(-1, keepdims=True) if center else w
    T, C, _ = P.shape
    out = {q: np.full((T, len(reader_index), C), np.nan) for q in QUANTITIES}
    norms = np.linalg.norm(P, axis=-1)  # [T, C]
    unit = P / norms[..., None]  # every write rescaled to norm 1
    for r, k in enumerate(reader_index):
        stream = P[:, :k].sum(1)  # [T, d]
        stream0 = unit[:, :k].sum(1)
        for c in range(k):
            later = P[:, c:k].sum(1)  # the write itself plus every write after it, before the reader
            rho = np.einsum("td,td->t", later, unit[:, c]) / norms[:, c]
            delta = norms[:, c] / np.linalg.norm(stream, axis=-1)
            out["retention"][:, r, c] = rho
            out["dilution"][:, r, c] = delta
            out["visibility"][:, r, c] = rho * delta
            out["reading"][:, r, c] = np.einsum("td,td->t", P[:, c], stream) / np.einsum("td,td->t", stream, stream)
            out["reading_null"][:, r, c] = (np.einsum("td,td->t", unit[:, c], stream0)
                                            / np.einsum("td,td->t", stream0, stream0))
    return out


def orthonormal_mean_free(n_vectors: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``n_vectors`` orthonormal vectors of length ``dim``, each orthogonal to the all-ones vector."""
    a = rng.standard_normal((dim, n_vectors))
    a -= a.mean(0, keepdims=True)
    q, _ = np.linalg.qr(a)
    return q.T


def planted_growth_writes(n_layers: int, growth: float, n_tokens: int, dim: int, seed: int = 0) -> np.ndarray:
    """Mutually orthogonal (and mean-free) writes with norm growth**layer(c), random directions per token."""
    lay = stream_layout(n_layers)
    rng = np.random.default_rng(seed)
    norms = growth ** np.asarray(lay.write_layer, dtype=float)
    return np.stack([orthonormal_mean_free(lay.n_writes, dim, rng) * norms[:, None] for _ in range(n_tokens)])


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("center", [True, False])
def test_gram_quantities_equal_direct_computation(center):
    rng = np.random.default_rng(1)
    writes = rng.standard_normal((12, 7, 16)) + 0.7  # offset so that centring matters
    writes *= np.exp(rng.uniform(-1, 1, (12, 7, 1)))
    reader_index = [1, 3, 5, 7]
    gram = gram_from_writes(torch.tensor(writes, dtype=torch.float32), center)
    P = writes - writes.mean(-1, keepdims=True) if center else writes
    np.testing.assert_allclose(gram.numpy(), P @ np.swapaxes(P, -1, -2), rtol=1e-5, atol=1e-4)
    got = deletion_quantities(gram, reader_index)
    want = direct_quantities(writes, reader_index, center)
    for q in QUANTITIES:
        assert got[q].shape == (12, 4, 7)
        g = got[q].numpy()
        np.testing.assert_array_equal(np.isnan(g), np.isnan(want[q]), err_msg=q)
        np.testing.assert_allclose(g, want[q], rtol=2e-4, atol=2e-5, err_msg=q)


def test_centering_changes_the_gram():
    writes = torch.randn(3, 5, 8) + 2.0
    centred = gram_from_writes(writes, True)
    raw = gram_from_writes(writes, False)
    assert not torch.allclose(centred, raw, rtol=1e-2)
    x = writes - writes.mean(-1, keepdim=True)
    torch.testing.assert_close(centred, x @ x.transpose(-1, -2))


def test_exact_cancellation_gives_zero_retention():
    rng = np.random.default_rng(2)
    a, b, e = orthonormal_mean_free(3, 10, rng)
    writes = np.stack([3 * a, 2 * b, -3 * a, 0.5 * e])[None]  # write 2 erases write 0 exactly
    q = deletion_quantities(gram_from_writes(torch.tensor(writes, dtype=torch.float32), True), [1, 2, 3, 4])
    rho = q["retention"][0].numpy()
    np.testing.assert_allclose(rho[0:2, 0], 1.0, atol=1e-6)  # before the cancelling write
    np.testing.assert_allclose(rho[2:, 0], 0.0, atol=1e-6)  # after it
    np.testing.assert_allclose(q["visibility"][0, 2:, 0].numpy(), 0.0, atol=1e-6)
    assert np.all(q["dilution"][0, :, 0].numpy()[:2] > 0.5)  # the write was large while it lasted


def test_retention_is_one_at_first_reader_after_the_last_write():
    rng = np.random.default_rng(3)
    writes = torch.tensor(rng.standard_normal((20, 9, 12)) * 5 + 1, dtype=torch.float32)
    reader_index = list(range(1, 10))
    q = deletion_quantities(gram_from_writes(writes, True), reader_index)
    for r, k in enumerate(reader_index):  # the write just before reader k is c = k - 1
        torch.testing.assert_close(q["retention"][:, r, k - 1], torch.ones(20), atol=1e-6, rtol=0)


def test_reading_shares_sum_to_one_and_null_matches_rescaled_writes():
    rng = np.random.default_rng(4)
    writes = rng.standard_normal((30, 11, 24)) * np.exp(rng.uniform(-2, 3, (30, 11, 1)))
    lay = stream_layout(5)
    gram = gram_from_writes(torch.tensor(writes, dtype=torch.float32), False)
    q = deletion_quantities(gram, lay.reader_index)
    for key in ("reading", "reading_null"):
        sums = torch.nansum(q[key], -1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    unit = writes / np.linalg.norm(writes, axis=-1, keepdims=True) * 7.0  # one common norm, directions kept
    r_of_rescaled = deletion_quantities(gram_from_writes(torch.tensor(unit, dtype=torch.float32), False),
                                        lay.reader_index)["reading"]
    torch.testing.assert_close(q["reading_null"], r_of_rescaled, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_zero_write_gives_nan_retention_not_inf():
    writes = torch.zeros(1, 3, 6)
    writes[0, 0, 0], writes[0, 2, 1] = 1.0, 2.0  # write 1 is exactly zero
    q = deletion_quantities(gram_from_writes(writes, False), [3])
    assert math.isnan(float(q["retention"][0, 0, 1])) and math.isnan(float(q["visibility"][0, 0, 1]))
    assert float(q["reading_null"][0, 0, 1]) == 0.0
    assert float(q["dilution"][0, 0, 1]) == 0.0


def test_distance_convention_first_reader_is_one():
    lay = stream_layout(3)
    assert lay.writes == ("embed", "attn_out.0", "mlp_out.0", "attn_out.1", "mlp_out.1", "attn_out.2", "mlp_out.2")
    assert lay.readers == ("resid_pre.0", "resid_pre.1", "resid_pre.2", "final")
    d = distance_matrix(lay.write_layer, lay.reader_layer)
    for r, k in enumerate(lay.reader_index):
        assert np.all(np.isfinite(d[r, :k])) and np.all(np.isnan(d[r, k:]))  # before <=> finite distance
        assert d[r, k - 1] == 1  # the last write before each reader is one layer away
    assert d[0, 0] == 1 and d[3, 0] == 4 and d[3, 1] == 3 and d[1, 2] == 1


def test_orthogonal_growing_writes_planted():
    growth, n_layers = 1.3, 10
    writes = planted_growth_writes(n_layers, growth, n_tokens=16, dim=32)
    lay = stream_layout(n_layers)
    q = deletion_quantities(gram_from_writes(torch.tensor(writes, dtype=torch.float32), True), lay.reader_index)
    mean = {k: torch.nanmean(v, 0).double().numpy() for k, v in q.items()}
    before = np.isfinite(distance_matrix(lay.write_layer, lay.reader_layer))
    np.testing.assert_allclose(mean["retention"][before], 1.0, atol=1e-4)
    summ = summarize_deletion(mean, lay.write_layer, lay.reader_layer, n_boot=0)
    by = summ["by_distance"]
    assert by["dilution_decay_per_layer"] == pytest.approx(growth, rel=0.03)
    assert by["visibility_decay_per_layer"] == pytest.approx(growth, rel=0.03)
    assert by["retention_decay_per_layer"] == pytest.approx(1.0, abs=1e-4)
    assert by["share_explained_by_dilution"] == pytest.approx(1.0, abs=1e-3)
    # far from the start, dilution falls by exactly `growth` per extra layer of distance
    final = mean["dilution"][-1]
    assert final[lay.writes.index("mlp_out.4")] / final[lay.writes.index("mlp_out.5")] == pytest.approx(1 / growth, rel=1e-4)


def test_erasing_stream_has_low_dilution_share():
    """Each write keeps a fraction q of the stream and adds a new unit direction: content is erased."""
    keep, n_layers, dim = 0.6, 8, 40
    lay = stream_layout(n_layers)
    rng = np.random.default_rng(5)
    toks = []
    for _ in range(6):
        basis = orthonormal_mean_free(lay.n_writes + 30, dim + 40, rng)
        stream = sum(keep ** (29 - j) * basis[j] for j in range(30))  # already stationary when the model starts
        writes = [stream]
        for c in range(1, lay.n_writes):
            new = keep * stream + basis[30 + c]
            writes.append(new - stream)
            stream = new
        toks.append(np.stack(writes))
    writes = np.stack(toks)
    q = deletion_quantities(gram_from_writes(torch.tensor(writes, dtype=torch.float32), True), lay.reader_index)
    mean = {k: torch.nanmean(v, 0).double().numpy() for k, v in q.items()}
    want = {k: np.nanmean(v, 0) for k, v in direct_quantities(writes, lay.reader_index, True).items()}
    for k in QUANTITIES:
        np.testing.assert_allclose(mean[k], want[k], rtol=1e-3, atol=1e-4)
    by = summarize_deletion(mean, lay.write_layer, lay.reader_layer, n_boot=0)["by_distance"]
    assert by["retention"][0] > by["retention"][-1] + 0.2  # later writes erase it
    assert by["visibility_decay_per_layer"] > 1.05
    assert by["share_explained_by_dilution"] < 0.5
    # fitted share equals the ratio of independently fitted slopes of the numpy curves
    d, curves, n_pairs = pair_average_by_distance(np.stack([want["dilution"], want["visibility"]]),
                                                  distance_matrix(lay.write_layer, lay.reader_layer))
    A = np.vstack([d, np.ones_like(d)]).T * np.sqrt(n_pairs)[:, None]
    s_delta = np.linalg.lstsq(A, np.log(curves[0]) * np.sqrt(n_pairs), rcond=None)[0][0]
    s_nu = np.linalg.lstsq(A, np.log(curves[1]) * np.sqrt(n_pairs), rcond=None)[0][0]
    assert by["share_explained_by_dilution"] == pytest.approx(s_delta / s_nu, rel=1e-3, abs=1e-3)


def test_dilution_share_and_slope_on_planted_curves():
    d = np.arange(1, 9, dtype=float)
    g, keep = 1.2, 0.9
    dil, ret = g ** -d, keep ** d
    s_delta, s_nu = log_linear_slope(d, dil), log_linear_slope(d, dil * ret)
    assert s_delta == pytest.approx(-math.log(g), rel=1e-10)
    assert dilution_share(s_delta, s_nu) == pytest.approx(math.log(g) / (math.log(g) - math.log(keep)), rel=1e-10)
    assert dilution_share(log_linear_slope(d, np.full_like(d, 0.3)), log_linear_slope(d, ret)) == pytest.approx(0, abs=1e-12)
    assert math.isnan(dilution_share(-0.1, 0.05))  # visibility not falling: undefined
    vals = 2.0 * 0.5 ** d
    vals[3] = -1.0  # non-positive points are skipped
    assert log_linear_slope(d, vals) == pytest.approx(math.log(0.5))
    assert math.isnan(log_linear_slope(d[:1], vals[:1]))


def test_locality_on_planted_shares():
    lay = stream_layout(2)  # writes embed(0) a0(1) m0(1) a1(2) m1(2); readers layers 1, 2, 3
    dist = distance_matrix(lay.write_layer, lay.reader_layer)
    nan = np.nan
    reading = np.array([[1.0, nan, nan, nan, nan],
                        [0.2, 0.3, 0.5, nan, nan],
                        [0.1, 0.1, 0.2, 0.25, 0.35]])
    null = np.where(np.isfinite(reading), 1.0, nan) / np.array([[1], [3], [5]])
    loc = locality(reading, null, dist, within=(1, 2))
    np.testing.assert_allclose(loc["mean_distance"], [1.0, 0.2 * 2 + 0.8, 0.1 * 3 + 0.3 * 2 + 0.6])
    np.testing.assert_allclose(loc["mean_distance_null"], [1.0, 4 / 3, (3 + 2 + 2 + 1 + 1) / 5])
    np.testing.assert_allclose(loc["share_within_per_reader"]["1"], [1.0, 0.8, 0.6])
    assert loc["share_within"]["1"] == pytest.approx((0.8 + 0.6) / 2)  # reader 0 has nothing farther than 1
    assert loc["share_within"]["2"] == pytest.approx(0.9)  # only the final reader has a write 3 layers away
    assert loc["share_within_null"]["2"] == pytest.approx(0.8)


def test_bootstrap_ci_covers_estimate_and_shrinks_with_agreement():
    lay = stream_layout(3)
    rng = np.random.default_rng(6)
    base = {q: np.where(np.isfinite(distance_matrix(lay.write_layer, lay.reader_layer)), 0.5, np.nan)
            for q in QUANTITIES}
    noisy = {q: base[q][None] * (1 + 0.2 * rng.standard_normal((40, 1, 1))) for q in QUANTITIES}
    weights = rng.integers(5, 50, 40).astype(float)
    mean = {q: np.tensordot(weights, noisy[q], 1) / weights.sum() for q in QUANTITIES}
    by = summarize_deletion(mean, lay.write_layer, lay.reader_layer, noisy, weights, n_boot=300)["by_distance"]
    ci = by["dilution_ci95"]
    assert np.all(ci[:, 0] <= by["dilution"]) and np.all(by["dilution"] <= ci[:, 1])
    assert np.all(ci[:, 1] - ci[:, 0] > 0.01)
    flat = {q: np.repeat(base[q][None], 40, 0) for q in QUANTITIES}
    by0 = summarize_deletion(base, lay.write_layer, lay.reader_layer, flat, weights, n_boot=100)["by_distance"]
    np.testing.assert_allclose(by0["dilution_ci95"], 0.5, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------
def _configs():
    from transformers import GPT2Config, GPTNeoConfig, GPTNeoXConfig, LlamaConfig, OPTConfig

    return {
        "gpt2": GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=100, n_positions=64),
        "gpt-neox": GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=64),
        "llama": LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, vocab_size=100, max_position_embeddings=64),
        "opt": OPTConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, ffn_dim=64, vocab_size=100,
                         max_position_embeddings=64, word_embed_proj_dim=32),
        "gpt-neo": GPTNeoConfig(num_layers=3, hidden_size=32, num_heads=4, vocab_size=100, max_position_embeddings=64,
                                attention_types=[[["global", "local"], 1], [["global"], 1]], window_size=8),
    }


def _randomize_biases(hf_model, seed: int) -> None:
    """Random-init checkpoints have zero biases; make them nonzero so that a forgotten bias shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dirs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (name, cfg) in enumerate(_configs().items()):
            hf = AutoModelForCausalLM.from_config(cfg)
            _randomize_biases(hf, i)
            dirs[name] = tmp_path_factory.mktemp(name)
            hf.save_pretrained(dirs[name])
        # LN-free GPT-2: eps 1e12 and gains x 1e6 (the published storage format)
        cfg = _configs()["gpt2"]
        cfg.layer_norm_epsilon = 1e12
        hf = AutoModelForCausalLM.from_config(cfg)
        _randomize_biases(hf, 9)
        with torch.no_grad():
            for mod in hf.modules():
                if isinstance(mod, torch.nn.LayerNorm):
                    mod.weight.mul_(1e6 / 0.5)
                    mod.bias.mul_(1.0)
        dirs["ln-free"] = tmp_path_factory.mktemp("lnfree")
        hf.save_pretrained(dirs["ln-free"])
    return dirs


_LOADED: dict = {}


def _model(model_dirs, name):
    if name not in _LOADED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _LOADED[name] = load_model(str(model_dirs[name]), device="cpu")
    return _LOADED[name]


def _padded_batch(n=5, length=12, seed=0, vocab=100):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.bool)
    for i, keep in enumerate([length, length - 3, length, 6, length - 1][:n]):
        mask[i, keep:] = False
    tokens[~mask] = 0
    return types.SimpleNamespace(tokens=tokens, attention_mask=mask, source="test")


def _capture(model, tokens, mask):
    """Explicitly captured writes [b, p, C, d] (embed + pos summed) and readers [b, p, R, d], float64."""
    lay = stream_layout(model.n_layers)
    writes = {}
    readers = {}

    def put(store, key):
        def hook(x):
            store[key] = store.get(key, 0) + x.detach().double().clone()
        return hook

    hooks = [("embed", None, put(writes, 0))]
    if model.has_pos_embed:
        hooks.append(("pos_embed", None, put(writes, 0)))
    for layer in range(model.n_layers):
        hooks += [("attn_out", layer, put(writes, 1 + 2 * layer)), ("mlp_out", layer, put(writes, 2 + 2 * layer)),
                  ("resid_pre", layer, put(readers, layer))]
    hooks.append(("final_in", None, put(readers, model.n_layers)))
    with torch.inference_mode(), model.hooks(hooks):
        model.forward(tokens, attention_mask=mask)
    W = torch.stack([writes[c] for c in range(lay.n_writes)], 2)
    Rd = torch.stack([readers[r] for r in range(len(lay.readers))], 2)
    return W, Rd


FAMILIES = ["gpt2", "gpt-neox", "llama", "opt", "gpt-neo", "ln-free"]


@pytest.mark.parametrize("name", FAMILIES)
def test_writes_sum_to_every_reader_and_gram_uses_right_projection(model_dirs, name):
    model = _model(model_dirs, name)
    expect_center = {"llama": False}.get(name, True)
    assert model.centers is expect_center
    if name == "ln-free":
        assert model.ln_free and model.normalization == "none"
    if name == "gpt-neox":
        assert model.parallel_blocks
    batch = _padded_batch()
    W, Rd = _capture(model, batch.tokens, batch.attention_mask)
    lay = stream_layout(model.n_layers)
    real = batch.attention_mask
    for r, k in enumerate(lay.reader_index):
        stream = W[:, :, :k].sum(2)
        err = (stream - Rd[:, :, r]).norm(dim=-1) / Rd[:, :, r].norm(dim=-1)
        assert float(err[real].max()) < 1e-4, (name, lay.readers[r])
    # the collector's Gram matrix is that of the explicit writes under the model's projection P
    coll = _GramCollector(model, lay)
    valid = real.clone()
    valid[:, 0] = False
    coll.start_batch(valid)
    with torch.inference_mode(), model.hooks(coll.hooks()):
        model.forward(batch.tokens, attention_mask=batch.attention_mask)
    assert coll.max_rel_error < 1e-4
    P = W - W.mean(-1, keepdim=True) if expect_center else W
    want = (P @ P.transpose(-1, -2))[real]
    got = coll.gram[real].double()
    scale = want.abs().amax(dim=(-1, -2), keepdim=True)
    assert float(((got - want).abs() / scale).max()) < 1e-5
    Q = W if expect_center else W - W.mean(-1, keepdim=True)  # the other projection differs noticeably
    other = (Q @ Q.transpose(-1, -2))[real]
    assert float(((other - want).abs() / scale).max()) > 1e-3


def test_collector_means_match_direct_computation_and_batch_size(model_dirs):
    model = _model(model_dirs, "opt")  # learned positions that depend on the padding mask
    batch = _padded_batch(n=5, length=12, seed=3)
    res2 = collect_deletion(model, batch, batch_size=2, n_boot=50)
    res5 = collect_deletion(model, batch, batch_size=5, n_boot=50)
    W, _ = _capture(model, batch.tokens, batch.attention_mask)
    valid = batch.attention_mask.clone()
    valid[:, 0] = False
    lay = stream_layout(model.n_layers)
    direct = direct_quantities(W[valid].numpy(), lay.reader_index, center=True)
    seq_of_token = torch.arange(5)[:, None].expand(5, 12)[valid].numpy()
    np.testing.assert_array_equal(res2.seq_n_tokens, valid.sum(1).numpy())
    for q in QUANTITIES:
        want = np.nanmean(direct[q], 0)
        np.testing.assert_allclose(res2.mean[q], want, rtol=1e-4, atol=1e-5, err_msg=q)
        np.testing.assert_allclose(res5.mean[q], res2.mean[q], rtol=1e-5, atol=1e-6, err_msg=q)
        np.testing.assert_allclose(res5.seq_mean[q], res2.seq_mean[q], rtol=1e-5, atol=1e-6, err_msg=q)
        seq3 = np.nanmean(direct[q][seq_of_token == 3], 0)
        np.testing.assert_allclose(res2.seq_mean[q][3], seq3, rtol=1e-4, atol=1e-5, err_msg=q)
    assert res2.max_write_sum_rel_error < 1e-4


def test_to_json_schema_and_report(model_dirs):
    model = _model(model_dirs, "gpt-neox")
    batch = _padded_batch(n=4, length=10, seed=4)
    res = collect_deletion(model, batch, batch_size=4, ablate="1", n_boot=50)
    out = res.to_json()
    text = json.dumps(out, allow_nan=False)  # NaN became null
    assert json.loads(text)["model"] == str(model_dirs["gpt-neox"])
    for key in ("model", "ln_free", "writes", "write_layer", "readers", "reader_layer", *QUANTITIES,
                "by_distance", "locality", "ablation"):
        assert key in out
    lay = stream_layout(3)
    assert out["writes"] == list(lay.writes) and out["readers"] == list(lay.readers)
    assert out["write_layer"] == [0, 1, 1, 2, 2, 3, 3] and out["reader_layer"] == [1, 2, 3, 4]
    for q in QUANTITIES:
        M = out[q]
        assert len(M) == 4 and all(len(row) == 7 for row in M)
        for r, k in enumerate(lay.reader_index):
            assert all(v is None for v in M[r][k:]) and all(isinstance(v, float) for v in M[r][:k])
    by = out["by_distance"]
    assert by["distance"] == [1, 2, 3, 4]
    for key in ("retention", "dilution", "visibility", "reading"):
        assert len(by[key]) == 4 and len(by[key + "_ci95"]) == 4
    for key in ("visibility_decay_per_layer", "dilution_decay_per_layer", "share_explained_by_dilution"):
        assert key in by
    assert set(out["locality"]["share_within"]) == {"1", "2", "4", "8"}
    assert len(out["locality"]["mean_distance"]) == 4 and len(out["locality"]["mean_distance_null"]) == 4
    ab = out["ablation"]
    assert ab["writes"] == ["attn_out.1", "mlp_out.1"] and ab["distance"] == [1, 2, 3, 4]
    assert len(ab["normalized_input_change"]) == 2 and len(ab["final_kl"]) == 2
    assert ab["normalized_input_change"][0][2] is None  # block 1 writes at layer 2; no reader 3 layers later
    report = format_deletion_report(res)
    for needle in ("retention", "dilution", "visibility", "share of the fall", "locality", "causal check", "mlp_out.1"):
        assert needle in report
    empty = collect_deletion(model, batch, batch_size=4, n_boot=0).to_json()["ablation"]
    assert empty["writes"] == [] and empty["final_kl"] == []


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_ablation_changes_only_later_readers(model_dirs, name):
    model = _model(model_dirs, name)
    batch = _padded_batch(n=3, length=10, seed=5)
    writes = ["embed", "mlp_out.0", "attn_out.1", "mlp_out.2"]
    out = ablation_check(model, batch, writes=writes, batch_size=3)
    lay = stream_layout(model.n_layers)
    assert out["writes"] == writes
    for i, w in enumerate(writes):
        c = lay.writes.index(w)
        for r, k in enumerate(lay.reader_index):
            change = out["reader_change"][i][r]
            if c >= k:
                assert change == 0.0, (w, lay.readers[r])  # exactly nothing before the write
            else:
                assert change > 1e-4, (w, lay.readers[r])
        assert out["final_kl"][i] > 0
        wl = lay.write_layer[c]
        for j, d in enumerate(out["distance"]):
            cell = out["normalized_input_change"][i][j]
            if wl + d <= model.n_layers + 1:
                assert cell == pytest.approx(out["reader_change"][i][lay.reader_layer.index(wl + d)])
            else:
                assert cell is None


def test_ablated_embedding_is_the_mean_of_token_plus_position(model_dirs):
    model = _model(model_dirs, "gpt2")
    batch = _padded_batch(n=3, length=10, seed=6)
    W, Rd = _capture(model, batch.tokens, batch.attention_mask)
    valid = batch.attention_mask.clone()
    valid[:, 0] = False
    means = _write_means(model, batch.tokens, batch.attention_mask, ["embed", "mlp_out.1"], batch_size=3)
    torch.testing.assert_close(means["embed"], W[:, :, 0][valid].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means["mlp_out.1"], W[:, :, 4][valid].mean(0), rtol=1e-5, atol=1e-6)
    seen = {}
    hooks = _ablation_hooks(model, "embed", means["embed"]) + [("resid_pre", 0, lambda x: seen.update(r=x.clone()))]
    with torch.inference_mode(), model.hooks(hooks):
        model.forward(batch.tokens, attention_mask=batch.attention_mask)
    torch.testing.assert_close(seen["r"][:, 1:].double(), means["embed"].expand(3, 9, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["r"][:, 0].double(), Rd[:, 0, 0], rtol=1e-5, atol=1e-6)  # position 0 kept


def test_parse_ablate(model_dirs):
    model = _model(model_dirs, "llama")  # 3 blocks
    assert parse_ablate("0,2", model) == ["attn_out.0", "mlp_out.0", "attn_out.2", "mlp_out.2"]
    assert parse_ablate("mlp_out.1, embed", model) == ["embed", "mlp_out.1"]
    assert parse_ablate("1,attn_out.1", model) == ["attn_out.1", "mlp_out.1"]
    assert parse_ablate("default", model) == ["attn_out.0", "mlp_out.0", "attn_out.1", "mlp_out.1",
                                              "attn_out.2", "mlp_out.2"]
    assert len(parse_ablate("all", model)) == 7
    for bad in ("3", "-1", "mlp_out.7", "foo", "", "1,,2", "resid_pre.1"):
        with pytest.raises(NormgrowthError):
            parse_ablate(bad, model)


def test_bad_input(model_dirs):
    model = _model(model_dirs, "llama")
    with pytest.raises(NormgrowthError):
        collect_deletion(model, _padded_batch(), batch_size=0)
    one = types.SimpleNamespace(tokens=torch.zeros(2, 1, dtype=torch.long),
                                attention_mask=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(NormgrowthError):
        collect_deletion(model, one)


@pytest.mark.skipif(not STORIES.is_dir(), reason="stories260K fixture not present")
def test_stories260k_rmsnorm_real_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(str(STORIES), device="cpu")
    tokens = torch.from_numpy(np.load(STORIES / "samples.npy")[:2, :40]).long()
    batch = types.SimpleNamespace(tokens=tokens, attention_mask=torch.ones_like(tokens, dtype=torch.bool), source="s")
    res = collect_deletion(model, batch, batch_size=2, n_boot=20)
    assert not res.centers and res.max_write_sum_rel_error < 1e-4
    mean = res.mean
    np.testing.assert_allclose(np.nansum(mean["reading"], -1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.nansum(mean["reading_null"], -1), 1.0, atol=1e-5)
    W, _ = _capture(model, tokens, batch.attention_mask)
    direct = direct_quantities(W[:, 1:].reshape(-1, *W.shape[2:]).numpy(), res.layout.reader_index, center=False)
    for q in QUANTITIES:
        np.testing.assert_allclose(mean[q], np.nanmean(direct[q], 0), rtol=1e-4, atol=1e-5, err_msg=q)


def test_ablation_kl_matches_plain_hf_hooks(model_dirs):
    """Mean-ablate mlp_out.1 with a plain PyTorch hook on the HF module: same KL as ablation_check."""
    from transformers import AutoModelForCausalLM

    model = _model(model_dirs, "llama")
    batch = _padded_batch(n=3, length=10, seed=7)
    tokens, mask = batch.tokens, batch.attention_mask
    valid = mask.clone()
    valid[:, 0] = False
    hf = AutoModelForCausalLM.from_pretrained(str(model_dirs["llama"])).eval()
    mlp = hf.model.layers[1].mlp
    seen = []
    handle = mlp.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    with torch.no_grad():
        clean = torch.log_softmax(hf(tokens, attention_mask=mask.long()).logits.float(), -1)
    handle.remove()
    mean = seen[0][valid].double().mean(0).float()

    def replace(mod, inp, out):
        out = out.clone()
        out[:, 1:] = mean
        return out

    handle = mlp.register_forward_hook(replace)
    with torch.no_grad():
        ablated = torch.log_softmax(hf(tokens, attention_mask=mask.long()).logits.float(), -1)
    handle.remove()
    kl = (clean.exp() * (clean - ablated)).sum(-1)[valid].mean()
    out = ablation_check(model, batch, writes=["mlp_out.1"], batch_size=3)
    assert out["final_kl"][0] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
