"""Hugging Face transformers interop: every Mamba-family class transformers 5.24 has, tiny and
random (built from its config, nothing downloaded), through CacheAsBuffers and optimize,
against transformers' own generate and cached forward (skipped without transformers).

Cost on CI's CPU: the adapter checks of all classes and the optimized checks below; the whole
class x layout matrix runs in benchmarks/hf_zoo.py (its table is in the README)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from layoutpass import optimize  # noqa: E402
from layoutpass.errors import ArgumentError  # noqa: E402
from layoutpass.hf import CLASSES, CacheAsBuffers, generate, raw_transformers_hint, tiny, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW = 7, 8
# Per-step logits against transformers' generate: the adapter runs transformers' own code, so
# only summation order differs (the exported delta-rule scans solve their triangular systems by
# substitution, the conv kernels sum taps in their own order); logits are O(1)-O(10).
TOL = dict(rtol=1e-4, atol=1e-4)
# The optimized runs on CI, one class per cache shape: SSM only (Mamba2, all three modes), conv
# only (Lfm2), attention and conv state in one layer (FalconH1; Zamba2, beside SSM-only layers),
# several conv states per layer (Inkling), module-held states and a sliding window
# (RecurrentGemma, whose conv update the pass does not lower). Every class in every mode:
# benchmarks/hf_zoo.py (the delta-rule classes, Qwen3Next & co., take the pass minutes).
MODES = [("DS", True), ("DS", False), ("SD", False)]
OPTIMIZED = [("Mamba2", *mode) for mode in MODES] + [
    ("Lfm2", "DS", True), ("FalconH1", "DS", True), ("Zamba2", "SD", False),
    ("Inkling", "DS", True), ("RecurrentGemma", "DS", False)]


def reference(model, ids, new=NEW):
    """transformers' greedy generate: the tokens and the logits each was picked from."""
    out = model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def prompt(batch=2, length=PROMPT, seed=1, device="cpu"):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("name", CLASSES)
def test_the_adapter_generates_what_transformers_generates(name):
    """Token for token, logits within TOL, and the wrapped model is left as it was."""
    model = tiny_model(name)
    ids = prompt()
    tokens, logits = reference(model, ids)
    assert len(set(tokens.flatten().tolist())) > 2, "the tiny model should not repeat one token"
    own = {k: v.clone() for k, v in model.state_dict().items()}
    got, got_logits = generate(CacheAsBuffers(model, 2, 32), ids, NEW, output_logits=True)
    assert torch.equal(got, tokens)
    torch.testing.assert_close(got_logits, logits, **TOL)
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())  # e.g. rotary tables


@pytest.mark.parametrize("name, layout, lower", OPTIMIZED)
def test_optimized_models_generate_what_transformers_generates(name, layout, lower):
    model = tiny_model(name)
    ids = prompt()
    tokens, logits = reference(model, ids)
    fast = optimize(CacheAsBuffers(model, 2, 32), layout, lower=lower)
    got, got_logits = generate(fast, ids, NEW, output_logits=True)
    assert torch.equal(got, tokens)
    torch.testing.assert_close(got_logits, logits, **TOL)
    pools = [p for p in fast.report.pools.values() if p.kind == "conv"]
    assert pools and all(p.target.axes == (("slot", "dim", "tok") if layout == "DS" else ("slot", "tok", "dim"))
                         for p in pools)
    assert any(u.action == "lowered" for u in fast.report.uses) == lower


# Mamba-style states (batch, [heads,] head_dim, d_state) and gated delta rules (batch, heads, k, v)
RECURRENT = ["Mamba", "Mamba2", "Jamba", "Qwen3Next", "KimiLinear", "OlmoHybrid"]


@pytest.mark.parametrize("layouts", [{"conv": "DS", "recurrent": "VK"}, {"conv": "SD", "recurrent": "KV"}],
                         ids=["DS-VK", "SD-KV"])
