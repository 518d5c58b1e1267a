"""Decode-time recurrent-state updates over a slot pool, as torch.library custom ops: the Mamba2
SSM update (vLLM's `selective_state_update`) and the gated delta rule (GDN / KDA, vLLM's
`fused_recurrent_gated_delta_rule`). Triton on CUDA (kernels/triton_recurrent.py), the
pure-torch references below elsewhere.

A recurrent pool has logical axes (slot, snap, head, v, k) for the SSM update and (slot,
snap, head, k, v) for the delta rule: `k` is the key / B / d_state axis, `v` the value / x /
head_dim axis. The op always sees the pool in that logical shape; its strides say how it is
stored (like channels_last), and the kernel picks its access pattern from them: "VK" (k
contiguous: vLLM's Mamba2, SGLang's GDN), "KV" (v contiguous: FLA's), or any other strides.

Snapshots: each slot keeps `num_snaps` states, right-aligned. A step of T <= num_snaps tokens
starts from snapshot `num_accepted_tokens[b] - 1` (spec decode) or the last one, and writes
the state after token t to snapshot `num_snaps - T + t` (so the next spec step reads the
state after its last accepted token). A sequence whose slot is `null_block_id` (only with
explicit slot indices) is skipped: its state and its output rows are left untouched.
fp32 accumulation; the states are stored back in the pool's dtype."""

import torch
import torch.nn.functional as F

from . import triton_recurrent
from .checks import FLOAT_DTYPES, check_float, check_index, check_slots
from layoutpass.errors import ArgumentError
from layoutpass.registry import register_state

SSM_AXES = ("slot", "snap", "head", "v", "k")  # the axes selective_state_update reads its state in
DELTA_RULE_AXES = ("slot", "snap", "head", "k", "v")  # and delta_rule_update


# ---------------------------------------------------------------- checks

def _shape(name: str, t: torch.Tensor | None, shape: tuple, what: str = "") -> None:
    """t must be a float tensor of exactly `shape` (skipped when t is None)."""
    if t is None:
        return
    check_float(name, t, len(shape))
    if tuple(t.shape) != tuple(shape):
        raise ArgumentError(name, f"expected {what or tuple(shape)}, got {tuple(t.shape)}")


