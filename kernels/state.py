"""Moving conv state: relayout a pool (SD <-> DS), the spec-decode tail copy, TP shard
gather/scatter -- one Triton kernel on CUDA, copying a (dim range x token range) box per slot
pair between two strided pools -- and the pack/unpack of a TP transfer's messages (copy_runs,
unpack_boxes: one launch over every layer's pool); plain torch indexing elsewhere.

Pools are passed physically with their Layout (slot outermost); every function speaks in
logical axes, so the same call works on either layout."""

import functools

import torch
import triton
import triton.language as tl

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


@torch.library.custom_op("layoutpass::box_copy", mutates_args=("dst",))
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
    _box_copy_kernel[grid](src, dst, src_slots, dst_slots, shifts, box_dim, src.shape[2], src_d0, dst_d0,
                           *src.stride(), *dst.stride(), HAS_SHIFT=shifts is not None, BLOCK_D=block_d,
                           TOK_P2=triton.next_power_of_2(src.shape[2]), num_warps=4)


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


# Moving the states of a TP transfer: every layer's pool of a request to and from one flat
# message of per-peer records (layoutpass.tp plans what goes where). The message holds, for each
# peer k, `n * layers` records of `record_k` elements ([slot][layer][record], the slots in the
# order given), after the earlier peers' records. An entry (5 ints) names a piece of every
# record: (pool offset or first channel, offset in the record, run length or channels, record
# size, elements per (slot, layer) of the earlier peers' records). The launchers cut entries
# into tiles, so the kernels have no loops: a program moves one tile of SLOTS slots of one layer.
# They are plain launches (not torch ops: no graph captures them), which keeps the host's cost
# per launch at Triton's own.

