"""Model loading and hook plumbing: the only module that touches TransformerLens.

A model is loaded with Hugging Face ``transformers`` (hub name or local directory), then wrapped in a
TransformerLens 4.x ``TransformerBridge`` built with ``build_bridge_from_module``. That route keeps
the HF model's own attention implementation (SDPA, not the eager attention ``boot_transformers``
forces), needs no tokenizer, and leaves every LayerNorm ``eps`` untouched, so LN-free checkpoints
(eps = 1e12) give the same logits as plain HF.

Performance: for GPT-2, GPT-NeoX and Llama the bridge replaces the HF attention by its own eager
re-implementation (it materialises the ``[batch, head, pos, pos]`` scores for ``hook_attn_scores`` /
``hook_pattern``). None of our sites needs those hooks, so :func:`_use_native_attention` makes each
such attention bridge run the wrapped HF attention module itself (SDPA as configured) with its
output projection routed through the bridge's ``o`` so ``hook_z`` still fires; see
:meth:`LoadedModel.reconstructed_attention` to get the bridge's own attention back.

Model facts live in one frozen :class:`ModelConfig`, read at load time from the bridge's config, the
bridge's block layout, HF's config and the live normalisation modules. Architecture differences live
in declarative tables:

* :data:`SITE_HOOKS` maps an abstract site (``resid_pre``, ``attn_out``, ``z`` ...) to the bridge's
  hook name, the same for every family; :data:`SITE_REQUIRES` names the config fact a site needs;
* :data:`FAMILIES` maps an HF architecture to what no config says (the family's name, and checkpoints
  to refuse). Supporting a family the bridge wraps is one row there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from .errors import NormgrowthError

# Abstract site -> bridge hook name; "{layer}" is filled in for per-block sites.
SITE_HOOKS: dict[str, str] = {
    "embed": "hook_embed",  # token embedding write [batch, pos, d_model]
    "pos_embed": "hook_pos_embed",  # learned position embedding write (families with one)
    "resid_pre": "blocks.{layer}.hook_resid_pre",  # stream entering block `layer`
    "resid_mid": "blocks.{layer}.hook_resid_mid",  # after attention, before MLP (sequential blocks)
    "resid_post": "blocks.{layer}.hook_resid_post",  # stream leaving block `layer`
    "attn_out": "blocks.{layer}.hook_attn_out",  # attention write, bias b_O included
    "mlp_out": "blocks.{layer}.hook_mlp_out",  # MLP write, bias b_out included
    "z": "blocks.{layer}.attn.hook_z",  # per-head mixed values [batch, pos, n_heads, d_head]
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",  # MLP pre-activation [batch, pos, d_mlp]
    "attn_in": "blocks.{layer}.attn.hook_in",  # the attention's input (after its input norm, if any)
    "mlp_in": "blocks.{layer}.mlp.hook_in",  # the MLP's input (after its input norm, if any)
    "ln1_in": "blocks.{layer}.ln1.hook_in",  # input of the attention's norm (not the stream)
    "ln2_in": "blocks.{layer}.ln2.hook_in",  # input of the MLP's norm (not the stream)
    "final_in": "ln_final.hook_in",  # final stream, before the final norm
    "ln1_scale": "blocks.{layer}.ln1.hook_scale",  # the attention's norm scale s(t) [batch, pos, 1] (LN sigma, RMS)
    "ln2_scale": "blocks.{layer}.ln2.hook_scale",  # the MLP's norm scale s(t) [batch, pos, 1]
    "final_scale": "ln_final.hook_scale",  # the final norm's scale s(t) [batch, pos, 1]
}
PER_LAYER_SITES = {k for k, v in SITE_HOOKS.items() if "{layer}" in v}

# Sites that exist only where a ModelConfig fact (a boolean field or property) holds; the rest always exist.
SITE_REQUIRES: dict[str, str] = {
    "resid_mid": "has_resid_mid",  # parallel blocks have no stream between attention and MLP
    "pos_embed": "has_pos_embed",  # rotary / ALiBi models write no position embedding
    "ln1_in": "input_norm",  # output-only normalisation has no input norm to hook
    "ln2_in": "mlp_norm",  # parallel blocks may share ln1
    "ln1_scale": "input_norm",
    "ln2_scale": "mlp_norm",
    "mlp_pre": "dense_mlp",  # a mixture of experts has no single pre-activation
}


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

# HF config fields holding the MLP's hidden width, first one set wins (the bridge's d_mlp misses ffn_dim).
HF_D_MLP_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")
# HF config fields holding the number of experts of a mixture-of-experts MLP, first one set wins.
HF_N_EXPERTS_FIELDS = ("num_local_experts", "num_experts")
# The bridge's normalization_type -> the kind of norm ("LN" subtracts the mean, "RMS" does not).
BRIDGE_NORMALIZATION = {"LN": "LN", "LNPre": "LN", "RMS": "RMS", "RMSPre": "RMS", None: "none"}
# Bridge block children that normalise a sublayer's input / output.
INPUT_NORMS = ("ln1", "ln2")
OUTPUT_NORMS = ("ln1_post", "ln2_post")
# (input norm, output norm) -> placement; LN-free and norm-free models are "none".
PLACEMENTS = {(True, False): "pre", (True, True): "peri", (False, True): "post", (False, False): "none"}

LN_FREE_MIN_EPS = 1e6  # published LN-free checkpoints store eps = 1e12
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """Every fact about a loaded model that the analyses use, read once at load time.

    Derived from the TransformerLens bridge's config (``bridge.cfg``), the bridge's block layout, HF's
    config and the live normalisation modules; :data:`FAMILIES` adds only the family's name.

    Attributes:
        spec: hub name or local directory, as given to :func:`load_model`.
        revision: hub revision, or None for a local directory / the default branch.
        architecture: HF architecture class name, e.g. ``"GPT2LMHeadModel"``.
        family: short family name from :data:`FAMILIES`, e.g. ``"gpt2"``, ``"gpt-neox"``, ``"llama"``.
        n_layers: number of transformer blocks.
        d_model: width of the residual stream.
        n_heads: query heads per attention layer.
        n_kv_heads: key/value heads (fewer than ``n_heads`` for grouped-query attention).
        d_head: width of one attention head.
        d_mlp: hidden width of the MLP (of each gate/up projection for gated MLPs).
        n_ctx: longest sequence the model accepts.
        vocab_size: number of token ids.
        normalization: ``"LN"`` (LayerNorm: subtracts the mean, divides by the std), ``"RMS"`` (RMSNorm:
            divides by the root mean square) or ``"none"`` (LN-free: the norms divide by a constant).
        ln_free: the LayerNorms are stored in the published LN-free format: every eps >= 1e6 (1e12 in
            practice) with weights scaled by about sqrt(eps) / sigma_avg.
        centers: the normalisation subtracts the per-token mean (LayerNorm, LN-free included).
        norm_eps: eps of the first block's input norm, read from the live module (never changed).
        input_norm: each sublayer reads the stream through a norm (``ln1`` / ``ln2``).
        output_norm: each sublayer's output passes a norm before it is added (``ln1_post`` / ``ln2_post``).
        norm_placement: ``"pre"`` (input norms only), ``"peri"`` (input and output norms), ``"post"`` (output
            norms only) or ``"none"`` (LN-free, or no norms at all).
        parallel_blocks: attention and MLP both read ``resid_pre`` and their writes are added together;
            there is no ``resid_mid``.
        positional_embedding: the bridge's ``positional_embedding_type``: ``"standard"`` (learned absolute
            positions added to the stream), ``"rotary"``, ``"alibi"`` ...
        has_pos_embed: a position embedding is written into the stream (the bridge has ``pos_embed``).
        mlp_norm: the MLP reads the stream through its own input norm ``ln2`` (False for parallel blocks
            whose attention and MLP share ``ln1``, and for output-only placement).
        norm_gain_offset: each norm multiplies by ``norm_gain_offset + weight`` (1 for Gemma, else 0).
        gated_mlp: the MLP is gated, ``act(x W_gate) * (x W_in)`` (Llama's SwiGLU).
        n_experts: experts per mixture-of-experts MLP (0 for a dense MLP).
        n_experts_per_token: experts each token is routed to (0 for a dense MLP).
        act_fn: the MLP's activation function, e.g. ``"gelu_new"``, ``"silu"``, ``"relu"``.
        eager_attention: HF runs the attention eagerly and materialises ``[batch, head, pos, pos]`` scores
            (no SDPA path for this architecture).
        bos_token_id: id prepended to text (from the tokenizer, else HF's config), or None.
    """

    spec: str
    revision: Optional[str]
    architecture: str
    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    vocab_size: int
    normalization: str
    ln_free: bool
    centers: bool
    norm_eps: float
    input_norm: bool
    output_norm: bool
    norm_placement: str
    parallel_blocks: bool
    positional_embedding: str
    has_pos_embed: bool
    mlp_norm: bool
    norm_gain_offset: float
    gated_mlp: bool
    n_experts: int
    n_experts_per_token: int
    act_fn: str
    eager_attention: bool
    bos_token_id: Optional[int]

    def __post_init__(self) -> None:
        if self.normalization not in ("LN", "RMS", "none"):
            raise ValueError(f"normalization must be LN, RMS or none, got {self.normalization!r}")
        if self.norm_placement not in set(PLACEMENTS.values()):
            raise ValueError(f"norm_placement must be one of {sorted(set(PLACEMENTS.values()))}")

    @property
    def has_resid_mid(self) -> bool:
        """A stream exists between attention and MLP (sequential blocks)."""
        return not self.parallel_blocks

    @property
    def moe(self) -> bool:
        """The MLP is a mixture of experts."""
        return self.n_experts > 0

    @property
    def dense_mlp(self) -> bool:
        """The MLP is one dense MLP (not a mixture of experts)."""
        return self.n_experts == 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def placement_of(input_norm: bool, output_norm: bool, ln_free: bool) -> str:
    """Norm placement from the block layout: "none" for LN-free models, else :data:`PLACEMENTS`."""
    return "none" if ln_free else PLACEMENTS[(bool(input_norm), bool(output_norm))]


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A loaded model: its :class:`ModelConfig` plus the runtime handles.

    Every config field reads through as an attribute (``model.n_layers`` is ``model.config.n_layers``).
    """

    config: ModelConfig
    hf_model: torch.nn.Module = field(repr=False)
    bridge: Any = field(repr=False)  # transformer_lens TransformerBridge (use the methods below)
    tokenizer: Any = field(repr=False)  # HF tokenizer, or None when the checkpoint ships none
    device: torch.device  # device of the embedding (where inputs go)
    dtype: torch.dtype  # dtype the weights were loaded in
    # attention bridges switched to the HF module's own attention (see _use_native_attention)
    native_attention: tuple = field(default=(), repr=False)

    # ----- sites and hooks -------------------------------------------------------------------
    def has_site(self, site: str) -> bool:
        """Whether ``site`` exists in this architecture (see :data:`SITE_REQUIRES`)."""
        need = SITE_REQUIRES.get(site)
        return site in SITE_HOOKS and (need is None or bool(getattr(self.config, need)))

    def hook_name(self, site: str, layer: Optional[int] = None) -> str:
        if not self.has_site(site):
            raise KeyError(f"site {site!r} does not exist in {self.family} models")
        template = SITE_HOOKS[site]
        if "{layer}" in template:
            if layer is None or not 0 <= layer < self.n_layers:
                raise KeyError(f"site {site!r} needs a layer in [0, {self.n_layers})")
            return template.format(layer=layer)
        return template

    @contextlib.contextmanager
    def hooks(self, hooks: Iterable[tuple[str, Optional[int], Callable[[torch.Tensor], Optional[torch.Tensor]]]]
              ) -> Iterator[None]:
        """Attach ``fn(activation) -> None | replacement`` at each (site, layer); always removed on exit.

        Results should be keyed by the caller's own (site, layer) label: inside TransformerLens the
        hook's ``name`` is the bridge's canonical name, not the alias registered here.
        """
        fwd = []
        for site, layer, fn in hooks:
            fwd.append((self.hook_name(site, layer), _tl_hook(fn)))
        with self.bridge.hooks(fwd_hooks=fwd):
            yield

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                logits: bool = True) -> Optional[torch.Tensor]:
        """Logits ``[batch, pos, vocab]`` through the bridge (hooks attached with :meth:`hooks` fire).

        ``logits=False`` stops the pass once the final stream is formed (right after every ``final_in``
        hook has fired), skipping the final norm and the unembedding, and returns None: for collectors
        that only read the stream. No key/value cache is built either way.
        """
        tokens = tokens.to(self.input_device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.input_device).long()
        if logits:
            return self.bridge(tokens, attention_mask=attention_mask, use_cache=False)
        try:
            with self.bridge.hooks(fwd_hooks=[(SITE_HOOKS["final_in"], _raise_stop)]):
                self.bridge(tokens, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            return None
        raise RuntimeError("the final_in hook did not fire: the bridge's hook layout changed")

    def run_with_cache(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       sites: Optional[Iterable[tuple[str, Optional[int]]]] = None) -> tuple[torch.Tensor, dict]:
        """TransformerLens ``run_with_cache`` on the bridge: ``(logits, cache)`` (the benchmarks' baseline).

        ``sites``: (site, layer) pairs to keep (layer None for embed / pos_embed / final_in); the cache
        is then keyed by those pairs. None keeps every hook the bridge fires, keyed by hook name. The
        cache holds whole activations, so memory grows with batch x positions x width per hook.
        """
        tokens = tokens.to(self.input_device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.input_device).long()
        if sites is None:
            logits, cache = self.bridge.run_with_cache(tokens, attention_mask=attention_mask, use_cache=False)
            return logits, {name: cache[name] for name in cache.keys()}
        names = {self.hook_name(site, layer): (site, layer) for site, layer in sites}
        logits, cache = self.bridge.run_with_cache(tokens, attention_mask=attention_mask, use_cache=False,
                                                   names_filter=list(names))
        return logits, {key: cache[name] for name, key in names.items()}

    @contextlib.contextmanager
    def reconstructed_attention(self) -> Iterator[None]:
        """Run the bridge's own eager attention inside this block (``hook_pattern`` etc. fire again).

        By default (see the module docstring) GPT-2/NeoX/Llama attention runs the HF module's SDPA.
        """
        saved = [(a, a.__dict__.pop("forward", None)) for a in self.native_attention]
        try:
            yield
        finally:
            for a, fwd in saved:
                if fwd is not None:
                    a.__dict__["forward"] = fwd

    @property
    def input_device(self) -> torch.device:
        return self.hf_model.get_input_embeddings().weight.device

    # ----- weights ------------------------------------------------------------------------------
    def stacked_weights(self, keys: Optional[Iterable[str]] = None) -> dict[str, Optional[torch.Tensor]]:
        """Raw (unprocessed) weights stacked over layers, in TransformerLens orientation.

        ``keys``: compute only these entries (stacking all of them takes about a second for a
        GPT-2-small-sized model); None means all.

        Keys: W_Q, W_O [layer, head, d_head, d_model] / W_K, W_V [layer, head, d_model, d_head] with
        K/V repeated to the query heads for grouped-query attention; W_K_stored/W_V_stored with the
        stored (un-repeated) K/V heads; b_Q, b_K, b_V [layer, head, d_head] (stored heads; Qwen2, Bloom ...),
        b_O, W_in, W_gate (gated MLPs, else None; None for mixture-of-experts MLPs, see
        :meth:`expert_weights`), W_out, b_in,
        b_out; ln1_w, ln1_b, ln2_w, ln2_b, ln1_post_w/_b, ln2_post_w/_b (output norms), lnf_w, lnf_b (the
        stored gains: LN-free checkpoints carry the 1e6 storage factor, Gemma's norms multiply by
        1 + stored). A bias or norm the checkpoint lacks is None; ``ln2`` is the MLP's reader norm (see
        :meth:`norm_modules`).
        """
        b = self.bridge
        want = set(STACKED_WEIGHT_KEYS if keys is None else keys)
        unknown = want - set(STACKED_WEIGHT_KEYS)
        if unknown:
            raise KeyError(f"unknown weight key(s) {sorted(unknown)}: choose from {', '.join(STACKED_WEIGHT_KEYS)}")
        out: dict[str, Optional[torch.Tensor]] = {}
        with torch.no_grad():
            for key in ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out"]:
                if not want & {key, key + "_stored"}:
                    continue
                try:
                    out[key] = getattr(b, key).detach()
                except AttributeError:
                    out[key] = None
            if "W_gate" in want:
                try:
                    out["W_gate"] = b.W_gate.detach() if b.W_gate is not None else None
                except AttributeError:  # mixture-of-experts MLPs: see expert_weights
                    out["W_gate"] = None
            for key in ["W_K", "W_V"]:
                if key not in out:
                    continue
                out[key + "_stored"] = out[key]
                if out[key] is not None:
                    out[key] = b._expand_kv_heads(out[key])
            for name, which in (("ln1", "ln1"), ("ln2", "ln2"), ("ln1_post", "ln1_post"), ("ln2_post", "ln2_post"),
                                ("lnf", "ln_final")):
                if not want & {name + "_w", name + "_b"}:
                    continue
                mods = self.norm_modules(which)
                if not mods:
                    out[name + "_w"] = out[name + "_b"] = None
                    continue
                ones = torch.ones(self.d_model)
                # a norm without a weight (OLMo's non-parametric LayerNorm) multiplies by 1: stored gain 1 - offset
                ws = [m.weight.detach() if getattr(m, "weight", None) is not None
                      else ones - self.norm_gain_offset for m in mods]
                bs = [getattr(m, "bias", None) for m in mods]
                out[name + "_w"] = torch.stack(ws)
                out[name + "_b"] = None if any(x is None for x in bs) else torch.stack([x.detach() for x in bs])
        return {k: v for k, v in out.items() if k in want}

    def expert_weights(self) -> dict[str, Optional[torch.Tensor]]:
        """Mixture-of-experts MLP weights stacked over layers, TransformerLens orientation (``x W``).

        ``W_gate``, ``W_in`` ``[layer, expert, d_model, d_mlp]`` (each expert computes
        ``act(x W_gate^e) * (x W_in^e)``), ``W_out`` ``[layer, expert, d_mlp, d_model]``, ``W_router``
        ``[layer, d_model, expert]`` (router logits ``x W_router``); for a shared expert (Qwen2-MoE)
        ``W_gate_shared``, ``W_in_shared``, ``W_out_shared`` ``[layer, ...]`` and ``W_shared_gate``
        ``[layer, d_model, 1]``, else None. Read from the HF modules: fused ``experts.gate_up_proj``
        ``[expert, 2 d_mlp, d_model]`` (gate rows first) and ``experts.down_proj``, or a list of experts with
        ``gate_proj`` / ``up_proj`` / ``down_proj``.
        """
        if not self.moe:
            raise NormgrowthError(f"model {self.spec!r} has dense MLPs, not a mixture of experts.")
        keys = ("W_gate", "W_in", "W_out", "W_router", "W_gate_shared", "W_in_shared", "W_out_shared", "W_shared_gate")
        per: dict[str, list] = {k: [] for k in keys}
        with torch.no_grad():
            for blk in self.bridge.blocks:
                moe = blk.mlp.original_component
                experts = moe.experts
                if hasattr(experts, "gate_up_proj"):
                    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)  # [E, d_mlp, d_model] each
                    down = experts.down_proj.detach()  # [E, d_model, d_mlp]
                else:
                    gate = torch.stack([e.gate_proj.weight.detach() for e in experts])
                    up = torch.stack([e.up_proj.weight.detach() for e in experts])
                    down = torch.stack([e.down_proj.weight.detach() for e in experts])
                per["W_gate"].append(gate.transpose(1, 2))
                per["W_in"].append(up.transpose(1, 2))
                per["W_out"].append(down.transpose(1, 2))
                router = moe.gate.weight if hasattr(moe.gate, "weight") else moe.gate
                per["W_router"].append(router.detach().T)
                shared = getattr(moe, "shared_expert", None)
                if shared is not None:
                    per["W_gate_shared"].append(shared.gate_proj.weight.detach().T)
                    per["W_in_shared"].append(shared.up_proj.weight.detach().T)
                    per["W_out_shared"].append(shared.down_proj.weight.detach().T)
                    per["W_shared_gate"].append(moe.shared_expert_gate.weight.detach().T)
        return {k: (torch.stack(v) if len(v) == self.n_layers else None) for k, v in per.items()}

    def norm_modules(self, which: str) -> list[torch.nn.Module]:
        """The HF normalisation modules behind ``ln1`` / ``ln2`` / ``ln1_post`` / ``ln2_post`` (one per
        block) or ``ln_final``; empty where the block has no such norm.

        ``ln2`` is the norm the MLP reads through: ``ln1`` itself for parallel blocks that share one
        input norm (GPT-J, Phi, Cohere, Falcon-7B); none for output-only placement (OLMo 2).
        """
        if which == "ln2" and not self.mlp_norm:
            return _norm_modules(self.bridge, "ln1") if self.parallel_blocks else []
        return _norm_modules(self.bridge, which)


def _norm_modules(bridge: Any, which: str) -> list[torch.nn.Module]:
    if which == "ln_final":
        return [bridge.ln_final.original_component]
    return [getattr(blk, which).original_component for blk in bridge.blocks if which in blk._modules]


def _forward_to_config(name: str) -> property:
    return property(lambda self: getattr(self.config, name), doc=f"``config.{name}`` (see :class:`ModelConfig`).")


for _name in [f.name for f in dataclasses.fields(ModelConfig)] + ["has_resid_mid", "moe", "dense_mlp"]:
    setattr(LoadedModel, _name, _forward_to_config(_name))


STACKED_WEIGHT_KEYS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out",
                       "W_gate", "W_K_stored", "W_V_stored", "ln1_w", "ln1_b", "ln2_w", "ln2_b", "ln1_post_w",
                       "ln1_post_b", "ln2_post_w", "ln2_post_b", "lnf_w", "lnf_b")


