"""The fuzzer's long run: >= 2000 generated programs (tests/fuzz_models.py), each optimized to DS
and to SD and called in its order against its untouched copy. Half the programs also have the
second axis (issue 20): Python around the graph -- flags, counters, hooks, caches in lists and
dicts, raw per-slot pages, second names -- and a harness acting between calls like a server
(slot frees, rollbacks, connector loads, re-allocation, state_dict round trips, pickle and
deepcopy). A share of the programs (--recurrent-share, default 0.25) also keep recurrent pools
(Mamba2's SSM state, the gated delta rule's) updated by the recurrence ops or in pure torch; those
are checked with the layout mappings DS + VK and SD + KV. Writes the tally (outcomes, per axis, refusal reasons, failure classes, outcomes per
use kind) and a minimal repro of each failure class to benchmarks/results/fuzz.json and fuzz.md;
the tally so far is written every 100 programs. Progress with tqdm when it is installed.

    python benchmarks/fuzz.py [--programs 2000] [--seed 0] [--minimize-s 120] [--recurrent-share 0.25]
"""

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import fuzz_models as fm  # noqa: E402

FAILURES = ("mismatch", "crash", "late-refusal", "caller-changed", "other")
ACCEPTED = ("equivalent", "rounding", "refused", "refused-partial")
MEANING = {
    "equivalent": "every step's outputs and logical state equal the original's (exactly; 1e-5 where a lowering ran)",
    "rounding": "state exact, an output within 1e-5 but not bit-equal (a sum or matmul over a relayouted axis)",
    "refused": "a LayoutPassError (outside a graph's code), no buffer changed",
    "refused-partial": "a LayoutPassError (outside a graph's code), logical state intact, pools of layers "
                       "captured earlier in the same call already moved",
    "mismatch": "an output or the logical state differs",
    "crash": "an exception raised inside a captured graph's code (a run-time failure)",
    "late-refusal": "a LayoutPassError (outside a graph's code) after the call changed the logical state or "
                    "Python attributes (beyond what its forward pre-hooks, eager code, did)",
    "caller-changed": "the model passed to optimize() changed (its state, Python attributes or hooks), or holds a "
                      "meta or fake tensor",
    "other": "any other exception outside a graph's code (the pass failing at capture, not with a LayoutPassError)",
}


def _commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "layoutpass", "kernels", "rewrites")
    return git("rev-parse", "--short", "HEAD") + (" (pass files modified in the working tree)" if dirty else "")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, " \
        f"Python {platform.python_version()}"


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="program", mininterval=30, smoothing=0.05)


def run(programs: int, seed_: int, checkpoint=None, recurrent_share: float = 0.25) -> tuple[dict, dict, list]:
    """Check `programs` generated programs in both layouts; the tally and the first example of
    each failure class. checkpoint(tally, first) is called every 100 programs."""
    outcomes, reasons = collections.Counter(), collections.Counter()
    per_axis = collections.defaultdict(collections.Counter)
    with_recurrent = collections.Counter()  # the outcomes of the checks whose program has recurrent pools
    per_kind = collections.defaultdict(collections.Counter)
    first: dict[str, tuple] = {}
    generator_errors = []
    done = [0]
    start = time.monotonic()
    bar = _progress(programs)

    def tally_now():
        return {"programs": done[0], "checks": sum(outcomes.values()), "outcomes": dict(outcomes),
                "per_axis": {k: dict(v) for k, v in sorted(per_axis.items())},
                "with_recurrent": dict(with_recurrent),
                "reasons": dict(reasons.most_common()),
                "per_use_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
                "generator_errors": len(generator_errors)}

    @seed(seed_)
    @settings(max_examples=programs, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fm.programs(recurrent_share=recurrent_share), st.booleans())
    def one(program, lower):
        for layout in program.layouts:
            try:
                outcome = fm.check(program, layout, lower)
            except fm.GeneratorError as err:
                generator_errors.append((program.source(), str(err)))
                break
            outcomes[outcome.kind] += 1
            per_axis["graph and Python" if program.around else "graph only"][outcome.kind] += 1
            if program.recurrent:
                with_recurrent[outcome.kind] += 1
            reasons[outcome.reason()] += 1
            for kind in program.kinds:
                per_kind[kind][outcome.kind] += 1
            if not outcome.ok:
                first.setdefault(outcome.reason(), (program, layout, lower, outcome))
        done[0] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in sorted(outcomes.items())), refresh=False)
        if done[0] % 100 == 0:
            print(f"{done[0]} programs, {time.monotonic() - start:.0f} s: {dict(outcomes)}", flush=True)
            if checkpoint is not None:
                checkpoint(tally_now(), first)

    one()
    if bar is not None:
        bar.close()
    return tally_now(), first, generator_errors


