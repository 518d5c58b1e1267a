"""What one GPU can show of a TP=1 -> TP=2 conv-state transfer: the sender packing decode
rank 1's shard of 1024 slots of a Mamba2-2.7B pool into one message, and the receiver
unpacking it, under SD and DS pools (bf16, state_len 3, channels [x 5120 | B 128 | C 128]).

    python benchmarks/tp_pack.py --out DIR"""

import argparse
import json
import random
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from layoutpass.layout import DS, SD
from layoutpass.tp import _elements, plan

GROUPS, STATE_LEN, SLOTS, MOVED = (5120, 128, 128), 3, 4096, 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    gen = random.Random(0)
    src_slots = torch.tensor(gen.sample(range(SLOTS), MOVED), device="cuda")
    dst_slots = torch.tensor(gen.sample(range(SLOTS), MOVED), device="cuda")
    rows = []
    for name, layout in (("SD", SD), ("DS", DS)):
        p = plan(name, {"tok": STATE_LEN}, GROUPS, 1, 2)
        src = torch.randn(layout.shape(dict(slot=SLOTS, tok=STATE_LEN, dim=sum(GROUPS))), device="cuda",
                          dtype=torch.bfloat16)
        dst = torch.zeros(layout.shape(dict(slot=SLOTS, tok=STATE_LEN, dim=sum(GROUPS) // 2)), device="cuda",
                          dtype=torch.bfloat16)
        pieces = [q for q in p.pieces if q.dst_rank == 1]
        src_off = torch.cat([_elements(q.src_runs, "cuda") for q in pieces])
        dst_off = torch.cat([_elements(q.dst_runs, "cuda") for q in pieces])
        src_block, dst_block = src.view(SLOTS, -1), dst.view(SLOTS, -1)
        pack = lambda: src_block[src_slots[:, None], src_off[None, :]]
        message = pack()
        dst_block[dst_slots[:, None], dst_off[None, :]] = message
        expected = SD.convert(layout.view(src, SD)[src_slots][:, :, [*range(2560, 5120), *range(5184, 5248),
                                                                       *range(5312, 5376)]], layout)
        assert torch.equal(dst[dst_slots], expected), "unpacked shard differs from the logical slice"

        def unpack():
            dst_block[dst_slots[:, None], dst_off[None, :]] = message

        pack_us, unpack_us = (do_bench(f, return_mode="median") * 1e3 for f in (pack, unpack))
        rows.append(dict(layout=name, runs_per_slot=int(p.runs_per_slot(0, 1)), message_bytes=message.numel() * 2,
                         pack_us=pack_us, unpack_us=unpack_us))
    card = torch.cuda.get_device_name()
    lines = [f"Card: {card}; torch {torch.__version__}; triton {triton.__version__}. TP=1 -> TP=2, decode rank 1's "
             f"shard of {MOVED} slots, Mamba2-2.7B pool (bf16, state_len {STATE_LEN}). One GPU: the message is "
             f"packed and unpacked on the same card (no NCCL).", "",
             "| pool | runs per slot | message | pack (us) | unpack (us) |", "|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['runs_per_slot']} | {r['message_bytes'] / 1e6:.1f} MB | {r['pack_us']:.1f} | "
              f"{r['unpack_us']:.1f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tp_pack.json").write_text(json.dumps(dict(card=card, torch=torch.__version__, rows=rows), indent=1))
    (args.out / "tp_pack.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
