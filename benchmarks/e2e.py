"""End-to-end benchmark on a CUDA card: whole models at 2.7B-class widths, prefill and decode
steps, three rows each, timed in the same run (../shared/PERFORMANCE.md, issue "Lowering ...
end-to-end speed"):

  SD, reference ops   the model as written (vLLM's SD pools + transposes), its conv ops on the
                      pure-torch reference implementation
  SD, our kernels     the same model on our Triton kernels (what vLLM users run today)
  optimize(DS)        optimize(model, "DS"): DS pools, no transposes, the DS kernels

Decode steps are CUDA-graph replays (do_bench_cudagraph); a row whose step cannot be captured
is timed with plain launches and says so. Prefill uses do_bench. Before timing, each case is
checked: optimize(DS) against the SD model on our kernels with check_equivalence (exact: the
same arithmetic on relayouted state), and the reference row's logits against the kernels'.

    python benchmarks/e2e.py --out DIR          # table + e2e.json + e2e.md
    python benchmarks/e2e.py --smoke            # tiny models on the CPU: the checks only
"""

import argparse
import contextlib
import json
import random
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from layoutpass import check_equivalence, optimize
from layoutpass.examples import ZOO
from layoutpass.examples.lm import SIZES, LM, ModelConfig
from layoutpass.examples.scenario import Step
from layoutpass.kernels import reference, triton_conv

# The hybrid's attention op materializes its (tokens x tokens) scores and its GDN layers step
# token by token in Python: 16k-token prompts are out of its reach, and it has half the layers.
MODELS = {"mamba2": (ZOO["mamba2"] * 8, ((8, 2048), (1, 16384))), "hybrid": (ZOO["hybrid"] * 2, ((8, 2048),))}
DECODE_BATCHES = (1, 64, 256)
ROUNDS = 3
ROWS = ("SD, reference ops", "SD, our kernels", "optimize(DS)")


def build(layers, size: str, device, dtype, **overrides) -> LM:
    torch.manual_seed(0)
    cfg = replace(ModelConfig(layers=layers), **{**SIZES[size], **overrides})
    with torch.device(device):  # initialized where it runs: seconds, not minutes, at these widths
        return LM(cfg).to(dtype=dtype).eval()


@contextlib.contextmanager
def reference_ops():
    """The conv ops' CUDA path runs the pure-torch reference instead of Triton (this
    benchmark's first row); restored on exit."""
    update, prefill = triton_conv.update, triton_conv.prefill
    triton_conv.update = lambda x, s, w, b, act, idx, nat, qsl, max_query_len, null, out: reference.conv_update(
        x, s, w, b, act, idx, nat, qsl, null, out)
    triton_conv.prefill = reference.conv_prefill
    try:
        yield
    finally:
        triton_conv.update, triton_conv.prefill = update, prefill


