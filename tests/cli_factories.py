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
