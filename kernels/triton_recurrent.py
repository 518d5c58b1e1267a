"""Triton decode kernels for the recurrent-state ops (kernels/recurrent.py has the contract):
the Mamba2 SSM update and the gated delta rule (GDN, KDA), reading and writing a pool of
per-slot states in place, in whatever strides the pool has.

One program per (sequence, head, block of BLOCK_V values): it reads its slot index, returns
at once for the null block, loads its (BLOCK_V x K) piece of the state once, runs the tokens
in fp32 registers, and writes each token's state (a snapshot) and output straight back: no
gather, no scatter, no fp32 copy of the pool. Programs are numbered value block fastest, then
head, then sequence, so neighbouring programs touch neighbouring memory of one slot.

The access pattern follows the pool's memory order, a compile-time ORDER chosen on the host
from the strides (like channels_last):
  VK  (k contiguous: vLLM's Mamba2 (heads, head_dim, d_state), SGLang's GDN): the tile is
      [BLOCK_V, K] with k fastest, so each thread moves 16-byte vectors along k; the sums over
      k stay inside a warp;
  KV  (v contiguous: FLA's (heads, K, V)): the tile is [K, BLOCK_V] with v fastest; the sums
      over k run down the tile's rows;
  ANY (neither unit-stride): the VK tile with both strides applied, correct for any strides.
The elementwise arithmetic is written the same way for every order, so where a result does
not pass through a sum over k (the SSM state, for any number of tokens) the orders agree bit
for bit; the sums themselves are reduced in layout-dependent order.

Offsets: slot, snapshot, head, sequence and token offsets are 64-bit scalars always (a pool
may span more than 2^31 elements); the offsets inside one tile or one input row are 32-bit
unless such a row itself can pass 2^31 elements (WIDE, practically never).
Block shapes are data (BLOCKS), picked on the host; nothing autotunes at call time (CUDA-graph
friendly: no host sync, no .item())."""

import torch
import triton
import triton.language as tl

VK, KV, ANY = 0, 1, 2
ORDER_NAMES = {VK: "VK", KV: "KV", ANY: "any"}


@triton.jit
def _tile_offsets(rv, rk, s_v, s_k, ORDER: tl.constexpr):
    """Element offsets of the (v, k) tile in the tile's orientation (see the module doc)."""
    if ORDER == 0:
        off = rv[:, None] * s_v + rk[None, :]
    elif ORDER == 1:
        off = rk[:, None] * s_k + rv[None, :]
    else:
        off = rv[:, None] * s_v + rk[None, :] * s_k
    return off


@triton.jit
def _along_v(vec, ORDER: tl.constexpr):
    """A vector over v, broadcast along the tile's k axis."""
    if ORDER == 1:
        out = vec[None, :]
    else:
        out = vec[:, None]
    return out


@triton.jit
def _along_k(vec, ORDER: tl.constexpr):
    """A vector over k, broadcast along the tile's v axis."""
    if ORDER == 1:
        out = vec[:, None]
    else:
        out = vec[None, :]
    return out


@triton.jit
def _sum_k(tile, ORDER: tl.constexpr):
    if ORDER == 1:
        out = tl.sum(tile, axis=0)
    else:
        out = tl.sum(tile, axis=1)
    return out


