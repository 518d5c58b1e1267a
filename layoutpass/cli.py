"""Command line: `layoutpass demo` (also `python -m layoutpass demo`)."""

import argparse
import sys
import time

import torch

from .errors import LayoutPassError
from .layout import DS, SD


def demo(args: argparse.Namespace) -> int:
    """Run the serving scenario on an example model and show that a conv-state pool stored DS
    holds the same logical state as the SD pool the model was written for."""
    from .examples import build
    from .examples.scenario import fill_state, make_scenario, run_scenario
    from .kernels import conv_update

    model = build(args.model, num_spec=1)
    pools = {name: buf for name, buf in model.named_buffers() if name.endswith("conv_state")}
    print(f"model {args.model!r}: {len(model.mixers)} layers, conv-state pools (stored {SD}, slot x tok x dim):")
    for name, buf in pools.items():
        print(f"  {name:28s} {tuple(buf.shape)}")
    steps = make_scenario(model.cfg, seed=args.seed)
    fill_state(model, args.seed)
    start = time.perf_counter()
    run_scenario(model, steps)
    print(f"scenario: {len(steps)} steps ({', '.join(s.kind for s in steps[:6])}, ...) "
          f"in {time.perf_counter() - start:.2f} s")

    name, sd_pool = next(iter(pools.items()))
    ds_pool = SD.convert(sd_pool, DS)
    mixer = model.get_submodule(name.rsplit(".", 1)[0])
    x = torch.randn(2, sd_pool.shape[2])
    slots = torch.tensor([1, 2], dtype=torch.int32)
    y_sd = conv_update(x, sd_pool.transpose(1, 2), mixer.conv_weight, mixer.conv_bias, "silu", slots,
                       out=torch.empty_like(x))
    y_ds = conv_update(x, ds_pool, mixer.conv_weight, mixer.conv_bias, "silu", slots, out=torch.empty_like(x))
    same = torch.equal(y_sd, y_ds) and torch.equal(SD.convert(sd_pool, DS), ds_pool)
    print(f"one decode step on {name}: SD pool vs DS pool -> outputs and logical state "
          f"{'identical' if same else 'DIFFER'}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layoutpass", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="run an example model and its conv-state pools in both layouts")
    run.add_argument("--model", default="hybrid", help="example model (default: hybrid)")
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LayoutPassError as err:
        print(f"layoutpass: {err}", file=sys.stderr)
        return 2
