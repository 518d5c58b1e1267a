"""Causal self-attention over a per-slot KV cache, for the hybrid model. Like vLLM's attention
backend it is one opaque op that writes this step's keys/values into the cache and attends
over each sequence's context."""

import torch
import torch.nn.functional as F
from torch import nn

from layoutpass.examples.common import Batch, pad_tokens, unpad_tokens
from layoutpass.registry import register_stride_agnostic


@torch.library.custom_op("lp_examples::cached_attention", mutates_args=("k_cache", "v_cache"))
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slots: torch.Tensor, context_lens: torch.Tensor,
                     query_start_loc: torch.Tensor | None) -> torch.Tensor:
    """q/k/v: prefill (tokens, heads, head_dim) with query_start_loc, or decode (batch, k, heads,
    head_dim). Caches: (num_slots, max_len, heads, head_dim)."""
    batch = Batch(slots, context_lens, query_start_loc)
    (qp, valid), kp, vp = pad_tokens(q, batch), pad_tokens(k, batch)[0], pad_tokens(v, batch)[0]
    pos = context_lens[:, None] + torch.arange(valid.shape[1], device=q.device)[None, :]
    rows = slots[:, None].expand_as(pos)
    if query_start_loc is None:  # decode: every token is real; no boolean mask (no sync, CUDA-graph safe)
        k_cache[rows, pos], v_cache[rows, pos] = kp, vp
    else:
        k_cache[rows[valid], pos[valid]] = kp[valid]
        v_cache[rows[valid], pos[valid]] = vp[valid]
    keys, values = k_cache[slots], v_cache[slots]  # (batch, max_len, heads, hd)
    visible = torch.arange(keys.shape[1], device=q.device)[None, None, :] <= pos[:, :, None]
    out = (_sdpa if q.is_cuda else _attend)(qp, keys.to(q.dtype), values.to(q.dtype), visible)
    return unpad_tokens(out, batch, q.shape[0]).to(q.dtype)


def _attend(q, keys, values, visible):
    """Pure-torch attention in fp32 (q (batch, tokens, heads, hd), keys/values (batch, len,
    heads, hd), visible (batch, tokens, len)): the CPU path and the oracle for _sdpa."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys.float()) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", F.softmax(scores, -1), values.float())


def _sdpa(q, keys, values, visible):
    """The same through torch's fused scaled_dot_product_attention (the CUDA path)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visible[:, None])
    return out.transpose(1, 2)


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, slots, context_lens, query_start_loc):
    return torch.empty_like(q)


register_stride_agnostic(torch.ops.lp_examples.cached_attention)  # it reads its caches by logical index


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.qkv_proj = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.o_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        cache = (cfg.num_slots, cfg.max_len, self.heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache))
        self.register_buffer("v_cache", torch.zeros(cache))

    def forward(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)) for t in self.qkv_proj(h).chunk(3, -1))
        out = cached_attention(q, k, v, self.k_cache, self.v_cache, batch.slots, batch.context_lens,
                               batch.query_start_loc)
        return self.o_proj(out.flatten(-2))
