"""Tests for normgrowth.deletion: planted streams, numpy re-computations, tiny random models of each family."""

from __future__ import annotations

import json
import math
import types
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from scipy import stats

from normgrowth.deletion import (QUANTITIES, DeletionResults, _ablation_hooks, _write_means, _WriteCollector,
                                 ablation_check, collect_deletion, deletion_document, deletion_quantities,
                                 deletion_verdict, distance_matrix, format_deletion_json, format_deletion_report,
                                 gram_from_writes, locality, normalized_change, parse_ablate, stream_layout,
                                 stream_parts, summarize_deletion, token_sums, write_slopes)
from conftest import make_tiny, randomise_biases
from normgrowth.errors import NormgrowthError
from normgrowth.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore:Mean of empty slice")

STORIES = Path(__file__).parents[2] / "shared" / "fixtures" / "stories260K"


# ----------------------------------------------------------------------------------------------
# independent numpy reference (explicit writes, no Gram matrix)
# ----------------------------------------------------------------------------------------------
def direct_quantities(writes: np.ndarray, reader_index, center: bool) -> dict[str, np.ndarray]:
    """rho, delta, nu, R and the equal-norm nulls from explicit writes [T, C, d], token by token, in float64."""
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
            delta0 = 1.0 / np.linalg.norm(stream0, axis=-1)
            out["dilution_null"][:, r, c] = delta0
            out["visibility_null"][:, r, c] = np.einsum("td,td->t", unit[:, c:k].sum(1), unit[:, c]) * delta0
            out["excess_dilution"][:, r, c] = delta / delta0
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


def centred_tokens(writes: np.ndarray) -> np.ndarray:
    """Projected writes [T, C, d] minus each write's mean over the tokens."""
    return writes - writes.mean(0, keepdims=True)


def ratio_of_sums(wt: np.ndarray, reader_index, raw: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """rho, delta, R from token-centred writes [T, C, d], summing over tokens with explicit vectors; the dilution
    divides by the stream of the writes before token-centring (``raw``, default ``wt``): what the norm sees."""
    T, C, _ = wt.shape
    raw = wt if raw is None else raw
    out = {q: np.full((len(reader_index), C), np.nan) for q in ("retention", "dilution", "reading")}
    for r, k in enumerate(reader_index):
        stream = wt[:, :k].sum(1)
        seen = raw[:, :k].sum(1)
        for c in range(k):
            w = wt[:, c]
            out["retention"][r, c] = np.sum(wt[:, c:k].sum(1) * w) / np.sum(w * w)
            out["dilution"][r, c] = math.sqrt(np.sum(w * w) / np.sum(seen * seen))
            out["reading"][r, c] = np.sum(w * stream) / np.sum(stream * stream)
    return out


def _sums_from_writes(P: np.ndarray, seq_of_token: np.ndarray, n_seqs: int, reader_index, eps: float):
    """Per-sequence sums for summarize_deletion from projected writes [T, C, d] (via token_sums)."""
    mu = P.mean(0)
    gram, change, size = token_sums(torch.from_numpy(P), torch.from_numpy(mu), reader_index, eps)
    C, R = P.shape[1], len(reader_index)
    seq_gram, seq_infl, seq_f = np.zeros((n_seqs, C, C)), np.zeros((n_seqs, R, C)), np.zeros((n_seqs, R))
    np.add.at(seq_gram, seq_of_token, gram.numpy())
    np.add.at(seq_infl, seq_of_token, change.numpy())
    np.add.at(seq_f, seq_of_token, size.numpy())
    return seq_gram, np.bincount(seq_of_token, minlength=n_seqs), seq_infl, seq_f, mu @ mu.T


def test_ratio_of_sums_equal_explicit_vectors_and_split_into_sequences():
    rng = np.random.default_rng(7)
    lay = stream_layout(3)
    T = 60
    writes = rng.standard_normal((T, lay.n_writes, 12)) * np.exp(rng.uniform(-1, 1, (1, lay.n_writes, 1))) + 0.5
    P = writes - writes.mean(-1, keepdims=True)
    seq = np.repeat(np.arange(6), 10)
    sums = _sums_from_writes(P, seq, 6, lay.reader_index, eps=1e-5)
    summ = summarize_deletion(*sums, lay, n_boot=0)
    want = ratio_of_sums(centred_tokens(P), lay.reader_index, raw=P)
    for q in ("retention", "dilution", "reading"):
        np.testing.assert_allclose(summ["point"][f"matrix.{q}"], want[q], rtol=1e-9, err_msg=q)
    # the null: every token-centred write rescaled to one RMS norm, directions kept (its mean with it)
    wt = centred_tokens(P)
    scale = np.sqrt((wt**2).sum((0, 2)))[None, :, None]
    unit = ratio_of_sums(wt / scale, lay.reader_index, raw=P / scale)
    np.testing.assert_allclose(summ["point"]["matrix.reading_null"], unit["reading"], rtol=1e-9)
    np.testing.assert_allclose(summ["point"]["matrix.dilution_null"], unit["dilution"], rtol=1e-9)
    np.testing.assert_allclose(summ["point"]["matrix.excess_dilution"], want["dilution"] / unit["dilution"],
                               rtol=1e-9)


def test_normalized_change_equals_explicit_vectors():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((50, 16)) * 3
    w = rng.standard_normal((50, 16)) * np.exp(rng.uniform(-6, 0, (50, 1)))  # down to 1e-3 of the stream
    for eps in (1e-5, 1e12):
        N = lambda x: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)  # noqa: E731
        want = np.linalg.norm(N(a) - N(a - w), axis=-1)
        got, size = normalized_change((a * a).sum(-1), (a * w).sum(-1), (w * w).sum(-1), 16, eps)
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(size, np.linalg.norm(N(a), axis=-1), rtol=1e-12)


