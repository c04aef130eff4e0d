"""Batch sizing, out-of-memory errors, multi-device loading, and the fast paths of collection.

No timing assertions: every test checks a value against an independent computation or a planted case.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import hf_model
from normgrowth.batching import (
    DEFAULT_CPU_BYTES,
    auto_batch_size,
    bytes_per_sequence,
    cpu_available_bytes,
    is_out_of_memory,
    collector_series,
    resolve_batch_size,
    run_with_oom_guard,
)
from normgrowth.collector import NormCollector, collect, norm_metrics
from normgrowth.data import TokenBatch
from normgrowth.errors import NormgrowthError
from normgrowth.models import load_model


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 100, (4, 14), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[2, 9:] = False
    return TokenBatch(tokens, mask, "test")


# ----- batch sizes ------------------------------------------------------------------------------
def test_auto_batch_size_fills_the_memory_share(loaded):
    """b = auto_batch_size fits: b sequences take at most half the free memory, b + 1 would not."""
    for name in ("gpt2", "neo", "llama"):
        model = loaded(name)
        sizes = [auto_batch_size(model, n, free_bytes=2**30) for n in (16, 64, 256, 1024)]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
        for seq_len, free in ((64, 2**28), (256, 3 * 10**8), (1000, 10**9)):
            per_seq = bytes_per_sequence(model.d_model, model.d_mlp, model.n_heads, seq_len, dtype=model.dtype,
                                         eager_attention=model.eager_attention, n_series=collector_series(model))
            b = auto_batch_size(model, seq_len, free_bytes=free)
            assert b * per_seq <= free / 2 < (b + 1) * per_seq, (name, seq_len)


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama"])
def test_collector_series_bounds_the_rows_the_collector_keeps(name, loaded):
    """The memory estimate's per-token series count covers every row a default collection keeps
    (equal where the architecture has every site: GPT-2 has resid_mid and a position embedding)."""
    from normgrowth.collector import DEFAULT_SITES

    model = loaded(name)
    rows = NormCollector(model, DEFAULT_SITES, True, True, 8).n_rows
    assert collector_series(model) >= rows
    assert (collector_series(model) == rows) == (name == "gpt2")


def test_bytes_per_sequence_scales_as_the_tensors_it_counts():
    """Scaling laws of the estimate, not its constants: activations are linear in seq_len under SDPA,
    eager attention adds a term in heads * seq_len^2, half precision halves the activations, and each
    per-token series or vocabulary entry adds the same bytes per token."""
    def b(seq_len=100, heads=4, **kw):
        return bytes_per_sequence(64, 256, heads, seq_len, **kw)

    assert b(200) == 2 * b(100)
    attn = {(n, h): b(n, h, eager_attention=True) - b(n, h) for n in (50, 100) for h in (4, 8)}
    assert attn[(100, 4)] == 4 * attn[(50, 4)] and attn[(100, 8)] == 2 * attn[(100, 4)] > 0
    assert 2 * b(dtype=torch.bfloat16) == b() == 2 * b(dtype=torch.float16)
    assert b(n_series=20) - b(n_series=10) == b(n_series=10) - b() > 0
    assert b(vocab_size=2000) - b(vocab_size=1000) == b(vocab_size=1000) - b() > 0


def test_auto_batch_size_never_below_one(loaded):
    assert auto_batch_size(loaded("neox"), 64, free_bytes=1) == 1
    with pytest.raises(NormgrowthError, match="at least 1"):
        auto_batch_size(loaded("neox"), 0)


def test_resolve_batch_size(loaded):
    model = loaded("gpt2")
    assert resolve_batch_size(16, model, 64) == 16
    assert resolve_batch_size(" 7 ", model, 64) == 7
    assert resolve_batch_size("AUTO", model, 64) == auto_batch_size(model, 64)
    for bad in ("0", "-3", "many", 0, 2.5, True):
        with pytest.raises(NormgrowthError, match="--batch-size must be a positive integer or 'auto'"):
            resolve_batch_size(bad, model, 64)


def test_cpu_available_bytes_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000 kB\nMemAvailable:    2048 kB\n")
    assert cpu_available_bytes(meminfo) == 2048 * 1024
    assert cpu_available_bytes(tmp_path / "missing") == DEFAULT_CPU_BYTES  # the documented fallback


# ----- out of memory ----------------------------------------------------------------------------
def _raiser(err):
    def fn():
        raise err
    return fn


@pytest.mark.parametrize("err", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
                                 RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't "
                                              "allocate memory: you tried to allocate 96000000000 bytes."),
                                 MemoryError()])
def test_oom_becomes_clear_error_with_smaller_batch(err):
    with pytest.raises(NormgrowthError) as info:
        run_with_oom_guard(_raiser(err), batch_size=8)
    assert str(info.value) == "out of memory at batch size 8: rerun with --batch-size 4"


def test_oom_at_batch_one_and_other_errors():
    with pytest.raises(NormgrowthError, match="out of memory at batch size 1: use a shorter --seq-len"):
        run_with_oom_guard(_raiser(torch.OutOfMemoryError("CUDA out of memory")), batch_size=1)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not an allocation failure: untouched
        run_with_oom_guard(_raiser(RuntimeError("shape mismatch")), batch_size=8)
    assert run_with_oom_guard(lambda: 42, batch_size=8) == 42
    assert not is_out_of_memory(ValueError("out of memory"))


# ----- device_map ---------------------------------------------------------------------------------
def test_device_map_cpu_loads_and_collects(tiny_dirs, batch):
    model = load_model(str(tiny_dirs["gpt2"]), device_map="cpu")
    assert model.input_device.type == "cpu"
    with torch.inference_mode():
        ours = model.forward(batch.tokens, attention_mask=batch.attention_mask)
        ref = hf_model(tiny_dirs["gpt2"])(batch.tokens, attention_mask=batch.attention_mask.long()).logits
    assert (ours - ref)[batch.attention_mask].abs().max().item() <= 1e-4
    res = collect(model, batch, batch_size=2)
    assert res.sites["resid_post"].mean.shape == (model.n_layers,)


# ----- fast paths: native attention, early stop, norm rows ----------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "neox", "llama"])
def test_native_attention_is_used_and_keeps_hook_z(name, loaded, batch):
    """The HF attention kernel runs (no [pos, pos] pattern hook), and a hook_z edit acts as in TL's attention."""
    model = loaded(name)
    assert len(model.native_attention) == model.n_layers

    def zero_head(z):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    tok, mask = batch.tokens, batch.attention_mask
    with torch.inference_mode():
        native = model.forward(tok, attention_mask=mask)
        with model.hooks([("z", 1, zero_head)]):
            native_edit = model.forward(tok, attention_mask=mask)
        _, cache_native = model.run_with_cache(tok, attention_mask=mask)
        with model.reconstructed_attention():
            eager = model.forward(tok, attention_mask=mask)
            with model.hooks([("z", 1, zero_head)]):
                eager_edit = model.forward(tok, attention_mask=mask)
            _, cache_eager = model.run_with_cache(tok, attention_mask=mask)
    assert (native - eager)[mask].abs().max().item() <= 1e-4
    assert (native_edit - eager_edit)[mask].abs().max().item() <= 1e-4
    assert (native_edit - native)[mask].abs().max().item() > 1e-3  # the edit did something
    assert "blocks.0.attn.hook_pattern" in cache_eager and "blocks.0.attn.hook_pattern" not in cache_native
    assert len(model.native_attention) == model.n_layers  # restored after the block


