"""Check that the optimized model computes what the untouched original computes: same outputs,
same state (pools read back in the model's order) after every step of a serving scenario. First
an example model over its own scenario, then a model of your own over calls you write as dicts.

    python examples/check_model.py
"""

import torch
from torch import nn

from layoutpass import check_equivalence, optimize
from layoutpass.examples import build


class MyShortConv(nn.Module):
    """A model of your own: one new token per sequence through a depthwise causal conv, the last
    width - 1 inputs of each sequence kept in a pool (slot, tok, dim), vLLM's SD layout."""

    def __init__(self, dim: int = 16, width: int = 4, slots: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, dim))
        self.register_buffer("conv_state", torch.zeros(slots, width - 1, dim))

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:  # x: (batch, dim)
        window = torch.cat([self.conv_state[slots], x[:, None]], 1)  # (batch, width, dim)
        self.conv_state[slots] = window[:, 1:]
        return (window * self.weight).sum(1)


def main() -> None:
    model = build("hybrid", num_spec=1)
    result = check_equivalence(model, optimize(model, "DS"))  # prefills, decode, spec decode, slot reuse
    print(f"hybrid over its serving scenario: {str(result).splitlines()[0]}")
    print("\n".join(str(result).splitlines()[1:6]), "\n  ...")

    mine = MyShortConv()
    calls = [dict(x=torch.randn(len(slots), 16), slots=torch.tensor(slots)) for slots in ([1, 4, 6], [4, 2], [1, 4, 6])]
    fast = optimize(mine, "DS")
    result = check_equivalence(mine, fast, calls)  # the state starts random, the same in both
    print(f"\nMyShortConv over {len(calls)} calls: {result}")
    print(f"\n{fast.report}")


if __name__ == "__main__":
    main()
