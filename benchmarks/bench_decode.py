"""Decode speed of DeepSeek-V4 at V4-Flash layer size: dynamic cache vs static cache + CUDA graphs.

    python benchmarks/bench_decode.py [--layers 4] [--batches 1,8,32,128] [--contexts 512,4096]
                                      [--steps 32] [--variants ...] [--out decode.json]
    python benchmarks/bench_decode.py --dry-run       # tiny model on CPU, eager backends: a smoke test

Model: `DeepseekV4Config()` defaults (V4-Flash: hidden 4096, 64 heads of 512, sliding window 128,
CSA every 4 tokens with index top-512, HCA every 128, 256 experts top-6) with `--layers` decoder
layers (default 4: its first four layer types), bf16, random weights. Variants, in one run on the
same model (one prompt per batch and context, random tokens):

  hf_eager          transformers' generate(), dynamic V4 cache, no compilation
  hf_compile        the same with model.forward = torch.compile(forward, dynamic=True) (graph breaks
                    where V4's cache is data-dependent)
  static_inductor   enable_static_decode + DeepseekV4StaticCache + generate()'s auto-compile:
                    CompileConfig(backend="inductor", mode="reduce-overhead", fullgraph=True)
  static_megamoe    the same after mc.prepare(model), CompileConfig(backend="megamoe", ...)
  moe_kernel        the fused MoE op alone (CUDA-graph replay), summed over the fused layers, per step

Per (variant, batch, context): time to first token (the prompt is prefilled in chunks of at most
--prefill-tokens tokens x batch, eagerly, as one cache; then generate() continues from that cache:
its first step is the last prompt token), ms per decode step (median over --steps steps, timed per
step from a logits processor, after a synchronisation generate() makes anyway), decode tokens/s
(batch / step time), compile seconds (the first generate()'s step times above the median: dynamo,
inductor and CUDA-graph recording), and whether the tokens agree with hf_eager. Prints a table and
writes JSON (to $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import torch
from common import graphed, log, time_ms_cpu
from common import time_ms as cuda_time_ms
from transformers import CompileConfig, DeepseekV4Config, DeepseekV4ForCausalLM, DynamicCache, LogitsProcessor

import megamoe_compile as mc
from megamoe_compile.decode.v4_static_cache import DeepseekV4StaticCache
from megamoe_compile.decode.v4_static_decode import cache_keyword, disable_static_decode, enable_static_decode
from megamoe_compile.layer_state import kernel_ready, plan_of

VARIANTS = ("hf_eager", "hf_compile", "static_inductor", "static_megamoe", "moe_kernel")


def build(layers: int, device: str, dry_run: bool) -> DeepseekV4ForCausalLM:
    if dry_run:
        config = DeepseekV4Config(
            vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=layers,
            num_attention_heads=2, head_dim=32, q_lora_rank=32, o_groups=1, o_lora_rank=16, n_routed_experts=4,
            num_experts_per_tok=2, num_nextn_predict_layers=0, index_n_heads=4, index_head_dim=16, index_topk=4,
            sliding_window=8, hc_mult=2, compress_rates={"compressed_sparse_attention": 4,
                                                         "heavily_compressed_attention": 8})
        dtype = torch.float32
    else:
        config = DeepseekV4Config(num_hidden_layers=layers, num_nextn_predict_layers=0)
        dtype = torch.bfloat16
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4ForCausalLM._from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):  # zero in a fresh model: spread the hash routing
                gate.tid2eid.copy_(torch.randint(0, gate.num_experts, gate.tid2eid.shape, device=device))
    return model


class StepClock(LogitsProcessor):
    """Records the time of every generation step (generate() calls logits processors once a step)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def prefill(model, ids: torch.Tensor, cache, chunk_tokens: int) -> None:
    """All prompt tokens but the last into `cache`, in chunks of at most chunk_tokens x batch tokens."""
    batch, length = ids.shape
    chunk = max(1, chunk_tokens // batch)
    with torch.no_grad():
        for start in range(0, length - 1, chunk):
            stop = min(start + chunk, length - 1)
            position_ids = torch.arange(start, stop, device=ids.device).unsqueeze(0).expand(batch, -1)
            model(input_ids=ids[:, start:stop], position_ids=position_ids, use_cache=True, logits_to_keep=1,
                  **{cache_keyword(): cache})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_generate(model, ids, cache, steps: int, chunk_tokens: int):
    """Prefill, then generate() `steps` + 1 tokens from the cache; (tokens, ttft_s, step seconds)."""
    device = ids.device
    clock = StepClock(device)
    sync(device)
    start = time.perf_counter()
    prefill(model, ids, cache, chunk_tokens)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                             min_new_tokens=steps + 1, do_sample=False, logits_processor=[clock],
                             **{cache_keyword(): cache})
    sync(device)
    ttft = clock.times[0] - start
    return out[:, ids.shape[1]:], ttft, clock.step_seconds()