def _tl_hook(fn: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Callable:
    def hook(activation: torch.Tensor, hook: Any) -> Optional[torch.Tensor]:
        return fn(activation)

    return hook


class _StopForward(Exception):
    """Raised by the final_in hook of ``forward(logits=False)`` to end the pass early."""


def _raise_stop(activation: torch.Tensor, hook: Any) -> None:
    raise _StopForward


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def resolve_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise NormgrowthError(f"unknown dtype {dtype!r}: use one of float32, float16, bfloat16.")
    return DTYPES[key]


def resolve_device(device: Any) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise NormgrowthError(f"unknown device {device!r}: use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NormgrowthError(f"device {device!r} was asked for but no CUDA GPU is available: use --device cpu.")
    return dev


def _looks_like_path(spec: str) -> bool:
    """Hub names are ``name`` or ``owner/name``; anything else is meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/") or "\\" in spec


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap check that the hub's host resolves and accepts a connection (avoids minutes of retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    port = 443 if endpoint.startswith("https") else 80
    if ":" in host:
        host, port_s = host.rsplit(":", 1)
        port = int(port_s)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_config(spec: str, revision: Optional[str] = None) -> Any:
    """The HF config for a local directory or hub name, or a one-sentence :class:`NormgrowthError`."""
    from transformers import AutoConfig

    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NormgrowthError(
                f"model directory {spec!r} has no config.json: pass a directory holding a Hugging Face "
                "checkpoint (config.json plus weights)."
            )
        try:
            return AutoConfig.from_pretrained(str(path))
        except (ValueError, KeyError, OSError) as err:
            raise NormgrowthError(f"cannot read the config of model {spec!r} ({_first_line(err)}): "
                                  "check that it is a Hugging Face checkpoint.") from None
    if path.exists() or _looks_like_path(spec):
        raise NormgrowthError(f"model directory {spec!r} does not exist: check the path, or give a Hugging Face hub name.")
    try:  # a copy in the local HF cache works offline
        return AutoConfig.from_pretrained(spec, revision=revision, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise NormgrowthError(
            f"model {spec!r} is not a local directory and the Hugging Face hub cannot be reached: "
            "pass a local checkpoint directory, or run where the hub is reachable."
        )
    try:
        return AutoConfig.from_pretrained(spec, revision=revision)
    except (OSError, ValueError) as err:
        raise NormgrowthError(f"cannot load model {spec!r} from the Hugging Face hub ({_first_line(err)}): "
                              "check the name and revision, or pass a local directory.") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def load_model(spec: str, device: Any = None, dtype: Any = None, revision: Optional[str] = None,
               device_map: Any = None) -> LoadedModel:
    """Load ``spec`` (hub name or local HF checkpoint directory) and wrap it in a TransformerLens bridge.

    ``device_map`` (e.g. ``"auto"``) spreads a model over several GPUs through accelerate; then
    ``device`` is ignored and inputs go to the embedding's device. A local checkpoint's files are
    checked first (:func:`check_checkpoint_files`).
    """
    spec = str(spec)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device) if device_map is None else None
    config = load_config(spec, revision)
    arch = supported_architecture(spec, config)
    refuse = FAMILIES[arch].refuse
    if refuse is not None and getattr(config, refuse.hf_field, None) == refuse.value:
        raise NormgrowthError(f"model {spec!r} {refuse.reason}.")

    from transformers import AutoModelForCausalLM

    local = Path(os.path.expanduser(spec)).is_dir()
    if local:
        check_checkpoint_files(Path(os.path.expanduser(spec)), config)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if not local:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # HF's load reports and progress bars would break the one-line errors
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(spec) if local else spec, **kwargs)
    except KeyError as err:  # a config value transformers has no implementation for (e.g. an unknown rope type)
        raise _unmappable_config(spec, arch, config, err) from None
    except (OSError, ValueError, RuntimeError, *_safetensors_errors()) as err:
        raise _weights_error(spec, Path(os.path.expanduser(spec)) if local else None, err) from None
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    if dev is not None:
        hf_model = hf_model.to(dev)
    hf_model.eval()
    tokenizer = _load_tokenizer(spec if not local else os.path.expanduser(spec), revision)
    try:
        bridge = _build_bridge(hf_model, arch, spec)
    except KeyError as err:
        raise _unmappable_config(spec, arch, config, err) from None
    model_cfg = model_config(spec, revision, arch, hf_model, bridge, _bos_id(config, tokenizer))
    if model_cfg.ln_free and torch_dtype == torch.float16:
        raise NormgrowthError(f"model {spec!r} is an LN-free checkpoint whose stored LayerNorm weights "
                              "(about 1e6) overflow float16: use --dtype float32 or bfloat16.")
    return LoadedModel(config=model_cfg, hf_model=hf_model, bridge=bridge, tokenizer=tokenizer,
                       device=hf_model.get_input_embeddings().weight.device, dtype=torch_dtype,
                       native_attention=tuple(_use_native_attention(bridge)))


def model_config(spec: str, revision: Optional[str], architecture: str, hf_model: torch.nn.Module, bridge: Any,
                 bos_token_id: Optional[int]) -> ModelConfig:
    """The :class:`ModelConfig` of a model wrapped in ``bridge`` (see the field docs for each source)."""
    cfg, hf_cfg = bridge.cfg, hf_model.config
    kind = cfg.normalization_type
    if kind not in BRIDGE_NORMALIZATION:
        raise NormgrowthError(f"model {spec!r} uses normalisation {kind!r}, which normgrowth cannot measure: "
                              "use a model with LayerNorm or RMSNorm.")
    normalization = BRIDGE_NORMALIZATION[kind]
    block = dict(bridge.blocks[0].named_children())
    input_norm = any(name in block for name in INPUT_NORMS)
    output_norm = any(name in block for name in OUTPUT_NORMS)
    norm_names = [name for name in INPUT_NORMS + OUTPUT_NORMS if name in block]
    norm_eps, ln_free = _norm_facts(bridge, normalization, norm_names, spec)
    d_mlp = next((getattr(hf_cfg, f) for f in HF_D_MLP_FIELDS if getattr(hf_cfg, f, None)), None) or cfg.d_mlp
    n_experts = int(next((getattr(hf_cfg, f) for f in HF_N_EXPERTS_FIELDS if getattr(hf_cfg, f, None)), 0) or 0)
    n_experts_per_token = int(getattr(hf_cfg, "num_experts_per_tok", 0) or 0)
    if n_experts and getattr(hf_cfg, "moe_intermediate_size", None):
        d_mlp = hf_cfg.moe_intermediate_size
    return ModelConfig(
        spec=spec, revision=revision, architecture=architecture, family=FAMILIES[architecture].name,
        n_layers=int(cfg.n_layers), d_model=int(cfg.d_model), n_heads=int(cfg.n_heads),
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads), d_head=int(cfg.d_head),
        d_mlp=int(d_mlp), n_ctx=int(cfg.n_ctx), vocab_size=int(cfg.d_vocab),
        normalization="none" if ln_free else normalization, ln_free=ln_free, centers=normalization == "LN",
        norm_eps=norm_eps, input_norm=input_norm, output_norm=output_norm,
        norm_placement="none" if normalization == "none" else placement_of(input_norm, output_norm, ln_free),
        parallel_blocks=bool(cfg.parallel_attn_mlp), positional_embedding=str(cfg.positional_embedding_type),
        has_pos_embed="pos_embed" in dict(bridge.named_children()), mlp_norm="ln2" in block,
        norm_gain_offset=float(FAMILIES[architecture].gain_offset), gated_mlp=bool(cfg.gated_mlp),
        n_experts=n_experts, n_experts_per_token=n_experts_per_token if n_experts else 0, act_fn=str(cfg.act_fn),
        eager_attention=getattr(hf_cfg, "_attn_implementation", None) == "eager", bos_token_id=bos_token_id,
    )


def _weights_error(spec: str, directory: Optional[Path], err: BaseException) -> NormgrowthError:
    """One sentence for a failure inside HF's loading, naming the weight files of a local checkpoint."""
    files = sorted(p.name for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in directory.glob(pattern)
                   ) if directory is not None else []
    where = f" from {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}" if files else ""
    detail = ("stored shapes differ from those config.json implies" if "mismatched_sizes" in str(err)
              else _first_line(err))
    return NormgrowthError(f"cannot load the weights of model {spec!r}{where} ({detail}): check that the checkpoint "
                           "is complete and matches its config.json.")


def _safetensors_errors() -> tuple[type, ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def _load_tokenizer(spec: str, revision: Optional[str]) -> Any:
    """The checkpoint's tokenizer, or None when it ships none (token-id data still works).

    A local directory needs tokenizer files: recent ``transformers`` otherwise builds an empty tokenizer.
    """
    from transformers import AutoTokenizer

    if Path(spec).is_dir() and not any((Path(spec) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision)
    except Exception:  # no usable tokenizer files
        return None
    return tokenizer if len(tokenizer) > 0 else None


def _bos_id(config: Any, tokenizer: Any) -> Optional[int]:
    if tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is not None:
        return int(tokenizer.bos_token_id)
    bos = getattr(config, "bos_token_id", None)
    return int(bos) if isinstance(bos, int) else None


def supported_architecture(spec: str, config: Any) -> str:
    """The config's architecture that :data:`FAMILIES` supports, or a one-sentence :class:`NormgrowthError`.

    Encoders and encoder-decoders are refused as such; any other architecture gets the supported families.
    """
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
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


def _build_bridge(hf_model: torch.nn.Module, arch: str, spec: str = "") -> Any:
    """Wrap ``hf_model`` in a TransformerLens bridge; a config the bridge cannot map is one sentence naming
    the config field (the attribute the bridge looked for) where the error says which."""
    import logging

    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    tl_logger = logging.getLogger("transformer_lens")
    level = tl_logger.level
    tl_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_bridge_from_module(hf_model, arch, hf_config=hf_model.config)
    except (AttributeError, ValueError, TypeError, NotImplementedError) as err:
        field_name = _config_field_of(err)
        what = f"its config field {field_name!r}" if field_name else f"its config ({_first_line(err)})"
        raise NormgrowthError(f"model {spec!r} ({arch}) cannot be mapped by the TransformerLens bridge because of "
                              f"{what}: use a checkpoint whose config the bridge supports.") from None
    finally:
        tl_logger.setLevel(level)


def _unmappable_config(spec: str, arch: str, config: Any, err: KeyError) -> NormgrowthError:
    """One sentence naming the config field whose value (the KeyError's key) has no implementation."""
    key = err.args[0] if err.args else None
    path = _field_holding(config.to_dict(), key) if key is not None else None
    what = f"config field {path!r} = {key!r}" if path else f"config value {key!r}"
    return NormgrowthError(f"model {spec!r} ({arch}) has {what}, which transformers / the TransformerLens bridge "
                           "cannot map: use a checkpoint with a supported value of that field.")


def _field_holding(doc: Any, value: Any, prefix: str = "") -> Optional[str]:
    """Dotted path of the first field of a config dict whose value (or key) is ``value``."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            here = f"{prefix}{k}"
            if isinstance(v, (dict, list)):
                found = _field_holding(v, value, here + ".")
                if found:
                    return found
            elif v == value and not isinstance(v, bool):
                return here
    elif isinstance(doc, list):
        for v in doc:
            found = _field_holding(v, value, prefix)
            if found:
                return found
    return None


def _config_field_of(err: BaseException) -> Optional[str]:
    """The config attribute an AttributeError / KeyError names (``'X' object has no attribute 'f'``, ``'f'``)."""
    import re

    text = str(err)
    hit = re.search(r"has no attribute '([A-Za-z_][A-Za-z0-9_]*)'", text) or re.fullmatch(r"'([A-Za-z_]\w*)'", text)
    return hit.group(1) if hit else None


# Norm modules that keep eps in their code, not as an attribute (OLMo's parameter-free LayerNorm).
FIXED_NORM_EPS = {"OlmoLayerNorm": 1e-5}


def norm_eps_of(module: torch.nn.Module) -> float:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(module, attr):
            return float(getattr(module, attr))
    if type(module).__name__ in FIXED_NORM_EPS:
        return FIXED_NORM_EPS[type(module).__name__]
    raise NormgrowthError(f"cannot find the eps of normalisation module {type(module).__name__}.")


def _norm_facts(bridge: Any, normalization: str, norm_names: Sequence[str], spec: str) -> tuple[float, bool]:
    """``(norm_eps, ln_free)`` from the live modules (eps is read, never overwritten).

    LN-free (published format, LayerNorm or RMSNorm): every input norm and the final norm has eps >= 1e6
    (1e12 in practice) and gains scaled by about sqrt(eps) / sigma_avg, so
    ``LN(x) = (x - mean) * w / sqrt(var + eps) ~ (x - mean) * w / sqrt(eps)`` (RMSNorm: ``x * w / sqrt(eps)``):
    the norm divides by a constant. Output norms (peri / post placement) are not input norms; a model
    without input norms is judged by its output and final norms.
    """
    if normalization == "none":
        return 0.0, False
    inputs = [n for n in norm_names if n in INPUT_NORMS] or list(norm_names)
    mods = [m for which in inputs for m in _norm_modules(bridge, which)] + _norm_modules(bridge, "ln_final")
    eps = [norm_eps_of(m) for m in mods]
    huge = [e >= LN_FREE_MIN_EPS for e in eps]
    if all(huge):
        gains = [m.weight.detach().abs().float().flatten().cpu() for m in mods
                 if getattr(m, "weight", None) is not None]
        median_gain = float(torch.cat(gains).median()) / (eps[0] ** 0.5) if gains else 0.0
        if median_gain < 1e-4:
            warnings.warn(f"model {spec!r}: norm eps is {eps[0]:g} but the weights are not scaled "
                          "to compensate; its normalised inputs are close to zero.")
        return eps[0], True
    if any(huge):
        warnings.warn(f"model {spec!r}: {sum(huge)} of {len(huge)} norms have eps >= 1e6 (partly "
                      "LN-free); it is treated as an ordinary normalised model.")
    return eps[0], False


# ----------------------------------------------------------------------------------------------
# checkpoint files: one line naming the file that is corrupt, missing or of the wrong shape
# ----------------------------------------------------------------------------------------------
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def check_checkpoint_files(directory: Path, hf_config: Any = None) -> None:
    """Refuse, in one sentence naming the file, a local checkpoint that cannot load as ``hf_config`` says.

    Checks, in the order HF reads the files: every shard an index names exists; every safetensors
    file's header is complete and describes exactly the file's size (a truncated copy fails this);
    and, given ``hf_config``, every stored tensor whose name the model has has the model's shape.
    """
    directory = Path(directory)
    if (directory / SAFE_INDEX).is_file():
        files = _index_shards(directory / SAFE_INDEX)
    elif (directory / SAFE_WEIGHTS).is_file():
        files = [directory / SAFE_WEIGHTS]
    else:
        if (directory / BIN_INDEX).is_file():
            _index_shards(directory / BIN_INDEX)
        return
    stored = {}
    for path in files:
        for name, shape in safetensors_shapes(path).items():
            stored[name] = (shape, path)
    if hf_config is not None and getattr(hf_config, "quantization_config", None) is None:
        _check_shapes(stored, hf_config)


def _index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise NormgrowthError(f"checkpoint index {str(index)!r} is not a readable weight map: copy or download "
                              "it again.") from None
    for shard in shards:
        if not (index.parent / shard).is_file():
            raise NormgrowthError(f"checkpoint index {str(index)!r} names the shard {shard!r}, which is missing: "
                                  "download the missing file (or the whole checkpoint) again.")
    return [index.parent / shard for shard in shards]


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, after checking that the file is complete.

    Layout: 8 bytes little-endian header length n, n bytes of JSON ``{name: {dtype, shape,
    data_offsets: [begin, end]}}``, then the data; the last ``end`` must reach the end of the file.
    """
    size = path.stat().st_size

    def corrupt(detail: str) -> NormgrowthError:
        return NormgrowthError(f"checkpoint file {str(path)!r} is truncated or corrupt ({detail}): copy or "
                               "download it again.")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise corrupt(f"the header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(e["data_offsets"][1]) for e in entries.values()), default=0)
            shapes = {k: tuple(int(d) for d in e["shape"]) for k, e in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise corrupt("its header is not a valid tensor table") from None
    if 8 + n + end != size:
        raise corrupt(f"{size} bytes where its header describes {8 + n + end}")
    return shapes


def _check_shapes(stored: dict[str, tuple[tuple[int, ...], Path]], hf_config: Any) -> None:
    """Compare stored shapes with those of the model ``hf_config`` builds (on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            meta = AutoModelForCausalLM.from_config(hf_config)
    except Exception:  # a config transformers cannot build fails later, with HF's own message
        return
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    prefix = getattr(meta, "base_model_prefix", "")
    for name, (shape, path) in stored.items():
        key = name if name in expected else f"{prefix}.{name}"
        if key in expected and expected[key] != shape:
            raise NormgrowthError(
                f"checkpoint file {str(path)!r} holds {name} with shape {list(shape)} but config.json implies "
                f"{list(expected[key])}: the weights and config.json come from different models; use matching files.")


# ----------------------------------------------------------------------------------------------
# fast attention: let the HF attention module run its own kernel (performance)
# ----------------------------------------------------------------------------------------------
# Attention bridges that re-implement attention eagerly instead of calling the HF module.
_RECONSTRUCTING_ATTENTION = ("JointQKVAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge",
                             "PositionEmbeddingsAttentionBridge")


def _native_attention_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Attention bridge forward that calls the wrapped HF attention module (its SDPA/eager kernel).

    ``hook_in`` / ``hook_out`` (attn_out) fire as in the bridge; the output projection runs through the
    bridge's ``o`` so ``hook_z`` (= ``o.hook_in``) fires on the mixed values and may replace them.
    ``hook_q/k/v``, ``hook_attn_scores`` and ``hook_pattern`` do not fire (use
    :meth:`LoadedModel.reconstructed_attention` for those).
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    hf_attn = self.original_component
    o = self._modules["o"]
    slot = getattr(self, "_ng_o_slot", None)  # HF child to route through ``o`` (GPT-2's c_proj)
    if slot is not None:
        hf_attn._modules[slot] = o
    try:
        return AttentionBridge.forward(self, *args, **kwargs)
    finally:
        if slot is not None:
            hf_attn._modules[slot] = o.original_component


def _use_native_attention(bridge: Any) -> list:
    """Switch every reconstructing attention bridge to :func:`_native_attention_forward`.

    Only where the HF attention's output projection is the bridge's ``o`` (or the module ``o`` wraps),
    so that ``hook_z`` keeps firing. Returns the switched bridges.
    """
    import types

    switched = []
    for module in bridge.modules():
        if type(module).__name__ not in _RECONSTRUCTING_ATTENTION:
            continue
        hf_attn = module._modules.get("_original_component")
        o = module._modules.get("o")
        if hf_attn is None or o is None or o._modules.get("_original_component") is None:
            continue
        children = dict(hf_attn.named_children())
        if any(child is o for child in children.values()):
            slot = None
        else:
            slots = [name for name, child in children.items() if child is o.original_component]
            if len(slots) != 1:
                continue
            slot = slots[0]
        object.__setattr__(module, "_ng_o_slot", slot)
        # set on the instance dict: the bridge's __setattr__ would forward "forward" to the HF module
        module.__dict__["forward"] = types.MethodType(_native_attention_forward, module)
        switched.append(module)
    return switched
