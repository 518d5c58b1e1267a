"""Rewrite rules, as data: one module per family (transposes, axis remap, lowering)."""
