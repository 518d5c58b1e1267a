"""Look at the graphs the pass captured and rewrote: list them, print one before and after as a
diff, and (given a file name) draw the part of each around its pools, before and after side by
side (.dot needs nothing; .svg and .png need graphviz's `dot` program).

    python examples/show_graphs.py [PICTURE.svg]
"""

import difflib
import sys

from layoutpass import optimize
from layoutpass.drawing import draw
from layoutpass.examples import build


def main(picture: str | None = None) -> None:
    model = build("mamba2", num_spec=1)
    steps = model.scenario(decode_steps=1)
    # lower=True (on CUDA inputs it is the default): the conv ops also get the pool as a kernel-order
    # view, so the graphs' code changes, not only the pools' strides
    fast = optimize(model, "DS", lower=True, example_inputs=[step.inputs for step in steps])
    for name, graph in fast.graphs.items():  # name: layer class, graph number, the arguments' shapes
        print(f"{name}: captured, proven and rewritten in {sum(graph.seconds.values()):.2f} s")
    name, graph = next((n, g) for n, g in fast.graphs.items() if g.before != g.after)
    print(f"\n{name}, before -> after (the lines that changed):")
    diff = difflib.unified_diff(graph.before.splitlines(), graph.after.splitlines(), lineterm="", n=0)
    print("\n".join(line[:150] for line in diff if line[:3] not in ("---", "+++", "@@ ")))
    print(f"(graph.before, graph.after: the code; graph.module: the {len(graph.module.graph.nodes)}-node "
          f"torch.fx.GraphModule that runs)")
    if picture:
        for path, drawn in draw(fast, picture):  # one picture per graph that reads a pool
            print(f"wrote {path}: {drawn}")


if __name__ == "__main__":
    main(*sys.argv[1:])
