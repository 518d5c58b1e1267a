"""Prefill variants for `benchmarks/kernels.py --prefill-variant prefill_variants:NAME`, timed
beside ours and checked bit-identical to it (results/kernels.md): `before`, the prefill as
shipped before the output kernel was rewritten (its kernel and host code kept verbatim), and
the shipped kernel at another tile. Each has conv_prefill's signature and launches its kernels
directly, as the public op does."""

import torch
import triton
import triton.language as tl

from layoutpass.kernels import triton_conv


@triton.jit
def _prefill_tap(x_ptr, w_ptr, head_ptr, D2, T2, seq, start, live, dim, sx_dim, sx_tok, sw_dim, sw_k,
                 k: tl.constexpr, WIDTH: tl.constexpr):
    """Tap k's contribution: input position t - (WIDTH - 1) + k, from x inside the sequence,
    from `head` before its start."""
    p = T2 - (WIDTH - 1) + k
    vx = tl.load(x_ptr + D2 * sx_dim + p * sx_tok, mask=live & (p >= start), other=0.0)
    h = WIDTH - 1 - start + p
    vh = tl.load(head_ptr + (seq * (WIDTH - 1) + h) * dim + D2, mask=live & (p < start), other=0.0)
    wk = tl.load(w_ptr + D2 * sw_dim + k * sw_k, mask=D2 < dim, other=0.0).to(tl.float32)
    return wk * (vx.to(tl.float32) + vh.to(tl.float32))


@triton.jit
def _prefill_out_kernel(
    x_ptr, w_ptr, b_ptr, head_ptr, seq_ptr, qsl_ptr, idx_ptr, out_ptr,
    num_tokens, dim, null_block_id,
    sx_dim, sx_tok, sw_dim, sw_k, so_dim, so_tok,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_INDICES: tl.constexpr,
    TOK_FAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """A (token block, channel block) of the varlen prefill output. Token blocks may span
    sequences: each token finds its sequence; taps before a sequence's start read `head`, the
    (batch, width - 1, dim) inputs before it (its initial state's tail, or zeros). The pool is
    not touched here, so this kernel is the same for every pool layout."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    if TOK_FAST:
        D2, T2 = d[:, None], t[None, :]
    else:
        D2, T2 = d[None, :], t[:, None]
    mask = (T2 < num_tokens) & (D2 < dim)
    seq = tl.load(seq_ptr + T2, mask=T2 < num_tokens, other=0).to(tl.int64)
    start = tl.load(qsl_ptr + seq, mask=T2 < num_tokens, other=0).to(tl.int64)
    live = mask
    if HAS_INDICES:
        slot = tl.load(idx_ptr + seq, mask=T2 < num_tokens, other=0)
        live = live & (slot != null_block_id)
    if HAS_BIAS:
        acc = tl.load(b_ptr + D2, mask=D2 < dim, other=0.0).to(tl.float32) + tl.zeros((1, 1), tl.float32)
    else:
        acc = tl.zeros((1, 1), tl.float32)
    # The aligned tap first; once it is in L1 the shifted taps re-read it from there.
    acc += _prefill_tap(x_ptr, w_ptr, head_ptr, D2, T2, seq, start, live, dim, sx_dim, sx_tok, sw_dim, sw_k,
                        WIDTH - 1, WIDTH)
    tl.debug_barrier()
    for k in tl.static_range(WIDTH - 1):
        acc += _prefill_tap(x_ptr, w_ptr, head_ptr, D2, T2, seq, start, live, dim, sx_dim, sx_tok, sw_dim, sw_k,
                            k, WIDTH)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    acc = tl.where(live, acc, 0.0)
    tl.store(out_ptr + D2 * so_dim + T2 * so_tok, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _before(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation,
            null_block_id) -> torch.Tensor:
    """Outputs first (they read the initial states), then the final states (they overwrite them)."""
    out = torch.empty_like(x)
    dim, num_tokens = x.shape
    batch = query_start_loc.shape[0] - 1
    if num_tokens == 0 or batch == 0:
        return out
    seq_of_token = torch.searchsorted(query_start_loc[1:], torch.arange(num_tokens, device=x.device,
                                                                        dtype=query_start_loc.dtype), right=True)
    tok_fast = x.stride(1) == 1 and x.stride(0) != 1
    block_t, block_d, warps = {True: (64, 64, 4), False: (16, 256, 4)}[tok_fast]
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(dim, block_d))
    init = None if has_initial_state is None else has_initial_state.to(torch.int8)
    _prefill_out_kernel[grid](
        x, weight, bias, triton_conv._heads(conv_states, cache_indices, has_initial_state, batch, weight.shape[1]),
        seq_of_token, query_start_loc, cache_indices, out, num_tokens, dim, null_block_id,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=activation == "silu",
        HAS_INDICES=cache_indices is not None, TOK_FAST=tok_fast, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=warps)
    # Final states: the decode kernel's state shift over each sequence's tokens, without outputs;
    # sequences with no initial state read zeros.
    no_init = torch.zeros(batch, dtype=torch.int8, device=x.device) if init is None else init
    triton_conv._launch_state(x, weight, bias, conv_states, cache_indices, None, query_start_loc, no_init, out,
                              batch, 0, null_block_id, (0, x.stride(0), x.stride(1)), (0, 0, 0), activation,
                              write_out=False, tok_p2=1)
    return out


def before(x, weight, bias, conv_states, qsl, idx, has_init, activation):
    """The prefill as shipped before: 16 x 256 tiles, weights read in their (dim, width) layout."""
    return _before(x, weight, bias, conv_states, qsl, idx, has_init, activation, 0)


def _tile(tile):
    def run(x, weight, bias, conv_states, qsl, idx, has_init, activation):
        """The shipped prefill at (BLOCK_T, BLOCK_D, num_warps) = %s."""
        shipped = triton_conv.PREFILL_BLOCKS[False]
        triton_conv.PREFILL_BLOCKS[False] = tile
        try:
            return triton_conv.prefill(x, weight, bias, conv_states, qsl, idx, has_init, activation, 0)
        finally:
            triton_conv.PREFILL_BLOCKS[False] = shipped
    run.__doc__ %= (tile,)
    return run


new_4x1024 = _tile((4, 1024, 4))
