"""The conv ops as torch.library custom ops, and vLLM-compatible Python entry points.

`conv_update` and `conv_prefill` take vLLM's signatures, so a model written for
vLLM's `causal_conv1d_update` / `causal_conv1d_fn` runs on them unchanged."""

import torch

from . import reference, triton_conv
from .checks import (activation_name, check_float, check_index, check_pool, check_query_start_loc,
                     check_slots, check_token_counts, check_weight)
from layoutpass.errors import ArgumentError
from layoutpass.registry import KERNEL_ORDER, register_state


def _check_update(x, conv_state, weight, bias, conv_state_indices, num_accepted_tokens,
                  query_start_loc, null_block_id, out) -> None:
    varlen = query_start_loc is not None
    if varlen:
        check_float("x", x, 2)
        check_query_start_loc(query_start_loc)
        batch = query_start_loc.shape[0] - 1
    else:
        if x.dim() not in (2, 3):
            raise ArgumentError("x", f"expected (batch, dim) or (batch, dim, seqlen), got {tuple(x.shape)}")
        check_float("x", x, x.dim())
        batch = x.shape[0]
    dim = x.shape[1]
    width = check_weight(weight, bias, dim)
    check_pool(conv_state, dim, width, x.dtype)
    check_index("conv_state_indices", conv_state_indices, batch)
    check_index("num_accepted_tokens", num_accepted_tokens, batch)
    if conv_state_indices is None and batch > conv_state.shape[0]:
        raise ArgumentError("conv_state", f"{conv_state.shape[0]} slots for a batch of {batch} without conv_state_indices")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ArgumentError("out", f"expected {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")


def _check_prefill(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state,
                   null_block_id) -> None:
    check_float("x", x, 2)
    dim = x.shape[0]
    width = check_weight(weight, bias, dim)
    check_pool(conv_states, dim, width, x.dtype)
    check_query_start_loc(query_start_loc)
    batch = query_start_loc.shape[0] - 1
    check_index("cache_indices", cache_indices, batch)
    check_index("has_initial_state", has_initial_state, batch)
    if cache_indices is None and batch > conv_states.shape[0]:
        raise ArgumentError("conv_states", f"{conv_states.shape[0]} slots for a batch of {batch} without cache_indices")


def _check_update_values(x, conv_state, weight, conv_state_indices, num_accepted_tokens, query_start_loc,
                         null_block_id) -> None:
    if query_start_loc is not None:
        check_token_counts(query_start_loc, x.shape[0])
    check_slots("conv_state_indices", conv_state_indices, conv_state.shape[0], null_block_id)
    if num_accepted_tokens is not None and num_accepted_tokens.numel():
        most = conv_state.shape[2] - weight.shape[1] + 2
        if bool(((num_accepted_tokens < 1) | (num_accepted_tokens > most)).any()):
            raise ArgumentError("num_accepted_tokens", f"values must lie in 1..{most} (state_len - width + 2)")


# The public ops: Triton on CUDA, the pure-torch reference elsewhere. Opaque custom ops, so
# torch.compile passes them real tensors (a traced Triton wrapper would bake in strides that
# inductor may later change: wrong results under torch.compile on CUDA, see benchmarks/NOTES.md).
@torch.library.custom_op("layoutpass::conv_update", mutates_args=("conv_state", "out"))
def conv_update_op(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   activation: str | None, conv_state_indices: torch.Tensor | None,
                   num_accepted_tokens: torch.Tensor | None, query_start_loc: torch.Tensor | None,
                   max_query_len: int, null_block_id: int, out: torch.Tensor) -> None:
    _check_update(x, conv_state, weight, bias, conv_state_indices, num_accepted_tokens, query_start_loc,
                  null_block_id, out)
    if x.is_cuda:
        triton_conv.update(x, conv_state, weight, bias, activation, conv_state_indices, num_accepted_tokens,
                           query_start_loc, max_query_len, null_block_id, out)
        return
    _check_update_values(x, conv_state, weight, conv_state_indices, num_accepted_tokens, query_start_loc,
                         null_block_id)
    reference.conv_update(x, conv_state, weight, bias, activation, conv_state_indices, num_accepted_tokens,
                          query_start_loc, null_block_id, out)


