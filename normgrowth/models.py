"""Model loading and hook plumbing: the only module that touches TransformerLens.

A model is loaded with Hugging Face ``transformers`` (hub name, local directory, or a GGUF file dequantised
through :mod:`normgrowth.sources`), then wrapped in a TransformerLens 4.x ``TransformerBridge`` built with
``build_bridge_from_module``. That route keeps
the HF model's own attention implementation (SDPA, not the eager attention ``boot_transformers``
forces), needs no tokenizer, and leaves every LayerNorm ``eps`` untouched, so LN-free checkpoints
(eps = 1e12) give the same logits as plain HF.

Performance: for GPT-2, GPT-NeoX and Llama the bridge's attention is switched to the HF module's own
kernel (:mod:`normgrowth.native_attention`, the one patch of TransformerLens internals); see
:meth:`LoadedModel.reconstructed_attention` to get the bridge's own attention back. Checkpoint files
are checked by :mod:`normgrowth.checkpoint_files`.

Model facts live in one frozen :class:`ModelConfig`, read at load time from the bridge's config, the
bridge's block layout, HF's config and the live normalisation modules. Architecture differences live
in declarative tables:

* :data:`SITE_HOOKS` maps an abstract site (``resid_pre``, ``attn_out``, ``z`` ...) to the bridge's
  hook name, the same for every family; :data:`SITE_REQUIRES` names the config fact a site needs;
* :data:`FAMILIES` (:mod:`normgrowth.families`) maps an HF architecture to what no config says (the
  family's name, and checkpoints to refuse). Supporting a family the bridge wraps is one row there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from .checkpoint_files import (  # noqa: F401  (public names also importable from normgrowth.models)
    GGUFHeader, check_checkpoint_files, config_field_of, first_line, read_gguf_header, safetensors_errors,
    safetensors_shapes, unmappable_config, weights_error)
from .errors import NormgrowthError
from .families import FAMILIES, NON_CAUSAL_SUFFIXES, Family, Refusal, supported_architecture  # noqa: F401
from .native_attention import use_native_attention
from .sources import (  # noqa: F401
    NAMED_MODELS, _hub_reachable, _looks_like_path, dequantised_folder, load_config, resolve_source)

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
        source_format: ``"hf"`` (a Hugging Face checkpoint) or ``"gguf"`` (a GGUF file, dequantised by
            transformers: every statistic describes the dequantised weights).
        quantization: the GGUF file's quantisation (``general.file_type``, e.g. ``"Q4_1"``); None for "hf".
        quantized_tensors: ``(ggml type, count)`` of the GGUF file's stored tensors; empty for "hf".
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
    source_format: str = "hf"
    quantization: Optional[str] = None
    quantized_tensors: tuple[tuple[str, int], ...] = ()

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
    # attention bridges switched to the HF module's own attention (see native_attention.py)
    native_attention: tuple = field(default=(), repr=False)

    @property
    def source(self) -> dict[str, Any]:
        """Where the weights came from, for result metadata: ``{"format": "hf"}``, or for a GGUF file
        ``{"format": "gguf", "quantization", "tensor_types", "weights": "dequantised to <dtype>"}``."""
        if self.config.source_format != "gguf":
            return {"format": self.config.source_format}
        return {"format": "gguf", "quantization": self.config.quantization,
                "tensor_types": dict(self.config.quantized_tensors),
                "weights": f"dequantised to {str(self.dtype).replace('torch.', '')}"}

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

    def _block_layers(self) -> list:
        """The HF layer each bridge block wraps, or [] when some block wraps none (nothing can be replayed)."""
        layers = [getattr(blk, "original_component", None) for blk in getattr(self.bridge, "blocks", [])]
        return layers if layers and all(layer is not None for layer in layers) else []

    @contextlib.contextmanager
    def record_blocks(self, store: dict) -> Iterator[None]:
        """Record what each block's HF layer returns in this pass as ``store[layer]`` (for :meth:`replay_blocks`)."""
        def keep(layer: int) -> Callable:
            def hook(module: Any, args: Any, output: Any) -> None:
                store[layer] = output
            return hook

        handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(self._block_layers())]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def replay_blocks(self, store: Optional[dict], n_blocks: int) -> Iterator[None]:
        """Blocks ``0 .. n_blocks - 1`` return copies of their recorded outputs (:meth:`record_blocks`) instead of
        computing them; always restored on exit.

        Exact when this pass would compute those blocks from the same tokens with nothing inside them changed
        (the prefix of a pass whose edits all lie in later blocks). The block-level stream hooks (``resid_pre``,
        ``resid_post``) still fire; the hooks inside a replayed block do not. With ``store`` None, on a model
        whose blocks wrap no HF layer, and from a block missing from ``store`` on, blocks are computed as usual.
        """
        def replay(output: Any) -> Callable:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if isinstance(output, tuple):
                    return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in output)
                return output.clone()
            return forward

        patched = []
        for i, layer in enumerate(self._block_layers()[:max(0, int(n_blocks))] if store else []):
            if i not in store:
                break
            patched.append((layer, layer.__dict__.get("forward")))
            layer.__dict__["forward"] = replay(store[i])
        try:
            yield
        finally:
            for layer, own in patched:
                if own is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.__dict__["forward"] = own

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


