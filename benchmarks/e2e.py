"""End-to-end decode on a CUDA card against its byte floor: the example models at 2.7B-class widths
(Mamba2: 64 layers; the hybrid: 16), one decode step timed in CUDA graphs, in the pool layouts of
both kinds side by side:

  as written                  the model itself (conv pools SD, recurrent pools in the order its ops use)
  DS + VK                     optimize(model, {"conv": "DS", "recurrent": "VK"})
  SD + KV                     optimize(model, {"conv": "SD", "recurrent": "KV"})
  (layout="auto" is DS + VK today, layoutpass.layout.AUTO: it has no row of its own)
  DS + VK, compiled           the DS + VK model (called eagerly first: its graphs captured, its pools
                              moved) then wrapped in torch.compile (inductor, static shapes: one
                              compile per batch size): inductor fuses the model's own elementwise
                              ops (RMSNorm, gating, residual adds) around layoutpass's kernels, which
                              stay (under an outer torch.compile the optimized model runs the
                              model's own code inline, on its moved pools, through the same ops)

Every row runs the same ops: the conv and recurrence decode kernels update their pools in place by
slot (kernels/triton_conv.py, kernels/triton_recurrent.py), decode attention reads each
sequence's positions in place in its slot, up to its length (examples/attention.py). The byte floor of a step: every parameter read once (the embedding:
the batch's rows), every touched slot's pool rows (conv and recurrent states, attention keys and
values up to its context) read once and written once, the logits written once, at the copy
bandwidth measured in the same run. Before timing, each optimized row is checked against the model
as written from one random state (logits and every state tensor; exact, or the largest difference).
The compiled row's compile time is the wall time of its first call at each batch size.

    python benchmarks/e2e.py --out DIR          # table + e2e.json + e2e.md
    python benchmarks/e2e.py --smoke            # tiny models on the CPU: the checks only (the compiled
                                                # row too, where inductor can build for the CPU)
    python benchmarks/e2e.py --compile-mode none  # without the compiled row
    python benchmarks/e2e.py --render e2e.json --out DIR  # e2e.md again from a saved run
    python benchmarks/e2e.py --profile          # where each decode step's GPU time goes, eager and
                                                # compiled: kernels by group, the time between them
"""

import argparse
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from layoutpass import optimize
from layoutpass.equivalence import logical_buffers
from layoutpass.examples import ZOO
from layoutpass.examples.lm import LM, SIZES, ModelConfig
from layoutpass.examples.scenario import Step, fill_state

MODELS = {"mamba2": ZOO["mamba2"] * 32, "hybrid": ZOO["hybrid"] * 4}
BATCHES = (1, 64, 256)
ROUNDS = 3
LAYOUTS = {"as written": None, "DS + VK": {"conv": "DS", "recurrent": "VK"},
           "SD + KV": {"conv": "SD", "recurrent": "KV"}}
COMPILED = "DS + VK, compiled"  # LAYOUTS["DS + VK"] under torch.compile


def build(layers, size: str, device, dtype, **overrides) -> LM:
    torch.manual_seed(0)
    cfg = replace(ModelConfig(layers=layers), **{**SIZES[size], **overrides})
    with torch.device(device):  # initialized where it runs
        return LM(cfg).to(dtype=dtype).eval()


