"""layoutpass: choose the memory layout of a Mamba-family model's state pools (conv and recurrent
states) as a compiler pass, and prove the model computes the same.

The names below load on first use, so `import layoutpass` (and the command line's --help) does
not import torch."""

import importlib
import logging

__version__ = "0.1.0"  # as pyproject.toml says (tests/test_cli.py keeps them equal)
_NAMES = {"EquivalenceResult": "equivalence", "check_equivalence": "equivalence", "ArgumentError": "errors",
          "LayoutPassError": "errors", "DS": "layout", "SD": "layout", "KV": "layout", "VK": "layout",
          "Layout": "layout", "Runs": "layout", "OptimizedModule": "runtime", "optimize": "runtime",
          "register_stride_agnostic": "registry", "UnprovenRewrite": "verify"}
__all__ = sorted(_NAMES)
logging.getLogger(__name__).addHandler(logging.NullHandler())  # the application decides what is shown


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES))
