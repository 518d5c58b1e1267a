"""The recurrent-state ops (Mamba2 SSM update, gated delta rule) against the float64 oracle:
the pure-torch reference (the public ops on the CPU) and the Triton kernels (interpreted on
the CPU under TRITON_INTERPRET=1 at small shapes; on CUDA, marked gpu, through the public ops
at real sizes). Pools are stored in both memory orders (and in strides of neither) by
allocating the physical shape and permuting back to the op's logical shape."""

import random

import pytest
import torch
import torch.nn.functional as F

import oracle
from layoutpass.errors import ArgumentError
from layoutpass.kernels import delta_rule_update, selective_state_update, triton_recurrent

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
POISON = 1234.5
ORDERS = ["VK", "KV", "any"]


def stored(logical_shape, order, dtype, device="cpu", *, v_axis, k_axis, gen=None):
    """Random values of the op's logical shape (slot, snap, head, ., .) (the same values for
    every order, given the generator), in a pool stored in `order`: VK = k contiguous, KV = v
    contiguous, "any" = heads outermost and every stride doubled (neither axis unit-stride)."""
    values = torch.randn(logical_shape, generator=gen).to(dtype)
    if order == "VK":
        perm = [0, 1, 2, v_axis, k_axis]
    elif order == "KV":
        perm = [0, 1, 2, k_axis, v_axis]
    else:
        perm = [2, 0, 1, v_axis, k_axis]
    phys = [logical_shape[d] for d in perm]
    storage = torch.zeros(phys + [2], dtype=dtype, device=device)[..., 0] if order == "any" else \
        torch.empty(phys, dtype=dtype, device=device)
    pool = storage.permute([perm.index(d) for d in range(5)])
    pool.copy_(values)
    assert tuple(pool.shape) == tuple(logical_shape) and pool.data_ptr() == storage.data_ptr()
    return pool


def assert_close(got, expected, tol, what):
    got = got.double().cpu()
    scale = expected.abs().max().item() + 1
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


class Case:
    """One op call's arguments plus the bookkeeping to judge a run against the oracle."""

    def __init__(self, op, kwargs, tol, written):
        self.op, self.kwargs, self.tol, self.written = op, kwargs, tol, written

    def expected(self):
        kw = self.kwargs
        state = kw["state"].double().cpu().clone()
        slots = None if kw["indices"] is None else kw["indices"].tolist()
        accepted = None if kw["num_accepted_tokens"] is None else kw["num_accepted_tokens"].tolist()
        cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
        if self.op == "ssu":
            outs = oracle.ssm_update(state, cpu["x"], cpu["dt"], cpu["A"], cpu["B"], cpu["C"], cpu["D"], cpu["z"],
                                     cpu["dt_bias"], cpu["dt_softplus"], slots, accepted, kw["null_block_id"])
        else:
            outs = oracle.delta_rule_update(state, cpu["q"], cpu["k"], cpu["v"], cpu["g"], cpu["beta"], kw["scale"],
                                            slots, accepted, kw["null_block_id"], kw["use_qk_l2norm"])
        return state, outs

    def check(self, run):
        """run(**kwargs) must update kwargs['state'] in place and write kwargs['out']."""
        kw = self.kwargs
        before = kw["state"].clone()
        expected_state, outs = self.expected()
        run(**kw)
        state, out = kw["state"], kw["out"]
        assert torch.equal(state[~self.written], before[~self.written]), "state written outside the step's snapshots"
        assert_close(state, expected_state, self.tol, "state")
        for i, y in enumerate(outs):
            if y is None:
                assert (out[i] == POISON).all(), f"sequence {i} is skipped but its output was written"
            else:
                assert_close(out[i], y, self.tol, f"output of sequence {i}")
        return state, out


def _common(rng, gen, batch, tokens, num_slots, num_snaps, indexed, spec, null_block_id):
    """Slots (random, distinct, non-contiguous, one null when indexed), accepted counts, and
    which (slot, snapshot) pairs the step writes."""
    slots = list(range(batch))
    indices = None
    if indexed:
        slots = rng.sample([s for s in range(num_slots) if s != null_block_id], batch)
        if batch > 1:
            slots[rng.randrange(batch)] = null_block_id
        indices = torch.tensor(slots, dtype=torch.int32 if rng.random() < 0.5 else torch.int64)
    accepted = torch.tensor([rng.randint(1, num_snaps) for _ in range(batch)], dtype=torch.int32) if spec else None
    written = torch.zeros(num_slots, num_snaps, dtype=torch.bool)
    for s in slots:
        if not (indexed and s == null_block_id):
            written[s, num_snaps - tokens:] = True
    return indices, accepted, written


