"""Mamba-family models written in vLLM's idiom (SD conv pools, transposed before the conv
ops), and the serving scenario that drives them.

Scripts a user runs (`python examples/<script>.py`), each printing what it shows:
optimize_model.py (optimize a model, print the report), show_graphs.py (the captured graphs,
a before/after diff, pictures), check_model.py (equivalence against the untouched original,
an example model and one of your own), transformers_model.py (a transformers model end to end)."""

from layoutpass.examples.lm import LM, ZOO, ModelConfig, build

__all__ = ["LM", "ModelConfig", "ZOO", "build"]
