import os, torch, sys
sys.path.insert(0, sys.argv[1] + "/benchmarks")
if len(sys.argv) > 2:
    torch.use_deterministic_algorithms(True, warn_only=True)
from e2e import build, decode_step, MODELS
from layoutpass import optimize, check_equivalence
from layoutpass.examples.scenario import fill_state
torch.manual_seed(0)
model = build(MODELS["mamba2"][0], "2.7b", "cuda", torch.bfloat16, num_slots=257, max_len=512)
fast = optimize(model, "DS")
for B in (64, 256):
    step = decode_step(model.cfg, B, "cuda")
    with torch.no_grad():
        fast(**step.inputs)  # capture (relayouts the pools) first
    for name, m in (("SD", model), ("DS", fast)):
        with torch.no_grad():
            fill_state(m, 0)
            start = [b.clone() for b in m.buffers()]
            outs = []
            for r in range(4):
                for b, s in zip(m.buffers(), start):
                    b.copy_(s)
                logits = m(**step.inputs)
                outs.append([b.clone() for b in m.buffers()] + [logits])
            diffs = [max((a.float() - b.float()).abs().max().item() for a, b in zip(outs[0], o)) for o in outs[1:]]
            print(os.environ.get("CUBLAS_WORKSPACE_CONFIG"), B, name, "repeat diffs", diffs, flush=True)
    print("equivalent:", [check_equivalence(model, fast, [step]).ok for _ in range(3)], flush=True)
