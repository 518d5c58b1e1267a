"""The example models' recurrent (SSM / delta-rule) state updates, as one opaque custom op.

vLLM's model files call kernels for the scan just as for the conv; we do the same so that the
models capture to clean graphs with dynamic token counts. Each family is one `step` rule in
STEPS: `step(state, params, *inputs_t) -> (y_t, new_state)`, with y_t shaped like inputs_t[0].
The pure-torch loop over tokens is slow but exact: it is the CPU path and the oracle. On CUDA,
a step that keeps only its last state runs on FLA's maintained Triton kernels when fla-core is
installed (imported on first use; see _fla_step): Mamba2's SSD as simple GLA with a scalar
decay per head, the per-head-decay delta rule (GDN) as FLA's gated delta rule. Spec-decode steps
(every intermediate state kept), Mamba1 and KDA's per-channel decay stay on the torch loop.

A recurrent pool holds (num_spec + 1) snapshots per slot, right-aligned: after a k-token step
the state after token i sits at position num_spec + 1 - k + i. So with spec decode the state
after the last accepted token is at num_accepted_tokens - 1, and otherwise at the last one.
"""

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from layoutpass.examples.common import Batch, pad_tokens, unpad_tokens
from layoutpass.kernels.recurrent import DELTA_RULE_AXES, SSM_AXES
from layoutpass.registry import register_state, register_stride_agnostic


def _mamba1(state, params, x, dt, b, c):
    a, d = params  # (dim, n), (dim,)
    state = torch.exp(dt[..., None] * a) * state + (dt * x)[..., None] * b[:, None, :]
    return (state * c[:, None, :]).sum(-1) + d * x, state


def _mamba2(state, params, x, dt, b, c):
    a, d = params  # (heads,), (heads,); x (B, heads, head_dim), b/c (B, heads, n)
    decay = torch.exp(dt * a)[..., None, None]
    state = decay * state + (dt[..., None] * x)[..., None] * b[:, :, None, :]
    return (state * c[:, :, None, :]).sum(-1) + d[:, None] * x, state


def _delta_rule(state, params, v, q, k, beta, decay):
    """Gated delta rule (GDN: one decay per head; KDA: one per key channel)."""
    state = state * (decay[..., None] if decay.dim() == 3 else decay[..., None, None])
    recalled = (state * k[..., None]).sum(-2)
    state = state + k[..., None] * ((v - recalled) * beta[..., None])[..., None, :]
    return (state * q[..., None]).sum(-2), state


STEPS = {"mamba1": _mamba1, "mamba2": _mamba2, "delta_rule": _delta_rule}
AXES = {"mamba1": ("slot", "snap", "v", "k"), "mamba2": SSM_AXES, "delta_rule": DELTA_RULE_AXES}  # of each pool


def _mamba2_chunked(state, params, valid, x, dt, b, c, chunk: int = 128):
    """Prefill of _mamba2 over (batch, T, ...) inputs, `chunk` tokens at a time: within a chunk
    h_t = exp(L_t) h_0 + sum_{s<=t} exp(L_t - L_s) dt_s x_s b_s (L: the cumulative log decay),
    so the chunk is a few einsums instead of a Python step per token (the GPU benchmark runs
    16k-token prompts). Padding tokens get dt = 0: they neither decay nor feed the state.
    Returns (y (batch, T, heads, head_dim), the state after the last valid token)."""
    a, d = params
    dt = dt * valid[..., None]
    ys = []
    for t0 in range(0, x.shape[1], chunk):
        xs, dts, bs, cs = (u[:, t0:t0 + chunk] for u in (x, dt, b, c))
        logs = torch.cumsum(dts * a, 1)  # (batch, q, heads)
        causal = torch.ones(xs.shape[1], xs.shape[1], dtype=torch.bool, device=x.device).tril()[None, :, :, None]
        decay = torch.exp(torch.where(causal, logs[:, :, None] - logs[:, None], float("-inf")))  # (b, t, s, heads)
        mix = decay * torch.einsum("bthn,bshn->btsh", cs, bs) * dts[:, None]
        y = torch.einsum("btsh,bshp->bthp", mix, xs) + torch.einsum("bhpn,bthn->bthp", state, cs) * \
            torch.exp(logs)[..., None] + d[:, None] * xs
        tail = torch.exp(logs[:, -1:] - logs) * dts  # (b, s, heads)
        state = torch.exp(logs[:, -1])[..., None, None] * state + torch.einsum("bsh,bshp,bshn->bhpn", tail, xs, bs)
        ys.append(y)
    return torch.cat(ys, 1), state


CHUNKED = {"mamba2": _mamba2_chunked}  # prefill forms, where a family has one


