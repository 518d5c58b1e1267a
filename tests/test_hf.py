"""Hugging Face transformers interop: tiny random Mamba and Mamba2 through CacheAsBuffers,
optimize and check_equivalence (skipped without transformers)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from layoutpass import check_equivalence, optimize  # noqa: E402
from layoutpass.errors import ArgumentError  # noqa: E402
from layoutpass.hf import CacheAsBuffers, tiny  # noqa: E402

FAMILIES = ("mamba", "mamba2")
ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_computes_what_transformers_computes(family):
    """Prompt, then token by token (Mamba2: a continuation chunk too) == one cache-free call.
    transformers' Mamba1 scan takes no initial state, so its chunks restart the SSM."""
    model = tiny(family, batch_size=3)
    ids = torch.randint(0, 64, (3, 13))
    chunk = 3 if family == "mamba2" else 1
    with torch.no_grad():
        whole = model.model(input_ids=ids).logits
        parts = [model(ids[:, :6], fresh=True), model(ids[:, 6:6 + chunk])]
        parts += [model(ids[:, i:i + 1]) for i in range(6 + chunk, 13)]
        again = model(ids[:, :6], fresh=True)  # a fresh start forgets the states
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, whole[:, :6], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout, lower", [("SD", False), ("DS", False), ("DS", True)])
@pytest.mark.parametrize("family", FAMILIES)
def test_optimized_transformers_models_are_equivalent(family, layout, lower, device):
    model = tiny(family, device=device)
    steps = model.scenario(prefills=2, decode_steps=10)
    fast = optimize(model, layout, lower=lower)
    # relayouting alone is exact; the kernel sums the taps in another order than conv1d
    tol = dict(rtol=1e-5, atol=1e-5) if lower else {}
    result = check_equivalence(model, fast, steps, **tol)
    assert result.ok, str(result)
    pools = [f"conv_state_{i}" for i in range(2)]
    assert sorted(fast.report.pools) == pools
    assert all(p.source.axes == ("slot", "dim", "tok") for p in fast.report.pools.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_conv_updates_are_lowered(family, device):
    """Decode (conv1d without padding, last output) becomes conv_update, prompts and
    continuation chunks (conv1d padded, outputs of the new tokens) conv_prefill; nothing is
    left unlowered."""
    model = tiny(family, device=device)
    calls = [dict(input_ids=torch.randint(0, 64, (4, n), device=device), **fresh) for n, fresh in
             ((7, {"fresh": True}), (1, {}), (3, {}))]
    fast = optimize(model, "DS", lower=True, example_inputs=calls)
    kernels = {torch.ops.layoutpass.conv_update.default, torch.ops.layoutpass.conv_prefill.default}
    for (name, graphs), tokens in zip(fast.graphs.items(), (7, 1, 3)):
        kernel = "conv_update" if tokens == 1 else "conv_prefill"  # L tokens: the prefill kernel
        assert graphs.after.count(f"layoutpass.{kernel}") == 2 and "aten.conv1d" not in graphs.after, name
        for pool in graphs.module.graph.find_nodes(op="placeholder"):
            if pool.name.startswith("b_conv_state"):  # read and written by the kernel alone
                zeroed = [z for z in pool.users if z.target is torch.ops.aten.zero_.default]
                users = {u.target for u in pool.users} | {u.target for z in zeroed for u in z.users}
                assert users <= kernels | {torch.ops.aten.zero_.default}, users
    actions = {u.action for u in fast.report.uses if u.kind == "kernel"}
    assert actions == {"lowered: pure-torch cat update -> conv_update", "lowered: pure-torch cat update -> conv_prefill",
                       "lowered: DS kernel, pool passed directly"}
    assert check_equivalence(model, fast, [s for s in model.scenario(decode_steps=6)], rtol=1e-5, atol=1e-5).ok


def test_bad_arguments_name_themselves():
    import transformers

    with pytest.raises(ArgumentError, match="batch_size"):
        CacheAsBuffers(tiny("mamba").model, 0)
    with pytest.raises(ArgumentError, match="family"):
        tiny("rwkv")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ArgumentError, match="model: .*attention"):
        CacheAsBuffers(transformers.LlamaForCausalLM(config), 2)


@pytest.mark.gpu
def test_long_prompts_run_on_the_prefill_kernel():
    model = tiny("mamba2", device="cuda")
    steps = model.scenario(prefills=2, decode_steps=5, max_prompt=300)
    fast = optimize(model, "DS")
    result = check_equivalence(model, fast, steps, rtol=1e-5, atol=1e-5)
    assert result.ok, str(result)
    assert "lowered: pure-torch cat update -> conv_prefill" in {u.action for u in fast.report.uses}


def test_transformers_does_not_load_our_kernels_a_second_time():
    """kernels/ at the checkout's root would import as a top-level `kernels`, which transformers
    tries for Hugging Face's package: its ops would be registered anew, and the pass, holding
    the first ones, would find no conv op in graphs captured after."""
    tiny("mamba")
    shadow = sys.modules.get("kernels")
    assert shadow is None or Path(shadow.__file__).resolve().parent != ROOT / "kernels"


def test_the_command_line_checks_a_transformers_model():
    done = subprocess.run([sys.executable, "-m", "layoutpass", "check", "layoutpass.hf:tiny_mamba2", "--layout", "SD"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("equivalent over")
