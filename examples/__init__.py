"""Mamba-family models written in vLLM's idiom (SD conv pools, transposed before the conv
ops), and the serving scenario that drives them."""

from .lm import LM, ZOO, ModelConfig, build

__all__ = ["LM", "ModelConfig", "ZOO", "build"]
