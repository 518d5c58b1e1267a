"""Conv-state kernels: custom ops, their pure-torch references, and (on CUDA) Triton code."""

from .ops import conv_prefill, conv_update
from .state import relayout, relayout_, shard_gather, shard_scatter, tail_copy

__all__ = ["conv_prefill", "conv_update", "relayout", "relayout_", "shard_gather", "shard_scatter", "tail_copy"]
