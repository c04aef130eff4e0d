"""Planted truth for the deletion verdict: real GPT-2 checkpoints (LN-free storage format) whose answer is known.

Every MLP is exactly linear, ``relu(x M) - relu(-x M) = x M`` (paired ``c_fc`` columns, ``c_proj`` rows +I / -I),
the LayerNorms are LN-free (eps 1e12, stored weight 1e6 = gain 1 / sigma 1, so ``LN(x) = x - mean(x)``), and the
attention writes nothing but its output bias. Content lives in orthonormal blocks ``Q_b`` of ``R^32`` orthogonal
to the all-ones vector (so the normalisation's centring leaves it alone); the token embedding puts a random
``z_t`` in block 0.

* (a) grows, never erases: MLP ``l`` copies ``z`` into block ``l + 1`` scaled by ``g^(l+1)``;
* (b) erases, does not grow: MLP ``l`` moves ``z`` from block ``l`` to block ``l + 1`` (adds it there, removes it
  here), so every write is half-erased by the next one and the stream keeps one norm;
* (c) = (a) plus a large constant vector ``K u`` (``u`` orthogonal to every block) in every write: the embedding
  (position table), every attention bias and every MLP output bias.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

from normgrowth.deletion import collect_deletion, deletion_quantities, format_deletion_report, stream_layout
from normgrowth.models import load_model

D, N_LAYERS, BLOCK, VOCAB = 32, 4, 4, 100
GROWTH, K_SHARED = 1.5, 20.0


def _basis(seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((D, (N_LAYERS + 1) * BLOCK + 1))
    a -= a.mean(0, keepdims=True)
    q, _ = np.linalg.qr(a)
    return q  # [D, 21]: orthonormal columns, each orthogonal to the all-ones vector


def build_planted(kind: str, path, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=N_LAYERS, n_embd=D, n_head=4, n_inner=4 * D, n_positions=64, vocab_size=VOCAB,
                     activation_function="relu", layer_norm_epsilon=1e12, bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(cfg)
    q = _basis(seed)
    blocks = [q[:, BLOCK * b:BLOCK * (b + 1)] for b in range(N_LAYERS + 1)]
    u = q[:, -1]
    z = np.random.default_rng(seed + 1).standard_normal((VOCAB, BLOCK))
    shared = K_SHARED * u if kind == "c" else np.zeros(D)
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        model.transformer.wte.weight.copy_(t(z @ blocks[0].T))
        model.transformer.wpe.weight.copy_(t(np.tile(shared, (64, 1))))
        for ln in [model.transformer.ln_f] + [m for blk in model.transformer.h for m in (blk.ln_1, blk.ln_2)]:
            ln.weight.fill_(1e6)  # LN-free storage: gain 1 * 1e6 / sigma_avg with sigma_avg = 1
            ln.bias.zero_()
        for layer, blk in enumerate(model.transformer.h):
            blk.attn.c_proj.weight.zero_()
            blk.attn.c_proj.bias.copy_(t(shared))
            if kind == "b":
                M = blocks[layer] @ (blocks[layer + 1] - blocks[layer]).T
            else:
                M = GROWTH ** (layer + 1) * blocks[0] @ blocks[layer + 1].T
            fc = np.zeros((D, 4 * D))
            fc[:, :D], fc[:, D:2 * D] = M, -M
            proj = np.zeros((4 * D, D))
            proj[:D], proj[D:2 * D] = np.eye(D), -np.eye(D)
            blk.mlp.c_fc.weight.copy_(t(fc))
            blk.mlp.c_fc.bias.zero_()
            blk.mlp.c_proj.weight.copy_(t(proj))
            blk.mlp.c_proj.bias.copy_(t(shared))
    model.save_pretrained(path)
    return path, {"blocks": blocks, "u": u, "z": z}


def _batch(n_seqs: int = 40, seq_len: int = 16, seed: int = 3):
    tokens = torch.from_numpy(np.random.default_rng(seed).integers(1, VOCAB, (n_seqs, seq_len)))
    tokens[:, 0] = 0
    return types.SimpleNamespace(tokens=tokens, attention_mask=torch.ones_like(tokens, dtype=torch.bool),
                                 source="random ids")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = {}
    batch = _batch()
    for kind in ("a", "b", "c"):
        path, truth = build_planted(kind, tmp_path_factory.mktemp(f"planted_{kind}"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model(str(path), device="cpu")
        res = collect_deletion(model, batch, batch_size=20, n_boot=200)
        out[kind] = {"model": model, "res": res, "doc": res.to_json(), "truth": truth}
    out["batch"] = batch
    return out


def test_planted_models_are_what_they_claim(planted):
    """Independent check of the construction with plain HF forward hooks: linear MLPs, growth or not."""
    from transformers import GPT2LMHeadModel

    batch = planted["batch"]
    for kind, growth in (("a", True), ("b", False)):
        model = planted[kind]["model"]
        assert model.ln_free and model.centers
        hf = GPT2LMHeadModel.from_pretrained(model.spec).eval()
        outs = {}
        hooks = [blk.register_forward_hook(lambda m, i, o, l=l: outs.__setitem__(l, o[0] if isinstance(o, tuple) else o))
                 for l, blk in enumerate(hf.transformer.h)]
        with torch.no_grad():
            hf(batch.tokens)
        for h in hooks:
            h.remove()
        norms = [float(outs[l][:, 1:].norm(dim=-1).mean()) for l in range(N_LAYERS)]
        ratios = np.array(norms[1:]) / np.array(norms[:-1])
        if growth:
            assert np.all(ratios > 1.2)
        else:
            np.testing.assert_allclose(ratios, 1.0, rtol=1e-4)
        truth = planted[kind]["truth"]
        z = truth["z"][batch.tokens.numpy()]  # [n, p, 4]
        last = (GROWTH ** N_LAYERS if growth else 1.0) * z @ truth["blocks"][N_LAYERS].T
        if growth:
            last = last + sum(GROWTH ** (l + 1) * z @ truth["blocks"][l + 1].T for l in range(N_LAYERS - 1)) \
                + z @ truth["blocks"][0].T
        np.testing.assert_allclose(outs[N_LAYERS - 1].numpy(), last, rtol=1e-4, atol=1e-4)


def test_planted_verdicts(planted):
    """(b) erases: the label says so. (a), (c) keep every write in an LN-free model, where nothing divides by the
    stream's size: neither erasure nor reinforcement, and a magnitude share of 0."""
    doc = planted["b"]["doc"]
    assert doc["verdict"]["label"] == "erasure", doc["verdict"]
    assert "VERDICT: erasure" in format_deletion_report(planted["b"]["res"])
    for kind in ("a", "c"):
        doc = planted[kind]["doc"]
        assert doc["verdict"]["label"] not in ("erasure", "reinforced", "magnitude"), doc["verdict"]
        lo, hi = doc["innovation_retention"]["pooled_ci95"]
        assert 0.8 < lo <= hi < 1.25
        assert abs(doc["locality"]["magnitude_slope"]) < 1e-6  # s = sqrt(var + 1e12): constant to 1e-12


