"""The Triton kernels against the oracle: on the CPU under TRITON_INTERPRET=1 (small shapes),
and on CUDA (marked gpu) at real sizes through the public ops."""

import pytest
import torch

import oracle
from cases import TOLERANCE, assert_close, make_pool, prefill_case, update_case
from layoutpass.kernels import conv_prefill, conv_update, triton_conv

LAYOUTS = ["SD", "DS"]


@pytest.fixture(params=["table", "flat", "tiled"])
def blocks(request, monkeypatch):
    """The shipped block table, then small channel blocks (and several sequences per program)
    so that interpreted shapes cross block and sequence-group edges, with dense DS pools on
    each path ("vec", which needs whole 8-channel groups, has its own test)."""
    if request.param != "table":
        monkeypatch.setattr(triton_conv, "UPDATE_BLOCKS", {dense: [(1 << 62, 16, 3, 1, request.param if dense
                                                                    else "tiled")] for dense in (True, False)})
    return request.param


def triton_update(**kw):
    triton_conv.update(kw["x"], kw["conv_state"], kw["weight"], kw["bias"], kw["activation"],
                       kw["conv_state_indices"], kw["num_accepted_tokens"], kw["query_start_loc"], -1,
                       kw["null_block_id"], kw["out"])


def triton_prefill(**kw):
    return triton_conv.prefill(kw["x"], kw["weight"], kw["bias"], kw["conv_states"], kw["query_start_loc"],
                               kw["cache_indices"], kw["has_initial_state"], kw["activation"], kw["null_block_id"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", range(2, 7))
@pytest.mark.parametrize("form", ["single", "multi", "varlen"])
@pytest.mark.parametrize("spec", [False, True])
def test_update_interpreted(width, form, spec, layout, blocks):
    update_case(width * 13 + len(form) + spec, layout=layout, width=width, form=form, spec=spec,
                dim=37).check(triton_update)


@pytest.mark.parametrize("dim, seqs, dtype", [(40, 1, torch.bfloat16), (40, 3, torch.float32), (37, 1, torch.float32)])
@pytest.mark.parametrize("width", range(2, 6))
def test_vec_path_interpreted(dim, seqs, dtype, width, monkeypatch):
    """The DS hot path itself: one token, no spec decode, state_len == width - 1 <= 3 (wider
    windows take the flat path), whole 8-channel groups (dim 37 takes the flat path). Block
    16: two groups per program, and a partial block at dim 40."""
    monkeypatch.setattr(triton_conv, "UPDATE_BLOCKS", {True: [(1 << 62, 16, seqs, 1, "vec")], False: []})
    called = []
    monkeypatch.setattr(triton_conv, "_launch_vec", lambda *a: called.append(1) or RUN_VEC(*a))
    case = update_case(width, layout="DS", width=width, form="single", spec=False, dim=dim, batch=5, dtype=dtype)
    case.kwargs["conv_state"] = case.kwargs["conv_state"][:, :, :width - 1].contiguous()
    case.check(triton_update)
    assert bool(called) == (width <= 4 and dim % 8 == 0)


RUN_VEC = triton_conv._launch_vec


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(8))
def test_update_interpreted_random(seed, layout):
    update_case(100 + seed, layout=layout, dtype=torch.float16 if seed % 2 else torch.float32).check(triton_update)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", range(2, 7))
@pytest.mark.parametrize("tokens_major", [False, True])
def test_prefill_interpreted(width, tokens_major, layout, blocks):
    prefill_case(width * 3 + tokens_major, layout=layout, width=width, dim=37, tokens_major=tokens_major,
                 lens=[1, 0, width - 1, 40, 3]).check(triton_prefill)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens_major", [False, True])
@pytest.mark.parametrize("width", [2, 4, 6])
@pytest.mark.parametrize("tile", [(8, 16, 1), (16, 8, 1), (24, 32, 2), (12, 16, 1)])
def test_prefill_tiles_interpreted(tile, width, tokens_major, layout, monkeypatch):
    """The prefill's token scan at small tiles (BLOCK_T, BLOCK_D, num_warps): tiles that start
    inside a sequence (inputs carried in from x and from the initial state), 8-token chunks
    wholly inside one sequence (the fast path) and chunks where sequences start (empty ones
    among them), a tile of 12 tokens (chunks cut by the tile), channel blocks past dim."""
    monkeypatch.setattr(triton_conv, "PREFILL_BLOCKS", {True: tile, False: tile})
    prefill_case(width * 7 + tile[0] + tokens_major, layout=layout, width=width, dim=37, tokens_major=tokens_major,
                 lens=[1, 0, width - 1, 40, 9, 0, 17, 8, 2]).check(triton_prefill)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("form", ["single", "varlen"])
def test_wide_index_math_interpreted(form, layout, monkeypatch):
    """The 64-bit index path (taken for tensors past 2^31 elements, see the GPU test below) on
    small shapes: it must compute exactly what the 32-bit path does."""
    monkeypatch.setattr(triton_conv, "_wide", lambda *tensors: True)
    update_case(7 + len(form), layout=layout, width=4, form=form, spec=form == "varlen", dim=37).check(triton_update)
    prefill_case(5, layout=layout, width=4, dim=37, tokens_major=form == "varlen",
                 lens=[1, 0, 3, 40, 3]).check(triton_prefill)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(12))
