"""A transformers model end to end: wrap it so its cache tensors are buffers
(layoutpass.hf.CacheAsBuffers), optimize it, and decode greedily; the tokens must be those of
transformers' own generate. A tiny random Mamba2ForCausalLM, built from its config (nothing is
downloaded), on the CPU.

    python examples/transformers_model.py      # needs transformers (pip install transformers)
"""

import sys


def main() -> None:
    try:
        import transformers
    except ImportError:
        print("skipped: this example needs transformers (pip install transformers)")
        return
    import torch

    from layoutpass import optimize
    from layoutpass.hf import CacheAsBuffers, generate, tiny_model

    transformers.logging.set_verbosity_error()  # the tiny model runs transformers' pure-torch paths: quiet
    model = tiny_model("Mamba2")
    fast = optimize(CacheAsBuffers(model, batch_size=2, max_len=32), "DS", lower=True)
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = generate(fast, prompt, 8)  # the prompt in one call, then one token per call
    theirs = model.generate(prompt, max_new_tokens=8, do_sample=False)[:, prompt.shape[1]:]
    print(f"transformers {transformers.__version__}, {type(model).__name__}, layoutpass DS:")
    print(f"  layoutpass:   {ours.tolist()}\n  transformers: {theirs.tolist()}")
    print(f"  same tokens: {torch.equal(ours, theirs)}\n")
    print(fast.report)
    sys.exit(0 if torch.equal(ours, theirs) else 1)


if __name__ == "__main__":
    main()
