"""Demo: build a small DeepSeek-V4, prepare it, compile it with backend="megamoe", and report.

    python examples/demo.py                      # CPU: reference kernel, inductor for the rest
    python examples/demo.py --inner-backend eager   # faster start on a small machine
    python examples/demo.py --device cuda        # Hopper GPU with sgl-deep-gemm: DeepGEMM kernel

Prints the per-layer report (what was fused, and why not), the error against eager
Hugging Face, how often their greedy next tokens agree, and the time of a forward pass of each.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

import megamoe_compile as mc


def build_model(device: str, dtype: torch.dtype, layers: int) -> DeepseekV4ForCausalLM:
    config = DeepseekV4Config(
        # hidden 512: DeepGEMM's SM90 buffer layout refuses hidden 256 (seen on an H100).
        vocab_size=1024, hidden_size=512, moe_intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=64,
        n_routed_experts=16, num_experts_per_tok=4, num_nextn_predict_layers=0,
        index_n_heads=2, index_head_dim=32, index_topk=8, sliding_window=64, hc_mult=2,
        mlp_layer_types=["hash_moe"] * min(2, layers) + ["moe"] * max(0, layers - 2),
        layer_types=["sliding_attention"] * layers,
    )
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # random hash tables: hash layers route tokens to different experts
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                gate.tid2eid.copy_(torch.stack([torch.randperm(gate.num_experts)[: gate.top_k]
                                                for _ in range(config.vocab_size)]))
    return model


def timed(fn, repeats: int = 5) -> float:
    fn()  # warm-up (and compilation for the compiled model)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="default: float32 on CPU (the reference kernel is exact there), bfloat16 on GPU")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of the prompt")
    parser.add_argument("--inner-backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # transformers' MoE code calls an lru_cache'd version check that dynamo warns about; harmless.
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    dtype = getattr(torch, args.dtype)
    model = build_model(args.device, dtype, args.layers)
    ids = torch.randint(0, model.config.vocab_size, (2, args.tokens),
                        generator=torch.Generator().manual_seed(1)).to(args.device)
    print(f"model: DeepSeek-V4, {args.layers} layers, 16 experts top-4, {args.dtype} on {args.device}")

    config = mc.MegaMoEConfig(skip_layers=[0], inner_backend=args.inner_backend)
    start = time.perf_counter()
    mc.prepare(model, config)
    print(f"prepare: {time.perf_counter() - start:.2f} s")

    report = mc.explain(model, ids)
    print()
    print(report)
    print()
    print("rewritten code of one fused layer:")
    fused = report.fused[0]
    graph = next(g for g in report.graphs if any(f.name == fused.name for f in g.fusions))
    print("  " + graph.layer_code(fused.name).replace("\n", "\n  "))
    print()

    compiled = torch.compile(model, backend="megamoe")  # uses the config the model was prepared with
    if args.inner_backend == "inductor" and args.device == "cpu":
        print("compiling: inductor generates C++ for the rest of the model (a minute or two on 2 cores)...")
    with torch.no_grad():
        start = time.perf_counter()
        got = compiled(ids).logits
        print(f"compile ({args.inner_backend} for the rest of the graph): {time.perf_counter() - start:.1f} s")
        expected = model(ids).logits
        err = (got.float() - expected.float()).norm() / expected.float().norm()
        print(f"logits vs eager Hugging Face: max abs diff {(got - expected).abs().max().item():.3e}, "
              f"relative error {err.item():.3e}")
        agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        print(f"greedy next-token agreement with eager: {agree:.0%}")
        eager_ms = timed(lambda: model(ids))
        compiled_ms = timed(lambda: compiled(ids))
    print(f"forward time: eager {eager_ms:.1f} ms, megamoe-compiled {compiled_ms:.1f} ms "
          f"({args.device}; the CPU runs the reference kernel, speed is a GPU matter)")


if __name__ == "__main__":
    main()