def test_update_gpu(seed, dtype, layout):
    update_case(seed, layout=layout, dtype=dtype, device="cuda", dim=[1, 700, 4096, 8192][seed % 4],
                batch=[1, 3, 17, 64][seed % 4]).check(conv_update)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(8))
def test_prefill_gpu(seed, dtype, layout):
    prefill_case(seed, layout=layout, dtype=dtype, device="cuda", dim=[5, 700, 2048, 4096][seed % 4],
                 lens=[[1, 300, 0, 7], [2048], [5, 64, 1000, 3, 2], [4, 3, 2, 1]][seed % 4]).check(conv_prefill)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device, batch", [("cpu", 1), ("cpu", 17), ("cpu", 70)] + [
    pytest.param("cuda", b, marks=pytest.mark.gpu) for b in (1, 17, 64, 256, 1024)])
def test_both_layouts_give_the_same_bits(device, batch, dtype):
    """What check_equivalence's exact default rests on: whichever path the block table picks
    for an SD and for a DS pool, the taps are summed in one order (on the GPU, the same FMAs)."""
    gen = torch.Generator().manual_seed(batch)
    dim, width = (5376, 4) if device == "cuda" else (40, 4)
    slots = batch + 5
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    x, weight, bias, sd = rand(batch, dim), rand(dim, width), rand(dim), rand(slots, width - 1, dim)
    ds = sd.transpose(1, 2).contiguous()
    idx = (torch.randperm(slots - 1, generator=gen)[:batch] + 1).to(device=device, dtype=torch.int32)  # 0: null
    outs = [torch.empty_like(x) for _ in range(2)]
    for pool, out in zip((sd.transpose(1, 2), ds), outs):  # the kernels themselves, interpreted on the CPU
        triton_conv.update(x, pool, weight, bias, "silu", idx, None, None, -1, 0, out)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(sd.transpose(1, 2), ds)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens_major", [False, True])
def test_prefill_past_2_31_elements(tokens_major, layout):
    """x with more than 2^31 elements (262,272 tokens x 8192 channels: a long prefill at a large
    model's width), so element offsets pass int32 in both x layouts. Judged by the oracle on
    the last tokens of the long sequence (their outputs and its final state) and on a short
    sequence after it, which starts from its slot's initial state."""
    dim, width, tail = 8192, 4, 64
    lens = [2**31 // dim + 2 * tail, tail]
    torch.manual_seed(0)
    x = torch.randn(sum(lens), dim, device="cuda", dtype=torch.bfloat16)
    x = x.t() if tokens_major else x.t().contiguous()
    weight, bias = torch.randn(dim, width, device="cuda").bfloat16(), torch.randn(dim, device="cuda").bfloat16()
    _, pool = make_pool(3, dim, width - 1, layout, torch.bfloat16, "cuda")
    initial = pool.double().cpu()
    qsl = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device="cuda")
    out = conv_prefill(x, weight, bias, pool, qsl, torch.tensor([2, 1], dtype=torch.int32, device="cuda"),
                       torch.tensor([False, True], device="cuda"), "silu")
    end, tol, w, b = lens[0], TOLERANCE[torch.bfloat16], weight.cpu(), bias.cpu()
    window = x[:, end - tail - (width - 1):end].double().cpu()  # the last outputs of sequence 0 need width - 1 before
    expected = initial.clone()
    (long_tail,) = oracle.prefill([window], expected[2:3], w, b, "silu", [0], [False], indexed=False)
    assert_close(out[:, end - tail:end], long_tail[:, width - 1:], tol, "output past 2^31 elements")
    assert_close(pool[2], expected[2], tol, "final state of the long sequence")
    (short,) = oracle.prefill([x[:, end:].double().cpu()], expected, w, b, "silu", [1], [True])
    assert_close(out[:, end:], short, tol, "output of the sequence after it")
    assert_close(pool[1], expected[1], tol, "final state of the sequence after it")
