"""Host time of one `megamoe.fused_moe` call at one token: what the argument checks cost.

    python benchmarks/op_host_time.py [--reps 2000] [--device cuda]

At one token a fused MoE call is host-bound outside CUDA graphs. The op checks its arguments
(`check_arguments`: about 25 checks) once per argument signature (shapes, dtypes, devices) and
on later calls only views the weights in the recipe's dtypes (`checked_arguments`). Measured with
the reference kernel and a tiny layer (8 experts, hidden 64) on `--device` (cpu, or cuda: the
same checks on GPU tensors, whose host time is what a GPU call outside CUDA graphs pays): the
checks alone, the per-signature path, and a whole op call (synchronised, on cuda). Prints a table
and writes JSON ($OUT when set).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import time

import torch

import megamoe_compile  # noqa: F401  (defines torch.ops.megamoe.*)

fused_moe = importlib.import_module("megamoe_compile.ops.fused_moe")  # the module, not the op of that name


def per_call_us(fn, reps: int) -> float:
    for _ in range(reps // 10):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        runs.append((time.perf_counter() - start) / reps * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    experts, hidden, intermediate, top_k = 8, 64, 32, 2
    call = tuple(None if t is None else t.to(args.device) for t in (
        torch.randn(1, hidden), torch.randint(0, experts, (1, top_k), dtype=torch.int32), torch.rand(1, top_k),
        torch.randn(experts, 2 * intermediate, hidden), None, torch.randn(experts, hidden, intermediate), None))

    def op_call():
        torch.ops.megamoe.fused_moe(*call, kernel="reference", recipe="none", routed_scaling_factor=1.0,
                                    swiglu_limit=None)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = {
        "check_arguments (every check)": per_call_us(lambda: fused_moe.check_arguments(*call, "reference", "none"),
                                                     args.reps),
        "checked_arguments (signature seen)": per_call_us(
            lambda: fused_moe.checked_arguments(*call, "reference", "none"), args.reps),
        "torch.ops.megamoe.fused_moe (reference, 1 token)": per_call_us(op_call, args.reps // 4),
    }
    width = max(map(len, rows))
    for name, us in rows.items():
        print(f"{name:<{width}}  {us:8.1f} us")
    path = os.path.join(os.environ.get("OUT", "."), "op_host_time.json")
    with open(path, "w") as f:
        json.dump({"us_per_call": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
