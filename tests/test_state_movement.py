"""Relayout, tail copy and TP shard movement: the torch path, the Triton kernel (interpreted
on the CPU, compiled on CUDA), against logical-index oracles, in both layouts."""

import random

import pytest
import torch

from layoutpass import DS, SD, ArgumentError
from layoutpass.kernels import relayout, relayout_, shard_gather, shard_scatter, state, tail_copy

LAYOUTS = {"SD": SD, "DS": DS}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def random_pool(layout, slots=6, dim=19, tok=5, device="cpu", dtype=torch.float32):
    sizes = dict(slot=slots, dim=dim, tok=tok)
    return torch.randn(layout.shape(sizes), device=device).to(dtype)


@pytest.fixture(params=["torch", "kernel"])
def triton_kernel(request, monkeypatch):
    """Run the CPU tests once through torch and once through the interpreted Triton kernel."""
    if request.param == "kernel":
        def through_kernel(src, dst, *args):
            state.launch_box_copy(src, dst, *args)
        monkeypatch.setattr(state, "box_copy", through_kernel)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src, dst", [("SD", "DS"), ("DS", "SD"), ("SD", "SD")])
def test_relayout(src, dst, device, triton_kernel):
    pool = random_pool(LAYOUTS[src], device=device)
    out = relayout(pool, src, dst)
    assert out.is_contiguous()
    assert torch.equal(LAYOUTS[dst].view(out, DS), LAYOUTS[src].view(pool, DS))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scratch", [1, 4, 64])
@pytest.mark.parametrize("src, dst", [("SD", "DS"), ("DS", "SD")])
def test_relayout_in_place(src, dst, scratch, device, triton_kernel):
    pool = random_pool(LAYOUTS[src], slots=9, device=device)
    expected = LAYOUTS[src].view(pool, DS).clone()
    moved = relayout_(pool, src, dst, scratch_slots=scratch)
    assert moved.data_ptr() == pool.data_ptr() and moved.is_contiguous()
    assert torch.equal(LAYOUTS[dst].view(moved, DS), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["SD", "DS"])
def test_tail_copy(layout, device, triton_kernel):
    rng = random.Random(0)
    pool = random_pool(LAYOUTS[layout], slots=8, device=device)
    logical = LAYOUTS[layout].view(pool, DS)
    expected = logical.clone()
    src, dst, shifts = [1, 3, 5, 6], [2, 4, 5, 7], [rng.randint(0, 5) for _ in range(4)]
    for s, d, k in zip(src, dst, shifts):
        expected[d, :, :5 - k] = logical[s, :, k:].clone()
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
    tail_copy(pool, layout, as_tensor(src), as_tensor(dst), as_tensor(shifts))
    assert torch.equal(logical, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["SD", "DS"])
def test_shard_gather_scatter(layout, device, triton_kernel):
    L = LAYOUTS[layout]
    pool = random_pool(L, device=device)
    slots = torch.tensor([4, 1, 2], dtype=torch.int32, device=device)
    shard = shard_gather(pool, layout, slots, 3, 11)
    assert shard.is_contiguous()
    assert torch.equal(L.view(shard, DS), L.view(pool, DS)[slots.long(), 3:11])
    other = random_pool(L, device=device)
    expected = L.view(other, DS).clone()
    expected[slots.long(), 5:13] = L.view(shard, DS)
    shard_scatter(other, layout, slots, 5, shard)
    assert torch.equal(L.view(other, DS), expected)


@pytest.mark.gpu
def test_relayout_real_pool_bf16():
    pool = random_pool(SD, slots=512, dim=8192, tok=3, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(DS.view(relayout(pool, "SD", "DS"), SD), pool)


def test_bad_arguments():
    pool = random_pool(SD)
    with pytest.raises(ArgumentError, match="^d0:"):
        shard_gather(pool, "SD", torch.tensor([1], dtype=torch.int32), 4, 40)
    with pytest.raises(ArgumentError, match="^src:"):
        relayout(pool, "XD", "DS")
    with pytest.raises(ArgumentError, match="^pool:"):
        relayout(pool[0], "SD", "DS")
    with pytest.raises(ArgumentError, match="^shifts:"):
        ints = torch.tensor([1], dtype=torch.int32)
        tail_copy(pool, "SD", ints, ints, torch.tensor([9], dtype=torch.int32))
    with pytest.raises(ArgumentError, match="^pool:"):
        relayout_(pool.transpose(1, 2), "DS", "SD")
