"""How often DeepSeek-V4's indexer scores tie exactly at its top-k boundary during decode.

    python benchmarks/indexer_ties.py [--heads 1,2,4,16,64] [--seeds 4] [--batch 4] [--new-tokens 32]

`DeepseekV4IndexerScorer` scores entry s for query t as sum_h w_h * ReLU(q_h . k_s): an entry that
every head scores <= 0 gets exactly 0, so several entries can tie at exactly 0. Where such a tie
straddles the top-k boundary, which of the tied entries top-k keeps depends on the length of the
list it runs over; our static decode runs top-k over the whole fixed-size pool, transformers over
the entries so far, so they may keep different entries (v4_static_decode's module doc).

Measured on transformers' own decode (dynamic cache, eager, CPU, float32) of tiny random V4 models
(CSA every 4 tokens, index top-3, the static-decode tests' geometry) per number of index heads: of
the (decode step, sequence, CSA layer) cases where there are more entries than k, the fraction whose
k-th and (k+1)-th best scores are equal. Prints a table and writes JSON (to $OUT when set).
Random weights: a trained model's frequency is its own (real V4 has 64 index heads).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

VOCAB = 128
TOPK = 3


def model(heads: int, seed: int) -> DeepseekV4ForCausalLM:
    config = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        head_dim=32, q_lora_rank=32, o_groups=1, o_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2,
        num_nextn_predict_layers=0, index_n_heads=heads, index_head_dim=8, index_topk=TOPK, sliding_window=6,
        hc_mult=2, hc_sinkhorn_iters=2, mlp_layer_types=["moe", "moe"],
        layer_types=["compressed_sparse_attention", "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    )
    torch.manual_seed(seed)
    return DeepseekV4ForCausalLM(config).eval()


def count(heads: int, seeds: int, batch: int, new_tokens: int) -> dict:
    cases = ties = zero_ties = 0
    for seed in range(seeds):
        m = model(heads, seed)

        def hook(module, args, scores):
            nonlocal cases, ties, zero_ties
            if scores.shape[1] != 1 or scores.shape[-1] <= TOPK:  # decode steps with more entries than k
                return
            top = scores[:, 0].sort(dim=-1, descending=True).values
            tied = top[:, TOPK - 1] == top[:, TOPK]
            cases += tied.numel()
            ties += int(tied.sum())
            zero_ties += int((tied & (top[:, TOPK] == 0)).sum())

        handles = [mod.register_forward_hook(hook) for mod in m.modules()
                   if type(mod).__name__ == "DeepseekV4IndexerScorer"]
        ids = torch.randint(0, VOCAB, (batch, 8), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
        for h in handles:
            h.remove()
    return {"index_heads": heads, "cases": cases, "boundary_ties": ties, "ties_at_zero": zero_ties,
            "fraction": ties / cases if cases else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", default="1,2,4,16,64")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="indexer_ties.json")
    args = parser.parse_args()
    rows = [count(int(h), args.seeds, args.batch, args.new_tokens) for h in args.heads.split(",")]
    print(f"{'index heads':>11} {'cases':>7} {'ties at k':>9} {'at zero':>7} {'fraction':>9}")
    for r in rows:
        print(f"{r['index_heads']:>11} {r['cases']:>7} {r['boundary_ties']:>9} {r['ties_at_zero']:>7} "
              f"{r['fraction']:>9.4f}")
    path = os.path.join(os.environ.get("OUT", "."), args.out)
    with open(path, "w") as f:
        json.dump({"topk": TOPK, "rows": rows, "args": vars(args)}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
