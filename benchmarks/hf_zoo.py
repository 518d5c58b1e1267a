"""Every transformers class whose cache holds a causal-conv state (layoutpass.hf.CLASSES), tiny
and random, through CacheAsBuffers and optimize() -- conv DS + recurrent VK (lowered, and not),
conv SD + recurrent KV -- against transformers' own greedy generate, token for token and logit
by logit. Also: how many graphs the optimized model captures for prompts of every length (each
reused wherever Dynamo's guards accept the length; transformers' scans pad and loop with Python
ints derived from the length), each prompt checked against the eager adapter.

    python benchmarks/hf_zoo.py [CLASS ...] [--no-buckets]

writes benchmarks/results/hf_zoo.json and hf_zoo.md (the README table), on the CPU.

    python benchmarks/hf_zoo.py --gpu

runs a few classes at real-ish widths in bf16 on CUDA, the conv updates and recurrences lowered
onto the kernels, against transformers' own bf16 generate (and an fp32 run of the same weights, the
yardstick for bf16 noise); writes results/hf_zoo_gpu.json and .md with the card named."""

import argparse
import json
import platform
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT, NEW, BATCH = 7, 8, 2
DS_VK, SD_KV = {"conv": "DS", "recurrent": "VK"}, {"conv": "SD", "recurrent": "KV"}
MODES = (("DS+VK lowered", DS_VK, True), ("DS+VK", DS_VK, False), ("SD+KV", SD_KV, False))
# prompt lengths for the guard analysis: every short one, then around the scans' chunk sizes (8, 64)
LENGTHS = list(range(1, 41)) + [63, 64, 65, 66, 127, 128, 129, 130, 200]
PER_LENGTH = 12  # that many lengths, each needing its own graph: a scan loops over the tokens


def reference(model, ids):
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


class _TimeLimit(Exception):
    pass


def _alarm(signum, frame):
    raise _TimeLimit()


def optimized(name: str, layout: dict, lower: bool, ids, tokens, logits, limit: int) -> dict:
    from layoutpass import optimize
    from layoutpass.hf import CacheAsBuffers, generate, tiny_model

    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        fast = optimize(CacheAsBuffers(tiny_model(name), BATCH, 32), layout, lower=lower)
        got, got_logits = generate(fast, ids, NEW, output_logits=True)
    except _TimeLimit:
        return dict(error=f"not done in {limit} s")
    except Exception as err:  # a failure is a result: the table shows it
        return dict(error=f"{type(err).__name__}: {err}\n{err.__cause__ or ''}"[:2000])
    finally:
        signal.alarm(0)
    uses, pools = fast.report.uses, fast.report.pools.values()
    return dict(tokens_equal=bool(torch.equal(got, tokens)), logit_error=(got_logits - logits).abs().max().item(),
                pools=f"{sum(p.kind == 'conv' for p in pools)} / {sum(p.kind == 'recurrent' for p in pools)}",
                moved=dict(conv=sum(p.kind == "conv" and p.moves for p in pools),
                           recurrent=sum(p.kind == "recurrent" and p.moves for p in pools)),
                lowered=sum(u.action == "lowered" and not _recurrence(u) for u in uses),
                lowered_recurrent=sum(u.action == "lowered" and _recurrence(u) for u in uses),
                not_lowered=sorted({u.detail for u in uses if u.action == "not lowered"}),
                captures=len(fast.graphs), notes=[note[:500] for note in fast.report.notes],
                seconds=round(time.perf_counter() - start, 1))


def _recurrence(use) -> bool:
    return use.detail.startswith(("pure-torch SSM update", "pure-torch delta-rule update"))


def guarded_graphs(name: str) -> dict:
    """Prompts of LENGTHS, fresh each, through one optimized model: the lengths at which it
    captured a new graph (the earlier graphs' guards did not accept the length), each prompt's
    logits checked against the eager adapter."""
    from layoutpass import optimize
    from layoutpass.hf import CacheAsBuffers, tiny_model

    model = tiny_model(name)
    adapter = CacheAsBuffers(model, BATCH, max(LENGTHS) + 8)
    fast = optimize(CacheAsBuffers(model, BATCH, max(LENGTHS) + 8), DS_VK)
    root = fast.__dict__["_lp"].root
    firsts, worst, seen = [], 0.0, 0
    try:
        for length in LENGTHS:
            ids = torch.randint(0, 64, (BATCH, length), generator=torch.Generator().manual_seed(length))
            with torch.no_grad():
                want, got = adapter(ids), fast(ids)
            worst = max(worst, (got - want).abs().max().item())
            if root.count > seen:
                seen = root.count
                firsts.append(length)
            if firsts[-PER_LENGTH:] == LENGTHS[:PER_LENGTH]:  # no graph served a second length
                return dict(graphs="one per length", first_lengths=firsts, reuse_error=worst)
    except Exception as err:
        return dict(graphs=len(firsts), first_lengths=firsts, error=f"{type(err).__name__}: {err}"[:2000])
    return dict(graphs=len(firsts), first_lengths=firsts, reuse_error=worst)


