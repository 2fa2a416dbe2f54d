#!/usr/bin/env python3
"""Accuracy of the quantized recipes on a small DeepSeek-V4, on CPU (reference kernel).

Model: `DeepseekV4ForCausalLM` from `DeepseekV4Config` with random weights (transformers' own
initialisation), hidden 256, moe_intermediate 256, 16 routed experts, top-4, one shared expert,
4 decoder layers (2 hash-routed, 2 top-k), vocab 1024, bf16. Random hash tables and router biases so
routing differs across tokens. Several seeds.

For each recipe of `MegaMoEConfig(kernel="reference", recipe=...)` - "none" (the bf16 weights),
"fp8" (FP8 e4m3 weights per 128x128 block, FP8 activations per 1x128: the SM90 kernel's numerics)
"fp8_fp4" (MXFP4 weights, FP8 activations per 1x32 with power-of-two scales: the SM100
kernel's numerics) and "fp4_fp4" (the opt-in w4a4 mode: the same MXFP4 weights, MXFP4 activations
per 1x32 as DeepGEMM's pre-dispatch and L1 epilogue make them) - the compiled model is compared
with eager bf16 Hugging Face:

  layer    diff (below) of one top-k layer's routed-experts output against HF's bf16 experts on
           the same tokens and routing: the kernel's numerics alone
  rel      ||y - x|| / ||x|| of the logits (teacher-forced batch)
  diff     1 - 2*sum(x*y) / sum(x*x + y*y) of the logits (DeepGEMM's calc_diff)
  top1     fraction of positions whose argmax (next token) agrees, teacher-forced
  greedy   fraction of generated tokens equal to eager's (`generate(do_sample=False)`, position by
           position; a sequence that diverges once usually stays diverged)
  prefix   mean number of generated tokens before the first difference

Two weight sets per seed:
  bf16-native  the experts hold bf16 random weights; the FP4 recipe quantizes them (weight and
               activation error).
  fp4-native   the experts' weights are first snapped to MXFP4 values (as in the released
               DeepSeek-V4 checkpoints, whose experts are FP4), and eager runs those exact values in
               bf16; the FP4 recipe then adds activation quantization only.
A row "bf16 vs fp32" gives the yardstick: eager float32 against eager bf16, same weights.

Run:  python benchmarks/fp4_accuracy.py [--seeds 0 1 2 3 4] [--new-tokens 32] [--json out.json]
Takes a few minutes on 2 CPU cores (dynamo traces each recipe's model once; see RecipeModels).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import megamoe_compile as mc
from megamoe_compile import models
from megamoe_compile.ops import layouts, quant

RECIPES = ("none", "fp8", "fp8_fp4", "fp4_fp4")
VOCAB = 1024
SIZES = dict(hidden=256, intermediate=256, experts=16, top_k=4, layers=4, hash_layers=2)


def build_model(seed: int, dtype=torch.bfloat16):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    s = SIZES
    cfg = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=s["hidden"], moe_intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=4, head_dim=64, q_lora_rank=64, o_groups=2,
        o_lora_rank=32, n_routed_experts=s["experts"], num_experts_per_tok=s["top_k"],
        num_nextn_predict_layers=0, index_n_heads=2, index_head_dim=32, index_topk=8, sliding_window=64,
        hc_mult=2, hc_sinkhorn_iters=2,
        mlp_layer_types=["hash_moe"] * s["hash_layers"] + ["moe"] * (s["layers"] - s["hash_layers"]),
        layer_types=["sliding_attention"] * s["layers"],
    )
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                gate.tid2eid.copy_(torch.stack([torch.randperm(gate.num_experts, generator=g)[: gate.top_k]
                                                for _ in range(VOCAB)]))
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn(gate.num_experts, generator=g) * 0.1)
    return model


def snap_experts_to_mxfp4(model) -> None:
    """Replace every routed expert weight by its MXFP4 value (exact in bf16)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                w.copy_(quant.dequantize_mxfp4(*quant.quantize_mxfp4(w.float())).to(w.dtype))