def test_forward_without_logits_stops_after_final_stream(loaded, batch):
    model = loaded("gpt2")
    seen = []
    hooks = [("final_in", None, lambda x: seen.append(("final_in", x.shape))),
             ("resid_post", model.n_layers - 1, lambda x: seen.append(("last", x.shape)))]
    with torch.inference_mode(), model.hooks(hooks):
        assert model.forward(batch.tokens, attention_mask=batch.attention_mask, logits=False) is None
    assert [s for s, _ in seen] == ["last", "final_in"]


def test_run_with_cache_sites(loaded, batch):
    model = loaded("neox")
    sites = [("embed", None), ("resid_post", 2), ("z", 0)]
    with torch.inference_mode():
        logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, sites=sites)
        captured = {}
        with model.hooks([(s, layer, lambda x, k=(s, layer): captured.__setitem__(k, x.clone())) for s, layer in sites]):
            model.forward(batch.tokens, attention_mask=batch.attention_mask)
    assert set(cache) == set(sites) and logits.shape[:2] == batch.tokens.shape
    for key in sites:
        assert torch.equal(cache[key], captured[key])


def test_stacked_weights_subset(loaded):
    model = loaded("llama")
    full = model.stacked_weights()
    part = model.stacked_weights(["W_O", "W_K_stored", "ln2_w"])
    assert set(part) == {"W_O", "W_K_stored", "ln2_w"}
    for key in part:
        assert torch.equal(part[key], full[key])
    with pytest.raises(KeyError, match="unknown weight key"):
        model.stacked_weights(["W_X"])


