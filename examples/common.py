"""Pieces every example mixer shares: vLLM's state-shape functions, the batch metadata,
varlen padding, RMSNorm."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layoutpass.kernels import conv_prefill, conv_update


def conv_state_shape(conv_dim: int, conv_kernel: int, num_spec: int = 0) -> tuple[int, int]:
    """vLLM's per-slot conv state shape in its default SD layout: (state_len, dim), where
    spec decode keeps `num_spec` extra inputs."""
    return (conv_kernel - 1 + num_spec, conv_dim)


@dataclass
class Batch:
    """What a step knows about its sequences. Prefill: tokens are varlen (query_start_loc);
    decode: every sequence brings the same number of tokens."""

    slots: torch.Tensor  # (batch,) pool slot of each sequence
    context_lens: torch.Tensor  # (batch,) tokens each sequence had before this step
    query_start_loc: torch.Tensor | None = None  # (batch + 1,) prefill only
    num_accepted_tokens: torch.Tensor | None = None  # (batch,) spec decode only

    @property
    def has_initial_state(self) -> torch.Tensor:
        return self.context_lens > 0


# a layer's forward takes a Batch: torch.export (capturing the layer alone) must see into it
torch.utils._pytree.register_dataclass(Batch)


def pad_tokens(x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill tokens (T, ...) -> (batch, max_len, ...) and the (batch, max_len) mask of real
    tokens. Decode inputs are already (batch, k, ...)."""
    if batch.query_start_loc is None:
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    rows, valid = _rows(batch.query_start_loc, x.shape[0])
    return x[rows], valid


def unpad_tokens(y: torch.Tensor, batch: Batch, num_tokens: int) -> torch.Tensor:
    """Inverse of pad_tokens."""
    if batch.query_start_loc is None:
        return y
    rows, valid = _rows(batch.query_start_loc, num_tokens)
    out = y.new_zeros((num_tokens, *y.shape[2:]))
    out[rows[valid]] = y[valid]
    return out


def _rows(query_start_loc: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = query_start_loc[:-1]
    lens = query_start_loc[1:] - starts
    steps = torch.arange(num_tokens, device=starts.device)[: max(1, int(lens.max()))]
    rows = starts[:, None] + steps[None, :]
    valid = steps[None, :] < lens[:, None]
    return rows.clamp(max=max(num_tokens - 1, 0)), valid


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is not None:
            x = x * F.silu(gate)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def causal_conv(xbc: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                batch: Batch, activation: str | None = "silu") -> torch.Tensor:
    """The conv of a mixer's channels, the vLLM way: prefill tokens (T, dim) go through
    causal_conv1d_fn as a (dim, T) view, decode tokens (batch, k, dim) through
    causal_conv1d_update as (batch, dim, k). `conv_state` is the (slot, dim, state_len) view
    the caller made of its pool (under SD, a transpose of it)."""
    if batch.query_start_loc is not None:
        y = conv_prefill(xbc.transpose(0, 1), weight, bias, conv_state, batch.query_start_loc, batch.slots,
                         batch.has_initial_state, activation)
        return y.transpose(0, 1)
    x = xbc.transpose(1, 2)
    y = conv_update(x, conv_state, weight, bias, activation, batch.slots, batch.num_accepted_tokens,
                    out=torch.empty_like(x))
    return y.transpose(1, 2)


def conv_params(dim: int, width: int, bias: bool = True) -> tuple[nn.Parameter, nn.Parameter | None]:
    weight = nn.Parameter(torch.randn(dim, width) / width**0.5)
    return weight, (nn.Parameter(torch.randn(dim) * 0.1) if bias else None)
