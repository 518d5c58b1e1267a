"""Moving conv state: relayout a pool (SD <-> DS), the spec-decode tail copy, TP shard
gather/scatter. All are one Triton kernel on CUDA -- copy a (dim range x token range) box
per slot pair between two strided pools -- and plain torch indexing elsewhere.

Pools are passed physically with their Layout (slot outermost); every function speaks in
logical axes, so the same call works on either layout."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from layoutpass.errors import ArgumentError
from layoutpass.layout import DS, Layout, parse_layout

LOGICAL = DS  # the (slot, dim, tok) order the ops below see


@triton.jit
def _box_copy_kernel(src_ptr, dst_ptr, src_slots, dst_slots, shifts, box_dim, box_tok, src_d0, dst_d0,
                     ss_slot, ss_dim, ss_tok, sd_slot, sd_dim, sd_tok,
                     HAS_SHIFT: tl.constexpr, BLOCK_D: tl.constexpr, TOK_P2: tl.constexpr):
    """dst[dst_slot, dst_d0 + i, j] = src[src_slot, src_d0 + i, shift + j] for i < box_dim,
    j < box_tok - shift. Loads and stores each get a coalesced layout from Triton's coalescing
    pass (tokens fastest on a DS side, channels on an SD side); the barrier makes an in-place
    shift (src slot == dst slot) safe."""
    pair = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
    j = tl.arange(0, TOK_P2)[None, :]
    src_slot = tl.load(src_slots + pair).to(tl.int64)
    dst_slot = tl.load(dst_slots + pair).to(tl.int64)
    shift = 0
    if HAS_SHIFT:
        shift = tl.load(shifts + pair)
    mask = (d < box_dim) & (j < box_tok - shift)
    v = tl.load(src_ptr + src_slot * ss_slot + (src_d0 + d) * ss_dim + (shift + j) * ss_tok, mask=mask)
    tl.debug_barrier()
    tl.store(dst_ptr + dst_slot * sd_slot + (dst_d0 + d) * sd_dim + j * sd_tok, v, mask=mask)


@triton_op("layoutpass::box_copy", mutates_args={"dst"})
def box_copy(src: torch.Tensor, dst: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor,
             shifts: torch.Tensor | None, src_d0: int, dst_d0: int, box_dim: int) -> None:
    """src, dst: logical (slot, dim, tok) views in any strides. Copies, for every pair i,
    src[src_slots[i], src_d0:+box_dim, shifts[i]:] to dst[dst_slots[i], dst_d0:+box_dim, :tok - shifts[i]]."""
    if src.is_cuda:
        launch_box_copy(src, dst, src_slots, dst_slots, shifts, src_d0, dst_d0, box_dim)
        return
    tok = src.shape[2]
    for i in range(src_slots.shape[0]):
        k = 0 if shifts is None else int(shifts[i])
        dst[dst_slots[i], dst_d0:dst_d0 + box_dim, :tok - k] = src[src_slots[i], src_d0:src_d0 + box_dim, k:].clone()


def launch_box_copy(src, dst, src_slots, dst_slots, shifts, src_d0, dst_d0, box_dim) -> None:
    if src_slots.shape[0] == 0 or box_dim == 0:
        return
    block_d = min(256, triton.next_power_of_2(box_dim))
    grid = (src_slots.shape[0], triton.cdiv(box_dim, block_d))
    wrap_triton(_box_copy_kernel)[grid](src, dst, src_slots, dst_slots, shifts, box_dim, src.shape[2], src_d0,
                                        dst_d0, *src.stride(), *dst.stride(), HAS_SHIFT=shifts is not None,
                                        BLOCK_D=block_d, TOK_P2=triton.next_power_of_2(src.shape[2]), num_warps=4)


def _logical(pool: torch.Tensor, layout: Layout, name: str = "pool") -> torch.Tensor:
    if pool.dim() != 3:
        raise ArgumentError(name, f"expected a (slot, ., .) pool, got shape {tuple(pool.shape)}")
    if layout.axes[0] != "slot":
        raise ArgumentError("layout", f"pools keep the slot axis outermost, got {layout}")
    return layout.view(pool, LOGICAL)


def _all_slots(pool: torch.Tensor) -> torch.Tensor:
    return torch.arange(pool.shape[0], device=pool.device, dtype=torch.int32)


def relayout(pool: torch.Tensor, src: "str | Layout", dst: "str | Layout") -> torch.Tensor:
    """A new contiguous pool holding `pool` (stored in `src`) in the `dst` layout."""
    src, dst = parse_layout(src, "src"), parse_layout(dst, "dst")
    view = _logical(pool, src)
    out = torch.empty(dst.shape(dict(slot=view.shape[0], dim=view.shape[1], tok=view.shape[2])),
                      dtype=pool.dtype, device=pool.device)
    slots = _all_slots(pool)
    box_copy(view, _logical(out, dst, "out"), slots, slots, None, 0, 0, view.shape[1])
    return out


def relayout_(pool: torch.Tensor, src: "str | Layout", dst: "str | Layout", scratch_slots: int = 64) -> torch.Tensor:
    """Relayout in place: returns a view of `pool`'s memory in the `dst` layout, its contents
    moved there, using a scratch buffer of at most `scratch_slots` slots. `pool` itself must
    not be used afterwards (its memory now holds the other layout)."""
    src, dst = parse_layout(src, "src"), parse_layout(dst, "dst")
    if not pool.is_contiguous():
        raise ArgumentError("pool", "an in-place relayout needs a contiguous pool")
    if scratch_slots < 1:
        raise ArgumentError("scratch_slots", f"must be >= 1, got {scratch_slots}")
    view = _logical(pool, src)
    sizes = dict(slot=view.shape[0], dim=view.shape[1], tok=view.shape[2])
    moved = pool.view(dst.shape(sizes))
    target = _logical(moved, dst)
    for first in range(0, view.shape[0], scratch_slots):
        chunk = view[first:first + scratch_slots].clone()
        slots = _all_slots(chunk)
        box_copy(chunk, target, slots, slots + first, None, 0, 0, view.shape[1])
    return moved


def tail_copy(pool: torch.Tensor, layout: "str | Layout", src_slots: torch.Tensor, dst_slots: torch.Tensor,
              shifts: torch.Tensor) -> None:
    """Spec-decode prefix caching: for each i, the state from token `shifts[i]` on moves to the
    front of slot dst_slots[i] (`dst[:, :S-k] = src[:, k:]` in logical terms); the rest of dst
    is left as it was. A dst slot may equal its own src, but not another pair's src."""
    view = _logical(pool, parse_layout(layout))
    if not (src_slots.shape == dst_slots.shape == shifts.shape) or src_slots.dim() != 1:
        raise ArgumentError("shifts", "src_slots, dst_slots and shifts must be 1-D of one length")
    if shifts.device.type == "cpu" and shifts.numel() and bool(((shifts < 0) | (shifts > view.shape[2])).any()):
        raise ArgumentError("shifts", f"must lie in 0..{view.shape[2]}")
    box_copy(view, view, src_slots, dst_slots, shifts, 0, 0, view.shape[1])


