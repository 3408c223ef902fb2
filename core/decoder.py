"""The slot decoder: fast decoding on a preallocated KV cache of independent slots, shared by PPO
rollouts (train/rollout.py) and the server (serving/scheduler.py).

`SlotDecoder(model, slots, max_len)` holds a causal LM and a KV cache of `slots` rows, each up to
`max_len` positions. `prefill(slot_ids, prompts)` (re)starts slots with their prompts and
`decode(slot_ids, tokens)` appends one token to each listed slot; both return next-token logits.
Slots not listed are left alone, so a new sequence can join between decode steps of the others
(continuous batching) and a finished one costs nothing.

For Llama-family models (`FUSED_ARCHITECTURES`) the forward pass is our own:
- weights read once from the model and laid out for the CPU matrix library (oneDNN pre-packed
  bf16 weights: eager `F.linear` re-lays out the weight on every call), with the query/key/value
  and gate/up projections fused into one matrix product each;
- the cache is written in place; the decoding slots are kept in the cache's first rows, so a
  decode step's attention reads plain slices of it (no gather), one query token against its own
  slot's keys with grouped KV heads;
- prompts are prefilled in groups of similar length (right-padded, causal), to limit padding.
Any other architecture runs the model's own forward with one Hugging Face cache per slot
(correct, not fast). Single-threaded: call it from one thread.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.hardware import bf16_packing

FUSED_ARCHITECTURES = {"LlamaForCausalLM"}
PREFILL_TOKENS = 4096  # rows x padded length of one prefill forward
SMALL_BATCH = 16  # up to this many slots the cache and attention are kept in fp32


def _packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and bf16_packing()


class Linear:
    """y = x W^T (+ b) with W pre-packed once for oneDNN where it can be (CPU, bf16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        self.out_features = weight.shape[0]
        self.packed = _packable(weight)
        self.weight = (torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 16)
                       if self.packed else weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x W^T (+ b), the addition fused into the matrix product where packed."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return residual + F.linear(x, self.weight, self.bias)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # rounded as the model's own RMSNorm (fp32 statistics, bf16 before the weight), so that
    # greedy decoding matches the model's own forward token for token
    return weight * torch.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x cos + rotate_half(x) sin, where rotate_half(x) = roll(x) * (-1 | +1)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


class _Layer:
    """One decoder layer's weights, copied out of the model in `dtype` and fused."""

    def __init__(self, layer, dtype: torch.dtype):
        attn, mlp = layer.self_attn, layer.mlp

        def take(*tensors):
            return None if tensors[0] is None else torch.cat([t.detach() for t in tensors]).to(dtype)

        self.qkv = Linear(take(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
                          take(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias))
        self.o = Linear(take(attn.o_proj.weight), take(attn.o_proj.bias))
        self.gate_up = Linear(take(mlp.gate_proj.weight, mlp.up_proj.weight))
        self.down = Linear(take(mlp.down_proj.weight))
        self.ln_attn = take(layer.input_layernorm.weight)
        self.ln_mlp = take(layer.post_attention_layernorm.weight)


def fused_reason(model) -> str | None:
    """None when the fused path can run this model, else why not."""
    cfg = model.config
    if type(model).__name__ not in FUSED_ARCHITECTURES:
        return f"no fused decoder for {type(model).__name__}"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "the fused decoder needs a SiLU MLP without bias"
    if any(type(m).__name__.startswith("Lora") for m in model.modules()):
        return "LoRA layers are not merged"
    return None


class _FusedLlama:
    """Our forward pass over a slot cache; rows 0..n-1 of the cache are the decoding slots."""

    def __init__(self, model, rows: int, max_len: int, dtype: torch.dtype | None = None):
        cfg = model.config
        self.dtype = dtype or next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.embed = model.get_input_embeddings().weight.detach().to(self.dtype)
        self.lm_head = Linear(model.get_output_embeddings().weight.detach().to(self.dtype))
        self.norm = model.model.norm.weight.detach().to(self.dtype)
        self.layers = [_Layer(layer, self.dtype) for layer in model.model.layers]
        positions = torch.arange(max_len + 1, device=self.device)[None]
        with torch.no_grad():
            probe = torch.zeros(1, device=self.device, dtype=torch.float32)
            cos, sin = model.model.rotary_emb(probe, positions)
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(sin)
        # (max_len + 1, D) tables; one extra position so every slot index stays in range
        self.cos, self.signed_sin = cos[0].to(self.dtype), (sin[0] * sign).to(self.dtype)
        layers, kv, d = len(self.layers), self.kv_heads, self.head_dim
        # keys are stored transposed, (D, T) per head: a decode step's q K^T then reads a plain
        # strided matrix, which the matrix library handles far faster than a sliced (T, D) one
        # small batches: bf16 products of these tiny matrices cost more than fp32 ones (measured)
        self.cache_dtype = torch.float32 if rows <= SMALL_BATCH else self.dtype
        self.keys = torch.zeros((layers, rows, kv, d, max_len + 1), dtype=self.cache_dtype, device=self.device)
        self.values = torch.zeros((layers, rows, kv, max_len + 1, d), dtype=self.cache_dtype, device=self.device)

    def swap_rows(self, a: int, b: int, width: int) -> None:
        for cache in (self.keys.transpose(-1, -2), self.values):  # both as (..., T, D) views
            held = cache[:, a, :, :width].clone()
            cache[:, a, :, :width] = cache[:, b, :, :width]
            cache[:, b, :, :width] = held

    def _qkv(self, layer: _Layer, h: torch.Tensor, cos, signed_sin):
        """(..., H) hidden states -> rotated q (..., heads, D), rotated k and v (..., kv_heads, D)."""
        qkv = layer.qkv(_rms_norm(h, layer.ln_attn, self.eps))
        rotated_width = (self.heads + self.kv_heads) * self.head_dim
        qk = _rope(qkv[..., :rotated_width].unflatten(-1, (-1, self.head_dim)), cos, signed_sin)
        v = qkv[..., rotated_width:].unflatten(-1, (-1, self.head_dim))
        return qk[..., :self.heads, :], qk[..., self.heads:, :], v

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        gate_up = layer.gate_up(_rms_norm(h, layer.ln_mlp, self.eps))
        half = gate_up.shape[-1] // 2
        return layer.down.add_to(F.silu(gate_up[..., :half]) * gate_up[..., half:], h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms_norm(h, self.norm, self.eps)).float()

    def prefill(self, rows: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(m, P) right-padded prompts into cache rows `rows`; (m, V) logits after each prompt."""
        m, width = ids.shape
        h = self.embed[ids]  # (m, P, H)
        cos, signed_sin = self.cos[:width, None], self.signed_sin[:width, None]  # (P, 1, D)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            q, k, v = self._qkv(layer, h, cos, signed_sin)  # (m, P, heads, D)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (m, kv_heads, P, D)
            keys[rows, :, :, :width] = k.transpose(-1, -2).to(self.cache_dtype)
            values[rows, :, :width] = v.to(self.cache_dtype)
            # right padding: a real token never sees the padding after it
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True,
                                                  scale=self.scale, enable_gqa=True)
            h = layer.o.add_to(attn.transpose(1, 2).flatten(2), h)
            h = self._mlp(layer, h)
        last = h[torch.arange(m, device=self.device), lengths - 1]
        return self._logits(last)

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """One token for each of cache rows 0..n-1 at positions `pos` (n,); (n, V) logits of rows
        `order` (the final hidden states are reordered, 576 values a row instead of 49k logits)."""
        n, d = tokens.shape[0], self.head_dim
        width = int(pos.max()) + 1
        rows = torch.arange(n, device=self.device)
        h = self.embed[tokens]  # (n, H)
        cos, signed_sin = self.cos[pos, None], self.signed_sin[pos, None]  # (n, 1, D)
        # (n * kv_heads, 1, T) additive mask: a row sees its own positions up to the new token
        hidden = (torch.arange(width, device=self.device) > pos[:, None])[:, None, None]
        mask = torch.zeros(hidden.shape, dtype=self.cache_dtype, device=self.device)
        mask = mask.masked_fill(hidden, float("-inf"))
        mask = mask.expand(n, self.kv_heads, 1, width).reshape(n * self.kv_heads, 1, width)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            q, k, v = self._qkv(layer, h, cos, signed_sin)  # q (n, heads, D); k, v (n, kv_heads, D)
            keys[rows, :, :, pos] = k.to(self.cache_dtype)
            values[rows, :, pos] = v.to(self.cache_dtype)
            # grouped KV heads: the query heads of one KV head form the rows of one matrix product
            q = q.reshape(n * self.kv_heads, -1, d).to(self.cache_dtype)  # (n * kv_heads, groups, D)
            past_keys = keys[:n, :, :, :width].reshape(n * self.kv_heads, d, width)  # K^T, a view
            scores = torch.baddbmm(mask, q, past_keys, alpha=self.scale)
            probs = torch.softmax(scores, dim=-1)
            attn = torch.bmm(probs, values[:n, :, :width].reshape(n * self.kv_heads, width, d))
            h = layer.o.add_to(attn.view(n, -1).to(self.dtype), h)
            h = self._mlp(layer, h)
        return self._logits(h[order])


class _PerSlotHF:
    """Any architecture: the model's own forward, one Hugging Face cache per slot, decoded one
    slot at a time."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.caches: dict[int, object] = {}

    def prefill(self, slot: int, prompt: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.caches[slot] = out.past_key_values
        return out.logits[0, -1].float()

    def decode(self, slot: int, token: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token.view(1, 1), past_key_values=self.caches[slot], use_cache=True)
        self.caches[slot] = out.past_key_values
        return out.logits[0, -1].float()


class SlotDecoder:
    """A causal LM with a preallocated KV cache of `slots` independent sequences of up to
    `max_len` tokens each. `dtype` (fused path only) converts the weights it lays out, e.g. a
    bf16 decoder from an fp32 model; the model itself is not changed. `fused=False` runs the
    model's own forward even where the fused path could."""

    def __init__(self, model, slots: int, max_len: int, dtype: torch.dtype | None = None,
                 fused: bool = True):
        self.model, self.slots, self.max_len = model, slots, max_len
        self.reason = fused_reason(model) if fused else "the model's own forward was asked for"
        self.fused = self.reason is None
        self._lengths = [0] * slots
        self._row_of = list(range(slots))  # slot -> cache row (fused path)
        self._slot_of = list(range(slots))  # cache row -> slot
        self._impl = _FusedLlama(model, slots, max_len, dtype) if self.fused else _PerSlotHF(model)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    @torch.no_grad()
    def prefill(self, slot_ids: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """(n, V) float32 logits of the token after each prompt; each slot restarts at position 0."""
        for slot, prompt in zip(slot_ids, prompts):
            if not 0 < len(prompt) <= self.max_len:
                raise ValueError(f"a prompt of {len(prompt)} tokens does not fit a slot of {self.max_len}")
            self._lengths[slot] = len(prompt)
        if not self.fused:
            return torch.stack([self._impl.prefill(s, p) for s, p in zip(slot_ids, prompts)])
        logits = [None] * len(prompts)
        for group in prefill_groups([len(p) for p in prompts]):
            width = max(len(prompts[i]) for i in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, :len(prompts[i])] = torch.tensor(prompts[i])
            rows = torch.tensor([self._row_of[slot_ids[i]] for i in group])
            lengths = torch.tensor([len(prompts[i]) for i in group])
            dev = self._impl.device
            for i, row_logits in zip(group, self._impl.prefill(rows.to(dev), ids.to(dev), lengths.to(dev))):
                logits[i] = row_logits
        return torch.stack(logits)

    @torch.no_grad()
    def decode(self, slot_ids: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (n,) to the listed slots; (n, V) float32 logits of the next token."""
        for slot in slot_ids:
            if self._lengths[slot] >= self.max_len:
                raise ValueError(f"slot {slot} is full ({self.max_len} tokens)")
        if not self.fused:
            logits = torch.stack([self._impl.decode(s, t) for s, t in zip(slot_ids, tokens)])
            for slot in slot_ids:
                self._lengths[slot] += 1
            return logits
        dev = self._impl.device
        n = len(slot_ids)
        order = torch.tensor(self._gather_to_front(slot_ids), device=dev)  # row of each listed slot, < n
        by_row = torch.empty(n, dtype=torch.long, device=dev).index_copy_(0, order, tokens.to(dev))
        pos = torch.tensor([self._lengths[self._slot_of[row]] for row in range(n)], device=dev)
        logits = self._impl.decode(by_row, pos, order)
        for slot in slot_ids:
            self._lengths[slot] += 1
        return logits

    def _gather_to_front(self, slot_ids: list[int]) -> list[int]:
        """Move the listed slots into cache rows 0..n-1 (swapping out whoever is there)."""
        n = len(slot_ids)
        listed = set(slot_ids)
        free_rows = [row for row in range(n) if self._slot_of[row] not in listed]
        for slot in slot_ids:
            if self._row_of[slot] >= n:
                self._swap(self._row_of[slot], free_rows.pop())
        return [self._row_of[slot] for slot in slot_ids]

    def _swap(self, a: int, b: int) -> None:
        slot_a, slot_b = self._slot_of[a], self._slot_of[b]
        width = max(self._lengths[slot_a], self._lengths[slot_b])
        if width:
            self._impl.swap_rows(a, b, width)
        self._slot_of[a], self._slot_of[b] = slot_b, slot_a
        self._row_of[slot_a], self._row_of[slot_b] = b, a


def prefill_groups(lengths: list[int], budget: int = PREFILL_TOKENS) -> list[list[int]]:
    """Indices grouped by similar length so that rows x longest stays within `budget` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, group = [], []
    for i in order:  # ascending, so the newest member is the group's longest
        if group and (len(group) + 1) * lengths[i] > budget:
            groups.append(group)
            group = []
        group.append(i)
    return groups + [group] if group else groups
