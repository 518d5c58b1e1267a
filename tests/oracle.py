"""A naive per-token oracle for the conv ops, written from the contract alone: keep each
sequence's history as a list of input columns, append tokens one at a time, convolve the
last `width` columns. float64, loops, no shared code with the package."""

import math

import torch


def _silu(v):
    return v / (1 + torch.exp(-v))


def _run(history, tokens, weight, bias, activation, state_len):
    width = weight.shape[1]
    dim = weight.shape[0]
    outs = []
    for t in range(tokens.shape[1]):
        history.append(tokens[:, t])
        window = history[-width:]
        window = [torch.zeros(dim, dtype=torch.float64)] * (width - len(window)) + window
        y = sum(weight[:, k] * window[k] for k in range(width))
        if bias is not None:
            y = y + bias
        outs.append(_silu(y) if activation == "silu" else y)
    tail = history[-state_len:]
    tail = [torch.zeros(dim, dtype=torch.float64)] * (state_len - len(tail)) + tail
    return torch.stack(outs, 1) if outs else torch.zeros(dim, 0, dtype=torch.float64), torch.stack(tail, 1)


def update(seqs, state, weight, bias, activation, slots, accepted, null_block_id=0, indexed=True):
    """seqs: list of (dim, len) inputs; state: (num_slots, dim, state_len) logical pool, updated
    in place (float64 copy). Returns a list of outputs, None for skipped sequences."""
    w, b = weight.double(), None if bias is None else bias.double()
    state_len, width = state.shape[2], weight.shape[1]
    outs = []
    for i, x in enumerate(seqs):
        slot = slots[i]
        if (indexed and slot == null_block_id) or x.shape[1] == 0:
            outs.append(None)
            continue
        valid = state_len if accepted is None else accepted[i] + width - 2
        history = [state[slot, :, j].clone() for j in range(valid)]
        y, new = _run(history, x.double(), w, b, activation, state_len)
        state[slot] = new
        outs.append(y)
    return outs


def prefill(seqs, state, weight, bias, activation, slots, has_initial, null_block_id=0, indexed=True):
    w, b = weight.double(), None if bias is None else bias.double()
    state_len = state.shape[2]
    outs = []
    for i, x in enumerate(seqs):
        slot = slots[i]
        if (indexed and slot == null_block_id) or x.shape[1] == 0:
            outs.append(None)
            continue
        history = [state[slot, :, j].clone() for j in range(state_len)] if has_initial[i] else []
        y, new = _run(history, x.double(), w, b, activation, state_len)
        state[slot] = new
        outs.append(y)
    return outs


# ---------------------------------------------------------------- recurrent-state updates
# Naive float64 oracles for kernels/recurrent.py's two ops, from the contract alone: one
# sequence, one token, one head at a time, the state as a (rows, cols) matrix. `state` is a
# float64 copy of the logical pool, updated in place; each returns the per-sequence outputs
# (T, heads, dim), None for a skipped (null-block) sequence.

def _softplus(d: float) -> float:
    return max(d, 0.0) + math.log1p(math.exp(-abs(d)))


def _step_plan(i, slots, accepted, num_snaps, null_block_id, indexed):
    """(slot, snapshot read) of sequence i, or None when it is skipped."""
    slot = slots[i] if slots is not None else i
    if indexed and slot == null_block_id:
        return None
    return slot, (accepted[i] - 1 if accepted is not None else num_snaps - 1)


def ssm_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, slots=None, accepted=None,
               null_block_id=0):
    """state: (num_slots, num_snaps, heads, head_dim, d_state); x (batch, T, heads, head_dim),
    dt (batch, T, heads), B/C (batch, T, groups, d_state); slots/accepted: lists or None."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, tokens, heads, _ = x.shape
    per_group = heads // B.shape[2]
    num_snaps = state.shape[1]
    outs = []
    for i in range(batch):
        plan = _step_plan(i, slots, accepted, num_snaps, null_block_id, slots is not None)
        if plan is None:
            outs.append(None)
            continue
        slot, read = plan
        y = torch.zeros(tokens, heads, x.shape[3], dtype=torch.float64)
        for head in range(heads):
            h = state[slot, read, head].clone()  # (head_dim, d_state)
            group = head // per_group
            for t in range(tokens):
                d = float(dt[i, t, head]) + (float(dt_bias[head]) if dt_bias is not None else 0.0)
                if dt_softplus:
                    d = _softplus(d)
                h = math.exp(d * float(A[head])) * h + torch.outer(d * x[i, t, head], B[i, t, group])
                out = h @ C[i, t, group]
                if D is not None:
                    out = out + float(D[head]) * x[i, t, head]
                if z is not None:
                    gate = z[i, t, head].double()
                    out = out * gate / (1 + torch.exp(-gate))
                y[t, head] = out
                state[slot, num_snaps - tokens + t, head] = h
        outs.append(y)
    return outs


def delta_rule_update(state, q, k, v, g, beta, scale, slots=None, accepted=None, null_block_id=0,
                      use_qk_l2norm=False):
    """state: (num_slots, num_snaps, heads, K, V); q/k (batch, T, qk_heads, K), v (batch, T,
    heads, V), g (batch, T, heads) or (batch, T, heads, K), beta (batch, T, heads)."""
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    batch, tokens, heads, _ = v.shape
    per_qk = heads // q.shape[2]
    num_snaps = state.shape[1]
    outs = []
    for i in range(batch):
        plan = _step_plan(i, slots, accepted, num_snaps, null_block_id, slots is not None)
        if plan is None:
            outs.append(None)
            continue
        slot, read = plan
        o = torch.zeros(tokens, heads, v.shape[3], dtype=torch.float64)
        for head in range(heads):
            h = state[slot, read, head].clone()  # (K, V)
            for t in range(tokens):
                qt, kt = q[i, t, head // per_qk], k[i, t, head // per_qk]
                if use_qk_l2norm:
                    qt = qt / math.sqrt(float(qt @ qt) + 1e-6)
                    kt = kt / math.sqrt(float(kt @ kt) + 1e-6)
                if g.dim() == 4:
                    h = torch.exp(g[i, t, head])[:, None] * h
                else:
                    h = math.exp(float(g[i, t, head])) * h
                recalled = h.t() @ kt
                h = h + torch.outer(kt, (v[i, t, head] - recalled) * float(beta[i, t, head]))
                o[t, head] = h.t() @ (qt * scale)
                state[slot, num_snaps - tokens + t, head] = h
        outs.append(o)
    return outs
