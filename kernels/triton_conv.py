"""Triton conv update (decode) and prefill, specialized for the pool's layout.

The access pattern follows the layout, not only the strides (UPDATE_BLOCKS picks the path):
under SD (or any other strides) a program's state block is state_len rows of BLOCK_D channels,
channels fastest ("tiled"); under DS it is one contiguous run of BLOCK_D * state_len elements
per slot, loaded and stored flat ("flat"), or, for one token without spec decode, moved as
whole 16-byte vectors per group of 8 channels with the taps and the shifted state rearranged
in registers ("vec"). Each program loads everything it needs, then barriers, then stores, so
in-place use (out over x, the state over itself) is race-free.
Semantics: kernels/reference.py."""

import torch
import triton
import triton.language as tl


@triton.jit
def _when(cond, mask):
    """mask where the scalar cond holds, else all false. (Not `mask & cond`: Triton 3.9's
    interpreter casts a broadcast scalar comparison to an integer mask and rejects it.)"""
    return tl.where(cond, mask, False)


@triton.jit
def _conv_state_kernel(
    x_ptr, w_ptr, b_ptr, state_ptr, idx_ptr, acc_ptr, qsl_ptr, init_ptr, out_ptr,
    batch, dim, seqlen, null_block_id,
    sx_seq, sx_dim, sx_tok, sw_dim, sw_k, ss_slot, ss_dim, ss_tok, so_seq, so_dim, so_tok,
    WIDTH: tl.constexpr, STATE_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    HAS_INDICES: tl.constexpr, SPEC: tl.constexpr, VARLEN: tl.constexpr, HAS_INIT: tl.constexpr,
    WRITE_OUT: tl.constexpr, FLAT: tl.constexpr, BLOCK_D: tl.constexpr, SEQS: tl.constexpr,
    TOK_P2: tl.constexpr, STATE_P2: tl.constexpr, FLAT_P2: tl.constexpr, WIDE: tl.constexpr,
):
    """SEQS sequences x one channel block (the weights stay in L1 across the sequences):
    shift each window by the sequence's tokens, write the new state and (WRITE_OUT) each
    token's conv output. Also writes prefill's final states (WRITE_OUT=False). WIDE: offsets
    may pass 2^31 elements, so index math runs in 64 bits (see _wide)."""
    d0 = tl.program_id(1) * BLOCK_D
    if WIDE:
        d0 = d0.to(tl.int64)
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
    if WIDE:
        T2 = T2.to(tl.int64)
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
        old = tl.load(old_ptr, mask=_when(readable, in_tile & (pos >= 0) & (pos < end)), other=0.0)
        new = tl.load(x_base + D2 * sx_dim + (pos - end) * sx_tok, mask=_when(active, in_tile & (pos >= end)), other=0.0)
        new = tl.where(pos >= end, new, old)

        if WRITE_OUT:
            tl.debug_barrier()  # the state block is in L1 now: the shifted tap loads below hit it
            live = _when(active, (T2 < tokens) & (Dy < dim))
            if HAS_BIAS:
                acc = tl.zeros((TOK_P2, BLOCK_D), tl.float32) + tl.load(b_ptr + Dy, mask=Dy < dim, other=0.0).to(tl.float32)
            else:
                acc = tl.zeros((TOK_P2, BLOCK_D), tl.float32)
            for k in tl.static_range(WIDTH):
                p = end - (WIDTH - 1) + T2 + k
                vs = tl.load(s_base + Dy * ss_dim + p * ss_tok, mask=_when(readable, live & (p < end)), other=0.0)
                vx = tl.load(x_base + Dy * sx_dim + (p - end) * sx_tok, mask=live & (p >= end), other=0.0)
                wk = tl.load(w_ptr + Dy * sw_dim + k * sw_k, mask=Dy < dim, other=0.0).to(tl.float32)
                acc += wk * (vs.to(tl.float32) + vx.to(tl.float32))
            if SILU:
                acc = acc / (1.0 + tl.exp(-acc))
        tl.debug_barrier()
        if FLAT:
            tl.store(s_base + d0 * ss_dim + e, new, mask=_when(active, in_tile))
        else:
            tl.store(s_base + D2 * ss_dim + J2 * ss_tok, new, mask=_when(active, in_tile))
        if WRITE_OUT:
            tl.store(o_base + Dy * so_dim + T2 * so_tok, acc.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _cols8(v):
    """The 8 columns of a [G, 8] tile as [G] tensors (splits: register moves, no shuffles)."""
    even, odd = tl.split(tl.reshape(v, (v.shape[0], 2, 2, 2)))
    e0, e1 = tl.split(even)
    o0, o1 = tl.split(odd)
    c0, c4 = tl.split(e0)
    c2, c6 = tl.split(e1)
    c1, c5 = tl.split(o0)
    c3, c7 = tl.split(o1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _row8(c0, c1, c2, c3, c4, c5, c6, c7):
    """A [G, 8] tile from 8 [G] columns (joins: the inverse of _cols8)."""
    even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
    odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    return tl.reshape(tl.join(even, odd), (c0.shape[0], 8))


@triton.jit
def _deinterleave(p0, p1, p2, p3, K: tl.constexpr):
    """K pieces [G, 8] that hold 8 channels x K columns channel-major (a dense (dim, K) run, 8K
    elements per group of 8 channels) -> column j of the 8 channels as [G, 8], j < K (unused
    outputs repeat p0). Register moves only: every element stays in its thread."""
    t0, t1, t2, t3 = p0, p0, p0, p0
    if K == 2:
        a0, a1, a2, a3, a4, a5, a6, a7 = _cols8(p0)
        b0, b1, b2, b3, b4, b5, b6, b7 = _cols8(p1)
        t0 = _row8(a0, a2, a4, a6, b0, b2, b4, b6)
        t1 = _row8(a1, a3, a5, a7, b1, b3, b5, b7)
    elif K == 3:
        a0, a1, a2, a3, a4, a5, a6, a7 = _cols8(p0)
        b0, b1, b2, b3, b4, b5, b6, b7 = _cols8(p1)
        c0, c1, c2, c3, c4, c5, c6, c7 = _cols8(p2)
        t0 = _row8(a0, a3, a6, b1, b4, b7, c2, c5)
        t1 = _row8(a1, a4, a7, b2, b5, c0, c3, c6)
        t2 = _row8(a2, a5, b0, b3, b6, c1, c4, c7)
    elif K == 4:
        a0, a1, a2, a3, a4, a5, a6, a7 = _cols8(p0)
        b0, b1, b2, b3, b4, b5, b6, b7 = _cols8(p1)
        c0, c1, c2, c3, c4, c5, c6, c7 = _cols8(p2)
        d0, d1, d2, d3, d4, d5, d6, d7 = _cols8(p3)
        t0 = _row8(a0, a4, b0, b4, c0, c4, d0, d4)
        t1 = _row8(a1, a5, b1, b5, c1, c5, d1, d5)
        t2 = _row8(a2, a6, b2, b6, c2, c6, d2, d6)
        t3 = _row8(a3, a7, b3, b7, c3, c7, d3, d7)
    return t0, t1, t2, t3


@triton.jit
def _shifted(p0, p1, p2, x, S: tl.constexpr):
    """The new state of 8 channels, as the S pieces of its dense run: each channel's columns
    moved one to the left and x appended (the run shifted by one element, x every S-th)."""
    n0, n1, n2 = x, x, x
    x0, x1, x2, x3, x4, x5, x6, x7 = _cols8(x)
    if S == 2:
        a0, a1, a2, a3, a4, a5, a6, a7 = _cols8(p0)
        b0, b1, b2, b3, b4, b5, b6, b7 = _cols8(p1)
        n0 = _row8(a1, x0, a3, x1, a5, x2, a7, x3)
        n1 = _row8(b1, x4, b3, x5, b5, x6, b7, x7)
    elif S == 3:
        a0, a1, a2, a3, a4, a5, a6, a7 = _cols8(p0)
        b0, b1, b2, b3, b4, b5, b6, b7 = _cols8(p1)
        c0, c1, c2, c3, c4, c5, c6, c7 = _cols8(p2)
        n0 = _row8(a1, a2, x0, a4, a5, x1, a7, b0)
        n1 = _row8(x2, b2, b3, x3, b5, b6, x4, c0)
        n2 = _row8(c1, x5, c3, c4, x6, c6, c7, x7)
    return n0, n1, n2


@triton.jit
def _pieces(at, mask, K: tl.constexpr):
    """K consecutive [G, 8] pieces from `at` (unused outputs repeat the first)."""
    p0 = tl.load(at, mask=mask, other=0.0)
    p1, p2, p3 = p0, p0, p0
    if K > 1:
        p1 = tl.load(at + 8, mask=mask, other=0.0)
    if K > 2:
        p2 = tl.load(at + 16, mask=mask, other=0.0)
    if K > 3:
        p3 = tl.load(at + 24, mask=mask, other=0.0)
    return p0, p1, p2, p3


@triton.jit
def _ds_vec_kernel(x_ptr, w_ptr, b_ptr, state_ptr, idx_ptr, out_ptr, batch, groups, null_block_id,
                   sx8, ss8, so8, STATE_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                   HAS_INDICES: tl.constexpr, BLOCK_D: tl.constexpr, SEQS: tl.constexpr, PDL: tl.constexpr):
    """The hot path on a dense DS pool: one token, no spec decode, state_len == width - 1 <= 3,
    dim a multiple of 8. Each thread owns groups of 8 channels, whose state is 8 * state_len
    contiguous elements: state_len 16-byte vectors in bf16 (x, out, bias: one each; weights:
    width). The taps and the shifted state are rearranged in registers (_deinterleave,
    _shifted), and summed in _conv_state_kernel's order (bit-identical to an SD pool).
    Strides come divided by 8 so that the compiler sees 16-byte alignment."""
    if PDL:  # programmatic dependent launch: start while the previous kernel drains
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    WIDTH: tl.constexpr = STATE_LEN + 1
    G: tl.constexpr = BLOCK_D // 8
    group = (tl.program_id(1) * G + tl.arange(0, G)[:, None]).to(tl.int64)
    lane = tl.arange(0, 8)[None, :]
    in_dim = group < groups
    w0, w1, w2, w3 = _pieces(w_ptr + group * (8 * WIDTH) + lane, in_dim, WIDTH)
    w0, w1, w2, w3 = _deinterleave(w0.to(tl.float32), w1.to(tl.float32), w2.to(tl.float32), w3.to(tl.float32),
                                   WIDTH)
    if HAS_BIAS:
        bias = tl.load(b_ptr + group * 8 + lane, mask=in_dim, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((G, 8), tl.float32)
    for i in range(SEQS):
        seq = (tl.program_id(0) * SEQS + i).to(tl.int64)
        live = seq < batch
        slot = seq
        if HAS_INDICES:
            slot = tl.load(idx_ptr + seq, mask=live, other=null_block_id).to(tl.int64)
            live = live & (slot != null_block_id)
        mask = _when(live, in_dim)
        s_at = state_ptr + slot * (ss8 * 8) + group * (8 * STATE_LEN) + lane
        p0, p1, p2, _ = _pieces(s_at, mask, STATE_LEN)
        x = tl.load(x_ptr + seq * (sx8 * 8) + group * 8 + lane, mask=mask, other=0.0)
        v0, v1, v2, _ = _deinterleave(p0, p1, p2, p2, STATE_LEN)
        acc = bias
        acc += w0 * v0.to(tl.float32)
        if STATE_LEN > 1:
            acc += w1 * v1.to(tl.float32)
        if STATE_LEN > 2:
            acc += w2 * v2.to(tl.float32)
        if STATE_LEN == 1:
            acc += w1 * x.to(tl.float32)
        elif STATE_LEN == 2:
            acc += w2 * x.to(tl.float32)
        else:
            acc += w3 * x.to(tl.float32)
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        n0, n1, n2 = _shifted(p0, p1, p2, x, STATE_LEN)
        tl.debug_barrier()  # every load of this sequence before any store (out may alias x)
        tl.store(s_at, n0, mask=mask)
        if STATE_LEN > 1:
            tl.store(s_at + 8, n1, mask=mask)
        if STATE_LEN > 2:
            tl.store(s_at + 16, n2, mask=mask)
        tl.store(out_ptr + seq * (so8 * 8) + group * 8 + lane, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pick(i: tl.constexpr, a0, a1, a2, a3, a4, a5):
    """a_i, i a compile-time index < 6."""
    if i == 0:
        return a0
    elif i == 1:
        return a1
    elif i == 2:
        return a2
    elif i == 3:
        return a3
    elif i == 4:
        return a4
    else:
        return a5


@triton.jit
def _slot(seq, idx_ptr, init_ptr, state_ptr, ss_slot, null_block_id, HAS_INDICES: tl.constexpr,
          HAS_INIT: tl.constexpr):
    """Sequence seq's pool block, whether it has a slot (else its outputs are zero) and whether
    its initial state is read (else zeros)."""
    slot = seq.to(tl.int64)
    live = seq >= 0
    if HAS_INDICES:
        slot = tl.load(idx_ptr + seq).to(tl.int64)
        live = slot != null_block_id
    if HAS_INIT:
        readable = live & (tl.load(init_ptr + seq) != 0)
    else:
        readable = seq < 0
    return state_ptr + slot * ss_slot, live, readable


@triton.jit
def _head(j: tl.constexpr, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN: tl.constexpr):
    """The input j tokens before a sequence's first: its initial state's column STATE_LEN - j
    (zeros where the state is not read), fp32."""
    return tl.load(s_base + (STATE_LEN - j) * ss_tok + s_offs, mask=_when(readable, dmask), other=0.0).to(tl.float32)


@triton.jit
def _history(p, start, x_ptr, x_row, sx_tok, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN: tl.constexpr):
    """Input position p of the sequence that starts at token `start`, fp32: x's token p inside
    the sequence, the initial state's column STATE_LEN - (start - p) before it (zeros where
    the state is not read)."""
    inside = p >= start
    vx = tl.load(x_ptr + p * sx_tok + x_row, mask=_when(inside, dmask), other=0.0)
    vs = tl.load(s_base + (STATE_LEN - start + p) * ss_tok + s_offs, mask=_when(readable & (p < start), dmask),
                 other=0.0)
    return tl.where(inside, vx, vs).to(tl.float32)


@triton.jit
def _silu_live(acc, live, SILU: tl.constexpr, HAS_INDICES: tl.constexpr):
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    if HAS_INDICES:
        acc = tl.where(live, acc, 0.0)
    return acc


@triton.jit
def _fast_step(v, h1, h2, h3, h4, h5, w0, w1, w2, w3, w4, w5, bias, live, WIDTH: tl.constexpr, SILU: tl.constexpr,
               HAS_INDICES: tl.constexpr):
    """A token whose WIDTH - 1 inputs before it are carried (h1 the last): its output row (in
    v's dtype) and the carried inputs for the next token."""
    vf = v.to(tl.float32)
    # The order of the tile kernel before (bias, the aligned tap, then taps 0..WIDTH-2).
    acc = bias
    acc += _pick(WIDTH - 1, w0, w1, w2, w3, w4, w5) * vf
    for k in tl.static_range(WIDTH - 1):
        acc += _pick(k, w0, w1, w2, w3, w4, w5) * _pick(WIDTH - 1 - k, vf, h1, h2, h3, h4, h5)
    return _silu_live(acc, live, SILU, HAS_INDICES).to(v.dtype), vf, h1, h2, h3, h4


@triton.jit
def _prefill_scan_kernel(
    x_ptr, w_ptr, b_ptr, state_ptr, init_ptr, qsl_ptr, idx_ptr, out_ptr,
    num_tokens, batch, dim, null_block_id,
    sx_dim, sx_tok, so_dim, so_tok, sw_dim, sw_k, ss_slot, ss_dim, ss_tok,
    WIDTH: tl.constexpr, STATE_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    HAS_INDICES: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    WIDE: tl.constexpr,
):
    """BLOCK_T tokens x BLOCK_D channels of the varlen prefill output, scanned along the tokens
    in chunks of 8: [BLOCK_D, 8] loads and stores (16-byte vectors along x's contiguous axis,
    channels or tokens) split into rows of channels in registers (_cols8, _row8). The
    WIDTH - 1 inputs before a token are carried from the rows before it, so x is read once
    (plus WIDTH - 1 rows at the tile's start). A chunk inside one sequence takes the fast path
    (carried inputs, no per-token work but the arithmetic); a chunk where a sequence starts
    walks query_start_loc token by token and reads those taps from x or from the initial state
    in the pool (read, never written, here: the next kernel writes the final states), then
    reloads the carried inputs. The first token's sequence: a binary search. Weights, bias and
    the pool are read in their own layouts. Null slots give zero outputs. The arithmetic is
    the tile kernel's before it, in its order (bit-identical). WIDE: as in _conv_state_kernel."""
    t0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    t_end = tl.minimum(t0 + BLOCK_T, num_tokens)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    if WIDE:
        d = d.to(tl.int64)
    dmask = d < dim
    D2, C2 = d[:, None], tl.arange(0, 8)[None, :]
    x_offs, o_offs, x_row, s_offs = D2 * sx_dim + C2 * sx_tok, D2 * so_dim + C2 * so_tok, d * sx_dim, d * ss_dim
    mask = (D2 < dim) & (C2 < 8)
    w0 = tl.load(w_ptr + d * sw_dim, mask=dmask, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + d * sw_dim + sw_k, mask=dmask, other=0.0).to(tl.float32)
    w2, w3, w4, w5 = w1, w1, w1, w1
    if WIDTH > 2:
        w2 = tl.load(w_ptr + d * sw_dim + 2 * sw_k, mask=dmask, other=0.0).to(tl.float32)
    if WIDTH > 3:
        w3 = tl.load(w_ptr + d * sw_dim + 3 * sw_k, mask=dmask, other=0.0).to(tl.float32)
    if WIDTH > 4:
        w4 = tl.load(w_ptr + d * sw_dim + 4 * sw_k, mask=dmask, other=0.0).to(tl.float32)
    if WIDTH > 5:
        w5 = tl.load(w_ptr + d * sw_dim + 5 * sw_k, mask=dmask, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    # The sequence of token t0: the number of sequences that end at or before it.
    lo = batch * 0
    hi = batch
    while lo < hi:
        mid = (lo + hi) // 2
        before = tl.load(qsl_ptr + mid + 1) <= t0
        lo = tl.where(before, mid + 1, lo)
        hi = tl.where(before, hi, mid)
    seq = lo
    start = tl.load(qsl_ptr + seq).to(tl.int64)
    end = tl.load(qsl_ptr + seq + 1).to(tl.int64)
    s_base, live, readable = _slot(seq, idx_ptr, init_ptr, state_ptr, ss_slot, null_block_id, HAS_INDICES, HAS_INIT)
    h1 = _history(t0 - 1, start, x_ptr, x_row, sx_tok, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN)
    h2, h3, h4, h5 = h1, h1, h1, h1
    if WIDTH > 2:
        h2 = _history(t0 - 2, start, x_ptr, x_row, sx_tok, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN)
    if WIDTH > 3:
        h3 = _history(t0 - 3, start, x_ptr, x_row, sx_tok, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN)
    if WIDTH > 4:
        h4 = _history(t0 - 4, start, x_ptr, x_row, sx_tok, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN)
    if WIDTH > 5:
        h5 = _history(t0 - 5, start, x_ptr, x_row, sx_tok, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN)
    # Invariant at each chunk's first token tc: seq, start, end are the sequence of token tc - 1
    # (of t0 at the first chunk), and h1..h5 the inputs before tc in that sequence.
    for c in range(0, BLOCK_T, 8):  # (constant bounds: the interpreter takes no tensor bounds)
        tc = t0 + c
        if (tc + 8 <= end) & (tc + 8 <= t_end):  # all 8 tokens in one sequence, and in this tile
            v0, v1, v2, v3, v4, v5, v6, v7 = _cols8(tl.load(x_ptr + tc * sx_tok + x_offs, mask=mask, other=0.0))
            o0, h1, h2, h3, h4, h5 = _fast_step(v0, h1, h2, h3, h4, h5, w0, w1, w2, w3, w4, w5, bias, live, WIDTH,
                                                SILU, HAS_INDICES)
            o1, h1, h2, h3, h4, h5 = _fast_step(v1, h1, h2, h3, h4, h5, w0, w1, w2, w3, w4, w5, bias, live, WIDTH,
                                                SILU, HAS_INDICES)
            o2, h1, h2, h3, h4, h5 = _fast_step(v2, h1, h2, h3, h4, h5, w0, w1, w2, w3, w4, w5, bias, live, WIDTH,
                                                SILU, HAS_INDICES)
            o3, h1, h2, h3, h4, h5 = _fast_step(v3, h1, h2, h3, h4, h5, w0, w1, w2, w3, w4, w5, bias, live, WIDTH,
                                                SILU, HAS_INDICES)
            o4, h1, h2, h3, h4, h5 = _fast_step(v4, h1, h2, h3, h4, h5, w0, w1, w2, w3, w4, w5, bias, live, WIDTH,
                                                SILU, HAS_INDICES)
            o5, h1, h2, h3, h4, h5 = _fast_step(v5, h1, h2, h3, h4, h5, w0, w1, w2, w3, w4, w5, bias, live, WIDTH,
                                                SILU, HAS_INDICES)
            o6, h1, h2, h3, h4, h5 = _fast_step(v6, h1, h2, h3, h4, h5, w0, w1, w2, w3, w4, w5, bias, live, WIDTH,
                                                SILU, HAS_INDICES)
            o7, h1, h2, h3, h4, h5 = _fast_step(v7, h1, h2, h3, h4, h5, w0, w1, w2, w3, w4, w5, bias, live, WIDTH,
                                                SILU, HAS_INDICES)
            tl.store(out_ptr + tc * so_tok + o_offs, _row8(o0, o1, o2, o3, o4, o5, o6, o7), mask=mask)
        else:
            # A sequence starts in this chunk: token by token (a loop: one row live), the inputs
            # before a sequence's first token reloaded from its initial state.
            t = tc
            while t < tl.minimum(tc + 8, t_end):
                if t >= end:
                    while t >= end:
                        seq += 1
                        end = tl.load(qsl_ptr + seq + 1).to(tl.int64)
                    s_base, live, readable = _slot(seq, idx_ptr, init_ptr, state_ptr, ss_slot, null_block_id,
                                                   HAS_INDICES, HAS_INIT)
                    h1 = _head(1, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN)
                    if WIDTH > 2:
                        h2 = _head(2, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN)
                    if WIDTH > 3:
                        h3 = _head(3, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN)
                    if WIDTH > 4:
                        h4 = _head(4, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN)
                    if WIDTH > 5:
                        h5 = _head(5, s_base, s_offs, ss_tok, readable, dmask, STATE_LEN)
                v = tl.load(x_ptr + t * sx_tok + x_row, mask=dmask, other=0.0)
                o, h1, h2, h3, h4, h5 = _fast_step(v, h1, h2, h3, h4, h5, w0, w1, w2, w3, w4, w5, bias, live, WIDTH,
                                                   SILU, HAS_INDICES)
                tl.store(out_ptr + t * so_tok + d * so_dim, o, mask=dmask)
                t += 1

def _wide(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into one of these tensors can pass int32 (a prefill of
    tokens x dim > 2^31, e.g. 262k tokens at 8192 channels): the kernels then do their index
    math in 64 bits, which costs the prefill 13% (244 -> 277 us on an H100), so only then. A
    pool counts by one slot: slot offsets are 64-bit always."""
    return any(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n) >= 2**31 for t in tensors)


def _flat(conv_state: torch.Tensor) -> bool:
    """A dense DS pool: each slot's (dim, state_len) block is one contiguous run."""
    return conv_state.stride(2) == 1 and conv_state.stride(1) == conv_state.shape[2]


# Block shapes, as data. UPDATE_BLOCKS[dense DS pool]: (largest batch, BLOCK_D, SEQS, num_warps,
# path), the first match wins. Paths: "tiled" (any strides), "flat" (a dense DS block as one
# run), "vec" (dense DS, one token, no spec, state_len == width - 1 <= 3, whole 8-channel
# groups; else "flat"). PDL: programmatic dependent launch on the vec path (each kernel starts
# while the one before it drains; Hopper and newer). Chosen on an H100 80GB HBM3 (benchmarks/
# results/, NOTES.md). PREFILL_BLOCKS[tokens fastest]: (BLOCK_T, BLOCK_D, num_warps) of
# _prefill_scan_kernel, BLOCK_T a multiple of 8; without layout conversions when each thread
# holds whole 16-byte vectors of one warp's rows: channels fastest, BLOCK_D >= 8 * 32 *
# num_warps in bf16; tokens fastest, BLOCK_D = 32 * num_warps (one channel per thread).
# Chosen on an H200 by a sweep (NOTES.md, 2026-12-04 prefill scan).
UPDATE_BLOCKS = {
    True: [(1 << 62, 256, 1, 1, "vec")],
    False: [(16, 128, 1, 4, "tiled"), (64, 256, 1, 1, "tiled"), (256, 128, 1, 2, "tiled"),
            (1 << 62, 256, 1, 1, "tiled")],
}
PREFILL_BLOCKS = {True: (128, 64, 2), False: (128, 1024, 4)}
PDL = True


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
        block_d, seqs, warps, path = _update_config(_flat(conv_state), batch)
        if (path == "vec" and seqlen == 1 and num_accepted_tokens is None and batch
                and conv_state.shape[2] == weight.shape[1] - 1 <= 3 and _vec_ok(x, weight, bias, conv_state, out)):
            _launch_vec(x, weight, bias, conv_state, conv_state_indices, activation, null_block_id, out, block_d, seqs,
                        warps)
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
    _conv_state_kernel[grid](
        x, weight, bias, conv_state, indices, num_accepted, qsl, has_init, out,
        batch, dim, seqlen, null_block_id,
        *sx, weight.stride(0), weight.stride(1), *conv_state.stride(), *so,
        WIDTH=weight.shape[1], STATE_LEN=conv_state.shape[2], HAS_BIAS=bias is not None,
        SILU=activation == "silu", HAS_INDICES=indices is not None, SPEC=num_accepted is not None,
        VARLEN=qsl is not None, HAS_INIT=has_init is not None, WRITE_OUT=write_out, FLAT=flat,
        BLOCK_D=block_d, SEQS=seqs, TOK_P2=tok_p2, STATE_P2=triton.next_power_of_2(conv_state.shape[2]),
        FLAT_P2=triton.next_power_of_2(block_d * conv_state.shape[2]),
        WIDE=_wide(x, conv_state[0], *([out] if write_out else [])), num_warps=warps)


def _heads(conv_states, cache_indices, has_initial_state, batch, width) -> torch.Tensor:
    """(batch, width - 1, dim): the inputs just before each sequence, channels contiguous (the
    initial state's last columns where flagged, else zeros). Read by the tile kernel before
    _prefill_scan_kernel, kept in benchmarks/prefill_variants.py ("before")."""
    slots = torch.arange(batch, device=conv_states.device) if cache_indices is None else cache_indices.long()
    tail = conv_states[slots, :, conv_states.shape[2] - (width - 1):].transpose(1, 2)
    if has_initial_state is None:
        return torch.zeros_like(tail, memory_format=torch.contiguous_format)
    return torch.where(has_initial_state[:, None, None], tail, 0).contiguous()


def _vec_ok(x, weight, bias, conv_state, out) -> bool:
    """The vec path's layout: 8-channel groups are whole 16-byte-aligned vectors."""
    strides = (x.stride(0), out.stride(0), conv_state.stride(0), conv_state.shape[1])
    return (all(s % 8 == 0 for s in strides) and x.stride(1) == 1 and out.stride(1) == 1
            and weight.is_contiguous() and (bias is None or bias.stride(0) == 1)
            and conv_state.stride(2) == 1 and conv_state.stride(1) == conv_state.shape[2])


def _launch_vec(x, weight, bias, conv_state, indices, activation, null_block_id, out, block_d, seqs, warps):
    dim, batch = conv_state.shape[1], x.shape[0]
    block_d = max(8, min(block_d, triton.next_power_of_2(dim)))
    pdl = PDL and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    _ds_vec_kernel[(triton.cdiv(batch, seqs), triton.cdiv(dim, block_d))](
        x, weight, bias, conv_state, indices, out, batch, dim // 8, null_block_id,
        x.stride(0) // 8, conv_state.stride(0) // 8, out.stride(0) // 8,
        STATE_LEN=conv_state.shape[2], HAS_BIAS=bias is not None, SILU=activation == "silu",
        HAS_INDICES=indices is not None, BLOCK_D=block_d, SEQS=seqs, PDL=pdl, num_warps=warps,
        **(dict(launch_pdl=True) if pdl else {}))


def prefill(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation,
            null_block_id) -> torch.Tensor:
    """Outputs first (they read the initial states), then the final states (they overwrite them)."""
    out = torch.empty_like(x)
    dim, num_tokens = x.shape
    batch = query_start_loc.shape[0] - 1
    if num_tokens == 0 or batch == 0:
        return out
    tok_fast = x.stride(1) == 1 and x.stride(0) != 1
    block_t, block_d, warps = PREFILL_BLOCKS[tok_fast]
    block_d = min(block_d, max(8, triton.next_power_of_2(dim)))
    warps = max(1, min(warps, block_d // 64))
    init = has_initial_state
    if init is not None and init.dtype == torch.bool:
        init = init.view(torch.int8)  # the same bytes, no copy
    _prefill_scan_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(dim, block_d))](
        x, weight, bias, conv_states, init, query_start_loc, cache_indices, out, num_tokens, batch, dim, null_block_id,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), weight.stride(0), weight.stride(1),
        *conv_states.stride(), WIDTH=weight.shape[1], STATE_LEN=conv_states.shape[2], HAS_BIAS=bias is not None,
        SILU=activation == "silu", HAS_INDICES=cache_indices is not None, HAS_INIT=init is not None,
        BLOCK_T=block_t, BLOCK_D=block_d, WIDE=_wide(x, out), num_warps=warps)
    # Final states: the decode kernel's state shift over each sequence's tokens, without outputs;
    # sequences with no initial state read zeros.
    no_init = torch.zeros(batch, dtype=torch.int8, device=x.device) if init is None else init
    _launch_state(x, weight, bias, conv_states, cache_indices, None, query_start_loc, no_init, out, batch, 0,
                  null_block_id, (0, x.stride(0), x.stride(1)), (0, 0, 0), activation, write_out=False, tok_p2=1)
    return out
