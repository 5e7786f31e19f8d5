"""The decode step of Llama-shaped models (Llama, Mistral, Qwen2: SmolLM2, the default model), written out for the CPU.

transformers' forward of one token a row goes through ~5,600 operators for the 30 layers of the default model, and
through as much Python between them: masks built for the whole timeline, the cache's and the attention interface's
dispatch, each module's hooks. On a CPU at one or a few rows that was most of a step, more than the products. Here
the same arithmetic runs straight on the model's own weights, about 30 operators a layer:

- q, k and v as one product, gate and up as one (`_joined`: the original layers' weights become views of the joined
  ones, so no memory doubles, and transformers' forward, which prefill still runs, reads the same weights);
- the rotary embedding of the query and key heads together, the model's own rotary module computing cos and sin
  once a step for all layers;
- keys and values written into the in-place cache (kvcache.py) as transformers' forward writes them;
- attention by grouped query: the query heads that share a key/value head are one block of queries against it, so
  keys and values are not repeated per head; rows of about the same length attend together over their own columns
  (attention.py), with the batch's padding mask as it is (none at all where no column is padding), not widened to a
  float mask a step.

The runner checks a model's logits through this step against transformers' forward at start-up, as it does for
fused.py, and keeps transformers' where they differ.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .attention import Run, attend, runs
from .fused import prefill_mask
from .kvcache import KVCache
from .quant import Int4Linear

MODEL_TYPES = ("llama", "mistral", "qwen2")


def unsupported(model: Any) -> str | None:
    """Why this model's decode step cannot be written out here, or None if it can."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} (this step covers {', '.join(MODEL_TYPES)})"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return "layers on several devices"
    if any(hasattr(layer.self_attn, "q_norm") for layer in model.model.layers):
        return "query/key norms"
    return None


def _product(layer: torch.nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear layer's product of (rows, in) inputs in `dtype`, without its module's call where it can."""
    if isinstance(layer, Int4Linear) and layer.scales_zeros.dtype == dtype:
        return layer.product()
    if type(layer) is torch.nn.Linear:
        return functools.partial(F.linear, weight=layer.weight, bias=layer.bias)
    return layer


def _joined(parts: list[torch.nn.Module], dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """One product for layers that read the same input, where they are all torch Linear or all 4-bit (quant.py)
    and join; otherwise each layer's own, side by side."""
    if all(type(p) is torch.nn.Linear for p in parts) and len({p.bias is None for p in parts}) == 1:
        sizes = [p.out_features for p in parts]
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
        for i, p in enumerate(parts):  # the layers' own weights: views of the joined ones
            p.weight = torch.nn.Parameter(weight.split(sizes)[i], requires_grad=False)
            if bias is not None:
                p.bias = torch.nn.Parameter(bias.split(sizes)[i], requires_grad=False)
        return functools.partial(F.linear, weight=weight, bias=bias)
    if all(isinstance(p, Int4Linear) for p in parts):
        joined = Int4Linear.joined(parts)
        if joined is not None:
            return _product(joined, dtype)
    products = [_product(p, dtype) for p in parts]
    return lambda x: torch.cat([product(x) for product in products], dim=-1)


class LlamaStep:
    """Logits of one decode step: `step(ids, positions, mask, cache)`, where row i feeds token ids[i] at position
    positions[i], its cache row holds the timeline so far and `mask` (rows, width) marks its real columns, the
    column being fed included. Build it only for models `unsupported` says None of."""

    def __init__(self, model: Any, vocab_size: int | None) -> None:
        base, config = model.model, model.config
        self.embed, self.rotary, self.head = base.embed_tokens, base.rotary_emb, model.get_output_embeddings()
        self.norm, self.eps = base.norm.weight, base.norm.variance_epsilon
        attn = base.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.heads = config.num_attention_heads
        self.scaling = attn.scaling
        self.intermediate = config.intermediate_size
        self.vocab_size = vocab_size
        dtype = self.embed.weight.dtype
        self.layers = [
            (layer.input_layernorm.weight,
             _joined([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], dtype),
             _product(layer.self_attn.o_proj, dtype),
             layer.post_attention_layernorm.weight,
             _joined([layer.mlp.gate_proj, layer.mlp.up_proj], dtype),
             _product(layer.mlp.down_proj, dtype))
            for layer in base.layers
        ]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """LlamaRMSNorm's arithmetic: in float32, then scaled in the model's dtype."""
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * y.to(x.dtype)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (rows, vocab) of one token a row: ids and positions (rows,). With ids and positions (rows, tokens),
        each row feeds that many (a token and its draft, speculative.py), each seeing the ones before it: logits
        (rows, tokens, vocab)."""
        rows, tokens = ids.shape[0], ids.shape[1] if ids.dim() == 2 else 1
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        rotated, half, group = heads + kv_heads, dim // 2, heads // kv_heads
        h = self.embed(ids.reshape(-1))  # (rows x tokens, hidden)
        cos, sin = self.rotary(h, positions.reshape(rows, tokens))  # (rows, tokens, dim)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over the heads
        # rotate_half(x) * sin == swap(x) * signed: x's halves swapped, the first half's sines negated
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        if tokens == 1:  # rows of about the same length attend together, over their own columns
            cut = runs(mask)
        else:  # token t of a row sees its row's columns up to its own; the query heads of a group share the mask
            width = mask.shape[1]
            seen = prefill_mask(mask, width - tokens, width)  # (rows, 1, tokens, width)
            cut = [Run(slice(0, rows), 0, seen.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(
                rows, 1, group * tokens, width))]
        for i, (norm1, qkv, o_proj, norm2, gate_up, down_proj) in enumerate(self.layers):
            x = qkv(self._norm(h, norm1)).view(rows, tokens, rotated + kv_heads, dim)
            qk = x[:, :, :rotated]
            swapped = qk.reshape(rows, tokens, rotated, 2, half).flip(3).view(rows, tokens, rotated, dim)
            qk = qk * cos + swapped * sin
            keys, values = cache.layers[i].update(qk[:, :, heads:].transpose(1, 2), x[:, :, rotated:].transpose(1, 2))
            # the query heads of each key/value head as one block of queries: (rows, kv heads, group x tokens, dim)
            query = qk[:, :, :heads].transpose(1, 2).reshape(rows, kv_heads, group * tokens, dim)
            out = attend(query, keys, values, cut, self.scaling)  # (rows, kv heads, group x tokens, dim)
            if tokens > 1:
                out = out.view(rows, heads, tokens, dim).transpose(1, 2)
            h = h + o_proj(out.reshape(rows * tokens, heads * dim))
            gate, up = gate_up(self._norm(h, norm2)).split(self.intermediate, dim=-1)
            h = h + down_proj(F.silu(gate) * up)
        logits = self.head(self._norm(h, self.norm))[:, : self.vocab_size].float()
        return logits if ids.dim() == 1 else logits.view(rows, tokens, -1)
