"""Reading a causal LM for the fused decoder (core/decoder.py): whether it is Llama-shaped, and
its weights in the layout the decoder computes with.

Llama-shaped is decided by the modules present, never by the class name: a decoder
(`get_decoder()`) with token embeddings, `layers`, a final RMS norm and a rotary embedding; each
layer exactly an attention block (q_proj, k_proj, v_proj, o_proj, optionally per-head q_norm and
k_norm), a SiLU-gated MLP (gate_proj, up_proj, down_proj) and an RMS norm before each. That is
Llama, SmolLM, Mistral, Qwen2/2.5 (q/k/v biases), Qwen3 (q/k norms) and more, with tied or
untied embeddings. A model with anything else (extra norms as in Gemma 2 or OLMo 2, a GELU MLP,
scaled embeddings, residuals or logits as in Gemma and Granite, soft-capped scores, rotary tables
that depend on the length, a sliding window shorter than a slot) gets a reason from
`fused_reason`, and the decoder runs the model's own forward instead.

A peft LoRA model is read through its adapters: each wrapped linear's weight is W + scale * B @ A
(what DeepSpeed's Hybrid Engine does before generating), computed into the decoder's copy; the
model itself is not changed. DoRA, adapter biases and adapters on the embeddings are not merged
(those models run their own forward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP_PARTS = {"gate_proj", "up_proj", "down_proj"}
# config values that change the arithmetic of an otherwise Llama-shaped model
SCALING_OPTIONS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                   "logits_scaling", "attn_logit_softcapping", "final_logit_softcapping")
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def base_model(model):
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_reason(model, max_len: int | None = None) -> str | None:
    """None when the fused decoder computes exactly what this model computes, else why not."""
    model = base_model(model)
    cfg = model.config
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, part) for part in parts):
        return f"{type(model).__name__} has no Llama-shaped decoder (embeddings, layers, norm, rotary)"
    activation = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
    if activation not in ("silu", "swish"):
        return f"its MLP activation is {activation}, not SiLU"
    scaled = [name for name in SCALING_OPTIONS if getattr(cfg, name, None) not in (None, 1, 1.0)]
    if scaled or getattr(decoder.embed_tokens, "embed_scale", 1.0) != 1.0:
        return f"it scales its arithmetic ({', '.join(scaled) or 'embed_scale'})"
    if hasattr(decoder.embed_tokens, "base_layer"):
        return "LoRA adapters on the embeddings are not merged"
    rope_type = getattr(decoder.rotary_emb, "rope_type", "default")
    if rope_type in LENGTH_DEPENDENT_ROPE or getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return f"its rotary embedding ({rope_type}, partial factor " \
               f"{getattr(cfg, 'partial_rotary_factor', 1.0)}) is not a fixed full-width table"
    window = sliding_window(cfg)
    if window is not None and max_len is not None and max_len > window:
        return f"its sliding window ({window} tokens) is shorter than a slot ({max_len})"
    if not _is_rms_norm(decoder.norm):
        return f"its final norm ({type(decoder.norm).__name__}) is not an RMS norm"
    for layer in decoder.layers:
        reason = _layer_reason(layer)
        if reason:
            return reason
    head = model.get_output_embeddings()
    if head is None or getattr(base_layer(head), "bias", None) is not None:
        return "its output head is missing or has a bias"
    return _lora_reason(model)


def _layer_reason(layer) -> str | None:
    names = _parts(layer)
    if names != LAYER_PARTS:
        return f"its layers hold {sorted(names)}, not exactly {sorted(LAYER_PARTS)}"
    attention, mlp = _parts(layer.self_attn), _parts(layer.mlp)
    if attention not in (ATTENTION_PARTS, ATTENTION_PARTS | {"q_norm", "k_norm"}):
        return f"its attention holds {sorted(attention)}, not q/k/v/o projections (and q/k norms)"
    if mlp != MLP_PARTS:
        return f"its MLP holds {sorted(mlp)}, not gate/up/down projections"
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    norms += [getattr(layer.self_attn, name) for name in ("q_norm", "k_norm") if name in attention]
    if not all(_is_rms_norm(norm) for norm in norms):
        return "a norm in its layers is not an RMS norm"
    return None


def _parts(module) -> set[str]:
    """Names of the child modules that hold parameters (activations and dropout hold none)."""
    return {name for name, child in module.named_children() if any(True for _ in child.parameters())}


def _is_rms_norm(norm) -> bool:
    """weight * x / rms(x), checked on a probe where the weight is materialised (under ZeRO-3 it
    may be a placeholder outside a gather: then by its name and attributes alone)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    if eps is None or weight is None or not type(norm).__name__.endswith("RMSNorm"):
        return False
    if weight.dim() != 1 or weight.numel() == 0:
        return True
    probe = torch.linspace(-2.0, 3.0, weight.numel(), device=weight.device)[None]
    with torch.no_grad():
        # its forward without the module's hooks: under ZeRO-3 they would release the gathered
        # weights on the way out, leaving the decoder built next with empty placeholders
        got = type(norm).forward(norm, probe.to(weight.dtype)).float()
        expected = weight.float() * torch.rms_norm(probe, (weight.numel(),), None, eps)
    return torch.allclose(got, expected, rtol=1e-2, atol=1e-2)


