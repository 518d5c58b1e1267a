"""Gated DeltaNet (Qwen3-Next, vLLM's gdn_linear_attn.py: q, k, v convolved through one pool)
and a KDA-style mixer (Kimi-Linear, vLLM's kda.py: three separate conv pools, a decay per key
channel)."""

import torch
import torch.nn.functional as F
from torch import nn

from layoutpass.examples.common import Batch, RMSNorm, causal_conv, conv_params, conv_state_shape
from layoutpass.examples.recurrence import l2norm, recurrence
from layoutpass.kernels import delta_rule_update


def delta_rule(state, q, k, v, g, beta, batch: Batch) -> torch.Tensor:
    """The gated delta rule over a state pool (slot, snap, head, k, v): decode updates the pool in
    place by slot (delta_rule_update, as vLLM's fused recurrent kernel does); prefill runs the
    chunked recurrence. g: log decay, per head (GDN) or per key channel (KDA)."""
    if batch.query_start_loc is None:
        return delta_rule_update(state, q, k, v, g, beta, scale=1.0, state_indices=batch.slots,
                                 num_accepted_tokens=batch.num_accepted_tokens)
    return recurrence("delta_rule", [v, q, k, beta, torch.exp(g)], [], state, batch.slots, batch.context_lens,
                      batch.query_start_loc, batch.num_accepted_tokens)


class GatedDeltaNetMixer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.k_heads, self.v_heads, self.head_dim = cfg.heads // 2, cfg.heads, cfg.head_dim
        self.key_dim, self.value_dim = self.k_heads * self.head_dim, self.v_heads * self.head_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkvz = nn.Linear(cfg.hidden, self.conv_dim + self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(cfg.hidden, 2 * self.v_heads, bias=False)
        self.conv_weight, self.conv_bias = conv_params(self.conv_dim, cfg.conv_kernel, bias=False)
        self.dt_bias = nn.Parameter(torch.randn(self.v_heads) * 0.1)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 8, self.v_heads)))
        self.norm = RMSNorm(self.head_dim)
        self.out_proj = nn.Linear(self.value_dim, cfg.hidden, bias=False)
        state = conv_state_shape(self.conv_dim, cfg.conv_kernel, cfg.num_spec)
        self.register_buffer("conv_state", torch.zeros(cfg.num_slots, *state))
        self.register_buffer("ssm_state", torch.zeros(cfg.num_slots, cfg.num_spec + 1, self.v_heads,
                                                      self.head_dim, self.head_dim))

    def forward(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        qkv, z = self.in_proj_qkvz(h).split([self.conv_dim, self.value_dim], -1)
        b, a = self.in_proj_ba(h).chunk(2, -1)
        qkv = causal_conv(qkv, self.conv_state.swapaxes(1, 2), self.conv_weight, self.conv_bias, batch)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], -1)
        repeat = self.v_heads // self.k_heads
        q, k = (l2norm(t.unflatten(-1, (self.k_heads, self.head_dim))).repeat_interleave(repeat, -2) for t in (q, k))
        g = -torch.exp(self.A_log) * F.softplus(a + self.dt_bias)  # log decay, one per head
        o = delta_rule(self.ssm_state, q * self.head_dim**-0.5, k, v.unflatten(-1, (self.v_heads, self.head_dim)), g,
                       torch.sigmoid(b), batch)
        o = self.norm(o, gate=z.unflatten(-1, (self.v_heads, self.head_dim)))
        return self.out_proj(o.flatten(-2))


class KDAMixer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        dim = self.heads * self.head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(cfg.hidden, dim, bias=False) for _ in range(3))
        self.q_conv_weight, self.q_conv_bias = conv_params(dim, cfg.conv_kernel, bias=False)
        self.k_conv_weight, self.k_conv_bias = conv_params(dim, cfg.conv_kernel, bias=False)
        self.v_conv_weight, self.v_conv_bias = conv_params(dim, cfg.conv_kernel, bias=False)
        self.f_a = nn.Linear(cfg.hidden, self.head_dim, bias=False)
        self.f_b = nn.Linear(self.head_dim, dim, bias=False)
        self.b_proj = nn.Linear(cfg.hidden, self.heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 8, self.heads)))
        self.dt_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.g_proj = nn.Linear(cfg.hidden, dim, bias=False)
        self.norm = RMSNorm(self.head_dim)
        self.o_proj = nn.Linear(dim, cfg.hidden, bias=False)
        state = conv_state_shape(dim, cfg.conv_kernel, cfg.num_spec)
        for name in ("q_conv_state", "k_conv_state", "v_conv_state"):
            self.register_buffer(name, torch.zeros(cfg.num_slots, *state))
        self.register_buffer("ssm_state", torch.zeros(cfg.num_slots, cfg.num_spec + 1, self.heads,
                                                      self.head_dim, self.head_dim))

    def forward(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        q = causal_conv(self.q_proj(h), self.q_conv_state.permute(0, 2, 1), self.q_conv_weight, self.q_conv_bias, batch)
        k = causal_conv(self.k_proj(h), self.k_conv_state.permute(0, 2, 1), self.k_conv_weight, self.k_conv_bias, batch)
        v = causal_conv(self.v_proj(h), self.v_conv_state.permute(0, 2, 1), self.v_conv_weight, self.v_conv_bias, batch)
        heads = (self.heads, self.head_dim)
        g = -torch.exp(self.A_log)[:, None] * F.softplus(self.f_b(self.f_a(h)) + self.dt_bias).unflatten(-1, heads)
        o = delta_rule(self.ssm_state, l2norm(q.unflatten(-1, heads)) * self.head_dim**-0.5, l2norm(k.unflatten(-1, heads)),
                       v.unflatten(-1, heads), g, torch.sigmoid(self.b_proj(h)), batch)
        o = self.norm(o, gate=self.g_proj(h).unflatten(-1, heads))
        return self.o_proj(o.flatten(-2))