def ssu_case(seed, *, order="VK", dtype=torch.float32, tokens=1, spec=False, indexed=True, gates=False,
             groups=1, heads=4, head_dim=10, d_state=12, batch=4, num_slots=9, device="cpu", null_block_id=0):
    """A random selective_state_update call. gates: z, dt_bias and dt_softplus (else D only).
    The default shapes cross value blocks (10 = 4 + 4 + 2) and pad d_state (12 -> 16)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    num_snaps = max(tokens, 2) + (1 if spec else 0)
    io = torch.float32 if dtype == torch.float32 else torch.bfloat16
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(io)
    state = stored((num_slots, num_snaps, heads, head_dim, d_state), order, dtype, v_axis=3, k_axis=4, gen=gen)
    indices, accepted, written = _common(rng, gen, batch, tokens, num_slots, num_snaps, indexed, spec, null_block_id)
    kw = dict(state=state, x=rand(batch, tokens, heads, head_dim),
              dt=(torch.rand(batch, tokens, heads, generator=gen) * (1.0 if gates else 0.5)).to(io),
              A=-torch.rand(heads, generator=gen) - 0.2, B=rand(batch, tokens, groups, d_state),
              C=rand(batch, tokens, groups, d_state), D=torch.randn(heads, generator=gen),
              z=rand(batch, tokens, heads, head_dim) if gates else None,
              dt_bias=torch.randn(heads, generator=gen) * 0.5 if gates else None, dt_softplus=gates,
              indices=indices, num_accepted_tokens=accepted, null_block_id=null_block_id,
              out=torch.full((batch, tokens, heads, head_dim), POISON, dtype=io))
    kw = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    return Case("ssu", kw, TOLERANCE[dtype], written.to(device)[..., None, None, None].expand(state.shape))


def delta_case(seed, *, order="KV", dtype=torch.float32, tokens=1, spec=False, indexed=True, kda=False,
               l2norm=False, qk_heads=None, heads=4, K=12, V=10, batch=4, num_slots=9, device="cpu",
               null_block_id=0):
    """A random delta_rule_update call (GDN, or KDA with a per-key decay); K = 12 pads to 16,
    V = 10 crosses value blocks. Keys are unit vectors unless the kernel normalizes them."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    qk_heads = qk_heads or heads
    num_snaps = max(tokens, 2) + (1 if spec else 0)
    io = torch.float32 if dtype == torch.float32 else torch.bfloat16
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    state = stored((num_slots, num_snaps, heads, K, V), order, dtype, v_axis=4, k_axis=3, gen=gen)
    indices, accepted, written = _common(rng, gen, batch, tokens, num_slots, num_snaps, indexed, spec, null_block_id)
    k = rand(batch, tokens, qk_heads, K)
    decay_shape = (batch, tokens, heads, K) if kda else (batch, tokens, heads)
    kw = dict(state=state, q=rand(batch, tokens, qk_heads, K).to(io),
              k=(k if l2norm else F.normalize(k, dim=-1)).to(io), v=rand(batch, tokens, heads, V).to(io),
              g=F.logsigmoid(rand(*decay_shape) + 2), beta=torch.rand(batch, tokens, heads, generator=gen).to(io),
              scale=K ** -0.5, indices=indices, num_accepted_tokens=accepted, null_block_id=null_block_id,
              use_qk_l2norm=l2norm, out=torch.full((batch, tokens, heads, V), POISON, dtype=io))
    kw = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    return Case("delta", kw, TOLERANCE[dtype], written.to(device)[..., None, None, None].expand(state.shape))


# The three ways of running an op: the public op (on the CPU: the reference; on CUDA: Triton)
# and the Triton launchers themselves (interpreted on the CPU).
def public_ssu(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, indices, num_accepted_tokens, null_block_id, out):
    got = selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                 state_batch_indices=indices, num_accepted_tokens=num_accepted_tokens,
                                 null_block_id=null_block_id, out=out)
    assert got is out


