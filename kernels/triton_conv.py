"""Triton conv update (decode) and prefill, specialized for the pool's layout.

The access pattern follows the layout, not only the strides (UPDATE_BLOCKS picks the path):
under SD (or any other strides) a program's state block is state_len rows of BLOCK_D channels,
channels fastest ("tiled"); under DS it is one contiguous run of BLOCK_D * state_len elements
per slot, loaded and stored flat ("flat"), or, for one token without spec decode, read once as
[BLOCK_D, width] rows with the window, the output and the shifted state made in registers
("rows"). Each program loads everything it needs, then barriers, then stores, so in-place use
(out over x, the state over itself) is race-free.
Semantics: kernels/reference.py."""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _conv_state_kernel(
    x_ptr, w_ptr, b_ptr, state_ptr, idx_ptr, acc_ptr, qsl_ptr, init_ptr, out_ptr,
    batch, dim, seqlen, null_block_id,
    sx_seq, sx_dim, sx_tok, sw_dim, sw_k, ss_slot, ss_dim, ss_tok, so_seq, so_dim, so_tok,
    WIDTH: tl.constexpr, STATE_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    HAS_INDICES: tl.constexpr, SPEC: tl.constexpr, VARLEN: tl.constexpr, HAS_INIT: tl.constexpr,
    WRITE_OUT: tl.constexpr, FLAT: tl.constexpr, BLOCK_D: tl.constexpr, SEQS: tl.constexpr,
    TOK_P2: tl.constexpr, STATE_P2: tl.constexpr, FLAT_P2: tl.constexpr,
):
    """SEQS sequences x one channel block (the weights stay in L1 across the sequences):
    shift each window by the sequence's tokens, write the new state and (WRITE_OUT) each
    token's conv output. Also writes prefill's final states (WRITE_OUT=False)."""
    d0 = tl.program_id(1) * BLOCK_D
    d = d0 + tl.arange(0, BLOCK_D)
    if FLAT:
        # Dense DS pool: the block's state is one contiguous run of BLOCK_D * STATE_LEN elements.
        e = tl.arange(0, FLAT_P2)
        D2, J2 = d0 + e // STATE_LEN, e % STATE_LEN
        in_tile = (e < BLOCK_D * STATE_LEN) & (D2 < dim)
    else:
        # Any other strides (SD): STATE_LEN rows of BLOCK_D channels, channels fastest.
        j = tl.arange(0, STATE_P2)[:, None]
        D2, J2 = d[None, :], j
        in_tile = (J2 < STATE_LEN) & (D2 < dim)
    T2 = tl.arange(0, TOK_P2)[:, None]
    Dy = d[None, :]
    for i in range(SEQS):
        seq = (tl.program_id(0) * SEQS + i).to(tl.int64)
        active = seq < batch
        slot = seq
        if HAS_INDICES:
            slot = tl.load(idx_ptr + seq, mask=active, other=null_block_id).to(tl.int64)
            active = active & (slot != null_block_id)
        if VARLEN:
            start = tl.load(qsl_ptr + seq, mask=active, other=0).to(tl.int64)
            tokens = tl.load(qsl_ptr + seq + 1, mask=active, other=0).to(tl.int64) - start
            x_base = x_ptr + start * sx_tok
            o_base = out_ptr + start * so_tok
        else:
            tokens = seqlen
            x_base = x_ptr + seq * sx_seq
            o_base = out_ptr + seq * so_seq
        active = active & (tokens > 0)
        end = STATE_LEN  # where the valid history stops in the state
        if SPEC:
            end = tl.load(acc_ptr + seq, mask=active, other=1).to(tl.int64) + WIDTH - 2
        readable = active
        if HAS_INIT:
            readable = readable & (tl.load(init_ptr + seq, mask=active, other=0) != 0)
        s_base = state_ptr + slot * ss_slot

        # New state: column j holds history position end + tokens - STATE_LEN + j.
        shift = end + tokens - STATE_LEN
        pos = shift + J2
        if FLAT:
            old_ptr = s_base + d0 * ss_dim + e + shift
        else:
            old_ptr = s_base + D2 * ss_dim + pos * ss_tok
        old = tl.load(old_ptr, mask=in_tile & (pos >= 0) & (pos < end) & readable, other=0.0)
        new = tl.load(x_base + D2 * sx_dim + (pos - end) * sx_tok, mask=in_tile & (pos >= end) & active, other=0.0)
        new = tl.where(pos >= end, new, old)

        if WRITE_OUT:
            tl.debug_barrier()  # the state block is in L1 now: the shifted tap loads below hit it
            live = (T2 < tokens) & (Dy < dim) & active
            if HAS_BIAS:
                acc = tl.zeros((TOK_P2, BLOCK_D), tl.float32) + tl.load(b_ptr + Dy, mask=Dy < dim, other=0.0).to(tl.float32)
            else:
                acc = tl.zeros((TOK_P2, BLOCK_D), tl.float32)
            for k in tl.static_range(WIDTH):
                p = end - (WIDTH - 1) + T2 + k
                vs = tl.load(s_base + Dy * ss_dim + p * ss_tok, mask=live & (p < end) & readable, other=0.0)
                vx = tl.load(x_base + Dy * sx_dim + (p - end) * sx_tok, mask=live & (p >= end), other=0.0)
                wk = tl.load(w_ptr + Dy * sw_dim + k * sw_k, mask=Dy < dim, other=0.0).to(tl.float32)
                acc += wk * (vs.to(tl.float32) + vx.to(tl.float32))
            if SILU:
                acc = acc / (1.0 + tl.exp(-acc))
        tl.debug_barrier()
        if FLAT:
            tl.store(s_base + d0 * ss_dim + e, new, mask=in_tile & active)
        else:
            tl.store(s_base + D2 * ss_dim + J2 * ss_tok, new, mask=in_tile & active)
        if WRITE_OUT:
            tl.store(o_base + Dy * so_dim + T2 * so_tok, acc.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _taps(acc, window, w, COLS: tl.constexpr, WIDTH: tl.constexpr):
    """acc + sum_k w[:, k] * window[:, k], one tap after another from k = 0, as
    _conv_state_kernel sums them: the same roundings, so a DS pool gives the bits an SD pool
    gives. The columns come apart by splits (in registers), COLS 2 or 4."""
    if COLS == 2:
        v0, v1 = tl.split(window)
        w0, w1 = tl.split(w)
        v2, v3, w2, w3 = v1, v1, w1, w1  # unused: WIDTH <= 2
    else:
        ve, vo = tl.split(tl.reshape(window, (window.shape[0], 2, 2)))  # columns (0, 2), (1, 3)
        we, wo = tl.split(tl.reshape(w, (w.shape[0], 2, 2)))
        v0, v2 = tl.split(ve)
        v1, v3 = tl.split(vo)
        w0, w2 = tl.split(we)
        w1, w3 = tl.split(wo)
    acc += w0 * v0
    acc += w1 * v1
    if WIDTH > 2:
        acc += w2 * v2
    if WIDTH > 3:
        acc += w3 * v3
    return acc


@triton.jit
def _ds_rows_kernel(x_ptr, w_ptr, b_ptr, state_ptr, idx_ptr, out_ptr, dim, null_block_id,
                    sx_seq, sx_dim, sw_dim, sw_k, ss_slot, so_seq, so_dim,
                    STATE_LEN: tl.constexpr, WIDTH: tl.constexpr, COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SILU: tl.constexpr, HAS_INDICES: tl.constexpr, BLOCK_D: tl.constexpr):
    """The hot path on a dense DS pool: one token, no spec decode, state_len == width - 1 <= 3.
    The block's state is one [BLOCK_D, COLS] tile read once (rows of state_len, coalesced);
    the window is that tile with x in its last column, the output its dot with the weight
    tile, the new state the window shifted one column (in registers)."""
    seq = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c = tl.arange(0, COLS)[None, :]
    D2 = d[:, None]
    slot = seq
    if HAS_INDICES:
        slot = tl.load(idx_ptr + seq).to(tl.int64)
        if slot == null_block_id:
            return
    base = state_ptr + slot * ss_slot + D2 * STATE_LEN
    state = tl.load(base + c, mask=(D2 < dim) & (c < STATE_LEN), other=0.0)
    x = tl.load(x_ptr + seq * sx_seq + d * sx_dim, mask=d < dim, other=0.0)
    w = tl.load(w_ptr + D2 * sw_dim + c * sw_k, mask=(D2 < dim) & (c < WIDTH), other=0.0)
    window = tl.where(c == STATE_LEN, x[:, None], state)
    if HAS_BIAS:
        acc = tl.load(b_ptr + d, mask=d < dim, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_D,), tl.float32)
    acc = _taps(acc, window.to(tl.float32), w.to(tl.float32), COLS, WIDTH)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    shifted = tl.gather(window, tl.minimum(c + 1, COLS - 1).broadcast_to(BLOCK_D, COLS), axis=1)
    tl.store(base + c, shifted, mask=(D2 < dim) & (c < STATE_LEN))
    tl.store(out_ptr + seq * so_seq + d * so_dim, acc.to(out_ptr.dtype.element_ty), mask=d < dim)


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