def _collect_with(model, batch, **kwargs):
    collector = NormCollector(model, ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"], True, True,
                              batch.tokens.shape[1], **kwargs)
    with torch.inference_mode(), model.hooks(collector.hooks()):
        for _, tokens, mask in batch.batches(2):
            model.forward(tokens, attention_mask=mask, logits=False)
            collector.end_batch(mask)
    return collector.results(batch, 2, None)


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_one_pass_norms_equal_two_pass(name, loaded, batch):
    """The GPU default (var_mean) and the CPU default (two exact passes) give the same statistics."""
    model = loaded(name)
    one, two = _collect_with(model, batch, one_pass=True), _collect_with(model, batch, one_pass=False)
    for site in ("resid_pre", "resid_post", "attn_out"):
        for field in ("mean", "centered_mean", "token_std_mean", "bos_mean"):
            np.testing.assert_allclose(getattr(one.sites[site], field), getattr(two.sites[site], field), rtol=2e-5)
    np.testing.assert_allclose(one.heads.mean, two.heads.mean, rtol=1e-6)
    np.testing.assert_array_equal(one.mlp_act_rate, two.mlp_act_rate)


def test_resid_pre_reuse_changes_nothing(loaded, batch, monkeypatch):
    model = loaded("llama")
    reused = []
    original = NormCollector._reuse_post

    def counting(self, *args):
        ok = original(self, *args)
        reused.append(ok)
        return ok

    monkeypatch.setattr(NormCollector, "_reuse_post", counting)
    fast = _collect_with(model, batch)
    assert sum(reused) == (model.n_layers - 1) * 2  # every resid_pre after block 0, in both batches
    monkeypatch.setattr(NormCollector, "_reuse_post", lambda self, *args: False)
    slow = _collect_with(model, batch)
    for field in ("mean", "centered_mean", "std", "median"):
        np.testing.assert_array_equal(getattr(fast.sites["resid_pre"], field), getattr(slow.sites["resid_pre"], field))


def test_half_precision_norms_are_float32(tiny_dirs, batch):
    """bf16 activations are normed in float32: the collected mean matches a float64 recomputation of the
    same bf16 activations far better than bf16 arithmetic could."""
    model = load_model(str(tiny_dirs["gpt2"]), dtype="bfloat16")
    captured = []
    collector = NormCollector(model, ["resid_post"], False, False, batch.tokens.shape[1])
    hooks = collector.hooks() + [("resid_post", 2, lambda x: captured.append(x.clone()))]
    with torch.inference_mode(), model.hooks(hooks):
        for _, tokens, mask in batch.batches(4):
            model.forward(tokens, attention_mask=mask, logits=False)
            collector.end_batch(mask)
    res = collector.results(batch, 4, None)
    x = captured[0]
    assert x.dtype == torch.bfloat16
    valid = batch.attention_mask.clone()
    valid[:, 0] = False
    exact = x.double().norm(dim=-1)[valid].mean().item()
    in_bf16 = x.norm(dim=-1).double()[valid].mean().item()
    assert abs(res.sites["resid_post"].mean[2] - exact) <= 1e-5 * exact
    assert norm_metrics(x).dtype == torch.float32
    assert abs(in_bf16 - exact) > 10 * abs(res.sites["resid_post"].mean[2] - exact)  # the check has teeth


