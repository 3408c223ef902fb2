"""The slot decoder: fast decoding on a preallocated KV cache of independent slots, shared by PPO
rollouts (train/rollout.py) and the server (serving/scheduler.py).

`SlotDecoder(model, slots, max_len)` holds a causal LM and a KV cache of `slots` rows, each up to
`max_len` positions. `prefill(slot_ids, prompts)` (re)starts slots with their prompts and
`decode(slot_ids, tokens)` appends one token to each listed slot; both return next-token logits.
Slots not listed are left alone, so a new sequence can join between decode steps of the others
(continuous batching) and a finished one costs nothing.

For Llama-shaped models (core/weights.py decides by the modules present: Llama, Mistral, Qwen2,
Qwen3, LoRA adapters merged) the forward pass is our own:
- weights read once from the model, the query/key/value and gate/up projections fused into one
  matrix product each, every product through the kernel measured fastest here for its size
  (core/kernels.py: pre-packed fp32 or bf16 weights for the CPU libraries, or plain F.linear);
- the cache is written in place; the decoding slots are kept in the cache's first rows, so a
  decode step's attention reads plain slices of it (no gather), one query token against its own
  slot's keys with grouped KV heads;
- prompts are prefilled in groups of similar length (right-padded, causal), to limit padding;
  the prefix that all prompts of a call share (the chat template's system prompt: a quarter to a
  half of a rollout's prompt tokens) is computed once and its cache copied to every slot.
Any other model runs its own forward over all listed slots as one left-padded batch (correct
for any model with a standard Hugging Face cache; it copies the listed slots' cache each step,
so it is slower), and the reason is logged once. Single-threaded: call it from one thread.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from core.kernels import Linear
from core.sampling import pad
from core.weights import base_model, fused_reason, merged_linear, read_layer

__all__ = ["SlotDecoder", "fused_reason", "prefill_groups"]

PREFILL_TOKENS = 4096  # rows x padded length of one prefill forward
SMALL_BATCH = 16  # up to this many slots the cache and attention are kept in fp32
SHARED_PREFIX_MIN = 8  # a common prefix of prompts prefilled together is computed once from this length
log = logging.getLogger(__name__)
_logged_reasons: set[str] = set()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dim() == 1:  # one call, the same bits (measured)
        return torch.rms_norm(x, weight.shape, weight, eps)
    # rounded as the model's own RMSNorm (fp32 statistics, cast back before the weight), so that
    # greedy decoding matches the model's own forward token for token
    return weight * torch.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x cos + rotate_half(x) sin, where rotate_half(x) = roll(x) * (-1 | +1)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


class _Layer:
    """One decoder layer's weights, read in `dtype` (core/weights.py) and laid out for a kernel."""

    def __init__(self, layer, heads: int, kv_heads: int, dtype: torch.dtype, kernel: str | None):
        weights = read_layer(layer, heads, kv_heads, dtype)
        self.qkv = Linear(*weights.qkv, kernel=kernel)
        self.o = Linear(*weights.o, kernel=kernel)
        self.gate_up = Linear(*weights.gate_up, kernel=kernel)
        self.down = Linear(*weights.down, kernel=kernel)
        self.ln_attn, self.ln_mlp, self.qk_norm = weights.ln_attn, weights.ln_mlp, weights.qk_norm