def _flat(conv_state: torch.Tensor) -> bool:
    """A dense DS pool: each slot's (dim, state_len) block is one contiguous run."""
    return conv_state.stride(2) == 1 and conv_state.stride(1) == conv_state.shape[2]


# Block shapes, as data. UPDATE_BLOCKS[dense DS pool]: (largest batch, BLOCK_D, SEQS, num_warps,
# path), the first match wins. Paths: "tiled" (any strides), "flat" (a dense DS block as one
# run), "rows" (dense DS, one token, no spec, state_len == width - 1 <= 3; else "flat"); PREFILL_BLOCKS[tokens fastest]: (BLOCK_T, BLOCK_D, num_warps). Chosen by
# `benchmarks/kernels.py --sweep` on an H100 (benchmarks/results/kernels.json).
UPDATE_BLOCKS = {
    True: [(16, 128, 1, 4, "flat"), (64, 256, 1, 4, "rows"), (256, 128, 1, 2, "rows"), (1 << 62, 128, 1, 1, "rows")],
    False: [(16, 128, 1, 4, "tiled"), (64, 256, 1, 1, "tiled"), (256, 128, 1, 2, "tiled"),
            (1 << 62, 256, 1, 1, "tiled")],
}
PREFILL_BLOCKS = {True: (64, 64, 4), False: (64, 64, 8)}