def shard_gather(pool: torch.Tensor, layout: "str | Layout", slots: torch.Tensor, d0: int, d1: int) -> torch.Tensor:
    """The channels [d0, d1) of the given slots, packed contiguously in the same layout."""
    layout = parse_layout(layout)
    view = _logical(pool, layout)
    _check_range(d0, d1, view.shape[1])
    out = torch.empty(layout.shape(dict(slot=slots.shape[0], dim=d1 - d0, tok=view.shape[2])),
                      dtype=pool.dtype, device=pool.device)
    box_copy(view, _logical(out, layout, "out"), slots, _all_slots(out), None, d0, 0, d1 - d0)
    return out


def shard_scatter(pool: torch.Tensor, layout: "str | Layout", slots: torch.Tensor, d0: int,
                  shard: torch.Tensor) -> None:
    """Inverse of shard_gather: write a packed shard (same layout) into channels [d0, d0 + width)."""
    layout = parse_layout(layout)
    view, packed = _logical(pool, layout), _logical(shard, layout, "shard")
    _check_range(d0, d0 + packed.shape[1], view.shape[1])
    if packed.shape[0] != slots.shape[0] or packed.shape[2] != view.shape[2]:
        raise ArgumentError("shard", f"shape {tuple(shard.shape)} does not fit {slots.shape[0]} slots of the pool")
    box_copy(packed, view, _all_slots(packed), slots, None, 0, d0, packed.shape[1])


def _check_range(d0: int, d1: int, dim: int) -> None:
    if not 0 <= d0 <= d1 <= dim:
        raise ArgumentError("d0", f"channel range [{d0}, {d1}) is outside 0..{dim}")
