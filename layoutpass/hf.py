"""Hugging Face transformers models as layoutpass models: every cache tensor owned as a module
buffer.

transformers keeps a model's states in a cache object passed to `forward`, which torch.export
cannot take as an input and which no pass can find as a pool. `CacheAsBuffers` registers every
tensor the cache would allocate (conv and recurrent states, attention keys and values, indexer
keys; RecurrentGemma's module-held states) as a buffer of fixed batch and builds, on every call,
a cache whose layers point at them: transformers' own pure-torch code then reads and writes the
buffers in place, and export sees buffer mutations. Attention layers are held the way
transformers' StaticCache holds them (keys at their absolute positions, `max_len` of them);
sliding windows keep the whole history too and the window is the mask's, so no Python-side
counter decides a branch. The position where a call's tokens start is an input tensor.
Conv states are (batch, channels, kernel): DS pools whose slot is the batch row."""

import inspect
import random

import torch
from torch import nn

from .errors import ArgumentError

# transformers 5.24's model classes whose cache holds a causal-conv state (RecurrentGemma: its modules)
CLASSES = ("Mamba", "Mamba2", "FalconMamba", "Bamba", "Zamba", "Zamba2", "NemotronH", "Jamba", "GraniteMoeHybrid",
           "FalconH1", "Lfm2", "Lfm2Moe", "Lfm3", "Qwen3Next", "Qwen3_5", "Qwen3_5Moe", "Qwen4Exp", "KimiLinear",
           "BailingHybrid", "LaraMini", "OlmoHybrid", "Glm5Next", "Inkling", "Inkling2", "Inkling2Loop", "Zaya",
           "RecurrentGemma")

# transformers' cache layer kinds (config.layer_types, as its caches read them) this adapter holds
KINDS = ("conv", "linear_attention", "full_attention", "sliding_attention", "chunked_attention", "hybrid",
         "hybrid_sliding", "indexed_attention", "dummy")


