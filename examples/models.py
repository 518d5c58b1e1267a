"""Zero-argument factories of the zoo models, for the command line
(`layoutpass inspect layoutpass.examples.models:hybrid`)."""

from layoutpass.examples.lm import ZOO, build


def _factory(name):
    def make():
        return build(name, num_spec=1)
    make.__name__ = name
    make.__doc__ = f"The tiny {name} model with one spec-decode token."
    return make


globals().update({name: _factory(name) for name in ZOO})
__all__ = sorted(ZOO)
