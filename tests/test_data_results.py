"""Data sources, results round trip, and the report CLI (schema, errors, exit codes)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import run_main
from normgrowth.collector import collect
from normgrowth.data import TokenBatch, builtin_prompts, iter_batches, load_tokens
from normgrowth.errors import NormgrowthError
from normgrowth.results import Results


class CharTokenizer:
    """A stand-in tokenizer: one id per character (mod 90) + 10, so ids never collide with BOS = 0."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + (ord(c) % 90) for c in text]}


def test_builtin_prompts_are_many_and_varied():
    prompts = builtin_prompts()
    assert len(prompts) >= 50
    assert len(set(prompts)) == len(prompts)
    assert any("def " in p for p in prompts) and any("?" in p for p in prompts)


def test_text_gets_bos_and_mask_not_pad_id(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nstill first\n\nsecond\n\n\nthird one here")
    batch = load_tokens(str(path), tokenizer=CharTokenizer(), bos_token_id=0, n_ctx=64)
    assert len(batch) == 3
    assert (batch.tokens[:, 0] == 0).all()
    lengths = batch.attention_mask.sum(1).tolist()
    assert lengths == [1 + len("first doc\nstill first"), 1 + len("second"), 1 + len("third one here")]
    assert batch.n_tokens == sum(lengths) - 3


def test_list_of_strings_is_documents_not_a_dataset_name():
    texts = ["first doc", "second", "a third document here"]
    batch = load_tokens(texts, tokenizer=CharTokenizer(), bos_token_id=0, n_ctx=64)
    assert len(batch) == 3 and (batch.tokens[:, 0] == 0).all()
    assert batch.attention_mask.sum(1).tolist() == [1 + len(t) for t in texts]
    assert batch.tokens[1, 1:7].tolist() == [10 + ord(c) % 90 for c in "second"]
    assert len(load_tokens(texts, tokenizer=CharTokenizer(), bos_token_id=0, n_seqs=2)) == 2
    for bad in ([], ["ok", 3]):
        with pytest.raises(NormgrowthError, match="list of documents"):
            load_tokens(bad, tokenizer=CharTokenizer(), bos_token_id=0)


def _left_and_right(lengths, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 100, (n,), generator=gen) for n in lengths]
    left = torch.full((len(seqs), width), -5, dtype=torch.long)
    right = torch.full((len(seqs), width), -5, dtype=torch.long)
    lmask = torch.zeros(len(seqs), width, dtype=torch.bool)
    rmask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        left[i, width - len(s):], lmask[i, width - len(s):] = s, True
        right[i, : len(s)], rmask[i, : len(s)] = s, True
    return seqs, (left, lmask), (right, rmask)


def test_iter_batches_right_aligns_left_padding_and_trims():
    seqs, (left, lmask), (right, rmask) = _left_and_right([3, 7, 1, 5, 2], width=9)
    for size in (1, 2, 5):
        got = list(iter_batches(left, lmask, size))
        ref = list(iter_batches(right, rmask, size))
        assert [g[0] for g in got] == list(range(0, 5, size))
        for (start, tok, m), (_, rtok, rm) in zip(got, ref):
            assert torch.equal(m, rm) and torch.equal(tok[m], rtok[rm])
            assert m.shape[1] == max(len(s) for s in seqs[start:start + size])  # no all-padding column
            for i, s in enumerate(seqs[start:start + size]):
                assert tok[i, : len(s)].tolist() == s.tolist()  # position 0 = the first real token
    batch = TokenBatch(left, lmask, "left")
    assert batch.n_tokens == sum(len(s) - 1 for s in seqs)
    assert torch.equal(batch.attention_mask, rmask)


def test_mask_with_padding_inside_is_refused():
    tokens = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    with pytest.raises(NormgrowthError, match="row 1 of the attention mask has padding between real tokens"):
        TokenBatch(tokens, mask, "holes")
    with pytest.raises(NormgrowthError, match="mask shape"):
        TokenBatch(tokens, mask[:, :4], "short")