class DequantizedWeightCache:
    """Memoize the reference kernel's per-call dequantization of expert weights (speed only).

    `reference.expert_weight` rebuilds an expert's float32 weight from FP8/MXFP4 storage on every
    call; the result depends only on the stored tensors, so caching it is bit-identical and makes
    CPU generation several times faster. Cleared for every model and recipe.
    """

    def __init__(self):
        from megamoe_compile.ops import reference

        self.module, self.original, self.cache = reference, reference.expert_weight, {}

    def __enter__(self):
        def cached(w, scale, recipe, e):
            if recipe == "none":
                return self.original(w, scale, recipe, e)
            key = (w.data_ptr(), None if scale is None else scale.data_ptr(), recipe, e)
            if key not in self.cache:
                self.cache[key] = self.original(w, scale, recipe, e)
            return self.cache[key]

        self.module.expert_weight = cached
        return self

    def __exit__(self, *exc):
        self.module.expert_weight = self.original
        self.cache.clear()


def logit_metrics(x: torch.Tensor, y: torch.Tensor) -> dict:
    x, y = x.double(), y.double()
    return {
        "rel": ((y - x).norm() / x.norm()).item(),
        "diff": (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item(),
        "top1": (x.argmax(-1) == y.argmax(-1)).double().mean().item(),
    }


def layer_diff(reference, fp32, recipe: str, seed: int, source: str = "dense") -> float:
    """`diff` of one top-k layer's routed-experts output against Hugging Face's bf16 experts, on
    256 N(0, 1) tokens routed by the layer's own router: the kernel numerics without the rest of
    the model. recipe "fp32" = the same experts in float32. source "mxfp4": build the recipe's
    weights from MXFP4 storage (as from an FP4 checkpoint) instead of from the bf16 weights."""
    block = reference.model.layers[-1].mlp
    x = torch.randn(256, SIZES["hidden"], generator=torch.Generator().manual_seed(seed)).bfloat16()
    _, weights, indices = block.gate(x)
    expected = block.experts(x, indices, weights)
    if recipe == "fp32":
        got = fp32.model.layers[-1].mlp.experts(x.float(), indices, weights.float())
    else:
        src = models.fp8_checkpoints.checkpoint_weights(block.experts, "dense")
        if source == "mxfp4":  # lossless for weights already on the MXFP4 grid
            (p1, s1), (p2, s2) = (quant.quantize_mxfp4(t.float()) for t in (src.w1, src.w2))
            src = layouts.KernelWeights(p1, s1, p2, s2)
        w = layouts.to_recipe(src, source, recipe)
        got = torch.ops.megamoe.fused_moe(x, indices.int(), weights.float(), w.w1, w.w1_scale, w.w2, w.w2_scale,
                                          kernel="reference", recipe=recipe, routed_scaling_factor=1.0,
                                          swiglu_limit=block.experts.limit)
    return logit_metrics(expected, got)["diff"]


def greedy_metrics(expected: torch.Tensor, got: torch.Tensor, prompt_len: int) -> dict:
    e, g = expected[:, prompt_len:], got[:, prompt_len:]
    same = e == g
    prefix = [int(row.long().cumprod(0).sum()) for row in same]
    return {"greedy": same.double().mean().item(), "prefix": statistics.mean(prefix)}


class RecipeModels:
    """One model per recipe, prepared with `MegaMoEConfig(kernel="reference", recipe=...)` and
    compiled once (dynamic shapes) with the megamoe backend. Each seed's weights are loaded into
    every model: `load_state_dict` rebuilds the kernel-ready copies at load time, and dynamo's
    graphs, which read them as the model's own buffers, stay valid (no retrace per seed)."""

    def __init__(self, seed: int, recipes):
        self.models, self.backends = {}, {}
        for recipe in recipes:
            config = mc.MegaMoEConfig(kernel="reference", recipe=recipe, inner_backend="eager")
            model = build_model(seed)
            mc.prepare(model, config)
            self.backends[recipe] = mc.backend(config)
            model.forward = torch.compile(model.forward, backend=self.backends[recipe], dynamic=True)
            self.models[recipe] = model

    def load(self, state_dict) -> None:
        for model in self.models.values():
            model.load_state_dict(state_dict)

    def check_fused(self) -> None:
        for recipe, be in self.backends.items():
            not_fused = [f.reason for f in be.fusions if not f.fused]
            if not be.fusions or not_fused:
                raise RuntimeError(f"recipe {recipe}: {len(be.fusions)} MoE layers seen, not fused: {not_fused}")


def run_seed(models: RecipeModels, seed: int, native: str, args) -> list[dict]:
    """Eager bf16 (and float32) on a fresh model of this seed; the compiled recipes on `model`
    with the same weights copied in."""
    reference = build_model(seed)
    if native == "fp4":
        snap_experts_to_mxfp4(reference)
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=g)
    prompt = ids[:, : args.prompt]
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    rows = []
    with torch.no_grad():
        eager_logits = reference(ids).logits
        eager_tokens = reference.generate(prompt, **generate)
        fp32 = copy.deepcopy(reference).float()
        row = {"seed": seed, "weights": native, "recipe": "bf16 vs fp32"}
        row.update(logit_metrics(eager_logits, fp32(ids).logits))
        row.update(greedy_metrics(eager_tokens, fp32.generate(prompt, **generate), args.prompt))
        row["layer"] = layer_diff(reference, fp32, "fp32", seed)
        rows.append(row)
        del fp32

        models.load(reference.state_dict())
        for recipe in RECIPES:
            model = models.models[recipe]
            with DequantizedWeightCache():
                logits = model(ids).logits
                tokens = model.generate(prompt, **generate)
            models.check_fused()
            row = {"seed": seed, "weights": native, "recipe": recipe}
            row.update(logit_metrics(eager_logits, logits))
            row.update(greedy_metrics(eager_tokens, tokens, args.prompt))
            row["layer"] = layer_diff(reference, None, recipe, seed)
            if native == "fp4" and recipe == "fp8":
                row["layer_from_mxfp4"] = layer_diff(reference, None, recipe, seed, source="mxfp4")
            rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    keys = ("layer", "rel", "diff", "top1", "greedy", "prefix")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["weights"], r["recipe"]), []).append(r)
    return [{"weights": w, "recipe": rec, "seeds": len(rs), **{k: statistics.mean(r[k] for r in rs) for k in keys}}
            for (w, rec), rs in groups.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence for the logit comparison")
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens for generation")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    start = time.perf_counter()
    # One model per recipe, compiled once; each seed's weights are loaded into them (RecipeModels).
    models = RecipeModels(args.seeds[0], RECIPES)
    rows = []
    for native in ("bf16", "fp4"):
        for seed in args.seeds:
            rows += run_seed(models, seed, native, args)
    summary = summarize(rows)
    elapsed = time.perf_counter() - start

    print(f"DeepSeek-V4 (random weights) {SIZES}, vocab {VOCAB}, bf16, CPU reference kernel; "
          f"seeds {args.seeds}; logits on {args.batch}x{args.seq} tokens; greedy {args.new_tokens} tokens "
          f"after {args.prompt}-token prompts x{args.batch}")
    header = (f"{'weights':<11} {'recipe':<13} {'layer diff':>10} {'rel':>8} {'diff':>10} {'top1':>7} {'greedy':>7} "
              f"{'prefix':>7}")
    print(header)
    print("-" * len(header))
    for s in summary:
        print(f"{s['weights'] + '-native':<11} {s['recipe']:<13} {s['layer']:10.2e} {s['rel']:8.4f} {s['diff']:10.2e} "
              f"{s['top1']:7.3f} {s['greedy']:7.3f} {s['prefix']:7.1f}")
    from_mxfp4 = [r["layer_from_mxfp4"] for r in rows if "layer_from_mxfp4" in r]
    if from_mxfp4:
        print(f"fp4-native, recipe fp8 built from MXFP4 storage (exact power-of-two conversion, as from an "
              f"FP4 checkpoint): layer diff {statistics.mean(from_mxfp4):.2e}")
    result = {"model": {**SIZES, "vocab": VOCAB, "dtype": "bfloat16"},
              "graphs_traced": sum(len(be.graphs) for be in models.backends.values()),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "torch": torch.__version__, "elapsed_s": round(elapsed, 1),
              "summary": summary, "rows": rows}
    print(json.dumps(result["summary"], indent=1))
    print(f"elapsed {elapsed:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
