"""The rewriter's rules, as data: how a pending permutation sinks below each op (permutes.py;
the op registry, layoutpass/registry.py, names each op's rule). Imports nothing of the pass."""
