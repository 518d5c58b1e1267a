"""layoutpass: choose the physical layout of Mamba conv-state pools as a compiler pass."""

import logging

from .equivalence import EquivalenceResult, check_equivalence
from .errors import ArgumentError, LayoutPassError
from .layout import DS, SD, Layout, Runs
from .runtime import OptimizedModule, optimize
from .verify import UnprovenRewrite

logging.getLogger(__name__).addHandler(logging.NullHandler())  # the application decides what is shown

__all__ = ["ArgumentError", "DS", "EquivalenceResult", "Layout", "LayoutPassError", "OptimizedModule", "Runs", "SD",
           "UnprovenRewrite", "check_equivalence", "optimize"]
__version__ = "0.1.0"  # as pyproject.toml says (tests/test_cli.py keeps them equal)