def test_write_slopes_are_least_squares_per_write():
    lay = stream_layout(4)
    dist = distance_matrix(lay.write_layer, lay.reader_layer)
    rng = np.random.default_rng(9)
    m = np.where(np.isfinite(dist), np.exp(rng.standard_normal(dist.shape)), np.nan)
    slopes = write_slopes(m, dist)
    for c in range(lay.n_writes):
        rows = np.isfinite(dist[:, c])
        if rows.sum() < 2:
            assert math.isnan(slopes[c])
            continue
        assert slopes[c] == pytest.approx(stats.linregress(dist[rows, c], np.log(m[rows, c])).slope, rel=1e-10)
    m[2, 0] = -1.0  # a non-positive value makes that write's slope undefined, not silently refitted
    assert math.isnan(write_slopes(m, dist)[0])


def test_orthogonal_growing_writes_dilution_decays_at_the_growth_rate():
    """Mean-free orthogonal writes with norm g^layer: retention 1, every write's dilution falls by ~g."""
    growth, n_layers = 1.3, 10
    lay = stream_layout(n_layers)
    rng = np.random.default_rng(0)
    norms = growth ** np.asarray(lay.write_layer, dtype=float)
    X = np.stack([orthonormal_mean_free(lay.n_writes, 32, rng) * norms[:, None] for _ in range(20)])
    P = np.concatenate([X, -X])  # every write has token mean exactly 0
    sums = _sums_from_writes(P, np.repeat(np.arange(8), 5), 8, lay.reader_index, eps=1e-5)
    doc = deletion_document(summarize_deletion(*sums, lay, n_boot=50))
    rho = np.array(doc["retention"], dtype=float)
    np.testing.assert_allclose(rho[np.isfinite(rho)], 1.0, atol=1e-9)
    mlp4 = lay.writes.index("mlp_out.4")
    final = np.array(doc["dilution"])[-1]
    assert final[mlp4] / final[mlp4 + 2] == pytest.approx(1 / growth, rel=1e-9)
    far = [r for r in doc["per_write"] if r["write"] == "mlp_out.0"][0]
    assert far["dilution_decay_per_layer"] == pytest.approx(growth, rel=0.05)
    ir = doc["innovation_retention"]  # orthogonal writes: every write is all innovation, and all of it is kept
    assert ir["pooled"] == pytest.approx(1.0, abs=1e-9) and ir["n_no_innovation"] == 0
    assert ir["n_writes"] == lay.n_writes - 2  # writes with a reader >= 2 layers on: all but the last block's
    assert [bool(u) for u in doc["by_distance"]["used"]] == [n >= 3 for n in doc["by_distance"]["n_pairs"]]
    assert not doc["by_distance"]["used"][-1]  # the largest distance has 2 pairs: never pooled


