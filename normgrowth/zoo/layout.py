"""Where the supported pre-norm architectures keep their norms and blocks (the one table, :data:`LAYOUTS`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import NormgrowthError


@dataclass(frozen=True)
class NormLayout:
    """Where a pre-norm architecture keeps its norms: ``model.<base>.<blocks>.<i>.<mlp_norm | attn_norm>`` and
    ``model.<base>.<final_norm>``; ``eps_field`` is the config field of their eps."""

    base: str
    blocks: str
    attn_norm: str
    mlp_norm: str
    final_norm: str
    eps_field: str


GPT2_LAYOUT = NormLayout("transformer", "h", "ln_1", "ln_2", "ln_f", "layer_norm_epsilon")
LLAMA_LAYOUT = NormLayout("model", "layers", "input_layernorm", "post_attention_layernorm", "norm", "rms_norm_eps")
# config.model_type -> layout; every norm listed is a plain LayerNorm or an RMSNorm that multiplies by w
LAYOUTS: dict[str, NormLayout] = {"gpt2": GPT2_LAYOUT, "llama": LLAMA_LAYOUT, "mistral": LLAMA_LAYOUT,
                                  "qwen2": LLAMA_LAYOUT}


def layout_of(model: nn.Module) -> NormLayout:
    """The :class:`NormLayout` of ``model`` from its ``config.model_type``; NormgrowthError when unsupported."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in LAYOUTS:
        raise NormgrowthError(f"norm removal supports the pre-norm architectures {sorted(LAYOUTS)}, not "
                              f"{kind!r}: use a GPT-2 or Llama-architecture model.")
    return LAYOUTS[kind]


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a model of :data:`LAYOUTS`, in order."""
    layout = layout_of(model)
    return getattr(getattr(model, layout.base), layout.blocks)


def is_rms_norm(module: nn.Module) -> bool:
    """An RMSNorm of the HF kind (``weight``, ``variance_epsilon``, no mean subtraction, no bias)."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def norm_eps(module: nn.Module) -> float:
    """eps of a LayerNorm (``eps``) or HF RMSNorm (``variance_epsilon``)."""
    return float(module.variance_epsilon if is_rms_norm(module) else getattr(module, "eps", 0.0))