def _launch(launcher, *args):
    """A Triton launcher on the cases' CPU tensors: interpreted without a GPU; with one, on copies
    on the GPU (strides kept), the written tensors copied back."""
    if not torch.cuda.is_available():
        return launcher(*args)
    moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    launcher(*moved)
    for a, m in zip(args, moved):
        if isinstance(a, torch.Tensor):
            a.copy_(m.cpu())


def triton_ssu(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, indices, num_accepted_tokens, null_block_id, out):
    _launch(triton_recurrent.ssu, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, indices, num_accepted_tokens,
            null_block_id, out)


def public_delta(state, q, k, v, g, beta, scale, indices, num_accepted_tokens, null_block_id, use_qk_l2norm, out):
    got = delta_rule_update(state, q, k, v, g, beta, scale=scale, state_indices=indices,
                            num_accepted_tokens=num_accepted_tokens, null_block_id=null_block_id,
                            use_qk_l2norm=use_qk_l2norm, out=out)
    assert got is out


def triton_delta(state, q, k, v, g, beta, scale, indices, num_accepted_tokens, null_block_id, use_qk_l2norm, out):
    _launch(triton_recurrent.delta_rule, state, q, k, v, g, beta, scale, indices, num_accepted_tokens, null_block_id,
            use_qk_l2norm, out)


