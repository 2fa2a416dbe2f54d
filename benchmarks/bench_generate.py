"""End to end: generate() tokens per second on a multi-layer GPU-sized DeepSeek-V4 (random weights).

    python benchmarks/bench_generate.py [--layers 4] [--batch 4] [--new-tokens 48] [--out gen.json]
                                        [--variants hf_eager,torch_compile,megamoe]

Variants, in one run on the same model: HF eager (grouped_mm experts), plain torch.compile
(inductor), and the megamoe backend. Each compiled variant runs one untimed generate() first
(compilation), then a timed one with the same shapes. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
import warnings

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

import megamoe_compile as mc

VARIANTS = ("hf_eager", "torch_compile", "megamoe")


def build(layers: int) -> DeepseekV4ForCausalLM:
    config = DeepseekV4Config(
        vocab_size=8192, hidden_size=2048, moe_intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=16, head_dim=128, q_lora_rank=512, o_groups=4, o_lora_rank=256,
        n_routed_experts=64, num_experts_per_tok=6, num_nextn_predict_layers=0, index_n_heads=4,
        index_head_dim=64, index_topk=32, sliding_window=128, hc_mult=2,
        mlp_layer_types=["hash_moe"] * 2 + ["moe"] * (layers - 2), layer_types=["sliding_attention"] * layers,
    )
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                gate.tid2eid.copy_(torch.stack([torch.randperm(gate.num_experts)[: gate.top_k]
                                                for _ in range(config.vocab_size)]).to(gate.tid2eid))
    return model


def timed_generate(model, prompts, new_tokens):
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of " + ",".join(VARIANTS) + " (hf_eager always runs first: "
                             "it is the reference for token agreement)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_generate.json"))
    args = parser.parse_args()
    variants = ["hf_eager"] + [v for v in args.variants.split(",") if v and v != "hf_eager"]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    warnings.filterwarnings("ignore")

    model = build(args.layers)
    original_forward = model.forward
    prompts = torch.randint(0, 8192, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1)).cuda()
    rows, reference = {}, None
    for variant in variants:
        torch._dynamo.reset()
        model.forward = original_forward
        try:
            start = time.perf_counter()
            if variant == "torch_compile":
                model.forward = torch.compile(original_forward, dynamic=True)
            elif variant == "megamoe":
                mc.prepare(model, mc.MegaMoEConfig())
                model.forward = torch.compile(original_forward, backend="megamoe", dynamic=True)
            if variant != "hf_eager":
                timed_generate(model, prompts, args.new_tokens)  # compile
            warm = time.perf_counter() - start
            out, seconds = timed_generate(model, prompts, args.new_tokens)
            generated = out[:, args.prompt:]
            if reference is None:
                reference = generated
            rows[variant] = {
                "tokens_per_s": args.batch * args.new_tokens / seconds, "seconds": seconds,
                "compile_s": warm, "agreement_with_eager": (generated == reference).float().mean().item(),
            }
            if variant == "megamoe":
                rows[variant]["fused_layers"] = sum(p.fuse for p in mc.layer_plans(model))
        except Exception as e:
            traceback.print_exc()
            rows[variant] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(variant, rows[variant], flush=True)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\ngenerate(): {args.layers} layers, hidden 2048, 64 experts top-6, bf16, batch {args.batch}, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, {result['device']}")
    print("variant | tokens/s | s | compile+first s | agreement with eager")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name} | error: {row['error']}")
        else:
            print(f"{name} | {row['tokens_per_s']:.1f} | {row['seconds']:.2f} | {row['compile_s']:.1f} | "
                  f"{row['agreement_with_eager']:.2f}")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
