"""A fixed-capacity cache for Hugging Face DeepSeek-V4, so that one decode step has fixed shapes.

transformers' own V4 cache layers (`DeepseekV4HCACache`, `DeepseekV4CSACache`) grow by `torch.cat`
and count in Python ints, so a decode step changes shape every token and cannot be captured in a
CUDA graph. `DeepseekV4StaticCache` holds the same state in tensors allocated once:

* per layer, the sliding-window K=V ring (`sliding_window` slots; token at position p in slot
  p % sliding_window) and the count of tokens seen;
* per compressor (the layer's own, and for CSA layers its indexer's): the pending window (up to
  `compress_rate` projected tokens and their gates) with its fill count, the pool of compressed
  entries (ceil(max_cache_len / compress_rate) slots) with the entry count, and for CSA the
  overlap state (the last closed window's Ca half, "no window yet" being kv 0 / gate -inf, which
  is what transformers puts there before the first window).

Prefill runs transformers' own attention code (eager, any length): this cache answers the calls
that code makes on `DeepseekV4HCACache`/`DeepseekV4CSACache` (`update`, `store_compression_weights`,
`update_compressor_states`, `update_overlap_state`) with what those return, writing into the fixed
buffers. A decode step (one token per sequence) runs the forwards of `v4_static_decode`, which read
and write these buffers by masked, fixed-shape writes. Counters are tensors; the host reads them
(`get_seq_length`, `get_mask_sizes`: one small device-to-host copy each) only outside the compiled
step, where `generate()` builds masks.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
# The config fields a cache's buffers are shaped by, checked against the model it serves (a cache
# built from another DeepSeek-V4 config would otherwise index, mask or reshape with the wrong sizes).
GEOMETRY_FIELDS = ("num_hidden_layers", "layer_types", "sliding_window", "head_dim", "index_head_dim",
                   "compress_rates")
UNSUPPORTED_GENERATE = ("beam search (num_beams > 1), assisted / prompt-lookup decoding, contrastive search and "
                        "anything else that reorders, repeats or crops the cache")


class CompressorState:
    """One compressor's running state: pending window, compressed-entry pool, CSA overlap."""

    def __init__(self, *, rate: int, width: int, head_dim: int, overlap: bool, capacity: int,
                 batch: int, dtype: torch.dtype, device: torch.device):
        self.rate, self.head_dim, self.overlap, self.capacity = rate, head_dim, overlap, capacity
        # `width` is what the compressor's kv_proj/gate_proj produce per token: head_dim, or 2 * head_dim
        # for the two overlapping series (Ca, Cb) of CSA.
        self.pending_kv = torch.zeros(batch, rate, width, dtype=dtype, device=device)
        self.pending_gate = torch.zeros(batch, rate, width, dtype=dtype, device=device)
        self.pending_count = torch.zeros((), dtype=torch.long, device=device)
        self.pool = torch.zeros(batch, capacity, head_dim, dtype=dtype, device=device)
        self.entry_count = torch.zeros((), dtype=torch.long, device=device)
        if overlap:
            self.overlap_kv = torch.zeros(batch, rate, head_dim, dtype=dtype, device=device)
            # float32 holds both what transformers 5.24 (float32 position_bias) and 5.23 (model dtype) store.
            self.overlap_gate = torch.full((batch, rate, head_dim), float("-inf"), dtype=torch.float32, device=device)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.pending_kv, self.pending_gate, self.pending_count, self.pool, self.entry_count]
        return out + ([self.overlap_kv, self.overlap_gate] if self.overlap else [])

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()
        if self.overlap:
            self.overlap_gate.fill_(float("-inf"))