def minimal_repros(first: dict, budget_s: float) -> list[dict]:
    repros = []
    for reason, (program, layout, lower, outcome) in sorted(first.items()):
        start = time.monotonic()
        small = fm.minimize(program, layout, lower, reason, budget_s)
        print(f"minimized {reason[:70]!r} in {time.monotonic() - start:.0f} s", flush=True)
        repros.append({"reason": reason, "layout": layout, "lower": lower, "step": outcome.step,
                       "detail": " ".join(outcome.detail.splitlines()[:3])[:600],
                       "script": small.script(layout, lower)})
    return repros


def markdown(meta: dict, tally: dict, repros: list) -> str:
    o, axes = tally["outcomes"], dict(tally.get("per_axis", {}))
    if tally.get("with_recurrent"):  # a column of its own (it overlaps the two above)
        axes["recurrent pools"] = tally["with_recurrent"]
    lines = [
        "# Fuzzing the pass (benchmarks/fuzz.py)", "",
        f"{tally['programs']} generated programs, each optimized to DS and to SD ({tally['checks']} checks), "
        f"on commit {meta['commit']}, torch {meta['torch']}, hypothesis {meta.get('hypothesis', '?')}; "
        f"{meta.get('machine', 'CPU')}, one torch thread; {meta.get('run_seconds', meta['seconds']):.0f} s "
        f"checking (+ {meta['seconds'] - meta.get('run_seconds', meta['seconds']):.0f} s minimizing failures); "
        f"seed {meta['seed']}, lower= drawn per program. A check is one program in one layout. About half the "
        f"programs have the second axis (Python around the graph and a harness between calls: the `py:` and "
        f"`act:` rows below). "
        f"A share of {meta.get('recurrent_share', 0):g} of the programs keep recurrent pools too (checked with the "
        f"mappings DS + VK and SD + KV instead: the `rec:` and `config:recurrent` rows).",
        "", "| outcome | checks | " + " | ".join(f"of which {a}" for a in axes) + " | meaning |",
        "|---|---|" + "---|" * len(axes) + "---|",
        *[f"| {k} | {o.get(k, 0)} | " + " | ".join(str(v.get(k, 0)) for v in axes.values()) + f" | {MEANING[k]} |"
          for k in (*ACCEPTED, *FAILURES)],
        f"| (generator errors: the original model failed) | {tally['generator_errors']} |", "",
        "## Refusals, by reason", "", "| checks | reason |", "|---|---|",
        *[f"| {n} | {r} |" for r, n in tally["reasons"].items() if r.startswith("refused")],
        "", "## Failures, by class", "", "| checks | class |", "|---|---|",
        *[f"| {n} | {r} |" for r, n in tally["reasons"].items() if r.split(":")[0] in FAILURES],
        "", "## Outcomes per use kind (checks whose program contains the use)", "",
        "| use | " + " | ".join((*ACCEPTED, *FAILURES)) + " |", "|---|" + "---|" * (len(ACCEPTED) + len(FAILURES)),
        *[f"| {k} | " + " | ".join(str(v.get(f, 0)) for f in (*ACCEPTED, *FAILURES)) + " |"
          for k, v in tally["per_use_kind"].items()],
        "", "## Minimal repro of each failure class", "",
        "Each runs standalone from the repository root (`python repro.py`) and fails its assertion or raises.", ""]
    for r in repros:
        lines += [f"### {r['reason']}", "", f"{r['layout']}, lower={r['lower']}, step {r['step']}: `{r['detail']}`",
                  "", "```python", r["script"].rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minimize-s", type=float, default=120.0, help="time to minimize each failure class")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz"))
    parser.add_argument("--commit", help="the pass's commit, when layoutpass is imported from an exported copy")
    parser.add_argument("--recurrent-share", type=float, default=0.25,
                        help="the share of programs that also keep recurrent pools (0: conv pools only)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import hypothesis
    meta = {"commit": args.commit or _commit(), "torch": torch.__version__, "hypothesis": hypothesis.__version__,
            "machine": machine(), "seed": args.seed, "recurrent_share": args.recurrent_share}
    start = time.monotonic()
    out = Path(args.out)

    def checkpoint(tally, first):  # the tally so far and each failure class's first program, unminimized
        partial = dict(meta, seconds=time.monotonic() - start, partial=True)
        found = [{"reason": reason, "layout": layout, "lower": lower, "detail": outcome.detail[:2000],
                  "script": program.script(layout, lower)}
                 for reason, (program, layout, lower, outcome) in first.items()]
        out.with_suffix(".json").write_text(json.dumps({"meta": partial, "tally": tally, "first": found}, indent=1))

    tally, first, generator_errors = run(args.programs, args.seed, checkpoint, args.recurrent_share)
    meta["run_seconds"] = time.monotonic() - start
    checkpoint(tally, first)
    repros = minimal_repros(first, args.minimize_s)
    meta["seconds"] = time.monotonic() - start
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "tally": tally, "repros": repros,
                                                    "generator_errors": generator_errors[:5]}, indent=1))
    out.with_suffix(".md").write_text(markdown(meta, tally, repros))
    print(markdown(meta, tally, [])[:3000])


if __name__ == "__main__":
    main()
