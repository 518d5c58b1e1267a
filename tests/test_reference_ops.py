"""The reference conv ops (the CPU path of layoutpass.kernels) against the naive oracle."""

import pytest
import torch

from cases import POISON, make_pool, prefill_case, update_case
from layoutpass import ArgumentError
from layoutpass.kernels import conv_prefill, conv_update

LAYOUTS = ["SD", "DS"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(40))
def test_update_matches_oracle(seed, layout):
    update_case(seed, layout=layout).check(conv_update)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", range(2, 7))
@pytest.mark.parametrize("form", ["single", "multi", "varlen"])
@pytest.mark.parametrize("spec", [False, True])
def test_update_every_width_form_and_mode(width, form, spec, layout):
    update_case(width * 7 + len(form), layout=layout, width=width, form=form, spec=spec).check(conv_update)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_update_half_precision(dtype):
    for seed in range(6):
        update_case(seed, layout="DS", dtype=dtype).check(conv_update)


def test_update_in_place_overwrites_x():
    case = update_case(3, layout="SD", form="multi")
    kw = dict(case.kwargs)
    expected = kw["x"].clone()
    reference = dict(kw, x=expected, conv_state=kw["conv_state"].clone(), out=torch.empty_like(expected))
    conv_update(**reference)
    returned = conv_update(**dict(kw, out=None))
    assert returned is kw["x"]
    slots = kw["conv_state_indices"]
    live = slots != 0 if slots is not None else torch.ones(len(slots), dtype=torch.bool)
    torch.testing.assert_close(kw["x"][live], reference["out"][live])


def test_update_varlen_windows_shift_by_each_sequence_length():
    """vLLM's varlen update shortens the window of sequences shorter than the longest;
    ours shifts each state by its own length."""
    case = update_case(11, layout="DS", form="varlen", spec=False, batch=4)
    lens = (case.kwargs["query_start_loc"][1:] - case.kwargs["query_start_loc"][:-1]).tolist()
    assert len(set(lens)) > 1
    case.check(conv_update)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(40))
def test_prefill_matches_oracle(seed, layout):
    prefill_case(seed, layout=layout).check(conv_prefill)


@pytest.mark.parametrize("width", range(2, 7))
def test_prefill_every_width(width):
    prefill_case(width, layout="DS", width=width, lens=[1, width - 1, width, 23]).check(conv_prefill)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_half_precision(dtype):
    for seed in range(6):
        prefill_case(seed, layout="SD", dtype=dtype).check(conv_prefill)


def test_prefill_leaves_x_alone():
    case = prefill_case(5, layout="SD")
    x = case.kwargs["x"].clone()
    conv_prefill(**case.kwargs)
    assert torch.equal(case.kwargs["x"], x)


def test_opcheck():
    update = update_case(1, layout="SD", form="varlen", spec=True).kwargs
    update.update(activation="silu", max_query_len=-1)
    args = [update[k] for k in ("x", "conv_state", "weight", "bias", "activation", "conv_state_indices",
                                "num_accepted_tokens", "query_start_loc", "max_query_len", "null_block_id", "out")]
    torch.library.opcheck(torch.ops.layoutpass.conv_update.default, args)
    prefill = prefill_case(2, layout="DS").kwargs
    prefill["activation"] = "silu"
    args = [prefill[k] for k in ("x", "weight", "bias", "conv_states", "query_start_loc", "cache_indices",
                                 "has_initial_state", "activation", "null_block_id")]
    torch.library.opcheck(torch.ops.layoutpass.conv_prefill.default, args)


def _update_args(**changes):
    _, pool = make_pool(4, 8, 3, "SD", torch.float32)
    args = dict(x=torch.randn(2, 8), conv_state=pool, weight=torch.randn(8, 4), bias=None, activation="silu",
                conv_state_indices=torch.tensor([1, 2], dtype=torch.int32))
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, argument", [
    (dict(x=torch.randn(2, 8, 1, 1)), "x"),
    (dict(x=torch.randn(2, 8, dtype=torch.float64)), "x"),
    (dict(weight=torch.randn(8, 7)), "weight"),
    (dict(weight=torch.randn(8, 1)), "weight"),
    (dict(weight=torch.randn(5, 4)), "weight"),
    (dict(bias=torch.randn(3)), "bias"),
    (dict(conv_state=torch.randn(4, 8, 2)), "conv_state"),
    (dict(conv_state=torch.randn(4, 3, 8)), "conv_state"),
    (dict(conv_state=torch.randn(4, 8, 3, dtype=torch.float16)), "conv_state"),
    (dict(conv_state_indices=torch.tensor([1, 9], dtype=torch.int32)), "conv_state_indices"),
    (dict(conv_state_indices=torch.tensor([1.0, 2.0])), "conv_state_indices"),
    (dict(conv_state_indices=torch.tensor([1], dtype=torch.int32)), "conv_state_indices"),
    (dict(num_accepted_tokens=torch.tensor([1, 2], dtype=torch.int32)), "num_accepted_tokens"),
    (dict(activation="gelu"), "activation"),
    (dict(out=torch.randn(3, 8)), "out"),
    (dict(query_start_loc=torch.tensor([0, 3, 1], dtype=torch.int32)), "query_start_loc"),
])
def test_update_bad_arguments(changes, argument):
    args = _update_args(**changes)
    state = args["conv_state"].clone()
    with pytest.raises(ArgumentError, match=f"^{argument}:"):
        conv_update(**args)
    assert torch.equal(args["conv_state"], state)


@pytest.mark.parametrize("changes, argument", [
    (dict(x=torch.randn(8, 5, 1)), "x"),
    (dict(cache_indices=torch.tensor([0, -3], dtype=torch.int32)), "cache_indices"),
    (dict(query_start_loc=torch.tensor([0, 2, 9], dtype=torch.int32)), "query_start_loc"),
    (dict(has_initial_state=torch.tensor([True])), "has_initial_state"),
    (dict(weight=torch.randn(8, 7)), "weight"),
])
def test_prefill_bad_arguments(changes, argument):
    _, pool = make_pool(4, 8, 3, "DS", torch.float32)
    args = dict(x=torch.randn(8, 5), weight=torch.randn(8, 4), bias=None, conv_states=pool,
                query_start_loc=torch.tensor([0, 2, 5], dtype=torch.int32),
                cache_indices=torch.tensor([1, 2], dtype=torch.int32))
    args.update(changes)
    with pytest.raises(ArgumentError, match=f"^{argument}:"):
        conv_prefill(**args)


def test_null_slot_is_skipped_untouched():
    _, pool = make_pool(4, 8, 3, "SD", torch.float32)
    before = pool.clone()
    x = torch.randn(2, 8)
    out = torch.full_like(x, POISON)
    conv_update(x, pool, torch.randn(8, 4), conv_state_indices=torch.tensor([0, 2], dtype=torch.int32), out=out)
    assert (out[0] == POISON).all() and not (out[1] == POISON).any()
    assert torch.equal(pool[[0, 1, 3]], before[[0, 1, 3]]) and not torch.equal(pool[2], before[2])
