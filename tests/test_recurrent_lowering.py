"""Pure-torch recurrences lowered onto the recurrent kernels (layoutpass/lowering_recurrent.py):
Mamba2's SSM update onto selective_state_update, the gated delta rule (GDN, KDA) onto
delta_rule_update. Each spelling against the model as written, in both layouts (one of them
the stored order); each near miss left as written, exact, and reported with what differed;
transformers' classes against their own generate."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from layoutpass import check_equivalence, optimize
from layoutpass.report import Action

SLOTS, H, V, K = 5, 3, 4, 6
TOL = dict(rtol=1e-5, atol=1e-5)  # the kernel multiplies dt, x and B in another order: rounding only


class Ssm(nn.Module):
    """One decode step of Mamba2's SSM in pure torch on a (slot, head, v, k) pool, declared by
    `layoutpass_pools` as an adapter does. `spelling` picks how it is written (and what is wrong
    with it, for the near misses)."""

    def __init__(self, spelling="slots", dtype=torch.float32):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("state", torch.randn(SLOTS, H, V, K, dtype=dtype))
        self.A_log = nn.Parameter(torch.randn(H, K) if spelling == "A per k" else torch.randn(H))
        self.dt_bias = nn.Parameter(torch.randn(H))
        self.D = nn.Parameter(torch.randn(H))
        self.layoutpass_pools = {"state": ("slot", "head", "v", "k")}

    def forward(self, x, dt, B, C, slots):
        s = self.spelling
        A = -torch.exp(self.A_log.float())
        A = A[:, None, :] if s == "A per k" else A[:, None, None]
        if s == "dt bumped":  # transformers' spelling (expand, then softplus: equal along v), then a write
            step = torch.nn.functional.softplus(dt[:, :, None].expand(-1, -1, V) + self.dt_bias[:, None])
            step[:, :, 0] += 1.0
            step = step[..., None]
        else:
            dt = torch.nn.functional.softplus(dt + self.dt_bias)  # (b, h)
            step = (dt[:, :, None] + x * 0.01 if s == "dt per v" else dt[:, :, None].expand(-1, -1, V))[..., None]
        whole = s in ("whole", "read again", "read between", "written between", "returns state", "bf16",
                     "output from pool")
        read = self.state if whole else self.state[slots]
        if s == "bf16":
            new = read * torch.exp(step * A).to(read.dtype) + (step * B[:, None, None, :] * x[..., None]).to(read.dtype)
        else:
            new = read * torch.exp(step * A) + step * B[:, None, None, :] * x[..., None]
        if s == "written between":  # a write the idiom's read does not see (copy_ then overwrites it)
            self.state.mul_(0.5)
        if whole:
            self.state.copy_(new.to(self.state.dtype))
        else:
            self.state[slots] = new.to(self.state.dtype)
        if s == "read between":
            extra = self.state.sum()
        if s == "output from pool":
            y = (self.state * C[:, None, None, :]).sum(-1)
        elif whole:  # transformers' spelling
            b = x.shape[0]
            y = torch.bmm(new.to(C.dtype).view(b * H, V, K), C[:, None, :].expand(b, H, K).reshape(b * H, K, 1))
            y = y.view(b, H, V)
        else:
            y = (new * C[:, None, None, :]).sum(-1)
        y = y + x * self.D[:, None]
        if s == "read again":
            y = y + self.state.sum()
        if s == "read between":
            y = y + extra
        if s == "returns state":
            return y, new
        return y


def call(seed, batch=3):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, H, V, generator=g), dt=torch.randn(batch, H, generator=g),
                B=torch.randn(batch, K, generator=g), C=torch.randn(batch, K, generator=g),
                slots=torch.randperm(SLOTS, generator=g)[:batch])


def calls(batch=3):
    return [call(seed, batch) for seed in range(4)]


def lowered(fast):
    return [u.detail for u in fast.report.uses if u.action == Action.LOWERED]


def not_lowered(fast):
    return [u.detail for u in fast.report.uses if u.action == Action.NOT_LOWERED]


@pytest.mark.parametrize("layout", ["VK", "KV"])
@pytest.mark.parametrize("spelling, batch", [("slots", 3), ("whole", SLOTS)])
def test_an_ssm_update_is_lowered_in_either_layout(spelling, batch, layout):
    """VK is the stored order (a no-op move, lowered all the same); KV moves the pool."""
    model = Ssm(spelling)
    fast = optimize(model, {"recurrent": layout}, lower=True, example_inputs=[call(9, batch)])
    assert lowered(fast) == ["pure-torch SSM update -> selective_state_update"]
    code = "\n".join(g.after for g in fast.graphs.values())
    assert "layoutpass.selective_state_update" in code and code.count("aten.exp.default") == 1  # A = -exp(A_log) only
    assert "bmm" not in code and "index_put_" not in code and "copy_" not in code
    assert str(fast.report.pools["state"].target) == layout
    result = check_equivalence(model, fast, calls(batch), **TOL)
    assert result.ok, str(result)


def test_a_lowered_update_follows_a_batch_that_changes():
    """Calls of 3, 2 and 4 sequences: the graph Dynamo makes dynamic in the batch is lowered too."""
    model = Ssm("slots")
    fast = optimize(model, {"recurrent": "KV"}, lower=True)
    steps = [call(seed, batch) for seed, batch in enumerate((3, 2, 4, 3, 1))]
    result = check_equivalence(model, fast, steps, **TOL)
    assert result.ok, str(result)
    code = [g.after for g in fast.graphs.values()]
    assert len(code) >= 2 and all("layoutpass.selective_state_update" in c for c in code)


def test_an_ssm_update_stays_as_written_without_lower():
    model = Ssm("slots")
    fast = optimize(model, {"recurrent": "VK"}, lower=False, example_inputs=[call(9)])
    assert lowered(fast) == [] and "selective_state_update" not in "".join(g.after for g in fast.graphs.values())
    assert check_equivalence(model, fast, calls(), rtol=0, atol=0).ok


@pytest.mark.parametrize("spelling, reason", [
    ("dt per v", "dt varies along the state's v or k axis (the kernel takes one step per head)"),
    ("dt bumped", "dt varies along the state's v or k axis (the kernel takes one step per head)"),
    ("A per k", "the decay is not exp(dt * A) with A one value per head"),
    ("returns state", "the new state is not read by the state write and one output only"),
    ("output from pool", "the new state is not read by the state write and one output only"),
    ("read between", "the pool is read between the state write and the output"),
    ("written between", "the pool is written between the state read and the state write"),
])
def test_a_near_miss_runs_as_written_and_says_why(spelling, reason):
    """What the kernel would compute differently (a step per channel, a decay per key, a state
    the model keeps using, a read or a write the kernel would move past) stays as written: exact,
    and reported (VK, the stored order: nothing else changes the graph)."""
    model = Ssm(spelling)
    batch = 3 if spelling in ("dt per v", "dt bumped", "A per k") else SLOTS
    fast = optimize(model, {"recurrent": "VK"}, lower=True, example_inputs=[call(9, batch)])
    assert lowered(fast) == [] and not_lowered(fast) == [reason]
    result = check_equivalence(model, fast, calls(batch), rtol=0, atol=0)
    assert result.ok, str(result)


def test_a_bf16_update_is_lowered_and_differs_by_its_own_rounding():
    """bf16 pool, products rounded to bf16 as transformers' bf16 models round them: the kernel
    computes the same formula in fp32, so the lowered model is closer to an fp64 run of the same
    update than the model itself is."""
    model = Ssm("bf16", torch.bfloat16)
    start = model.state.clone()
    fast = optimize(model, {"recurrent": "KV"}, lower=True, example_inputs=[call(9, SLOTS)])
    assert lowered(fast) == ["pure-torch SSM update -> selective_state_update"]
    fast.state.copy_(start)
    model.state.copy_(start)
    exact = Ssm("whole").double()
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    inputs = call(10, SLOTS)
    ours, theirs = fast(**inputs).double(), model(**inputs).double()
    truth = exact(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    assert (ours - truth).abs().max() <= (theirs - truth).abs().max()
    torch.testing.assert_close(fast.state.double(), exact.state, rtol=2e-2, atol=2e-2)


def test_the_pool_read_after_the_write_sees_the_kernels_state():
    """A later read of the pool (through the write's result) reads what the kernel wrote."""
    model = Ssm("read again")
    fast = optimize(model, {"recurrent": "KV"}, lower=True, example_inputs=[call(9, SLOTS)])
    assert lowered(fast) == ["pure-torch SSM update -> selective_state_update"]
    result = check_equivalence(model, fast, calls(SLOTS), rtol=1e-5, atol=1e-4)
    assert result.ok, str(result)


def test_an_update_autograd_records_is_not_lowered():
    """The kernel has no backward: in grad mode, with an input that requires grad, the update
    runs as written (same outputs and gradients); under no_grad the same model is lowered."""
    model, reference = Ssm("slots"), Ssm("slots")
    reference.load_state_dict(model.state_dict())
    fast = optimize(model, {"recurrent": "VK"}, lower=True)
    for m in (reference, fast):
        inputs = call(9)
        inputs["x"].requires_grad_(True)
        m(**inputs).square().sum().backward()
        m.grads = inputs["x"].grad, m.A_log.grad
    assert all(torch.equal(a, b) for a, b in zip(reference.grads, fast.grads))
    assert lowered(fast) == [] and not_lowered(fast)[0].startswith("autograd records this call")
    with torch.no_grad():
        torch.testing.assert_close(fast(**call(10)), reference(**call(10)), **TOL)
    assert lowered(fast) == ["pure-torch SSM update -> selective_state_update"]
    torch.testing.assert_close(fast.state, reference.state, **TOL)


class Delta(nn.Module):
    """One decode step of the gated delta rule in pure torch (transformers' spelling) on a
    (slot, head, k, v) pool: GDN (a decay per head) or KDA (per key channel), q/k heads shared
    by pairs of value heads; `spelling` as in Ssm."""

    def __init__(self, spelling="gdn"):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("state", torch.randn(SLOTS, H2, K, V))
        self.layoutpass_pools = {"state": ("slot", "head", "k", "v")}

    def forward(self, q, k, v, a, b, slots):
        s = self.spelling
        q, k = (torch.nn.functional.normalize(t, dim=-1).repeat_interleave(2, dim=1) for t in (q, k))
        q = q / K ** 0.5
        beta = b.sigmoid()  # (batch, H2)
        if s == "beta per v":
            beta = beta[..., None] + v * 0.01
        else:
            beta = beta[..., None]
        if s == "kda":
            decay = torch.nn.functional.logsigmoid(a)[..., None].exp()  # (batch, H2, K, 1)
        elif s == "decay per v":
            decay = (torch.nn.functional.logsigmoid(a[:, :, :1])[..., None] + v[:, :, None, :] * 0.01).exp()
        else:
            decay = torch.nn.functional.logsigmoid(a[:, :, 0]).exp()[..., None, None]
        whole = s in ("whole", "returns state")
        state = self.state if whole else self.state[slots]
        state = state * decay
        recalled = (state * k.unsqueeze(-1)).sum(dim=-2)
        delta = (v - recalled) * beta
        state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
        out = (state * q.unsqueeze(-1)).sum(dim=-2)
        if whole:
            self.state.copy_(state)
        else:
            self.state[slots] = state
        return (out, state) if s == "returns state" else out


H2 = 4


def delta_call(seed, batch=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(q=r(batch, H2 // 2, K), k=r(batch, H2 // 2, K), v=r(batch, H2, V), a=r(batch, H2, K),
                b=r(batch, H2), slots=torch.randperm(SLOTS, generator=g)[:batch])


@pytest.mark.parametrize("layout", ["KV", "VK"])
@pytest.mark.parametrize("spelling, batch", [("gdn", 3), ("kda", 3), ("whole", SLOTS)])
def test_a_delta_rule_is_lowered_in_either_layout(spelling, batch, layout):
    """KV is the stored order (a no-op move, lowered all the same); VK moves the pool."""
    model = Delta(spelling)
    fast = optimize(model, {"recurrent": layout}, lower=True, example_inputs=[delta_call(9, batch)])
    assert lowered(fast) == ["pure-torch delta-rule update -> delta_rule_update"]
    code = "\n".join(g.after for g in fast.graphs.values())
    assert "layoutpass.delta_rule_update" in code and "aten.sub" not in code and "copy_" not in code
    assert str(fast.report.pools["state"].target) == layout
    result = check_equivalence(model, fast, [delta_call(seed, batch) for seed in range(4)], **TOL)
    assert result.ok, str(result)


def on(device, inputs):
    return {k: v.to(device) for k, v in inputs.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["VK", "KV"])
@pytest.mark.parametrize("make, inputs, kernel", [
    (lambda: Ssm("slots"), call, "selective_state_update"),
    (lambda: Ssm("whole"), lambda seed: call(seed, SLOTS), "selective_state_update"),
    (lambda: Delta("gdn"), delta_call, "delta_rule_update"),
    (lambda: Delta("kda"), delta_call, "delta_rule_update")], ids=["ssm", "ssm-whole", "gdn", "kda"])
def test_recurrences_are_lowered_onto_the_triton_kernels_on_cuda(make, inputs, kernel, layout):
    """The same rules on CUDA, where the ops launch the Triton kernels (reading and writing the
    pool in place), against the model as written on the same device."""
    model = make().cuda()
    fast = optimize(model, {"recurrent": layout}, lower=True, example_inputs=[on("cuda", inputs(9))])
    assert [d.split(" -> ")[-1] for d in lowered(fast)] == [kernel]
    result = check_equivalence(model, fast, [on("cuda", inputs(seed)) for seed in range(4)], rtol=1e-4, atol=1e-4)
    assert result.ok, str(result)


@pytest.mark.parametrize("spelling, reason", [
    ("beta per v", "beta varies along the state's v axis (the kernel takes one per head)"),
    ("decay per v", "the decay varies along the state's v axis"),
    ("returns state", "the new state is not read by the state write and one output only"),
])
def test_a_delta_rule_near_miss_runs_as_written_and_says_why(spelling, reason):
    model = Delta(spelling)
    batch = SLOTS if spelling == "returns state" else 3
    fast = optimize(model, {"recurrent": "KV"}, lower=True, example_inputs=[delta_call(9, batch)])
    assert lowered(fast) == [] and not_lowered(fast) == [reason]
    result = check_equivalence(model, fast, [delta_call(seed, batch) for seed in range(3)], rtol=0, atol=0)
    assert result.ok, str(result)


# ------------------------------------------------------------------ generated spellings (hypothesis)
# Each example writes one SSM update or delta rule as source (a fresh code object, so Dynamo's
# cache of one example never serves another) in spellings drawn at random: operand orders and
# groupings, casts, whole pool or gathered slots, how dt is broadcast, bmm or sum, the pool's
# axis order, the layout asked for; and, half the time, one fault the rule must refuse (then
# the model runs as written: exact).

SSM_FAULTS = {"dt per v": "dt varies along the state's v or k axis (the kernel takes one step per head)",
              "B per v": "the input is not dt * B * x with B along k and x along v",
              "read between": "the pool is read between the state write and the output",
              "write between": "the pool is written between the state read and the state write",
              "returns state": "the new state is not read by the state write and one output only"}
DELTA_FAULTS = {"beta per v": "beta varies along the state's v axis (the kernel takes one per head)",
                "decay per v": "the decay varies along the state's v axis",
                "read between": "the pool is read between the state write and the output",
                "write between": "the pool is written between the state read and the state write",
                "returns state": "the new state is not read by the state write and one output only"}


def _product(draw, factors):
    """a * b * c in a drawn order and grouping."""
    a, b, c = draw(st.permutations(factors))
    return draw(st.sampled_from([f"({a} * {b}) * {c}", f"{a} * ({b} * {c})"]))


def _either(draw, a, b, op):
    return f"{a} {op} {b}" if draw(st.booleans()) else f"{b} {op} {a}"


def _draws(draw, faults):
    """(whole pool, the fault or None, bf16): what both kinds of program draw first."""
    whole = draw(st.booleans())
    fault = draw(st.sampled_from([None] * 5 + list(faults)))
    return whole, fault, draw(st.booleans()) and fault is None


def _program(draw, kind, lines, axes, whole, fault, bf16):
    return dict(kind=kind, lines=lines, axes=axes, whole=whole, bf16=bf16, fault=fault,
                layout=draw(st.sampled_from(["KV", "VK"])), batch=SLOTS if whole else draw(st.integers(1, SLOTS)))


@st.composite
def ssm_programs(draw):
    vk = draw(st.booleans())  # the pool's axes (slot, head, v, k), else (slot, head, k, v)
    whole, fault, bf16 = _draws(draw, SSM_FAULTS)
    bmm = vk and draw(st.booleans())
    B, x, C = ("B[:, None, None, :]", "x[..., None]", "C[:, None, None, :]") if vk else \
        ("B[:, None, :, None]", "x[:, :, None, :]", "C[:, None, :, None]")
    lines = ["A = -torch.exp(self.A_log.float())"]
    if vk and draw(st.booleans()):  # transformers' order: broadcast dt over v, then bias and softplus
        lines += ["dt = F.softplus(dt[:, :, None].expand(-1, -1, V) + self.dt_bias[:, None])[..., None]"]
    else:
        lines += ["dt = F.softplus(dt + self.dt_bias)[:, :, None, None]"]
    if fault == "dt per v":
        lines += [f"dt = dt + {x} * 0.01"]
    if fault == "B per v":
        B = f"({B} + {x} * 0.01)"
    lines += ["read = " + ("self.state" if whole else "self.state[slots]") + (".float()" if draw(st.booleans()) else "")]
    decayed = _either(draw, "read", "torch.exp(dt * A[:, None, None])", "*")
    lines += ["new = " + _either(draw, decayed, _product(draw, ["dt", B, x]), "+")]
    if fault == "write between":
        lines += ["self.state.mul_(0.5)"]
    lines += [("self.state.copy_(" if whole else "self.state[slots] = (") + "new.to(self.state.dtype))"]
    if fault == "read between":
        lines += ["extra = self.state.sum()"]
    if bmm:
        lines += ["b = x.shape[0]",
                  "y = torch.bmm(new.to(C.dtype).view(b * H, V, K), C[:, None, :].expand(b, H, K).reshape(b * H, K, 1))",
                  "y = y.view(b, H, V)"]
    else:
        lines += ["y = (" + _either(draw, "new", C, "*") + f").sum({-1 if vk else -2})"]
    if draw(st.booleans()):
        lines += ["y = y + x * self.D[:, None]"]
    if fault == "read between":
        lines += ["y = y + extra"]
    lines += [f"return {'(y, new)' if fault == 'returns state' else 'y'}"]
    return _program(draw, "ssm", lines, ("slot", "head", "v", "k") if vk else ("slot", "head", "k", "v"), whole,
                    fault, bf16)


@st.composite
def delta_programs(draw):
    kv = draw(st.booleans())  # the pool's axes (slot, head, k, v), else (slot, head, v, k)
    whole, fault, bf16 = _draws(draw, DELTA_FAULTS)
    kaxis, vaxis = (-2, -1) if kv else (-1, -2)  # where k and v sit in the state
    lines = ["q, k = (F.normalize(t, dim=-1).repeat_interleave(2, dim=1) for t in (q, k))", "q = q / K ** 0.5",
             "beta = b.sigmoid()[..., None]" + (" + v * 0.01" if fault == "beta per v" else "")]
    if fault != "decay per v" and draw(st.booleans()):  # KDA: a decay per key channel
        lines += [f"decay = F.logsigmoid(a).unsqueeze({vaxis}).exp()" if draw(st.booleans())
                  else f"decay = F.logsigmoid(a).exp().unsqueeze({vaxis})"]
    elif fault == "decay per v":
        lines += [f"decay = (F.logsigmoid(a[:, :, 0])[..., None, None] + v.unsqueeze({kaxis}) * 0.01).exp()"]
    else:
        lines += ["decay = F.logsigmoid(a[:, :, 0]).exp()[..., None, None]"]
    k4, q4, d4 = f"k.unsqueeze({vaxis})", f"q.unsqueeze({vaxis})", f"delta.unsqueeze({kaxis})"
    lines += ["state = " + ("self.state" if whole else "self.state[slots]") + (".float()" if draw(st.booleans()) else ""),
              "state = " + _either(draw, "state", "decay", "*"),
              "recalled = (" + _either(draw, "state", k4, "*") + f").sum(dim={kaxis})",
              "delta = " + _either(draw, "(v - recalled)", "beta", "*"),
              "state = " + _either(draw, "state", _either(draw, k4, d4, "*"), "+"),
              "out = (" + _either(draw, "state", q4, "*") + f").sum(dim={kaxis})"]
    if fault == "write between":
        lines.insert(-1, "self.state.mul_(0.5)")
    if fault == "read between":
        lines += ["out = out + self.state.sum()"]
    lines += [("self.state.copy_(" if whole else "self.state[slots] = (") + "state.to(self.state.dtype))"]
    lines += [f"return {'(out, state)' if fault == 'returns state' else 'out'}"]
    return _program(draw, "delta", lines, ("slot", "head", "k", "v") if kv else ("slot", "head", "v", "k"), whole,
                    fault, bf16)


def build(program):
    """The program's module: its forward from source, its pool in its axes' order."""
    ssm = program["kind"] == "ssm"
    args = "x, dt, B, C, slots" if ssm else "q, k, v, a, b, slots"
    source = f"def forward(self, {args}):\n" + "".join(f"    {line}\n" for line in program["lines"])
    scope = dict(torch=torch, F=torch.nn.functional, H=H, V=V, K=K)
    exec(compile(source, f"<{program['kind']} program>", "exec"), scope)
    heads = H if ssm else H2
    sizes = {"slot": SLOTS, "head": heads, "k": K, "v": V}
    module = type("Program", (nn.Module,), {"forward": scope["forward"]})()
    dtype = torch.bfloat16 if program["bf16"] else torch.float32
    module.register_buffer("state", torch.randn(*(sizes[a] for a in program["axes"]), dtype=dtype))
    module.layoutpass_pools = {"state": program["axes"]}
    if ssm:
        module.A_log, module.dt_bias, module.D = (nn.Parameter(torch.randn(H)) for _ in range(3))
    module.source = source
    return module


def program_calls(program):
    make = call if program["kind"] == "ssm" else delta_call
    return [make(seed, program["batch"]) for seed in range(3)]


@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(ssm_programs(), delta_programs()))
def test_generated_spellings_are_lowered_or_refused_with_a_reason(program):
    """Lowered: one kernel, equal to the model as written up to the kernel's rounding (bf16: the
    idiom's own rounding). Refused: the fault's reason, and the model exactly as written (VK or
    KV, whichever is asked: a move alone changes no value here)."""
    model = build(program)
    fast = optimize(model, {"recurrent": program["layout"]}, lower=True, example_inputs=[program_calls(program)[0]])
    faults = SSM_FAULTS if program["kind"] == "ssm" else DELTA_FAULTS
    if program["fault"] is None:
        kernel = "selective_state_update" if program["kind"] == "ssm" else "delta_rule_update"
        assert len(lowered(fast)) == 1 and lowered(fast)[0].endswith(kernel), model.source
        tol = dict(rtol=5e-2, atol=5e-2) if program["bf16"] else dict(rtol=1e-4, atol=1e-4)
    else:
        assert lowered(fast) == [] and not_lowered(fast) == [faults[program["fault"]]], model.source
        tol = dict(rtol=1e-5, atol=1e-5)  # a move changes the order of the sums over k: rounding only
    result = check_equivalence(model, fast, program_calls(program), **tol)
    assert result.ok, model.source + str(result)


@pytest.mark.parametrize("layouts", [{"conv": "DS", "recurrent": "VK"}, {"conv": "SD", "recurrent": "KV"}],
                         ids=["DS-VK", "SD-KV"])
@pytest.mark.parametrize("name, kernel", [("Mamba2", "pure-torch SSM update -> selective_state_update"),
                                          ("NemotronH", "pure-torch SSM update -> selective_state_update"),
                                          ("Qwen3Next", "pure-torch delta-rule update -> delta_rule_update"),
                                          ("KimiLinear", "pure-torch delta-rule update -> delta_rule_update")])
def test_transformers_recurrences_are_lowered_and_generate_the_same(name, kernel, layouts):
    """Each layer's recurrence is lowered, and generate() gives transformers' own tokens. The
    other classes that share these functions (Bamba, Zamba2, FalconH1, GraniteMoeHybrid; Qwen3_5,
    OlmoHybrid and the rest): benchmarks/hf_zoo.py."""
    pytest.importorskip("transformers")
    from layoutpass.hf import CacheAsBuffers, generate, tiny_model

    model = tiny_model(name)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    fast = optimize(CacheAsBuffers(model, 2, 32), layouts, lower=True)
    tokens, logits = generate(fast, ids, 8, output_logits=True)
    assert torch.equal(tokens, out.sequences[:, 7:])
    torch.testing.assert_close(logits, torch.stack(out.logits, 1), rtol=1e-4, atol=1e-4)
    states = sorted(p.name for p in fast.report.pools.values() if p.kind == "recurrent")
    assert states and sorted(u.pool for u in fast.report.uses if u.detail == kernel) == states
