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


def _through(path):
    """copy_runs / unpack_boxes as called: torch on the CPU, or the Triton launchers (interpreted)."""
    if path == "torch":
        return state.copy_runs, state.unpack_boxes

    def copy_runs(pools, slots, entries, message, to_message):
        state.launch_copy_runs(pools, slots, entries, message, to_message)

    def unpack_boxes(pools, layout, slots, entries, message, message_layout):
        views = [LAYOUTS[layout].view(p, DS) for p in pools]
        state.launch_unpack_boxes(pools, views, slots, entries, message, LAYOUTS[message_layout])

    return copy_runs, unpack_boxes


def layer_pools(layers, layout, slots=9, dim=24, tok=3, device="cpu", dtype=torch.float32, interleaved=False):
    """Fresh random pools; `interleaved`: views into one buffer, a slot's layers side by side
    (slot stride larger than the block)."""
    shape = LAYOUTS[layout].shape(dict(slot=slots, dim=dim, tok=tok))
    if interleaved:
        buffer = torch.randn(slots, layers, *shape[1:], device=device).to(dtype)
        return [buffer[:, layer] for layer in range(layers)]
    return [random_pool(LAYOUTS[layout], slots, dim, tok, device, dtype) for _ in range(layers)]


# Two peers' records: (pool offset, record offset, length, record size, prefix); offsets in one
# slot's 72-element block. The first set is 8-aligned (vectorized on CUDA), the second is not.
RUNS = {"aligned": ((0, 0, 24, 40, 0), (48, 24, 16, 40, 0), (8, 0, 32, 32, 40)),
        "odd": ((3, 0, 5, 12, 0), (40, 5, 7, 12, 0), (61, 0, 11, 11, 12))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["torch", "kernel"])
@pytest.mark.parametrize("runs", ["aligned", "odd"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_copy_runs_pack_and_unpack(runs, path, interleaved, device):
    copy_runs, _ = _through(path)
    entries, n, layers = RUNS[runs], 5, 3
    pools = layer_pools(layers, "SD", device=device, dtype=torch.bfloat16, interleaved=interleaved)
    slots = torch.tensor([8, 0, 3, 5, 2], dtype=torch.int32, device=device)
    size = n * layers * max(prefix + rec for *_, rec, prefix in entries)
    message = torch.full((size,), float("nan"), dtype=torch.bfloat16, device=device)
    copy_runs(pools, slots, entries, message, True)
    for pool_off, rec_off, length, rec, prefix in entries:
        records = message[n * layers * prefix:n * layers * (prefix + rec)].view(n, layers, rec)
        for layer, pool in enumerate(pools):
            expected = pool.reshape(pool.shape[0], -1)[slots.long(), pool_off:pool_off + length]
            assert torch.equal(records[:, layer, rec_off:rec_off + length], expected)
    targets = layer_pools(layers, "SD", device=device, dtype=torch.bfloat16, interleaved=interleaved)
    before = [t.clone() for t in targets]
    moved = torch.tensor([1, 7, 4, 6, 0], dtype=torch.int32, device=device)
    copy_runs(targets, moved, entries, message, False)
    for target, old, pool in zip(targets, before, pools):
        expected = old.reshape(old.shape[0], -1).clone()
        for pool_off, _, length, _, _ in entries:
            span = slice(pool_off, pool_off + length)
            expected[moved.long(), span] = pool.reshape(pool.shape[0], -1)[slots.long(), span]
        assert torch.equal(target.reshape(target.shape[0], -1), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["torch", "kernel"])
@pytest.mark.parametrize("src, dst", [("SD", "DS"), ("DS", "SD")])
def test_unpack_boxes_relayouts_on_receipt(src, dst, path, device):
    _, unpack_boxes = _through(path)
    n, layers, tok = 4, 2, 3
    logical = torch.randn(n, layers, 1200, tok, device=device)  # what was sent, (slot, layer, dim, tok)
    # channels 0..1100 (wider than one kernel tile) go to 100..1200, channels 1100..1200 to 0..100
    entries = ((100, 0, 1100, 1200 * tok, 0), (0, 1100 * tok, 100, 1200 * tok, 0))
    boxes = [logical[:, :, a:a + w] for a, w in ((0, 1100), (1100, 100))]  # each in the sender's order
    message = torch.cat([(b.transpose(-1, -2) if src == "SD" else b).reshape(n, layers, -1) for b in boxes], 2).flatten()
    pools = layer_pools(layers, dst, slots=6, dim=1210, tok=tok, device=device)
    before = [LAYOUTS[dst].view(p, DS).clone() for p in pools]
    slots = torch.tensor([5, 1, 0, 3], dtype=torch.int32, device=device)
    unpack_boxes(pools, dst, slots, entries, message, src)
    for layer, (pool, old) in enumerate(zip(pools, before)):
        expected = old.clone()
        expected[slots.long(), 100:1200] = logical[:, layer, :1100]
        expected[slots.long(), 0:100] = logical[:, layer, 1100:]
        assert torch.equal(LAYOUTS[dst].view(pool, DS), expected)


def test_alignment_of_run_tables():
    assert state._alignment(2, [8, 16, 24]) == 8 and state._alignment(2, [8, 12]) == 4
    assert state._alignment(4, [8, 16]) == 4 and state._alignment(2, [8, 3]) == 1
