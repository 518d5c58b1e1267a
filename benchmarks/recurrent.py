"""Recurrent-state decode benchmark: the Mamba2 SSM update (selective_state_update) and the
gated delta rule (delta_rule_update: GDN, one decay per head, and KDA, one per key channel),
ours on pools stored VK (k contiguous) and KV (v contiguous), fp32 and bf16 states, and the
peers on the same data in the same run:

  --fla        FLA 0.6 (fla-core): fused_recurrent_simple_gla (the SSM as simple GLA: q = C,
               k = B, v = dt x, g = dt A) and fused_recurrent_gated_delta_rule (g, or gk for
               KDA), with state_v_first for the VK order. FLA keeps a dense (batch, heads, ., .)
               state and writes a new fp32 final state: timed as FLA uses it ("FLA dense"), and
               with the gather + scatter a dense kernel needs over a slot pool ("FLA pool":
               index_select, the kernel, index_copy_ of the final state cast to the pool's dtype).
  --peer-ssm   MODULE:FUNC with vLLM's selective_state_update signature (vllm_ssm:
               selective_state_update from benchmarks/peers/fetch.py: vLLM 0.33.0's, with its
               tuned block tables), run on our pools in both orders (it takes any strides).
  --peer-gdn   MODULE:FUNC with vLLM's fused_recurrent_gated_delta_rule signature (vllm_gdn:
               fused_recurrent_gated_delta_rule); it addresses a slot's state as a dense
               (heads, V, K) block, so it runs on the VK pools only.
  --peer-kda   MODULE:FUNC with vLLM's fused_recurrent_kda signature (vllm_gdn:fused_recurrent_kda),
               VK pools only, like --peer-gdn.

First every implementation is checked on fresh data: ours against a float64 pure-torch step
(outputs and the new states; untouched slots unchanged), every peer against ours (a failed
check is recorded, and that implementation is left out of the timings; the run goes on).
Then everything is timed in CUDA graphs (triton.testing.do_bench_cudagraph, median): one
replay calls the step on several layers' pools of S.slots slots with random distinct slot
indices, enough calls that each replay touches ~200 MB of distinct state (more than 3x the
H200's 60 MB L2), so no call finds its state in L2; time per call. Figures are fractions of
the copy bandwidth measured in the same run, against the byte floor: each sequence's state
read once and written once in the pool's dtype, every input read once, every output written
once (the same floor for every implementation of a work). Decode: one token per sequence.

Shapes: Mamba2 2.7B-class (80 heads, head_dim 64, d_state 128, 1 group); GDN (32 value heads,
16 q/k heads, K = V = 128, Qwen3-Next-like); KDA (32 heads, K = V = 128). Activations bf16;
A, D, dt_bias and g fp32. SSM: softplus(dt + dt_bias), D skip, no z (vLLM's Mamba2 decode);
delta rule: q/k l2norm in the kernel, scale K^-0.5.

    python benchmarks/recurrent.py                         # checks, timings; recurrent.json/.md under $OUT
    python benchmarks/recurrent.py --sweep                 # first time block shapes, then use the winners
    python benchmarks/recurrent.py --sweep-only            # only that: writes recurrent_blocks.json
    python benchmarks/recurrent.py --blocks recurrent_blocks.json   # a run with a swept table
    python benchmarks/recurrent.py --profile               # one launch per case, for ncu
    TRITON_INTERPRET=1 python benchmarks/recurrent.py --tiny   # CPU dry run at tiny shapes, no timing
    (peers: see benchmarks/peers/fetch.py for the wheels and PYTHONPATH)
"""

import argparse
import importlib
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from layoutpass.kernels import delta_rule_update, selective_state_update, triton_recurrent


@dataclass(frozen=True)
class Shapes:
    device: str
    batches: tuple[int, ...]
    slots: int  # per pool (slot 0 is the null block, never used)
    layers: int  # pools per (op, dtype, order): calls in a replay rotate over them
    replay_bytes: int  # distinct state bytes one CUDA-graph replay touches, at least
    min_calls: int  # calls per replay, at least
    act: torch.dtype  # activations and outputs
    ssm: dict
    gdn: dict
    kda: dict


FULL = Shapes("cuda", (1, 16, 64, 256, 1024), 1152, 4, 200 << 20, 4, torch.bfloat16,
              ssm=dict(heads=80, head_dim=64, d_state=128, groups=1),
              gdn=dict(heads=32, qk_heads=16, K=128, V=128), kda=dict(heads=32, qk_heads=32, K=128, V=128))
# The interpreter's dry run, with fp32 activations: vLLM's SSM kernel stores fp32 into the
# output, which a GPU converts and the interpreter writes as raw bits.
TINY = Shapes("cpu", (1, 5), 12, 2, 0, 2, torch.float32, ssm=dict(heads=4, head_dim=8, d_state=16, groups=2),
              gdn=dict(heads=4, qk_heads=2, K=16, V=8), kda=dict(heads=2, qk_heads=2, K=16, V=16))