def run(name: str, buckets: bool, limit: int) -> dict:
    from layoutpass.hf import CacheAsBuffers, generate, tiny_model

    model = tiny_model(name)
    ids = torch.randint(0, 64, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    tokens, logits = reference(model, ids)
    got, got_logits = generate(CacheAsBuffers(model, BATCH, 32), ids, NEW, output_logits=True)
    row = dict(adapter=dict(tokens_equal=bool(torch.equal(got, tokens)),
                            logit_error=(got_logits - logits).abs().max().item()),
               distinct_tokens=len(set(tokens.flatten().tolist())))
    for key, layout, lower in MODES:
        first = row.get(MODES[0][0], {}).get("error", "")
        skip = dict(error=f"skipped: {MODES[0][0]} {first}") if "not done" in first else None
        row[key] = skip or optimized(name, layout, lower, ids, tokens, logits, limit)
    if buckets:
        row["prompt_graphs"] = guarded_graphs(name)
    return row


def _one_line(error: str) -> str:
    """An error's first line, and where export says it was caused."""
    cause = next((ln.strip() for ln in error.splitlines() if ln.startswith("Caused by")), "")
    return f"{error.splitlines()[0]} {cause}".strip()


def table(rows: dict) -> str:
    """The README table; failures and updates left unlowered as numbered notes below it."""
    notes = []

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    def cell(result: dict) -> str:
        if "error" in result:
            return f"no {note(_one_line(result['error']))}"
        return f"{'yes' if result['tokens_equal'] else '**no**'} ({result['logit_error']:.0e})"

    lines = ["| class | pools found (conv / recurrent) | conv pools moved (DS+VK / SD+KV) | recurrent pools moved "
             "(DS+VK / SD+KV) | DS+VK tokens == transformers (lowered / not) | SD+KV tokens == transformers "
             "| lowered updates (conv / recurrence) | prompt graphs | time (DS+VK lowered / DS+VK / SD+KV) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        low, ds, sd = (row[key] for key, _, _ in MODES)
        pools = next((r["pools"] for r in (low, ds, sd) if "pools" in r), "-")
        pools += "".join(f" {note(text)}" for text in sorted({t for r in (low, ds, sd) for t in r.get("notes", [])}))
        moved = " | ".join(" / ".join(str(r.get("moved", {}).get(kind, "-")) for r in (ds, sd))
                           for kind in ("conv", "recurrent"))
        lowered = f"{low.get('lowered', '-')} / {low.get('lowered_recurrent', '-')}"
        lowered += "".join(f" {note('not lowered: ' + detail)}" for detail in low.get("not_lowered", []))
        graphs = row.get("prompt_graphs", {})
        if graphs.get("graphs") == "one per length":
            captures = "one per length (a loop over the tokens)"
        elif "error" in graphs:
            captures = f"fails {note(_one_line(graphs['error']))}"
        elif graphs:
            captures = str(graphs["graphs"])
            if graphs["first_lengths"]:
                captures += f" (new at {', '.join(map(str, graphs['first_lengths']))})"
        else:
            captures = "-"
        times = " / ".join(str(r.get("seconds", "-")) for r in (low, ds, sd))
        lines.append(f"| {name} | {pools} | {moved} | {cell(low)} / {cell(ds)} | {cell(sd)} | {lowered} | {captures} "
                     f"| {times} s |")
    return "\n".join(lines + [""] + [f"[{i + 1}] {text}" for i, text in enumerate(notes)])


# real-ish widths: a Mamba2 of 2.7B's width, a Bamba hybrid (attention beside Mamba2 layers), an
# Lfm2 (short convs beside attention); a few layers each
GPU_CLASSES = {
    "Mamba2": dict(vocab_size=32000, hidden_size=2560, num_hidden_layers=4, state_size=128, num_heads=80,
                   head_dim=64, n_groups=1, expand=2, chunk_size=256),
    "Bamba": dict(vocab_size=32000, hidden_size=2048, intermediate_size=4096, num_hidden_layers=4,
                  attn_layer_indices=[2], num_attention_heads=16, num_key_value_heads=8, mamba_n_heads=64,
                  mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4, mamba_expand=2,
                  mamba_chunk_size=256),
    "Lfm2": dict(vocab_size=32000, hidden_size=2048, intermediate_size=4096, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=8, layer_types=["conv", "conv", "full_attention", "conv"]),
    "Qwen3Next": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                      linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                      layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
                      shared_expert_intermediate_size=512, intermediate_size=4096),
}
GPU_BATCH, GPU_PROMPT, GPU_NEW = 4, 64, 16


def gpu_model(name: str, options: dict, device: str):
    """transformers' `name` for causal LM with `options`, random (seed 0), fp32 on `device`, and
    the prompt ids. The classes by name, not through layoutpass.hf._tiny_configs(): that table
    names every class of the newest transformers and fails as a whole on an older one."""
    import transformers

    config_class, model_class = getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")
    torch.manual_seed(0)
    config = config_class(**options, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    ids = torch.randint(0, options["vocab_size"], (GPU_BATCH, GPU_PROMPT), generator=torch.Generator().manual_seed(1))
    return model_class(config).to(device).eval(), ids.to(device)


def gpu_check(name: str, options: dict, device="cuda") -> dict:
    import copy

    from layoutpass import optimize
    from layoutpass.hf import CacheAsBuffers, generate

    exact, ids = gpu_model(name, options, device)
    model = copy.deepcopy(exact).to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    tokens, logits = reference_n(model, ids)
    with torch.no_grad():  # the yardstick: fp32, no cache, on transformers' bf16 tokens
        fp32 = exact(torch.cat([ids, tokens[:, :-1]], 1)).logits[:, GPU_PROMPT - 1:].float()
    del exact
    start = time.perf_counter()
    fast = optimize(CacheAsBuffers(model, GPU_BATCH, GPU_PROMPT + GPU_NEW), "DS", lower=True)
    got, got_logits = generate(fast, ids, GPU_NEW, output_logits=True)
    seconds = time.perf_counter() - start
    # teacher-forced on transformers' bf16 tokens, so a flipped near-tie does not carry on
    forced = forced_logits(fast, ids, tokens)
    differ = (got != tokens).any(0).nonzero()
    # decode time per token, both after their first (compiling / warming) calls: generate's time for
    # GPU_NEW tokens less its time for one (the prompt alone), over GPU_NEW - 1 steps; both are
    # plain eager Python loops (no CUDA graphs), transformers' with its own cache and logits processing
    theirs = decode_ms(lambda n: model.generate(ids, max_new_tokens=n, do_sample=False), device)
    ours = decode_ms(lambda n: generate(fast, ids, n), device)
    return dict(decode_ms=ours, transformers_decode_ms=theirs,
                tokens_equal=bool(torch.equal(got, tokens)), first_difference=int(differ[0]) if len(differ) else None,
                bf16_vs_transformers_bf16=(forced - logits).abs().max().item(),
                transformers_bf16_vs_fp32=(logits - fp32).abs().max().item(),
                ours_bf16_vs_fp32=(forced - fp32).abs().max().item(),
                logit_scale=fp32.abs().max().item(), pools=len(fast.report.pools),
                lowered=sum(u.action == "lowered" and not _recurrence(u) for u in fast.report.uses),
                lowered_recurrent=sum(u.action == "lowered" and _recurrence(u) for u in fast.report.uses),
                not_lowered=sorted({u.detail for u in fast.report.uses if u.action == "not lowered"}),
                captures=len(fast.graphs), seconds=round(seconds, 1))


@torch.no_grad()
def decode_ms(run, device, rounds=5) -> float:
    """Milliseconds per decode step: (run(GPU_NEW) - run(1)) / (GPU_NEW - 1), medians of `rounds`."""
    def seconds(n):
        times = []
        for _ in range(rounds):
            torch.cuda.synchronize(device) if device == "cuda" else None
            start = time.perf_counter()
            run(n)
            torch.cuda.synchronize(device) if device == "cuda" else None
            times.append(time.perf_counter() - start)
        return sorted(times)[rounds // 2]

    run(GPU_NEW)  # warm
    return round((seconds(GPU_NEW) - seconds(1)) * 1e3 / (GPU_NEW - 1), 3)


def reference_n(model, ids):
    out = model.generate(ids, max_new_tokens=GPU_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1).float()


@torch.no_grad()
def forced_logits(module, ids, tokens):
    """The logits of each step, the previous tokens being transformers' own."""
    steps = [module(ids)[:, -1]]
    for n in range(tokens.shape[1] - 1):
        steps.append(module(tokens[:, n:n + 1], torch.tensor(ids.shape[1] + n, device=ids.device))[:, -1])
    return torch.stack(steps, 1).float()


def gpu_main(out: Path, device="cuda", classes=GPU_CLASSES) -> None:
    import transformers
    import triton

    rows = {}
    for name, options in classes.items():
        try:
            rows[name] = gpu_check(name, options, device)
        except Exception as error:  # one class's failure is a row of the table, not the end of the run
            rows[name] = dict(error=f"{type(error).__name__}: {error}"[:300])
        print(name, json.dumps(rows[name]), flush=True)
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, dtype="bfloat16", batch=GPU_BATCH, prompt=GPU_PROMPT,
                new_tokens=GPU_NEW, widths=classes)
    lines = gpu_table(meta, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_zoo_gpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    (out / "hf_zoo_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def host_profile(name: str, device="cuda", top=14) -> None:
    """Where a decode step's host time goes (the GPU loops are host-bound): ms per step of
    transformers' generate, ours with lowering on and off, then a cProfile of one generate of
    each of ours (the functions with the most time of their own)."""
    import cProfile
    import pstats

    from layoutpass import optimize
    from layoutpass.hf import CacheAsBuffers, generate

    model, ids = gpu_model(name, GPU_CLASSES[name], device)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    print(f"{name}: transformers {decode_ms(lambda n: model.generate(ids, max_new_tokens=n, do_sample=False), device)}"
          " ms/step", flush=True)
    for lower in (True, False):
        fast = optimize(CacheAsBuffers(model, GPU_BATCH, GPU_PROMPT + GPU_NEW), "DS", lower=lower)
        print(f"{name}: ours lower={lower} {decode_ms(lambda n: generate(fast, ids, n), device)} ms/step", flush=True)
        profiler = cProfile.Profile()
        with torch.no_grad():
            profiler.enable()
            generate(fast, ids, GPU_NEW)
            torch.cuda.synchronize(device) if device == "cuda" else None
            profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def gpu_table(meta: dict, rows: dict) -> list[str]:
    """The Markdown table of gpu_main's rows (one per class), its first line naming the run."""
    new = meta["new_tokens"]
    lines = [f"{meta['card']}, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}; "
             f"bf16, batch {meta['batch']}, prompt {meta['prompt']}, {new} new tokens; optimize(layout='DS', "
             "lower=True): the conv pools move to DS; their pure-torch updates, the Mamba2 SSM updates and the gated "
             "delta rules become kernel calls. Time: optimize + first generate (captures included). Decode: ms per "
             f"step after warm-up ((generate of {new} tokens - of 1) / {new - 1}, medians of 5), eager loops on "
             "both sides", "",
             "| class | tokens == transformers bf16 | max abs logit diff: ours vs transformers (bf16) | transformers "
             "bf16 vs fp32 | ours bf16 vs fp32 | pools | lowered (conv / recurrence) | captures | time | decode ms/token: ours "
             "/ transformers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * 8)
            continue
        same = "yes" if r["tokens_equal"] else f"no (from step {r['first_difference']})"
        lines.append(f"| {name} | {same} | {r['bf16_vs_transformers_bf16']:.3g} | {r['transformers_bf16_vs_fp32']:.3g} "
                     f"| {r['ours_bf16_vs_fp32']:.3g} | {r['pools']} | {r['lowered']} / {r.get('lowered_recurrent', '-')} "
                     f"| {r['captures']} "
                     f"| {r['seconds']} s | {r['decode_ms']} / {r['transformers_decode_ms']} |")
    return lines


def _commit() -> str:
    """The pass's commit: LAYOUTPASS_COMMIT if set (a run from a copy), else the checkout's HEAD."""
    import os
    import subprocess

    if os.environ.get("LAYOUTPASS_COMMIT"):
        return os.environ["LAYOUTPASS_COMMIT"]
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    from layoutpass.hf import CLASSES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classes", nargs="*", metavar="CLASS", help=f"some of {', '.join(CLASSES)} (default: all)")
    parser.add_argument("--no-buckets", dest="buckets", action="store_false", help="skip the guard analysis")
    parser.add_argument("--gpu", action="store_true", help="the bf16 check at real-ish widths on CUDA")
    parser.add_argument("--host-profile", metavar="CLASS", help="with --gpu: where CLASS's decode step spends host time")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--limit", type=int, default=600, help="seconds for one optimize + generate run")
    args = parser.parse_args()
    unknown = [name for name in args.classes if name not in CLASSES]
    if unknown:
        parser.error(f"unknown classes {unknown}")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    if args.gpu and args.host_profile:
        return host_profile(args.host_profile)
    if args.gpu:
        return gpu_main(args.out)
    torch.set_num_threads(1)  # CI's CPU has 2 cores, shared
    commit = _commit()  # now: the code imported is the code of this moment, not of the run's end
    rows = {}
    for name in args.classes or CLASSES:
        start = time.perf_counter()
        rows[name] = run(name, args.buckets, args.limit)
        print(f"{name}: {time.perf_counter() - start:.0f} s {json.dumps(rows[name])}", flush=True)
    meta = dict(layoutpass=commit, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(),
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                prompt=PROMPT, new_tokens=NEW, batch=BATCH, lengths=LENGTHS)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf_zoo.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    (args.out / "hf_zoo.md").write_text(f"{table(rows)}\n\n{json.dumps(meta)}\n")
    print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