def moe_kernel_ms(model, batch: int, device: torch.device, reps: int) -> float | None:
    """The fused MoE op alone for `batch` tokens, summed over the fused layers (ms per decode step)."""
    total, hidden = 0.0, model.config.hidden_size
    for layer in model.model.layers:
        experts = layer.mlp.experts
        plan = plan_of(experts)
        if plan is None or not plan.fuse:
            continue
        x = torch.randn(batch, hidden, device=device, dtype=model.dtype)
        with torch.no_grad():
            if layer.mlp.is_hash:
                _, weights, idx = layer.mlp.gate(x, torch.randint(0, model.config.vocab_size, (batch,), device=device))
            else:
                _, weights, idx = layer.mlp.gate(x)
        w1, w1_scale, w2, w2_scale = kernel_ready(experts)
        idx, weights = idx.to(torch.int32).contiguous(), weights.float().contiguous()

        def call():
            return torch.ops.megamoe.fused_moe(
                x, idx, weights, w1, w1_scale, w2, w2_scale, kernel=plan.kernel, recipe=plan.recipe,
                routed_scaling_factor=1.0, swiglu_limit=getattr(experts, "limit", None), group_name=plan.group_name,
                shared_batch=plan.shared_batch)

        total += time_ms(graphed(call) if device.type == "cuda" else call, device, reps)
    return total


