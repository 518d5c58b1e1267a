"""Hugging Face transformers models as layoutpass models: their conv and recurrent states owned
as module buffers.

transformers keeps a Mamba/Mamba2 layer's states in a `DynamicCache` passed to `forward`, which
torch.export cannot take as an input and which no pass can find as a pool. `CacheAsBuffers`
registers each layer's states as buffers of fixed batch (the way static-cache export wrappers
do) and builds, on every call, a cache whose layers point at them: transformers' own
pure-torch code then reads and writes the buffers in place, and export sees buffer mutations.
The conv states are (batch, dim, conv_kernel): DS pools whose slot is the batch row."""

import random
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import ArgumentError

# Run from a checkout's root (`python -m ...`), the path holds kernels/, importable as a top-level
# `kernels`: transformers tries Hugging Face's package of that name and would load our kernels a
# second time, registering their ops anew. The project is installed; its root is not needed.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]


class CacheAsBuffers(nn.Module):
    """`model` (a transformers model whose cache layers are all conv/recurrent, e.g.
    MambaForCausalLM, Mamba2ForCausalLM) for `batch_size` sequences at a time.

    forward(input_ids (batch_size, tokens), fresh=False) -> logits: continue every sequence by
    `tokens` tokens, or start them anew (fresh: the states are zeroed first, which is what
    transformers' prefill without a cache computes)."""

    # transformers' chunked scan pads to its chunk size with Python ints that export does not
    # guard: a graph captured for one prompt length is wrong for another. One graph per size.
    layoutpass_dynamic = False

    def __init__(self, model: nn.Module, batch_size: int):
        super().__init__()
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ArgumentError("batch_size", f"expected a positive int, got {batch_size!r}")
        self.model = model
        cache = DynamicCache(config=model.config)
        if not cache.layers or not all(isinstance(c, LinearAttentionCacheLayerMixin) for c in cache.layers):
            raise ArgumentError("model", f"{type(model).__name__}'s cache has layers other than conv/recurrent "
                                         "states (attention); only state-space models are supported")
        device = next(model.parameters()).device
        with torch.no_grad():  # one short call sizes every state the way transformers allocates them
            model(input_ids=torch.zeros(batch_size, 2, dtype=torch.long, device=device), cache=cache, use_cache=True)
        self._kernels = []
        for i, layer in enumerate(cache.layers):
            self.register_buffer(f"conv_state_{i}", torch.zeros_like(layer.conv_states[0]))
            self.register_buffer(f"recurrent_state_{i}", torch.zeros_like(layer.recurrent_states[0]))
            self._kernels.append(layer.conv_kernel_size[0])

    def forward(self, input_ids: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        from transformers import DynamicCache

        if fresh:
            for buf in self.buffers():
                buf.zero_()
        cache = DynamicCache(config=self.model.config)
        for i, layer in enumerate(cache.layers):
            conv = self.get_buffer(f"conv_state_{i}")
            layer.conv_states[0], layer.recurrent_states[0] = conv, self.get_buffer(f"recurrent_state_{i}")
            layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
            layer.has_previous_state[0] = True  # zeroed states are a fresh start
            layer.conv_kernel_size[0] = self._kernels[i]
            layer.dtype, layer.device = conv.dtype, conv.device
        return self.model(input_ids=input_ids, cache=cache, use_cache=True).logits

    def scenario(self, *, prefills: int = 3, decode_steps: int = 16, seed: int = 0, max_prompt: int = 12,
                 device=None) -> list:
        """check_equivalence's default run: fresh prompts, decode steps, a continuation chunk
        every 7th step and a fresh batch every 5th (`prefills` of them at most)."""
        from layoutpass.examples.scenario import Step

        rng = random.Random(seed)
        device = device or self.get_buffer("conv_state_0").device
        vocab = self.model.config.vocab_size
        ids = lambda n: torch.tensor([[rng.randrange(vocab) for _ in range(n)] for _ in range(self.batch_size)],
                                     device=device)
        steps, fresh_left = [Step("prefill", dict(input_ids=ids(rng.randint(2, max_prompt)), fresh=True))], prefills - 1
        for i in range(decode_steps):
            if i % 5 == 4 and fresh_left:
                fresh_left -= 1
                steps.append(Step("prefill", dict(input_ids=ids(rng.randint(2, max_prompt)), fresh=True)))
            elif i % 7 == 6:
                steps.append(Step("prefill", dict(input_ids=ids(rng.randint(2, 4)))))
            steps.append(Step("decode", dict(input_ids=ids(1))))
        return steps

    @property
    def batch_size(self) -> int:
        return self.get_buffer("conv_state_0").shape[0]


def tiny(family: str = "mamba2", *, batch_size: int = 4, seed: int = 0, device="cpu") -> CacheAsBuffers:
    """A tiny randomly initialized transformers Mamba or Mamba2 (built from a config, nothing
    downloaded), wrapped for `batch_size` sequences."""
    import transformers

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8)
    configs = {"mamba": (transformers.MambaConfig, transformers.MambaForCausalLM, {}),
               "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM,
                          dict(num_heads=8, head_dim=8, n_groups=1, expand=2, chunk_size=8))}
    if family not in configs:
        raise ArgumentError("family", f"expected one of {sorted(configs)}, got {family!r}")
    config, model, extra = configs[family]
    torch.manual_seed(seed)
    return CacheAsBuffers(model(config(**common, **extra)).to(device).eval(), batch_size)


def tiny_mamba() -> CacheAsBuffers:
    """transformers' Mamba, tiny and random (for `layoutpass check layoutpass.hf:tiny_mamba`)."""
    return tiny("mamba")


def tiny_mamba2() -> CacheAsBuffers:
    """transformers' Mamba2, tiny and random."""
    return tiny("mamba2")