def test_verdict_labels_precedence_and_flags():
    kept, local, mag, direc, flat = [0.95, 1.05], [-0.3, -0.2], [0.6, 0.9], [0.1, 0.3], [-0.05, 0.02]
    v = deletion_verdict(kept, local, mag, 0.1)
    assert v["label"] == "magnitude" and v["flags"] == []
    assert deletion_verdict(kept, local, direc, 0.1)["label"] == "direction"
    assert deletion_verdict(kept, flat, mag, 0.1)["label"] == "no locality"
    assert deletion_verdict(kept, [0.1, 0.3], mag, 0.1)["label"] == "no locality"  # reads grow with distance
    assert deletion_verdict(kept, local, [0.4, 0.6], 0.1)["label"] == "inconclusive"  # share straddles 0.5
    assert deletion_verdict(kept, [None, None], mag, 0.1)["label"] == "inconclusive"
    erased = deletion_verdict([0.4, 0.6], local, mag, 0.1)
    assert erased["label"] == "erasure" and erased["flags"] == ["magnitude"]  # erasure first, the rest flagged
    both = deletion_verdict([1.3, 1.5], local, direc, 0.7)
    assert both["label"] == "reinforced" and both["flags"] == ["direction", "front-loaded"]
    front = deletion_verdict(kept, flat, mag, 0.5)
    assert front["label"] == "no locality" and front["flags"] == ["front-loaded"]  # never the label
    assert deletion_verdict([0.79, 0.81], flat, mag, None)["flags"] == []  # retention CI straddles 0.8


def test_bootstrap_ci_is_exact_for_identical_sequences_and_counts_nothing():
    lay = stream_layout(2)
    rng = np.random.default_rng(10)
    one = rng.standard_normal((5, lay.n_writes, 8))
    P = np.concatenate([one] * 6)  # six identical sequences
    sums = _sums_from_writes(P, np.repeat(np.arange(6), 5), 6, lay.reader_index, eps=1e-5)
    doc = deletion_document(summarize_deletion(*sums, lay, n_boot=40))
    lo, hi = doc["by_distance"]["retention_far_ci95"]
    assert lo == pytest.approx(doc["by_distance"]["retention_far"]) and hi == pytest.approx(lo)
    assert not any(doc["bootstrap"]["nonfinite_replicates"].values())
    assert any("fewer than 30" in w for w in doc["warnings"])


def test_nan_replicates_are_counted_and_reported():
    """A write that is non-zero in one sequence only: replicates that miss that sequence are undefined."""
    lay = stream_layout(2)
    rng = np.random.default_rng(12)
    P = rng.standard_normal((40, lay.n_writes, 8))
    # attn_out.0 (read 2 layers later by the final stream) writes only in sequence 0, with token mean 0
    P[:, 1] = 0.0
    P[0:2, 1], P[2:4, 1] = P[0, 1] + 1.0, -(P[0, 1] + 1.0)
    seq = np.repeat(np.arange(10), 4)
    sums = _sums_from_writes(P, seq, 10, lay.reader_index, eps=1e-5)
    summ = summarize_deletion(*sums, lay, n_boot=200, seed=1)
    assert np.isfinite(summ["point"]["retention_far"])
    # count independently: replicates drawing no copy of sequence 0 (same draws as the bootstrap)
    from normgrowth.numerics import resample_counts
    missing = int(sum((c[:, 0] == 0).sum() for c in resample_counts(10, 200, 1)))
    assert missing > 20
    doc = deletion_document(summ)
    assert doc["bootstrap"]["nonfinite_replicates"]["retention_far"] == missing
    assert any("gave NaN" in w for w in doc["warnings"])


def test_locality_on_planted_shares():
    lay = stream_layout(2)  # writes embed(0) a0(1) m0(1) a1(2) m1(2); readers layers 1, 2, 3
    dist = distance_matrix(lay.write_layer, lay.reader_layer)
    nan = np.nan
    reading = np.array([[1.0, nan, nan, nan, nan],
                        [0.2, 0.3, 0.5, nan, nan],
                        [0.1, 0.1, 0.2, 0.25, 0.35]])
    null = np.where(np.isfinite(reading), 1.0, nan) / np.array([[1], [3], [5]])
    influence = np.where(np.isfinite(reading), 2.0, nan)  # equal influence: shares 1/k per reader
    loc = locality(reading, null, dist, within=(1, 2), influence=influence)
    np.testing.assert_allclose(loc["mean_distance"], [1.0, 0.2 * 2 + 0.8, 0.1 * 3 + 0.3 * 2 + 0.6])
    np.testing.assert_allclose(loc["mean_distance_null"], [1.0, 4 / 3, (3 + 2 + 2 + 1 + 1) / 5])
    np.testing.assert_allclose(loc["mean_distance_influence"], loc["mean_distance_null"])
    np.testing.assert_allclose(loc["share_within_per_reader"]["1"], [1.0, 0.8, 0.6])
    assert loc["share_within"]["1"] == pytest.approx((0.8 + 0.6) / 2)  # reader 0 has nothing farther than 1
    assert loc["share_within"]["2"] == pytest.approx(0.9)  # only the final reader has a write 3 layers away
    assert loc["share_within_null"]["2"] == pytest.approx(0.8)
    assert loc["share_within_influence"]["2"] == pytest.approx(0.8)


