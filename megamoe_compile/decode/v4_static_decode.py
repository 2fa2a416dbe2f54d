"""Fixed-shape decode forwards for Hugging Face DeepSeek-V4 attention, over `DeepseekV4StaticCache`.

    mc.enable_static_decode(model)                          # installs them (reversible: disable_static_decode)
    model.generation_config.compile_config = CompileConfig(backend="megamoe", fullgraph=True)
    cache = mc.DeepseekV4StaticCache(model.config, max_batch_size=8, max_cache_len=4096,
                                     device=model.device, dtype=model.dtype)
    out = model.generate(input_ids, cache=cache, max_new_tokens=256)  # or past_key_values=cache

Each `DeepseekV4Attention` gets a forward that, for a one-token step over a `DeepseekV4StaticCache`,
computes what transformers' V4 attention, compressors and indexer compute on their dynamic cache,
with fixed shapes and no data-dependent Python control flow:

* sliding window: the token goes into ring slot position % sliding_window; attention reads all
  slots with transformers' sliding-window mask moved onto the slots;
* compressors (HCA, CSA and the CSA indexer's): the token goes into pending-window slot
  `pending_count`; the window's compressed entry is computed every step and written into pool
  slot `entry_count` only where the window closes (`torch.where`), as is CSA's overlap state;
* attention reads the whole pool with an additive mask from the entry count (HCA: every entry so
  far, as transformers' one-token path; CSA: the indexer's picks);
* the indexer scores the whole pool, masks slots that are not entries yet or that the query may not
  see (transformers' `(position + 1) // compress_rate` threshold), takes top-k over
  min(index_topk, pool capacity) slots, and returns transformers' -1 for invalid picks.

Everything else (prefill, any other cache, any step of more than one token) runs transformers'
own forward; prefill fills the static cache through the calls that code makes on its cache.
One difference remains: where index scores tie exactly at the top-k boundary, top-k over the pool
may pick another of the tied entries than top-k over transformers' shorter entry list (torch's
top-k order among ties depends on the length, so it cannot be reproduced with fixed shapes). Ties
are exact zeros: the score is sum_h w_h * ReLU(q_h . k), 0 wherever every head's dot product is
<= 0. Measured (`benchmarks/indexer_ties.py`: random tiny models, top-3, 768 decode cases each) at
the k-th/(k+1)-th boundary: 34% of cases with 1 index head, 15% with 2, 1.6% with 4, none with 16
or 64 (V4-Flash has 64). Models with few index heads should expect it; generate() output then
differs from transformers' from that step on (both are valid top-k choices).
"""

from __future__ import annotations

import warnings

import torch

from .. import models
from .v4_static_cache import (
    HCA,
    UNSUPPORTED_GENERATE,
    CompressorState,
    DeepseekV4StaticCache,
    DeepseekV4StaticLayer,
    cache_geometry,
)

_ENABLED = "_megamoe_static_decode"
# transformers' modeling_deepseek_v4, resolved by enable_static_decode: the traced forwards read it
# as a global (dynamo cannot trace an import of transformers' lazy modules on every torch release).
_V4 = None
# transformers' collector of recorded outputs (output_attentions=...), resolved alike.
_COLLECTOR = None


def _output_collector():
    try:
        from transformers.utils import output_capturing
    except ImportError:  # a release without it records outputs otherwise; generate() still refuses the flag
        return None
    return getattr(output_capturing, "_active_collector", None)


