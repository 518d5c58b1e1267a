"""Random conv-op cases shared by the reference tests and the Triton tests: each case holds
the op's arguments (pool stored SD or DS, the op seeing its (slot, dim, state_len) view) and
checks a run of an implementation against the oracle."""

import random
from dataclasses import dataclass

import torch

import oracle

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
POISON = 1234.5


def make_pool(num_slots, dim, state_len, layout, dtype, device="cpu"):
    """Random pool stored in `layout`; returns (storage, (slot, dim, state_len) view)."""
    if layout == "SD":
        storage = torch.randn(num_slots, state_len, dim, device=device).to(dtype)
        return storage, storage.transpose(1, 2)
    storage = torch.randn(num_slots, dim, state_len, device=device).to(dtype)
    return storage, storage


def random_slots(rng, batch, num_slots, null_block_id=0, with_null=True):
    slots = rng.sample(range(1, num_slots), batch)
    if with_null and batch > 1:
        slots[rng.randrange(batch)] = null_block_id
    return slots


@dataclass
class UpdateCase:
    kwargs: dict
    seqs: list  # per-sequence (dim, len) inputs
    form: str

    def check(self, run):
        """run(**kwargs) must write kwargs['out'] and the pool; compare with the oracle."""
        kw = self.kwargs
        expected_state = kw["conv_state"].double().cpu().clone()
        slots = kw["conv_state_indices"].tolist() if kw["conv_state_indices"] is not None else list(range(len(self.seqs)))
        accepted = None if kw["num_accepted_tokens"] is None else kw["num_accepted_tokens"].tolist()
        bias = None if kw["bias"] is None else kw["bias"].cpu()
        outs = oracle.update(self.seqs, expected_state, kw["weight"].cpu(), bias, kw["activation"], slots, accepted,
                             kw["null_block_id"], indexed=kw["conv_state_indices"] is not None)
        out = kw["out"]
        run(**kw)
        tol = TOLERANCE[out.dtype]
        assert_close(kw["conv_state"], expected_state, tol, "state")
        for i, y in enumerate(outs):
            got = self.output_of(out, i, y.shape[1] if y is not None else self.seqs[i].shape[1])
            if y is None:
                assert (got == POISON).all(), f"sequence {i} is skipped but its output was written"
            else:
                assert_close(got, y, tol, f"output of sequence {i}")

    def output_of(self, out, i, length):
        if self.form == "varlen":
            start = int(self.kwargs["query_start_loc"][i])
            return out[start:start + length].t()
        return out[i] if out.dim() == 3 else out[i][:, None]


def assert_close(got, expected, tol, what):
    got = got.double().cpu()
    scale = expected.abs().max().item() + 1
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def update_case(seed, *, layout, dtype=torch.float32, width=None, form=None, spec=None, device="cpu",
                dim=None, batch=None):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    width = width or rng.randint(2, 6)
    form = form or rng.choice(["single", "multi", "varlen"])
    spec = rng.random() < 0.5 if spec is None else spec
    dim = dim or rng.choice([1, 3, 8, 17, 40])
    batch = batch or rng.randint(1, 5)
    num_spec = rng.randint(1, 3) if spec else rng.choice([0, 0, 2])
    state_len = width - 1 + num_spec
    num_slots = batch + rng.randint(1, 4)
    _, pool = make_pool(num_slots, dim, state_len, layout, dtype, device)
    if form == "single":
        lens = [1] * batch
    elif form == "multi":
        lens = [num_spec + 1 if spec else rng.randint(1, 4)] * batch
    else:
        lens = [num_spec + 1 if spec else rng.randint(0, 4) for _ in range(batch)]
    indexed = rng.random() < 0.8
    slots = random_slots(rng, batch, num_slots) if indexed else list(range(batch))
    seqs = [torch.randn(dim, n, device=device).to(dtype) for n in lens]
    if form == "single":
        x = torch.stack([s[:, 0] for s in seqs])
    elif form == "multi":
        x = torch.stack(seqs)
        if rng.random() < 0.5:  # a tokens-major buffer seen as (batch, dim, seqlen)
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        x = torch.cat([s.t() for s in seqs]) if sum(lens) else torch.zeros(0, dim, device=device, dtype=dtype)
    weight = torch.randn(dim, width, device=device).to(dtype)
    bias = torch.randn(dim, device=device).to(dtype) if rng.random() < 0.5 else None
    out = torch.full_like(x, POISON)
    qsl = None
    if form == "varlen":
        qsl = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(batch)], dtype=torch.int32, device=device)
    kwargs = dict(
        x=x, conv_state=pool, weight=weight, bias=bias, activation=rng.choice([None, "silu"]),
        conv_state_indices=torch.tensor(slots, dtype=torch.int32, device=device) if indexed else None,
        num_accepted_tokens=(torch.tensor([rng.randint(1, num_spec + 1) for _ in range(batch)], dtype=torch.int32,
                                          device=device) if spec else None),
        query_start_loc=qsl, null_block_id=0, out=out)
    return UpdateCase(kwargs, [s.double().cpu() for s in seqs], form)