def decode_step(cfg: ModelConfig, batch: int, device) -> Step:
    gen = random.Random(batch)
    slots = gen.sample(range(1, cfg.num_slots), batch)  # random distinct slots; 0 is the null block
    ints = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
    return Step("decode", dict(input_ids=torch.randint(0, cfg.vocab, (batch, 1), device=device), slots=ints(slots),
                               context_lens=ints([gen.randint(1, cfg.max_len // 2) for _ in slots])))


def prefill_step(cfg: ModelConfig, seqs: int, tokens: int, device) -> Step:
    ints = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
    return Step("prefill", dict(input_ids=torch.randint(0, cfg.vocab, (seqs * tokens,), device=device),
                                slots=ints(list(range(1, seqs + 1))), context_lens=ints([0] * seqs),
                                query_start_loc=ints([i * tokens for i in range(seqs + 1)])))


def check(model: LM, fast, step: Step) -> dict:
    """optimize(DS) == the SD model on our kernels (exact); the reference ops' logits beside."""
    result = check_equivalence(model, fast, [step])
    repeat = None
    if not result.ok:  # is the SD model itself deterministic here? run it twice from one state
        print(f"optimize(DS) differs from the SD model:\n{result}", flush=True)
        with torch.no_grad():
            start = [b.clone() for b in model.buffers()]
            model(**step.inputs)
            first = [b.clone() for b in model.buffers()]
            for buf, saved in zip(model.buffers(), start):
                buf.copy_(saved)
            model(**step.inputs)
            repeat = max((a.float() - b.float()).abs().max().item() for a, b in zip(first, model.buffers()))
            for buf, saved in zip(model.buffers(), start):
                buf.copy_(saved)
    with torch.no_grad():
        state = [b.clone() for b in model.buffers()]
        ours = model(**step.inputs).float()
        for buf, saved in zip(model.buffers(), state):
            buf.copy_(saved)
        with reference_ops():
            ref = model(**step.inputs).float()
    return dict(exact=result.ok, output_error=result.steps[0].output_error, state_error=result.steps[0].state_error,
                worst_buffer=result.steps[0].worst_buffer, sd_repeat_state_diff=repeat, reference_max_abs_diff=(ours - ref).abs().max().item(),
                logits_max_abs=ours.abs().max().item())


def time_call(call, graph: bool) -> float:
    """Milliseconds per call: CUDA-graph replays or plain launches."""
    from triton.testing import do_bench, do_bench_cudagraph

    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        ms = do_bench_cudagraph(call, rep=200, return_mode="median") if graph else \
            do_bench(call, warmup=25, rep=200, return_mode="median")
        torch.cuda.synchronize()
        return ms


def bench_case(name: str, model: LM, fast, step: Step, work: str, decode: bool) -> list[dict]:
    calls = {ROWS[0]: lambda: model(**step.inputs), ROWS[1]: lambda: model(**step.inputs),
             ROWS[2]: lambda: fast(**step.inputs)}
    # the reference ops read index values on the host: no CUDA graph can hold them
    notes = {row: "cuda graph" if decode and row != ROWS[0] else "plain launches" for row in ROWS}
    times = {row: [] for row in ROWS}
    for _ in range(ROUNDS):  # rows interleaved, median over rounds
        for row in ROWS:
            with reference_ops() if row == ROWS[0] else contextlib.nullcontext():
                times[row].append(time_call(calls[row], notes[row] == "cuda graph"))
    ms = {row: statistics.median(t) for row, t in times.items()}
    out = []
    for row in ROWS:
        out.append(dict(model=name, work=work, impl=row, ms=ms[row], timing=notes[row],
                        ds_speedup=ms[row] / ms[ROWS[2]]))
        print(f"{name:7s} {work:16s} {row:18s} {ms[row]:9.3f} ms  x{ms[row] / ms[ROWS[2]]:.3f}  ({notes[row]})",
              flush=True)
    return out


def run(args, report) -> None:
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    size = "tiny" if args.smoke else "2.7b"
    rows, checks = [], []
    for name in args.models:
        layers, prefills = MODELS[name]
        layers = layers[:4] if args.smoke else layers
        cases = [("decode", b, max(DECODE_BATCHES) + 1, 512) for b in DECODE_BATCHES]
        cases += [("prefill", p, p[0] + 1, p[1]) for p in prefills]
        built = {}
        for kind, shape, slots, max_len in cases:
            key = (slots, max_len)
            if key not in built:  # one model (and its DS twin) per pool size
                built.clear()
                torch.cuda.empty_cache() if device == "cuda" else None
                model = build(layers, size, device, dtype, num_slots=slots, max_len=max_len)
                built[key] = (model, optimize(model, "DS"))
            model, fast = built[key]
            if kind == "decode":
                step, work = decode_step(model.cfg, min(shape, slots - 1), device), f"decode B={shape}"
            else:
                tokens = shape[1] if not args.smoke else 16
                step, work = prefill_step(model.cfg, shape[0], tokens, device), f"prefill {shape[0]}x{tokens}"
            checks.append(dict(model=name, work=work, **check(model, fast, step)))
            print(f"{name:7s} {work:16s} checked: {checks[-1]}", flush=True)
            if not args.smoke:
                rows += bench_case(name, model, fast, step, work, decode=kind == "decode")
                report(rows, checks)  # after every case: a run cut short keeps what it measured


def write(out: Path, rows: list[dict], checks: list[dict]) -> list[str]:
    import triton

    card = torch.cuda.get_device_name()
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__, dtype="bfloat16", size="2.7b",
                models={k: list(v[0]) for k, v in MODELS.items()}, rounds=ROUNDS, config=SIZES["2.7b"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(dict(meta, rows=rows, checks=checks), indent=1))
    lines = [f"Card: {card}; torch {torch.__version__}; triton {triton.__version__}. bf16, 2.7B-class widths "
             f"({SIZES['2.7b']}); mamba2: 16 layers, hybrid: 8; median of {ROUNDS} interleaved rounds. "
             "Speedup of optimize(DS) = row time / optimize(DS) time, same run.", "",
             "| model | work | impl | time (ms) | optimize(DS) speedup | timing |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['work']} | {r['impl']} | {r['ms']:.3f} | {r['ds_speedup']:.3f}x | {r['timing']} |"
              for r in rows]
    lines += ["", "Checks before timing, from the same random state: optimize(DS) against the SD model on our "
              "kernels (check_equivalence, exact), and the SD model's logits on the reference ops against ours.", "",
              "| model | work | DS == SD (exact) | max |diff| outputs / state | reference vs ours, max |diff| logits |",
              "|---|---|---|---|---|"]
    lines += [f"| {c['model']} | {c['work']} | {'yes' if c['exact'] else 'NO: ' + str(c['worst_buffer'])} | "
              f"{c['output_error']:.3g} / {c['state_error']:.3g} | {c['reference_max_abs_diff']:.3g} "
              f"(logits up to {c['logits_max_abs']:.3g}) |" for c in checks]
    (out / "e2e.md").write_text("\n".join(lines) + "\n")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, checks only")
    args = parser.parse_args()
    final = {}
    run(args, lambda rows, checks: final.update(lines=write(args.out, rows, checks)))
    print("\n".join(final.get("lines", [])))


if __name__ == "__main__":
    main()
