"""Expert parallelism: one process per GPU (or CPU process over gloo), experts split over ranks.

    torchrun --nproc-per-node 2 examples/expert_parallel.py                    # GPUs, NCCL
    torchrun --nproc-per-node 2 examples/expert_parallel.py --device cpu       # gloo, reference kernel
    torchrun --nproc-per-node 2 examples/expert_parallel.py --mode shared_batch

"local_batch": each rank generates from its own prompts (data-parallel attention + expert
parallelism, what MegaMoE is built for); `generate(synced_gpus=True)` keeps a rank that finished
stepping until every rank is done, so the fused layers' collectives never wait on a missing rank.
"shared_batch": every rank holds the same prompts; each fuses a slice of the tokens.
Each rank checks its tokens against the same model run without megamoe on that rank.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
from demo import build_model

import megamoe_compile as mc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", default="local_batch", choices=["local_batch", "shared_batch"])
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")

    rank = int(os.environ["RANK"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(device, dtype, layers=3)  # same seed on every rank: the same model
    if args.mode == "local_batch":  # different prompts and lengths per rank
        prompts = torch.randint(0, 1024, (1 + rank % 2, 5 + 3 * rank), generator=torch.Generator().manual_seed(rank))
        new_tokens = args.new_tokens + 2 * rank
    else:
        prompts = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(0))
        new_tokens = args.new_tokens
    prompts = prompts.to(device)

    with torch.no_grad():
        expected = model.generate(prompts, max_new_tokens=new_tokens, do_sample=False)

    config = mc.MegaMoEConfig(ep_mode=args.mode)
    mc.prepare(model, config)
    model.forward = torch.compile(model.forward, backend="megamoe", dynamic=True)
    with torch.no_grad():
        got = model.generate(prompts, max_new_tokens=new_tokens, do_sample=False, synced_gpus=True)
    plans = mc.layer_plans(model)
    fused = [p for p in plans if p.fuse]
    agree = (got == expected).float().mean().item()
    print(f"rank {rank}/{world}: {len(fused)} of {len(plans)} MoE layers fused "
          f"({fused[0].kernel}/{fused[0].recipe}, experts {fused[0].local_experts}); "
          f"{got.shape[1] - prompts.shape[1]} new tokens, agreement with the unfused model {agree:.0%}",
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
