"""Conv-state kernels: custom ops, their pure-torch references, and (on CUDA) Triton code."""

from .ops import conv_prefill, conv_update

__all__ = ["conv_prefill", "conv_update"]