def cache_geometry(config) -> tuple:
    """The values of GEOMETRY_FIELDS a cache for `config` is built with (only what its layers use:
    the indexer's head_dim and a compress rate only where a layer type needs it)."""
    config = config.get_text_config(decoder=True)
    layers = config.num_hidden_layers
    types = tuple(config.layer_types[:layers])
    rates = tuple((kind, config.compress_rates[kind]) for kind in (HCA, CSA) if kind in types)
    return (layers, types, config.sliding_window, config.head_dim,
            config.index_head_dim if CSA in types else None, rates)


def geometry_mismatch(cache_geometry_: tuple, model_geometry: tuple) -> str:
    """The fields in which two geometries differ, as "field: cache X, model Y; ..." ("" if none)."""
    return "; ".join(f"{name}: cache {mine!r}, model {theirs!r}"
                     for name, mine, theirs in zip(GEOMETRY_FIELDS, cache_geometry_, model_geometry) if mine != theirs)


class DeepseekV4StaticLayer(CacheLayerMixin):
    """The static cache of one V4 decoder layer (sliding, HCA or CSA attention)."""

    is_compileable = True
    is_sliding = True  # every V4 layer attends over its sliding window (the mask transformers builds)
    is_croppable = False
    supports_early_init = False  # allocated at construction

    def __init__(self, config, layer_type: str, *, max_batch_size: int, max_cache_len: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.layer_type = layer_type
        self.sliding_window = config.sliding_window
        self.max_batch_size, self.max_cache_len = max_batch_size, max_cache_len
        self.dtype, self.device = dtype, device
        self.batch_size = None  # set by the first forward (prefill) after a reset
        self.host_seen: int | None = None  # see DeepseekV4StaticCache.host_length
        self.keys = torch.zeros(max_batch_size, 1, self.sliding_window, config.head_dim, dtype=dtype, device=device)
        self.values = self.keys  # K = V in V4 (shared-KV MQA)
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        self.compressors: dict[str, CompressorState] = {}
        common = dict(batch=max_batch_size, dtype=dtype, device=device)
        if layer_type == HCA:
            rate = config.compress_rates[HCA]
            self.compressors["compressor"] = CompressorState(
                rate=rate, width=config.head_dim, head_dim=config.head_dim, overlap=False,
                capacity=math.ceil(max_cache_len / rate), **common)
        elif layer_type == CSA:
            rate = config.compress_rates[CSA]
            capacity = math.ceil(max_cache_len / rate)
            self.compressors["compressor"] = CompressorState(
                rate=rate, width=2 * config.head_dim, head_dim=config.head_dim, overlap=True, capacity=capacity,
                **common)
            self.compressors["indexer"] = CompressorState(
                rate=rate, width=2 * config.index_head_dim, head_dim=config.index_head_dim, overlap=True,
                capacity=capacity, **common)
        elif layer_type != SLIDING:
            raise ValueError(f"DeepseekV4StaticCache: unknown DeepSeek-V4 layer type {layer_type!r}")
        self.is_initialized = True
        if not torch.compiler.is_compiling():
            for t in self.tensors():
                torch._dynamo.mark_static_address(t)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.keys, self.seen]
        for state in self.compressors.values():
            out += state.tensors()
        return out

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated in __init__
        return None

    # -- host-side queries (outside the compiled step) --------------------------------------------

    def get_seq_length(self) -> int:
        """Tokens cached: a device-to-host copy, unless a `host_length` snapshot is in force."""
        return self.host_seen if self.host_seen is not None else int(self.seen)

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """transformers' sliding-window mask geometry. A decode step (query_length 1) always sees
        `sliding_window` key slots (those not yet written are masked by causality); a longer forward
        sees what transformers' dynamic V4 layer returns: the last sliding_window - 1 tokens + new."""
        seen = self.get_seq_length()
        self.check_room(seen, query_length)
        kv_offset = max(seen - self.sliding_window + 1, 0)
        if query_length == 1:
            return self.sliding_window, kv_offset
        return min(seen, self.sliding_window - 1) + query_length, kv_offset

    def check_room(self, seen: int, new: int) -> None:
        if seen + new > self.max_cache_len:
            raise ValueError(
                f"DeepseekV4StaticCache: {seen} cached tokens + {new} new would pass "
                f"max_cache_len={self.max_cache_len}; "
                "build the cache with max_cache_len >= prompt length + max_new_tokens (or call cache.reset() "
                "before a new prompt)")

    def check_batch(self, batch: int) -> None:
        if batch > self.max_batch_size:
            raise ValueError(
                f"DeepseekV4StaticCache: batch {batch} is above max_batch_size={self.max_batch_size} (generate() "
                "multiplies the batch by num_return_sequences); build the cache with a larger max_batch_size")
        if self.batch_size is None:
            self.batch_size = batch
        elif batch != self.batch_size:
            raise ValueError(
                f"DeepseekV4StaticCache: this cache holds a batch of {self.batch_size} sequences, got {batch}; "
                "call cache.reset() before a new batch")

    # -- prefill: the calls transformers' V4 attention makes on DeepseekV4HCACache/CSACache ---------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Like `DeepseekV4HCACache.update`: returns the last sliding_window - 1 cached tokens followed by
        the new ones, and keeps the last sliding_window tokens in the ring."""
        batch, new = key_states.shape[0], key_states.shape[-2]
        if new == 1:  # enable_static_decode routes every one-token step to its own forward
            raise RuntimeError("DeepseekV4StaticCache: a one-token step reached transformers' V4 attention; call "
                               "megamoe_compile.enable_static_decode(model) first (its decode forwards use this cache)")
        self.check_batch(batch)
        seen = self.get_seq_length()
        self.check_room(seen, new)
        self._check_dtype(key_states, "the attention's kv")
        window = self.sliding_window
        kept = min(seen, window - 1)
        ring = self.keys[:batch]
        full = key_states
        if kept:
            old = ring[:, :, torch.arange(seen - kept, seen, device=self.device) % window]
            full = torch.cat([old, key_states], dim=-2)
        last = min(new, window)
        slots = torch.arange(seen + new - last, seen + new, device=self.device) % window
        ring[:, :, slots] = key_states[:, :, new - last:]
        self.seen.add_(new)
        return full, full

    def store_compression_weights(self, name: str, kv: torch.Tensor, gate: torch.Tensor):
        """Like `DeepseekV4HCACache.store_compression_weights`: (window-aligned chunk, its gates,
        absolute position of its first token); the remainder becomes the pending window."""
        state = self.compressors[name]
        self._check_dtype(kv, f"the {name}'s kv_proj output")
        self._check_dtype(gate, f"the {name}'s gate_proj output")
        batch, rate = kv.shape[0], state.rate
        pending, first_window_position = int(state.pending_count), int(state.entry_count) * rate
        if pending:
            kv = torch.cat([state.pending_kv[:batch, :pending], kv], dim=1)
            gate = torch.cat([state.pending_gate[:batch, :pending], gate], dim=1)
        usable = (kv.shape[1] // rate) * rate
        left = kv.shape[1] - usable
        state.pending_kv[:batch, :left] = kv[:, usable:]
        state.pending_gate[:batch, :left] = gate[:, usable:]
        state.pending_count.fill_(left)
        return kv[:, :usable], gate[:, :usable], first_window_position

    def update_compressor_states(self, name: str, compressed: torch.Tensor) -> torch.Tensor:
        """Like `DeepseekV4HCACache.update_compressor_states`: appends to the pool, returns all entries."""
        state = self.compressors[name]
        batch, new = compressed.shape[:2]
        entries = int(state.entry_count)
        if entries + new > state.capacity:  # cannot happen within max_cache_len; a guard against misuse
            raise ValueError(f"DeepseekV4StaticCache: {name} pool of {state.capacity} entries is full")
        if new:
            state.pool[:batch, entries:entries + new] = compressed
            state.entry_count.add_(new)
        return state.pool[:batch, :entries + new]

    def update_overlap_state(self, name: str, chunk_kv: torch.Tensor, chunk_gate: torch.Tensor, head_dim: int):
        """Like `DeepseekV4CSACache.update_overlap_state`: the previous call's last-window Ca half
        (None before the first window closed), and keeps this call's."""
        state = self.compressors[name]
        batch = chunk_kv.shape[0]
        prior = (None, None)
        if int(state.entry_count) > 0:  # a window closed before: transformers then holds an overlap
            # Copies: the state is overwritten below (`.to` of a float32 gate would alias it).
            prior = (state.overlap_kv[:batch].clone(), state.overlap_gate[:batch].to(chunk_gate.dtype, copy=True))
        state.overlap_kv[:batch] = chunk_kv[:, -1, :, :head_dim]
        state.overlap_gate[:batch] = chunk_gate[:, -1, :, :head_dim]
        return prior

    # -- decode: fixed-shape reads and masked writes (see v4_static_decode) -------------------------

    def decode_window(self, kv: torch.Tensor, attention_mask: torch.Tensor | None):
        """Write one token's kv ([B, 1, 1, D]) into the ring; return the ring ([B, 1, W, D]) and its
        additive mask ([B, 1, 1, W]): transformers' mask over positions [kv_offset, kv_offset + W)
        (see `get_mask_sizes`), moved to the slots that hold those positions."""
        batch, window = kv.shape[0], self.sliding_window
        ring = self.keys[:batch]
        ring.index_copy_(2, torch.remainder(self.seen, window).view(1), kv)
        slots = torch.arange(window, device=kv.device)
        if attention_mask is None:
            seen_after = self.seen + 1  # causal only: the slots written so far
            mask = torch.where(slots < seen_after, 0.0, float("-inf")).to(kv.dtype)
            return ring, mask.view(1, 1, 1, window).expand(batch, 1, 1, window)
        if attention_mask.shape[-1] != window or attention_mask.shape[-2] != 1:
            raise ValueError(f"DeepseekV4StaticCache: a decode step needs the [B, 1, 1, {window}] mask that "
                             f"generate() builds from this cache, got {tuple(attention_mask.shape)}")
        kv_offset = torch.clamp(self.seen - window + 1, min=0)
        position_index = torch.remainder(slots - kv_offset, window)  # slot s holds position kv_offset + index
        mask = attention_mask.index_select(-1, position_index)
        return ring, mask.expand(batch, 1, 1, window)

    def advance(self) -> None:
        """One decode token is in: count it (after all of the layer's reads of `seen`)."""
        self.seen.add_(1)

    def _check_dtype(self, tensor: torch.Tensor, what: str) -> None:
        if tensor.device != self.keys.device:
            raise ValueError(f"DeepseekV4StaticCache was built on {self.keys.device}, but {what} is on "
                             f"{tensor.device}; build it with device=model.device")
        if tensor.dtype != self.dtype:
            raise ValueError(f"DeepseekV4StaticCache was built with dtype={self.dtype}, but {what} is {tensor.dtype}; "
                             "build it with dtype=model.dtype")

    # -- what the cache cannot do --------------------------------------------------------------------

    def reset(self) -> None:
        """Empty, in place (the buffers keep their addresses, which captured CUDA graphs read)."""
        self.keys.zero_()
        self.seen.zero_()
        for state in self.compressors.values():
            state.reset()
        self.batch_size = None

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError(f"DeepseekV4StaticCache does not support {UNSUPPORTED_GENERATE}")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"DeepseekV4StaticCache does not support {UNSUPPORTED_GENERATE}")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(f"DeepseekV4StaticCache does not support {UNSUPPORTED_GENERATE}")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError(f"DeepseekV4StaticCache does not support {UNSUPPORTED_GENERATE}")

    def offload(self):
        raise NotImplementedError("DeepseekV4StaticCache does not support offloading")

    def prefetch(self):
        return None


