"""Small models for the pass tests: one conv pool used in one particular way each."""

import torch
from torch import nn

from layoutpass.kernels import conv_prefill, conv_update

SLOTS, TOK, DIM, WIDTH = 6, 3, 8, 4


class OneConv(nn.Module):
    """A decode step over an SD pool, the pool transposed with the given spelling."""

    SPELLINGS = {
        "transpose(-1, -2)": lambda p: p.transpose(-1, -2),
        "transpose(1, 2)": lambda p: p.transpose(1, 2),
        "mT": lambda p: p.mT,
        "swapaxes(1, 2)": lambda p: p.swapaxes(1, 2),
        "swapdims(2, 1)": lambda p: p.swapdims(2, 1),
        "permute(0, 2, 1)": lambda p: p.permute(0, 2, 1),
        "movedim(1, 2)": lambda p: p.movedim(1, 2),
        "three transposes": lambda p: p.transpose(0, 1).transpose(1, 2).transpose(0, 2),
    }

    def __init__(self, spelling="transpose(-1, -2)", extra=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, WIDTH))
        self.register_buffer("pool", torch.randn(SLOTS, TOK, DIM))
        self.spelling, self.extra = spelling, extra

    def forward(self, x, slots):
        y = conv_update(x, self.SPELLINGS[self.spelling](self.pool), self.weight, None, "silu", slots,
                        out=torch.empty_like(x))
        return y if self.extra is None else y + self.extra(self.pool, slots)


class DSIdiom(nn.Module):
    """A model written for DS: the pool is stored (slot, dim, tok) and passed as is."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, WIDTH))
        self.register_buffer("pool", torch.randn(SLOTS, DIM, TOK))

    def forward(self, x, slots):
        return conv_update(x, self.pool, self.weight, None, "silu", slots, out=torch.empty_like(x))


class PoolArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, WIDTH))

    def forward(self, x, slots, pool):
        return conv_update(x, pool.transpose(1, 2), self.weight, None, "silu", slots, out=torch.empty_like(x))


class NoPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    def forward(self, x, slots):
        return self.lin(x)


def _zero_slot(pool, slots):
    pool[slots[:1]] = 0.0  # free a slot: layout-agnostic
    return 0


def _block_copy(pool, slots):
    pool[slots[1:2]] = pool[slots[:1]]  # copy one slot onto another (prefix caching)
    return 0


def _tail_copy(pool, slots):
    pool[5, : TOK - 1] = pool[4, 1:].clone()  # spec-decode tail copy, written in SD terms
    return 0


def _tp_shard(pool, slots):
    return pool[slots][..., 2:6].sum(1).repeat(1, 2)  # a TP shard of dim, read


def _last_column(pool, slots):
    return pool[slots, -1, :]  # the newest input of each sequence


def _contiguous_read(pool, slots):
    return pool.transpose(1, 2).contiguous()[slots][:, :, 0]


def _flattened(pool, slots):
    return pool.view(SLOTS, -1)[slots][:, :DIM]  # depends on SD memory order


def _flattened_write(pool, slots):
    pool.view(SLOTS, -1)[slots, :DIM] = 1.0  # writes through an SD-memory-order view
    return 0


USES = {"zero slot": _zero_slot, "block copy": _block_copy, "tail copy": _tail_copy, "tp shard": _tp_shard,
        "last column": _last_column, "contiguous read": _contiguous_read}


def inputs(batch=3):
    return dict(x=torch.randn(batch, DIM), slots=torch.tensor([1, 3, 4, 2][:batch], dtype=torch.int32))


class CatIdiom(nn.Module):
    """A pure-torch decode step on an SD pool: cat the new token, convolve, keep the tail."""

    def __init__(self, width=WIDTH):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, width))
        self.register_buffer("pool", torch.randn(SLOTS, width - 1, DIM))

    def forward(self, x, slots):
        window = torch.cat([self.pool[slots], x[:, None, :]], dim=1)  # (batch, tok + 1, dim)
        y = (window * self.weight.t()).sum(1)
        self.pool[slots] = window[:, 1:]
        return torch.nn.functional.silu(y)


class RollIdiom(nn.Module):
    """HF transformers' spelling: roll the window, set the last column, multiply and sum."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, TOK + 1))
        self.register_buffer("pool", torch.randn(SLOTS, TOK + 1, DIM))

    def forward(self, x, slots):
        state = self.pool[slots].roll(shifts=-1, dims=1)
        state[:, -1] = x
        self.pool[slots] = state
        return (state * self.weight.t()[None]).sum(1)


