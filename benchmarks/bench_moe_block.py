#!/usr/bin/env python3
"""One MoE block on one GPU: Hugging Face vs the megamoe backend vs the kernel alone.

Default block (--family deepseek_v4): DeepSeek-V4-Flash, hidden 4096, moe_intermediate 2048,
256 experts, top-6, one shared expert, top-k router (sqrtsoftplus + bias, routed scaling 1.5,
SwiGLU clamp 10), bf16, random weights, built from `DeepseekV4Config` as a bare
`DeepseekV4SparseMoeBlock`. Other families (--family NAME ..., or --family all for the four below),
each a bare block from its transformers config class, random bf16 weights, random routing biases:

  qwen3_30b_a3b   Qwen3MoeSparseMoeBlock: hidden 2048, moe_intermediate 768, 128 experts, top-8
  deepseek_v3     DeepseekV3MoE: hidden 7168, moe_intermediate 2048, 256 experts, top-8, n_group 8,
                  topk_group 4, routed scaling 2.5, one shared expert
  glm45_air       Glm4MoeMoE (GLM-4.5-Air): hidden 4096, moe_intermediate 1408, 128 experts, top-8,
                  one shared expert, n_group 1, topk_group 1
  mixtral         MixtralSparseMoeBlock (8x7B): hidden 4096, intermediate 14336, 8 experts, top-2

Their routers stay graph code and their experts run plain SwiGLU: the fused op takes the router's
ids and weights as they are (routed_scaling_factor 1.0, swiglu_limit None). Per token count,
milliseconds per forward (CUDA events around each call, median of --reps after --warmup calls):

  hf_eager        transformers, experts_implementation="eager" (Python loop; up to --eager-max tokens;
                  by default only for deepseek_v4)
  hf_grouped_mm   transformers, experts_implementation="grouped_mm", eager PyTorch
  hf_compile      hf_grouped_mm under torch.compile (inductor)
  hf_compile_ro   ... mode="reduce-overhead" (CUDA graphs)
  megamoe         megamoe_compile.prepare + torch.compile(backend="megamoe")
  megamoe_ro      ... mode="reduce-overhead"
  kernel          the routed experts alone: megamoe.fused_moe (DeepGEMM pre-dispatch + mega kernel),
                  CUDA-graph replay
  shared          the shared expert alone, CUDA-graph replay (blocks that have one)

Targets printed at the end. DeepSeek-V4: from 32 tokens up megamoe >= 1.8x faster than hf_compile
(also megamoe_ro vs hf_compile_ro); at 1 token megamoe_ro >= 3x faster than hf_compile_ro; the
block (megamoe_ro) <= 1.15 x (kernel + shared). Other families: megamoe >= 1.8x hf_compile at 32
to 512 tokens. Writes JSON to --out (default $OUT/bench.json or ./bench.json), and while running
to --out + ".partial"; several families run one after another in one process, memory freed
between them. Static shapes (one compile per token count) unless --dynamic. --dry-run: tiny
sizes on the CPU with the reference kernel (checks the code paths, times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from common import cos_diff, free_memory, graphed, log, time_ms, time_ms_cpu

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 4096, 2048, 256, 6
VARIANTS = ("hf_eager", "hf_grouped_mm", "hf_compile", "hf_compile_ro", "megamoe", "megamoe_ro", "kernel",
            "shared")
# name -> (title, hidden, moe_intermediate, experts, top_k, has a shared expert)
FAMILIES = {
    "deepseek_v4": ("DeepSeek-V4-Flash", HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, True),
    "qwen3_30b_a3b": ("Qwen3-30B-A3B", 2048, 768, 128, 8, False),
    "deepseek_v3": ("DeepSeek-V3", 7168, 2048, 256, 8, True),
    "glm45_air": ("GLM-4.5-Air", 4096, 1408, 128, 8, True),
    "mixtral": ("Mixtral-8x7B", 4096, 14336, 8, 2, False),
}
ISSUE_FAMILIES = ("qwen3_30b_a3b", "deepseek_v3", "glm45_air", "mixtral")
DRY = dict(hidden=256, intermediate=128)  # --dry-run sizes (experts 16, or 8 for mixtral; top-k <= 4)


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
        for _name, p in block.named_parameters():
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, device="cuda", generator=g, dtype=p.dtype).mul_(fan_in**-0.5))
        block.gate.e_score_correction_bias.normal_(0, 0.1, generator=g)
    return block, cfg


def family_shape(family: str, dry_run: bool) -> dict:
    title, hidden, intermediate, experts, top_k, shared = FAMILIES[family]
    if dry_run:
        hidden, intermediate = DRY["hidden"], DRY["intermediate"]
        experts, top_k = (8, 2) if family == "mixtral" else (16, min(top_k, 4))
    return dict(title=title, hidden=hidden, moe_intermediate=intermediate, experts=experts, top_k=top_k,
                shared_expert=shared)


def build_family_block(family: str, shape: dict, device: str, seed: int = 0):
    """A bare MoE block of `family` from its transformers config class, random bf16 weights (each
    parameter N(0, 1/fan_in), in place: DeepSeek-V3's experts alone are 22 GB) and random routing
    biases N(0, 0.1)."""
    h, i, e, k = shape["hidden"], shape["moe_intermediate"], shape["experts"], shape["top_k"]
    if family == "deepseek_v4":  # --dry-run only (the GPU run builds it with build_block, as before)
        from transformers import DeepseekV4Config
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

        cfg = DeepseekV4Config(hidden_size=h, moe_intermediate_size=i, n_routed_experts=e, num_experts_per_tok=k,
                               n_shared_experts=1, num_hidden_layers=1, mlp_layer_types=["moe"],
                               num_nextn_predict_layers=0)
        cfg._experts_implementation = "grouped_mm"
        with torch.device(device):
            block = DeepseekV4SparseMoeBlock(cfg, 0).to(torch.bfloat16)
        Block = None
    elif family == "qwen3_30b_a3b":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k,
                             norm_topk_prob=True, num_hidden_layers=1)
    elif family == "deepseek_v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block

        # n_group 8 / topk_group 4 / routed scaling 2.5 / norm_topk_prob: DeepseekV3Config's defaults (V3's).
        groups = dict(n_group=4, topk_group=2) if e < 64 else {}
        cfg = DeepseekV3Config(hidden_size=h, moe_intermediate_size=i, n_routed_experts=e, num_experts_per_tok=k,
                               n_shared_experts=1, num_hidden_layers=1, first_k_dense_replace=0, **groups)
    elif family == "glm45_air":
        from transformers import Glm4MoeConfig
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE as Block

        cfg = Glm4MoeConfig(hidden_size=h, moe_intermediate_size=i, n_routed_experts=e, num_experts_per_tok=k,
                            n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                            norm_topk_prob=True, num_hidden_layers=1, first_k_dense_replace=0)
    elif family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=k,
                            num_hidden_layers=1)
    else:
        raise ValueError(f"unknown family {family!r}")
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    if Block is not None:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # no float32 copy first (DeepSeek-V3: 45 GB)
        try:
            with torch.device(device):
                block = Block(cfg).to(torch.bfloat16)
        finally:
            torch.set_default_dtype(default_dtype)
    block.eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5, generator=g)
        for name, b in block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1, generator=g)
    return block, cfg


def run_family(family: str, args, variants: list[str], save_partial) -> dict:
    """Every variant of one family's block; returns its JSON object (meta, rows, targets, notes)."""
    import importlib

    import transformers

    import megamoe_compile as mc
    from megamoe_compile.ops import deepgemm

    v4 = family == "deepseek_v4"
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    timer = time_ms_cpu if dry else time_ms
    capture = (lambda fn: fn) if dry else graphed
    dynamic = None if args.dynamic else False
    t_start = time.perf_counter()
    shape = family_shape(family, dry)
    hidden = shape["hidden"]
    if v4 and not dry:
        block, cfg = build_block()
    else:
        block, cfg = build_family_block(family, shape, device)
    if not shape["shared_expert"]:
        variants = [v for v in variants if v != "shared"]
    max_tokens = max(args.tokens)
    xs = {t: torch.randn(1, t, hidden, device=device, dtype=torch.bfloat16) for t in args.tokens}
    results: dict[str, dict[int, float]] = {v: {} for v in variants}
    notes: dict[str, str] = {}
    accuracy: dict[int, float] = {}
    reference: dict[int, torch.Tensor] = {}

    def run_variant(name: str, fn_for_tokens, tokens=args.tokens):
        t0 = time.perf_counter()
        for t in tokens:
            try:
                fn = fn_for_tokens(t)
                results[name][t] = timer(fn, args.warmup, args.reps)
            except Exception as e:  # keep the rest of the table
                notes[f"{name}@{t}"] = f"{type(e).__name__}: {e}"[:300]
                log(f"  {name} T={t} failed: {notes[f'{name}@{t}']}")
        log(f"{family} {name}: {time.perf_counter() - t0:.1f} s  " +
            " ".join(f"{t}:{v:.3f}" for t, v in results[name].items()))
        save_partial({"family": family, "results": results, "notes": notes, "accuracy": accuracy})

    def set_impl(impl: str) -> None:
        block.experts.config._experts_implementation = impl

    def compile_kwargs(mode):
        # --dry-run: no inductor (C++ builds take minutes on a small CPU) and no CUDA graphs.
        return dict(backend="eager", dynamic=dynamic) if dry else dict(mode=mode, dynamic=dynamic)

    plan = None
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
                compiled = torch.compile(block, **compile_kwargs(mode))
                run_variant(name, lambda t, c=compiled: (lambda: c(xs[t])))
                del compiled

        # -- megamoe -------------------------------------------------------------------------
        if dry:
            config = mc.MegaMoEConfig(kernel="reference", recipe="fp8", inner_backend="eager",
                                      max_tokens_per_rank=max_tokens)
        else:
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
            notes["kernel"] = f"{plan.kernel}/{plan.recipe}"
            log(f"megamoe: {family} {plan.kernel}/{plan.recipe}, weights {plan.prepared_bytes / 2**30:.2f} GiB, "
                f"symmetric buffer {buffer_mib:.0f} MiB")
        for name, mode in (("megamoe", None), ("megamoe_ro", "reduce-overhead")):
            if name in results and plan.fuse:
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                if dry:
                    compiled = torch.compile(block, backend=mc.backend(config), dynamic=dynamic)
                else:
                    compiled = torch.compile(block, backend="megamoe", mode=mode, dynamic=dynamic)

                def make(t, c=compiled, name=name):
                    out = c(xs[t]).float()
                    if name == "megamoe":
                        accuracy[t] = cos_diff(out, reference[t])
                    return lambda: c(xs[t])

                run_variant(name, make)
                notes[f"{name}_fusions"] = str(torch._dynamo.utils.counters["megamoe"]["fused_moe"])
                del compiled, make

        # -- the parts alone -----------------------------------------------------------------
        if "kernel" in results and plan.fuse:
            prep = importlib.import_module("megamoe_compile.prepare")  # the module, not mc.prepare()

            weights = prep.kernel_weights(block.experts)
            if v4:
                scale, limit = plan.spec.routed_scaling_factor, plan.spec.swiglu_limit
            else:  # what the pass emits for routers that stay graph code: their weights as they are
                scale, limit = 1.0, None

            def kernel_for_tokens(t):
                x2 = xs[t].view(t, hidden)
                if v4:
                    _, w, idx = block.gate(xs[t])
                    idx, w = idx.to(torch.int32).contiguous(), (w / scale).float().contiguous()
                else:
                    _, w, idx = block.gate(x2)  # (logits, weights, ids): these families' routers
                    idx, w = idx.to(torch.int32).contiguous(), w.float().contiguous()
                return capture(lambda: torch.ops.megamoe.fused_moe(
                    x2, idx, w, weights.w1, weights.w1_scale, weights.w2, weights.w2_scale, plan.kernel,
                    plan.recipe, scale, limit, ""))

            run_variant("kernel", kernel_for_tokens)
            del weights
        if "shared" in results:
            run_variant("shared", lambda t: capture(lambda: block.shared_experts(xs[t].view(t, hidden))))

    # -- report ---------------------------------------------------------------------------------
    def get(name, t):
        return results.get(name, {}).get(t)

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    rows, targets = [], []
    for t in args.tokens:
        r = {"tokens": t, **{v: get(v, t) for v in variants}}
        r["speedup_vs_hf_compile"] = ratio(get("hf_compile", t), get("megamoe", t))
        r["speedup_ro_vs_hf_compile_ro"] = ratio(get("hf_compile_ro", t), get("megamoe_ro", t))
        parts = get("kernel", t)
        if shape["shared_expert"]:
            parts = None if parts is None or get("shared", t) is None else parts + get("shared", t)
        r["block_over_parts"] = ratio(get("megamoe_ro", t), parts)
        r["accuracy_vs_hf"] = accuracy.get(t)
        rows.append(r)
        if not v4:
            if 32 <= t <= 512:
                targets.append((f"{family} T={t}: megamoe >= 1.8x hf_compile", r["speedup_vs_hf_compile"], 1.8, ">="))
            continue
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
        "family": family, "title": shape["title"], "dry_run": dry,
        "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(),
        "capability": None if dry else torch.cuda.get_device_capability(),
        "torch": torch.__version__, "transformers": transformers.__version__, "deep_gemm": dg_version,
        "shape": {"hidden": shape["hidden"], "moe_intermediate": shape["moe_intermediate"],
                  "experts": shape["experts"], "top_k": shape["top_k"], "shared_expert": shape["shared_expert"]},
        "block": type(block).__name__, "kernel": None if plan is None else f"{plan.kernel}/{plan.recipe}",
        "warmup": args.warmup, "reps": args.reps, "statistic": "median", "dynamic": bool(args.dynamic),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = {"meta": meta, "rows": rows, "targets": target_rows, "notes": notes}

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    print(f"\n{meta['device']} | torch {meta['torch']} | transformers {meta['transformers']} | {dg_version}")
    s = meta["shape"]
    print(f"{shape['title']} MoE block ({meta['block']}: hidden {s['hidden']}, "
          f"moe_intermediate {s['moe_intermediate']}, "
          f"{s['experts']} experts, top-{s['top_k']}{', shared expert' if s['shared_expert'] else ''}), "
          f"ms per forward (median of {args.reps}); wall {meta['wall_s']} s")
    head = ["T", *variants, "x_vs_compile", "x_ro_vs_ro", "ro/(k+s)" if shape["shared_expert"] else "ro/k", "acc"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join([str(r["tokens"]), *(fmt(r[v]) for v in variants),
                          fmt(r["speedup_vs_hf_compile"], ".2f"), fmt(r["speedup_ro_vs_hf_compile_ro"], ".2f"),
                          fmt(r["block_over_parts"], ".2f"), fmt(r["accuracy_vs_hf"], ".1e")]))
    print(f"\ntargets ({family}):")
    for tr in target_rows:
        state = "n/a" if tr["met"] is None else ("MET" if tr["met"] else "MISSED")
        print(f"  {state:6s} {tr['target']}: {fmt(tr['value'], '.2f')}")
    if notes:
        print("notes:", json.dumps(notes))
    sys.stdout.flush()

    # Free everything of this family before the next one is built.
    block = xs = reference = None  # free the GPU memory before the next family
    if not dry:
        deepgemm.release_buffers()
    free_memory()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", "--families", nargs="+", default=["deepseek_v4"], dest="family",
                        choices=[*FAMILIES, "all"],
                        help="block(s) to measure, one after another; 'all' = " + " ".join(ISSUE_FAMILIES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048])
    parser.add_argument("--eager-max", type=int, default=128, help="largest token count for hf_eager")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                        help="default: all for deepseek_v4; all but hf_eager for the other families")
    parser.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=None) instead of False")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: skip the remaining families (recorded as skipped) when the next one "
                             "would likely not finish in time (estimate: the slowest family so far)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU, reference kernel, no inductor/CUDA graphs: checks the code paths")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench.json"))
    args = parser.parse_args()
    families = [f for name in args.family for f in (ISSUE_FAMILIES if name == "all" else (name,))]
    families = list(dict.fromkeys(families))
    if args.dry_run:
        if args.tokens == parser.get_default("tokens"):
            args.tokens = [1, 8, 32]
        args.warmup, args.reps = min(args.warmup, 1), min(args.reps, 2)
        torch.set_num_threads(min(2, torch.get_num_threads()))
    elif not torch.cuda.is_available():
        log("bench_moe_block: needs a CUDA GPU (or --dry-run)")
        return 2

    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    t_start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    done: list[dict] = []
    skipped: dict[str, str] = {}
    slowest = 0.0

    def document(current=None) -> dict:
        if len(families) == 1 and done and current is None:
            return done[0]  # one family: today's format (meta, rows, targets, notes)
        return {"families": done, "in_progress": current, "skipped": skipped,
                "wall_s": round(time.perf_counter() - t_start, 1)}

    def save_partial(current) -> None:
        with open(args.out + ".partial", "w") as f:  # survives a run cut short
            json.dump(document(current), f)

    for family in families:
        elapsed = time.perf_counter() - t_start
        if args.time_budget is not None and done and elapsed + slowest > args.time_budget:
            skipped[family] = f"time budget: {elapsed:.0f} s spent, the slowest family took {slowest:.0f} s"
            log(f"{family}: skipped ({skipped[family]})")
            continue
        variants = list(args.variants) if args.variants else \
            [v for v in VARIANTS if family == "deepseek_v4" or v != "hf_eager"]
        t0 = time.perf_counter()
        try:
            done.append(run_family(family, args, variants, save_partial))
        except Exception as e:  # keep the other families
            import traceback

            traceback.print_exc()
            done.append({"meta": {"family": family}, "error": f"{type(e).__name__}: {e}"[:500]})
            free_memory()
        slowest = max(slowest, time.perf_counter() - t0)
        with open(args.out, "w") as f:  # written as it goes
            json.dump(document(), f, indent=2)

    if len(families) > 1:
        print("\nsummary: block megamoe / hf_compile speedup (target >= 1.8x at 32-512 tokens)")
        for out in done:
            fam = out["meta"]["family"]
            if "error" in out:
                print(f"  {fam}: error {out['error']}")
                continue
            def speedup(r):
                return "-" if r["speedup_vs_hf_compile"] is None else format(r["speedup_vs_hf_compile"], ".2f")
            cells = " ".join(f"T={r['tokens']}:{speedup(r)}" for r in out["rows"])
            met = [t["met"] for t in out["targets"] if "megamoe >= 1.8x hf_compile" in t["target"]]
            state = "n/a" if not met or None in met else ("MET" if all(met) else "MISSED")
            print(f"  {state:6s} {fam}: {cells}")
        for fam, why in skipped.items():
            print(f"  skipped {fam}: {why}")
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