def enable_static_decode(model: torch.nn.Module) -> torch.nn.Module:
    """Install fixed-shape decode forwards on every V4 attention module of `model` (in place,
    idempotent) and mark the model as fullgraph-compilable, so that `generate()` with a
    `DeepseekV4StaticCache` and `generation_config.compile_config` compiles one decode step.
    Forwards over other caches are unchanged. Also wraps the model's `generate` (refuses what the
    static cache cannot serve before anything runs; takes the cache as `cache=` or
    `past_key_values=` on transformers 5.23 and 5.24) and `prepare_inputs_for_generation` (one
    device-to-host read of the cache length a step). Returns `model`.

    transformers' generate() compiles `model.__call__` itself (`get_compiled_call`) on CUDA, or on
    any device with `compile_config._compile_all_devices = True`; its prefill stays eager."""
    m = models.deepseek_v4.v4_classes()
    attentions = [] if m is None else [mod for mod in model.modules() if isinstance(mod, m.DeepseekV4Attention)]
    if not attentions:
        raise TypeError(f"enable_static_decode: {type(model).__name__} is not a Hugging Face DeepSeek-V4 model "
                        "(no DeepseekV4Attention module)")
    if getattr(model, _ENABLED, False):
        return model
    missing = sorted({f"{type(mod).__name__}.{name}" for attention in attentions
                      for mod, names in _modules_used(attention) for name in names if not hasattr(mod, name)})
    if missing:
        import transformers

        raise TypeError(f"enable_static_decode: transformers {transformers.__version__}'s DeepSeek-V4 attention "
                        f"lacks what the decode forwards use ({', '.join(missing)}); tested with "
                        f"{models.tested_range_text()}")
    if models.untested_transformers():
        warnings.warn(f"enable_static_decode: {models.untested_transformers()}; its decode forwards replicate the V4 "
                      f"attention code of {models.tested_range_text()}", stacklevel=2)
    global _V4, _COLLECTOR
    _V4, _COLLECTOR = m, _output_collector()
    for attention in attentions:
        attention.forward = StaticDecodeForward(attention)
    restore = {"had_flag": "_can_compile_fullgraph" in vars(model), "flag": vars(model).get("_can_compile_fullgraph")}
    model._can_compile_fullgraph = True
    if hasattr(model, "generate"):
        model.generate = CheckedGenerate(model)
        model.prepare_inputs_for_generation = PrepareInputsReadingLengthOnce(model)
    setattr(model, _ENABLED, restore)
    return model


# What the decode forwards read from transformers' V4 modules (checked when they are installed).
_ATTENTION_USES = ("layer_idx", "head_dim", "rope_layer_type", "q_a_proj", "q_a_norm", "q_b_proj", "q_b_norm",
                   "kv_proj", "kv_norm", "o_a_proj", "o_b_proj", "sinks", "scaling", "sliding_window", "compressor",
                   "config")
_COMPRESSOR_USES = ("kv_proj", "gate_proj", "position_bias", "kv_norm", "rotary_emb", "rope_layer_type")
_INDEXER_USES = _COMPRESSOR_USES + ("q_b_proj", "scorer", "head_dim", "index_topk", "compress_rate")


def _modules_used(attention):
    yield attention, _ATTENTION_USES
    compressor = getattr(attention, "compressor", None)
    if compressor is not None:
        yield compressor, _COMPRESSOR_USES
        if hasattr(compressor, "indexer"):
            yield compressor.indexer, _INDEXER_USES


