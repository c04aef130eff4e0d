"""Planted truth for the reader-side reads, the innovation retention and the verdict (issue: deletion measured where
it acts). Every checkpoint is a real GPT-2 built here with hand-set weights whose answer is known.

Layout: content lives in orthonormal, mean-free blocks ``Q_b`` (4 dimensions each) of ``R^32``; the token embedding
puts a random ``z_t`` in block 0 (scaled by ``embed``); attention writes nothing (``c_proj = 0``: zero writes,
skipped) but reads through its Q, K and V weights ``A_l`` (one ``d x d`` matrix each); every MLP is exactly linear in
its normalised input ``x``: ``relu(x R) O - relu(-x R) O = x R O`` (``c_fc = [R, -R]``, ``c_proj = [O; -O]``), so it
reads through ``R`` and writes ``x R O``. LayerNorm is real (gain 1, bias 0, eps 1e-5) where magnitude is the point,
else the LN-free storage (eps 1e12, stored gain 1e6: ``LN(x) = x - mean(x)``), which is exactly linear.

The reference quantities are computed from plain Hugging Face forward hooks in float64 numpy: the reads
``I(c, L) = sum_t ||(gamma * P(w_c) / s_L) W_in||^2`` with the HF modules' full input matrices, and the innovation
by least squares over the explicit token vectors (``numpy.linalg.lstsq``), not from Gram matrices.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

from normgrowth.deletion import collect_deletion, stream_layout
from normgrowth.models import load_model

D, BLOCK, VOCAB, N_LAYERS = 32, 4, 100, 5
N_BLOCKS = N_LAYERS + 2
Q_READ = np.sqrt(1.5)  # the MLP reads 2 ||x R||^2 (paired columns): R = sqrt(3/2) reads like Q, K, V = identity


def _blocks(seed: int = 0) -> list[np.ndarray]:
    a = np.random.default_rng(seed).standard_normal((D, N_BLOCKS * BLOCK))
    a -= a.mean(0, keepdims=True)
    q, _ = np.linalg.qr(a)
    return [q[:, BLOCK * b:BLOCK * (b + 1)] for b in range(N_BLOCKS)]


Q = _blocks()
PROJ = [q @ q.T for q in Q]  # projector on block b
Z = np.random.default_rng(1).standard_normal((VOCAB, BLOCK))


def build(path, *, ln_free: bool, embed: float, attn_read, mlp_read, mlp_write, last_scale: float = 1.0):
    """A GPT-2 with ``N_LAYERS`` blocks: ``attn_read(l)`` the Q = K = V input matrix of block l, ``mlp_read(l)`` its
    MLP's ``R``, ``mlp_write(l)`` its ``O``; the last MLP's output is multiplied by ``last_scale``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=N_LAYERS, n_embd=D, n_head=4, n_inner=4 * D, n_positions=64, vocab_size=VOCAB,
                     activation_function="relu", layer_norm_epsilon=1e12 if ln_free else 1e-5, bos_token_id=0,
                     eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(cfg)
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        model.transformer.wte.weight.copy_(t(embed * Z @ Q[0].T))
        model.transformer.wpe.weight.zero_()
        for ln in [model.transformer.ln_f] + [m for blk in model.transformer.h for m in (blk.ln_1, blk.ln_2)]:
            ln.weight.fill_(1e6 if ln_free else 1.0)
            ln.bias.zero_()
        for layer, blk in enumerate(model.transformer.h):
            a = attn_read(layer)
            blk.attn.c_attn.weight.copy_(t(np.concatenate([a, a, a], 1)))
            blk.attn.c_attn.bias.zero_()
            blk.attn.c_proj.weight.zero_()
            blk.attn.c_proj.bias.zero_()
            r, o = mlp_read(layer), mlp_write(layer) * (last_scale if layer == N_LAYERS - 1 else 1.0)
            fc, proj = np.zeros((D, 4 * D)), np.zeros((4 * D, D))
            fc[:, :D], fc[:, D:2 * D] = r, -r
            proj[:D], proj[D:2 * D] = o, -o
            blk.mlp.c_fc.weight.copy_(t(fc))
            blk.mlp.c_fc.bias.zero_()
            blk.mlp.c_proj.weight.copy_(t(proj))
            blk.mlp.c_proj.bias.zero_()
    model.save_pretrained(path)
    return path


def _sigma(embed: float, write_norms) -> list[float]:
    """``s_l / ||z_t||``-free scale of the stream each MLP reads, as a function of the unit-direction writes:
    the stream holds ``embed z`` and writes of norm ``write_norms[j] ||z||`` in orthogonal blocks (eps aside)."""
    out, energy = [], embed**2
    for norm in write_norms:
        out.append(np.sqrt(energy / D))
        energy += norm**2
    return out