class CacheAsBuffers(nn.Module):
    """`model` (a transformers causal LM whose cache holds conv/recurrent states, attention
    layers or both) for `batch_size` sequences of at most `max_len` tokens each (prompt and
    generated; only attention layers store per-token state).

    forward(input_ids (batch_size, tokens), position=None) -> logits (batch_size, tokens, vocab):
    continue every sequence by `tokens` tokens starting at `position` (a 0-d integer tensor: the
    tokens seen so far), or with position=None start them anew (every buffer zeroed, then
    transformers' own prefill path, as in a fresh cache)."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int = 512):
        super().__init__()
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise ArgumentError("model", f"expected a transformers model, got {type(model).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ArgumentError("batch_size", f"expected a positive int, got {batch_size!r}")
        if not isinstance(max_len, int) or max_len < 2:
            raise ArgumentError("max_len", f"expected an int >= 2, got {max_len!r}")
        self.model, self.max_len = model, max_len
        _check_kinds(model)
        # transformers' Mamba scans in parallel (associative_scan) under torch.compile, sequentially in
        # eager: the sequential scan is what its generate() computes and what the pass can read
        for holder in (model.config, model.config.get_text_config(decoder=True), *model.modules()):
            if getattr(holder, "use_associative_scan", False):
                holder.use_associative_scan = False
        device = next(model.parameters()).device
        template = _new_cache(model, max_len)
        with torch.no_grad():  # a prompt then a step size every state the way transformers allocates it
            model(input_ids=torch.zeros(batch_size, 2, dtype=torch.long, device=device), cache=template, use_cache=True)
            primed = [dict(getattr(layer, "has_previous_state", {})) for layer in template.layers]
            model(input_ids=torch.zeros(batch_size, 1, dtype=torch.long, device=device), cache=template, use_cache=True)
        self._template, self._primed, self._device = template, primed, device
        # every attribute each layer holds, listed here (outside the traced forward) for _bind's copy
        self._attributes = [tuple(vars(layer)) for layer in template.layers]
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self._layers = [self._own_layer(i, layer) for i, layer in enumerate(template.layers)]
        self._blocks = [(i, m) for i, m in enumerate(_decoder_layers(model)) if _holds_state(m)]
        for i, block in self._blocks:
            self.register_buffer(f"conv_state_{i}", block.conv1d_state.detach().clone().zero_())
            self.register_buffer(f"recurrent_state_{i}", block.rg_lru.recurrent_states.detach().clone().zero_())
            block.conv1d_state = block.rg_lru.recurrent_states = None
        if not list(self.buffers(recurse=False)):
            raise ArgumentError("model", f"{type(model).__name__} keeps no state between calls")
        self.layoutpass_pools = _recurrent_axes(model, dict(self.named_buffers(recurse=False)))

    def _own_layer(self, i: int, layer) -> dict[str, str]:
        """Register layer i's tensors as buffers; attribute -> buffer name."""
        from transformers.cache_utils import DummyLayer, LinearAttentionCacheLayerMixin, StaticIndexedLayer, StaticLayer

        names, known = {}, set()
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            known |= {"conv_states", "recurrent_states"}
            for s in range(layer.number_of_states):
                suffix = f"{i}" if s == 0 else f"{i}_{s}"
                for kind, states in (("conv", layer.conv_states), ("recurrent", layer.recurrent_states)):
                    if states[s] is not None:
                        names[f"{kind}_states.{s}"] = f"{kind}_state_{suffix}"
        if isinstance(layer, StaticLayer):
            known |= {"keys", "values", "cumulative_length"}
            names.update(keys=f"keys_{i}", values=f"values_{i}")
        if isinstance(layer, StaticIndexedLayer):
            known |= {"indexer_keys", "indexer_cumulative_length", "indexer_position_ids"}
            if layer.is_indexer_initialized:
                names["indexer_keys"] = f"indexer_keys_{i}"
        if isinstance(layer, DummyLayer):
            known |= {"keys", "values"}
        unknown = [k for k, v in vars(layer).items() if k not in known and _holds_tensors(v)]
        if unknown:
            raise ArgumentError("model", f"{type(self.model).__name__}: cache layer {i} ({type(layer).__name__}) "
                                         f"holds {unknown}, which this adapter does not know how to keep")
        for attribute, name in names.items():
            self.register_buffer(name, torch.zeros_like(_get(layer, attribute)))
        return names

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor | None = None) -> torch.Tensor:
        if position is None:
            for buf in self.buffers(recurse=False):  # the states only, not the model's own buffers
                buf.zero_()
            start = torch.zeros((), dtype=torch.long, device=self._device)
        elif not isinstance(position, torch.Tensor) or position.dim() != 0 or position.dtype.is_floating_point:
            raise ArgumentError("position", f"expected a 0-d integer tensor (tokens seen so far) or None, got "
                                            f"{position!r}")
        else:
            start = position.to(device=self._device, dtype=torch.long)
        cache = self._bind(start, fresh=position is None)
        for i, block in self._blocks:
            block.conv1d_state = self.get_buffer(f"conv_state_{i}")
            block.rg_lru.recurrent_states = self.get_buffer(f"recurrent_state_{i}")
        positions = {}
        if self._takes_positions:  # as generate() gives them: some models count from 0 without
            steps = torch.arange(input_ids.shape[1], device=start.device)
            positions["position_ids"] = (start + steps).expand(input_ids.shape[0], -1)
        logits = self.model(input_ids=input_ids, cache=cache, use_cache=True, **positions).logits
        for i, block in self._blocks:  # the block replaced its states: keep them in the buffers
            self.get_buffer(f"conv_state_{i}").copy_(block.conv1d_state)
            self.get_buffer(f"recurrent_state_{i}").copy_(block.rg_lru.recurrent_states)
            block.conv1d_state = block.rg_lru.recurrent_states = None
        return logits

    def _bind(self, start: torch.Tensor, fresh: bool):
        """A cache like the sized one whose tensors are this module's buffers, at `start`."""
        from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin, StaticIndexedLayer, StaticLayer

        layers = []
        for template, attributes, names, primed in zip(self._template.layers, self._attributes, self._layers,
                                                       self._primed):
            # a shallow copy of the template, as copy.copy makes one; written out because torch 2.11's
            # Dynamo skips the standard library's copy module ("function marked as skipped") and the
            # fullgraph capture then fails; 2.13 traces either
            layer = type(template).__new__(type(template))
            for attribute in attributes:
                setattr(layer, attribute, getattr(template, attribute))
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                layer.conv_states, layer.recurrent_states = dict(layer.conv_states), dict(layer.recurrent_states)
                layer.has_previous_state = {s: not fresh and primed.get(s, False) for s in layer.has_previous_state}
            if isinstance(layer, StaticLayer):
                layer.cumulative_length = start.clone()
            if isinstance(layer, StaticIndexedLayer) and layer.is_indexer_initialized:
                layer.indexer_cumulative_length = start.clone()
                if template.indexer_position_ids is not None:  # positions of every slot, as the keys are held
                    dims, batch = template.indexer_position_ids.shape[:2]
                    layer.indexer_position_ids = torch.arange(self.max_len, device=start.device).expand(dims, batch, -1)
            for attribute, name in names.items():
                _set(layer, attribute, self.get_buffer(name))
            layers.append(layer)
        return Cache(layers=layers)

    def scenario(self, *, prefills: int = 3, decode_steps: int = 16, seed: int = 0, max_prompt: int = 12,
                 device=None) -> list:
        """check_equivalence's default run: fresh prompts, then decode steps (a fresh batch
        every 5th, `prefills` of them at most), each at its position."""
        from layoutpass.examples.scenario import Step

        rng = random.Random(seed)
        device = device or self._device
        vocab = self.model.config.get_text_config(decoder=True).vocab_size

        def ids(n):
            return torch.tensor([[rng.randrange(vocab) for _ in range(n)] for _ in range(self.batch_size)],
                                device=device)

        length = rng.randint(2, max_prompt)
        steps, fresh_left = [Step("prefill", dict(input_ids=ids(length)))], prefills - 1
        for i in range(decode_steps):
            if i % 5 == 4 and fresh_left:
                fresh_left, length = fresh_left - 1, rng.randint(2, max_prompt)
                steps.append(Step("prefill", dict(input_ids=ids(length))))
            steps.append(Step("decode", dict(input_ids=ids(1), position=torch.tensor(length, device=device))))
            length += 1
        return steps

    @property
    def batch_size(self) -> int:
        return next(self.buffers(recurse=False)).shape[0]