def _same_device(state: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != state.device:
            raise ArgumentError(name, f"on {t.device}, but the state pool is on {state.device}")


def _check_pool(name: str, state: torch.Tensor, batch: int, tokens: int, indices_name: str,
                indices: torch.Tensor | None, num_accepted_tokens: torch.Tensor | None) -> None:
    num_slots, num_snaps = state.shape[:2]
    if tokens > num_snaps:
        raise ArgumentError(name, f"{tokens} tokens per sequence, but the pool keeps {num_snaps} snapshots per slot")
    check_index(indices_name, indices, batch)
    check_index("num_accepted_tokens", num_accepted_tokens, batch)
    if indices is None and batch > num_slots:
        raise ArgumentError("state", f"{num_slots} slots for a batch of {batch} without {indices_name}")


def _check_ssu(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, num_accepted_tokens, out) -> None:
    check_float("state", state, 5)
    check_float("x", x, 4)
    batch, tokens, heads, head_dim = x.shape
    if tuple(state.shape[2:4]) != (heads, head_dim):
        raise ArgumentError("state", f"expected (num_slots, num_snaps, heads={heads}, head_dim={head_dim}, d_state), "
                                     f"got {tuple(state.shape)}")
    d_state = state.shape[4]
    _shape("dt", dt, (batch, tokens, heads))
    _shape("A", A, (heads,))
    check_float("B", B, 4)
    groups = B.shape[2]
    if tuple(B.shape) != (batch, tokens, groups, d_state) or groups == 0 or heads % groups:
        raise ArgumentError("B", f"expected (batch={batch}, T={tokens}, groups, d_state={d_state}) with groups "
                                 f"dividing heads={heads}, got {tuple(B.shape)}")
    _shape("C", C, tuple(B.shape), "B's shape " + str(tuple(B.shape)))
    _shape("D", D, (heads,))
    _shape("z", z, tuple(x.shape), "x's shape " + str(tuple(x.shape)))
    _shape("dt_bias", dt_bias, (heads,))
    _check_pool("x", state, batch, tokens, "state_batch_indices", state_batch_indices, num_accepted_tokens)
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        raise ArgumentError("out", f"expected {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    _same_device(state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, out=out,
                 state_batch_indices=state_batch_indices, num_accepted_tokens=num_accepted_tokens)


def _check_delta(state, q, k, v, g, beta, state_indices, num_accepted_tokens, out) -> None:
    check_float("state", state, 5)
    check_float("v", v, 4)
    batch, tokens, heads, V = v.shape
    if state.shape[2] != heads or state.shape[4] != V:
        raise ArgumentError("state", f"expected (num_slots, num_snaps, heads={heads}, K, V={V}), "
                                     f"got {tuple(state.shape)}")
    K = state.shape[3]
    check_float("q", q, 4)
    qk_heads = q.shape[2]
    if tuple(q.shape) != (batch, tokens, qk_heads, K) or qk_heads == 0 or heads % qk_heads:
        raise ArgumentError("q", f"expected (batch={batch}, T={tokens}, qk_heads, K={K}) with qk_heads dividing "
                                 f"heads={heads}, got {tuple(q.shape)}")
    _shape("k", k, tuple(q.shape), "q's shape " + str(tuple(q.shape)))
    check_float("g", g, g.dim())
    if tuple(g.shape) not in ((batch, tokens, heads), (batch, tokens, heads, K)):
        raise ArgumentError("g", f"expected (batch, T, heads) = {(batch, tokens, heads)} (GDN) or "
                                 f"(batch, T, heads, K) = {(batch, tokens, heads, K)} (KDA), got {tuple(g.shape)}")
    _shape("beta", beta, (batch, tokens, heads))
    _check_pool("v", state, batch, tokens, "state_indices", state_indices, num_accepted_tokens)
    if tuple(out.shape) != tuple(v.shape) or out.dtype != v.dtype:
        raise ArgumentError("out", f"expected {tuple(v.shape)} {v.dtype}, got {tuple(out.shape)} {out.dtype}")
    _same_device(state, q=q, k=k, v=v, g=g, beta=beta, out=out, state_indices=state_indices,
                 num_accepted_tokens=num_accepted_tokens)


def _check_values(state, indices_name, indices, num_accepted_tokens, null_block_id) -> None:
    """Slot indices inside the pool (or null), accepted counts in 1..num_snaps for the live
    sequences (reads values: the CPU path only, as in vLLM)."""
    check_slots(indices_name, indices, state.shape[0], null_block_id)
    if num_accepted_tokens is not None and num_accepted_tokens.numel():
        live = torch.ones_like(num_accepted_tokens, dtype=torch.bool) if indices is None else indices != null_block_id
        bad = live & ((num_accepted_tokens < 1) | (num_accepted_tokens > state.shape[1]))
        if bool(bad.any()):
            raise ArgumentError("num_accepted_tokens", f"values must lie in 1..{state.shape[1]} (num_snaps), "
                                                       f"got {int(num_accepted_tokens[bad][0])}")


# ---------------------------------------------------------------- pure-torch references

def _live(batch: int, indices, num_accepted_tokens, num_snaps: int, null_block_id: int, device):
    """The live sequences, their slots and the snapshot each starts from (int64 tensors)."""
    slots = torch.arange(batch, device=device) if indices is None else indices.long()
    seqs = torch.arange(batch, device=device) if indices is None else (slots != null_block_id).nonzero().squeeze(1)
    start = (torch.full((batch,), num_snaps - 1, device=device) if num_accepted_tokens is None
             else num_accepted_tokens.long() - 1)
    return seqs, slots[seqs], start[seqs]


def ssu_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, num_accepted_tokens,
                  null_block_id, out) -> None:
    """The SSM update in pure torch: any strides, vectorized over the batch, one token at a time."""
    batch, tokens, heads, _ = x.shape
    num_snaps = state.shape[1]
    seqs, slots, start = _live(batch, state_batch_indices, num_accepted_tokens, num_snaps, null_block_id, x.device)
    if seqs.numel() == 0 or tokens == 0:
        return
    ratio = heads // B.shape[2]
    h = state[slots, start].float().contiguous()  # (n, heads, head_dim, d_state), in logical order
    a = A.float()
    for t in range(tokens):
        d = dt[seqs, t].float()
        if dt_bias is not None:
            d = d + dt_bias.float()
        if dt_softplus:
            d = F.softplus(d)
        xt = x[seqs, t].float()
        bt = B[seqs, t].float().repeat_interleave(ratio, dim=1)
        ct = C[seqs, t].float().repeat_interleave(ratio, dim=1)
        h = torch.exp(d * a)[..., None, None] * h + (d[..., None] * xt)[..., None] * bt[:, :, None, :]
        y = (h * ct[:, :, None, :]).sum(-1)
        if D is not None:
            y = y + D.float()[:, None] * xt
        if z is not None:
            y = y * F.silu(z[seqs, t].float())
        out[seqs, t] = y.to(out.dtype)
        state[slots, num_snaps - tokens + t] = h.to(state.dtype)