def magnitude_model(path, ln_free: bool = False, last_scale: float = 1.0):
    """Writes grow 1.5x per layer (MLP l copies z into block l + 1); every reader reads every subspace alike."""
    norms = [1.5 ** (l + 1) for l in range(N_LAYERS)]
    sig = _sigma(1.0, norms) if not ln_free else [1.0] * N_LAYERS
    return build(path, ln_free=ln_free, embed=1.0, attn_read=lambda l: np.eye(D),
                 mlp_read=lambda l: Q_READ * PROJ[0],
                 mlp_write=lambda l: norms[l] * sig[l] / Q_READ * Q[0] @ Q[l + 1].T, last_scale=last_scale)


def direction_model(path, embed: float = 10.0, last_scale: float = 1.0):
    """A nearly flat stream (one large embedding, unit writes); readers down-weight older blocks by 1/2 per layer."""
    sig = _sigma(embed, [1.0] * N_LAYERS)
    f = 0.5

    def attn(l):
        return sum(f ** (l - b) * PROJ[b] for b in range(l + 1))

    def mlp_read(l):
        return Q_READ * f ** (l + 0.5) * PROJ[0]

    return build(path, ln_free=False, embed=embed, attn_read=attn, mlp_read=mlp_read,
                 mlp_write=lambda l: sig[l] / (embed * Q_READ * f ** (l + 0.5)) * Q[0] @ Q[l + 1].T,
                 last_scale=last_scale)


def erasure_model(path, tiny: float = 0.0, echo: float = 0.0):
    """LN-free chain: MLP 1 moves z from block 0 to block 2, MLP l >= 2 from block l to block l + 1 (each write is
    erased by the next). ``tiny``: MLP 0 writes ``tiny z`` into block 1 and MLP 1 echoes it ``echo`` times."""
    def read(l):
        if l == 0:
            return PROJ[0]
        return PROJ[0] + (PROJ[1] if echo else 0) if l == 1 else PROJ[l]

    def write(l):
        if l == 0:
            return tiny * Q[0] @ Q[1].T
        if l == 1:
            return Q[0] @ (Q[2] - Q[0]).T + echo * PROJ[1]
        return Q[l] @ (Q[l + 1] - Q[l]).T

    return build(path, ln_free=True, embed=1.0, attn_read=lambda l: np.eye(D), mlp_read=read, mlp_write=write)


def reinforced_model(path):
    """LN-free: every MLP re-writes the embedding's feature, x 1.5 per layer (the stream's z grows 1.5x)."""
    return build(path, ln_free=True, embed=1.0, attn_read=lambda l: np.eye(D), mlp_read=lambda l: PROJ[0],
                 mlp_write=lambda l: 0.5 * PROJ[0])


G = np.random.default_rng(2).standard_normal((BLOCK, BLOCK))


def common_cause_model(path):
    """LN-free: MLP 0 writes 2 z (an echo of the embedding) plus new content z G in block 1; MLP 1 writes 5 z (the
    common cause again); MLP l >= 2 copies z into block l + 1."""
    def write(l):
        if l == 0:
            return 2.0 * PROJ[0] + Q[0] @ G @ Q[1].T
        if l == 1:
            return 5.0 * PROJ[0]
        return Q[0] @ Q[l + 1].T

    return build(path, ln_free=True, embed=1.0, attn_read=lambda l: np.eye(D), mlp_read=lambda l: PROJ[0],
                 mlp_write=write)


def _batch(n_seqs: int = 40, seq_len: int = 12, seed: int = 3):
    tokens = torch.from_numpy(np.random.default_rng(seed).integers(1, VOCAB, (n_seqs, seq_len)))
    tokens[:, 0] = 0
    return types.SimpleNamespace(tokens=tokens, attention_mask=torch.ones_like(tokens, dtype=torch.bool),
                                 source="random ids")


BATCH = _batch()


