"""LFM2-style gated short convolution (vLLM's short_conv.py): no recurrent state, no conv
bias, no activation; the pool is read through `.mT`."""

import torch
from torch import nn

from layoutpass.examples.common import Batch, causal_conv, conv_params, conv_state_shape


class ShortConvMixer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.in_proj = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.conv_weight, self.conv_bias = conv_params(cfg.hidden, cfg.conv_kernel, bias=False)
        self.out_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        state = conv_state_shape(cfg.hidden, cfg.conv_kernel, cfg.num_spec)
        self.register_buffer("conv_state", torch.zeros(cfg.num_slots, *state))

    def forward(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        b, c, x = self.in_proj(h).chunk(3, -1)
        y = causal_conv(b * x, self.conv_state.mT, self.conv_weight, self.conv_bias, batch, activation=None)
        return self.out_proj(c * y)