def test_jsonl_and_bad_jsonl(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"text": "hello"}) + "\n")
    batch = load_tokens(str(good), tokenizer=CharTokenizer(), bos_token_id=0)
    assert batch.attention_mask.sum(1).tolist() == [4, 6]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(NormgrowthError, match='line 1 .*"text" field'):
        load_tokens(str(bad), tokenizer=CharTokenizer(), bos_token_id=0)


def test_token_array_used_exactly(tmp_path):
    ids = np.random.RandomState(0).randint(1, 100, size=(6, 9))
    np.save(tmp_path / "t.npy", ids)
    torch.save(torch.from_numpy(ids), tmp_path / "t.pt")
    for name in ("t.npy", "t.pt"):
        batch = load_tokens(str(tmp_path / name), vocab_size=100, n_ctx=64)
        np.testing.assert_array_equal(batch.tokens.numpy(), ids)  # no BOS added, every row
        assert batch.attention_mask.all()
    assert len(load_tokens(str(tmp_path / "t.npy"), n_seqs=2, vocab_size=100)) == 2


def test_truncation_beyond_context_warns_once(tmp_path):
    np.save(tmp_path / "long.npy", np.ones((3, 40), dtype=np.int64))
    with pytest.warns(UserWarning, match="longer than the model's context") as record:
        batch = load_tokens(str(tmp_path / "long.npy"), n_ctx=16, vocab_size=100)
    assert batch.tokens.shape == (3, 16) and len(record) == 1


@pytest.mark.parametrize("content, message", [
    (np.ones((2, 3), dtype=np.float32), "integer array"),
    (np.ones(5, dtype=np.int64), "integer array"),
    (np.full((2, 3), 500, dtype=np.int64), "vocabulary"),
])
def test_bad_token_files(tmp_path, content, message):
    np.save(tmp_path / "bad.npy", content)
    with pytest.raises(NormgrowthError, match=message):
        load_tokens(str(tmp_path / "bad.npy"), vocab_size=100)


def test_text_without_tokenizer_says_token_ids_needed(loaded):
    model = loaded("gpt2")  # the tiny test checkpoints ship no tokenizer
    assert model.tokenizer is None
    with pytest.raises(NormgrowthError, match="no tokenizer.*token ids"):
        load_tokens("builtin", model)


def test_missing_data_file():
    with pytest.raises(NormgrowthError, match="does not exist"):
        load_tokens("./nope.txt", tokenizer=CharTokenizer(), bos_token_id=0)