class DeepseekV4StaticCache(Cache):
    """Fixed-capacity cache for `DeepseekV4ForCausalLM`, for CUDA-graph decode (see module doc).

        cache = DeepseekV4StaticCache(model.config, max_batch_size=8, max_cache_len=4096,
                                      device="cuda", dtype=torch.bfloat16)

    `max_cache_len` bounds prompt + generated tokens per sequence; `max_batch_size` the batch (any
    batch up to it; the first forward after a reset fixes it). Memory per layer:
    max_batch_size x (sliding_window + compressed pools) x head_dim. Call `reset()` before reusing it
    for a new prompt (generate() continues from what a passed cache holds, as with StaticCache).
    """

    def __init__(self, config, max_batch_size: int, max_cache_len: int, device=None, dtype=None, **kwargs):
        if getattr(config, "model_type", None) != "deepseek_v4":
            raise TypeError(f"DeepseekV4StaticCache needs a DeepSeek-V4 config (model_type 'deepseek_v4'), got "
                            f"{type(config).__name__} (model_type {getattr(config, 'model_type', None)!r})")
        if max_batch_size < 1 or max_cache_len < 1:
            raise ValueError(f"DeepseekV4StaticCache: max_batch_size ({max_batch_size}) and max_cache_len "
                             f"({max_cache_len}) must be positive")
        if kwargs:
            raise TypeError(f"DeepseekV4StaticCache: unexpected arguments {sorted(kwargs)}")
        config = config.get_text_config(decoder=True)
        self.geometry = cache_geometry(config)
        device = torch.device(device if device is not None else "cpu")
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.max_batch_size, self.max_cache_len = max_batch_size, max_cache_len
        layers = [DeepseekV4StaticLayer(config, layer_type, max_batch_size=max_batch_size, max_cache_len=max_cache_len,
                                        dtype=dtype, device=device)
                  for layer_type in config.layer_types[: config.num_hidden_layers]]
        super().__init__(layers=layers)

    def check_model(self, config) -> None:
        """Refuse to serve a model whose config shapes the cache otherwise than the config it was built
        from (names each differing field)."""
        model = cache_geometry(config)
        if model != self.geometry:
            raise ValueError(
                "DeepseekV4StaticCache: this cache was built from another DeepSeek-V4 config than the model's ("
                f"{geometry_mismatch(self.geometry, model)}); build it from the model's own config: "
                "DeepseekV4StaticCache(model.config, ...)")

    def check_reuse(self, batch: int, prompt_length: int) -> None:
        """Refuse a generate() call that does not continue what the cache holds: generate() treats the
        first `seen` prompt tokens as cached, so a shorter prompt or another batch needs `cache.reset()`."""
        seen = self.layers[0].get_seq_length()
        if seen == 0:
            return
        if batch != self.batch_size:
            raise ValueError(f"DeepseekV4StaticCache: this cache holds {self.batch_size} sequences of an earlier call "
                             f"({seen} tokens each), got a batch of {batch}; call cache.reset() before a new batch")
        if prompt_length <= seen:
            raise ValueError(f"DeepseekV4StaticCache: this cache holds {seen} tokens of an earlier call; a prompt of "
                             f"{prompt_length} tokens does not continue it (generate() would take its first {seen} "
                             "tokens as cached); call cache.reset() before a new prompt")

    @property
    def batch_size(self) -> int:
        size = self.layers[0].batch_size
        return -1 if size is None else size

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    @contextlib.contextmanager
    def host_length(self):
        """Within it, the host reads the token count once, not once per query: generate() asks for
        sizes six times while it builds one step's masks (enable_static_decode wraps that in this)."""
        seen = int(self.layers[0].seen)  # every forward advances every layer alike
        for layer in self.layers:
            layer.host_seen = seen
        try:
            yield seen
        finally:
            for layer in self.layers:
                layer.host_seen = None
