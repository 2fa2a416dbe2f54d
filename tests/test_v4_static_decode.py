"""CUDA-graph-ready decode for DeepSeek-V4: `DeepseekV4StaticCache` + `enable_static_decode`.

The oracle is transformers itself: the same weights, generate() in eager mode with its dynamic V4
cache. The model (helpers.decode_model) has tiny windows (sliding 6, CSA every 4 tokens, HCA every
8, index top-3) so that a few decode steps close several CSA and HCA windows, make the indexer drop
entries and wrap the ring. The indexer has 16 heads so that its scores do not tie exactly at the top-k boundary (see
`v4_static_decode`: among exact ties, top-k over the pool may pick another entry than transformers).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import (
    CSA_RATE,
    HCA_RATE,
    LAYER_TYPES,
    TOL,
    WINDOW,
    assert_same_generation,
    compile_config,
    decode_model,
    forward,
    generate,
    prompts,
)
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import megamoe_compile as mc
from megamoe_compile.decode.v4_static_cache import DeepseekV4StaticCache
from megamoe_compile.decode.v4_static_decode import cache_keyword, disable_static_decode, enable_static_decode


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny ops: on a small shared machine more threads only contend (about 5x slower on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    """(transformers' model untouched, the same weights with static decode enabled)."""
    reference = decode_model()
    static = enable_static_decode(copy.deepcopy(reference))
    static.generation_config.compile_config = compile_config()
    return reference, static


@pytest.fixture(autouse=True)
def _fresh_compiled_call(models):
    # conftest resets dynamo around every test; drop generate()'s compiled call with it.
    for model in models:
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
    yield


# Prompt lengths: 1, around the CSA window (rate - 1, rate, rate + 1), past the sliding window and
# around the HCA window; 24 new tokens close 3-4 HCA and 6-9 CSA windows and wrap the ring 4-6 times.
# One cache per batch size, reset between prompts: the decode step compiles once for all of them.
PROMPT_LENGTHS = (1, CSA_RATE - 1, CSA_RATE, CSA_RATE + 1, WINDOW + 1, HCA_RATE, HCA_RATE + 1, 13)


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_static_decode_matches_transformers(models, batch):
    reference, static = models
    cache = DeepseekV4StaticCache(static.config, max_batch_size=4, max_cache_len=48)
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt in PROMPT_LENGTHS:
            ids = prompts(batch, prompt)
            cache.reset()
            got = generate(static, ids, 24, cache=cache)
            assert_same_generation(got, generate(reference, ids, 24))
            assert cache.get_seq_length() == prompt + 24 - 1  # the last token is sampled, never fed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the decode step, fullgraph


def test_the_host_reads_the_length_once_a_step(models, monkeypatch):
    _, static = models
    reads = []
    original = DeepseekV4StaticCache.host_length

    def counted(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(DeepseekV4StaticCache, "host_length", counted)
    calls = []
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t, f=torch.Tensor.__int__: calls.append(1) or f(t))
    counts = []
    for new_tokens in (10, 20):
        calls.clear()
        cache = DeepseekV4StaticCache(static.config, max_batch_size=1, max_cache_len=24)
        generate(static, prompts(1, 3), new_tokens, cache=cache, disable_compile=True)
        counts.append(len(calls))
    assert len(reads) == 10 + 20  # one snapshot a step (prefill and every decode step)
    assert counts[1] - counts[0] == 10  # ten more steps, ten more device-to-host reads: one a step


def test_left_padded_batch_matches_transformers(models):
    reference, static = models
    ids = prompts(3, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids = ids * mask
    expected = generate(reference, ids, 24, attention_mask=mask)
    # Passed as past_key_values: the enabled generate() takes either name on either transformers release.
    got = generate(static, ids, 24, attention_mask=mask,
                   past_key_values=DeepseekV4StaticCache(static.config, max_batch_size=3, max_cache_len=40))
    assert_same_generation(got, expected)


@pytest.mark.parametrize("chunk", [3, 5])
def test_chunked_prefill_then_generate_continues_like_transformers(models, chunk):
    """Prompt fed in chunks (windows close across calls: CSA overlap and pending windows carried over),
    then generate() continues from the filled cache, as a multi-turn chat does."""
    reference, static = models
    ids = prompts(2, 17)
    caches = {"dynamic": DynamicCache(config=reference.config),
              "static": DeepseekV4StaticCache(static.config, max_batch_size=2, max_cache_len=48)}
    outputs = {}
    for (name, cache), model in zip(caches.items(), (reference, static)):
        logits = [forward(model, ids[:, start:min(start + chunk, 16)], cache).logits for start in range(0, 16, chunk)]
        outputs[name] = (torch.cat(logits, dim=1), generate(model, ids, 20, cache=cache))
    torch.testing.assert_close(outputs["static"][0], outputs["dynamic"][0], **TOL)
    assert_same_generation(outputs["static"][1], outputs["dynamic"][1])


def test_generate_with_chunked_prefill(models):
    reference, static = models
    ids = prompts(2, 13)
    got = generate(static, ids, 20, cache=DeepseekV4StaticCache(static.config, max_batch_size=2, max_cache_len=40),
                   prefill_chunk_size=4)
    assert_same_generation(got, generate(reference, ids, 20))


def test_sampling_draws_the_same_tokens(models):
    reference, static = models
    ids = prompts(3, 5)
    torch.manual_seed(0)
    expected = generate(reference, ids, 24, do_sample=True, top_k=0)
    torch.manual_seed(0)
    got = generate(static, ids, 24, do_sample=True, top_k=0,
                   cache=DeepseekV4StaticCache(static.config, max_batch_size=3, max_cache_len=32))
    assert_same_generation(got, expected)


def test_eager_static_decode_matches_transformers(models):
    """Without compile_config the same forwards run eagerly (and a plain loop of model calls)."""
    reference, static = models
    ids = prompts(2, 5)
    expected = generate(reference, ids, 20)
    got = generate(static, ids, 20, cache=DeepseekV4StaticCache(static.config, max_batch_size=2, max_cache_len=32),
                   disable_compile=True)
    assert_same_generation(got, expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_one_compile_over_200_steps_and_cache_reuse(models):
    reference, static = models
    ids = prompts(2, 3)
    expected = generate(reference, ids, 200)
    cache = DeepseekV4StaticCache(static.config, max_batch_size=2, max_cache_len=210)
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = generate(static, ids, 200, cache=cache)
        assert_same_generation(got, expected)
        cache.reset()  # a new prompt in the same cache: same graph, no recompilation
        again = prompts(2, 6, seed=7)
        assert_same_generation(generate(static, again, 30, cache=cache), generate(reference, again, 30))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_megamoe_backend_fuses_the_decode_step():
    reference = decode_model(seed=3)
    static = enable_static_decode(copy.deepcopy(reference))
    mc.prepare(static, mc.MegaMoEConfig())
    ids = prompts(3, 5)
    expected = generate(reference, ids, 24)
    static.generation_config.compile_config = compile_config("megamoe", inner_backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = generate(static, ids, 24, cache=DeepseekV4StaticCache(static.config, max_batch_size=3, max_cache_len=32))
    assert_same_generation(got, expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] == 4  # every MoE layer of the decode step


def test_cache_layout_and_flags(models):
    _, static = models
    cache = DeepseekV4StaticCache(static.config, max_batch_size=2, max_cache_len=30)
    assert cache.is_compileable and len(cache.layers) == 4
    csa, hca, sliding = cache.layers[0], cache.layers[1], cache.layers[2]
    assert csa.keys.shape == (2, 1, WINDOW, 32)
    assert csa.compressors["compressor"].pool.shape == (2, 8, 32)  # ceil(30 / 4)
    assert csa.compressors["indexer"].pool.shape == (2, 8, 8)
    assert csa.compressors["compressor"].overlap and not hca.compressors["compressor"].overlap
    assert hca.compressors["compressor"].pool.shape == (2, 4, 32)  # ceil(30 / 8)
    assert sliding.compressors == {}
    assert static._can_compile_fullgraph is True
    assert cache.get_seq_length() == 0 and cache.get_max_length() == 30


def test_disable_restores_transformers():
    model = decode_model()
    original_flag = model._can_compile_fullgraph
    enable_static_decode(model)
    enable_static_decode(model)  # idempotent
    attention = model.model.layers[0].self_attn
    assert {"generate", "prepare_inputs_for_generation"} <= set(vars(model)) and "forward" in vars(attention)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # enabled models copy and pickle
        twin_attention = twin.model.layers[0].self_attn
        assert twin_attention.forward.attention is twin_attention and twin.generate.model is twin
    disable_static_decode(model)
    assert not {"generate", "prepare_inputs_for_generation"} & set(vars(model)) and "forward" not in vars(attention)
    assert model._can_compile_fullgraph is original_flag


# -- errors ----------------------------------------------------------------------------------------

def test_sequence_past_max_cache_len_is_refused(models):
    _, static = models
    cache = DeepseekV4StaticCache(static.config, max_batch_size=1, max_cache_len=12)
    with pytest.raises(ValueError, match="max_cache_len=12"):
        generate(static, prompts(1, 5), 10, cache=cache)  # refused before anything runs
    assert cache.get_seq_length() == 0
    # Stepping the model by hand: the step that would pass capacity raises, the cache stays as it was.
    forward(static, prompts(1, 12), cache)
    with pytest.raises(ValueError, match="12 cached tokens \\+ 1 new would pass max_cache_len=12"):
        forward(static, prompts(1, 1), cache)
    assert cache.get_seq_length() == 12


def test_batch_above_max_batch_size_is_refused(models):
    _, static = models
    cache = DeepseekV4StaticCache(static.config, max_batch_size=2, max_cache_len=16)
    with pytest.raises(ValueError, match="batch 3 is above max_batch_size=2"):
        generate(static, prompts(3, 4), 4, cache=cache)
    with pytest.raises(ValueError, match="batch 4 is above max_batch_size=2"):
        generate(static, prompts(2, 4), 4, cache=cache, do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="batch 3 is above max_batch_size=2"):
        forward(static, prompts(3, 4), cache)


@pytest.mark.parametrize("kwargs, what", [
    (dict(num_beams=2), "beam search"),
    (dict(prompt_lookup_num_tokens=2), "prompt-lookup"),
])
def test_unsupported_generate_features_are_named(models, kwargs, what):
    _, static = models
    cache = DeepseekV4StaticCache(static.config, max_batch_size=4, max_cache_len=32)
    with pytest.raises(NotImplementedError, match=what):
        generate(static, prompts(1, 4), 4, cache=cache, **kwargs)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))


def test_non_v4_models_are_refused():
    llama = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(TypeError, match="not a Hugging Face DeepSeek-V4 model"):
        enable_static_decode(LlamaForCausalLM(llama))
    with pytest.raises(TypeError, match="needs a DeepSeek-V4 config"):
        DeepseekV4StaticCache(llama, max_batch_size=1, max_cache_len=8)


def test_static_cache_without_the_decode_forwards_is_refused(models):
    reference, _ = models  # transformers' own attention, not enabled
    cache = DeepseekV4StaticCache(reference.config, max_batch_size=1, max_cache_len=16)
    with pytest.raises(RuntimeError, match="enable_static_decode"):
        generate(reference, prompts(1, 4), 3, cache=cache)


def test_cache_dtype_must_match_the_model(models):
    _, static = models
    cache = DeepseekV4StaticCache(static.config, max_batch_size=1, max_cache_len=16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype=model.dtype"):
        forward(static, prompts(1, 4), cache)


def _foreign_config(base, **changes):
    config = copy.deepcopy(base)
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize("changes, named", [
    (dict(sliding_window=4), "sliding_window: cache 4, model 6"),
    (dict(compress_rates={"compressed_sparse_attention": 8, "heavily_compressed_attention": 16}), "compress_rates"),
    (dict(compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4}), "compress_rates"),
    (dict(layer_types=[LAYER_TYPES[1], LAYER_TYPES[0], *LAYER_TYPES[2:]]), "layer_types"),
    (dict(head_dim=16), "head_dim: cache 16, model 32"),
    (dict(num_hidden_layers=3), "num_hidden_layers: cache 3, model 4"),
])
def test_a_cache_built_for_another_config_is_refused_before_anything_runs(models, changes, named):
    _, static = models
    foreign = _foreign_config(static.config, **changes)
    cache = DeepseekV4StaticCache(foreign, max_batch_size=1, max_cache_len=32)
    with pytest.raises(ValueError, match=f"another DeepSeek-V4 config.*{named}.*model.config"):
        generate(static, prompts(1, 5), 4, cache=cache)
    with pytest.raises(ValueError, match=named):  # a plain forward, too (prefill and decode alike)
        forward(static, prompts(1, 5), cache)
    assert cache.get_seq_length() == 0


def test_a_cache_reused_without_reset_is_refused_naming_reset(models):
    _, static = models
    cache = DeepseekV4StaticCache(static.config, max_batch_size=2, max_cache_len=40)
    first = generate(static, prompts(2, 8), 6, cache=cache)
    held = cache.get_seq_length()
    with pytest.raises(ValueError, match=r"holds 2 sequences.*batch of 1; call cache.reset\(\)"):
        generate(static, prompts(1, 8), 4, cache=cache)
    with pytest.raises(ValueError, match=r"prompt of 5 tokens does not continue it.*cache.reset\(\)"):
        generate(static, prompts(2, 5), 4, cache=cache)
    with pytest.raises(ValueError, match="prompt of 8 tokens does not continue"):
        generate(static, prompts(2, 8), 4, cache=cache)  # the same prompt again: also a new prompt
    assert cache.get_seq_length() == held  # nothing ran
    # Continuing what it holds (the sequences so far) is generate()'s StaticCache contract: allowed.
    more = generate(static, first.sequences, 2, cache=cache)
    cache.reset()
    again = generate(static, first.sequences, 2, cache=cache)
    assert torch.equal(more.sequences, again.sequences)


def test_output_attentions_is_refused_under_static_decode(models):
    reference, static = models
    cache = DeepseekV4StaticCache(static.config, max_batch_size=1, max_cache_len=16)
    with pytest.raises(NotImplementedError, match="output_attentions .*cache slots"):
        generate(static, prompts(1, 4), 3, cache=cache, output_attentions=True)
    forward(static, prompts(1, 4), cache)  # prefill: transformers' own forward, attentions and all
    with torch.no_grad(), pytest.raises(NotImplementedError, match="output_attentions=True.*cache slots"):
        static(input_ids=prompts(1, 1), use_cache=True, output_attentions=True, **{cache_keyword(): cache})
    # transformers' own cache still gives them.
    out = generate(static, prompts(1, 4), 3, output_attentions=True)
    assert out.attentions is not None