def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds per call: the CUDA-event timer on a GPU, wall clock on CPU (common.py)."""
    if device.type == "cuda":
        return cuda_time_ms(fn, warmup=3, reps=reps)
    return time_ms_cpu(fn, warmup=3, reps=reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--contexts", default="512,4096")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per generate()")
    parser.add_argument("--prefill-tokens", type=int, default=8192, help="tokens per prefill chunk (x batch)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of " + ",".join(VARIANTS) + " (hf_eager is the reference "
                             "for token agreement)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, eager backends, few steps")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_decode.json"))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if args.dry_run:
        args.batches, args.contexts, args.steps = "1,3", "12,40", min(args.steps, 6)
        torch.set_num_threads(1)  # tiny ops: threads only contend
    warnings.filterwarnings("ignore")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU (or --dry-run for a CPU smoke test)")
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]

    # Every (batch, context) is its own static shape: one graph each, none made dynamic after a recompile.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(batches) * len(contexts))
    model = build(args.layers, device.type, args.dry_run)
    original_forward = model.forward
    # The compiler configs: real runs CUDA-graph the step; the dry run uses eager backends (no CUDA on CPU).
    ro = dict(mode=None) if args.dry_run else dict(mode="reduce-overhead")
    inductor = "eager" if args.dry_run else "inductor"
    megamoe_options = {"options": {"inner_backend": "eager"}} if args.dry_run else {}
    rows, reference = [], {}
    for variant in [v for v in variants if v != "moe_kernel"]:
        torch._dynamo.reset()
        model.forward = original_forward
        disable_static_decode(model)
        model.generation_config.compile_config = None
        static = variant.startswith("static")
        if variant == "hf_compile":
            backend = {"backend": "eager"} if args.dry_run else {}
            model.forward = torch.compile(original_forward, dynamic=True, **backend)
        elif static:
            if variant == "static_megamoe":
                mc.prepare(model, mc.MegaMoEConfig())
            enable_static_decode(model)
            backend = "megamoe" if variant == "static_megamoe" else inductor
            config = CompileConfig(backend=backend, fullgraph=True, **ro, **megamoe_options)
            config._compile_all_devices = args.dry_run or None
            model.generation_config.compile_config = config
        torch._dynamo.utils.counters.clear()
        for batch in batches:
            for context in contexts:
                row = {"variant": variant, "batch": batch, "context": context}
                try:
                    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device,
                                        generator=torch.Generator(device=device).manual_seed(batch * 7919 + context))
                    first_compile = None
                    # One static cache per shape, reset between calls (CUDA graphs read it by address).
                    static_cache = (DeepseekV4StaticCache(model.config, max_batch_size=batch,
                                                          max_cache_len=context + args.steps + 2, device=device,
                                                          dtype=model.dtype) if static else None)
                    for _attempt in range(2 if variant != "hf_eager" else 1):  # compiled: the first call compiles
                        if static:
                            static_cache.reset()
                        cache = static_cache if static else DynamicCache(config=model.config)
                        tokens, ttft, steps = run_generate(model, ids, cache, args.steps, args.prefill_tokens)
                        if first_compile is None:
                            median = statistics.median(steps)
                            first_compile = sum(max(0.0, s - median) for s in steps)
                        del cache
                    del static_cache
                    step = statistics.median(steps)
                    row.update(ttft_s=ttft, ms_per_step=step * 1e3, tokens_per_s=batch / step,
                               compile_s=first_compile if variant != "hf_eager" else 0.0)
                    key = (batch, context)
                    if variant == "hf_eager":
                        reference[key] = tokens
                    if key in reference:
                        row["agreement_with_eager"] = (tokens == reference[key]).float().mean().item()
                    fused = sum(p.fuse for p in mc.layer_plans(model)) if variant == "static_megamoe" else 0
                    row["fused_moe_layers"] = fused
                except Exception as e:  # noqa: BLE001 (one failed cell, e.g. out of memory, must not stop the run)
                    traceback.print_exc()
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                log(str(row))
                rows.append(row)
        row_stats = dict(torch._dynamo.utils.counters["stats"])
        log(f"{variant}: dynamo stats {row_stats}")
    model.forward = original_forward
    if "moe_kernel" in variants:
        if not any(plan_of(layer.mlp) for layer in model.model.layers):
            mc.prepare(model, mc.MegaMoEConfig())
        for batch in batches:
            row = {"variant": "moe_kernel", "batch": batch, "context": None}
            try:
                row["ms_per_step"] = moe_kernel_ms(model, batch, device, reps=5 if args.dry_run else 50)
                row["fused_moe_layers"] = sum(p.fuse for p in mc.layer_plans(model))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            log(str(row))
            rows.append(row)

    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "args": vars(args), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    sizes = (f"hidden {model.config.hidden_size}, {model.config.n_routed_experts} experts "
             f"top-{model.config.num_experts_per_tok}, {args.layers} layers "
             f"({', '.join(model.config.layer_types[: args.layers])}), {model.dtype}")
    print(f"\ndecode: {sizes}, {result['device']}, {args.steps} timed steps")
    print("variant | batch | context | ttft s | ms/step | tokens/s | compile s | agreement | fused")
    for r in rows:
        head = f"{r['variant']} | {r['batch']} | {r['context'] if r['context'] is not None else '-'}"
        if "error" in r:
            print(f"{head} | error: {r['error']}")
        elif r["variant"] == "moe_kernel":
            print(f"{head} | - | {r['ms_per_step']:.3f} | - | - | - | {r['fused_moe_layers']}")
        else:
            agreement = r.get("agreement_with_eager")
            agreement = "-" if agreement is None else f"{agreement:.2f}"
            print(f"{head} | {r['ttft_s']:.3f} | {r['ms_per_step']:.3f} | {r['tokens_per_s']:.1f} | "
                  f"{r['compile_s']:.1f} | {agreement} | {r['fused_moe_layers']}")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