def disable_static_decode(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable_static_decode`: transformers' forwards, flag and generate() again."""
    restore = getattr(model, _ENABLED, None)
    if not restore:
        return model
    m = models.deepseek_v4.v4_classes()
    for mod in model.modules():
        if isinstance(mod, m.DeepseekV4Attention) and "forward" in vars(mod):
            del mod.forward
    del model._can_compile_fullgraph
    if restore["had_flag"]:
        model._can_compile_fullgraph = restore["flag"]
    for name in ("generate", "prepare_inputs_for_generation"):
        if name in vars(model):
            delattr(model, name)
    delattr(model, _ENABLED)
    if hasattr(model, "_compiled_call"):
        del model._compiled_call  # compiled with the decode forwards: drop it with them
    return model


# -- generate(): early, clear errors ------------------------------------------------------------------

def cache_keyword() -> str:
    """The keyword generate() and the V4 forwards take the cache by: "cache" from transformers 5.24,
    "past_key_values" before (`model(**{cache_keyword(): cache}, ...)` works on both)."""
    from transformers.generation import utils

    return utils.ALL_CACHE_NAMES[0]


class CheckedGenerate:
    """The `generate` enable_static_decode installs: transformers' generate(), after refusing what a
    `DeepseekV4StaticCache` cannot serve. Takes the cache as `cache=` or `past_key_values=` on either
    transformers release. (An object rather than a bound function: enabled models still pickle.)"""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        if isinstance(cache, DeepseekV4StaticCache):
            _check_generate_call(self.model, cache, args, kwargs)
        if cache is not None:
            kwargs[cache_keyword()] = cache
        return type(self.model).generate(self.model, *args, **kwargs)


class PrepareInputsReadingLengthOnce:
    """transformers' prepare_inputs_for_generation (run once a step, outside the compiled step), with
    the static cache's token count read from the device once (`DeepseekV4StaticCache.host_length`)."""

    def __init__(self, model):
        self.model = model
        self.cache_name = cache_keyword()

    def __call__(self, *args, **kwargs):
        cache = kwargs.get(self.cache_name)
        prepare = type(self.model).prepare_inputs_for_generation
        if not isinstance(cache, DeepseekV4StaticCache):
            return prepare(self.model, *args, **kwargs)
        with cache.host_length():
            return prepare(self.model, *args, **kwargs)


def _check_generate_call(model, cache: DeepseekV4StaticCache, args, kwargs) -> None:
    config = kwargs.get("generation_config")
    config = config if config is not None else model.generation_config
    def setting(name):
        return kwargs.get(name, getattr(config, name, None))
    unsupported = []
    if (setting("num_beams") or 1) > 1:
        unsupported.append("beam search (num_beams > 1)")
    if kwargs.get("assistant_model") is not None or setting("prompt_lookup_num_tokens") is not None:
        unsupported.append("assisted / prompt-lookup decoding")
    if (setting("penalty_alpha") or 0) > 0 and (setting("top_k") or 0) > 1:
        unsupported.append("contrastive search")
    if setting("output_attentions"):
        unsupported.append(f"output_attentions ({ATTENTIONS_REFUSED})")
    if unsupported:
        raise NotImplementedError(f"generate() with a DeepseekV4StaticCache does not support {', '.join(unsupported)}; "
                                  f"it serves greedy and sampled decoding (not {UNSUPPORTED_GENERATE})")
    cache.check_model(model.config)
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 2:
        batch = inputs.shape[0] * (setting("num_return_sequences") or 1)
        layer = cache.layers[0]
        if batch > cache.max_batch_size:
            layer.check_batch(batch)
        cache.check_reuse(batch, inputs.shape[1])
        new = kwargs.get("max_new_tokens", config.max_new_tokens)
        total = inputs.shape[1] + new if new is not None else setting("max_length")
        if total is not None and total > cache.max_cache_len:
            raise ValueError(f"DeepseekV4StaticCache: prompt of {inputs.shape[1]} tokens + max_new_tokens={new} "
                             f"(max_length {total}) would pass max_cache_len={cache.max_cache_len}; build the cache "
                             "with a larger max_cache_len")


# -- the decode forwards --------------------------------------------------------------------------------

ATTENTIONS_REFUSED = ("a decode step over a DeepseekV4StaticCache attends over cache slots (window ring, then the "
                      "whole compressed pool), not over transformers' key order and count; run it with transformers' "
                      "own cache for attention weights")


def _recording_attentions() -> bool:
    """Whether transformers is collecting attention weights (`output_attentions=True`) for this forward."""
    found = None if _COLLECTOR is None else _COLLECTOR.get()
    return bool(found) and "attentions" in found


class StaticDecodeForward:
    """The forward enable_static_decode installs on one `DeepseekV4Attention`: `attention_decode` for a
    one-token step over a `DeepseekV4StaticCache`, the class's own forward otherwise. Any forward over
    a `DeepseekV4StaticCache` first checks that the cache was built for this model's geometry."""

    def __init__(self, attention):
        self.attention = attention
        self.cache_name = cache_keyword()  # looked up once: no import inside a traced forward
        self.geometry = cache_geometry(attention.config)

    def __call__(self, hidden_states, position_embeddings, position_ids, attention_mask, *args, **kwargs):
        attention = self.attention
        cache = kwargs.get(self.cache_name)
        if isinstance(cache, DeepseekV4StaticCache) and cache.geometry != self.geometry:
            cache.check_model(attention.config)
        if args or not isinstance(cache, DeepseekV4StaticCache) or hidden_states.shape[1] != 1:
            return type(attention).forward(attention, hidden_states, position_embeddings, position_ids,
                                           attention_mask, *args, **kwargs)
        if _recording_attentions():
            raise NotImplementedError(f"output_attentions=True: {ATTENTIONS_REFUSED}")
        return attention_decode(attention, hidden_states, position_embeddings, position_ids, attention_mask, cache)


def attention_decode(self, hidden_states, position_embeddings, position_ids, attention_mask, cache):
    """`DeepseekV4Attention.forward` for one token per sequence over a `DeepseekV4StaticCache`."""
    m = _V4
    apply_rope = m.apply_rotary_pos_emb
    layer: DeepseekV4StaticLayer = cache.layers[self.layer_idx]
    batch = hidden_states.shape[0]
    layer.check_batch(batch)  # Python: the batch is a static shape (guarded, not a graph branch)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings[self.rope_layer_type]

    q_residual = self.q_a_norm(self.q_a_proj(hidden_states))
    q = self.q_b_proj(q_residual).view(*hidden_shape).transpose(1, 2)
    q = self.q_b_norm(q)
    q = apply_rope(q, cos, sin)
    kv = self.kv_norm(self.kv_proj(hidden_states)).view(*hidden_shape).transpose(1, 2)
    kv = apply_rope(kv, cos, sin)

    if isinstance(attention_mask, dict):
        attention_mask = next(iter(attention_mask.values()))
    keys, mask = layer.decode_window(kv, attention_mask)
    if self.compressor is not None:
        if layer.layer_type == HCA:
            compressed, bias = hca_compressor_decode(self.compressor, hidden_states, layer)
        else:
            compressed, bias = csa_compressor_decode(self.compressor, hidden_states, q_residual, position_ids, layer)
        keys = torch.cat([keys, compressed], dim=2)
        mask = torch.cat([mask, bias.to(mask.dtype)], dim=-1)
    layer.advance()

    attention_interface = m.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                  m.eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self, q, keys, keys, mask, dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling, sliding_window=self.sliding_window, s_aux=self.sinks,
    )
    attn_output = apply_rope(attn_output.transpose(1, 2), cos, -sin).transpose(1, 2)
    grouped = attn_output.reshape(*input_shape, self.config.o_groups, -1)
    grouped = self.o_a_proj(grouped).flatten(2)
    return self.o_b_proj(grouped), attn_weights


def hca_compressor_decode(self, hidden_states, layer: DeepseekV4StaticLayer):
    """`DeepseekV4HCACompressor.forward` for one token: (pool [B, 1, C, D], bias [B, 1, 1, C]).
    One-token steps see every entry emitted so far, as in transformers (no block bias there)."""
    state = layer.compressors["compressor"]
    kv = self.kv_proj(hidden_states)
    gate = self.gate_proj(hidden_states)
    _push_and_close_window(self, state, kv[:, 0], gate[:, 0])
    batch = hidden_states.shape[0]
    pool = state.pool[:batch].unsqueeze(1)
    return pool, _entries_bias(state, batch, pool.dtype)


def csa_compressor_decode(self, hidden_states, q_residual, position_ids, layer: DeepseekV4StaticLayer):
    """`DeepseekV4CSACompressor.forward` for one token: (pool [B, 1, C, D], bias [B, 1, 1, C]) with
    0 at the indexer's valid picks and -inf elsewhere."""
    state = layer.compressors["compressor"]
    kv = self.kv_proj(hidden_states)
    gate = self.gate_proj(hidden_states)
    _push_and_close_window(self, state, kv[:, 0], gate[:, 0])
    top_k_indices = indexer_decode(self.indexer, hidden_states, q_residual, position_ids, layer)  # [B, 1, k]
    batch, capacity = hidden_states.shape[0], state.capacity
    pool = state.pool[:batch].unsqueeze(1)
    valid = top_k_indices >= 0
    safe_indices = torch.where(valid, top_k_indices, torch.full_like(top_k_indices, capacity))
    bias = pool.new_full((batch, 1, 1, capacity + 1), float("-inf"))
    bias.scatter_(-1, safe_indices.unsqueeze(1), 0.0)
    return pool, bias[..., :capacity]


def indexer_decode(self, hidden_states, q_residual, position_ids, layer: DeepseekV4StaticLayer):
    """`DeepseekV4Indexer.forward` for one token: top-k pool slots [B, 1, min(index_topk, C)], -1
    where transformers returns -1 (picks the query may not see) or has no entry (fewer entries than k)."""
    m = _V4
    state = layer.compressors["indexer"]
    batch, seq_len, _ = hidden_states.shape
    kv = self.kv_proj(hidden_states)
    gate = self.gate_proj(hidden_states)
    _push_and_close_window(self, state, kv[:, 0], gate[:, 0])
    pool = state.pool[:batch]

    cos_q, sin_q = self.rotary_emb(hidden_states, position_ids=position_ids, layer_type=self.rope_layer_type)
    q = self.q_b_proj(q_residual).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
    q = m.apply_rotary_pos_emb(q, cos_q, sin_q).transpose(1, 2)
    index_scores = self.scorer(q, pool, hidden_states)  # [B, 1, C]

    causal_threshold = (position_ids + 1) // self.compress_rate  # [B, 1]
    slots = torch.arange(state.capacity, device=index_scores.device).view(1, 1, -1)
    hidden = (slots >= causal_threshold.unsqueeze(-1)) | (slots >= state.entry_count)
    index_scores = index_scores.masked_fill(hidden, float("-inf"))
    top_k_indices = index_scores.topk(min(self.index_topk, state.capacity), dim=-1).indices
    invalid = (top_k_indices >= causal_threshold.unsqueeze(-1)) | (top_k_indices >= state.entry_count)
    return torch.where(invalid, torch.full_like(top_k_indices, -1), top_k_indices)


def _push_and_close_window(module, state: CompressorState, kv: torch.Tensor, gate: torch.Tensor) -> None:
    """Append one token's (kv, gate) [B, width] to the pending window; where that closes the window,
    write its compressed entry (transformers' compressor math for one window) into the pool and, for
    CSA, keep its Ca half as the overlap state. Fixed shapes: the entry is computed every step."""
    m = _V4
    batch, rate, head_dim = kv.shape[0], state.rate, state.head_dim
    count = state.pending_count
    closes = count == rate - 1
    state.pending_kv[:batch].index_copy_(1, count.view(1), kv.unsqueeze(1))
    state.pending_gate[:batch].index_copy_(1, count.view(1), gate.unsqueeze(1))

    chunk_kv = state.pending_kv[:batch].unsqueeze(1)  # [B, 1 window, rate, width]
    chunk_gate = state.pending_gate[:batch].unsqueeze(1) + module.position_bias
    if state.overlap:
        # [previous window's Ca | this window's Cb], as transformers lays out window 0 of a call.
        prior_kv = state.overlap_kv[:batch].to(chunk_kv.dtype).unsqueeze(1)
        prior_gate = state.overlap_gate[:batch].to(chunk_gate.dtype).unsqueeze(1)
        new_kv = torch.cat([prior_kv, chunk_kv[..., head_dim:]], dim=2)
        new_gate = torch.cat([prior_gate, chunk_gate[..., head_dim:]], dim=2)
    else:
        new_kv, new_gate = chunk_kv, chunk_gate
    compressed = module.kv_norm((new_kv * new_gate.softmax(dim=2, dtype=torch.float32).to(new_kv.dtype)).sum(dim=2))
    positions = (state.entry_count * rate).view(1, 1).expand(batch, 1)
    cos, sin = module.rotary_emb(compressed, position_ids=positions, layer_type=module.rope_layer_type)
    compressed = m.apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)  # [B, 1, head_dim]

    entry = torch.clamp(state.entry_count, max=state.capacity - 1).view(1)
    pool = state.pool[:batch]
    pool.index_copy_(1, entry, torch.where(closes, compressed.to(pool.dtype), pool.index_select(1, entry)))
    if state.overlap:
        overlap_kv, overlap_gate = state.overlap_kv[:batch], state.overlap_gate[:batch]
        overlap_kv.copy_(torch.where(closes, chunk_kv[:, 0, :, :head_dim], overlap_kv))
        overlap_gate.copy_(torch.where(closes, chunk_gate[:, 0, :, :head_dim].float(), overlap_gate))
    state.entry_count.add_(closes.long())
    state.pending_count.copy_(torch.remainder(count + 1, rate))


def _entries_bias(state: CompressorState, batch: int, dtype: torch.dtype) -> torch.Tensor:
    slots = torch.arange(state.capacity, device=state.pool.device)
    bias = torch.where(slots < state.entry_count, 0.0, float("-inf")).to(dtype)
    return bias.view(1, 1, 1, -1).expand(batch, 1, 1, -1)
