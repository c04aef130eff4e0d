"""The family table: what no config says about each supported decoder architecture.

:data:`FAMILIES` maps an HF architecture class name to its :class:`Family` (short name, label, and the
checkpoints to refuse); every other fact comes from the configs (:func:`normgrowth.models.model_config`).
Supporting a family the TransformerLens bridge wraps is one row here. :func:`supported_architecture`
picks a config's row, or says in one sentence why there is none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .errors import NormgrowthError


@dataclass(frozen=True)
class Refusal:
    """A checkpoint of a supported architecture that is refused when ``hf_field`` of its config is ``value``."""

    hf_field: str
    value: Any
    reason: str  # completes "model 'X' ...", one sentence with what to do


@dataclass(frozen=True)
class Family:
    """What neither the bridge's config nor HF's says about an architecture.

    ``gain_offset``: the norm multiplies by ``gain_offset + weight`` (Gemma's RMSNorm stores ``w`` and
    scales by ``1 + w``); 0 for every other family.
    """

    name: str  # short family name used in reports, e.g. "gpt-neox"
    label: str  # how users call it, for error messages, e.g. "GPT-NeoX/Pythia"
    refuse: Optional[Refusal] = None
    gain_offset: float = 0.0


# HF architecture -> family. Every other fact (normalisation kind, norm placement, parallel blocks, gated
# MLP, experts, grouped-query heads ...) is read from the bridge's and HF's configs (model_config).
FAMILIES: dict[str, Family] = {
    "GPT2LMHeadModel": Family("gpt2", "GPT-2"),
    "GPTNeoForCausalLM": Family("gpt-neo", "GPT-Neo"),
    "GPTJForCausalLM": Family("gpt-j", "GPT-J"),
    "OPTForCausalLM": Family("opt", "OPT", Refusal(
        "do_layer_norm_before", False, "is a post-LayerNorm OPT model (like opt-350m), whose residual stream is "
        "re-normalised after every layer: use a pre-LN OPT model")),
    "BloomForCausalLM": Family("bloom", "Bloom"),
    "FalconForCausalLM": Family("falcon", "Falcon"),
    "GPTNeoXForCausalLM": Family("gpt-neox", "GPT-NeoX/Pythia"),
    "StableLmForCausalLM": Family("stablelm", "StableLM"),
    "LlamaForCausalLM": Family("llama", "Llama"),
    "MistralForCausalLM": Family("mistral", "Mistral"),
    "MixtralForCausalLM": Family("mixtral", "Mixtral"),
    "Qwen2ForCausalLM": Family("qwen2", "Qwen2"),
    "Qwen2MoeForCausalLM": Family("qwen2-moe", "Qwen2-MoE"),
    "Qwen3ForCausalLM": Family("qwen3", "Qwen3"),
    "Qwen3MoeForCausalLM": Family("qwen3-moe", "Qwen3-MoE"),
    "GemmaForCausalLM": Family("gemma", "Gemma", gain_offset=1.0),
    "Gemma2ForCausalLM": Family("gemma2", "Gemma 2", gain_offset=1.0),
    "Gemma3ForCausalLM": Family("gemma3", "Gemma 3 (text)", gain_offset=1.0),
    "OlmoForCausalLM": Family("olmo", "OLMo"),
    "Olmo2ForCausalLM": Family("olmo2", "OLMo 2"),
    "OlmoeForCausalLM": Family("olmoe", "OLMoE"),
    "PhiForCausalLM": Family("phi", "Phi"),
    "Phi3ForCausalLM": Family("phi3", "Phi-3"),
    "CohereForCausalLM": Family("cohere", "Cohere"),
    "GraniteForCausalLM": Family("granite", "Granite"),
    "Starcoder2ForCausalLM": Family("starcoder2", "Starcoder2"),
    "GPTBigCodeForCausalLM": Family("gpt-bigcode", "GPT-BigCode/StarCoder"),
}
# Architecture name endings of encoder models (encoder-decoders are recognised by HF's is_encoder_decoder;
# "ForConditionalGeneration" alone also names multimodal decoders such as Gemma 3 4B, which are unsupported).
NON_CAUSAL_SUFFIXES = ("ForMaskedLM", "ForPreTraining", "ForSequenceClassification", "ForTokenClassification",
                       "ForQuestionAnswering", "ForMultipleChoice")


def supported_architecture(spec: str, config: Any) -> str:
    """The config's architecture that :data:`FAMILIES` supports, or a one-sentence :class:`NormgrowthError`.

    A config without ``architectures`` names its causal-LM class through ``model_type``, as transformers'
    ``AutoModelForCausalLM`` reads it (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``). Encoders and
    encoder-decoders are refused as such; any other architecture gets the supported families.
    """
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    if not archs:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(getattr(config, "model_type", "")))
        archs = [mapped] if isinstance(mapped, str) else []
    arch = next((a for a in archs if a in FAMILIES), None)
    if arch is not None:
        return arch
    name = archs[0] if archs else str(getattr(config, "model_type", "unknown"))
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if getattr(config, "is_encoder_decoder", False) or (not causal and archs and all(
            a.endswith(NON_CAUSAL_SUFFIXES) for a in archs)):
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "an encoder"
        raise NormgrowthError(f"model {spec!r} ({name}) is {kind} model: only decoder-only causal language "
                              "models are analysed; use a decoder-only checkpoint (e.g. Llama, Qwen, Gemma, GPT-2).")
    labels = ", ".join(f.label for f in FAMILIES.values())
    raise NormgrowthError(f"model {spec!r} has architecture {name!r}, which normgrowth does not support: use a "
                          f"checkpoint of one of these families: {labels}.")
