"""Optimize an example model and print the report: its pools, every use of them, what the pass
did with each, with the model's source lines.

    python examples/optimize_model.py [MODEL]    # MODEL: hybrid (default), mamba1, mamba2, gdn, kda, short_conv
"""

import sys

from layoutpass import optimize
from layoutpass.examples import build


def main(name: str = "hybrid") -> None:
    model = build(name, num_spec=1)  # tiny, random weights; its conv pools stored SD, as vLLM stores them
    fast = optimize(model, "DS")  # returns at once: graphs are captured on the first call of each call structure
    prefill, decode = model.scenario(decode_steps=1)  # a serving engine's calls: keyword arguments of forward
    for step in (prefill, decode, decode):  # the 2nd decode runs the graphs captured by the 1st
        logits = fast(**step.inputs)
    layouts = ", ".join(f"{kind} pools {layout}" for kind, layout in fast.layout.items())
    print(f"{name}: {type(fast).__name__}, logits {tuple(logits.shape)}; asked for: {layouts}\n")
    print(fast.report)


if __name__ == "__main__":
    main(*sys.argv[1:])
