#!/usr/bin/env python3
"""One DeepSeek-V4-Flash MoE block on one GPU: Hugging Face vs the megamoe backend vs the kernel alone.

Block: hidden 4096, moe_intermediate 2048, 256 experts, top-6, one shared expert, top-k router
(sqrtsoftplus + bias, routed scaling 1.5, SwiGLU clamp 10), bf16, random weights, built from
`DeepseekV4Config` as a bare `DeepseekV4SparseMoeBlock`. Per token count, milliseconds per forward
(CUDA events around each call, median of --reps after --warmup calls):

  hf_eager        transformers, experts_implementation="eager" (Python loop; up to 128 tokens)
  hf_grouped_mm   transformers, experts_implementation="grouped_mm", eager PyTorch
  hf_compile      hf_grouped_mm under torch.compile (inductor)
  hf_compile_ro   ... mode="reduce-overhead" (CUDA graphs)
  megamoe         megamoe_compile.prepare + torch.compile(backend="megamoe")
  megamoe_ro      ... mode="reduce-overhead"
  kernel          DeepGEMM alone: pre-dispatch + mega kernel via megamoe.fused_moe, CUDA-graph replay
  shared          the shared expert alone, CUDA-graph replay

Targets printed at the end: from 32 tokens up megamoe >= 1.8x faster than hf_compile (also
megamoe_ro vs hf_compile_ro); at 1 token megamoe_ro >= 3x faster than hf_compile_ro; the block
(megamoe_ro) <= 1.15 x (kernel + shared). Writes JSON to --out (default $OUT/bench.json or
./bench.json). Static shapes (one compile per token count) unless --dynamic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 4096, 2048, 256, 6
VARIANTS = ("hf_eager", "hf_grouped_mm", "hf_compile", "hf_compile_ro", "megamoe", "megamoe_ro", "kernel",
            "shared")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_block(seed: int = 0):
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    cfg = DeepseekV4Config(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, n_routed_experts=EXPERTS,
                           num_experts_per_tok=TOP_K, n_shared_experts=1, num_hidden_layers=1,
                           mlp_layer_types=["moe"], num_nextn_predict_layers=0)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    with torch.device("cuda"):
        block = DeepseekV4SparseMoeBlock(cfg, 0).to(torch.bfloat16)
    block.eval().requires_grad_(False)
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, device="cuda", generator=g, dtype=p.dtype).mul_(fan_in**-0.5))
        block.gate.e_score_correction_bias.normal_(0, 0.1, generator=g)
    return block, cfg


def time_ms(fn, warmup: int, reps: int) -> float:
    """Median milliseconds per call; CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graphed(fn):
    """Capture fn() (after a warm-up on a side stream) into a CUDA graph; returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def cos_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(1 - 2 * (a * b).sum() / (a * a + b * b).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048])
    parser.add_argument("--eager-max", type=int, default=128, help="largest token count for hf_eager")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=None) instead of False")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        log("bench_moe_block: needs a CUDA GPU")
        return 2

    import transformers

    import megamoe_compile as mc
    from megamoe_compile.ops import deepgemm

    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    dynamic = None if args.dynamic else False
    t_start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    block, cfg = build_block()
    max_tokens = max(args.tokens)
    xs = {t: torch.randn(1, t, HIDDEN, device="cuda", dtype=torch.bfloat16) for t in args.tokens}
    results: dict[str, dict[int, float]] = {v: {} for v in args.variants}
    notes: dict[str, str] = {}
    accuracy: dict[int, float] = {}
    reference: dict[int, torch.Tensor] = {}

    def run_variant(name: str, fn_for_tokens, tokens=args.tokens):
        t0 = time.perf_counter()
        for t in tokens:
            try:
                fn = fn_for_tokens(t)
                results[name][t] = time_ms(fn, args.warmup, args.reps)
            except Exception as e:  # keep the rest of the table
                notes[f"{name}@{t}"] = f"{type(e).__name__}: {e}"[:300]
                log(f"  {name} T={t} failed: {notes[f'{name}@{t}']}")
        log(f"{name}: {time.perf_counter() - t0:.1f} s  " +
            " ".join(f"{t}:{v:.3f}" for t, v in results[name].items()))
        with open(args.out + ".partial", "w") as f:  # survives a run cut short
            json.dump({"results": results, "notes": notes, "accuracy": accuracy}, f)

    def set_impl(impl: str) -> None:
        block.experts.config._experts_implementation = impl

    with torch.no_grad():
        # -- Hugging Face ------------------------------------------------------------------
        set_impl("grouped_mm")
        for t in args.tokens:
            reference[t] = block(xs[t]).float()
        if "hf_eager" in results:
            set_impl("eager")
            run_variant("hf_eager", lambda t: (lambda: block(xs[t])),
                        [t for t in args.tokens if t <= args.eager_max])
            set_impl("grouped_mm")
        if "hf_grouped_mm" in results:
            run_variant("hf_grouped_mm", lambda t: (lambda: block(xs[t])))
        for name, mode in (("hf_compile", None), ("hf_compile_ro", "reduce-overhead")):
            if name in results:
                torch._dynamo.reset()
                compiled = torch.compile(block, mode=mode, dynamic=dynamic)
                run_variant(name, lambda t, c=compiled: (lambda: c(xs[t])))

        # -- megamoe -------------------------------------------------------------------------
        config = mc.MegaMoEConfig(max_tokens_per_rank=max_tokens)
        mc.prepare(block, config)
        (plan,) = mc.layer_plans(block)
        if not plan.fuse:
            log(f"megamoe: block not fused: {plan.reason}")
            notes["megamoe"] = plan.reason
        else:
            deepgemm.reserve_buffer(plan.kernel, plan.spec, max_tokens)  # no-op once prepare reserves it
            buffer_mib = sum(deepgemm._buffer_bytes(b) for b in deepgemm.buffers().values()) / 2**20
            notes["buffer_mib"] = f"{buffer_mib:.0f}"
            log(f"megamoe: {plan.kernel}/{plan.recipe}, weights {plan.prepared_bytes / 2**30:.2f} GiB, "
                f"symmetric buffer {buffer_mib:.0f} MiB")
        for name, mode in (("megamoe", None), ("megamoe_ro", "reduce-overhead")):
            if name in results and plan.fuse:
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                compiled = torch.compile(block, backend="megamoe", mode=mode, dynamic=dynamic)

                def make(t, c=compiled, name=name):
                    out = c(xs[t]).float()
                    if name == "megamoe":
                        accuracy[t] = cos_diff(out, reference[t])
                    return lambda: c(xs[t])

                run_variant(name, make)
                notes[f"{name}_fusions"] = str(torch._dynamo.utils.counters["megamoe"]["fused_moe"])

        # -- the parts alone -----------------------------------------------------------------
        if "kernel" in results and plan.fuse:
            import importlib

            prep = importlib.import_module("megamoe_compile.prepare")  # the module, not mc.prepare()

            weights = prep.kernel_weights(block.experts)
            scale = plan.spec.routed_scaling_factor

            def kernel_for_tokens(t):
                x2 = xs[t].view(t, HIDDEN)
                _, w, idx = block.gate(xs[t])
                idx, w = idx.to(torch.int32).contiguous(), (w / scale).float().contiguous()
                return graphed(lambda: torch.ops.megamoe.fused_moe(
                    x2, idx, w, weights.w1, weights.w1_scale, weights.w2, weights.w2_scale, plan.kernel,
                    plan.recipe, scale, plan.spec.swiglu_limit, ""))

            run_variant("kernel", kernel_for_tokens)
        if "shared" in results:
            run_variant("shared", lambda t: graphed(lambda: block.shared_experts(xs[t].view(t, HIDDEN))))

    # -- report ---------------------------------------------------------------------------------
    def get(name, t):
        return results.get(name, {}).get(t)

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    rows, targets = [], []
    for t in args.tokens:
        r = {"tokens": t, **{v: get(v, t) for v in args.variants}}
        r["speedup_vs_hf_compile"] = ratio(get("hf_compile", t), get("megamoe", t))
        r["speedup_ro_vs_hf_compile_ro"] = ratio(get("hf_compile_ro", t), get("megamoe_ro", t))
        parts = None if get("kernel", t) is None or get("shared", t) is None else get("kernel", t) + get("shared", t)
        r["block_over_parts"] = ratio(get("megamoe_ro", t), parts)
        r["accuracy_vs_hf"] = accuracy.get(t)
        rows.append(r)
        if t >= 32:
            targets.append((f"T={t}: megamoe >= 1.8x hf_compile", r["speedup_vs_hf_compile"], 1.8, ">="))
            targets.append((f"T={t}: megamoe_ro >= 1.8x hf_compile_ro", r["speedup_ro_vs_hf_compile_ro"], 1.8, ">="))
        if t == 1:
            targets.append(("T=1: megamoe_ro >= 3x hf_compile_ro", r["speedup_ro_vs_hf_compile_ro"], 3.0, ">="))
        targets.append((f"T={t}: megamoe_ro <= 1.15 x (kernel + shared)", r["block_over_parts"], 1.15, "<="))

    target_rows = [{"target": n, "value": v, "bound": b,
                    "met": None if v is None else (v >= b if op == ">=" else v <= b)} for n, v, b, op in targets]
    dg_version = deepgemm._installed_version(deepgemm._deep_gemm()[0])
    meta = {
        "device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
        "torch": torch.__version__, "transformers": transformers.__version__, "deep_gemm": dg_version,
        "shape": {"hidden": HIDDEN, "moe_intermediate": INTERMEDIATE, "experts": EXPERTS, "top_k": TOP_K},
        "warmup": args.warmup, "reps": args.reps, "statistic": "median", "dynamic": bool(args.dynamic),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = {"meta": meta, "rows": rows, "targets": target_rows, "notes": notes}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    print(f"\n{meta['device']} | torch {meta['torch']} | transformers {meta['transformers']} | {dg_version}")
    print(f"DeepSeek-V4-Flash MoE block, ms per forward (median of {args.reps}); wall {meta['wall_s']} s")
    head = ["T", *args.variants, "x_vs_compile", "x_ro_vs_ro", "ro/(k+s)", "acc"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join([str(r["tokens"]), *(fmt(r[v]) for v in args.variants),
                          fmt(r["speedup_vs_hf_compile"], ".2f"), fmt(r["speedup_ro_vs_hf_compile_ro"], ".2f"),
                          fmt(r["block_over_parts"], ".2f"), fmt(r["accuracy_vs_hf"], ".1e")]))
    print("\ntargets:")
    for tr in target_rows:
        state = "n/a" if tr["met"] is None else ("MET" if tr["met"] else "MISSED")
        print(f"  {state:6s} {tr['target']}: {fmt(tr['value'], '.2f')}")
    if notes:
        print("notes:", json.dumps(notes))
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