def load_model(spec: str, device: Any = None, dtype: Any = None, revision: Optional[str] = None,
               device_map: Any = None) -> LoadedModel:
    """Load ``spec`` and wrap it in a TransformerLens bridge.

    ``spec``: a hub name, a local HF checkpoint directory, a ``.gguf`` file (or a folder holding exactly
    one), or a name from :data:`normgrowth.sources.NAMED_MODELS` such as ``"smollm2-135m"``. A GGUF file
    is dequantised by transformers once and read from its float32 copy afterwards
    (:func:`normgrowth.sources.dequantised_folder`), then cast to ``dtype``.
    ``device_map`` (e.g. ``"auto"``) spreads a model over several GPUs through accelerate; then
    ``device`` is ignored and inputs go to the embedding's device. A local checkpoint's files are
    checked first (:func:`check_checkpoint_files`).
    """
    spec = str(spec)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device) if device_map is None else None
    source = resolve_source(spec)
    gguf_header = None
    files = spec
    if source.format == "gguf":
        folder, gguf_header = dequantised_folder(source.path)
        files, revision = str(folder), None
    config = load_config(files, revision)
    arch = supported_architecture(spec, config)
    refuse = FAMILIES[arch].refuse
    if refuse is not None and getattr(config, refuse.hf_field, None) == refuse.value:
        raise NormgrowthError(f"model {spec!r} {refuse.reason}.")

    from transformers import AutoModelForCausalLM

    local = Path(os.path.expanduser(files)).is_dir()
    if local:
        check_checkpoint_files(Path(os.path.expanduser(files)), config)
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
            hf_model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(files) if local else files, **kwargs)
    except KeyError as err:  # a config value transformers has no implementation for (e.g. an unknown rope type)
        raise unmappable_config(spec, arch, config, err) from None
    except (OSError, ValueError, RuntimeError, *safetensors_errors()) as err:
        raise weights_error(spec, Path(os.path.expanduser(files)) if local else None, err) from None
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    if dev is not None:
        hf_model = hf_model.to(dev)
    hf_model.eval()
    tokenizer = _load_tokenizer(files if not local else os.path.expanduser(files), revision)
    try:
        bridge = _build_bridge(hf_model, arch, spec)
    except KeyError as err:
        raise unmappable_config(spec, arch, config, err) from None
    model_cfg = model_config(spec, revision, arch, hf_model, bridge, _bos_id(config, tokenizer))
    if gguf_header is not None:
        model_cfg = dataclasses.replace(model_cfg, source_format="gguf", quantization=gguf_header.file_type,
                                        quantized_tensors=tuple(gguf_header.tensor_types.items()))
    if model_cfg.ln_free and torch_dtype == torch.float16:
        raise NormgrowthError(f"model {spec!r} is an LN-free checkpoint whose stored LayerNorm weights "
                              "(about 1e6) overflow float16: use --dtype float32 or bfloat16.")
    return LoadedModel(config=model_cfg, hf_model=hf_model, bridge=bridge, tokenizer=tokenizer,
                       device=hf_model.get_input_embeddings().weight.device, dtype=torch_dtype,
                       native_attention=tuple(use_native_attention(bridge)))


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
        field_name = config_field_of(err)
        what = f"its config field {field_name!r}" if field_name else f"its config ({first_line(err)})"
        raise NormgrowthError(f"model {spec!r} ({arch}) cannot be mapped by the TransformerLens bridge because of "
                              f"{what}: use a checkpoint whose config the bridge supports.") from None
    finally:
        tl_logger.setLevel(level)


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