def _update_config(flat: bool, batch: int) -> tuple[int, int, int, str]:
    return next(config for most, *config in UPDATE_BLOCKS[flat] if batch <= most)


def update(x, conv_state, weight, bias, activation, conv_state_indices, num_accepted_tokens, query_start_loc,
           max_query_len, null_block_id, out) -> None:
    if query_start_loc is not None:
        batch = query_start_loc.shape[0] - 1
        if max_query_len < 0:  # a device sync; pass max_query_len to avoid it (and for CUDA graphs)
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if batch else 0
        seqlen, tok_p2 = 0, triton.next_power_of_2(max(1, max_query_len))
        sx, so = (0, x.stride(1), x.stride(0)), (0, out.stride(1), out.stride(0))
    else:
        batch, seqlen = x.shape[0], (x.shape[2] if x.dim() == 3 else 1)
        tok_p2 = triton.next_power_of_2(seqlen)
        block_d, _, warps, path = _update_config(_flat(conv_state), batch)
        if (path == "rows" and seqlen == 1 and num_accepted_tokens is None
                and conv_state.shape[2] == weight.shape[1] - 1 <= 3 and batch):
            _launch_rows(x, weight, bias, conv_state, conv_state_indices, activation, null_block_id, out, block_d, warps)
            return
        sx = (x.stride(0), x.stride(1), x.stride(2) if x.dim() == 3 else 0)
        so = (out.stride(0), out.stride(1), out.stride(2) if out.dim() == 3 else 0)
    _launch_state(x, weight, bias, conv_state, conv_state_indices, num_accepted_tokens, query_start_loc, None, out,
                  batch, seqlen, null_block_id, sx, so, activation, write_out=True, tok_p2=tok_p2)


