"""A causal LM over any mix of the example mixers, the model zoo, and its configs."""

from dataclasses import dataclass, replace

import torch
from torch import nn

from layoutpass.errors import ArgumentError
from layoutpass.examples.attention import Attention
from layoutpass.examples.common import Batch, RMSNorm
from layoutpass.examples.deltanet import GatedDeltaNetMixer, KDAMixer
from layoutpass.examples.mamba import Mamba1Mixer, Mamba2Mixer
from layoutpass.examples.short_conv import ShortConvMixer

MIXERS = {"mamba1": Mamba1Mixer, "mamba2": Mamba2Mixer, "short_conv": ShortConvMixer,
          "gdn": GatedDeltaNetMixer, "kda": KDAMixer, "attention": Attention}


@dataclass(frozen=True)
class ModelConfig:
    layers: tuple[str, ...]
    hidden: int = 32
    vocab: int = 64
    num_slots: int = 8  # slot 0 is vLLM's null block: the scenarios never give it a sequence
    num_spec: int = 0  # spec-decode draft tokens per step; pools keep this many extra inputs
    conv_kernel: int = 4
    expand: int = 2
    d_state: int = 8
    head_dim: int = 8
    n_groups: int = 1
    heads: int = 4
    max_len: int = 96  # attention KV cache length per slot


ZOO = {
    "mamba1": ("mamba1", "mamba1"),
    "mamba2": ("mamba2", "mamba2"),
    "short_conv": ("short_conv", "attention", "short_conv"),
    "gdn": ("gdn", "attention", "gdn"),
    "kda": ("kda", "kda"),
    "hybrid": ("mamba2", "attention", "gdn", "mamba2"),
}

# Real widths of 2.7B-class models (Mamba-2.8B, Mamba2-2.7B) for the GPU benchmarks.
SIZES = {
    "tiny": {},
    "2.7b": dict(hidden=2560, vocab=50288, expand=2, d_state=128, head_dim=64, heads=32, max_len=4096),
}


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        unknown = [kind for kind in cfg.layers if kind not in MIXERS]
        if unknown:
            raise ArgumentError("layers", f"unknown mixers {unknown}; known: {sorted(MIXERS)}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.norms = nn.ModuleList(RMSNorm(cfg.hidden) for _ in cfg.layers)
        self.mixers = nn.ModuleList(MIXERS[kind](cfg) for kind in cfg.layers)
        self.final_norm = RMSNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, slots: torch.Tensor, context_lens: torch.Tensor,
                query_start_loc: torch.Tensor | None = None,
                num_accepted_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill: input_ids (tokens,) with query_start_loc (batch + 1,). Decode: input_ids
        (batch, k), and num_accepted_tokens (batch,) for spec decode. slots: each sequence's
        pool slot; context_lens: tokens it had before this step. Returns logits."""
        batch = Batch(slots, context_lens, query_start_loc, num_accepted_tokens)
        h = self.embed(input_ids)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h), batch)
        return self.lm_head(self.final_norm(h))

    def scenario(self, **options) -> list:
        """A serving scenario for this model: examples.scenario.make_scenario's options."""
        from layoutpass.examples.scenario import make_scenario

        return make_scenario(self.cfg, device=self.embed.weight.device, **options)


def build(name: str, size: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu", **overrides) -> LM:
    """A zoo model with random weights (`overrides` change config fields, e.g. num_spec)."""
    if name not in ZOO:
        raise ArgumentError("name", f"unknown model {name!r}; known: {sorted(ZOO)}")
    if size not in SIZES:
        raise ArgumentError("size", f"unknown size {size!r}; known: {sorted(SIZES)}")
    cfg = replace(ModelConfig(layers=ZOO[name]), **{**SIZES[size], **overrides})  # overrides win
    torch.manual_seed(seed)
    return LM(cfg).to(device=device, dtype=dtype).eval()