class _Fused:
    """Our forward pass over a slot cache; rows 0..n-1 of the cache are the decoding slots."""

    def __init__(self, model, rows: int, max_len: int, dtype: torch.dtype | None = None,
                 kernel: str | None = None):
        model = base_model(model)
        cfg, decoder = model.config, model.get_decoder()
        self.dtype = dtype or next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        attention = decoder.layers[0].self_attn
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attention, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = getattr(attention, "scaling", self.head_dim ** -0.5)
        self.eps = cfg.rms_norm_eps
        self.embed = decoder.embed_tokens.weight.detach().to(self.dtype)
        self.lm_head = Linear(merged_linear(model.get_output_embeddings())[0].to(self.dtype), kernel=kernel)
        self.norm = decoder.norm.weight.detach().to(self.dtype)
        self.layers = [_Layer(layer, self.heads, self.kv_heads, self.dtype, kernel) for layer in decoder.layers]
        positions = torch.arange(max_len + 1, device=self.device)[None]
        with torch.no_grad():
            probe = torch.zeros(1, device=self.device, dtype=torch.float32)
            cos, sin = decoder.rotary_emb(probe, positions)
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
        qk = qkv[..., :rotated_width].unflatten(-1, (-1, self.head_dim))
        if layer.qk_norm is not None:  # Qwen3: an RMS norm over each head's features, before rotary
            qk = _rms_norm(qk, layer.qk_norm, self.eps)
        qk = _rope(qk, cos, signed_sin)
        v = qkv[..., rotated_width:].unflatten(-1, (-1, self.head_dim))
        return qk[..., :self.heads, :], qk[..., self.heads:, :], v

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        gate_up = layer.gate_up(_rms_norm(h, layer.ln_mlp, self.eps))
        half = gate_up.shape[-1] // 2
        return layer.down.add_to(F.silu(gate_up[..., :half]) * gate_up[..., half:], h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms_norm(h, self.norm, self.eps)).float()

    def prefill(self, rows: list[int], prompts: list[list[int]], start: int = 0) -> torch.Tensor:
        """Prompts into cache rows `rows` from position `start` (right-padded, one forward); (m, V)
        logits after each. With `start` > 0 each row's cache already holds positions 0..start-1
        (a shared prefix) and the new tokens attend to them."""
        ids, _ = pad(prompts, 0)
        ids = ids.to(self.device)  # (m, P)
        rows = torch.tensor(rows, device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        m, width = ids.shape
        end = start + width
        h = self.embed[ids]  # (m, P, H)
        cos, signed_sin = self.cos[start:end, None], self.signed_sin[start:end, None]  # (P, 1, D)
        # query i (position start + i) sees positions up to its own; right padding: a real
        # token never sees the padding after it
        causal = torch.ones(width, end, dtype=torch.bool, device=self.device).tril(start) if start else None
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            q, k, v = self._qkv(layer, h, cos, signed_sin)  # (m, P, heads, D)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (m, kv_heads, P, D)
            keys[rows, :, :, start:end] = k.transpose(-1, -2).to(self.cache_dtype)
            values[rows, :, start:end] = v.to(self.cache_dtype)
            if start:  # the prefix's keys and values from the cache, then the new ones
                k = keys[rows, :, :, :end].transpose(-1, -2).to(self.dtype)  # (m, kv_heads, start + P, D)
                v = values[rows, :, :end].to(self.dtype)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=causal,
                                                  is_causal=not start, scale=self.scale, enable_gqa=True)
            h = layer.o.add_to(attn.transpose(1, 2).flatten(2), h)
            h = self._mlp(layer, h)
        last = h[torch.arange(m, device=self.device), lengths - 1]
        return self._logits(last)

    def copy_prefix(self, source: int, rows: list[int], length: int) -> None:
        """Cache positions 0..length-1 of row `source` into each of `rows`."""
        self.keys[:, rows, :, :, :length] = self.keys[:, source, None, :, :, :length]
        self.values[:, rows, :, :length] = self.values[:, source, None, :, :length]

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """One token for each of cache rows 0..n-1 at positions `pos` (n,); (n, V) logits of rows
        `order` (the final hidden states are reordered, H values a row instead of V logits)."""
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