@dataclass
class PrefillCase:
    kwargs: dict
    seqs: list

    def check(self, run):
        kw = self.kwargs
        expected_state = kw["conv_states"].double().cpu().clone()
        batch = kw["query_start_loc"].shape[0] - 1
        slots = kw["cache_indices"].tolist() if kw["cache_indices"] is not None else list(range(batch))
        has_init = kw["has_initial_state"].tolist() if kw["has_initial_state"] is not None else [False] * batch
        outs = oracle.prefill(self.seqs, expected_state, kw["weight"].cpu(), None if kw["bias"] is None else kw["bias"].cpu(),
                              kw["activation"], slots, has_init, kw["null_block_id"],
                              indexed=kw["cache_indices"] is not None)
        out = run(**kw)
        tol = TOLERANCE[out.dtype]
        assert out.shape == kw["x"].shape and out.dtype == kw["x"].dtype
        assert_close(kw["conv_states"], expected_state, tol, "state")
        starts = kw["query_start_loc"].tolist()
        for i, y in enumerate(outs):
            got = out[:, starts[i]:starts[i + 1]]
            if y is None:
                assert (got == 0).all(), f"sequence {i} is skipped but its output is not zero"
            else:
                assert_close(got, y, tol, f"output of sequence {i}")


def prefill_case(seed, *, layout, dtype=torch.float32, width=None, device="cpu", dim=None, lens=None,
                 tokens_major=None):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    width = width or rng.randint(2, 6)
    dim = dim or rng.choice([1, 3, 8, 17, 40])
    lens = lens or [rng.choice([0, 1, 2, width, 7, 19]) for _ in range(rng.randint(1, 5))]
    batch = len(lens)
    state_len = width - 1 + rng.choice([0, 0, 2])
    num_slots = batch + rng.randint(1, 4)
    _, pool = make_pool(num_slots, dim, state_len, layout, dtype, device)
    indexed = rng.random() < 0.8
    slots = random_slots(rng, batch, num_slots) if indexed else list(range(batch))
    seqs = [torch.randn(dim, n, device=device).to(dtype) for n in lens]
    x = torch.cat(seqs, 1)
    tokens_major = rng.random() < 0.5 if tokens_major is None else tokens_major
    if tokens_major:  # vLLM passes a (tokens, dim) buffer transposed
        x = x.t().contiguous().t()
    has_init = [rng.random() < 0.5 for _ in range(batch)]
    kwargs = dict(
        x=x, weight=torch.randn(dim, width, device=device).to(dtype),
        bias=torch.randn(dim, device=device).to(dtype) if rng.random() < 0.5 else None,
        conv_states=pool, query_start_loc=torch.tensor([0] + [sum(lens[:i + 1]) for i in range(batch)],
                                                       dtype=torch.int32, device=device),
        cache_indices=torch.tensor(slots, dtype=torch.int32, device=device) if indexed else None,
        has_initial_state=torch.tensor(has_init, device=device) if rng.random() < 0.8 else None,
        activation=rng.choice([None, "silu"]), null_block_id=0)
    return PrefillCase(kwargs, [s.double().cpu() for s in seqs])
