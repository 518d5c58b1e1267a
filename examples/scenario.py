"""A serving scenario, shared by the tests, the demo and check_equivalence: varlen prefills
into random slots, decode and spec-decode steps with random acceptance, chunked-prefill
continuations, sequences retired and their slots reused."""

import random
from dataclasses import dataclass, field

import torch

from layoutpass.examples.lm import ModelConfig


@dataclass(frozen=True)
class Step:
    kind: str  # "prefill", "decode" or "spec"
    inputs: dict[str, torch.Tensor]  # keyword arguments of LM.forward


@dataclass
class _Server:
    cfg: ModelConfig
    rng: random.Random
    device: str | torch.device
    free: list[int] = field(default_factory=list)
    context: dict[int, int] = field(default_factory=dict)  # slot -> tokens so far
    accepted: dict[int, int] = field(default_factory=dict)  # slot -> num_accepted_tokens for its next step

    def ints(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def ids(self, *shape) -> torch.Tensor:
        flat = [self.rng.randrange(self.cfg.vocab) for _ in range(torch.Size(shape).numel())]
        return torch.tensor(flat, device=self.device).view(*shape)

    def prefill(self, slots: list[int], lens: list[int]) -> Step:
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        context = [self.context.get(s, 0) for s in slots]
        for s, n in zip(slots, lens):
            self.context[s] = self.context.get(s, 0) + n
            self.accepted[s] = self.cfg.num_spec + 1
        inputs = dict(input_ids=self.ids(starts[-1]), slots=self.ints(slots), context_lens=self.ints(context),
                      query_start_loc=self.ints(starts))
        return Step("prefill", inputs)

    def decode(self, k: int) -> Step:
        slots = sorted(self.context)
        inputs = dict(input_ids=self.ids(len(slots), k), slots=self.ints(slots),
                      context_lens=self.ints([self.context[s] for s in slots]))
        if self.cfg.num_spec:
            inputs["num_accepted_tokens"] = self.ints([self.accepted[s] for s in slots])
        for s in slots:
            taken = self.rng.randint(1, k)
            self.context[s] += taken
            self.accepted[s] = taken if k > 1 else self.cfg.num_spec + 1
        return Step("spec" if k > 1 else "decode", inputs)

    def admit(self, count: int, max_prompt: int) -> Step:
        slots = [self.free.pop(0) for _ in range(count)]
        return self.prefill(slots, [self.rng.randint(1, max_prompt) for _ in slots])

    def retire(self) -> None:
        slot = self.rng.choice(sorted(self.context))
        del self.context[slot], self.accepted[slot]
        self.free.insert(0, slot)  # the next admission reuses it


def make_scenario(cfg: ModelConfig, *, prefills: int = 3, decode_steps: int = 16, seed: int = 0,
                  max_prompt: int = 12, device: str | torch.device = "cpu") -> list[Step]:
    """Every sequence lives in a slot >= 1 (slot 0 is the null block). With cfg.num_spec > 0
    every other decode step is a spec step of num_spec + 1 tokens."""
    rng = random.Random(seed)
    server = _Server(cfg, rng, device, free=rng.sample(range(1, cfg.num_slots), cfg.num_slots - 1))
    steps = [server.admit(min(prefills, cfg.num_slots - 1), max_prompt)]
    for i in range(decode_steps):
        if i % 5 == 4 and server.context:
            server.retire()
            steps.append(server.admit(1, max_prompt))
        elif i % 7 == 6:
            aligned = [s for s in server.context if server.accepted[s] == cfg.num_spec + 1]
            if aligned:
                steps.append(server.prefill([rng.choice(aligned)], [rng.randint(2, 4)]))
        spec = cfg.num_spec > 0 and i % 2 == 1
        steps.append(server.decode(cfg.num_spec + 1 if spec else 1))
    return steps


def fill_state(model: torch.nn.Module, seed: int = 0) -> None:
    """Random data in all the model's state (buffers, tensor attributes, tensors in lists and
    dicts), so a step that reads or writes the wrong place changes the result; never start a
    comparison from zeros."""
    from layoutpass.state import state_tensors

    gens, seen = {}, set()
    for _, buf in state_tensors(model):  # drawn where the state lives: GBs of GPU state fill in moments
        if id(buf) in seen:
            continue
        seen.add(id(buf))
        gen = gens.setdefault(buf.device, torch.Generator(device=buf.device).manual_seed(seed))
        buf.copy_(torch.randn(buf.shape, generator=gen, dtype=torch.float32, device=buf.device).to(buf))


@torch.no_grad()
def run_scenario(model: torch.nn.Module, steps: list[Step]) -> list[torch.Tensor]:
    """Each step's logits."""
    return [model(**step.inputs) for step in steps]