class ReadOnlyCat(nn.Module):
    """A rank-3 buffer gathered and concatenated but never written: not a conv-state pool."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(SLOTS, TOK, DIM))

    def forward(self, x, slots):
        return torch.cat([self.table[slots], x[:, None, :]], dim=1).sum(1)


class PromptIdiom(nn.Module):
    """A pure-torch prefill from no history on a DS pool: the conv pads the prompt itself, the
    state is the prompt's tail, zero-padded on the left when shorter."""

    def __init__(self, stateless=False):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(DIM, WIDTH)), nn.Parameter(torch.randn(DIM))
        self.register_buffer("pool", torch.randn(SLOTS, DIM, TOK))
        self.stateless = stateless

    def forward(self, x, slots):  # x: (batch, DIM, L)
        tokens = x.shape[2]
        if not self.stateless:
            self.pool[slots] = torch.nn.functional.pad(x, (max(0, TOK - tokens), 0))[..., -TOK:]
        y = torch.nn.functional.conv1d(x, self.weight[:, None], self.bias, padding=WIDTH - 1, groups=DIM)
        return torch.nn.functional.silu(y[..., :tokens])


def prompt(tokens, batch=3):
    return dict(x=torch.randn(batch, DIM, tokens), slots=torch.tensor([1, 3, 4, 2][:batch]))


class Modes(nn.Module):
    """One SD pool used by several call structures (the `mode` argument), some through the conv
    ops, some in pure torch, some only writing or trimming the pool."""

    def __init__(self, width=WIDTH):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, width))
        self.register_buffer("pool", torch.randn(SLOTS, width - 1, DIM))

    def forward(self, x, slots, mode: str, **kwargs):
        if mode == "prefill":  # x: (tokens, DIM), one sequence per slot, kwargs["starts"]
            starts = kwargs["starts"]
            y = conv_prefill(x.t(), self.weight, None, self.pool.transpose(1, 2), starts, slots,
                             torch.ones_like(slots, dtype=torch.bool), "silu")
            return y.t()
        if mode == "decode":
            return conv_update(x, self.pool.transpose(1, 2), self.weight, None, "silu", slots, out=torch.empty_like(x))
        if mode == "trim":  # forget each slot's oldest k tokens, written in SD terms
            self.pool[slots, : kwargs["k"]] = 0.0
            return x * 2
        if mode == "pure":  # a pure-torch decode through a transposed copy of the state
            st = self.pool[slots].transpose(-1, -2).contiguous()
            win = torch.cat([st, x[..., None]], -1)
            y = (win * self.weight[None]).sum(-1)
            self.pool[slots] = win[..., 1:].transpose(-1, -2)
            return torch.nn.functional.silu(y)
        if mode == "store":  # write-only: a prompt's tail becomes the state
            self.pool[slots] = x[:, -self.pool.shape[1]:]
            return x.sum(1)
        if mode == "reset":
            self.pool.mul_(kwargs["mask"])
            return x * 3
        raise ValueError(mode)


def mode_call(mode, width=WIDTH, batch=3, seed=None):
    """Fresh random inputs for one Modes call."""
    slots = torch.tensor([1, 3, 4, 2][:batch], dtype=torch.int32)
    if mode == "prefill":
        lens = [2, 5, 1][:batch]
        starts = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(batch)], dtype=torch.int32)
        return dict(x=torch.randn(sum(lens), DIM), slots=slots, mode=mode, starts=starts)
    if mode == "trim":
        return dict(x=torch.randn(batch, DIM), slots=slots, mode=mode, k=1)
    if mode == "store":
        return dict(x=torch.randn(batch, width + 2, DIM), slots=slots, mode=mode)
    if mode == "reset":
        return dict(x=torch.randn(batch, DIM), slots=slots, mode=mode,
                    mask=(torch.rand(SLOTS, 1, 1) > 0.5).float())
    return dict(x=torch.randn(batch, DIM), slots=slots, mode=mode)


class PaddedPrompt(nn.Module):
    """A one-token prompt from no history on a DS pool, padded by a constant: the batch stays
    dynamic, so the lowered prefill must read it from the graph."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, WIDTH))
        self.register_buffer("pool", torch.randn(SLOTS, DIM, TOK))

    def forward(self, x, slots):  # x: (batch, DIM, 1)
        self.pool[slots] = torch.nn.functional.pad(x, (TOK, 0))[..., -TOK:]
        return torch.nn.functional.conv1d(x, self.weight[:, None], None, padding=WIDTH - 1, groups=DIM)[..., :x.shape[-1]]
