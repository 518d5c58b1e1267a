import torch, sys
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import e2e
from e2e import build, decode_step, MODELS
from layoutpass import optimize, check_equivalence
from layoutpass.examples.scenario import fill_state
from layoutpass.equivalence import logical_buffers, _load_logical
torch.manual_seed(0)
layers = MODELS["mamba2"][0]
model = build(layers, "2.7b", "cuda", torch.bfloat16, num_slots=257, max_len=512)
fast = optimize(model, "DS")
def detail(tag, B):
    step = decode_step(model.cfg, B, "cuda")
    slots = set(step.inputs["slots"].tolist())
    with torch.no_grad():
        fill_state(model, 0)
        _load_logical(fast, logical_buffers(model))
        a = model(**step.inputs); b = fast(**step.inputs)
        torch.cuda.synchronize()
        lb = logical_buffers(fast)
        bad_names = []
        for name, buf in logical_buffers(model).items():
            d = (buf.float() - lb[name].float()).abs()
            if d.max() > 0:
                per_slot = d.flatten(1).amax(1)
                bad = per_slot.nonzero().flatten().tolist()
                bad_names.append((name, d.max().item(), len(bad), sum(s in slots for s in bad), (d > 0).sum().item()))
        print(tag, B, "logits", (a.float() - b.float()).abs().max().item(), "bad buffers", bad_names[:6], flush=True)
detail("fresh", 64)
detail("fresh", 256)
detail("fresh again", 64)
step1 = decode_step(model.cfg, 1, "cuda")
e2e.bench_case("mamba2", model, fast, step1, "decode B=1", decode=True)
detail("after bench", 64)
detail("after bench", 256)