@triton.jit
def _program(heads, nvb, BLOCK_V: tl.constexpr, BK: tl.constexpr, WIDE: tl.constexpr):
    """(sequence, head, v offsets, k offsets) of this program; sequence as int64."""
    pid = tl.program_id(0)
    vb = pid % nvb
    rest = pid // nvb
    head = rest % heads
    seq = (rest // heads).to(tl.int64)
    rv = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    rk = tl.arange(0, BK)
    if WIDE:
        rv, rk = rv.to(tl.int64), rk.to(tl.int64)
    return seq, head.to(tl.int64), rv, rk


@triton.jit
def _slot_and_start(seq, idx_ptr, acc_ptr, snaps, null_block_id, HAS_INDICES: tl.constexpr, SPEC: tl.constexpr):
    """The sequence's slot and the snapshot its initial state is read from (int64); `live`
    is false for a null-block sequence."""
    slot = seq
    live = True
    if HAS_INDICES:
        slot = tl.load(idx_ptr + seq).to(tl.int64)
        live = slot != null_block_id
    if SPEC:
        start = tl.load(acc_ptr + seq).to(tl.int64) - 1
    else:
        start = seq * 0 + snaps - 1
    return slot, start, live


@triton.jit
def _ssu_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, idx_ptr, acc_ptr, out_ptr,
    heads, V, K, nvb, ratio, snaps, null_block_id,
    ss_slot, ss_snap, ss_head, ss_v, ss_k,
    sx_b, sx_t, sx_h, sx_v,
    sdt_b, sdt_t, sdt_h,
    s_A, s_D, s_dtb,
    sB_b, sB_t, sB_g, sB_k,
    sC_b, sC_t, sC_g, sC_k,
    sz_b, sz_t, sz_h, sz_v,
    so_b, so_t, so_h, so_v,
    ORDER: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_INDICES: tl.constexpr, SPEC: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_V: tl.constexpr, BK: tl.constexpr, WIDE: tl.constexpr, PDL: tl.constexpr,
):
    """Mamba2 selective state update of one (sequence, head, value block): per token
    d = softplus(dt + dt_bias); h = exp(d A) h + (d x) B^T; y = h C + D x, times silu(z)."""
    if PDL:  # programmatic dependent launch: set up while the previous kernel drains
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq, head, rv, rk = _program(heads, nvb, BLOCK_V, BK, WIDE)
    slot, start, live = _slot_and_start(seq, idx_ptr, acc_ptr, snaps, null_block_id, HAS_INDICES, SPEC)
    if live:
        mv, mk = rv < V, rk < K
        mask = _along_v(mv, ORDER) & _along_k(mk, ORDER)
        s_base = state_ptr + slot * ss_slot + head * ss_head
        tile = _tile_offsets(rv, rk, ss_v, ss_k, ORDER)
        h = tl.load(s_base + start * ss_snap + tile, mask=mask, other=0.0, eviction_policy="evict_first")
        h = h.to(tl.float32)
        a = tl.load(A_ptr + head * s_A).to(tl.float32)
        if HAS_DT_BIAS:
            dt_bias = tl.load(dt_bias_ptr + head * s_dtb).to(tl.float32)
        if HAS_D:
            d_skip = tl.load(D_ptr + head * s_D).to(tl.float32)
        group = head // ratio
        x_row = x_ptr + seq * sx_b + head * sx_h
        dt_row = dt_ptr + seq * sdt_b + head * sdt_h
        b_row = B_ptr + seq * sB_b + group * sB_g
        c_row = C_ptr + seq * sC_b + group * sC_g
        if HAS_Z:
            z_row = z_ptr + seq * sz_b + head * sz_h
        o_row = out_ptr + seq * so_b + head * so_h
        for t in tl.static_range(TOKENS):
            t64 = seq * 0 + t  # int64
            xv = tl.load(x_row + t64 * sx_t + rv * sx_v, mask=mv, other=0.0).to(tl.float32)
            bk = tl.load(b_row + t64 * sB_t + rk * sB_k, mask=mk, other=0.0).to(tl.float32)
            ck = tl.load(c_row + t64 * sC_t + rk * sC_k, mask=mk, other=0.0).to(tl.float32)
            d = tl.load(dt_row + t64 * sdt_t).to(tl.float32)
            if HAS_DT_BIAS:
                d = d + dt_bias
            if SOFTPLUS:
                d = tl.where(d <= 20.0, tl.log(1.0 + tl.exp(d)), d)
            h = h * tl.exp(d * a) + _along_v(d * xv, ORDER) * _along_k(bk, ORDER)
            y = _sum_k(h * _along_k(ck, ORDER), ORDER)
            if HAS_D:
                y = y + d_skip * xv
            if HAS_Z:
                zv = tl.load(z_row + t64 * sz_t + rv * sz_v, mask=mv, other=0.0).to(tl.float32)
                y = y * (zv / (1.0 + tl.exp(-zv)))
            tl.store(o_row + t64 * so_t + rv * so_v, y.to(out_ptr.dtype.element_ty), mask=mv)
            tl.store(s_base + (snaps - TOKENS + t64) * ss_snap + tile, h.to(state_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _delta_kernel(
    state_ptr, q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, idx_ptr, acc_ptr, out_ptr,
    heads, V, K, nvb, ratio, snaps, null_block_id, scale,
    ss_slot, ss_snap, ss_head, ss_k, ss_v,
    sq_b, sq_t, sq_h, sq_k,
    sk_b, sk_t, sk_h, sk_k,
    sv_b, sv_t, sv_h, sv_v,
    sg_b, sg_t, sg_h, sg_k,
    sbeta_b, sbeta_t, sbeta_h,
    so_b, so_t, so_h, so_v,
    ORDER: tl.constexpr, KDA: tl.constexpr, L2NORM: tl.constexpr, HAS_INDICES: tl.constexpr,
    SPEC: tl.constexpr, TOKENS: tl.constexpr, BLOCK_V: tl.constexpr, BK: tl.constexpr, WIDE: tl.constexpr,
    PDL: tl.constexpr,
):
    """Gated delta rule of one (sequence, value head, value block): per token
    h *= exp(g) (per head, or per key row for KDA); h += k ((v - h^T k) beta)^T; o = h^T q scale.
    Query/key head: head // ratio (grouped value heads)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq, head, rv, rk = _program(heads, nvb, BLOCK_V, BK, WIDE)
    slot, start, live = _slot_and_start(seq, idx_ptr, acc_ptr, snaps, null_block_id, HAS_INDICES, SPEC)
    if live:
        mv, mk = rv < V, rk < K
        mask = _along_v(mv, ORDER) & _along_k(mk, ORDER)
        s_base = state_ptr + slot * ss_slot + head * ss_head
        tile = _tile_offsets(rv, rk, ss_v, ss_k, ORDER)
        h = tl.load(s_base + start * ss_snap + tile, mask=mask, other=0.0, eviction_policy="evict_first")
        h = h.to(tl.float32)
        qk_head = head // ratio
        q_row = q_ptr + seq * sq_b + qk_head * sq_h
        k_row = k_ptr + seq * sk_b + qk_head * sk_h
        v_row = v_ptr + seq * sv_b + head * sv_h
        g_row = g_ptr + seq * sg_b + head * sg_h
        beta_row = beta_ptr + seq * sbeta_b + head * sbeta_h
        o_row = out_ptr + seq * so_b + head * so_h
        for t in tl.static_range(TOKENS):
            t64 = seq * 0 + t  # int64
            qv = tl.load(q_row + t64 * sq_t + rk * sq_k, mask=mk, other=0.0).to(tl.float32)
            kv = tl.load(k_row + t64 * sk_t + rk * sk_k, mask=mk, other=0.0).to(tl.float32)
            vv = tl.load(v_row + t64 * sv_t + rv * sv_v, mask=mv, other=0.0).to(tl.float32)
            beta = tl.load(beta_row + t64 * sbeta_t).to(tl.float32)
            if KDA:
                gk = tl.load(g_row + t64 * sg_t + rk * sg_k, mask=mk, other=0.0).to(tl.float32)
                h = h * _along_k(tl.exp(gk), ORDER)
            else:
                h = h * tl.exp(tl.load(g_row + t64 * sg_t).to(tl.float32))
            if L2NORM:
                qv = qv / tl.sqrt(tl.sum(qv * qv) + 1e-6)
                kv = kv / tl.sqrt(tl.sum(kv * kv) + 1e-6)
            qv = qv * scale
            recalled = _sum_k(h * _along_k(kv, ORDER), ORDER)
            h = h + _along_k(kv, ORDER) * _along_v((vv - recalled) * beta, ORDER)
            o = _sum_k(h * _along_k(qv, ORDER), ORDER)
            tl.store(o_row + t64 * so_t + rv * so_v, o.to(out_ptr.dtype.element_ty), mask=mv)
            tl.store(s_base + (snaps - TOKENS + t64) * ss_snap + tile, h.to(state_ptr.dtype.element_ty), mask=mask)


# Block shapes, as data: BLOCKS[(op, order, state element bytes)], op "ssu", "gdn" or "kda",
# is a list of (largest batch * heads, BLOCK_V, num_warps); the first row that fits wins.
# BLOCK_V is cut to the value axis' power of two. Aim: a state tile of 2-8 KB and 16-32
# elements per thread, so that many small programs keep enough bytes in flight on every SM;
# in the KV order, rows of BLOCK_V values of at least 64 bytes. The winners of a sweep on an
# H200 (benchmarks/recurrent.py --sweep-only times the alternatives on the card and writes the
# table to ship: results/recurrent_blocks.json, recurrent_sweep.log).
_DELTA = {  # swept on an H200 (benchmarks/recurrent.py --sweep-only, B=64/256/1024, results/recurrent_blocks.json)
    (VK, 4): [(1 << 62, 32, 8)], (KV, 4): [(1 << 62, 64, 4)], (VK, 2): [(1 << 62, 16, 1)],
}
BLOCKS = {  # (op, order, state element bytes) -> [(most batch * heads, BLOCK_V, num_warps), ...]
    ("ssu", VK, 4): [(5120, 8, 1), (1 << 62, 16, 1)],
    ("ssu", KV, 4): [(1 << 62, 64, 4)],
    ("ssu", VK, 2): [(20480, 16, 2), (1 << 62, 32, 2)],
    ("ssu", KV, 2): [(1 << 62, 64, 8)],
    **{("gdn", order, elem): rows for (order, elem), rows in _DELTA.items()},
    **{("kda", order, elem): rows for (order, elem), rows in _DELTA.items()},  # the same kernel
    ("gdn", KV, 2): [(1 << 62, 32, 1)],  # bf16 KV: results/recurrent_blocks_bf16_delta_2026-12-05.json
    ("kda", KV, 2): [(1 << 62, 32, 2)],
}
ANY_BLOCK = (16, 4)  # the any-strides path: correct, not tuned
PDL = True


def order_of(s_v: int, s_k: int) -> int:
    """The pool's memory order from its v and k strides: VK (k contiguous), KV (v contiguous),
    else ANY."""
    return VK if s_k == 1 else KV if s_v == 1 else ANY


def config(op: str, order: int, elem: int, rows: int, V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for `rows` = batch * heads programs' worth of (sequence, head)."""
    if order == ANY:
        block_v, warps = ANY_BLOCK
    else:
        block_v, warps = next((b, w) for most, b, w in BLOCKS[(op, order, elem)] if rows <= most)
    return min(block_v, triton.next_power_of_2(V)), warps


def _wide(*extents: tuple[tuple[int, int], ...]) -> bool:
    """Whether an offset inside one tile or one input row can pass int32: each argument is
    one row's ((size, stride), ...)."""
    return any(sum((n - 1) * abs(s) for n, s in row if n) >= 2**31 for row in extents)


def _pdl(t: torch.Tensor) -> bool:
    return PDL and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def ssu(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, num_accepted_tokens,
        null_block_id, out) -> None:
    """Launch the SSM update; arguments as kernels/recurrent.py's selective_state_update
    (checked there). state: (num_slots, num_snaps, heads, head_dim, d_state) view."""
    batch, T, heads, V = x.shape
    K = state.shape[4]
    if batch == 0 or T == 0:
        return
    order = order_of(state.stride(3), state.stride(4))
    block_v, warps = config("ssu", order, state.element_size(), batch * heads, V)
    nvb = triton.cdiv(V, block_v)
    zs = z.stride() if z is not None else (0, 0, 0, 0)
    wide = _wide(((V, state.stride(3)), (K, state.stride(4))), ((V, x.stride(3)),), ((V, out.stride(3)),),
                 ((K, B.stride(3)),), ((K, C.stride(3)),), ((V, zs[3]),))
    pdl = _pdl(state)
    _ssu_kernel[(batch * heads * nvb,)](
        state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, num_accepted_tokens, out,
        heads, V, K, nvb, heads // B.shape[2], state.shape[1], null_block_id,
        *state.stride(), *x.stride(), *dt.stride(),
        A.stride(0), D.stride(0) if D is not None else 0, dt_bias.stride(0) if dt_bias is not None else 0,
        *B.stride(), *C.stride(), *zs, *out.stride(),
        ORDER=order, HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), HAS_INDICES=state_batch_indices is not None,
        SPEC=num_accepted_tokens is not None, TOKENS=T, BLOCK_V=block_v, BK=triton.next_power_of_2(K), WIDE=wide,
        PDL=pdl, num_warps=warps, **(dict(launch_pdl=True) if pdl else {}))


def delta_rule(state, q, k, v, g, beta, scale, state_indices, num_accepted_tokens, null_block_id,
               use_qk_l2norm, out) -> None:
    """Launch the gated delta rule; arguments as kernels/recurrent.py's delta_rule_update
    (checked there). state: (num_slots, num_snaps, heads, K, V) view."""
    batch, T, heads, V = v.shape
    K = state.shape[3]
    if batch == 0 or T == 0:
        return
    order = order_of(state.stride(4), state.stride(3))
    kda = g.dim() == 4
    block_v, warps = config("kda" if kda else "gdn", order, state.element_size(), batch * heads, V)
    nvb = triton.cdiv(V, block_v)
    gs = g.stride() if kda else (*g.stride(), 0)
    wide = _wide(((K, state.stride(3)), (V, state.stride(4))), ((K, q.stride(3)),), ((K, k.stride(3)),),
                 ((V, v.stride(3)),), ((V, out.stride(3)),), ((K if kda else 1, gs[3]),))
    pdl = _pdl(state)
    _delta_kernel[(batch * heads * nvb,)](
        state, q, k, v, g, beta, state_indices, num_accepted_tokens, out,
        heads, V, K, nvb, heads // q.shape[2], state.shape[1], null_block_id, float(scale),
        *state.stride(), *q.stride(), *k.stride(), *v.stride(), *gs, *beta.stride(), *out.stride(),
        ORDER=order, KDA=kda, L2NORM=bool(use_qk_l2norm), HAS_INDICES=state_indices is not None,
        SPEC=num_accepted_tokens is not None, TOKENS=T, BLOCK_V=block_v, BK=triton.next_power_of_2(K), WIDE=wide,
        PDL=pdl, num_warps=warps, **(dict(launch_pdl=True) if pdl else {}))