def _recurrent_axes(model: nn.Module, buffers: dict[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """The recurrent states' axes, which transformers' pure-torch recurrences do not spell in
    any op the pass could read them from (layoutpass reads this declaration). A Mamba-style state
    ends in d_state: (batch, channels, d_state) or (batch, heads, head_dim, d_state); a gated
    delta rule's is (batch, heads, k_dim, v_dim). Other states (rank 2: RecurrentGemma's LRU)
    are no k/v recurrence and are left undeclared."""
    config = model.config.get_text_config(decoder=True)
    d_state = next((getattr(config, a) for a in ("state_size", "mamba_d_state", "ssm_state_size")
                    if isinstance(getattr(config, a, None), int)), None)
    axes = {}
    for name, t in buffers.items():
        if not name.startswith("recurrent_state"):
            continue
        if d_state is not None and t.shape[-1] == d_state and t.dim() in (3, 4):
            axes[name] = ("slot", "v", "k") if t.dim() == 3 else ("slot", "head", "v", "k")
        elif d_state is None and t.dim() == 4:
            axes[name] = ("slot", "head", "k", "v")
    return axes


def _check_kinds(model: nn.Module) -> None:
    """Refuse, by name, a cache layer kind this adapter cannot hold."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    kinds, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    for i, kind in enumerate(kinds):
        if kind not in KINDS:
            raise ArgumentError("model", f"{type(model).__name__}: cache layer {i} is of kind {kind!r}, which this "
                                         f"adapter cannot hold as buffers (it holds {', '.join(KINDS)})")


def _new_cache(model: nn.Module, max_len: int):
    """A cache of static layers for `model`: attention keys at their absolute positions."""
    from transformers.cache_utils import (Cache, DummyLayer, LinearAttentionAndStaticFullAttentionLayer,
                                          LinearAttentionLayer, StaticIndexedLayer, StaticLayer,
                                          get_layer_types_and_kwargs)

    class WindowLayer(StaticLayer):  # the whole history; the sliding mask picks the window
        is_sliding = True

    class HybridWindowLayer(LinearAttentionAndStaticFullAttentionLayer):
        is_sliding = True

    kinds, options = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    layers = []
    for kind, option in zip(kinds, options):
        states = option.get("number_of_states", 1)
        layers.append({"conv": lambda: LinearAttentionLayer(number_of_states=states),
                       "linear_attention": lambda: LinearAttentionLayer(number_of_states=states),
                       "full_attention": lambda: StaticLayer(max_len),
                       "sliding_attention": lambda: WindowLayer(max_len),
                       "chunked_attention": lambda: WindowLayer(max_len),
                       "hybrid": lambda: LinearAttentionAndStaticFullAttentionLayer(max_len, number_of_states=states),
                       "hybrid_sliding": lambda: HybridWindowLayer(max_len, number_of_states=states),
                       "indexed_attention": lambda: StaticIndexedLayer(max_len),
                       "dummy": DummyLayer}[kind]())
    return Cache(layers=layers)


def _holds_tensors(value) -> bool:
    return isinstance(value, torch.Tensor) or (isinstance(value, dict)
                                               and any(isinstance(v, torch.Tensor) for v in value.values()))


def _get(layer, attribute: str) -> torch.Tensor:
    name, _, index = attribute.partition(".")
    return getattr(layer, name)[int(index)] if index else getattr(layer, name)


def _set(layer, attribute: str, value: torch.Tensor) -> None:
    name, _, index = attribute.partition(".")
    if index:
        getattr(layer, name)[int(index)] = value
    else:
        setattr(layer, name, value)


def _decoder_layers(model: nn.Module) -> list:
    base = getattr(model, "model", model)
    return [getattr(layer, "temporal_block", layer) for layer in getattr(base, "layers", [])]


def _holds_state(module: nn.Module) -> bool:
    """RecurrentGemma's recurrent blocks keep their states as module attributes, not in the cache."""
    return hasattr(module, "conv1d_state") and hasattr(getattr(module, "rg_lru", None), "recurrent_states")


def raw_transformers_hint(model: nn.Module) -> str | None:
    """One line for optimize() to say when handed a transformers generative model itself (its
    states live in a cache object passed to forward, which export cannot take); else None."""
    if not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return None
    if not callable(getattr(model, "generate", None)):
        return None
    return (f"{type(model).__name__} keeps its states in a transformers cache passed to forward, which cannot be "
            f"captured: wrap it first, layoutpass.hf.CacheAsBuffers(model, batch_size, max_len=...)")


@torch.no_grad()
def generate(module: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, output_logits: bool = False):
    """Greedy decoding through a CacheAsBuffers (or optimize()'s version of one): the prompt in
    one fresh call, then one token per call at its position. Returns the new tokens
    (batch, max_new_tokens), and with output_logits the logits each token was picked from
    (batch, max_new_tokens, vocab)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ArgumentError("input_ids", "expected integer token ids of shape (batch, prompt_length)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ArgumentError("max_new_tokens", f"expected a positive int, got {max_new_tokens!r}")
    limit = getattr(module, "max_len", None)  # an optimized CacheAsBuffers is one too
    if limit is not None and input_ids.shape[1] + max_new_tokens - 1 > limit:
        raise ArgumentError("max_new_tokens", f"prompt ({input_ids.shape[1]}) + {max_new_tokens} new tokens exceed "
                                              f"the adapter's max_len ({limit})")
    logits = module(input_ids)[:, -1]
    steps = [logits]
    for n in range(input_ids.shape[1], input_ids.shape[1] + max_new_tokens - 1):
        token = steps[-1].argmax(-1, keepdim=True)
        steps.append(module(token, torch.tensor(n, device=input_ids.device))[:, -1])
    logits = torch.stack(steps, 1)
    tokens = logits.argmax(-1)
    return (tokens, logits) if output_logits else tokens


def _tiny_configs() -> dict:
    """class name -> (config class, model class, config arguments): a few layers of every kind
    the class has, widths of a few dozen."""
    import transformers as T

    attention = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64)
    mamba2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                  mamba_chunk_size=8)
    linear = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                  linear_num_value_heads=4)
    moe = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    qwen = dict(vocab_size=64, hidden_size=32, **attention, **linear, num_hidden_layers=2,
                layer_types=["linear_attention", "full_attention"])
    mla = dict(**base, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
               layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
               moe_intermediate_size=16, num_experts=4, num_experts_per_token=2, kv_lora_rank=16, qk_rope_head_dim=8,
               v_head_dim=8, qk_nope_head_dim=8, head_dim=8, linear_head_dim=8, linear_num_heads=4)
    inkling = dict(vocab_size=64, hidden_size=32, **attention, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                   swa_head_dim=8, sliding_window_size=4, d_rel=4, rel_extent=8, moe_intermediate_size=16,
                   n_routed_experts=4, num_experts_per_tok=2)
    return {
        "Mamba": (T.MambaConfig, T.MambaForCausalLM, dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                           state_size=8, intermediate_size=64, time_step_rank=4,
                                                           initializer_range=1.0)),
        "Mamba2": (T.Mamba2Config, T.Mamba2ForCausalLM, dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                             state_size=8, num_heads=8, head_dim=8, n_groups=1,
                                                             expand=2, chunk_size=8)),
        "FalconMamba": (T.FalconMambaConfig, T.FalconMambaForCausalLM,
                        dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, intermediate_size=64,
                             time_step_rank=4, initializer_range=1.0)),
        "Bamba": (T.BambaConfig, T.BambaForCausalLM, dict(**base, **attention, num_hidden_layers=3,
                                                          attn_layer_indices=[1], **mamba2)),
        "Zamba": (T.ZambaConfig, T.ZambaForCausalLM,
                  dict(**base, num_hidden_layers=5, attn_layer_period=2, attn_layer_offset=1, num_attention_heads=4,
                       num_key_value_heads=4, attention_hidden_size=64, attention_head_dim=16, n_mamba_heads=2,
                       mamba_d_state=8, mamba_dt_rank=4, initializer_range=0.3)),
        "Zamba2": (T.Zamba2Config, T.Zamba2ForCausalLM,
                   dict(**base, num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "mamba"],
                        num_attention_heads=4, num_key_value_heads=4, n_mamba_heads=4, mamba_d_state=8,
                        mamba_headdim=16, chunk_size=8, adapter_rank=4, initializer_range=0.1)),
        "NemotronH": (T.NemotronHConfig, T.NemotronHForCausalLM,
                      dict(**base, **attention, layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
                           ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, chunk_size=8,
                           n_routed_experts=4, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                           num_experts_per_tok=2)),
        "Jamba": (T.JambaConfig, T.JambaForCausalLM,
                  dict(**base, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, attn_layer_period=2,
                       attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                       num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=4)),
        "GraniteMoeHybrid": (T.GraniteMoeHybridConfig, T.GraniteMoeHybridForCausalLM,
                             dict(**base, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                                  layer_types=["linear_attention", "full_attention", "linear_attention"],
                                  num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32, **mamba2)),
        "FalconH1": (T.FalconH1Config, T.FalconH1ForCausalLM,
                     dict(**base, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, mamba_d_ssm=64,
                          **mamba2)),
        "Lfm2": (T.Lfm2Config, T.Lfm2ForCausalLM,
                 dict(**base, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                      layer_types=["conv", "full_attention", "conv"], block_multiple_of=16, initializer_range=0.3)),
        "Lfm2Moe": (T.Lfm2MoeConfig, T.Lfm2MoeForCausalLM,
                    dict(**base, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                         layer_types=["conv", "full_attention", "conv"], num_dense_layers=1, **moe,
                         initializer_range=0.3)),
        "Lfm3": (T.Lfm3Config, T.Lfm3ForCausalLM,
                 dict(**base, **attention, num_hidden_layers=4, sliding_window=4,
                      layer_types=["conv", "sliding_attention", "conv", "full_attention"])),
        "Qwen3Next": (T.Qwen3NextConfig, T.Qwen3NextForCausalLM,
                      dict(qwen, intermediate_size=64, **moe, shared_expert_intermediate_size=16)),
        "Qwen3_5": (T.Qwen3_5TextConfig, T.Qwen3_5ForCausalLM, dict(qwen, intermediate_size=64)),
        "Qwen3_5Moe": (T.Qwen3_5MoeTextConfig, T.Qwen3_5MoeForCausalLM,
                       dict(qwen, **moe, shared_expert_intermediate_size=16)),
        "Qwen4Exp": (T.Qwen4ExpTextConfig, T.Qwen4ExpForCausalLM,
                     dict(qwen, **moe, shared_expert_intermediate_size=16, indexer_n_heads=2, indexer_kv_heads=1,
                          indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2, ple_layer_ids=[1],
                          ple_embed_dim=32, ngram_vocab_size_base=97, heads_per_ngram=2, split_ngram_parts=1,
                          hc_count=2, hc_lowrank=4, eos_token_id=63)),
        "KimiLinear": (T.KimiLinearConfig, T.KimiLinearForCausalLM, mla),
        "BailingHybrid": (T.BailingHybridConfig, T.BailingHybridForCausalLM,
                          dict(mla, num_expert_group=1, topk_group=1)),
        "LaraMini": (T.LaraMiniConfig, T.LaraMiniForCausalLM,
                     dict(qwen, **moe, shared_expert_intermediate_size=16, num_hidden_layers=3, sliding_window=4,
                          layer_types=["linear_attention", "sliding_attention", "full_attention"],
                          initializer_range=0.3)),
        "OlmoHybrid": (T.OlmoHybridConfig, T.OlmoHybridForCausalLM,
                       dict(**base, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                            layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                            linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=16)),
        "Glm5Next": (T.Glm5NextConfig, T.Glm5NextForConditionalGeneration,
                     dict(text_config=dict(**base, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                                           layer_types=["linear_attention", "indexed_attention"],
                                           mlp_layer_types=["dense", "sparse"], moe_intermediate_size=16,
                                           n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=16,
                                           qk_nope_head_dim=8, v_head_dim=8, index_topk=4, index_head_dim=8,
                                           index_n_heads=2, linear_head_dim=8, linear_num_heads=4, hc_mult=2,
                                           index_kpool=2, pad_token_id=None),
                          vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                             out_hidden_size=32))),
        "Inkling": (T.InklingTextConfig, T.InklingForCausalLM,
                    dict(inkling, intermediate_size=64, num_hidden_layers=2, layer_types=["hybrid_sliding", "hybrid"],
                         mlp_layer_types=["dense", "sparse"], n_shared_experts=1)),
        "Inkling2": (T.Inkling2TextConfig, T.Inkling2ForCausalLM,
                     dict(inkling, unpadded_vocab_size=64, num_hidden_layers=2,
                          layer_types=["hybrid_sliding", "hybrid"],
                          n_layers_per_attn_res_block=1)),
        "Inkling2Loop": (T.Inkling2LoopTextConfig, T.Inkling2LoopForCausalLM,
                         dict(inkling, unpadded_vocab_size=64, num_hidden_layers=4, n_layers_per_attn_res_block=1,
                              layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
                              loop_layer_index_start=1, loop_layer_index_end=3, loop_num_passes=2, loop_gate_rank=4)),
        "Zaya": (T.ZayaConfig, T.ZayaForCausalLM,
                 dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, **attention, moe_intermediate_size=16,
                      num_experts=4, num_experts_per_tok=1, router_hidden_size=16, initializer_range=1.0)),
        "RecurrentGemma": (T.RecurrentGemmaConfig, T.RecurrentGemmaForCausalLM,
                           dict(**base, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                lru_width=32, attention_window_size=4, w_init_variance_scale=1.0)),
    }


def tiny_model(name: str, *, seed: int = 0, device="cpu") -> nn.Module:
    """transformers' `name` model (one of CLASSES) for causal LM, tiny and randomly
    initialized (built from its config, nothing downloaded), in eval mode. It never stops at an
    end-of-sequence token, so its generate() gives every token asked for."""
    configs = _tiny_configs()
    if name not in configs:
        raise ArgumentError("name", f"expected one of {sorted(configs)}, got {name!r}")
    config_class, model_class, options = configs[name]
    options = dict(dict(pad_token_id=None, bos_token_id=None, eos_token_id=None), **options)
    torch.manual_seed(seed)
    model = model_class(config_class(**options)).to(device).eval()
    model.generation_config.eos_token_id = None
    return model


def tiny(name: str = "Mamba2", *, batch_size: int = 4, seed: int = 0, device="cpu",
         max_len: int = 64) -> CacheAsBuffers:
    """tiny_model(name), wrapped for `batch_size` sequences."""
    return CacheAsBuffers(tiny_model(name, seed=seed, device=device), batch_size, max_len)


def tiny_mamba() -> CacheAsBuffers:
    """transformers' Mamba, tiny and random (for `layoutpass check layoutpass.hf:tiny_mamba`)."""
    return tiny("Mamba")


def tiny_mamba2() -> CacheAsBuffers:
    """transformers' Mamba2, tiny and random."""
    return tiny("Mamba2")