def l2norm(t: torch.Tensor) -> torch.Tensor:
    """The in-kernel q/k normalization (FLA's and vLLM's): t / sqrt(sum(t^2) + 1e-6) over K, fp32."""
    t = t.float()
    return t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)


def delta_rule_reference(state, q, k, v, g, beta, scale, state_indices, num_accepted_tokens, null_block_id,
                         use_qk_l2norm, out) -> None:
    """The gated delta rule in pure torch: any strides, vectorized over the batch, one token at a time."""
    batch, tokens, heads, _ = v.shape
    num_snaps = state.shape[1]
    seqs, slots, start = _live(batch, state_indices, num_accepted_tokens, num_snaps, null_block_id, v.device)
    if seqs.numel() == 0 or tokens == 0:
        return
    ratio = heads // q.shape[2]
    h = state[slots, start].float().contiguous()  # (n, heads, K, V), in logical order
    for t in range(tokens):
        qt = q[seqs, t].float().repeat_interleave(ratio, dim=1)
        kt = k[seqs, t].float().repeat_interleave(ratio, dim=1)
        if use_qk_l2norm:
            qt, kt = l2norm(qt), l2norm(kt)
        decay = torch.exp(g[seqs, t].float())
        h = h * (decay[..., None] if g.dim() == 4 else decay[..., None, None])
        recalled = (h * kt[..., None]).sum(-2)
        h = h + kt[..., None] * ((v[seqs, t].float() - recalled) * beta[seqs, t].float()[..., None])[..., None, :]
        out[seqs, t] = (h * (qt * scale)[..., None]).sum(-2).to(out.dtype)
        state[slots, num_snaps - tokens + t] = h.to(state.dtype)


# ---------------------------------------------------------------- the public ops
# Triton on CUDA, the reference elsewhere; opaque custom ops, as the conv's (kernels/ops.py).

@torch.library.custom_op("layoutpass::selective_state_update", mutates_args=("state", "out"))
def selective_state_update_op(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                              B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                              dt_bias: torch.Tensor | None, dt_softplus: bool,
                              state_batch_indices: torch.Tensor | None, num_accepted_tokens: torch.Tensor | None,
                              null_block_id: int, out: torch.Tensor) -> None:
    _check_ssu(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, num_accepted_tokens, out)
    if state.is_cuda:
        triton_recurrent.ssu(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
                             num_accepted_tokens, null_block_id, out)
        return
    _check_values(state, "state_batch_indices", state_batch_indices, num_accepted_tokens, null_block_id)
    ssu_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, num_accepted_tokens,
                  null_block_id, out)


@selective_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, num_accepted_tokens, null_block_id,
      out):
    _check_ssu(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, num_accepted_tokens, out)