def test_token_stats_chunking_changes_nothing(monkeypatch):
    """TokenStats.update processes series in chunks (bounded float64 temporaries): same statistics."""
    import normgrowth.stats as stats

    gen = torch.Generator().manual_seed(5)
    batches = [(torch.rand(7, 3, 10, generator=gen) * 50 + 0.1, torch.rand(3, 10, generator=gen) > 0.2) for _ in range(3)]

    def run(chunk):
        monkeypatch.setattr(stats, "UPDATE_CHUNK_ELEMENTS", chunk)
        st = stats.TokenStats(7, 10, torch.device("cpu"), hist_series=5, log_series=4)
        for values, valid in batches:
            valid = valid.clone()
            valid[:, 0] = True
            st.update(values, valid)
        return st

    one, many = run(2**20), run(31)  # all 7 series at once / one series per chunk
    for a, b in [(one.main.mean, many.main.mean), (one.main.m2, many.main.m2), (one.bos.mean, many.bos.mean),
                 (one.pos_sum, many.pos_sum), (one.log_sum, many.log_sum)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert one.count == many.count and one.bos_count == many.bos_count
    np.testing.assert_array_equal(one.hist_counts(), many.hist_counts())
    np.testing.assert_allclose(one.seq_means(), many.seq_means(), rtol=1e-6)
    # and against numpy: mean over all valid positions >= 1 of series 3
    vals = np.concatenate([v[3].numpy()[np.r_[[False], [True] * 9][None].repeat(3, 0) & m.numpy()]
                           for v, m in batches])
    np.testing.assert_allclose(one.main.mean[3].item(), vals.astype(np.float64).mean(), rtol=1e-12)


@pytest.mark.parametrize("reserved", [0, 1, 4, 100])
def test_per_sequence_means_any_reserved_capacity_equal_numpy(reserved):
    """Per-sequence means land in one preallocated table grown by doubling: whatever room was reserved,
    they equal numpy's mean over each sequence's valid positions >= 1, in order."""
    import normgrowth.stats as stats

    gen = torch.Generator().manual_seed(11)
    st = stats.TokenStats(3, 6, torch.device("cpu"), expected_sequences=reserved)
    expected, counts = [], []
    for b in (2, 3, 1, 4):  # 10 sequences in batches of unequal size
        values = torch.rand(3, b, 6, generator=gen) * 10 + 1
        valid = torch.rand(b, 6, generator=gen) > 0.3
        valid[:, 0] = True
        st.update(values, valid)
        for i in range(b):
            sel = valid[i].numpy().copy()
            sel[0] = False
            expected.append(values[:, i].numpy()[:, sel].astype(np.float64).mean(1) if sel.any() else np.zeros(3))
            counts.append(int(sel.sum()))
    np.testing.assert_allclose(st.seq_means(), np.array(expected), rtol=1e-6)
    np.testing.assert_array_equal(st.seq_counts(), counts)
    assert st.seq_means().shape == (10, 3)


def test_collector_buffer_reuse_across_unequal_batches(loaded, batch):
    """The per-batch value buffer is reused between batches (and reallocated when the last batch is
    smaller): batch sizes 3 (3 + 3 + rest) and 1 give the same statistics."""
    model = loaded("gpt2")
    a = collect(model, batch, batch_size=3)
    b = collect(model, batch, batch_size=1)
    np.testing.assert_allclose(a.sites["resid_post"].mean, b.sites["resid_post"].mean, rtol=1e-5)
    np.testing.assert_allclose(a.sites["resid_post"].seq_mean, b.sites["resid_post"].seq_mean, rtol=1e-5)
