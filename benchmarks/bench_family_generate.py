#!/usr/bin/env python3
"""generate() decode throughput of a Qwen3-30B-A3B-sized Qwen3-MoE (random weights) on one GPU.

    python benchmarks/bench_family_generate.py [--layers 48] [--batch 1 8 32 128] [--prompt 128]
        [--new-tokens 64] [--variants hf_eager static_inductor static_megamoe] [--time-budget 540]
        [--out $OUT/bench_family_generate.json] [--dry-run]

Model: `Qwen3MoeConfig` hidden 2048, moe_intermediate 768, 128 experts, top-8 (norm_topk_prob),
--layers decoder layers (every one MoE), 32 heads / 4 KV heads / head_dim 128, vocab 151936, bf16,
random weights initialised directly on the GPU. Variants, one after another on the same model:

  hf_eager         dynamic cache, no compile (transformers switches the experts to batched_mm for
                   decoding on GPUs)
  static_inductor  cache_implementation="static": transformers' auto-compile of the decode step,
                   CompileConfig(fullgraph=True, mode="reduce-overhead") with inductor
  static_megamoe   the same with CompileConfig(backend="megamoe", ...), after
                   megamoe_compile.prepare(model, MegaMoEConfig(max_tokens_per_rank=--max-tokens))

Per (variant, batch): one warm-up generate() (compilation: transformers compiles the decode step
once per batch size with the static cache; the prefill runs uncompiled), then a timed
generate(max_new_tokens=1) (time to first token: the prefill; best of two) and a timed full generate(). Decode
ms/step = (full - first token) / (new_tokens - 1); decode tokens/s = batch / step. Targets printed:
static_megamoe >= 3x static_inductor decode tokens/s at batch >= 32, and >= 1x at batch 1.
--time-budget: cases that would likely not finish before it are skipped and recorded as such (a
device call is limited to 10 minutes; inductor compiles of 48 layers take minutes, so use
--layers 12, or split --variants / --batch over several calls). JSON is rewritten after every case.
--dry-run: tiny model on the CPU, reference kernel, no inductor or CUDA graphs (code paths only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

import torch
from common import log

VARIANTS = ("hf_eager", "static_inductor", "static_megamoe")
FULL = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
            num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936)
DRY = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=256, num_experts=8, num_experts_per_tok=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024)


def build(layers: int, dry_run: bool, device: str):
    """A Qwen3-MoE causal LM with random bf16 weights, initialised where it lives (no float32 copy)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    sizes = DRY if dry_run else FULL
    config = Qwen3MoeConfig(**sizes, num_hidden_layers=layers, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], max_position_embeddings=4096, tie_word_embeddings=False,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(default_dtype)
    model.eval().requires_grad_(False)
    assert next(model.parameters()).dtype == torch.bfloat16
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generate(model, prompts, new_tokens: int, variant: str, compile_config, device: str):
    """(output ids, seconds) of one greedy generate() of exactly `new_tokens` tokens."""
    kwargs = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0)
    if variant != "hf_eager":
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    else:
        kwargs.update(disable_compile=True)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, **kwargs)
    sync(device)
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="run in this order; static_megamoe prepares the model, so it runs last")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="MegaMoEConfig.max_tokens_per_rank (default: largest batch x prompt)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: skip (and record) the cases that would likely end after it")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model on the CPU, reference kernel, eager inner compiler (code paths only)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_family_generate.json"))
    args = parser.parse_args()
    dry = args.dry_run
    if dry:
        defaults = {a.dest: a.default for a in parser._actions}
        if args.layers == defaults["layers"]:
            args.layers = 2
        if args.batch == defaults["batch"]:
            args.batch = [1, 2]
        if args.prompt == defaults["prompt"]:
            args.prompt = 8
        if args.new_tokens == defaults["new_tokens"]:
            args.new_tokens = 4
        torch.set_num_threads(min(2, torch.get_num_threads()))
    elif not torch.cuda.is_available():
        log("bench_family_generate: needs a CUDA GPU (or --dry-run)")
        return 2
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode steps are timed after the first token)")
    variants = [v for v in VARIANTS if v in args.variants]  # static_megamoe last: prepare changes the model
    device = "cpu" if dry else "cuda"
    warnings.filterwarnings("ignore")

    import transformers
    from transformers import CompileConfig

    import megamoe_compile as mc

    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    t_start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    model = build(args.layers, dry, device)
    vocab = model.config.vocab_size
    log(f"model: {args.layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
        f"built in {time.perf_counter() - t_start:.1f} s")
    prompts = {b: torch.randint(3, vocab, (b, args.prompt), generator=torch.Generator().manual_seed(b)).to(device)
               for b in args.batch}
    max_tokens = args.max_tokens or max(args.batch) * args.prompt
    megamoe_config = (mc.MegaMoEConfig(kernel="reference", recipe="fp8", inner_backend="eager",
                                       max_tokens_per_rank=max_tokens) if dry
                      else mc.MegaMoEConfig(max_tokens_per_rank=max_tokens))

    def compile_config(variant: str):
        if variant == "hf_eager":
            return None
        if dry:  # no inductor (minutes of C++ builds on a small CPU), no CUDA graphs
            backend = "eager" if variant == "static_inductor" else mc.backend(megamoe_config)
            config = CompileConfig(backend=backend, fullgraph=True, mode="default")
            config._compile_all_devices = True  # transformers auto-compiles on GPUs only
            return config
        backend = "inductor" if variant == "static_inductor" else "megamoe"
        return CompileConfig(backend=backend, fullgraph=True, mode="reduce-overhead")

    rows: list[dict] = []
    reference: dict[int, torch.Tensor] = {}
    durations: dict[str, list[float]] = {}
    meta = {
        "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(), "torch": torch.__version__,
        "transformers": transformers.__version__, "dry_run": dry, "args": vars(args),
        "model": {"family": "qwen3_moe", "layers": args.layers, **(DRY if dry else FULL)},
        "max_tokens_per_rank": max_tokens,
        "timing": "perf_counter around generate() with CUDA syncs; decode step = (full - ttft) / (new_tokens - 1)",
    }

    def save() -> None:
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "targets": targets()}, f, indent=2)

    def get(variant, batch, key):
        row = next((r for r in rows if r["variant"] == variant and r["batch"] == batch), None)
        return None if row is None else row.get(key)

    def targets() -> list[dict]:
        out = []
        for b in args.batch:
            if b < 32 and b != 1:
                continue
            mega = get("static_megamoe", b, "decode_tokens_per_s")
            ind = get("static_inductor", b, "decode_tokens_per_s")
            ratio = None if mega is None or ind is None else mega / ind
            bound = 3.0 if b >= 32 else 1.0
            out.append({"target": f"batch {b}: static_megamoe >= {bound:g}x static_inductor decode tokens/s",
                        "value": ratio, "bound": bound, "met": None if ratio is None else ratio >= bound})
        return out

    prepared = False
    for variant in variants:
        torch._dynamo.reset()
        for attr in ("_compiled_call", "_last_compile_config"):  # transformers' cached compiled forward
            if hasattr(model, attr):
                delattr(model, attr)
        if variant == "static_megamoe" and not prepared:
            t0 = time.perf_counter()
            mc.prepare(model, megamoe_config)
            plans = mc.layer_plans(model)
            meta["megamoe"] = {"prepare_s": round(time.perf_counter() - t0, 1), "planned": len(plans),
                               "fused_plans": sum(p.fuse for p in plans),
                               "kernels": sorted({f"{p.kernel}/{p.recipe}" for p in plans if p.fuse}),
                               "not_fused": sorted({p.reason for p in plans if not p.fuse})[:3]}
            log(f"prepare: {meta['megamoe']}")
            prepared = True
        config = compile_config(variant)
        for batch in args.batch:
            row = {"variant": variant, "batch": batch}
            elapsed = time.perf_counter() - t_start
            seen = durations.get(variant) or [d for ds in durations.values() for d in ds]
            estimate = max(seen) if seen else 0.0
            if args.time_budget is not None and elapsed + estimate > args.time_budget:
                row["skipped"] = (f"time budget: {elapsed:.0f} s spent, a case of this variant took up to "
                                  f"{estimate:.0f} s")
                rows.append(row)
                log(f"{variant} batch {batch}: skipped ({row['skipped']})")
                save()
                continue
            t_case = time.perf_counter()
            try:
                torch._dynamo.utils.counters.clear()
                _, warm = generate(model, prompts[batch], args.new_tokens, variant, config, device)
                fusions = torch._dynamo.utils.counters["megamoe"]["fused_moe"]
                # Time to first token: the prefill (uncompiled) + one sampling step; best of two.
                ttft = min(generate(model, prompts[batch], 1, variant, config, device)[1] for _ in range(2))
                out, full = generate(model, prompts[batch], args.new_tokens, variant, config, device)
                generated = out[:, args.prompt:]
                step = (full - ttft) / (args.new_tokens - 1)
                row.update(warmup_s=warm, ttft_ms=ttft * 1e3, generate_s=full, decode_ms_per_step=step * 1e3,
                           decode_tokens_per_s=batch / step, tokens_per_s=batch * args.new_tokens / full,
                           new_tokens=int(generated.shape[1]))
                if variant == "hf_eager":
                    reference[batch] = generated
                elif batch in reference:
                    row["agreement_with_eager"] = (generated == reference[batch]).float().mean().item()
                if variant == "static_megamoe":
                    row["fused_moe_ops_traced"] = int(fusions)  # per compile: one per MoE layer
                if device == "cuda":
                    row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as e:  # keep the rest of the table
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            durations.setdefault(variant, []).append(time.perf_counter() - t_case)
            rows.append(row)
            log(f"{variant} batch {batch}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                                           for k, v in row.items()}))
            save()

    save()
    m = meta["model"]
    print(f"\ngenerate(): Qwen3-MoE {args.layers} layers (hidden {m['hidden_size']}, moe_intermediate "
          f"{m['moe_intermediate_size']}, {m['num_experts']} experts top-{m['num_experts_per_tok']}), bf16, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, {meta['device']}; wall {meta['wall_s']} s")
    head = ["variant", "batch", "decode ms/step", "decode tok/s", "e2e tok/s", "ttft ms", "warm-up s", "agree",
            "fused"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    for r in rows:
        if "skipped" in r or "error" in r:
            why = "skipped: " + r["skipped"] if "skipped" in r else "error: " + r["error"]
            print(f"{r['variant']} | {r['batch']} | {why}")
            continue
        print(" | ".join([r["variant"], str(r["batch"]), fmt(r["decode_ms_per_step"]),
                          fmt(r["decode_tokens_per_s"], ".1f"),
                          fmt(r["tokens_per_s"], ".1f"), fmt(r["ttft_ms"], ".1f"), fmt(r["warmup_s"], ".1f"),
                          fmt(r.get("agreement_with_eager")), str(r.get("fused_moe_ops_traced", "-"))]))
    print("\ntargets:")
    for t in targets():
        state = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        print(f"  {state:6s} {t['target']}: {fmt(t['value'])}")
    if "megamoe" in meta:
        print("megamoe:", json.dumps(meta["megamoe"]))
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
