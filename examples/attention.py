"""Causal self-attention over a per-slot KV cache, for the hybrid model. Like vLLM's attention
backend it is one opaque op that writes this step's keys/values into the cache and attends
over each sequence's context: on CUDA a decode step reads each sequence's positions in place
in its slot, up to its own length (a Triton kernel); a prefill gathers and runs torch's SDPA."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
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
        if q.is_cuda:
            return decode_attention(q, k_cache, v_cache, slots, context_lens)
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


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, slots_ptr, ctx_ptr, tokens, scale,
                   sq_b, sq_t, sq_h, sq_d, sk_slot, sk_pos, sk_h, sk_d, sv_slot, sv_pos, sv_h, sv_d,
                   so_b, so_t, so_h, so_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """One (sequence, token) x one head: online softmax over the slot's positions 0..pos in
    blocks of BLOCK_N, fp32 throughout."""
    row, head = tl.program_id(0), tl.program_id(1)
    b, t = row // tokens, row % tokens
    slot = tl.load(slots_ptr + b).to(tl.int64)
    pos = tl.load(ctx_ptr + b) + t  # the last position this token sees
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + b * sq_b + t * sq_t + head * sq_h + d * sq_d, mask=dmask, other=0.0).to(tl.float32)
    q = q * (scale * 1.4426950408889634)  # scores in base 2
    k_base = k_ptr + slot * sk_slot + head * sk_h + d[None, :] * sk_d
    v_base = v_ptr + slot * sv_slot + head * sv_h + d[None, :] * sv_d
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.full((), 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    start = 0
    while start <= pos:  # (a range() bounded by a loaded value does not run in the interpreter)
        n = start + tl.arange(0, BLOCK_N)
        live = n <= pos
        mask = live[:, None] & dmask[None, :]
        keys = tl.load(k_base + n[:, None].to(tl.int64) * sk_pos, mask=mask, other=0.0).to(tl.float32)
        scores = tl.where(live, tl.sum(keys * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new)
        values = tl.load(v_base + n[:, None].to(tl.int64) * sv_pos, mask=mask, other=0.0).to(tl.float32)
        total = total * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * values, 0)
        m = m_new
        start += BLOCK_N
    tl.store(out_ptr + b * so_b + t * so_t + head * so_h + d * so_d, acc / total, mask=dmask)


def decode_attention(q, k_cache, v_cache, slots, context_lens):
    """Decode attention read in place: q (batch, tokens, heads, head_dim); token t of sequence b
    sees positions 0..context_lens[b] + t of slot slots[b] in the (slot, position, head,
    head_dim) caches, any strides (this step's keys and values already written)."""
    batch, tokens, heads, head_dim = q.shape
    out = torch.empty_like(q)
    _decode_kernel[(batch * tokens, heads)](
        q, k_cache, v_cache, out, slots, context_lens, tokens, head_dim ** -0.5,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        HEAD_DIM=head_dim, BLOCK_N=64, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
    return out


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
