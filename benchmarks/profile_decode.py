"""One decode call per pool layout at B=1024 and one 8 x 2048 prefill (bf16, dim 8192, DS pool),
for a profiler:
    ncu --kernel-name regex:"conv_state|ds_|prefill_out" --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        python benchmarks/profile_decode.py [--blocks kernels.json]
--blocks takes the block tables a `benchmarks/kernels.py --sweep` run wrote (else the shipped ones)."""

import argparse
import json
import random

import torch

from layoutpass.kernels import conv_prefill, conv_update, triton_conv

DIM, SLOTS, BATCH = 8192, 4096, 1024
parser = argparse.ArgumentParser()
parser.add_argument("--blocks", help="a kernels.json whose update_blocks and pdl to use")
args = parser.parse_args()
if args.blocks:
    meta = json.load(open(args.blocks))
    triton_conv.UPDATE_BLOCKS = {k == "True": [tuple(e) for e in v] for k, v in meta["update_blocks"].items()}
    triton_conv.PDL = meta["pdl"]
    triton_conv.PREFILL_BLOCKS = {k == "True": tuple(v) for k, v in meta["prefill_blocks"].items()}
idx = torch.tensor(random.Random(0).sample(range(1, SLOTS), BATCH), device="cuda", dtype=torch.int32)
weight = torch.randn(DIM, 4, device="cuda", dtype=torch.bfloat16)
bias = torch.randn(DIM, device="cuda", dtype=torch.bfloat16)
x = torch.randn(BATCH, DIM, device="cuda", dtype=torch.bfloat16)
for layout in ("SD", "DS"):
    pool = torch.randn((SLOTS, 3, DIM) if layout == "SD" else (SLOTS, DIM, 3), device="cuda", dtype=torch.bfloat16)
    view = pool.transpose(1, 2) if layout == "SD" else pool
    for _ in range(2):
        conv_update(x, view, weight, bias, "silu", idx, out=torch.empty_like(x))
tokens = torch.randn(8 * 2048, DIM, device="cuda", dtype=torch.bfloat16).t()
qsl = torch.arange(0, 8 * 2048 + 1, 2048, device="cuda", dtype=torch.int32)
conv_prefill(tokens, weight, bias, pool, qsl, idx[:8], torch.ones(8, dtype=torch.bool, device="cuda"), "silu")
torch.cuda.synchronize()
