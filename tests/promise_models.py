"""Serving-style models written the way engines and model libraries write them, each with one
thing around the captured graph that a pass can get wrong: Python flags and counters, hooks,
caches held in lists, pools carved out of one allocation, code in other methods, custom ops."""

import torch
from torch import nn

from layoutpass.kernels import conv_update

SLOTS, TOK, DIM, WIDTH = 6, 3, 8, 4


def step(batch=3, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return dict(x=torch.randn(batch, DIM, generator=g), slots=torch.tensor([1, 3, 4, 2][:batch]))


class Conv(nn.Module):
    """One decode conv over an SD pool (vLLM's idiom: transpose, then the conv op)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, WIDTH) / 2)
        self.register_buffer("conv_state", torch.randn(SLOTS, TOK, DIM))

    def conv(self, x, slots, pool=None):
        pool = self.conv_state if pool is None else pool
        return conv_update(x, pool.transpose(-1, -2), self.weight, None, "silu", slots, out=torch.empty_like(x))

    def forward(self, x, slots):
        return self.conv(x, slots)


class Flagged(Conv):
    """transformers' older caches: a Python flag decides whether the state is read; the forward
    sets it itself, and a server may set `continue_from_cache` between calls."""

    def __init__(self):
        super().__init__()
        self.has_previous_state = False
        self.continue_from_cache = True

    def forward(self, x, slots):
        if self.has_previous_state and self.continue_from_cache:
            init = self.conv_state
        else:
            init = torch.zeros_like(self.conv_state)
        full = torch.cat([init[slots], x[:, None, :]], 1)
        self.conv_state[slots] = full[:, 1:]
        self.has_previous_state = True
        return (full * self.weight.t()).sum(1)


class Counted(Conv):
    """A wrapper's bookkeeping: a token counter and a list of seen batches, kept in Python."""

    def __init__(self):
        super().__init__()
        self.seen_tokens = 0
        self.history = []

    def forward(self, x, slots):
        self.seen_tokens += x.shape[0]
        self.history.append(x.shape[0])
        return self.conv(x, slots) * (1 + self.seen_tokens % 3)


class Draining(Conv):
    """A forward pre-hook frees the slots a scheduler queued (writes the pool in SD terms)."""

    def __init__(self):
        super().__init__()
        self.to_free: list[int] = []
        self.register_forward_pre_hook(Draining.drain)

    @staticmethod
    def drain(module, args):
        if module.to_free:
            idx = torch.tensor(module.to_free)
            module.conv_state[idx] = 0
            module.conv_state[idx, -1, :2] = 1.0
            module.to_free = []


class Snapshot(Conv):
    """A pre-hook keeps a copy of the pool before every call (for a rollback)."""

    def __init__(self):
        super().__init__()
        self.register_forward_pre_hook(Snapshot.keep)
        self._ckpt = None

    @staticmethod
    def keep(module, args):
        module._ckpt = module.conv_state.detach().clone()

    def undo(self, slots):
        """Roll back the last step for these slots (a method outside forward)."""
        self.conv_state[slots] = self._ckpt[slots]


class ListCache(nn.Module):
    """vLLM's binding: one raw allocation per layer, the conv and SSM states views of it, bound
    as `self.kv_cache = [(conv_state, ssm_state)]` and read through the list."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, WIDTH) / 2)
        conv, ssm = torch.randn(SLOTS, TOK, DIM), torch.randn(SLOTS, 2, 4)
        self.kv_cache = [(conv, ssm)]

    def forward(self, x, slots):
        conv_state, ssm_state = self.kv_cache[0]
        y = conv_update(x, conv_state.transpose(-1, -2), self.weight, None, "silu", slots, out=torch.empty_like(x))
        ssm_state[slots] = ssm_state[slots] * 0.5 + y[:, :8].view(-1, 2, 4)
        return y + ssm_state[slots].flatten(1).sum(-1, keepdim=True)


class RawPages(nn.Module):
    """vLLM's page layout: one raw tensor per layer, each slot's page holding its conv state and
    its SSM state; both pools are views into the pages."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, WIDTH) / 2)
        conv_numel, ssm_numel = TOK * DIM, 2 * 4
        self.raw = torch.randn(SLOTS, conv_numel + ssm_numel)
        self.conv_state = self.raw[:, :conv_numel].view(SLOTS, TOK, DIM)
        self.ssm_state = self.raw[:, conv_numel:].view(SLOTS, 2, 4)

    def forward(self, x, slots):
        y = conv_update(x, self.conv_state.transpose(-1, -2), self.weight, None, "silu", slots,
                        out=torch.empty_like(x))
        self.ssm_state[slots] += y[:, :8].view(-1, 2, 4)
        return y

    def reset(self, slots, keep):
        """A server's slot reset through the raw pages."""
        self.raw[slots] *= keep


class Shared(nn.Module):
    """One pool registered in two layers (a draft layer reading the target layer's state)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Conv(), Conv()
        self.b.conv_state = self.a.conv_state

    def forward(self, x, slots):
        return self.a(x, slots) + self.b(x * 0.5, slots)


class Uncaptured(nn.Module):
    """A layer Dynamo cannot capture (a graph break on the `debug` call, or on every call) that
    holds the conv layer's pool and writes it through a flat view, as if the pool were SD: run
    as written, it is right only while the pool keeps the model's order."""

    def __init__(self, pool, always=False):
        super().__init__()
        self.register_buffer("conv_state", pool)
        self.always = always

    def forward(self, x, slots, debug=False):
        if debug or self.always:
            torch._dynamo.graph_break()
            flat = self.conv_state.flatten(1)  # a view of the SD pool; a copy of a moved one
            flat[slots, :DIM] *= 0.5
        else:
            self.conv_state[slots, 0] *= 0.5
        return x + self.conv_state[slots, 1]


class WithUncaptured(nn.Module):
    def __init__(self, uncaptured_first=False, always=False):
        super().__init__()
        self.conv = Conv()
        self.side = Uncaptured(self.conv.conv_state, always)
        self.uncaptured_first = uncaptured_first

    def forward(self, x, slots, debug=False):
        if self.uncaptured_first:
            return self.conv(self.side(x, slots, debug), slots)
        return self.side(self.conv(x, slots), slots, debug)


class Tagged(Conv):
    """A layer whose code branches on a string the server sets before each call (each new value
    is a new graph), with a rare branch written for SD memory."""

    def __init__(self):
        super().__init__()
        self.tag = "t0"

    def forward(self, x, slots):
        y = self.conv(x, slots)
        if self.tag == "rare":
            flat = self.conv_state.flatten(1)  # a view of the SD pool; a copy of a moved one
            flat[slots, :DIM] *= 0.5
        return y


class CacheObject:
    """A plain Python object holding the state (not a module, list or dict)."""

    def __init__(self):
        self.conv = torch.randn(SLOTS, TOK, DIM)


class HeldByObject(Conv):
    def __init__(self):
        super().__init__()
        del self.conv_state
        self.cache = CacheObject()

    def forward(self, x, slots):
        return self.conv(x, slots, self.cache.conv)


class EagerParent(nn.Module):
    """A module holding no pool itself, whose forward (eager: no layer of it is captured) reaches
    into its layer's pool after the layer ran, the way `how` says."""

    USES = {
        "flat write": lambda p, s: p.flatten(1)[:, :DIM].mul_(0.5),  # a view in SD, a copy in DS
        "reshape write": lambda p, s: p.reshape(SLOTS, -1)[:, :DIM].zero_(),
        "merging view": lambda p, s: p.view(SLOTS, -1)[s, :DIM].sum(),
        "stride read": lambda p, s: p[s, 0] * (2.0 if p.stride(-1) == 1 else 1.0),
        "logical write": lambda p, s: p[s, 0].mul_(0.5),  # the rest are order-free
        "reshape read": lambda p, s: p.reshape(SLOTS, -1)[s, :DIM] * 1.0,
        "contiguous read": lambda p, s: p.contiguous()[s, 1].sum(),
    }

    def __init__(self, how):
        super().__init__()
        self.layer = Conv()
        self.how = how

    def forward(self, x, slots):
        y = self.layer(x, slots)
        used = self.USES[self.how](self.layer.conv_state, slots)
        return y + (used.sum() if used.dim() else used) * 0.0 + (used.mean() if self.how.endswith("read") else 0.0)


class LateEager(nn.Module):
    """A parent module whose forward (eager) reaches into its layer's pool only from its third
    call on (a branch the first call never takes), the way `how` says: `before` runs before the
    layer, `after` after it, on the pool and what `before` returned; what `after` returns is an
    output too."""

    USES = {  # how -> (before, after, whether the pool must go back to the model's order for it)
        "flat write": (None, lambda p, s, _: p.flatten(1)[:, :DIM].mul_(0.5), True),
        "reshape write": (None, lambda p, s, _: p.reshape(SLOTS, -1)[:, DIM:].zero_(), True),
        "merging view": (None, lambda p, s, _: p.view(SLOTS, -1)[s, :DIM], True),
        "stride read": (None, lambda p, s, _: p[s, 0] * (2.0 if p.stride(-1) == 1 else 1.0), True),
        # a view taken before the pools go back: it must still address the same elements after
        "held view": (lambda p, s: p[:, 1], lambda p, s, row: p.stride(0) * 0.0 + row.mul_(0.5), True),
        "held alias": (lambda p, s: p.detach(), lambda p, s, a: p.stride(0) * 0.0 + a[:, 0].add_(1.0), True),
        # a copy in DS, a view (or the pool itself) in SD, read after the layer wrote the pool
        "stale copy read": (lambda p, s: p.reshape(SLOTS, -1), lambda p, s, flat: flat[s, :DIM] * 1.0, True),
        "stale contiguous read": (lambda p, s: p.contiguous(), lambda p, s, c: c[s] * 1.0, True),
        "copy written": (lambda p, s: p.flatten(1), lambda p, s, flat: flat[s[0]].add_(1.0), True),
        "logical write": (None, lambda p, s, _: p[s, 0].mul_(0.5), False),  # the rest are order-free
        "reshape read": (None, lambda p, s, _: p.reshape(SLOTS, -1)[s, :DIM] * 1.0, False),
        "gathered copy written": (None, lambda p, s, _: p.reshape(SLOTS, -1)[s, DIM:].zero_(), False),
        "splitting view": (None, lambda p, s, _: p.view(SLOTS, TOK, 2, -1)[s, :, 1], False),
    }

    def __init__(self, how):
        super().__init__()
        self.layer = Conv()
        self.how = how
        self.calls = 0

    def forward(self, x, slots):
        before, after, _ = self.USES[self.how]
        self.calls += 1
        late = self.calls >= 3
        held = before(self.layer.conv_state, slots) if late and before is not None else None
        y = self.layer(x, slots)
        return (y, after(self.layer.conv_state, slots, held).clone()) if late else (y, None)


class KeepsView(nn.Module):
    """Eager code that keeps views of its layer's pool in attributes from its third call on (a
    row, and `.data` of the whole pool), writes through them later, and from its fourth call on
    branches on the pool's strides (which puts the pools back in the model's order)."""

    def __init__(self):
        super().__init__()
        self.layer = Conv()
        self.calls = 0
        self.row = self.alias = None

    def forward(self, x, slots):
        self.calls += 1
        if self.calls == 3:
            self.row, self.alias = self.layer.conv_state[:, 1], self.layer.conv_state.data
        y = self.layer(x, slots)
        if self.calls >= 4:
            y = y * (2.0 if self.layer.conv_state.stride(-1) == 1 else 1.0)
            self.row.mul_(0.5)
            self.alias[slots, 0] += 1.0
        return y


class Server(Conv):
    """Methods a server calls outside forward, written for the SD pool."""

    def free_slots(self, slots):
        self.conv_state[slots] = 0.0

    def load_slots(self, slots, flat):
        """A connector that loads slots from a flat buffer of (tok, dim) states."""
        self.conv_state[slots] = flat.view(len(slots), *self.conv_state.shape[1:])

    def rollback(self, slot):
        self.conv_state[slot] = torch.roll(self.conv_state[slot], 1, 0)


class Reallocates(Conv):
    """A server that re-allocates the pool (a new, contiguous SD tensor) after a resize."""

    def grow(self):
        self.conv_state = torch.zeros(SLOTS, TOK, DIM)


@torch.library.custom_op("lp_tests::contiguous_only", mutates_args=("pool",))
def contiguous_only(pool: torch.Tensor, slots: torch.Tensor) -> None:
    """A user's op that reads the pool as flat memory and checks it is contiguous."""
    if not pool.is_contiguous():
        raise RuntimeError("contiguous_only: pool must be contiguous")
    flat = pool.view(pool.shape[0], -1)
    flat[slots, :2] += 1.0


@contiguous_only.register_fake
def _(pool, slots):
    return None


class CustomOp(Conv):
    def forward(self, x, slots):
        y = self.conv(x, slots)
        contiguous_only(self.conv_state, slots)
        return y


class Sharded(Conv):
    """Tensor-parallel rank 1: it reads its half of the channels, a slice not starting at 0."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM // 2, WIDTH) / 2)

    def forward(self, x, slots):
        shard = self.conv_state[..., DIM // 2:]
        return conv_update(x[:, DIM // 2:].contiguous(), shard.transpose(-1, -2), self.weight, None, "silu", slots,
                           out=torch.empty_like(x[:, DIM // 2:]))


class StackWrite(Conv):
    """A pure-torch shift written back through stack + index_copy_."""

    def forward(self, x, slots):
        old = self.conv_state[slots]
        rows = [torch.cat([old[i, 1:], x[i:i + 1]], 0) for i in range(x.shape[0])]
        new = torch.stack(rows)
        self.conv_state.index_copy_(0, slots, new)
        return (new * self.weight.t()[1:]).sum(1)


class SelectWrite(Conv):
    """A pure-torch shift: index_select the slots, shift, index_copy_ them back."""

    def forward(self, x, slots):
        old = self.conv_state.index_select(0, slots)
        new = torch.cat([old[:, 1:], x[:, None]], 1)
        self.conv_state.index_copy_(0, slots, new)
        return (new * self.weight.t()[1:]).sum(1)


class Gathered(Conv):
    """gather / scatter_ along the slot axis."""

    def forward(self, x, slots):
        index = slots[:, None, None].expand(-1, TOK, DIM)
        old = self.conv_state.gather(0, index)
        new = torch.cat([old[:, 1:], x[:, None]], 1)
        self.conv_state.scatter_(0, index, new)
        return (new * self.weight.t()[1:]).sum(1)


class OptionalArg(Conv):
    """An engine that passes `qsl=None` explicitly on decode."""

    def forward(self, x, slots, qsl=None):
        y = self.conv(x, slots)
        return y if qsl is None else y * qsl.sum()


class RawInForward(RawPages):
    """The pages reset and read inside forward: slot-wise uses (allowed) and a read of the raw
    bytes as if they were the conv state's SD layout (refused when the conv state moves)."""

    def __init__(self, peek=False):
        super().__init__()
        self.peek = peek

    def forward(self, x, slots, keep=None):
        if keep is not None:
            self.raw[slots] *= keep  # whole rows
            self.raw[slots[:1]] = self.raw[slots[1:2]]  # a whole row copied onto another
        y = super().forward(x, slots)
        if self.peek:  # the newest input, read off the page as SD bytes
            y = y + self.raw[slots, (TOK - 1) * DIM:TOK * DIM]
        return y