class _BatchedHF:
    """Any other model: its own forward, all listed slots as one batch. Each slot's keys and
    values live in preallocated per-layer tensors, one row per slot, position p at column p. A
    step gathers the listed rows right-aligned (left padding, as `generate` pads a batch) into a
    fresh Hugging Face cache, runs one forward with each row's own position and a padding mask,
    and writes each row's new key and value back."""

    def __init__(self, model, slots: int, max_len: int):
        self.model, self.slots, self.max_len = model, slots, max_len
        self.device = next(model.parameters()).device
        self.keys: list[torch.Tensor] = []  # per layer (slots, max_len, kv_heads, D), at the first prefill
        self.values: list[torch.Tensor] = []

    def _forward(self, ids, mask, positions, cache, **kwargs) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, **kwargs)
        return out.logits[:, -1].float()

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        from transformers import DynamicCache

        ids, mask = (t.to(self.device) for t in pad(prompts, 0, left=True))  # (m, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, logits_to_keep=1)
        real = mask.bool()
        slot_of_token = torch.tensor(rows, device=self.device)[:, None].expand_as(ids)[real]
        for layer, cached in enumerate(cache.layers):
            if len(self.keys) <= layer:
                _, kv_heads, _, d = cached.keys.shape
                shape = (self.slots, self.max_len, kv_heads, d)
                self.keys.append(cached.keys.new_zeros(shape))
                self.values.append(cached.values.new_zeros(shape))
            # (m, kv_heads, P, D) -> the real tokens' (kv_heads, D) at (slot, position)
            self.keys[layer][slot_of_token, positions[real]] = cached.keys.transpose(1, 2)[real]
            self.values[layer][slot_of_token, positions[real]] = cached.values.transpose(1, 2)[real]
        return logits

    def decode(self, slot_ids: list[int], tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        from transformers import DynamicCache

        rows = torch.tensor(slot_ids, device=self.device)
        pos = torch.tensor(lengths, device=self.device)  # (n,) each row's new position
        width = int(pos.max())
        # (n, W): the position each column holds, right-aligned; negative on the left padding
        columns = torch.arange(width, device=self.device)[None] - (width - pos)[:, None]
        real = columns >= 0
        columns = columns.clamp(min=0)
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            cache.update(keys[rows[:, None], columns].transpose(1, 2),
                         values[rows[:, None], columns].transpose(1, 2), layer)  # (n, kv_heads, W, D)
        mask = torch.cat([real, real.new_ones(len(slot_ids), 1)], 1).long()
        logits = self._forward(tokens.to(self.device)[:, None], mask, pos[:, None], cache)
        for layer, cached in enumerate(cache.layers):
            self.keys[layer][rows, pos] = cached.keys[:, :, -1]
            self.values[layer][rows, pos] = cached.values[:, :, -1]
        return logits


class SlotDecoder:
    """A causal LM with a preallocated KV cache of `slots` independent sequences of up to
    `max_len` tokens each. `dtype` (fused path only) converts the weights it lays out, e.g. a
    bf16 decoder from an fp32 model; the model itself is not changed. `fused=False` runs the
    model's own forward even where the fused path could; `kernel` (plain, mkl, onednn) forces
    one matrix-product kernel where it runs (core/kernels.py; default: the fastest per size)."""

    def __init__(self, model, slots: int, max_len: int, dtype: torch.dtype | None = None,
                 fused: bool = True, kernel: str | None = None):
        self.model, self.slots, self.max_len = model, slots, max_len
        self.reason = fused_reason(model, max_len) if fused else "the model's own forward was asked for"
        self.fused = self.reason is None
        if not self.fused and fused and self.reason not in _logged_reasons:
            _logged_reasons.add(self.reason)
            log.warning("slot decoder: the model's own forward, not the fused path: %s", self.reason)
        self._lengths = [0] * slots
        self._row_of = list(range(slots))  # slot -> cache row (fused path)
        self._slot_of = list(range(slots))  # cache row -> slot
        self._impl = _Fused(model, slots, max_len, dtype, kernel) if self.fused else _BatchedHF(model, slots, max_len)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    @torch.no_grad()
    def prefill(self, slot_ids: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """(n, V) float32 logits of the token after each prompt; each slot restarts at position 0."""
        for slot, prompt in zip(slot_ids, prompts):
            if not 0 < len(prompt) <= self.max_len:
                raise ValueError(f"a prompt of {len(prompt)} tokens does not fit a slot of {self.max_len}")
            self._lengths[slot] = len(prompt)
        row_of = self._row_of if self.fused else list(range(self.slots))
        start = self._prefill_shared_prefix([row_of[s] for s in slot_ids], prompts) if self.fused else 0
        logits = [None] * len(prompts)
        for group in prefill_groups([len(p) - start for p in prompts]):
            rows = [row_of[slot_ids[i]] for i in group]
            rest = [prompts[i][start:] for i in group]
            args = (rows, rest, start) if start else (rows, rest)  # (the fallback shares no prefix)
            for i, row_logits in zip(group, self._impl.prefill(*args)):
                logits[i] = row_logits
        return torch.stack(logits)

    def _prefill_shared_prefix(self, rows: list[int], prompts: list[list[int]]) -> int:
        """Prefill the prompts' common prefix (a chat template's system prompt, say) once, copy
        its cache to every row, and return its length (0 where too short to be worth it)."""
        length = len(os.path.commonprefix(prompts)) if len(prompts) > 1 else 0
        length = min(length, min(map(len, prompts)) - 1)  # each prompt keeps a token of its own
        if length < SHARED_PREFIX_MIN:
            return 0
        self._impl.prefill(rows[:1], [prompts[0][:length]])
        self._impl.copy_prefix(rows[0], rows[1:], length)
        return length

    @torch.no_grad()
    def decode(self, slot_ids: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (n,) to the listed slots; (n, V) float32 logits of the next token."""
        for slot in slot_ids:
            if self._lengths[slot] >= self.max_len:
                raise ValueError(f"slot {slot} is full ({self.max_len} tokens)")
        if self.fused:
            dev = self._impl.device
            n = len(slot_ids)
            order = torch.tensor(self._gather_to_front(slot_ids), device=dev)  # row of each listed slot, < n
            by_row = torch.empty(n, dtype=torch.long, device=dev).index_copy_(0, order, tokens.to(dev))
            pos = torch.tensor([self._lengths[self._slot_of[row]] for row in range(n)], device=dev)
            logits = self._impl.decode(by_row, pos, order)
        else:
            logits = self._impl.decode(slot_ids, tokens, [self._lengths[s] for s in slot_ids])
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
