"""Conv-state kernels: custom ops, their pure-torch references, and (on CUDA) Triton code.

Installed as `layoutpass.kernels`. Run from a checkout's root, this folder is also importable
as a top-level `kernels`, the name of Hugging Face's kernels package, which transformers probes
for by importing it: imported under that name it stays empty (no version, so transformers finds
no usable package) instead of registering the ops a second time."""

if __name__ != "kernels":
    from .ops import conv_prefill, conv_update
    from .recurrent import delta_rule_update, selective_state_update
    from .state import relayout, relayout_, shard_gather, shard_scatter, tail_copy

    __all__ = ["conv_prefill", "conv_update", "delta_rule_update", "relayout", "relayout_", "selective_state_update",
               "shard_gather", "shard_scatter", "tail_copy"]
