"""The one patch of TransformerLens internals: attention bridges that run the HF module's own kernel.

For GPT-2, GPT-NeoX and Llama the TransformerLens 4.x bridge replaces the HF attention by its own eager
re-implementation (it materialises the ``[batch, head, pos, pos]`` scores for ``hook_attn_scores`` /
``hook_pattern``). None of normgrowth's sites needs those hooks, so :func:`use_native_attention` makes
each such attention bridge call the wrapped HF attention module itself (SDPA as configured), with the
output projection routed through the bridge's ``o`` so that ``hook_z`` still fires.

What this relies on in TransformerLens (re-check these at an upgrade; ``tests/test_models.py`` compares
logits and the ``z`` / ``attn_out`` sites with plain HF for every family):

* the bridge classes named in :data:`RECONSTRUCTING_ATTENTION` re-implement attention eagerly;
* an attention bridge keeps the HF module as ``_original_component`` and its output projection as the
  child ``o``, whose ``original_component`` is the HF projection module and whose ``hook_in`` is ``hook_z``;
* ``AttentionBridge.forward`` calls the HF module and fires ``hook_in`` / ``hook_out`` around it;
* an instance-dict ``forward`` overrides the class's (the bridge's ``__setattr__`` would forward it).

:meth:`normgrowth.models.LoadedModel.reconstructed_attention` undoes the patch inside a block.
"""

from __future__ import annotations

import types
from typing import Any

# Attention bridges that re-implement attention eagerly instead of calling the HF module.
RECONSTRUCTING_ATTENTION = ("JointQKVAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge",
                             "PositionEmbeddingsAttentionBridge")


def native_attention_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
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


def use_native_attention(bridge: Any) -> list:
    """Switch every reconstructing attention bridge to :func:`native_attention_forward`.

    Only where the HF attention's output projection is the bridge's ``o`` (or the module ``o`` wraps),
    so that ``hook_z`` keeps firing. Returns the switched bridges.
    """
    switched = []
    for module in bridge.modules():
        if type(module).__name__ not in RECONSTRUCTING_ATTENTION:
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
        module.__dict__["forward"] = types.MethodType(native_attention_forward, module)
        switched.append(module)
    return switched