@triton.jit
def _copy_runs_kernel(ref, deltas, slots, message, tiles, n_slots, n_layers, slot_stride,
                      TO_MESSAGE: tl.constexpr, ALIGN: tl.constexpr, SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    """A (SLOTS x BLOCK) tile of a run (pool offset, record offset, length, record, prefix) between
    the slots' blocks of one layer's pool (at `ref + deltas[layer]`) and their records; ALIGN
    (elements) divides every offset, as the host checked, so accesses vectorize."""
    i = tl.program_id(0) * SLOTS + tl.arange(0, SLOTS)
    tile = tiles + 5 * tl.program_id(1)
    layer = tl.program_id(2)
    k = tl.arange(0, BLOCK)[None, :]
    pool_off, length = tl.load(tile), tl.multiple_of(tl.load(tile + 2), ALIGN)
    slot = tl.load(slots + i, mask=i < n_slots, other=0).to(tl.int64)
    pool = tl.multiple_of(tl.load(deltas + layer) + slot * slot_stride + pool_off, ALIGN)
    record = tl.load(tile + 4) * n_slots * n_layers + (i * n_layers + layer) * tl.load(tile + 3) + tl.load(tile + 1)
    record = tl.multiple_of(record, ALIGN)
    mask = (i < n_slots)[:, None] & (k < length)
    if TO_MESSAGE:
        tl.store(message + record[:, None] + k, tl.load(ref + pool[:, None] + k, mask=mask), mask=mask)
    else:
        tl.store(ref + pool[:, None] + k, tl.load(message + record[:, None] + k, mask=mask), mask=mask)


@triton.jit
def _unpack_boxes_kernel(ref, deltas, slots, message, tiles, n_slots, n_layers, s_slot, s_dim, s_tok, state_len,
                         MESSAGE_DS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, TOK_P2: tl.constexpr):
    """A (BLOCK_D channels x state_len) tile of a box (first channel, record offset, channels,
    record, prefix, the box's full width) of one slot, stored in the record in the sender's
    layout (MESSAGE_DS or SD), written into one layer's pool in its own strides: the relayout
    happens between the load and the store, each in its coalesced order."""
    i = tl.program_id(0)
    tile = tiles + 6 * tl.program_id(1)
    layer = tl.program_id(2)
    c = tl.arange(0, BLOCK_D)[:, None]
    t = tl.arange(0, TOK_P2)[None, :]
    slot = tl.load(slots + i).to(tl.int64)
    pool = ref + tl.multiple_of(tl.load(deltas + layer) + slot * s_slot + tl.load(tile) * s_dim, ALIGN)
    record = tl.load(tile + 4) * n_slots * n_layers + (i * n_layers + layer) * tl.load(tile + 3) + tl.load(tile + 1)
    record = tl.multiple_of(record, ALIGN)
    mask = (c < tl.multiple_of(tl.load(tile + 2), ALIGN)) & (t < state_len)
    if MESSAGE_DS:
        v = tl.load(message + record + c * state_len + t, mask=mask)
    else:
        v = tl.load(message + record + c + t * tl.multiple_of(tl.load(tile + 5), ALIGN), mask=mask)
    tl.store(pool + c * s_dim + t * s_tok, v, mask=mask)


def copy_runs(pools: list[torch.Tensor], slots: torch.Tensor, entries, message: torch.Tensor,
              to_message: bool) -> None:
    """Copy each entry's run (pool offset, record offset, length, ...) of the given slots' blocks
    of every pool (one shape, dtype and strides; each slot's block contiguous) to
    (`to_message`) or from the message. entries: rows of 5 ints. One Triton launch on CUDA;
    torch slicing elsewhere."""
    entries = _rows(entries)
    if message.is_cuda:
        launch_copy_runs(pools, slots, entries, message, to_message)
        return
    index = slots.long()
    for (pool_off, rec_off, length, _, _), view in zip(entries, _records(pools, slots, message, entries)):
        for layer, pool in enumerate(pools):
            block = pool.view(pool.shape[0], -1)
            if to_message:
                view[:, layer, rec_off:rec_off + length] = block[index, pool_off:pool_off + length]
            else:
                block[index, pool_off:pool_off + length] = view[:, layer, rec_off:rec_off + length]


def unpack_boxes(pools: list[torch.Tensor], layout: "str | Layout", slots: torch.Tensor, entries,
                 message: torch.Tensor, message_layout: "str | Layout") -> None:
    """Write each entry's box (first channel, record offset, channels, ...), stored in the
    message in `message_layout`'s order, into channels [first, first + channels) of the given
    slots of every pool (stored in `layout`): the relayout on receipt."""
    layout, message_layout = parse_layout(layout, "layout"), parse_layout(message_layout, "message_layout")
    entries = _rows(entries)
    views = [_logical(p, layout) for p in pools]
    if message.is_cuda:
        launch_unpack_boxes(pools, views, slots, entries, message, message_layout)
        return
    index, state_len = slots.long(), views[0].shape[2]
    for (d0, rec_off, width, _, _), view in zip(entries, _records(pools, slots, message, entries)):
        box = view[..., rec_off:rec_off + width * state_len]
        region = [width if a == "dim" else state_len for a in message_layout.axes[1:]]
        box = message_layout.view(box.reshape(-1, *region), DS).reshape(*view.shape[:2], width, state_len)
        for layer, pool in enumerate(views):
            pool[index, d0:d0 + width] = box[:, layer]


def _rows(entries) -> tuple[tuple[int, ...], ...]:
    """Entries as a hashable tuple of int rows (what the executor already passes, kept as is)."""
    if isinstance(entries, tuple) and all(type(row) is tuple for row in entries):
        return entries
    return tuple(tuple(int(v) for v in row) for row in entries)


def _records(pools, slots, message, entries) -> list[torch.Tensor]:
    """Each entry's peer records as an (n, layers, record) view of the message."""
    n, layers = slots.shape[0], len(pools)
    return [message[n * layers * prefix:n * layers * (prefix + rec)].view(n, layers, rec)
            for _, _, _, rec, prefix in entries]


@functools.lru_cache(maxsize=256)
def _table(values: tuple, device: torch.device) -> torch.Tensor:
    """A small int64 table on the device, made once per distinct value (no copy per launch)."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def _deltas(pools) -> tuple[int, ...]:
    """Each pool's offset from pools[0], in elements: the kernels reach layer l at ref + delta."""
    return tuple((p.data_ptr() - pools[0].data_ptr()) // p.element_size() for p in pools)


def _alignment(element_size: int, values) -> int:
    """The largest power of two (at most 16 bytes' worth of elements) dividing every value."""
    align = max(1, 16 // element_size)
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


RUN_BLOCK, RUN_SLOTS, BOX_BLOCK = 1024, 4, 1024


@functools.lru_cache(maxsize=256)
def _run_tiles(entries: tuple, element_size: int) -> tuple[tuple, int]:
    """The entries cut into RUN_BLOCK-element tiles, and the alignment they allow."""
    tiles = tuple((pool_off + s, rec_off + s, min(RUN_BLOCK, length - s), rec, prefix)
                  for pool_off, rec_off, length, rec, prefix in entries for s in range(0, length, RUN_BLOCK))
    return tiles, _alignment(element_size, [v for row in tiles for v in row])


def launch_copy_runs(pools, slots, entries, message, to_message) -> None:
    size, device = pools[0].element_size(), pools[0].device
    tiles, align = _run_tiles(entries, size)
    if slots.shape[0] == 0 or not tiles:
        return
    deltas = _deltas(pools)
    align = min(align, _alignment(size, [*deltas, pools[0].stride(0), pools[0].data_ptr() // size,
                                         message.data_ptr() // size]))
    grid = (triton.cdiv(slots.shape[0], RUN_SLOTS), len(tiles), len(pools))
    _copy_runs_kernel[grid](pools[0], _table(deltas, device), slots, message, _table(tiles, device), slots.shape[0],
                            len(pools), pools[0].stride(0), TO_MESSAGE=to_message, ALIGN=align, SLOTS=RUN_SLOTS,
                            BLOCK=RUN_BLOCK, num_warps=4)


def launch_unpack_boxes(pools, views, slots, entries, message, message_layout) -> None:
    state_len, size, device = views[0].shape[2], pools[0].element_size(), pools[0].device
    step = state_len if message_layout == DS else 1  # record elements per channel of a box
    tiles = tuple((d0 + s, rec_off + s * step, min(BOX_BLOCK, width - s), rec, prefix, width)
                  for d0, rec_off, width, rec, prefix in entries for s in range(0, width, BOX_BLOCK))
    if slots.shape[0] == 0 or not tiles:
        return
    deltas = _deltas(pools)
    # what the hints claim: the tile's start in the pool and in the record, its width, an SD record's row stride
    align = _alignment(size, [v for d0, rec_off, n, rec, prefix, width in tiles
                              for v in (d0 * views[0].stride(1), rec_off, n, rec, prefix, width)]
                       + [*deltas, views[0].stride(0), pools[0].data_ptr() // size, message.data_ptr() // size])
    grid = (slots.shape[0], len(tiles), len(pools))
    _unpack_boxes_kernel[grid](pools[0], _table(deltas, device), slots, message, _table(tiles, device),
                               slots.shape[0], len(pools), *views[0].stride(), state_len,
                               MESSAGE_DS=message_layout == DS, ALIGN=align, BLOCK_D=BOX_BLOCK,
                               TOK_P2=triton.next_power_of_2(state_len), num_warps=8)


# The message of layoutpass.tp.Transfer: one byte buffer per chunk of slots, holding for each
# peer (in peer order) its bytes for every pool kind (in kind order); a kind's part for a peer is
# `n * layers` records of `record` elements ([slot][layer][record], the chunk's slots in order).
# A row (pool offset, record offset, run length, record size, prefix) names a run of every
# record; `prefix` counts the elements (of the kind's dtype) per slot of the chunk before the
# kind's part for that peer, so a record sits at n * prefix + (i * layers + layer) * record.
# Pools are flat (slots, block) views: each slot's state one dense block in its memory order, the
# run and box offsets given within it. The launchers are prepared once per pool set (tables on
# the device, alignment proven on the host) and then cost one plain Triton launch per call.

@triton.jit
def _move_runs_kernel(ref, deltas, slots, message, tiles, n_slots, n_layers, slot_stride,
                      TO_MESSAGE: tl.constexpr, ALIGN: tl.constexpr, SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    """A (SLOTS x BLOCK) tile of a run (pool offset, record offset, length, record, prefix) between
    the slots' blocks of one layer's pool (at `ref + deltas[layer]`) and their records; ALIGN
    (elements) divides every offset and length, as the host checked, so accesses vectorize."""
    i = tl.program_id(0) * SLOTS + tl.arange(0, SLOTS)
    tile = tiles + 5 * tl.program_id(1)
    layer = tl.program_id(2)
    k = tl.arange(0, BLOCK)[None, :]
    pool_off, length = tl.load(tile), tl.multiple_of(tl.load(tile + 2), ALIGN)
    slot = tl.load(slots + i, mask=i < n_slots, other=0).to(tl.int64)
    pool = tl.multiple_of(tl.load(deltas + layer) + slot * slot_stride + pool_off, ALIGN)
    record = tl.load(tile + 4) * n_slots + (i * n_layers + layer) * tl.load(tile + 3) + tl.load(tile + 1)
    record = tl.multiple_of(record, ALIGN)
    mask = (i < n_slots)[:, None] & (k < length)
    if TO_MESSAGE:
        tl.store(message + record[:, None] + k, tl.load(ref + pool[:, None] + k, mask=mask), mask=mask)
    else:
        tl.store(ref + pool[:, None] + k, tl.load(message + record[:, None] + k, mask=mask), mask=mask)


@triton.jit
def _unpack_tiles_kernel(ref, deltas, slots, message, tiles, n_slots, n_layers, slot_stride, sx, sy,
                         ALIGN_REC: tl.constexpr, ALIGN_POOL: tl.constexpr, ALIGN_X: tl.constexpr,
                         ALIGN_Y: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr):
    """A (BX x BY) tile (pool offset, record offset, x extent, y extent, record, prefix, row) of a
    box stored row-major in the record (y fastest, `row` elements a row), written into one slot of
    one layer's pool at pool offset + x * sx + y * sy: a relayout between the load and the store,
    each in its coalesced order (Triton converts between them)."""
    i = tl.program_id(0)
    tile = tiles + 7 * tl.program_id(1)
    layer = tl.program_id(2)
    x = tl.arange(0, BX)[:, None]
    y = tl.arange(0, BY)[None, :]
    slot = tl.load(slots + i).to(tl.int64)
    pool = tl.multiple_of(tl.load(deltas + layer) + slot * slot_stride + tl.load(tile), ALIGN_POOL)
    record = tl.load(tile + 5) * n_slots + (i * n_layers + layer) * tl.load(tile + 4) + tl.load(tile + 1)
    record = tl.multiple_of(record, ALIGN_REC)
    row = tl.multiple_of(tl.load(tile + 6), ALIGN_REC)
    mask = (x < tl.multiple_of(tl.load(tile + 2), ALIGN_X)) & (y < tl.multiple_of(tl.load(tile + 3), ALIGN_Y))
    v = tl.load(message + record + x * row + y, mask=mask)
    tl.store(ref + pool + x * sx + y * sy, v, mask=mask)


def _check_flat(pools) -> list[torch.Tensor]:
    pools = list(pools)
    first = pools[0] if pools else None
    if first is None or any(p.dim() != 2 or p.stride(1) != 1 or p.shape[1:] != first.shape[1:] or p.dtype != first.dtype
                            or p.stride(0) != first.stride(0) or p.device != first.device for p in pools):
        raise ArgumentError("pools", "expected flat (slots, block) views of one block size, slot stride, dtype and "
                                     "device, each slot's block dense")
    return pools


def _record_views(n: int, layers: int, message: torch.Tensor, rec: int, prefix: int) -> torch.Tensor:
    return message[n * prefix:n * (prefix + layers * rec)].view(n, layers, rec)


def move_runs(pools: list[torch.Tensor], slots: torch.Tensor, entries, message: torch.Tensor, to_message: bool) -> None:
    """Copy each row's run (pool offset, record offset, length, record, prefix) of the given
    slots' blocks of every flat pool to (`to_message`) or from its records in the message (see
    above). Plain torch indexing (the CPU path; prepare_move_runs launches the kernel)."""
    pools, n, index = _check_flat(pools), slots.shape[0], slots.long()
    for pool_off, rec_off, length, rec, prefix in _rows(entries):
        view = _record_views(n, len(pools), message, rec, prefix)
        for layer, pool in enumerate(pools):
            if to_message:
                view[:, layer, rec_off:rec_off + length] = pool[index, pool_off:pool_off + length]
            else:
                pool[index, pool_off:pool_off + length] = view[:, layer, rec_off:rec_off + length]


def unpack_tiles(pools: list[torch.Tensor], slots: torch.Tensor, entries, message: torch.Tensor, sx: int,
                 sy: int) -> None:
    """Write each row's box (pool offset, record offset, x extent, y extent, record, prefix),
    stored row-major in the message's records (y fastest), into the given slots of every flat pool
    at pool offset + x * sx + y * sy. Plain torch indexing (prepare_unpack_tiles launches the kernel)."""
    pools, n, index = _check_flat(pools), slots.shape[0], slots.long()
    for pool_off, rec_off, nx, ny, rec, prefix in _rows(entries):
        view = _record_views(n, len(pools), message, rec, prefix)
        grid = torch.arange(nx, device=message.device)[:, None] * sx + torch.arange(ny, device=message.device) * sy
        offsets = (pool_off + grid).flatten()
        for layer, pool in enumerate(pools):
            pool[index[:, None], offsets[None, :]] = view[:, layer, rec_off:rec_off + nx * ny]


def _flat_deltas(pools) -> tuple[int, ...]:
    size, ref = pools[0].element_size(), pools[0].data_ptr()
    if any((p.data_ptr() - ref) % size for p in pools):
        raise ArgumentError("pools", "the layers' pools must lie a whole number of elements apart")
    return tuple((p.data_ptr() - ref) // size for p in pools)


def _launch_checks(message: torch.Tensor) -> None:
    if message.data_ptr() % 16:
        raise ArgumentError("message", "a prepared launch needs a 16-byte aligned message")


def prepare_move_runs(pools: list[torch.Tensor], entries, to_message: bool, use_triton: bool | None = None):
    """`run(slots, message)`: move_runs over these pools and rows, prepared: on CUDA (or with
    use_triton, e.g. under TRITON_INTERPRET) one Triton launch whose tables, deltas and
    alignment were computed here; the message must be 16-byte aligned."""
    pools, entries = _check_flat(pools), _rows(entries)
    if not (pools[0].is_cuda if use_triton is None else use_triton):
        return lambda slots, message: move_runs(pools, slots, entries, message, to_message)
    size, device = pools[0].element_size(), pools[0].device
    tiles, align = _run_tiles(entries, size)
    if not tiles:
        return lambda slots, message: None
    deltas = _flat_deltas(pools)
    align = min(align, _alignment(size, [*deltas, pools[0].stride(0), pools[0].data_ptr() // size]))
    ref, stride, layers = pools[0], pools[0].stride(0), len(pools)
    deltas_t, tiles_t = _table(deltas, device), _table(tiles, device)

    def run(slots: torch.Tensor, message: torch.Tensor) -> None:
        n = slots.shape[0]
        if n:
            _launch_checks(message)
            _move_runs_kernel[(triton.cdiv(n, RUN_SLOTS), len(tiles), layers)](
                ref, deltas_t, slots, message, tiles_t, n, layers, stride, TO_MESSAGE=to_message, ALIGN=align,
                SLOTS=RUN_SLOTS, BLOCK=RUN_BLOCK, num_warps=4)
    return run


TILE_ELEMENTS = 4096


def _box_tiles(entries, sx: int, sy: int) -> tuple[tuple, int, int]:
    """The boxes cut into (BX x BY) tiles of at most TILE_ELEMENTS, the widest along y (the
    record's contiguous axis): rows (pool offset, record offset, x extent, y extent, record,
    prefix, row)."""
    by = min(triton.next_power_of_2(max(row[3] for row in entries)), 1024)
    bx = min(triton.next_power_of_2(max(row[2] for row in entries)), max(1, TILE_ELEMENTS // by))
    tiles = tuple((pool_off + x0 * sx + y0 * sy, rec_off + x0 * ny + y0, min(bx, nx - x0), min(by, ny - y0), rec,
                   prefix, ny)
                  for pool_off, rec_off, nx, ny, rec, prefix in entries
                  for x0 in range(0, nx, bx) for y0 in range(0, ny, by))
    return tiles, bx, by


def prepare_unpack_tiles(pools: list[torch.Tensor], entries, sx: int, sy: int, use_triton: bool | None = None):
    """`run(slots, message)`: unpack_tiles over these pools and rows, prepared (one Triton
    launch on CUDA or with use_triton); the message must be 16-byte aligned."""
    pools, entries = _check_flat(pools), _rows(entries)
    if not (pools[0].is_cuda if use_triton is None else use_triton):
        return lambda slots, message: unpack_tiles(pools, slots, entries, message, sx, sy)
    if not entries:
        return lambda slots, message: None
    size, device = pools[0].element_size(), pools[0].device
    tiles, bx, by = _box_tiles(entries, sx, sy)
    deltas = _flat_deltas(pools)
    # what the hints claim: the record side's start and row stride, the pool side's start (and its
    # non-unit stride: each row or column of the tile starts aligned), each tile's extents
    align_rec = _alignment(size, [v for t in tiles for v in (t[1], t[4], t[5], t[6])])
    pool_values = [t[0] for t in tiles] + [*deltas, pools[0].stride(0), pools[0].data_ptr() // size]
    pool_values += [s for s in (sx, sy) if s != 1] if 1 in (sx, sy) else [1]
    align_pool = _alignment(size, pool_values)
    align_x, align_y = _alignment(size, [t[2] for t in tiles]), _alignment(size, [t[3] for t in tiles])
    ref, stride, layers = pools[0], pools[0].stride(0), len(pools)
    deltas_t, tiles_t = _table(deltas, device), _table(tiles, device)

    def run(slots: torch.Tensor, message: torch.Tensor) -> None:
        n = slots.shape[0]
        if n:
            _launch_checks(message)
            _unpack_tiles_kernel[(n, len(tiles), layers)](
                ref, deltas_t, slots, message, tiles_t, n, layers, stride, sx, sy, ALIGN_REC=align_rec,
                ALIGN_POOL=align_pool, ALIGN_X=align_x, ALIGN_Y=align_y, BX=bx, BY=by, num_warps=4)
    return run
