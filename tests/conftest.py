"""Shared fixtures: tiny random-init checkpoints of every supported family, built once per session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 100
STORIES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stories260K"
FAMILIES = ("gpt2", "neox", "llama", "opt", "neo")
LN_FREE_SIGMA = 3.0


def tiny_config(family: str, n_layers: int = 3):
    from transformers import GPT2Config, GPTNeoConfig, GPTNeoXConfig, LlamaConfig, OPTConfig

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_layer=n_layers, n_embd=32, n_head=4, n_positions=64, **common)
    if family == "neox":
        return GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=64, **common)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, max_position_embeddings=64, **common)
    if family == "opt":
        return OPTConfig(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                         max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, **common)
    if family == "neo":
        return GPTNeoConfig(num_layers=n_layers, hidden_size=32, num_heads=4, max_position_embeddings=64,
                            attention_types=[[["global", "local"], n_layers // 2]] + [[["global"], n_layers % 2]],
                            window_size=8, **common)
    raise KeyError(family)


def build_tiny(family: str, path: Path, seed: int = 0, n_layers: int = 3, ln_free: bool = False) -> Path:
    """Save a random-init checkpoint with non-trivial norm gains/biases (so folding and P are exercised)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, n_layers)
    if ln_free:
        cfg.layer_norm_epsilon = 1e12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower() and hasattr(module, "weight"):
                module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn_like(module.bias))
                if ln_free:  # published LN-free storage: weights x 1e6 / sigma_avg
                    module.weight.mul_(1e6 / LN_FREE_SIGMA)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    dirs = {f: build_tiny(f, root / f, seed=i) for i, f in enumerate(FAMILIES)}
    dirs["gpt2_lnfree"] = build_tiny("gpt2", root / "gpt2_lnfree", seed=7, ln_free=True)
    return dirs


@pytest.fixture(scope="session")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(path, np.random.RandomState(0).randint(0, VOCAB, size=(7, 13)))
    return path


@pytest.fixture(scope="session")
def loaded(tiny_dirs):
    """Cache of loaded models: ``loaded(name)``."""
    from normgrowth.models import load_model

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(str(tiny_dirs[name]))
        return cache[name]

    return get


def hf_model(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
