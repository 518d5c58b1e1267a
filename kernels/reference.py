"""Pure-torch conv update and prefill: any strides, any device. The CPU path and the oracle
the Triton kernels are tested against.

One idea carries both ops. A sequence's *history* is every input it has seen, oldest first.
The pool keeps its last inputs along the token axis; the valid history in the pool ends at
column `h`:
  * prefill and plain decode: `h = state_len` (the pool is right-aligned, newest last);
  * spec decode: `h = num_accepted_tokens + width - 2`, i.e. the window starts at column
    `num_accepted_tokens - 1` and the columns after `h` hold rejected drafts (vLLM's rule,
    which assumes each spec step carries `state_len - width + 2` tokens).
A step appends its tokens to `pool[:, :h]`, convolves each token with the `width - 1` inputs
before it, and keeps the last `state_len` inputs as the new, right-aligned state. History that
was never seen (a fresh sequence, or a step too short to fill the state) reads as zeros.
"""

import torch
import torch.nn.functional as F


def conv_update(x, conv_state, weight, bias, activation, conv_state_indices, num_accepted_tokens,
                query_start_loc, null_block_id, out) -> None:
    """Decode step; see kernels/ops.py for the argument contract. Writes conv_state and out."""
    xs, lens, token_rows = _padded(x, query_start_loc)
    batch, state_len = xs.shape[0], conv_state.shape[2]
    slots = torch.arange(batch, device=x.device) if conv_state_indices is None else conv_state_indices.long()
    live = lens > 0
    if conv_state_indices is not None:
        live &= slots != null_block_id
    seqs = live.nonzero().squeeze(1)
    if seqs.numel() == 0:
        return
    slots, lens = slots[seqs], lens[seqs]
    if num_accepted_tokens is None:
        ends = torch.full_like(lens, state_len)
    else:
        ends = num_accepted_tokens.long()[seqs] + weight.shape[1] - 2
    y, new_state = _conv(conv_state[slots].float(), xs[seqs].float(), lens, ends, weight, bias, activation)
    conv_state[slots] = new_state.to(conv_state.dtype)
    _write_outputs(out, y.to(out.dtype), seqs, lens, token_rows)


def conv_prefill(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state,
                 activation, null_block_id) -> torch.Tensor:
    """Varlen prefill over x (dim, total_tokens); writes the final states, returns the output."""
    out = torch.zeros_like(x)
    xs, lens, token_rows = _padded(x.t(), query_start_loc)
    batch, state_len = xs.shape[0], conv_states.shape[2]
    slots = torch.arange(batch, device=x.device) if cache_indices is None else cache_indices.long()
    live = lens > 0
    if cache_indices is not None:
        live &= slots != null_block_id
    seqs = live.nonzero().squeeze(1)
    if seqs.numel() == 0:
        return out
    slots, lens = slots[seqs], lens[seqs]
    init = conv_states[slots].float()
    if has_initial_state is None:
        init.zero_()
    else:
        init *= has_initial_state[seqs].to(init.dtype)[:, None, None]
    ends = torch.full_like(lens, state_len)
    y, new_state = _conv(init, xs[seqs].float(), lens, ends, weight, bias, activation)
    conv_states[slots] = new_state.to(conv_states.dtype)
    _write_outputs(out.t(), y.to(out.dtype), seqs, lens, token_rows)
    return out


def _padded(x, query_start_loc):
    """x as (batch, dim, max_len) plus each sequence's length and, for varlen x (tokens, dim),
    the row of x each padded token came from."""
    if query_start_loc is not None:
        starts = query_start_loc[:-1].long()
        lens = query_start_loc[1:].long() - starts
        max_len = int(lens.max()) if lens.numel() else 0
        rows = starts[:, None] + torch.arange(max_len, device=x.device)
        rows = rows.clamp(max=max(x.shape[0] - 1, 0))
        return x[rows].permute(0, 2, 1), lens, rows
    xs = x.unsqueeze(-1) if x.dim() == 2 else x
    return xs, torch.full((xs.shape[0],), xs.shape[2], device=x.device), None


def _conv(state, xs, lens, ends, weight, bias, activation):
    """state (n, dim, state_len) and xs (n, dim, L), fp32. Returns y (n, dim, L) and the new
    state. `ends[i]` is where sequence i's valid history stops in its state."""
    n, dim, state_len = state.shape
    width, seqlen = weight.shape[1], xs.shape[2]
    # One buffer holds the state, the new tokens and a zero column for never-seen history.
    buf = torch.cat([state, xs, state.new_zeros(n, dim, 1)], dim=2)

    def history(pos):  # pos (n, P): positions in the history, 0 = first state column
        col = torch.where(pos < ends[:, None], pos, pos - ends[:, None] + state_len)
        col = torch.where(pos < 0, state_len + seqlen, col)
        return buf.gather(2, col[:, None, :].expand(n, dim, pos.shape[1]))

    steps = torch.arange(seqlen + width - 1, device=xs.device)
    window = history(ends[:, None] - (width - 1) + steps)  # (n, dim, L + width - 1)
    w = weight.float()
    y = sum(w[None, :, k, None] * window[:, :, k:k + seqlen] for k in range(width))
    if bias is not None:
        y = y + bias.float()[None, :, None]
    if activation == "silu":
        y = F.silu(y)
    new_state = history(ends[:, None] + lens[:, None] - state_len + torch.arange(state_len, device=xs.device))
    return y, new_state


def _write_outputs(out, y, seqs, lens, token_rows):
    """Scatter y (n, dim, L) into out for the live sequences' real tokens only."""
    if token_rows is None:
        out[seqs] = y if out.dim() == 3 else y[:, :, 0]
        return
    valid = torch.arange(y.shape[2], device=y.device)[None, :] < lens[:, None]
    out[token_rows[seqs][valid]] = y.permute(0, 2, 1)[valid]