def _run(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(str(path), device="cpu")
        res = collect_deletion(model, BATCH, batch_size=20, n_boot=200)
    return res.to_json()


# ----------------------------------------------------------------------------------------------
# plain-HF reference
# ----------------------------------------------------------------------------------------------
def hf_reference(path, stride: int = 1):
    """Writes, reader inputs and reader matrices from plain HF forward hooks (float64), and the reads (over the
    positions p >= 1 with (p - 1) % stride == 0)."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(path).eval().double()
    cap: dict = {}

    def keep(name):
        def hook(mod, args, out):
            cap[name] = (args[0] if name.startswith("in.") else (out[0] if isinstance(out, tuple) else out)).detach()
        return hook

    hooks = [hf.transformer.wte.register_forward_hook(keep("wte")),
             hf.transformer.wpe.register_forward_hook(keep("wpe"))]
    for l, blk in enumerate(hf.transformer.h):
        hooks += [blk.attn.register_forward_hook(keep(f"attn_out.{l}")),
                  blk.mlp.register_forward_hook(keep(f"mlp_out.{l}")),
                  blk.ln_1.register_forward_hook(keep(f"in.ln1.{l}")),
                  blk.ln_2.register_forward_hook(keep(f"in.ln2.{l}"))]
    hooks.append(hf.transformer.ln_f.register_forward_hook(keep("in.lnf")))
    with torch.no_grad():
        hf(BATCH.tokens)
    for h in hooks:
        h.remove()
    valid = np.ones(BATCH.tokens.shape, dtype=bool)
    valid[:, 0] = False
    lay = stream_layout(N_LAYERS)
    writes = [cap["wte"] + cap["wpe"]] + [cap[w] for w in lay.writes[1:]]
    W = np.stack([w.numpy()[valid] for w in writes], 1)  # [T, C, d]
    P = W - W.mean(-1, keepdims=True)
    eps = hf.config.layer_norm_epsilon
    ln_free = eps > 1e6
    readers = []  # (name, k, stream input, gain, W_in)
    for l, blk in enumerate(hf.transformer.h):
        readers.append((f"attn.{l}", 1 + 2 * l, cap[f"in.ln1.{l}"], blk.ln_1.weight, blk.attn.c_attn.weight))
        readers.append((f"mlp.{l}", 2 + 2 * l, cap[f"in.ln2.{l}"], blk.ln_2.weight, blk.mlp.c_fc.weight))
    readers.append(("unembed", 2 * N_LAYERS + 1, cap["in.lnf"], hf.transformer.ln_f.weight, hf.lm_head.weight.T))
    C = len(writes)
    read, read0 = np.full((len(readers), C), np.nan), np.full((len(readers), C), np.nan)
    sub = ((np.arange(valid.shape[1]) - 1) % stride == 0)[None, :] & valid
    Pr = (lambda a: a - a.mean(-1, keepdims=True))(np.stack([w.numpy()[sub] for w in writes], 1))
    for r, (name, k, x, gain, w_in) in enumerate(readers):
        x = x.numpy()[sub]
        g, w_in = gain.detach().numpy(), w_in.detach().numpy()
        s_L = np.ones(len(x)) if ln_free else np.sqrt(x.var(-1) + eps)
        if ln_free:
            g = g / np.sqrt(eps)
        for c in range(k):
            q = ((g * Pr[:, c]) @ w_in) ** 2
            prev = Pr[:, :c].sum(1) if c > 0 else Pr[:, 0]  # the stream write c was added to (the embedding: itself)
            s_c = np.ones(len(x)) if ln_free else np.sqrt((prev**2).mean(-1) + eps)
            read[r, c] = (q.sum(-1) / s_L**2).sum()
            read0[r, c] = (q.sum(-1) / s_c**2).sum()
    return {"P": P, "read": read, "read0": read0, "names": [r[0] for r in readers]}


def innovation_reference(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per write: ``||u_c||^2`` and the innovation retention at every stream reader, by least squares on the
    token-centred writes flattened over tokens (``numpy.linalg.lstsq``). Writes without innovation (and zero writes)
    are left out of the later regressions: they lie in the span before them."""
    wt = P - P.mean(0, keepdims=True)
    T, C, d = wt.shape
    flat = wt.transpose(1, 0, 2).reshape(C, -1)  # [C, T*d]
    lay = stream_layout(N_LAYERS)
    innov = np.zeros(C)
    rho = np.full((len(lay.readers), C), np.nan)
    kept: list[int] = []
    for c in range(C):
        if kept:
            beta, *_ = np.linalg.lstsq(flat[kept].T, flat[c], rcond=None)
            u = flat[c] - flat[kept].T @ beta
        else:
            u = flat[c]
        innov[c] = u @ u
        if innov[c] <= 1e-6 * (flat[c] @ flat[c]) or innov[c] == 0:
            continue
        kept.append(c)
        for r, k in enumerate(lay.reader_index):
            if c < k:
                rho[r, c] = flat[:k].sum(0) @ u / (flat[c] @ u)
    return innov, rho


def _close(got, want, rtol=1e-6):
    got, want = np.array(got, dtype=float), np.asarray(want, dtype=float)
    scale = np.nanmax(np.abs(want))  # entries that are 0 by construction: relative to the largest read
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, make in (("magnitude", magnitude_model), ("magnitude_last4", lambda p: magnitude_model(p, last_scale=4)),
                       ("ln_free", lambda p: magnitude_model(p, ln_free=True)), ("direction", direction_model),
                       ("direction_last4", lambda p: direction_model(p, last_scale=4)),
                       ("front", lambda p: direction_model(p, embed=5.0)), ("erasure", erasure_model),
                       ("erasure_echo", lambda p: erasure_model(p, tiny=0.01, echo=100.0)),
                       ("reinforced", reinforced_model), ("common_cause", common_cause_model)):
        path = make(tmp_path_factory.mktemp(name))
        out[name] = {"path": path, "doc": _run(path)}
    return out


@pytest.mark.parametrize("name, label", [("magnitude", "magnitude"), ("magnitude_last4", "magnitude"),
                                         ("ln_free", "no locality"), ("direction", "direction"),
                                         ("direction_last4", "direction"), ("front", "direction"),
                                         ("erasure", "erasure"), ("erasure_echo", "erasure"),
                                         ("reinforced", "reinforced")])
def test_planted_labels(runs, name, label):
    assert runs[name]["doc"]["verdict"]["label"] == label, runs[name]["doc"]["verdict"]


@pytest.mark.parametrize("name", ["magnitude", "ln_free", "direction", "common_cause"])
def test_reads_equal_plain_hf_hooks(runs, name):
    ref = hf_reference(runs[name]["path"])
    doc = runs[name]["doc"]
    assert doc["read_readers"] == ref["names"]
    _close(doc["read"], ref["read"])
    _close(doc["read_no_growth"], ref["read0"])


def test_magnitude_share_is_one_when_only_the_scale_changes(runs):
    """Every reader reads every subspace alike, so ``I0`` is the same at every reader: all of the fall is growth."""
    doc = runs["magnitude"]["doc"]
    share = doc["magnitude_share"]
    assert share["value"] == pytest.approx(1.0, abs=1e-6)
    assert share["equal_weights"] == pytest.approx(1.0, abs=1e-6)  # every write's own share is 1
    assert share["value_ci95"][0] > 0.5
    assert doc["locality"]["slope_ci95"][1] < 0
    # the stream's RMS grows by a known factor per layer: the magnitude slope of a write is -2 log of that growth
    ref = hf_reference(runs["magnitude"]["path"])
    c = stream_layout(N_LAYERS).writes.index("mlp_out.0")
    rows = [ref["names"].index(f"attn.{l}") for l in range(1, N_LAYERS)]
    log_ratio = np.log(ref["read"][rows, c] / ref["read0"][rows, c])
    want = np.polyfit(np.arange(1, N_LAYERS) + 0.5 - 1.0, log_ratio, 1)[0]
    got = [r for r in doc["locality"]["per_write"] if r["write"] == "mlp_out.0"][0]
    assert got["magnitude_slope"] == pytest.approx(want, rel=0.2)  # attention readers only in this reference fit


def test_direction_share_is_near_zero(runs):
    doc = runs["direction"]["doc"]
    lo, hi = doc["magnitude_share"]["value_ci95"]
    assert hi < 0.1 and doc["locality"]["slope"] < -1.0  # reads fall by about 4x per layer (weights 1/2)
    assert doc["verdict"]["flags"] == ["front-loaded"]  # embedding 10x every write: front-loaded, never the label


def test_ln_free_counterpart_has_no_magnitude(runs):
    doc = runs["ln_free"]["doc"]
    assert doc["magnitude_share"]["value"] == 0.0 and doc["locality"]["magnitude_slope"] == 0.0
    np.testing.assert_array_equal(np.array(doc["read"], dtype=float), np.array(doc["read_no_growth"], dtype=float))


def test_last_write_alone_four_times_larger_changes_no_verdict_input(runs):
    """A write read by the unembedding alone: the fits (block readers) and the far retention do not see it."""
    for base in ("magnitude", "direction"):
        a, b = runs[base]["doc"], runs[base + "_last4"]["doc"]
        assert a["verdict"]["label"] == b["verdict"]["label"]
        for key in ("slope", "magnitude_slope"):
            assert a["locality"][key] == pytest.approx(b["locality"][key], rel=1e-6)
        assert a["innovation_retention"]["pooled"] == pytest.approx(b["innovation_retention"]["pooled"], rel=1e-6)


def test_front_loaded_is_a_flag(runs):
    """Embedding 5 ||z||, every later write of norm 1: the embedding and block 0 carry most of the final stream."""
    doc = runs["front"]["doc"]
    P = hf_reference(runs["front"]["path"])["P"]  # [T, C, d]
    front = P[:, :3].sum(1)  # embed, attn_out.0, mlp_out.0
    final = P.sum(1)
    want = np.sum(front * final) / np.sum(final * final)
    assert want > 0.9
    assert doc["front_loaded"]["share"] == pytest.approx(want, rel=1e-6)
    assert "front-loaded" in doc["verdict"]["flags"] and doc["verdict"]["label"] != "front-loaded"


@pytest.mark.parametrize("name", ["erasure", "erasure_echo", "reinforced", "common_cause"])
def test_innovation_retention_equals_least_squares_on_token_vectors(runs, name):
    ref = hf_reference(runs[name]["path"])
    innov, rho = innovation_reference(ref["P"])
    ir = runs[name]["doc"]["innovation_retention"]
    got = np.array(ir["matrix"], dtype=float)
    finite = np.isfinite(got)
    assert finite.any() and np.array_equal(finite, np.isfinite(rho) & finite)
    _close(got[finite], rho[finite])
    lay = stream_layout(N_LAYERS)
    wt = ref["P"] - ref["P"].mean(0, keepdims=True)
    energy = (wt**2).sum((0, 2))
    expect_none = [w for c, w in enumerate(lay.writes)
                   if energy[c] > 1e-10 * energy.max() and innov[c] <= 1e-6 * energy[c]]
    assert ir["no_innovation_writes"] == expect_none


def test_erasure_chain_keeps_nothing(runs):
    """Every write is moved on by the next MLP: retention 0 after it. The embedding is moved by MLP 1 only, so it is
    kept at the first of its 5 far readers: 1/5; pooled over 4 writes of equal innovation: 1/20."""
    ir = runs["erasure"]["doc"]["innovation_retention"]
    rows = {r["write"]: r["retention"] for r in ir["per_write"] if r["in_pool"]}
    assert rows == pytest.approx({"embed": 0.2, "mlp_out.1": 0.0, "mlp_out.2": 0.0, "mlp_out.3": 0.0}, abs=1e-6)
    assert ir["pooled"] == pytest.approx(0.05, abs=1e-6) and ir["share_below"] == 1.0


def test_tiny_echoed_write_moves_the_pooled_retention_by_less_than_005(runs):
    a, b = runs["erasure"]["doc"]["innovation_retention"], runs["erasure_echo"]["doc"]["innovation_retention"]
    assert abs(a["pooled"] - b["pooled"]) < 0.05
    tiny = [r for r in b["per_write"] if r["write"] == "mlp_out.0"][0]
    assert tiny["retention"] == pytest.approx(101.0, rel=1e-4)  # echoed 100x: its own ratio is huge
    per = [r["retention"] for r in b["per_write"] if r["in_pool"]]
    assert np.mean(per) > 10  # an equal-weight mean of ratios would be dominated by it


def test_reinforced_feature_and_no_innovation_writes(runs):
    ir = runs["reinforced"]["doc"]["innovation_retention"]
    assert ir["no_innovation_writes"] == [f"mlp_out.{l}" for l in range(N_LAYERS)]  # all collinear with z
    assert ir["n_writes"] == 1 and ir["pooled_ci95"][0] > 1.25


def test_common_cause_is_not_reinforcement(runs):
    doc = runs["common_cause"]["doc"]
    lay = stream_layout(N_LAYERS)
    c = lay.writes.index("mlp_out.0")
    old = np.array(doc["retention"], dtype=float)[-1, c]
    assert old > 1.5  # regression on the whole write: the common cause z looks like reinforcement
    per = [r for r in doc["innovation_retention"]["per_write"] if r["write"] == "mlp_out.0"][0]
    assert per["retention"] == pytest.approx(1.0, abs=1e-6)  # its innovation z G is kept, exactly once
    assert "mlp_out.1" in doc["innovation_retention"]["no_innovation_writes"]
    assert doc["verdict"]["label"] != "reinforced"


def test_reads_on_a_fixed_token_subsample(runs, monkeypatch):
    """Models whose reads cost more than 1e8 multiply-adds per token read every 4th position; forced here."""
    from normgrowth.deletion import collection

    assert collection.read_token_stride([1, 2, 3], 32) == 1
    assert collection.read_token_stride([1 + l for l in range(61)], 576) == 4  # SmolLM2-135M's size
    monkeypatch.setattr(collection, "read_token_stride", lambda k, d: 3)
    path = runs["magnitude"]["path"]
    doc = _run(path)
    assert doc["read_token_stride"] == 3
    ref = hf_reference(path, stride=3)
    _close(doc["read"], ref["read"])
    _close(doc["read_no_growth"], ref["read0"])
