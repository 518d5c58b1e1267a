"""Factories for the command-line tests (MODULE:FACTORY)."""

import torch

import pass_models as pm


def one_conv():
    return pm.OneConv("mT"), [pm.inputs(3), pm.inputs(2)]


class Noisy(pm.OneConv):
    """Draws fresh noise each call, so no two runs agree: check must fail."""

    def forward(self, x, slots):
        return super().forward(x, slots) + torch.rand(1)


def noisy():
    return Noisy(), [pm.inputs(3)]


# One factory per mistake a user makes; the CLI must answer each in one line, exit 2.

def broken():
    raise RuntimeError("checkpoint not found")


def needs_size(size):
    return pm.OneConv("mT"), [pm.inputs(size)]


NOT_CALLABLE = 3


def triple():
    return pm.OneConv("mT"), [pm.inputs(3)], "extra"


def swapped():
    return [pm.inputs(3)], pm.OneConv("mT")


def calls_not_list():
    return pm.OneConv("mT"), pm.inputs(3)


def call_not_dict():
    return pm.OneConv("mT"), [pm.inputs(3), list(pm.inputs(2).values())]


def wrong_keyword():
    call = pm.inputs(3)
    return pm.OneConv("mT"), [dict(x=call["x"], slot=call["slots"])]


def no_calls():
    return pm.OneConv("mT"), []


class RaisesOnPairs(pm.OneConv):
    def forward(self, x, slots):
        if x.shape[0] == 2:
            raise ValueError("pairs are not supported")
        return super().forward(x, slots)


def raises_in_forward():
    return RaisesOnPairs("mT"), [pm.inputs(3), pm.inputs(2)]


class ToNumpy(pm.OneConv):
    """Runs eagerly, but branches in Python on its data (sign of a numpy sum): not one graph."""

    def forward(self, x, slots):
        if x.numpy().sum() > 0:
            return super().forward(x, slots) * 2
        return super().forward(x, slots)


def not_capturable():
    return ToNumpy("mT"), [pm.inputs(3), pm.inputs(2)]


def one_call():
    """One call, so one captured graph: `inspect` must not ask for --entry."""
    return pm.OneConv("mT"), [pm.inputs(3)]