@conv_update_op.register_fake
def _(x, conv_state, weight, bias, activation, conv_state_indices, num_accepted_tokens, query_start_loc,
      max_query_len, null_block_id, out):
    _check_update(x, conv_state, weight, bias, conv_state_indices, num_accepted_tokens, query_start_loc,
                  null_block_id, out)


@torch.library.custom_op("layoutpass::conv_prefill", mutates_args=("conv_states",))
def conv_prefill_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_states: torch.Tensor,
                    query_start_loc: torch.Tensor, cache_indices: torch.Tensor | None,
                    has_initial_state: torch.Tensor | None, activation: str | None,
                    null_block_id: int) -> torch.Tensor:
    _check_prefill(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, null_block_id)
    if x.is_cuda:
        return triton_conv.prefill(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state,
                                   activation, null_block_id)
    check_token_counts(query_start_loc, x.shape[1])
    check_slots("cache_indices", cache_indices, conv_states.shape[0], null_block_id)
    return reference.conv_prefill(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state,
                                  activation, null_block_id)


@conv_prefill_op.register_fake
def _(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, activation, null_block_id):
    _check_prefill(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state, null_block_id)
    return torch.empty_like(x)


# what the pass knows of them: their state argument is a conv pool, read as (slot, dim, tok)
register_state(torch.ops.layoutpass.conv_update.default, "conv_state", KERNEL_ORDER)
register_state(torch.ops.layoutpass.conv_prefill.default, "conv_states", KERNEL_ORDER)


def conv_update(x, conv_state, weight, bias=None, activation=None, conv_state_indices=None,
                num_accepted_tokens=None, query_start_loc=None, max_query_len=-1, null_block_id=0, out=None):
    """One decode step of the depthwise causal conv over a slot pool (vLLM's
    `causal_conv1d_update`).

    x: (batch, dim), (batch, dim, seqlen), or varlen (num_tokens, dim) with `query_start_loc`
    (batch + 1,). conv_state: a (num_slots, dim, state_len) view in any strides, state_len >=
    width - 1, same dtype as x. weight: (dim, width), width 2..6; bias: (dim,) or None.
    activation: None, "silu"/"swish"/True. conv_state_indices: (batch,) slot per sequence;
    a sequence whose slot equals `null_block_id` is skipped: its state and its output rows are
    left untouched. num_accepted_tokens: (batch,) for spec decode (see reference.py).
    max_query_len: the longest sequence of a varlen batch; the CUDA kernel needs it as a bound
    and computes it (a device sync) when it is -1.
    Writes the new states in place and the output into `out` (default: over x); returns it.
    """
    out = x if out is None else out
    conv_update_op(x, conv_state, weight, bias, activation_name(activation), conv_state_indices,
                   num_accepted_tokens, query_start_loc, max_query_len, null_block_id, out)
    return out


def conv_prefill(x, weight, bias, conv_states, query_start_loc, cache_indices=None, has_initial_state=None,
                 activation="silu", null_block_id=0):
    """Varlen prefill conv over a slot pool (vLLM's `causal_conv1d_fn`).

    x: (dim, total_tokens) in any strides (vLLM passes a tokens-major transpose). Sequence b is
    tokens query_start_loc[b]:query_start_loc[b+1], its slot cache_indices[b] (default b). Its
    conv starts from the pool's state where has_initial_state[b] is true, else from zeros; its
    last state_len inputs (zero-padded on the left when shorter) become the slot's state.
    Sequences whose slot is `null_block_id` are skipped: state untouched, output zeros.
    Returns the output, (dim, total_tokens) with x's strides and dtype.
    """
    return conv_prefill_op(x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state,
                           activation_name(activation), null_block_id)
