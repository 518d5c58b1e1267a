"""Mamba1 and Mamba2 mixers in vLLM's idiom: an SD conv pool per layer, transposed before the
conv ops (vLLM's mamba_mixer.py / mamba_mixer2.py); Mamba2's decode updates its SSM state pool
(slot, snap, head, head_dim, d_state) in place with selective_state_update, as vLLM's does."""

import torch
import torch.nn.functional as F
from torch import nn

from layoutpass.examples.common import Batch, RMSNorm, causal_conv, conv_params, conv_state_shape
from layoutpass.examples.recurrence import recurrence
from layoutpass.kernels import selective_state_update


class Mamba1Mixer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        inner, n = cfg.expand * cfg.hidden, cfg.d_state
        self.dt_rank, self.n = max(1, cfg.hidden // 16), n
        self.in_proj = nn.Linear(cfg.hidden, 2 * inner, bias=False)
        self.conv_weight, self.conv_bias = conv_params(inner, cfg.conv_kernel)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, cfg.hidden, bias=False)
        self.register_buffer("conv_state", torch.zeros(cfg.num_slots, *conv_state_shape(inner, cfg.conv_kernel, cfg.num_spec)))
        self.register_buffer("ssm_state", torch.zeros(cfg.num_slots, cfg.num_spec + 1, inner, n))

    def forward(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        x, z = self.in_proj(h).chunk(2, -1)
        x = causal_conv(x, self.conv_state.transpose(-1, -2), self.conv_weight, self.conv_bias, batch)
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.n, self.n], -1)
        dt = F.softplus(self.dt_proj(dt))
        y = recurrence("mamba1", [x, dt, b, c], [-torch.exp(self.A_log), self.D], self.ssm_state, batch.slots,
                       batch.context_lens, batch.query_start_loc, batch.num_accepted_tokens)
        return self.out_proj(y * F.silu(z))


class Mamba2Mixer(nn.Module):
    """Conv channels are [x | B | C]: a TP shard of them is three channel ranges."""

    def __init__(self, cfg):
        super().__init__()
        self.inner, self.n, self.groups = cfg.expand * cfg.hidden, cfg.d_state, cfg.n_groups
        self.heads, self.head_dim = self.inner // cfg.head_dim, cfg.head_dim
        self.conv_dim = self.inner + 2 * self.groups * self.n
        self.in_proj = nn.Linear(cfg.hidden, self.inner + self.conv_dim + self.heads, bias=False)
        self.conv_weight, self.conv_bias = conv_params(self.conv_dim, cfg.conv_kernel)
        self.dt_bias = nn.Parameter(torch.randn(self.heads) * 0.1)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 4, self.heads)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = RMSNorm(self.inner)
        self.out_proj = nn.Linear(self.inner, cfg.hidden, bias=False)
        state = conv_state_shape(self.conv_dim, cfg.conv_kernel, cfg.num_spec)
        self.register_buffer("conv_state", torch.zeros(cfg.num_slots, *state))
        self.register_buffer("ssm_state", torch.zeros(cfg.num_slots, cfg.num_spec + 1, self.heads, self.head_dim, self.n))

    def forward(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        z, xbc, dt = self.in_proj(h).split([self.inner, self.conv_dim, self.heads], -1)
        xbc = causal_conv(xbc, self.conv_state.transpose(1, 2), self.conv_weight, self.conv_bias, batch)
        x, b, c = xbc.split([self.inner, self.groups * self.n, self.groups * self.n], -1)
        x, b, c = x.unflatten(-1, (self.heads, self.head_dim)), *(t.unflatten(-1, (self.groups, self.n)) for t in (b, c))
        dt, a = F.softplus(dt + self.dt_bias), -torch.exp(self.A_log)
        if batch.query_start_loc is None:  # decode: the SSM state updated in its pool, in place by slot
            y = selective_state_update(self.ssm_state, x, dt, a, b, c, self.D, state_batch_indices=batch.slots,
                                       num_accepted_tokens=batch.num_accepted_tokens)
        else:
            per_group = self.heads // self.groups
            b, c = (t.repeat_interleave(per_group, -2) for t in (b, c))
            y = recurrence("mamba2", [x, dt, b, c], [a, self.D], self.ssm_state, batch.slots, batch.context_lens,
                           batch.query_start_loc, batch.num_accepted_tokens)
        return self.out_proj(self.norm(y.flatten(-2), gate=z))