@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_states_move_and_generate_the_same(name, layouts):
    """The adapter names each recurrent state's axes (k: key / B / d_state, v: value / x /
    head_dim); the pass stores it in the order asked for, and generate() gives transformers'
    own tokens."""
    model = tiny_model(name)
    ids = prompt()
    tokens, logits = reference(model, ids)
    fast = optimize(CacheAsBuffers(model, 2, 32), layouts)
    got, got_logits = generate(fast, ids, NEW, output_logits=True)
    assert torch.equal(got, tokens)
    torch.testing.assert_close(got_logits, logits, **TOL)
    states = [p for p in fast.report.pools.values() if p.kind == "recurrent"]
    assert states and all(str(p.target) == layouts["recurrent"] for p in states)
    for p in states:
        strides = dict(zip(p.axes.axes, fast.get_buffer(p.name).stride()))
        assert strides[p.target.axes[-1]] == 1


def test_the_conv_is_lowered_beside_a_recurrent_state_the_check_cannot_read():
    """Qwen3Next's decode writes its recurrent state through a mask (index_put_), which the
    formulas cannot follow. The rewrite onto the conv kernel touches only the conv pool, so the
    recurrent state is checked as any other buffer: the conv update is still lowered."""
    model = tiny_model("Qwen3Next")
    ids = prompt()
    tokens, logits = reference(model, ids)
    fast = optimize(CacheAsBuffers(model, 2, 32), {"conv": "DS", "recurrent": "VK"}, lower=True)
    got, got_logits = generate(fast, ids, NEW, output_logits=True)
    assert torch.equal(got, tokens)
    torch.testing.assert_close(got_logits, logits, **TOL)
    assert [u.detail for u in fast.report.uses if u.action == "not lowered"] == []
    assert any(u.action == "lowered" for u in fast.report.uses)


def test_one_prompt_graph_serves_every_length_that_takes_its_branches():
    """Lfm2's prompt path branches on the length only below its conv width: once the length is
    symbolic, one graph serves every longer prompt (Dynamo's guards decide, checked against
    transformers each time), its conv lowered with the length symbolic."""
    model = tiny_model("Lfm2")
    fast = optimize(CacheAsBuffers(model, 2, 64), "DS", lower=True)
    for length in (9, 5, 17, 12):
        ids = prompt(length=length, seed=length)
        assert torch.equal(generate(fast, ids, 3), reference(model, ids, 3)[0])
    captured = fast.__dict__["_lp"].root.count
    for length in (21, 13, 30):
        ids = prompt(length=length, seed=length)
        assert torch.equal(generate(fast, ids, 3), reference(model, ids, 3)[0])
    assert fast.__dict__["_lp"].root.count == captured  # no new graph for longer prompts
    prompts = [u for u in fast.report.uses if ", 1]" not in u.entry]
    assert prompts and all(u.detail == "pure-torch conv1d update -> conv_prefill" for u in prompts
                           if u.action == "lowered") and any(u.action == "lowered" for u in prompts)


@pytest.mark.parametrize("name", ["Mamba2", "Zamba2", "Qwen3_5"])
def test_a_continuation_chunk_is_what_transformers_computes(name):
    """Prompt, a 3-token chunk, then single tokens, each at its position, against transformers'
    cached forward of the same calls."""
    model, ids = tiny_model(name), prompt(length=13)
    adapter, cache = CacheAsBuffers(model, 2, 32), transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        for start, stop in ((0, 6), (6, 9), (9, 10), (10, 11)):
            want = model(ids[:, start:stop], cache=cache, use_cache=True).logits
            got = adapter(ids[:, start:stop], None if start == 0 else torch.tensor(start))
            torch.testing.assert_close(got, want, **TOL)


def test_a_fresh_prompt_forgets_the_previous_sequence():
    model = tiny_model("FalconH1")
    adapter, ids = CacheAsBuffers(model, 2, 32), prompt()
    first = generate(adapter, ids, 4)
    generate(adapter, prompt(seed=5, length=9), 4)
    assert torch.equal(generate(adapter, ids, 4), first)