@torch.library.custom_op("lp_examples::recurrence", mutates_args=("pool",))
def recurrence(kind: str, inputs: list[torch.Tensor], params: list[torch.Tensor], pool: torch.Tensor,
               slots: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor | None,
               num_accepted_tokens: torch.Tensor | None) -> torch.Tensor:
    """inputs: prefill (tokens, ...) with query_start_loc, or decode (batch, k, ...)."""
    batch = Batch(slots, context_lens, query_start_loc, num_accepted_tokens)
    one_state = query_start_loc is not None or inputs[0].shape[1] == 1
    if inputs[0].is_cuda and one_state and _fla_handles(kind, inputs) and fla_ops() is not None:
        y, state = _fla_step(kind, inputs, params, _read(pool, batch).float(), query_start_loc)
        pool[slots, pool.shape[1] - 1] = state.to(pool.dtype)
        return y
    padded = [pad_tokens(u.float(), batch)[0] for u in inputs]
    valid = pad_tokens(inputs[0], batch)[1]
    state = _read(pool, batch).float()
    params = [p.float() for p in params]
    if query_start_loc is not None and kind in CHUNKED:  # only the last state is kept
        y, state = CHUNKED[kind](state, params, valid, *padded)
        pool[slots, pool.shape[1] - 1] = state.to(pool.dtype)
        return unpad_tokens(y, batch, inputs[0].shape[0]).to(inputs[0].dtype)
    step = STEPS[kind]
    ys, lens, history = [], valid.sum(1), []
    for t in range(valid.shape[1]):
        y, new = step(state, params, *(u[:, t] for u in padded))
        state = torch.where(valid[:, t].view(-1, *[1] * (state.dim() - 1)), new, state)
        ys.append(y)
        history.append(state)
    keep = 1 if query_start_loc is not None else valid.shape[1]
    picks = (lens[:, None] - keep + torch.arange(keep, device=lens.device)).clamp(min=0)
    kept = torch.stack(history, 1)[torch.arange(lens.shape[0], device=lens.device)[:, None], picks]
    pool[slots, pool.shape[1] - keep:] = kept.to(pool.dtype)
    return unpad_tokens(torch.stack(ys, 1), batch, inputs[0].shape[0]).to(inputs[0].dtype)


@recurrence.register_fake
def _(kind, inputs, params, pool, slots, context_lens, query_start_loc, num_accepted_tokens):
    return torch.empty_like(inputs[0])


# the pass may move its pool: the op reads it by logical index, in the axes of its family
register_state(torch.ops.lp_examples.recurrence.default, "pool", lambda node: AXES.get(node.args[0]))
register_stride_agnostic(torch.ops.lp_examples.recurrence)


def _read(pool: torch.Tensor, batch: Batch) -> torch.Tensor:
    last = pool.shape[1] - 1
    if batch.num_accepted_tokens is None:
        pos = torch.full_like(batch.slots, last)
    else:
        pos = batch.num_accepted_tokens.long() - 1
    state = pool[batch.slots.long(), pos].contiguous()  # sums below then run in one order, whatever the pool's
    fresh = ~batch.has_initial_state
    return torch.where(fresh.view(-1, *[1] * (state.dim() - 1)), torch.zeros_like(state), state)


@functools.cache
def fla_ops() -> SimpleNamespace | None:
    """FLA's Triton ops (fla-core), or None where it is not installed (CPU machines, CI)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError:
        return None
    return SimpleNamespace(gla=(chunk_simple_gla, fused_recurrent_simple_gla),
                           delta_rule=(chunk_gated_delta_rule, fused_recurrent_gated_delta_rule))


def _fla_handles(kind: str, inputs: list[torch.Tensor]) -> bool:
    return kind == "mamba2" or (kind == "delta_rule" and inputs[4].dim() == inputs[0].dim() - 1)


def _fla_step(kind, inputs, params, state, query_start_loc):
    """One step on FLA's kernels from `state` (batch, heads, ., .) fp32; returns (y, final state).
    Prefill tokens (T, ...) run as one varlen sequence batch (FLA's chunked form), decode
    (batch, 1, ...) token by token (its fused recurrent form)."""
    varlen = query_start_loc is not None
    chunked, recurrent = fla_ops().gla if kind == "mamba2" else fla_ops().delta_rule
    run = functools.partial(chunked if varlen else recurrent, scale=1.0, initial_state=state.contiguous(),
                            output_final_state=True, cu_seqlens=query_start_loc.long() if varlen else None)
    seqs = (lambda t: t.unsqueeze(0)) if varlen else (lambda t: t)
    if kind == "mamba2":  # h = exp(dt a) h + (dt x) b^T, y = h c + d x: GLA with q = c, k = b, v = dt x
        x, dt, b, c = inputs
        a, d = params
        v = (dt.float()[..., None] * x.float()).to(x.dtype)
        o, state = run(seqs(c), seqs(b), seqs(v), g=seqs(dt.float() * a.float()), state_v_first=True)
        y = o.reshape(x.shape).float() + d.float()[:, None] * x.float()
    else:  # the state decays, recalls k, stores beta (v - recalled) at k; y = q . state
        v, q, k, beta, decay = inputs
        o, state = run(seqs(q), seqs(k), seqs(v), g=seqs(torch.log(decay.float())), beta=seqs(beta))
        y = o.reshape(v.shape)
    return y.to(inputs[0].dtype), state


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1).to(x.dtype)