def test_growing_model_keeps_every_write(planted):
    for kind in ("a", "c"):
        doc = planted[kind]["doc"]
        checked = 0
        lay = stream_layout(N_LAYERS)
        dist = np.array(lay.reader_layer)[:, None] - np.array(lay.write_layer)[None, :]
        rho = np.array(doc["retention"], dtype=float)
        for c, w in enumerate(lay.writes):
            if w in doc["zero_writes"]:
                assert np.all(np.isnan(rho[:, c]))
                continue
            far = rho[dist[:, c] >= 2, c]
            assert np.all((far >= 0.9) & (far <= 1.1)), (kind, w, far)
            checked += far.size
        assert checked == 4 + 3 + 2 + 1  # the embedding, mlp_out.0, .1, .2 at every reader >= 2 layers away
        assert doc["by_distance"]["retention_far_ci95"][0] > 0.99


def test_erasing_model_retains_half(planted):
    """Write l adds z to block l+1 and removes it from block l; write l+1 removes the first half again."""
    doc = planted["b"]["doc"]
    rho = np.array(doc["retention"], dtype=float)
    lay = stream_layout(N_LAYERS)
    for layer in range(N_LAYERS - 1):
        c = lay.writes.index(f"mlp_out.{layer}")
        later = [r for r, k in enumerate(lay.reader_index) if k > c + 2]  # after mlp_out.(layer+1)
        np.testing.assert_allclose(rho[later, c], 0.5, atol=1e-4)
    np.testing.assert_allclose(rho[1:, 0], 0.0, atol=1e-4)  # the embedding is moved away by mlp_out.0
    assert doc["by_distance"]["excess_dilution_decay_per_layer"] == pytest.approx(1.0, abs=1e-4)  # equal write norms: dilution is exactly its null


def test_zero_writes_are_skipped_and_counted(planted):
    for kind in ("a", "b", "c"):  # attention writes nothing but a constant bias: zero once token-centred
        doc = planted[kind]["doc"]
        assert doc["zero_writes"] == [f"attn_out.{l}" for l in range(N_LAYERS)]
        assert any("zero once token-centred" in w for w in doc["warnings"])
        rows = {r["write"]: r for r in doc["per_write"]}
        assert rows["attn_out.0"]["zero"] and not rows["attn_out.0"]["in_summary"]


def test_shared_component_is_reported_and_removed(planted):
    """(c): the constant K u is the write means; left in (uncentred), it would inflate retention."""
    doc, res = planted["c"]["doc"], planted["c"]["res"]
    truth, batch = planted["c"]["truth"], planted["batch"]
    lay = stream_layout(N_LAYERS)
    z = truth["z"][batch.tokens[:, 1:].numpy()].reshape(-1, BLOCK)
    got = np.array(doc["shared_component"]["write_mean_norm"], dtype=float)
    for layer in range(N_LAYERS):
        mean_write = GROWTH ** (layer + 1) * z.mean(0) @ truth["blocks"][layer + 1].T + K_SHARED * truth["u"]
        assert got[lay.writes.index(f"mlp_out.{layer}")] == pytest.approx(np.linalg.norm(mean_write), rel=1e-4)
        assert got[lay.writes.index(f"attn_out.{layer}")] == pytest.approx(K_SHARED, rel=1e-4)
    # the same statistics on raw (uncentred) writes: Gamma + N mu mu^T
    raw = res.seq_gram.sum(0) + res.n_tokens * res.mean_gram
    keep = [c for c, w in enumerate(lay.writes) if not w.startswith("attn")]
    raw_rho = deletion_quantities(torch.from_numpy(raw), lay.reader_index)["retention"].numpy()
    assert np.nanmax(raw_rho[:, keep]) > 1.5  # the shared direction makes later writes look like reinforcement
    parts = doc["stream_parts"]
    assert parts["rms_shared"][-1] > parts["rms_shared"][0] * 4  # K u accumulates: 1 + 2 * 4 writes
    np.testing.assert_allclose(np.square(parts["rms_total"]),
                               np.square(parts["rms_shared"]) + np.square(parts["rms_centred"]), rtol=1e-9)