def test_every_cache_tensor_is_a_buffer():
    """FalconH1's layers hold attention keys/values beside the conv state: both are buffers
    (a fresh cache per call would drop the attention history)."""
    adapter = CacheAsBuffers(tiny_model("FalconH1"), 2, 16)
    names = dict(adapter.named_buffers(recurse=False))
    for i in range(2):
        assert names[f"conv_state_{i}"].shape[-1] == 4 and names[f"keys_{i}"].shape[2] == 16
        assert {f"recurrent_state_{i}", f"values_{i}"} <= set(names)


def test_a_layer_kind_it_cannot_hold_is_refused_by_name():
    model = tiny_model("Qwen3Next")
    model.config.layer_types = ["linear_attention", "compressed_sparse_attention"]
    with pytest.raises(ArgumentError, match="Qwen3NextForCausalLM: cache layer 1 is of kind "
                                            "'compressed_sparse_attention'"):
        CacheAsBuffers(model, 2)


def test_bad_arguments_name_themselves():
    model = tiny_model("Mamba")
    for call, name in [(lambda: CacheAsBuffers(model, 0), "batch_size"),
                       (lambda: CacheAsBuffers(model, 2, 1), "max_len"),
                       (lambda: CacheAsBuffers(torch.nn.Linear(2, 2), 2), "model"), (lambda: tiny("Rwkv"), "name")]:
        with pytest.raises(ArgumentError, match=f"^{name}: "):
            call()
    adapter = CacheAsBuffers(model, 2, 16)
    for call, name in [(lambda: adapter(prompt(), 3), "position"),
                       (lambda: adapter(prompt(), torch.tensor(1.0)), "position"),
                       (lambda: generate(adapter, prompt().float(), 2), "input_ids"),
                       (lambda: generate(adapter, prompt(), 0), "max_new_tokens"),
                       (lambda: generate(adapter, prompt(), 12), "max_new_tokens")]:
        with pytest.raises(ArgumentError, match=f"^{name}: "):
            call()


def test_a_raw_transformers_model_gets_a_one_line_hint():
    hint = raw_transformers_hint(tiny_model("Mamba2"))
    assert "CacheAsBuffers" in hint and "\n" not in hint
    assert raw_transformers_hint(torch.nn.Linear(2, 2)) is None
    assert raw_transformers_hint(tiny("Mamba2")) is None


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["Mamba2", "Bamba", "Lfm2", "Qwen3Next"])
def test_lowered_on_cuda_generates_what_transformers_generates(name):
    model = tiny_model(name, device="cuda")
    ids = prompt(device="cuda")
    tokens, logits = reference(model, ids)
    fast = optimize(CacheAsBuffers(model, 2, 32), "DS")
    got, got_logits = generate(fast, ids, NEW, output_logits=True)
    assert torch.equal(got, tokens)
    torch.testing.assert_close(got_logits, logits, **TOL)
    assert any(u.action == "lowered" for u in fast.report.uses)


def test_transformers_does_not_load_our_kernels_a_second_time():
    """Run from the checkout's root, kernels/ also imports as a top-level `kernels`, the package
    name transformers probes for Hugging Face's kernels: imported so it must stay empty, or its
    ops would be registered anew and the pass, holding the first ones, would find no conv op in
    graphs captured after."""
    lowered = ("from layoutpass import optimize; from layoutpass.hf import tiny, generate; "
               "fast = optimize(tiny('Mamba2', batch_size=2), 'DS', lower=True, dynamic=False); "
               "generate(fast, torch.randint(0, 64, (2, 5)), 2); "
               "print(sum(u.action == 'lowered' for u in fast.report.uses))")
    shadowed = "import sys; sys.path.insert(0, '.'); import kernels, torch; print(hasattr(kernels, 'conv_update')); "
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
            for code in ("import torch; " + lowered, shadowed + lowered)]
    assert all(done.returncode == 0 for done in runs), runs[-1].stderr[-2000:]
    assert runs[1].stdout.split() == ["False", runs[0].stdout.strip()] and int(runs[0].stdout) > 0


def test_the_command_line_checks_a_transformers_model():
    done = subprocess.run([sys.executable, "-m", "layoutpass", "check", "layoutpass.hf:tiny_mamba2", "--layout", "SD"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("equivalent over")