def _launch_state(x, weight, bias, conv_state, indices, num_accepted, qsl, has_init, out, batch, seqlen,
                  null_block_id, sx, so, activation, write_out, tok_p2):
    if batch == 0:
        return
    dim = conv_state.shape[1]
    block_d, seqs, warps, path = _update_config(_flat(conv_state), batch)
    flat = path != "tiled"
    block_d = min(block_d, triton.next_power_of_2(dim))
    grid = (triton.cdiv(batch, seqs), triton.cdiv(dim, block_d))
    wrap_triton(_conv_state_kernel)[grid](
        x, weight, bias, conv_state, indices, num_accepted, qsl, has_init, out,
        batch, dim, seqlen, null_block_id,
        *sx, weight.stride(0), weight.stride(1), *conv_state.stride(), *so,
        WIDTH=weight.shape[1], STATE_LEN=conv_state.shape[2], HAS_BIAS=bias is not None,
        SILU=activation == "silu", HAS_INDICES=indices is not None, SPEC=num_accepted is not None,
        VARLEN=qsl is not None, HAS_INIT=has_init is not None, WRITE_OUT=write_out, FLAT=flat,
        BLOCK_D=block_d, SEQS=seqs, TOK_P2=tok_p2, STATE_P2=triton.next_power_of_2(conv_state.shape[2]),
        FLAT_P2=triton.next_power_of_2(block_d * conv_state.shape[2]), num_warps=warps)


def _heads(conv_states, cache_indices, has_initial_state, batch, width) -> torch.Tensor:
    """(batch, width - 1, dim): the inputs just before each sequence, channels contiguous (the
    initial state's last columns where flagged, else zeros). Small; read by the output kernel."""
    slots = torch.arange(batch, device=conv_states.device) if cache_indices is None else cache_indices.long()
    tail = conv_states[slots, :, conv_states.shape[2] - (width - 1):].transpose(1, 2)
    if has_initial_state is None:
        return torch.zeros_like(tail, memory_format=torch.contiguous_format)
    return torch.where(has_initial_state[:, None, None], tail, 0).contiguous()


def _launch_rows(x, weight, bias, conv_state, indices, activation, null_block_id, out, block_d, warps):
    dim = conv_state.shape[1]
    block_d = min(block_d, triton.next_power_of_2(dim))
    wrap_triton(_ds_rows_kernel)[(x.shape[0], triton.cdiv(dim, block_d))](
        x, weight, bias, conv_state, indices, out, dim, null_block_id,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), conv_state.stride(0), out.stride(0), out.stride(1),
        STATE_LEN=conv_state.shape[2], WIDTH=weight.shape[1], COLS=triton.next_power_of_2(weight.shape[1]),
        HAS_BIAS=bias is not None, SILU=activation == "silu", HAS_INDICES=indices is not None, BLOCK_D=block_d,
        num_warps=warps)


def prefill(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation,
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
    block_t, block_d, warps = PREFILL_BLOCKS[tok_fast]
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(dim, block_d))
    init = None if has_initial_state is None else has_initial_state.to(torch.int8)
    wrap_triton(_prefill_out_kernel)[grid](
        x, weight, bias, _heads(conv_states, cache_indices, has_initial_state, batch, weight.shape[1]),
        seq_of_token, query_start_loc, cache_indices, out, num_tokens, dim, null_block_id,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=activation == "silu",
        HAS_INDICES=cache_indices is not None, TOK_FAST=tok_fast, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=warps)
    # Final states: the decode kernel's state shift over each sequence's tokens, without outputs;
    # sequences with no initial state read zeros.
    no_init = torch.zeros(batch, dtype=torch.int8, device=x.device) if init is None else init
    _launch_state(x, weight, bias, conv_states, cache_indices, None, query_start_loc, no_init, out, batch, 0,
                  null_block_id, (0, x.stride(0), x.stride(1)), (0, 0, 0), activation, write_out=False, tok_p2=1)
    return out