def _lora_reason(model) -> str | None:
    for module in model.modules():
        if not hasattr(module, "lora_A"):
            continue
        adapters = getattr(module, "active_adapters", [])
        if any(getattr(module, "use_dora", {}).get(name) for name in adapters):
            return "DoRA adapters are not merged"
        if any(getattr(module, "lora_bias", {}).get(name) for name in adapters):
            return "LoRA adapter biases are not merged"
    return None


def sliding_window(cfg) -> int | None:
    """The attention window of a model that uses one (Mistral; Qwen with use_sliding_window)."""
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


# ---- reading the weights ------------------------------------------------------------------------

def base_layer(module):
    """The linear inside a LoRA wrapper (the module itself otherwise)."""
    return getattr(module, "base_layer", module)


def merged_linear(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias or None) of a linear layer, active LoRA adapters folded in."""
    base = base_layer(module)
    weight = base.weight.detach()
    if base is not module and not module.disable_adapters:
        for name in module.active_adapters:
            if name in module.lora_A and name not in module.merged_adapters:
                weight = weight + module.get_delta_weight(name).detach().to(weight.dtype)  # scale * B @ A
    return weight, None if base.bias is None else base.bias.detach()


def fuse(modules, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (weight, bias) whose output is the outputs of `modules` side by side; a bias of
    zeros stands in for a module without one when another has one."""
    pairs = [merged_linear(m) for m in modules]
    # one module: its own tensor where the dtype matches (no copy); several: one new matrix
    weight = (pairs[0][0] if len(pairs) == 1 else torch.cat([w for w, _ in pairs])).to(dtype)
    if all(b is None for _, b in pairs):
        return weight, None
    bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in pairs])
    return weight, bias.to(dtype)


@dataclass
class LayerWeights:
    qkv: tuple[torch.Tensor, torch.Tensor | None]      # (q + k + v features, H) and its bias
    o: tuple[torch.Tensor, torch.Tensor | None]        # (H, heads * D)
    gate_up: tuple[torch.Tensor, torch.Tensor | None]  # (2 * intermediate, H)
    down: tuple[torch.Tensor, torch.Tensor | None]     # (H, intermediate)
    ln_attn: torch.Tensor                              # (H,)
    ln_mlp: torch.Tensor                               # (H,)
    qk_norm: torch.Tensor | None                       # (heads + kv_heads, D): per-head q/k norm weights


def read_layer(layer, heads: int, kv_heads: int, dtype) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    qk_norm = None
    if hasattr(attn, "q_norm"):
        q_norm, k_norm = attn.q_norm.weight.detach(), attn.k_norm.weight.detach()
        qk_norm = torch.cat([q_norm.expand(heads, -1), k_norm.expand(kv_heads, -1)]).to(dtype)
    return LayerWeights(qkv=fuse([attn.q_proj, attn.k_proj, attn.v_proj], dtype),
                        o=fuse([attn.o_proj], dtype),
                        gate_up=fuse([mlp.gate_proj, mlp.up_proj], dtype),
                        down=fuse([mlp.down_proj], dtype),
                        ln_attn=layer.input_layernorm.weight.detach().to(dtype),
                        ln_mlp=layer.post_attention_layernorm.weight.detach().to(dtype),
                        qk_norm=qk_norm)