def test_stream_parts_split_the_mean_square():
    rng = np.random.default_rng(11)
    lay = stream_layout(2)
    P = rng.standard_normal((30, lay.n_writes, 6)) + rng.standard_normal((1, lay.n_writes, 6)) * 3
    sums = _sums_from_writes(P, np.repeat(np.arange(3), 10), 3, lay.reader_index, eps=1e-5)
    parts = stream_parts(sums[0].sum(0), sums[4], 30, lay.reader_index)
    for r, k in enumerate(lay.reader_index):
        stream = P[:, :k].sum(1)
        assert parts["total"][r] ** 2 == pytest.approx(np.mean(np.sum(stream**2, -1)), rel=1e-10)
        assert parts["shared"][r] == pytest.approx(np.linalg.norm(stream.mean(0)), rel=1e-10)

# ----------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------
# test-local names -> rows of conftest's TINY_CONFIGS
_TABLE_ROWS = {"gpt2": "gpt2", "gpt-neox": "neox", "llama": "llama", "opt": "opt", "gpt-neo": "neo"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny random checkpoints of every family with nonzero biases (a forgotten bias then shows), and an
    LN-free GPT-2 in the published storage format (eps 1e12, gains x 1e6 / 0.5)."""
    dirs = {}
    for i, (name, row) in enumerate(_TABLE_ROWS.items()):
        hf = make_tiny(row, seed=0, init=lambda m, i=i: randomise_biases(m, i))
        dirs[name] = tmp_path_factory.mktemp(name)
        hf.save_pretrained(dirs[name])
    hf = make_tiny("gpt2", seed=0, init=lambda m: randomise_biases(m, 9), ln_free_sigma=0.5)
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
def test_writes_sum_to_every_reader_and_collector_uses_right_projection(model_dirs, name):
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
    coll = _WriteCollector(model, lay)
    valid = real.clone()
    valid[:, 0] = False
    coll.start_batch(valid)
    with torch.inference_mode(), model.hooks(coll.hooks()):
        model.forward(batch.tokens, attention_mask=batch.attention_mask)
    assert coll.max_rel_error < 1e-4
    P = W - W.mean(-1, keepdim=True) if expect_center else W
    got = coll.done[real].double()
    scale = P[real].abs().amax()
    assert float((got - P[real]).abs().max() / scale) < 1e-5


def _explicit(model, batch):
    """Ratio-of-sums matrices and direct influence from explicitly captured writes, with numpy."""
    W, _ = _capture(model, batch.tokens, batch.attention_mask)
    valid = batch.attention_mask.clone()
    valid[:, 0] = False
    P = W[valid].numpy()
    if model.centers:
        P = P - P.mean(-1, keepdims=True)
    lay = stream_layout(model.n_layers)
    wt = centred_tokens(P)
    out = ratio_of_sums(wt, lay.reader_index, raw=P)
    eps = float(model.norm_eps)
    N = lambda x: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)  # noqa: E731
    infl = np.full((len(lay.readers), lay.n_writes), np.nan)
    for r, k in enumerate(lay.reader_index):
        a = P[:, :k].sum(1)
        for c in range(k):
            infl[r, c] = np.linalg.norm(N(a) - N(a - wt[:, c]), axis=-1).sum() / np.linalg.norm(N(a), axis=-1).sum()
    out["influence"] = infl
    return out, valid


def test_collector_matches_explicit_vectors_and_batch_size(model_dirs):
    model = _model(model_dirs, "opt")  # learned positions that depend on the padding mask
    batch = _padded_batch(n=5, length=12, seed=3)
    res2 = collect_deletion(model, batch, batch_size=2, n_boot=50)
    res5 = collect_deletion(model, batch, batch_size=5, n_boot=50)
    want, valid = _explicit(model, batch)
    np.testing.assert_array_equal(res2.seq_n_tokens, valid.sum(1).numpy())
    for q in ("retention", "dilution", "reading", "influence"):
        np.testing.assert_allclose(res2.mean[q], want[q], rtol=1e-4, atol=1e-6, err_msg=q)
    np.testing.assert_allclose(res5.seq_gram, res2.seq_gram, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(res5.seq_infl, res2.seq_infl, rtol=1e-6, atol=1e-8)
    assert res2.max_write_sum_rel_error < 1e-4


def test_influence_on_ln_free_model_is_the_dilution(model_dirs):
    """LN-free: N(x) = P(x) / 1e6 up to var/1e12, so the direct change is ||w~_c|| / ||a||, token by token."""
    model = _model(model_dirs, "ln-free")
    batch = _padded_batch(n=4, length=10, seed=8)
    want, _ = _explicit(model, batch)
    got = collect_deletion(model, batch, batch_size=4, n_boot=0).mean["influence"]
    np.testing.assert_allclose(got, want["influence"], rtol=1e-4, atol=1e-7)


def test_to_json_schema_report_save_load_and_frame(model_dirs, tmp_path):
    model = _model(model_dirs, "gpt-neox")
    batch = _padded_batch(n=4, length=10, seed=4)
    res = collect_deletion(model, batch, batch_size=4, ablate="1", n_boot=50)
    out = res.to_json()
    text = json.dumps(out, allow_nan=False)  # NaN became null
    assert json.loads(text)["model"] == str(model_dirs["gpt-neox"])
    for key in ("model", "ln_free", "writes", "write_layer", "readers", "reader_layer", *QUANTITIES, "influence",
                "by_distance", "per_write", "verdict", "locality", "stream_parts", "shared_component", "bootstrap",
                "warnings", "zero_writes", "ablation"):
        assert key in out, key
    lay = stream_layout(3)
    assert out["writes"] == list(lay.writes) and out["readers"] == list(lay.readers)
    assert out["write_layer"] == [0, 1, 1, 2, 2, 3, 3] and out["reader_layer"] == [1, 2, 3, 4]
    for q in QUANTITIES:
        M = out[q]
        assert len(M) == 4 and all(len(row) == 7 for row in M)
        for r, k in enumerate(lay.reader_index):
            assert all(v is None for v in M[r][k:]) and all(isinstance(v, float) for v in M[r][:k])
    assert set(out["verdict"]) >= {"label", "flags", "evidence", "thresholds", "reason"}
    for key in ("read", "read_no_growth", "locality", "magnitude_share", "innovation_retention", "front_loaded"):
        assert key in out, key
    assert out["read_readers"] == ["attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2", "unembed"]
    assert out["read_reader_k"] == [1, 1, 3, 3, 5, 5, 7]  # parallel blocks: the MLP reads resid_pre too
    assert len(out["read"]) == 7 and all(len(row) == 7 for row in out["read"])
    assert out["read"][0][1] is None and isinstance(out["read"][0][0], float)
    by = out["by_distance"]
    for key in ("retention", "dilution", "visibility", "reading", "excess_dilution", "influence"):
        assert len(by[key]) == len(by["distance"]) and len(by[key + "_ci95"]) == len(by["distance"])
    assert any("fewer than 30" in w for w in out["warnings"])  # 4 sequences
    assert set(out["locality"]["share_within"]) == {"1", "2", "4", "8"}
    assert len(out["locality"]["mean_distance_influence"]) == 4
    ab = out["ablation"]
    assert ab["writes"] == ["attn_out.1", "mlp_out.1"] and ab["distance"] == [1, 2, 3, 4]
    assert ab["normalized_input_change"][0][2] is None  # block 1 writes at layer 2; no reader 3 layers later
    report = format_deletion_report(res)
    for needle in ("VERDICT", "flags", "locality slope", "magnitude share", "innovation retention", "excess",
                   "influence", "causal check", "mlp_out.1", "warning"):
        assert needle in report
    path = res.save(tmp_path / "del")
    back = DeletionResults.load(path)
    assert json.dumps(back.to_json(), sort_keys=True) == json.dumps(out, sort_keys=True)
    frame = res.to_frame()
    sel = frame[(frame.statistic == "dilution") & (frame.site == "embed") & (frame.reader == "final")]
    assert float(sel.value.iloc[0]) == pytest.approx(out["dilution"][3][0])
    assert "magnitude" in res.summary() or out["verdict"]["label"] in res.summary()
    with pytest.raises(NormgrowthError, match="older normgrowth"):
        format_deletion_json({k: v for k, v in out.items() if k != "verdict"})
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
    tokens = torch.from_numpy(np.load(STORIES / "samples.npy")[:3, :40]).long()
    batch = types.SimpleNamespace(tokens=tokens, attention_mask=torch.ones_like(tokens, dtype=torch.bool), source="s")
    res = collect_deletion(model, batch, batch_size=3, n_boot=20)
    assert not res.centers and res.max_write_sum_rel_error < 1e-4
    mean = res.mean
    np.testing.assert_allclose(np.nansum(mean["reading"], -1), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.nansum(mean["reading_null"], -1), 1.0, atol=1e-9)
    want, _ = _explicit(model, batch)
    for q in ("retention", "dilution", "reading", "influence"):
        np.testing.assert_allclose(mean[q], want[q], rtol=1e-4, atol=1e-6, err_msg=q)



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