def decode_step(cfg: ModelConfig, batch: int, device) -> Step:
    gen = random.Random(batch)
    slots = gen.sample(range(1, cfg.num_slots), batch)  # random distinct slots; 0 is the null block
    ints = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
    return Step("decode", dict(input_ids=torch.randint(0, cfg.vocab, (batch, 1), device=device), slots=ints(slots),
                               context_lens=ints([gen.randint(1, cfg.max_len // 2) for _ in slots])))


def byte_floor(model: LM, step: Step) -> int:
    """Bytes a decode step must move at least (see the module's docstring)."""
    batch = step.inputs["slots"].shape[0]
    total = 0
    for name, p in model.named_parameters():
        total += (batch * p.shape[1] if name == "embed.weight" else p.numel()) * p.element_size()
    for name, buf in model.named_buffers():
        per_slot = buf[0].numel() * buf.element_size()
        if name.endswith(("k_cache", "v_cache")):  # (slot, position, heads, head_dim): the positions used
            per_position = per_slot // buf.shape[1]
            positions = int((step.inputs["context_lens"].long() + 1).sum())
            total += positions * per_position + batch * per_position  # read the context, write one position
        elif buf.dim() >= 3:
            total += 2 * batch * per_slot  # a pool's rows, read and written
    return total + batch * model.cfg.vocab * 2  # the logits


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + written)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


@torch.no_grad()
def check(model: LM, fast, step: Step) -> dict:
    """The optimized row against the model as written, from the same random state."""
    for _ in range(3):  # captures, moves the pools, captures again for their new order
        fast(**step.inputs)
    fill_state(model, seed=1)
    start = logical_buffers(model)
    for name, view in logical_buffers(fast).items():
        view.copy_(start[name])
    want, got = model(**step.inputs).float(), fast(**step.inputs).float()
    theirs = logical_buffers(fast)
    state = max((buf.float() - theirs[name].float()).abs().max().item() for name, buf in logical_buffers(model).items())
    logits = (want - got).abs().max().item()
    return dict(exact=logits == 0 and state == 0, logits_diff=logits, state_diff=state,
                logits_max_abs=want.abs().max().item())


def _no_cpu_inductor(err: BaseException) -> bool:
    """Whether the error (or one it wraps) is inductor finding no C++ compiler that builds for the CPU."""
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    while err is not None:
        if isinstance(err, (CppCompileError, InvalidCxxCompiler)):
            return True
        err = getattr(err, "inner_exception", None) or err.__cause__
    return False


def time_step(call) -> float:
    """Milliseconds per decode step, CUDA-graph replays."""
    from triton.testing import do_bench_cudagraph

    with torch.no_grad():
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        return do_bench_cudagraph(call, rep=200, return_mode="median")


GROUPS = (  # kernel name fragments -> a group of the profile (first match wins)
    ("matmul", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "splitKreduce")),
    ("state updates (ours)", ("_ssu_kernel", "_delta_kernel")),
    ("conv (ours)", ("_ds_vec_kernel", "_conv_state_kernel", "_prefill_scan_kernel")),
    ("decode attention (ours)", ("_decode_kernel",)),
    ("inductor fusions", ("triton_",)),
    ("copies and gathers", ("copy", "gather", "index", "cat")),
    ("reductions", ("reduce",)),
    ("elementwise", ("elementwise",)),
)


def group_of(kernel: str) -> str:
    return next((g for g, parts in GROUPS if any(p in kernel for p in parts)), "other")


def profile(args) -> None:
    """Where one decode step's GPU time goes, eager and compiled, at each batch size: kernel time
    by group, the kernel count, and the step replayed in a CUDA graph beside the kernels' sum (the
    difference is the time between kernels) and beside the byte floor."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    bandwidth = copy_bandwidth("cuda")
    for name in args.models:
        model = build(MODELS[name], "2.7b", "cuda", torch.bfloat16, num_slots=max(BATCHES) + 1, max_len=512)
        fast = optimize(model, LAYOUTS["DS + VK"])
        rows = {"eager": fast}
        if args.compile_mode != "none":
            rows["compiled"] = torch.compile(fast, dynamic=False,
                                             mode=None if args.compile_mode == "default" else args.compile_mode)
        for batch in BATCHES:
            step = decode_step(model.cfg, batch, "cuda")
            floor_ms = byte_floor(model, step) / bandwidth * 1e3
            for row, call in rows.items():
                with torch.no_grad():
                    for _ in range(3):  # captures, moves the pools; the compiled row compiles
                        call(**step.inputs)
                    torch.cuda.synchronize()
                    with profiler(activities=[ProfilerActivity.CUDA]) as prof:
                        call(**step.inputs)
                        torch.cuda.synchronize()
                kernels, count = {}, 0
                for e in prof.events():
                    if e.device_type == torch.autograd.DeviceType.CUDA:
                        kernels[e.name[:90]] = kernels.get(e.name[:90], 0) + e.device_time_total
                        count += 1
                total = sum(kernels.values()) / 1e3
                step_ms = time_step(lambda c=call: c(**step.inputs))
                print(f"{name} B={batch} {row}: step {step_ms:.3f} ms in a CUDA graph (floor {floor_ms:.3f} ms, "
                      f"x{step_ms / floor_ms:.2f}); {count} kernels, {total:.3f} ms of kernel time, "
                      f"{step_ms - total:.3f} ms between them", flush=True)
                groups = {}
                for k, us in kernels.items():
                    groups[group_of(k)] = groups.get(group_of(k), 0) + us
                for g, us in sorted(groups.items(), key=lambda t: -t[1]):
                    print(f"  {us / 1e3:8.3f} ms {100 * us / 1e3 / total:5.1f}%  {g}")
                for k, us in sorted(kernels.items(), key=lambda t: -t[1])[:8]:
                    print(f"      {us / 1e3:8.3f} ms  {k}")
        del rows, fast, model
        torch.cuda.empty_cache()


def run(args) -> tuple[list, list, float | None, list]:
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    size = "tiny" if args.smoke else "2.7b"
    bandwidth = None if args.smoke else copy_bandwidth(device)
    rows, checks, compiles = [], [], []
    for name in args.models:
        layers = MODELS[name][:4] if args.smoke else MODELS[name]
        model = build(layers, size, device, dtype, num_slots=max(BATCHES) + 1, max_len=512)
        variants = {row: model if layouts is None else optimize(model, layouts) for row, layouts in LAYOUTS.items()}
        if args.compile_mode != "none":  # wraps the DS + VK model; compiled at its first call of each batch size
            variants[COMPILED] = torch.compile(variants["DS + VK"], dynamic=False,
                                               mode=None if args.compile_mode == "default" else args.compile_mode)
        for batch in BATCHES:
            step = decode_step(model.cfg, min(batch, model.cfg.num_slots - 1), device)
            wrong = set()  # rows whose check fails at this batch: not timed
            for row, fast in list(variants.items()):  # the eager DS + VK row runs at this batch before the compiled
                if fast is model:
                    continue
                try:
                    if row == COMPILED:  # its first call at this batch size compiles it
                        start = time.perf_counter()
                        with torch.no_grad():
                            fast(**step.inputs)
                        torch.cuda.synchronize() if device == "cuda" else None
                        seconds = time.perf_counter() - start
                    result = check(model, fast, step)
                except Exception as err:  # noqa: BLE001 - the compiled row only: said, and the row dropped
                    if row != COMPILED or (args.smoke and not _no_cpu_inductor(err)):
                        raise  # on the CPU the row may be left out only where inductor cannot build there
                    why = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
                    print(f"{name} B={batch} {row}: skipped, torch.compile (inductor, {device}) failed: {why}"
                          + (" -- inductor cannot build for the CPU here (no working C++ compiler); the GPU run "
                             "has the row" if args.smoke else ""), flush=True)
                    compiles.append(dict(model=name, batch=batch, mode=args.compile_mode, failed=why))
                    del variants[row]
                    continue
                checks.append(dict(model=name, batch=batch, impl=row, **result))
                print(f"{name} B={batch} {row}: {checks[-1]}", flush=True)
                if result["logits_diff"] > WRONG * result["logits_max_abs"]:
                    wrong.add(row)
                    print(f"{name} B={batch} {row}: WRONG result (logits off by more than {WRONG:.0%} of their "
                          "largest value): not timed", flush=True)
                if row == COMPILED:
                    compiles.append(dict(model=name, batch=batch, mode=args.compile_mode, seconds=seconds))
                    print(f"{name} B={batch} {row}: compiled in {seconds:.1f} s (first call)", flush=True)
            if args.smoke:
                continue
            floor = byte_floor(model, step)
            timed = {row: fast for row, fast in variants.items() if row not in wrong}
            times = {row: [] for row in timed}
            for _ in range(ROUNDS):  # interleaved rounds, median
                for row, fast in timed.items():
                    times[row].append(time_step(lambda f=fast: f(**step.inputs)))
            for row in timed:
                ms = statistics.median(times[row])
                floor_ms = floor / bandwidth * 1e3
                rows.append(dict(model=name, layers=len(layers), batch=batch, impl=row, ms=ms, floor_ms=floor_ms,
                                 over_floor=ms / floor_ms, floor_bytes=floor))
                print(f"{name:7s} B={batch:<4d} {row:17s} {ms:9.3f} ms  floor {floor_ms:8.3f} ms  "
                      f"x{ms / floor_ms:.2f}", flush=True)
            write(args.out, rows, checks, bandwidth, compiles, args.compile_mode)  # so far: a run cut short keeps it
        del variants, model
        torch.cuda.empty_cache() if device == "cuda" else None
    return rows, checks, bandwidth, compiles


WRONG = 0.1  # a check whose logits differ by more than this share of their largest value: a wrong result


def write(out: Path, rows: list, checks: list, bandwidth: float, compiles: list, compile_mode: str) -> list[str]:
    import triton

    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                copy_bandwidth=bandwidth, dtype="bfloat16", size="2.7b", config=SIZES["2.7b"],
                models={k: len(v) for k, v in MODELS.items()}, rounds=ROUNDS, layouts={k: v for k, v in LAYOUTS.items()},
                compiled=dict(row=COMPILED, of="DS + VK", backend="inductor", mode=compile_mode, dynamic=False))
    data = dict(meta, rows=rows, checks=checks, compiles=compiles)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "e2e.json", json.dumps(data, indent=1))
    lines = render(data)
    _write(out / "e2e.md", "\n".join(lines) + "\n")
    return lines


def render(data: dict) -> list[str]:
    """e2e.md's lines from e2e.json's contents (--render: again from a saved run)."""
    models, compiled = data["models"], data.get("compiled")
    checks = {(c["model"], c["batch"], c["impl"]): c for c in data["checks"]}

    def judged(r):
        c = checks.get((r["model"], r["batch"], r["impl"]))
        if c is None:
            return "the model" if r["impl"] == "as written" else "-"
        if c["exact"]:
            return "exact"
        if c["logits_diff"] > WRONG * c["logits_max_abs"]:
            return f"**wrong** (logits off by {c['logits_diff']:.3g} of {c['logits_max_abs']:.3g}): not a figure"
        return f"differs by {c['logits_diff']:.3g}"

    runs = data.get("copy_bandwidth_runs")  # tables merged from one run per model on the same machine
    bandwidth = (" and ".join(f"{bw / 1e9:.0f} GB/s ({name})" for name, bw in runs.items()) +
                 " measured in each model's run (one run per model, on one machine)") if runs else \
        f"{data['copy_bandwidth'] / 1e9:.0f} GB/s measured in the run"
    lines = [f"Card: {data['card']}; torch {data['torch']}; triton {data['triton']}; copy bandwidth "
             f"{bandwidth}. bf16, 2.7B-class widths; mamba2 "
             f"{models['mamba2']} layers, hybrid {models['hybrid']} (mamba2, attention, gdn, mamba2 x "
             f"{models['hybrid'] // 4}); one decode step in CUDA graphs, median of {data['rounds']} interleaved "
             "rounds; byte floor: parameters read once, touched slots' pool rows and attention positions read and "
             "written once, logits written."]
    if compiled:
        lines[0] += (f" '{compiled['row']}': the {compiled['of']} model, called eagerly first, then torch.compile "
                     f"({compiled['backend']}, mode {compiled['mode']}, static shapes), timed in the same CUDA graphs.")
    lines[0] += (f" check: the row against the model as written from one random state (below); 'wrong' where the "
                 f"logits differ by more than {WRONG:.0%} of their largest value.")
    lines += ["", "| model | batch | pools | step (ms) | byte floor (ms) | x floor | check |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['impl']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | "
              f"{r['over_floor']:.2f}x | {judged(r)} |" for r in data["rows"]]
    lines += ["", "Checks before timing, from one random state, against the model as written:", "",
              "| model | batch | pools | exact | logits / state max abs diff | logits up to |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['model']} | {c['batch']} | {c['impl']} | {'yes' if c['exact'] else 'no'} | "
              f"{c['logits_diff']:.3g} / {c['state_diff']:.3g} | {c['logits_max_abs']:.3g} |" for c in data["checks"]]
    if data.get("compiles"):
        lines += ["", f"Compile of '{compiled['row']}' (wall time of its first call at each batch size: Dynamo, "
                  "AOTAutograd, inductor, Triton builds, one step):", "",
                  "| model | batch | compile (s) |", "|---|---|---|"]
        lines += [f"| {c['model']} | {c['batch']} | " + (f"{c['seconds']:.1f} |" if "seconds" in c else
                                                          f"failed: {c['failed']} |") for c in data["compiles"]]
    return lines


def _write(path: Path, text: str) -> None:
    """Whole or not at all (a run cut short between two writes keeps the last)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, checks only")
    parser.add_argument("--profile", action="store_true",
                        help="GPU time of one decode step by kernel group, eager and compiled")
    parser.add_argument("--render", type=Path, metavar="JSON", help="write e2e.md into --out from a saved e2e.json")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "max-autotune-no-cudagraphs", "none"],
                        help=f"torch.compile mode of the '{COMPILED}' row (none: no such row)")
    args = parser.parse_args()
    if args.render:
        lines = render(json.loads(args.render.read_text()))
        _write(args.out / "e2e.md", "\n".join(lines) + "\n")
        return print("\n".join(lines))
    if not args.smoke:
        torch.backends.cuda.enable_cudnn_sdp(False)  # not deterministic for the masked decode attention
    if args.profile:
        return profile(args)
    rows, checks, bandwidth, compiles = run(args)
    if not args.smoke:
        print("\n".join(write(args.out, rows, checks, bandwidth, compiles, args.compile_mode)))


if __name__ == "__main__":
    main()