S = FULL
OPS = ("ssm", "gdn", "kda")
ORDERS = ("VK", "KV")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KERNEL_OP = {"ssm": "ssu", "gdn": "gdn", "kda": "kda"}  # triton_recurrent.BLOCKS' names
ROUNDS = 3
REP_MS = 40
START = time.perf_counter()
FLA_NOTE = ("FLA is given its inputs precomputed outside the timed call (SSM: softplus(dt + dt_bias), dt x, "
            "dt A, B and C per head; the D x skip is added after, untimed) and writes a new fp32 final "
            "state; FLA dense: its own dense (batch, heads, ., .) state in the pool's dtype (one per call); "
            "FLA pool: index_select from the pool, the kernel, index_copy_ back (cast to the pool's dtype); "
            "fused_recurrent_simple_gla autotunes num_warps on shapes only and is retuned at each batch "
            "(its best case)")
VLLM_NOTE = ("vLLM's GDN/KDA kernels address a slot's state as a dense (heads, V, K) block: VK pools only; "
             "its SSM kernel takes any strides (both orders) and reads its tuned block table for the card")


def shape(op: str) -> dict:
    return getattr(S, op)


# ---------------------------------------------------------------- data

def logical_shape(op: str) -> tuple[int, ...]:
    """The op's pool shape (slot, snap, head, ., .): (v, k) for the SSM, (k, v) for the delta rule."""
    s = shape(op)
    if op == "ssm":
        return S.slots, 1, s["heads"], s["head_dim"], s["d_state"]
    return S.slots, 1, s["heads"], s["K"], s["V"]


def axes(op: str) -> tuple[int, int]:
    """(v axis, k axis) of the logical pool."""
    return (3, 4) if op == "ssm" else (4, 3)


def perm(op: str, order: str) -> list[int]:
    v, k = axes(op)
    return [0, 1, 2, v, k] if order == "VK" else [0, 1, 2, k, v]


def make_pool(op: str, order: str, dtype: torch.dtype) -> torch.Tensor:
    """A random pool stored in `order` (dense), as the op sees it (its logical shape)."""
    p = perm(op, order)
    logical = logical_shape(op)
    storage = torch.randn([logical[d] for d in p], device=S.device).to(dtype)
    return storage.permute([p.index(d) for d in range(5)])


def physical(pool: torch.Tensor, op: str, order: str) -> torch.Tensor:
    """The pool's snapshot-0 states in memory order: (slots, heads, ., .), contiguous."""
    view = pool.permute(perm(op, order))[:, 0]
    assert view.is_contiguous()
    return view


def state_bytes(op: str, dtype: torch.dtype) -> int:
    """One sequence's state."""
    return math.prod(logical_shape(op)[2:]) * torch.finfo(dtype).bits // 8


def act(*shape_):
    return torch.randn(shape_, device=S.device).to(S.act)


def inputs(op: str, batch: int) -> dict:
    """One call's step inputs (one token per sequence) and its output buffer."""
    s = shape(op)
    f32 = lambda *sh: torch.randn(sh, device=S.device)
    if op == "ssm":
        h, p, n, g = s["heads"], s["head_dim"], s["d_state"], s["groups"]
        return dict(x=act(batch, 1, h, p), dt=(act(batch, 1, h).float() * 0.5).to(S.act), B=act(batch, 1, g, n),
                    C=act(batch, 1, g, n), out=torch.empty(batch, 1, h, p, device=S.device, dtype=S.act))
    h, hq, K, V = s["heads"], s["qk_heads"], s["K"], s["V"]
    decay = (batch, 1, h, K) if op == "kda" else (batch, 1, h)
    return dict(q=act(batch, 1, hq, K), k=act(batch, 1, hq, K), v=act(batch, 1, h, V),
                g=F.logsigmoid(f32(*decay) + 2), beta=torch.sigmoid(act(batch, 1, h).float()).to(S.act),
                out=torch.empty(batch, 1, h, V, device=S.device, dtype=S.act))


def params(op: str) -> dict:
    """Per-layer parameters (shared by every call of a case)."""
    if op != "ssm":
        return dict(scale=shape(op)["K"] ** -0.5)
    h = shape(op)["heads"]
    u = lambda lo, hi: torch.rand(h, device=S.device) * (hi - lo) + lo
    return dict(A=-u(1, 16), D=torch.randn(h, device=S.device), dt_bias=torch.log(torch.expm1(u(1e-3, 0.1))))