@torch.library.custom_op("layoutpass::delta_rule_update", mutates_args=("state", "out"))
def delta_rule_update_op(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         beta: torch.Tensor, scale: float, state_indices: torch.Tensor | None,
                         num_accepted_tokens: torch.Tensor | None, null_block_id: int, use_qk_l2norm: bool,
                         out: torch.Tensor) -> None:
    _check_delta(state, q, k, v, g, beta, state_indices, num_accepted_tokens, out)
    if state.is_cuda:
        triton_recurrent.delta_rule(state, q, k, v, g, beta, scale, state_indices, num_accepted_tokens,
                                    null_block_id, use_qk_l2norm, out)
        return
    _check_values(state, "state_indices", state_indices, num_accepted_tokens, null_block_id)
    delta_rule_reference(state, q, k, v, g, beta, scale, state_indices, num_accepted_tokens, null_block_id,
                         use_qk_l2norm, out)


@delta_rule_update_op.register_fake
def _(state, q, k, v, g, beta, scale, state_indices, num_accepted_tokens, null_block_id, use_qk_l2norm, out):
    _check_delta(state, q, k, v, g, beta, state_indices, num_accepted_tokens, out)


register_state(torch.ops.layoutpass.selective_state_update.default, "state", SSM_AXES)
register_state(torch.ops.layoutpass.delta_rule_update.default, "state", DELTA_RULE_AXES)


def _new_out(like: torch.Tensor) -> torch.Tensor:
    """A zero-filled output shaped like `like` (skipped sequences read zeros)."""
    if not isinstance(like, torch.Tensor) or like.dtype not in FLOAT_DTYPES:
        return like  # the op's checks name the argument
    return torch.zeros(like.shape, dtype=like.dtype, device=like.device)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None, num_accepted_tokens=None, null_block_id=0, out=None):
    """One decode step of Mamba2's SSM over a state pool, in place (vLLM's `selective_state_update`
    with a snapshot axis and a single token count per step).

    state: (num_slots, num_snaps, heads, head_dim, d_state), any strides, fp32/fp16/bf16.
    x: (batch, T, heads, head_dim); dt: (batch, T, heads); A: (heads,); B, C: (batch, T, groups,
    d_state), head h reading group h // (heads // groups); D: (heads,) or None; z: like x or
    None; dt_bias: (heads,) or None. Per token: d = dt (+ dt_bias) (softplus'd if dt_softplus);
    h = exp(d A) h + (d x) B^T; y = h C (+ D x), times silu(z) if z is given.
    state_batch_indices: (batch,) slot per sequence (default b); num_accepted_tokens: (batch,)
    for spec decode; snapshots and null_block_id as in the module doc.
    out: (batch, T, heads, head_dim) in x's dtype, must not overlap the inputs (default: a new
    zero-filled tensor). Returns out."""
    out = _new_out(x) if out is None else out
    selective_state_update_op(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), state_batch_indices,
                              num_accepted_tokens, null_block_id, out)
    return out


def delta_rule_update(state, q, k, v, g, beta, scale=None, state_indices=None, num_accepted_tokens=None,
                      null_block_id=0, use_qk_l2norm=False, out=None):
    """One decode step of the gated delta rule over a state pool, in place (vLLM's
    `fused_recurrent_gated_delta_rule` / `fused_recurrent_kda` with a snapshot axis).

    state: (num_slots, num_snaps, heads, K, V), any strides, fp32/fp16/bf16.
    q, k: (batch, T, qk_heads, K), qk_heads dividing heads (value head h reads q/k head
    h // (heads // qk_heads)); v: (batch, T, heads, V); g: the log decay, (batch, T, heads)
    (GDN) or (batch, T, heads, K) (KDA: one per key channel); beta: (batch, T, heads).
    scale: default K ** -0.5. use_qk_l2norm: q and k normalized over K inside the kernel, as
    t / sqrt(sum(t^2) + 1e-6) in fp32 (FLA's and vLLM's). Per token: h *= exp(g); h += k ((v -
    h^T k) beta)^T; o = h^T q scale. state_indices, num_accepted_tokens, null_block_id,
    snapshots: as in the module doc. out: (batch, T, heads, V) in v's dtype, must not overlap
    the inputs (default: a new zero-filled tensor). Returns out."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out = _new_out(v) if out is None else out
    delta_rule_update_op(state, q, k, v, g, beta, float(scale), state_indices, num_accepted_tokens, null_block_id,
                         bool(use_qk_l2norm), out)
    return out