def test_results_round_trip_exact(loaded, token_file, tmp_path):
    res = collect(loaded("neox"), load_tokens(str(token_file), loaded("neox")), batch_size=4)
    res.extra["fit"] = {"resid_post": {"growth_factor": 1.5}}
    path = res.save(tmp_path / "r")
    back = Results.load(path)
    assert back.meta == res.meta
    assert back.sites["resid_mid"] is None
    for key, arr in res.arrays().items():
        np.testing.assert_array_equal(back.arrays()[key], arr, err_msg=key)
    assert back.extra["fit"] == res.extra["fit"]
    doc = json.loads(path.read_text())
    for key in ("model", "ln_free", "normalization", "n_layers", "d_model", "n_seqs", "n_tokens", "sites", "heads"):
        assert key in doc
    assert set(doc["sites"]) == {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"}
    for key in ("mean", "std", "centered_mean", "bos_mean", "median"):
        assert len(doc["sites"]["resid_post"][key]) == 3
    assert np.array(doc["heads"]["mean"]).shape == (3, 4)
    # a torn write (npz replaced after the JSON) is detected, never read
    np.savez(tmp_path / "r.npz", junk=np.zeros(1))
    with pytest.raises(NormgrowthError, match="does not match"):
        Results.load(path)


def run_cli(*args, env_extra=None):
    """``python -m normgrowth.cli ARGS`` in a fresh process (the one smoke test of the entry point)."""
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "normgrowth.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_report_writes_schema(tiny_dirs, token_file, tmp_path):
    from typer.testing import CliRunner

    from normgrowth.cli import app

    def report(*extra):
        args = ["report", str(tiny_dirs["gpt2_lnfree"]), "--data", str(token_file), "--out", str(tmp_path / "cache"),
                *extra]
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    out = tmp_path / "report.json"
    text = report("--json", str(out), "--batch-size", "3")
    assert "resid_post" in text and "layer" in text
    doc = json.loads(out.read_text())
    assert doc["ln_free"] is True and doc["normalization"] == "none" and doc["n_layers"] == 3
    assert doc["n_tokens"] == 7 * 12 and doc["n_seqs"] == 7
    assert set(doc["fit"]) >= {"resid_pre", "resid_post"}
    # a second identical run reuses the cached result; a changed setting computes a new one
    assert "reusing cached result" in report("--batch-size", "3")
    assert "reusing" not in report("--n-seqs", "3")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_cli_entry_point_error_is_one_line_exit_2(tmp_path):
    out = tmp_path / "x.json"
    proc = run_cli("report", "/no/such/dir", "--json", str(out))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("args, message", [
    (("report", "/no/such/dir"), "does not exist"),
    (("report", "someone/unknown-model"), "hub cannot be reached"),
])
def test_cli_errors_are_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.json"
    code, _, err = run_main(monkeypatch, capsys, *args, "--json", out)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_bad_data_exit_2(tiny_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.json"
    code, _, err = run_main(monkeypatch, capsys, "report", tiny_dirs["gpt2"], "--data", "builtin", "--json", out)
    assert code == 2 and "token ids" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_help_imports_no_heavy_library():
    code = ("import sys; from normgrowth import cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_cli_batch_size_auto_and_device_map(tiny_dirs, token_file, tmp_path):
    """--batch-size auto is sized from free memory (and said so); --device-map places the model
    through accelerate; both give the same numbers as an explicit batch size on one device."""
    from typer.testing import CliRunner

    from normgrowth.cli import app

    docs = []
    for extra in (("--batch-size", "2"), ("--batch-size", "auto"), ("--batch-size", "auto", "--device-map", "cpu")):
        out = tmp_path / f"r{len(docs)}.json"
        result = CliRunner().invoke(app, ["report", str(tiny_dirs["neox"]), "--data", str(token_file),
                                          "--json", str(out), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert ("(auto: from free memory)" in result.output) == ("auto" in extra)
        docs.append(json.loads(out.read_text()))
    curves = [np.array(d["sites"]["resid_post"]["mean"], dtype=float) for d in docs]
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-5)
    np.testing.assert_allclose(curves[2], curves[0], rtol=1e-5)


@pytest.mark.parametrize("value", ["0", "-3", "eight"])
def test_cli_bad_batch_size_exit_2_before_loading(value, tmp_path, monkeypatch, capsys):
    """A malformed --batch-size is refused in one line before any model is loaded (the model does
    not even exist here)."""
    out = tmp_path / "x.json"
    code, _, err = run_main(monkeypatch, capsys, "report", tmp_path / "no-model", "--batch-size", value, "--json", out)
    assert code == 2 and "--batch-size must be a positive integer or 'auto'" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_out_of_memory_names_smaller_batch(tiny_dirs, token_file, tmp_path, monkeypatch):
    """An allocation failure during collection becomes one sentence naming a batch size to use."""
    import normgrowth.collector as collect_module
    from normgrowth.pipeline import run_report

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(collect_module, "collect", oom)
    with pytest.raises(NormgrowthError, match=r"out of memory at batch size 6: rerun with --batch-size 3"):
        run_report(str(tiny_dirs["neox"]), str(token_file), batch_size="6", device="cpu")