def calls_for(op: str, dtype: torch.dtype, batch: int, pools: list[torch.Tensor], gen: random.Random) -> list:
    """The calls of one CUDA-graph replay: enough that it touches S.replay_bytes of distinct
    state; call j uses pool j % layers and slots no other call of that pool uses (while the
    pools have room)."""
    per_call = batch * state_bytes(op, dtype)
    room = len(pools) * ((S.slots - 1) // batch)
    count = max(S.min_calls, min(room, -(-S.replay_bytes // per_call)))
    free = [[] for _ in pools]
    calls = []
    for j in range(count):
        layer = j % len(pools)
        if len(free[layer]) < batch:
            free[layer] = gen.sample(range(1, S.slots), S.slots - 1)
        slots, free[layer] = free[layer][:batch], free[layer][batch:]
        idx = torch.tensor(slots, device=S.device, dtype=torch.int32)
        calls.append(SimpleNamespace(op=op, pool=pools[layer], idx=idx, idx64=idx.long(), **inputs(op, batch)))
    return calls


# ---------------------------------------------------------------- float64 steps (the checks' truth)

def _softplus64(d):
    return torch.where(d <= 20, torch.log1p(torch.exp(d)), d)


def step64(op: str, prm: dict, call, states: torch.Tensor, chunk: int = 128):
    """One token in float64, pure torch, written from the contract (not kernels/recurrent.py):
    returns (out (batch, heads, v), new states) from `states` (batch, heads, ., .) logical."""
    outs, news = [], []
    for lo in range(0, states.shape[0], chunk):
        h = states[lo:lo + chunk].double()
        rows = slice(lo, lo + chunk)
        if op == "ssm":
            ratio = shape(op)["heads"] // shape(op)["groups"]
            x = call.x[rows, 0].double()
            d = _softplus64(call.dt[rows, 0].double() + prm["dt_bias"].double())
            b = call.B[rows, 0].double().repeat_interleave(ratio, 1)
            c = call.C[rows, 0].double().repeat_interleave(ratio, 1)
            h = torch.exp(d * prm["A"].double())[..., None, None] * h + (d[..., None] * x)[..., None] * b[:, :, None]
            y = (h * c[:, :, None]).sum(-1) + prm["D"].double()[:, None] * x
        else:
            ratio = shape(op)["heads"] // shape(op)["qk_heads"]
            norm = lambda t: t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)
            q = norm(call.q[rows, 0].double()).repeat_interleave(ratio, 1) * prm["scale"]
            k = norm(call.k[rows, 0].double()).repeat_interleave(ratio, 1)
            g = torch.exp(call.g[rows, 0].double())
            h = h * (g[..., None] if op == "kda" else g[..., None, None])
            recalled = (h * k[..., None]).sum(-2)
            h = h + k[..., None] * ((call.v[rows, 0].double() - recalled) * call.beta[rows, 0].double()[..., None])[
                ..., None, :]
            y = (h * q[..., None]).sum(-2)
        outs.append(y)
        news.append(h)
    return torch.cat(outs), torch.cat(news)


# ---------------------------------------------------------------- implementations

def peer(spec: str | None):
    if not spec:
        return None
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def ours(op: str, prm: dict):
    """setup(call) -> (thunk, read): thunk runs one step; read() -> (out (batch, heads, v), the
    call's new states (batch, heads, ., .) logical). Our public op; the dry run calls its
    Triton launcher (on the CPU the op runs the pure-torch reference)."""
    cpu = S.device == "cpu"

    def setup(c):
        if op == "ssm":
            if cpu:
                thunk = lambda: triton_recurrent.ssu(c.pool, c.x, c.dt, prm["A"], c.B, c.C, prm["D"], None,
                                                     prm["dt_bias"], True, c.idx, None, 0, c.out)
            else:
                thunk = lambda: selective_state_update(c.pool, c.x, c.dt, prm["A"], c.B, c.C, D=prm["D"],
                                                       dt_bias=prm["dt_bias"], dt_softplus=True,
                                                       state_batch_indices=c.idx, out=c.out)
        elif cpu:
            thunk = lambda: triton_recurrent.delta_rule(c.pool, c.q, c.k, c.v, c.g, c.beta, prm["scale"], c.idx, None,
                                                        0, True, c.out)
        else:
            thunk = lambda: delta_rule_update(c.pool, c.q, c.k, c.v, c.g, c.beta, prm["scale"], state_indices=c.idx,
                                              use_qk_l2norm=True, out=c.out)
        return thunk, lambda: (c.out[:, 0], c.pool[c.idx64, 0])
    return setup


def vllm_ssm(fn, prm: dict):
    """vLLM's selective_state_update on our pool (its (slots, heads, head_dim, d_state) view at
    snapshot 0, any strides), dt/A/D/dt_bias broadcast per head_dim with stride 0 (its scalar
    path, as vLLM's Mamba2 layer passes them)."""
    h, p, n = (shape("ssm")[k] for k in ("heads", "head_dim", "d_state"))
    A = prm["A"][:, None, None].expand(h, p, n)
    D, dt_bias = prm["D"][:, None].expand(h, p), prm["dt_bias"][:, None].expand(h, p)

    def setup(c):
        dt = c.dt[:, 0, :, None].expand(-1, -1, p)
        thunk = lambda: fn(c.pool[:, 0], c.x[:, 0], dt, A, c.B[:, 0], c.C[:, 0], D, dt_bias, dt_softplus=True,
                           state_batch_indices=c.idx, out=c.out[:, 0])
        return thunk, lambda: (c.out[:, 0], c.pool[c.idx64, 0])
    return setup


def vllm_delta(fn, op: str, prm: dict):
    """vLLM's fused recurrent GDN / KDA on our VK pool: its initial_state is the pool's
    (slots, heads, V, K) memory, updated in place at ssm_state_indices."""
    def setup(c):
        state = physical(c.pool, op, "VK")
        held = {}

        def thunk():
            held["o"] = fn(c.q, c.k, c.v, c.g, c.beta, scale=prm["scale"], initial_state=state,
                           inplace_final_state=True, ssm_state_indices=c.idx, use_qk_l2norm_in_kernel=True)[0]
        return thunk, lambda: (held["o"][:, 0], c.pool[c.idx64, 0])
    return setup


def fla_functions():
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    from fla.ops.simple_gla import fused_recurrent_simple_gla
    return fused_recurrent_simple_gla, fused_recurrent_gated_delta_rule


def fla_impl(op: str, order: str, prm: dict, pooled: bool):
    """FLA's fused recurrent kernel, dense or over the pool (gather + scatter); see FLA_NOTE.
    FLA's state is (K, V), or (V, K) with state_v_first: for the SSM K = d_state, V = head_dim,
    so our VK (head_dim, d_state) is FLA's v-first and our KV its default; for the delta rule
    our orders are FLA's directly."""
    simple_gla, gated_delta = fla_functions()
    v_first = order == "VK"
    # FLA's state order vs our logical one: transposed for the SSM's KV and the delta rule's VK.
    transposed = (op == "ssm") != v_first

    def to_logical(t):
        return t.transpose(-1, -2) if transposed else t

    def setup(c):
        if op == "ssm":
            ratio = shape("ssm")["heads"] // shape("ssm")["groups"]
            d = F.softplus(c.dt.float() + prm["dt_bias"])
            args = (c.C.repeat_interleave(ratio, 2).contiguous(), c.B.repeat_interleave(ratio, 2).contiguous(),
                    d[..., None] * c.x.float())
            kw = dict(g=d * prm["A"], scale=1.0)
            run = simple_gla
        else:
            args = (c.q, c.k, c.v)
            kw = dict(g=c.g) if op == "gdn" else dict(gk=c.g)
            kw.update(beta=c.beta, scale=prm["scale"], use_qk_l2norm_in_kernel=True)
            run = gated_delta
        held = {}
        if pooled:
            memory = physical(c.pool, op, order)

            def thunk():
                o, final = run(*args, initial_state=memory.index_select(0, c.idx64), output_final_state=True,
                               state_v_first=v_first, **kw)
                memory.index_copy_(0, c.idx64, final.to(memory.dtype))
                held["o"] = o
        else:
            dense = physical(c.pool, op, order).index_select(0, c.idx64)

            def thunk():
                held["o"], held["final"] = run(*args, initial_state=dense, output_final_state=True,
                                               state_v_first=v_first, **kw)

        def read():
            o = held["o"][:, 0].float()
            if op == "ssm":
                o = o + prm["D"][:, None] * c.x[:, 0].float()
            return o, (c.pool[c.idx64, 0] if pooled else to_logical(held["final"]))
        return thunk, read
    return setup


def implementations(args, op: str, order: str, prm: dict) -> dict:
    """(name, order) -> setup; see ours()."""
    impls = {("ours", order): ours(op, prm)}
    spec = {"ssm": args.peer_ssm, "gdn": args.peer_gdn, "kda": args.peer_kda}[op]
    if spec and (op == "ssm" or order == "VK"):
        impls[("vLLM", order)] = vllm_ssm(peer(spec), prm) if op == "ssm" else vllm_delta(peer(spec), op, prm)
    if args.fla:
        impls[("FLA dense", order)] = fla_impl(op, order, prm, pooled=False)
        impls[("FLA pool", order)] = fla_impl(op, order, prm, pooled=True)
    return impls


# ---------------------------------------------------------------- checks

def relative_error(got: torch.Tensor, expected: torch.Tensor, tol: float) -> float:
    """||got - expected|| / ||expected|| over the whole tensor (NaN fails)."""
    got, expected = got.double(), expected.double()
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < tol, f"relative error {error:.3g} >= {tol:g}"
    return error


def guarded(result: dict, failed: set, key: tuple, label: str, check) -> None:
    """result[label] = check(); a failed check (or a crash) is recorded and its implementation
    left out of the timings instead of ending the run."""
    try:
        result[label] = check()
    except Exception as error:  # noqa: BLE001 - a peer may fail in any way; the run goes on
        result[label] = f"FAILED: {type(error).__name__}: {str(error)[:300]}"
        failed.add(key)
        print(f"check failed: {key} {label}: {result[label]}", flush=True)


def check_case(args, op, dtype_name, order, batch, pools, prm, gen, failed) -> dict:
    """Ours against the float64 step (outputs, new states; a sample of untouched slots
    unchanged), then every peer against ours, each from the same initial states (restored
    between runs). Tolerances: 1e-2 relative where bf16 is involved (activations, outputs,
    bf16 states), 1e-4 for fp32 states."""
    work = f"{op} {dtype_name} B={batch}"
    dtype = DTYPES[dtype_name]
    (call,) = calls_for(op, dtype, batch, pools[:1], gen)[:1]
    before = call.pool[call.idx64, 0].clone()
    others = torch.tensor(sorted(set(range(1, S.slots)) - set(call.idx.tolist()))[:8], device=S.device)
    untouched = call.pool[others].clone()
    expected_out, expected_state = step64(op, prm, call, before)
    state_tol = 1e-4 if dtype == torch.float32 else 1e-2
    result, ours_result = {}, {}
    for (name, impl_order), setup in implementations(args, op, order, prm).items():
        def check():
            call.pool[call.idx64, 0] = before
            call.out.fill_(float("nan"))
            thunk, read = setup(call)
            thunk()
            out, state = read()
            if name == "ours":
                ours_result["out"], ours_result["state"] = out.clone(), state.clone()
                assert torch.equal(call.pool[others], untouched), "a slot outside the batch changed"
                return (f"out {relative_error(out, expected_out, 1e-2):.2g}, "
                        f"state {relative_error(state, expected_state, state_tol):.2g}")
            return (f"out {relative_error(out, ours_result['out'], 1e-2):.2g}, "
                    f"state {relative_error(state, ours_result['state'], state_tol):.2g}")
        label = f"{name} {impl_order} vs " + ("float64" if name == "ours" else "ours")
        guarded(result, failed, (work, name, impl_order), label, check)
    call.pool[call.idx64, 0] = before
    return dict(work=work, order=order, **result)


def check_compiled(gen) -> str:
    """torch.compile(fullgraph=True) of our steps gives eager's bits (smallest and largest batch,
    bf16 VK pools)."""
    results = []
    for op in ("ssm", "gdn"):
        pools = [make_pool(op, "VK", torch.bfloat16)]
        prm = params(op)
        for batch in (S.batches[0], S.batches[-1]):
            (call,) = calls_for(op, torch.bfloat16, batch, pools, gen)[:1]
            thunk, read = ours(op, prm)(call)

            def step():
                thunk()
                return read()
            start = call.pool[call.idx64, 0].clone()
            eager_out, eager_state = (t.clone() for t in step())
            call.pool[call.idx64, 0] = start
            try:
                got_out, got_state = torch.compile(step, fullgraph=True)()
            except Exception as error:  # noqa: BLE001 - reported in the results, the timings still run
                return f"torch.compile failed ({op} B={batch}): {type(error).__name__}: {str(error)[:300]}"
            results.append(torch.equal(got_out, eager_out) and torch.equal(got_state, eager_state))
        del pools
    return ("torch.compile == eager (bits), SSM and GDN at B=" + f"{S.batches[0]} and {S.batches[-1]}"
            if all(results) else f"torch.compile differs: {results}")


# ---------------------------------------------------------------- timing

def bench_us(fn, rep: int = REP_MS) -> float:
    """Median microseconds per fn() call in CUDA-graph replays. On the CPU (the dry run) one
    timed call, which says nothing about speed."""
    if S.device == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (1 GiB each way), bytes read + written."""
    src = torch.randn(1 << (28 if S.device == "cuda" else 18), device=S.device)
    dst = torch.empty_like(src)
    if S.device == "cpu":
        us = bench_us(lambda: dst.copy_(src))
    else:
        us = do_bench(lambda: dst.copy_(src), rep=200, return_mode="median") * 1e3
    return 2 * src.numel() * 4 / us / 1e3


def floor_bytes(op: str, dtype: torch.dtype, batch: int) -> int:
    """State read + written once, inputs read once, outputs written once (T = 1)."""
    s, e = shape(op), torch.finfo(S.act).bits // 8
    if op == "ssm":
        h, p, n, g = s["heads"], s["head_dim"], s["d_state"], s["groups"]
        per_seq = 2 * h * p * e + h * e + 2 * g * n * e  # x, out; dt; B, C
        fixed = 3 * h * 4
    else:
        h, hq, K, V = s["heads"], s["qk_heads"], s["K"], s["V"]
        # q, k; v, out; beta; g
        per_seq = 2 * hq * K * e + 2 * h * V * e + h * e + (h * K * 4 if op == "kda" else h * 4)
        fixed = 0
    return batch * (2 * state_bytes(op, dtype) + per_seq + 4) + fixed


def time_case(impls: dict, calls: list, rep: int = REP_MS) -> dict:
    """Microseconds per call for each implementation, ROUNDS interleaved rounds (a list each)."""
    thunks = {key: [setup(c)[0] for c in calls] for key, setup in impls.items()}
    times = {key: [] for key in impls}
    for _ in range(ROUNDS if S.device == "cuda" else 1):
        for key, ts in thunks.items():
            def step(ts=ts):
                for t in ts:
                    t()
            times[key].append(bench_us(step, rep) / len(calls))
    return times


def retune_fla() -> None:
    """fused_recurrent_simple_gla's kernel autotunes on shapes only (not the batch) and keeps its
    first choice: forget it, so each batch is timed with the num_warps tuned for it (FLA's best
    case; its on-disk cache of choices is off, FLA_CACHE_RESULTS=0)."""
    from fla.ops.common import fused_recurrent
    from triton.runtime.autotuner import Autotuner

    tuner = fused_recurrent.fused_recurrent_fwd_kernel
    while not isinstance(tuner, Autotuner):
        tuner = tuner.fn
    tuner.cache.clear()


def run_group(args, op, dtype_name, order, bw, rows, checks, gen, failed, log) -> None:
    """Check, then time, every implementation of one (op, state dtype, order) at every batch."""
    dtype = DTYPES[dtype_name]
    pools = [make_pool(op, order, dtype) for _ in range(S.layers)]
    prm = params(op)
    for batch in S.batches:
        checks.append(check_case(args, op, dtype_name, order, batch, pools, prm, gen, failed))
        log(f"checked {checks[-1]}")
    for batch in S.batches:
        work = f"{op} {dtype_name} B={batch}"
        calls = calls_for(op, dtype, batch, pools, gen)
        impls = {key: setup for key, setup in implementations(args, op, order, prm).items()
                 if (work, *key) not in failed}
        if args.fla and op == "ssm":
            retune_fla()
        times = time_case(impls, calls)
        floor = floor_bytes(op, dtype, batch)
        for (name, impl_order), ts in times.items():
            us = statistics.median(ts)
            rows.append(dict(work=work, op=op, dtype=dtype_name, batch=batch, impl=name, order=impl_order, us=us,
                             runs_us=ts, calls_per_replay=len(calls), floor_bytes=floor,
                             frac_bw=floor / (us * 1e-6) / 1e9 / bw))
        log(f"{work} {order} ({len(calls)} calls/replay, {time.perf_counter() - START:.0f} s): " + ", ".join(
            f"{n} {statistics.median(t):.2f} us ({100 * floor / (statistics.median(t) * 1e-6) / 1e9 / bw:.0f}%)"
            for (n, _), t in times.items()))
        del calls
    del pools
    if S.device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- sweep, profile

def candidates(order: str, op: str) -> list[tuple[int, int]]:
    """(BLOCK_V, num_warps) alternatives: tiles of 8-128 state elements per thread (vLLM's delta
    rule runs 128: a 32 x 128 tile in one warp)."""
    K = shape(op)["d_state" if op == "ssm" else "K"]
    V = shape(op)["head_dim" if op == "ssm" else "V"]
    blocks = [b for b in ((2, 4, 8, 16, 32) if order == "VK" else (8, 16, 32, 64)) if b <= triton.next_power_of_2(V)]
    found = [(b, w) for b in blocks for w in (1, 2, 4, 8) if 8 <= b * triton.next_power_of_2(K) // (32 * w) <= 128]
    return found or [(b, w) for b in blocks for w in (1, 2)]  # (the dry run's tiny heads)


def sweep(args, gen, log) -> dict:
    """Time our candidates per (op, order, state dtype) at each batch and put the winners in
    triton_recurrent.BLOCKS (the timings that follow use them; the table is logged to ship)."""
    chosen = {}
    for op in args.ops:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for order in ORDERS:
                key = (KERNEL_OP[op], triton_recurrent.VK if order == "VK" else triton_recurrent.KV,
                       torch.finfo(dtype).bits // 8)
                shipped = triton_recurrent.BLOCKS[key]
                pools = [make_pool(op, order, dtype) for _ in range(S.layers)]
                prm = params(op)
                table = []
                for batch in S.batches:
                    calls = calls_for(op, dtype, batch, pools, gen)
                    results = []
                    for block in candidates(order, op):
                        triton_recurrent.BLOCKS[key] = [(1 << 62, *block)]
                        thunks = [ours(op, prm)(c)[0] for c in calls]
                        results.append((bench_us(lambda: [t() for t in thunks], rep=20) / len(calls), block))
                    results.sort()
                    log(f"sweep {op} {dtype_name} {order} B={batch}: " +
                        "; ".join(f"{us:.2f} us {block}" for us, block in results[:5]))
                    table.append((batch * shape(op)["heads"], *results[0][1]))
                table[-1] = (1 << 62, *table[-1][1:])
                merged = [row for i, row in enumerate(table) if i + 1 == len(table) or row[1:] != table[i + 1][1:]]
                triton_recurrent.BLOCKS[key] = merged
                chosen[",".join(map(str, key))] = dict(shipped=shipped, swept=merged)
                log(f"BLOCKS[{key}] = {merged}  (shipped {shipped})")
                del pools
                if S.device == "cuda":
                    torch.cuda.empty_cache()
    (args.out / "recurrent_blocks.json").write_text(json.dumps({k: v["swept"] for k, v in chosen.items()}, indent=1))
    log(f"wrote {args.out / 'recurrent_blocks.json'} (--blocks FILE applies it to a later run)")
    return chosen


def load_blocks(path: Path) -> dict:
    """Apply a table written by --sweep: {"op,order,elem bytes": [[largest batch*heads, BLOCK_V, warps], ...]}."""
    table = json.loads(path.read_text())
    for key, rows in table.items():
        op, order, elem = key.split(",")
        triton_recurrent.BLOCKS[(op, int(order), int(elem))] = [tuple(row) for row in rows]
    return table


def profile(args, gen) -> None:
    """One launch per case and nothing else (for ncu's kernel filter): ours at every batch for
    each (op, dtype, order), then each peer once at B=256 (or the largest batch below it)."""
    for op in args.ops:
        for dtype_name in args.dtypes:
            for order in ORDERS:
                pools = [make_pool(op, order, DTYPES[dtype_name])]
                prm = params(op)
                for batch in S.batches:
                    (call,) = calls_for(op, DTYPES[dtype_name], batch, pools, gen)[:1]
                    impls = implementations(args, op, order, prm)
                    names = list(impls) if batch == max(b for b in S.batches if b <= 256) else [("ours", order)]
                    for key in names:
                        impls[key](call)[0]()
                        if S.device == "cuda":
                            torch.cuda.synchronize()
                        print(f"profiled: {op} {dtype_name} B={batch} {key[0]} {key[1]}", flush=True)
                del pools


# ---------------------------------------------------------------- report

def versions(args) -> dict:
    out = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, nccl="not used (one GPU, no collectives)")
    if args.fla:
        import fla
        out["fla"] = getattr(fla, "__version__", "?")
    for name, spec in (("vllm ssm", args.peer_ssm), ("vllm gdn", args.peer_gdn), ("vllm kda", args.peer_kda)):
        if spec:
            module = importlib.import_module(spec.split(":")[0])
            first = Path(module.__file__).read_text().splitlines()[0]
            out[name] = first.split(" from the ")[1].split(" wheel")[0] if " wheel" in first else module.__file__
    return out


def wide_table(rows: list[dict]) -> list[str]:
    """One line per (op, state dtype, batch), one column per implementation and pool order."""
    names = ["ours", "vLLM", "FLA dense", "FLA pool"]
    columns = [(n, o) for n in names for o in ORDERS if any((r["impl"], r["order"]) == (n, o) for r in rows)]
    lines = ["| us (% of copy bw) | " + " | ".join(f"{n} {o}" for n, o in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for work in dict.fromkeys(r["work"] for r in rows):
        cells = {(r["impl"], r["order"]): r for r in rows if r["work"] == work}
        lines.append(f"| {work} | " + " | ".join(
            f"{cells[c]['us']:.2f} ({100 * cells[c]['frac_bw']:.0f}%)" if c in cells else "-" for c in columns) + " |")
    return lines


def report(args, card, bw, rows, checks, compiled, swept, log_lines) -> list[str]:
    meta = dict(card=card, versions=versions(args), copy_bw_gbs=round(bw),
                shapes=dict(ssm=S.ssm, gdn=S.gdn, kda=S.kda),
                slots=S.slots, layers=S.layers, replay_bytes=S.replay_bytes, activations=str(S.act), rounds=ROUNDS,
                blocks={",".join(map(str, k)): v for k, v in triton_recurrent.BLOCKS.items()}, pdl=triton_recurrent.PDL,
                swept=swept, blocks_file=str(args.blocks) if args.blocks else None,
                peers=dict(fla=args.fla, ssm=args.peer_ssm, gdn=args.peer_gdn, kda=args.peer_kda))
    if args.peer_ssm:
        module = importlib.import_module(args.peer_ssm.split(":")[0])
        if hasattr(module, "get_ssm_configs"):
            meta["vllm_ssm_tuned_tables"] = {d: module.get_ssm_configs(S.ssm["head_dim"], S.ssm["d_state"], d)
                                             is not None for d in ("float32", "bfloat16")}
    (args.out / "recurrent.json").write_text(json.dumps(dict(meta, rows=rows, checks=checks, compiled=compiled),
                                                        indent=1, default=str))
    lines = [f"Card: {card}; " + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()) +
             f"; copy bandwidth {bw:.0f} GB/s (bytes read + written), measured in this run.",
             f"Decode, one token per sequence; pools of {S.slots} slots, random distinct slots; CUDA-graph replays "
             f"over {S.layers} layers' pools touching >= {S.replay_bytes >> 20} MB of distinct state per replay "
             f"(L2-cold), time per call, median of {ROUNDS} interleaved rounds; % of copy bandwidth against the "
             "byte floor (state read + written once, inputs and outputs once). Ours: the public ops "
             "(selective_state_update, delta_rule_update). Every implementation checked first (recurrent.json: "
             "checks).", ""]
    lines += wide_table(rows)
    lines += [""] + ([f"FLA: {FLA_NOTE}."] if args.fla else []) + (
        [f"vLLM: {VLLM_NOTE}."] if (args.peer_ssm or args.peer_gdn or args.peer_kda) else [])
    lines += [f"torch.compile: {compiled}"] if compiled else []
    failures = [f"{c['work']} {c['order']}: {k}: {v}" for c in checks for k, v in c.items()
                if isinstance(v, str) and v.startswith("FAILED")]
    lines += ["", "Failed checks (left out of the timings): " + ("; ".join(failures) if failures else "none")]
    (args.out / "recurrent.md").write_text("\n".join(lines) + "\n")
    (args.out / "recurrent.log").write_text("\n".join(log_lines) + "\n")
    return lines


def patch_interpreter() -> None:
    """Triton 3.6's interpreter turns a scalar into an index with int() of a one-element array,
    which numpy >= 2.3 refuses: a loop over a runtime count (FLA's and vLLM's kernels have
    them) fails. The dry run indexes the element instead."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = patched


def main():
    global S
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else benchmarks/results "
                                                               "(the dry run: a temporary folder)")
    parser.add_argument("--sweep", action="store_true", help="time block shapes first and use the winners "
                                                             "(also written to recurrent_blocks.json)")
    parser.add_argument("--sweep-only", action="store_true", help="--sweep, then stop")
    parser.add_argument("--blocks", type=Path, help="a recurrent_blocks.json from an earlier --sweep: use its table")
    parser.add_argument("--profile", action="store_true", help="one launch per case, for ncu; no timing, no files")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--fla", action="store_true", help="FLA 0.6's fused recurrent kernels (fla-core installed)")
    parser.add_argument("--peer-ssm", help="MODULE:FUNC with vLLM's selective_state_update signature")
    parser.add_argument("--peer-gdn", help="MODULE:FUNC with vLLM's fused_recurrent_gated_delta_rule signature")
    parser.add_argument("--peer-kda", help="MODULE:FUNC with vLLM's fused_recurrent_kda signature")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of ssm,gdn,kda")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of fp32,bf16 (states)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,16,64,256,1024)")
    parser.add_argument("--no-compile-check", action="store_true", help="skip the torch.compile bit check")
    args = parser.parse_args()
    args.ops = [o for o in args.ops.split(",") if o]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if set(args.ops) - set(OPS) or set(args.dtypes) - set(DTYPES):
        parser.error(f"--ops from {OPS}, --dtypes from {tuple(DTYPES)}")
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--tiny runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        S = TINY
        patch_interpreter()
        from triton.runtime.autotuner import Autotuner  # no timer in the interpreter: autotuned peers

        Autotuner._bench = lambda self, *a, config, **kw: [0.0, 0.0, 0.0]  # (FLA) take their first config
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or --tiny under TRITON_INTERPRET=1 for a dry run")
    if args.batches:
        S = Shapes(**{**S.__dict__, "batches": tuple(int(b) for b in args.batches.split(","))})
    args.out = args.out or Path(os.environ.get("OUT") or (tempfile.mkdtemp(prefix="recurrent_tiny_") if args.tiny
                                                          else "benchmarks/results"))
    os.environ.setdefault("FLA_CACHE_RESULTS", "0")  # read when fla is imported (see retune_fla)
    gen = random.Random(0)
    torch.manual_seed(0)
    if args.blocks:
        load_blocks(args.blocks)
    if args.profile:
        return profile(args, gen)
    card = torch.cuda.get_device_name() if S.device == "cuda" else "CPU, Triton interpreter (dry run: no timing)"
    bw = copy_bandwidth()
    args.out.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(line):
        log_lines.append(line)
        print(line, flush=True)

    log(f"{card}, torch {torch.__version__}, triton {triton.__version__}: copy bandwidth {bw:.0f} GB/s")
    swept = sweep(args, gen, log) if args.sweep or args.sweep_only else None
    if args.sweep_only:
        (args.out / "recurrent.log").write_text("\n".join(log_lines) + "\n")
        return
    rows, checks, failed = [], [], set()
    for op in args.ops:
        for dtype_name in args.dtypes:
            for order in ORDERS:
                run_group(args, op, dtype_name, order, bw, rows, checks, gen, failed, log)
    compiled = None
    if S.device == "cuda" and not args.no_compile_check:  # after the timings: a suspect in GDN's figure (NOTES.md)
        compiled = check_compiled(gen)
        log(f"torch.compile: {compiled}")
    print("\n".join(report(args, card, bw, rows, checks, compiled, swept, log_lines)))
    print(f"\nwrote {args.out / 'recurrent.json'}, {args.out / 'recurrent.md'}, {args.out / 'recurrent.log'}")


if __name__ == "__main__":
    main()
