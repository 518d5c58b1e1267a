"""Argument checks shared by every implementation of the conv ops.

Shape and dtype checks run everywhere (fake tensors and tracing included). Checks that read
tensor values (slot indices, token counts) run in the reference implementation only, i.e. on
CPU: on CUDA they would force a device sync and break CUDA-graph capture, as in vLLM."""

import torch

from layoutpass.errors import ArgumentError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
ACTIVATIONS = {None: None, False: None, True: "silu", "silu": "silu", "swish": "silu"}
WIDTHS = range(2, 7)


def activation_name(activation) -> str | None:
    """vLLM accepts None/False, True, "silu" and "swish"; we keep one spelling."""
    if activation not in ACTIVATIONS:
        raise ArgumentError("activation", f"expected None, 'silu' or 'swish', got {activation!r}")
    return ACTIVATIONS[activation]


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ArgumentError(name, f"expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ArgumentError(name, f"dtype {t.dtype} is not one of float32, float16, bfloat16")


def check_index(name: str, t: torch.Tensor | None, length: int, *, ndim: int = 1) -> None:
    if t is None:
        return
    if t.dtype not in INDEX_DTYPES and not (name == "has_initial_state" and t.dtype == torch.bool):
        raise ArgumentError(name, f"expected an int32/int64 tensor, got {t.dtype}")
    if t.dim() != ndim or t.shape[0] != length:
        raise ArgumentError(name, f"expected shape ({length},), got {tuple(t.shape)}")


def check_weight(weight: torch.Tensor, bias: torch.Tensor | None, dim: int) -> int:
    check_float("weight", weight, 2)
    width = weight.shape[1]
    if weight.shape[0] != dim:
        raise ArgumentError("weight", f"expected ({dim}, width), got {tuple(weight.shape)}")
    if width not in WIDTHS:
        raise ArgumentError("weight", f"conv width {width} is outside the supported 2..6")
    if bias is not None:
        check_float("bias", bias, 1)
        if bias.shape[0] != dim:
            raise ArgumentError("bias", f"expected ({dim},), got {tuple(bias.shape)}")
    return width


def check_pool(conv_state: torch.Tensor, dim: int, width: int, dtype: torch.dtype) -> None:
    check_float("conv_state", conv_state, 3)
    if conv_state.shape[1] != dim:
        raise ArgumentError(
            "conv_state", f"expected a (num_slots, dim={dim}, state_len) view, got {tuple(conv_state.shape)}"
        )
    if conv_state.shape[2] < width - 1:
        raise ArgumentError("conv_state", f"state_len {conv_state.shape[2]} < conv width - 1 = {width - 1}")
    if conv_state.dtype != dtype:
        raise ArgumentError("conv_state", f"dtype {conv_state.dtype} differs from x's {dtype}")


def check_slots(name: str, slots: torch.Tensor | None, num_slots: int, null_block_id: int) -> None:
    """Every slot index must address the pool or be the null block (reads values)."""
    if slots is None or slots.numel() == 0:
        return
    bad = ((slots < 0) | (slots >= num_slots)) & (slots != null_block_id)
    if bool(bad.any()):
        raise ArgumentError(name, f"slot {int(slots[bad][0])} is outside the pool of {num_slots} slots")


def check_query_start_loc(qsl: torch.Tensor) -> None:
    if qsl.dtype not in INDEX_DTYPES or qsl.dim() != 1 or qsl.shape[0] < 2:
        raise ArgumentError("query_start_loc", f"expected an int tensor (batch + 1,), got {qsl.dtype} {tuple(qsl.shape)}")


def check_token_counts(qsl: torch.Tensor, num_tokens: int) -> None:
    """query_start_loc must describe sequences inside x (reads values)."""
    if int(qsl[0]) != 0 or bool((qsl[1:] < qsl[:-1]).any()) or int(qsl[-1]) > num_tokens:
        raise ArgumentError(
            "query_start_loc", f"must start at 0, never decrease and end at most at {num_tokens}: {qsl.tolist()}"
        )