SSU_FORMS = {  # name: ssu_case keywords
    "T1": dict(),
    "T3-spec-gates-groups": dict(tokens=3, spec=True, gates=True, groups=2),
    "T2-unindexed": dict(tokens=2, indexed=False, groups=4),
}
DELTA_FORMS = {
    "gdn-T1": dict(),
    "kda-T3-spec-l2norm-gva": dict(tokens=3, spec=True, kda=True, l2norm=True, qk_heads=2),
    "gdn-T2-unindexed-l2norm": dict(tokens=2, indexed=False, l2norm=True),
}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("form", SSU_FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_ssu_against_oracle(impl, order, dtype, form):
    case = ssu_case(len(form) * 7 + ORDERS.index(order), order=order, dtype=dtype, **SSU_FORMS[form])
    case.check(public_ssu if impl == "reference" else triton_ssu)


@pytest.mark.parametrize("form", DELTA_FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_delta_rule_against_oracle(impl, order, dtype, form):
    case = delta_case(len(form) * 5 + ORDERS.index(order), order=order, dtype=dtype, **DELTA_FORMS[form])
    case.check(public_delta if impl == "reference" else triton_delta)


@pytest.fixture
def one_block(monkeypatch):
    """Whole value heads per program and several warps (the shipped table splits them)."""
    monkeypatch.setattr(triton_recurrent, "BLOCKS", {key: [(1 << 62, 64, 4)] for key in triton_recurrent.BLOCKS})
    monkeypatch.setattr(triton_recurrent, "ANY_BLOCK", (64, 2))


@pytest.mark.parametrize("order", ORDERS)
def test_whole_heads_per_program(order, one_block):
    ssu_case(31, order=order, tokens=2, spec=True, gates=True).check(triton_ssu)
    delta_case(32, order=order, tokens=2, spec=True, kda=True).check(triton_delta)


@pytest.mark.parametrize("order", ORDERS)
def test_wide_index_math(order, monkeypatch):
    """The 64-bit in-tile offsets (taken for rows past 2^31 elements) compute exactly what the
    32-bit ones do."""
    runs = {}
    for wide in (False, True):
        monkeypatch.setattr(triton_recurrent, "_wide", lambda *rows, wide=wide: wide)
        ssu = ssu_case(41, order=order, tokens=3, spec=True, gates=True)
        delta = delta_case(42, order=order, tokens=3, spec=True, kda=True, l2norm=True)
        runs[wide] = ssu.check(triton_ssu) + delta.check(triton_delta)
    assert all(torch.equal(a, b) for a, b in zip(runs[False], runs[True]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_orders_agree(device, dtype):
    """The same step on one pool stored VK, KV and in strides of neither. The reference gathers
    the states first, so it gives the same bits in every order. Triton: the SSM state update
    is elementwise, written the same for every tile orientation, so the SSM states agree bit
    for bit; a sum over k (the SSM outputs, everything of the delta rule) is reduced in an
    order that follows the tile's layout, so those agree to rounding only (on a GPU they
    differ; the interpreter's numpy sums may or may not)."""
    cuda = device == "cuda"
    size = dict(heads=80, head_dim=64, d_state=128, batch=9, num_slots=20) if cuda else {}
    delta_size = dict(heads=32, K=128, V=128, batch=9, num_slots=20) if cuda else {}
    runs = [(public_ssu, public_delta, not cuda)] + ([] if cuda else [(triton_ssu, triton_delta, False)])
    for run_ssu, run_delta, reference in runs:
        for op, make, run, kw in (("ssu", ssu_case, run_ssu, dict(gates=True, groups=2, **size)),
                                  ("delta", delta_case, run_delta, dict(kda=True, l2norm=True, **delta_size))):
            results = [make(77, order=order, dtype=dtype, tokens=3, spec=True, device=device, **kw).check(run)
                       for order in ORDERS]
            for state, out in results[1:]:
                if reference or op == "ssu":
                    assert torch.equal(state, results[0][0]), f"{op} {run.__name__}: states differ between orders"
                if reference:
                    assert torch.equal(out, results[0][1]), f"{op} {run.__name__}: outputs differ between orders"


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_matches_the_example_steps(impl):
    """examples/recurrence.py's pure-torch steps, token by token (the models' semantics): its
    `_mamba2` (per-head B and C, D, no gates) and `_delta_rule` (decay = exp(g), q pre-scaled:
    scale 1) with the snapshot rule, on pools stored in the non-native order of each."""
    from layoutpass.examples.recurrence import STEPS

    ssu = ssu_case(5, order="KV", tokens=3, spec=True, groups=4)
    kw = ssu.kwargs
    start = kw["state"].clone()
    (public_ssu if impl == "reference" else triton_ssu)(**kw)
    slots, acc, snaps = kw["indices"].long(), kw["num_accepted_tokens"].long(), start.shape[1]
    live = (slots != 0).nonzero().squeeze(1)
    h = start[slots[live], acc[live] - 1].float()
    for t in range(3):
        y, h = STEPS["mamba2"](h, [kw["A"].float(), kw["D"].float()], kw["x"][live, t].float(),
                               kw["dt"][live, t].float(), kw["B"][live, t].float(), kw["C"][live, t].float())
        assert_close(kw["out"][live, t], y.double(), 1e-5, f"mamba2 output at token {t}")
        assert_close(kw["state"][slots[live], snaps - 3 + t], h.double(), 1e-5, f"mamba2 state after token {t}")

    delta = delta_case(6, order="VK", tokens=3, spec=True, kda=True)
    kw = delta.kwargs
    kw["scale"] = 1.0
    start = kw["state"].clone()
    (public_delta if impl == "reference" else triton_delta)(**kw)
    slots, acc, snaps = kw["indices"].long(), kw["num_accepted_tokens"].long(), start.shape[1]
    live = (slots != 0).nonzero().squeeze(1)
    h = start[slots[live], acc[live] - 1].float()
    for t in range(3):
        y, h = STEPS["delta_rule"](h, [], kw["v"][live, t].float(), kw["q"][live, t].float(),
                                   kw["k"][live, t].float(), kw["beta"][live, t].float(),
                                   torch.exp(kw["g"][live, t].float()))
        assert_close(kw["out"][live, t], y.double(), 1e-5, f"delta rule output at token {t}")
        assert_close(kw["state"][slots[live], snaps - 3 + t], h.double(), 1e-5, f"delta rule state after token {t}")


def test_defaults_allocate_the_output():
    """out=None: a new zero-filled output (skipped sequences read zeros); scale defaults to K^-0.5."""
    case = ssu_case(3)
    kw = dict(case.kwargs)
    expected_state, outs = case.expected()
    out = selective_state_update(kw["state"], kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"],
                                 state_batch_indices=kw["indices"])
    assert out.shape == kw["x"].shape and out.dtype == kw["x"].dtype
    for i, y in enumerate(outs):
        assert (out[i] == 0).all() if y is None else torch.allclose(out[i].double(), y, atol=1e-5)
    case = delta_case(4)
    kw = dict(case.kwargs)
    _, outs = case.expected()  # kw["scale"] is K ** -0.5
    out = delta_rule_update(kw["state"], kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], state_indices=kw["indices"])
    for i, y in enumerate(outs):
        assert (out[i] == 0).all() if y is None else torch.allclose(out[i].double(), y, atol=1e-5)


def test_fake_tensors_and_compile():
    """The ops trace: fake tensors give the checks' verdict without running anything, and
    torch.compile(fullgraph=True) of a step equals eager (the CPU path: the reference op)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = ssu_case(8, tokens=2, spec=True, gates=True)
    kw = case.kwargs
    with FakeTensorMode() as mode:
        fake = {n: (mode.from_tensor(t) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
        public_ssu(**fake)
        fake["out"] = fake["out"][:, :1]
        with pytest.raises(ArgumentError, match="^out:"):
            public_ssu(**fake)

    def step(state, x, dt, B, C, out):
        return selective_state_update(state, x, dt, kw["A"], B, C, kw["D"], kw["z"], kw["dt_bias"], True,
                                      kw["indices"], kw["num_accepted_tokens"], 0, out)
    args = lambda: (kw["state"].clone(), kw["x"], kw["dt"], kw["B"], kw["C"], kw["out"].clone())
    eager, compiled = args(), args()
    step(*eager)
    torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[-1], compiled[-1])


def _bad_ssu():
    """(argument name, change to a valid call's keywords) for selective_state_update."""
    return [
        ("state", lambda kw: kw.update(state=kw["state"][:, :, :, :5])),
        ("state", lambda kw: kw.update(state=kw["state"].to(torch.int32))),
        ("x", lambda kw: kw.update(x=kw["x"][0])),
        ("x", lambda kw: kw.update(x=kw["x"].expand(-1, 9, -1, -1), dt=kw["dt"].expand(-1, 9, -1),
                                   B=kw["B"].expand(-1, 9, -1, -1), C=kw["C"].expand(-1, 9, -1, -1),
                                   out=kw["out"].expand(-1, 9, -1, -1))),  # more tokens than snapshots
        ("dt", lambda kw: kw.update(dt=kw["dt"][:, :, :2])),
        ("A", lambda kw: kw.update(A=kw["A"][:, None])),
        ("B", lambda kw: kw.update(B=kw["B"].expand(-1, -1, 3, -1), C=kw["C"].expand(-1, -1, 3, -1))),
        ("C", lambda kw: kw.update(C=kw["C"][..., :5])),
        ("D", lambda kw: kw.update(D=kw["D"][:2])),
        ("z", lambda kw: kw.update(z=kw["x"][:, :, :, :3])),
        ("dt_bias", lambda kw: kw.update(dt_bias=kw["A"].long())),
        ("indices", lambda kw: kw.update(indices=kw["indices"].float())),
        ("indices", lambda kw: kw.update(indices=kw["indices"][:2])),
        ("indices", lambda kw: kw.update(indices=torch.tensor([1, 2, 3, 99]))),
        ("num_accepted_tokens", lambda kw: kw.update(num_accepted_tokens=torch.tensor([1, 1, 1, 5]),
                                                     indices=torch.tensor([1, 2, 3, 4]))),
        ("out", lambda kw: kw.update(out=kw["out"].double())),
        ("out", lambda kw: kw.update(out=kw["out"][:3])),
        ("state", lambda kw: kw.update(indices=None, state=kw["state"][:2])),
    ]


def _bad_delta():
    return [
        ("state", lambda kw: kw.update(state=kw["state"][..., :3])),
        ("v", lambda kw: kw.update(v=kw["v"][..., 0])),
        ("q", lambda kw: kw.update(q=kw["q"][:, :, :3], k=kw["k"][:, :, :3])),  # 3 qk heads for 4 heads
        ("q", lambda kw: kw.update(q=kw["q"][..., :5])),
        ("k", lambda kw: kw.update(k=kw["k"][:, :, :2])),
        ("g", lambda kw: kw.update(g=kw["g"][..., None, None])),
        ("g", lambda kw: kw.update(g=kw["g"][..., None].expand(-1, -1, -1, 5))),
        ("beta", lambda kw: kw.update(beta=kw["beta"][..., None])),
        ("state_indices", lambda kw: kw.update(indices=kw["indices"][:, None])),
        ("state_indices", lambda kw: kw.update(indices=torch.tensor([1, 2, 3, -1]))),
        ("num_accepted_tokens", lambda kw: kw.update(num_accepted_tokens=torch.tensor([0, 1, 1, 1]),
                                                     indices=torch.tensor([1, 2, 3, 4]))),
        ("out", lambda kw: kw.update(out=kw["out"][..., :3])),
    ]


@pytest.mark.parametrize("name, change", _bad_ssu(), ids=lambda p: p if isinstance(p, str) else "")
def test_bad_ssu_arguments(name, change):
    kw = ssu_case(1, tokens=1, spec=True).kwargs
    change(kw)
    expected = "state_batch_indices" if name == "indices" else name
    with pytest.raises(ArgumentError, match=f"^{expected}: "):
        public_ssu(**kw)


@pytest.mark.parametrize("name, change", _bad_delta(), ids=lambda p: p if isinstance(p, str) else "")
def test_bad_delta_arguments(name, change):
    kw = delta_case(1, tokens=1, spec=True).kwargs
    change(kw)
    with pytest.raises(ArgumentError, match=f"^{name}: "):
        public_delta(**kw)


def test_device_mismatch_is_named():
    kw = ssu_case(2).kwargs
    kw["A"] = kw["A"].to("meta")
    with pytest.raises(ArgumentError, match="^A: on meta"):
        public_ssu(**kw)


# ---------------------------------------------------------------- on a GPU, at real sizes

@pytest.mark.gpu
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["T1", "T3-spec-gates-groups"])
def test_ssu_gpu(form, dtype, order):
    ssu_case(11, order=order, dtype=dtype, device="cuda", heads=80, head_dim=64, d_state=128, batch=5,
             num_slots=12, **{**SSU_FORMS[form], **({"groups": 8} if form != "T1" else {})}).check(public_ssu)


@pytest.mark.gpu
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["gdn-T1", "kda-T3-spec-l2norm-gva"])
def test_delta_rule_gpu(form, dtype, order):
    delta_case(12, order=order, dtype=dtype, device="cuda", heads=32, K=128, V=128, batch=5, num_slots=12,
               **{**DELTA_FORMS[form], **({"qk_heads": 16} if form != "gdn-T1" else {})}).check(public_delta)


@pytest.mark.gpu
def test_pool_past_2_31_elements():
    """A bf16 SSM pool of 2^31 + elements (3300 slots of 80 x 64 x 128): the last slots sit past
    int32 offsets. Judged by the oracle on the touched slots only."""
    heads, head_dim, d_state, num_slots = 80, 64, 128, 3300
    assert num_slots * heads * head_dim * d_state > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    pool = torch.randn(num_slots, 1, heads, head_dim, d_state, device="cuda", generator=gen).bfloat16()
    slots = torch.tensor([num_slots - 1, 3, num_slots - 2], device="cuda")
    x = torch.randn(3, 1, heads, head_dim, device="cuda", generator=gen).bfloat16()
    dt = torch.rand(3, 1, heads, device="cuda", generator=gen)
    A, D = -torch.rand(heads, device="cuda", generator=gen), torch.randn(heads, device="cuda", generator=gen)
    B, C = (torch.randn(3, 1, 1, d_state, device="cuda", generator=gen).bfloat16() for _ in range(2))
    touched = pool[slots].double().cpu()
    out = selective_state_update(pool, x, dt, A, B, C, D, state_batch_indices=slots)
    # the touched slots' copy, rows 0..2: no null block among them
    outs = oracle.ssm_update(touched, x.cpu(), dt.cpu(), A.cpu(), B.cpu(), C.cpu(), D.cpu(), slots=[0, 1, 2],
                             null_block_id=-1)
    assert_close(pool[slots], touched, TOLERANCE[torch.bfloat16], "state past 2^31 elements")
    for i in range(3):
        assert_close(out[i], outs[i], TOLERANCE[torch.bfloat16], f"output of sequence {i}")
