"""layoutpass: choose the physical layout of Mamba conv-state pools as a compiler pass."""

from .errors import ArgumentError, LayoutPassError
from .layout import DS, SD, Layout, Runs

__all__ = ["ArgumentError", "DS", "Layout", "LayoutPassError", "Runs", "SD"]
