"""A naive per-token oracle for the conv ops, written from the contract alone: keep each
sequence's history as a list of input columns, append tokens one at a time, convolve the
last `width` columns. float64, loops, no shared code with the package."""

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
