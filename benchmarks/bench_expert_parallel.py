#!/usr/bin/env python3
"""Expert parallelism at DeepSeek-V4-Flash MoE sizes: megamoe EP on 1, 2, 4 GPUs vs transformers' own EP.

The block: `layers[0].mlp` of a 1-layer DeepseekV4ForCausalLM (hidden 4096, moe_intermediate 2048,
256 experts, top-6 sqrtsoftplus top-k router, one shared expert), bf16, seeded random weights, the
same on every rank. One launcher spawns each world size of --worlds in turn (torch.multiprocessing,
one process per GPU, NCCL, file rendezvous). Per world and tokens per rank T: ms per block forward
(CUDA events around each call, mean of --iters after --warmup; tables show the slowest rank) of

  megamoe_ep         mc.prepare(ep_mode="local_batch", release_original_weights=True) + torch.compile(
                     backend="megamoe"); each rank its own T tokens (world 1: ep_mode="none")
  megamoe_ep_graphs  the same with mode="reduce-overhead" (CUDA graphs)
  hf_grouped_mm      world 1: the plain block, experts_implementation="grouped_mm", eager
  hf_ep              transformers' EP, eager: DistributedConfig(tp_size=N, ep_size=N), the model's
                     base_model_ep_plan, ep_implementation="auto". Its inference EP wants the group to
                     share one batch (auto -> AllReduceEP), so there every rank holds the same T tokens.
  hf_ep_compile      hf_ep under torch.compile

plus memory per rank, and the error of each against the unfused block (1 - 2 sum(xy) / sum(x^2 + y^2)).
Targets: hf_ep / megamoe_ep >= 2 at T <= 32; megamoe_ep(N GPUs) / megamoe_ep(1 GPU) <= 1.15.

    source .gpu/setup.sh && python3 benchmarks/bench_expert_parallel.py --worlds 1,2
    python3 benchmarks/bench_expert_parallel.py --device cpu --worlds 1,2   # smoke: gloo, reference kernel

JSON: --out (default $OUT/bench_expert_parallel.json).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import shutil
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import cos_diff

# NVLink multicast must stay off (the GPU machines set these too).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
FLASH = {"hidden": 4096, "intermediate": 2048, "experts": 256, "top_k": 6, "tokens": "1,8,32,128,256"}
SMOKE = {"hidden": 256, "intermediate": 128, "experts": 8, "top_k": 2, "tokens": "1,4"}
VARIANTS = ("hf_grouped_mm", "megamoe_ep", "megamoe_ep_graphs", "hf_ep", "hf_ep_compile")
HF_EP = {"hf_ep", "hf_ep_compile"}
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--worlds", help='world sizes, run in turn (default "1,2"; "1,2,4" with 4 GPUs)')
    p.add_argument("--tokens", help="tokens per rank (default 1,8,32,128,256; --device cpu: 1,4)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    for name in ("hidden", "intermediate", "experts", "top-k"):
        p.add_argument(f"--{name}", type=int, help="default: V4-Flash (--device cpu: tiny)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--hf-load", choices=["auto", "from_pretrained", "distribute"], default="auto",
                   help="hf_ep: from_pretrained(distributed_config=) of a saved checkpoint (needs accelerate), or "
                        "its two EP steps on the model built in place; auto: the first if accelerate is there")
    p.add_argument("--inner-backend", choices=["inductor", "aot_eager", "eager"],
                   help="compiler around the fused op and for hf_ep_compile (default inductor; cpu: eager)")
    p.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=None), not one compile per T")
    p.add_argument("--time-limit", type=float, default=500.0, help="seconds for all worlds")
    p.add_argument("--pg-timeout", type=float, default=300.0, help="process-group timeout, seconds")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_expert_parallel.json"))
    a = p.parse_args(argv)
    sizes = FLASH if a.device == "cuda" else SMOKE
    for key in ("hidden", "intermediate", "experts", "top_k"):
        setattr(a, key, getattr(a, key) or sizes[key])
    a.tokens = [int(t) for t in (a.tokens or sizes["tokens"]).split(",")]
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0  # NVML: no CUDA context in the launcher
    a.worlds = [int(w) for w in (a.worlds or ("1,2,4" if gpus >= 4 else "1,2")).split(",")]
    a.variants = [v for v in a.variants.split(",") if v]
    if unknown := set(a.variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    a.inner_backend = a.inner_backend or ("inductor" if a.device == "cuda" else "eager")
    a.hf_load_note = ""
    if a.hf_load == "auto":
        a.hf_load = "from_pretrained" if importlib.util.find_spec("accelerate") else "distribute"
        if a.hf_load == "distribute":
            a.hf_load_note = ("accelerate is not installed and from_pretrained(distributed_config=...) needs it "
                              "(device_map): ran the steps from_pretrained runs on the model built in place")
    return a


# -- the model --------------------------------------------------------------------------------

def build_model(a, device: torch.device):
    """1-layer DeepseekV4ForCausalLM at the MoE sizes of `a` (attention tiny: only the MoE block is
    timed). The block's weights come from a seeded generator, so every rank builds the same block."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(
        vocab_size=1024, hidden_size=a.hidden, moe_intermediate_size=a.intermediate, num_hidden_layers=1,
        n_routed_experts=a.experts, num_experts_per_tok=a.top_k, n_shared_experts=1, num_nextn_predict_layers=0,
        mlp_layer_types=["moe"], layer_types=["sliding_attention"], num_attention_heads=4, head_dim=64,
        q_lora_rank=128, o_groups=2, o_lora_rank=64, index_n_heads=4, index_head_dim=32, index_topk=16,
        sliding_window=32, hc_mult=2, hc_sinkhorn_iters=2)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    # Built in its dtype: no float32 copy of the 12 GiB of experts on the way.
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = DeepseekV4ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    block = model.model.layers[0].mlp
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():  # in place: no second copy of the experts
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
        # float32, as from_pretrained keeps it (_keep_in_fp32_modules_strict), so hf_ep routes alike.
        block.gate.e_score_correction_bias = torch.empty(a.experts, device=device).normal_(0.0, 0.1, generator=g)
    return model


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of storage behind a module's parameters and buffers (of a DTensor: its local shard)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def ep_implementation(experts: torch.nn.Module) -> str:
    """The transformers EPImplementation behind the experts' installed forward (read from its closure)."""
    for cell in getattr(experts.forward, "__closure__", None) or ():
        obj = cell.cell_contents
        if type(obj).__name__ == "AutoEP":  # at inference: AllReduceEP where the group shares the batch
            return "AutoEP -> " + ("AllReduceEP" if obj.all_reduce is not None else "AllToAllEP")
        if type(obj).__name__.endswith("EP"):
            return type(obj).__name__
    return "unknown"


# -- one rank ---------------------------------------------------------------------------------

class Rank:
    """This process's place, its results (saved after every step, so a run cut short keeps them)
    and the measuring."""

    def __init__(self, a, world: int, rank: int, workdir: str):
        self.a, self.world, self.rank, self.workdir = a, world, rank, workdir
        self.cuda = a.device == "cuda"
        self.device = torch.device("cuda", rank) if self.cuda else torch.device("cpu")
        self.dynamic = None if a.dynamic else False  # default: static shapes, one compile per T
        self.rec = {"world": world, "rank": rank, "variants": {}, "errors": []}

    def save(self) -> None:
        with open(os.path.join(self.workdir, f"w{self.world}_r{self.rank}.json"), "w") as f:
            json.dump(self.rec, f, indent=1)

    def log(self, msg: str, every_rank: bool = False) -> None:
        if every_rank or self.rank == 0:
            print(f"[world {self.world} rank {self.rank}] {msg}", flush=True)

    def memory(self, reset: bool = False) -> dict:
        if not self.cuda:
            return {}
        free, total = torch.cuda.mem_get_info(self.device)
        out = {"allocated_gib": torch.cuda.memory_allocated(self.device) / GIB,
               "peak_gib": torch.cuda.max_memory_allocated(self.device) / GIB, "device_used_gib": (total - free) / GIB}
        if reset:
            torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def time_calls(self, fn) -> float:
        """Mean ms per call on this rank. Every rank makes the same calls: the EP kernels pair them up."""
        for _ in range(self.a.warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        dist.barrier()
        ms = []
        for _ in range(self.a.iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                ms.append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t0) * 1e3)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            ms = [start.elapsed_time(end) for start, end in ms]
        return sum(ms) / len(ms)

    def measure(self, name: str, fn, inputs: dict, refs: dict) -> dict:
        """Per T: a first call (it compiles), its error against the unfused block, then the timing."""
        v = self.rec["variants"].setdefault(name, {"ms": {}, "diff": {}, "first_call_s": {}, "errors": {}})
        self.memory(reset=True)
        for t in self.a.tokens:
            key = str(t)
            try:
                t0 = time.perf_counter()
                v["diff"][key] = cos_diff(fn(inputs[t]), refs[t])
                v["first_call_s"][key] = round(time.perf_counter() - t0, 2)
                v["ms"][key] = self.time_calls(lambda: fn(inputs[t]))
                self.log(f"{name} T={t}: {v['ms'][key]:.3f} ms, diff {v['diff'][key]:.1e}, "
                         f"first call {v['first_call_s'][key]} s")
            except Exception as e:  # keep the other token counts and variants
                v["errors"][key] = f"{type(e).__name__}: {e}"[:3000]
                self.log(f"{name} T={t} FAILED: {v['errors'][key][:400]}", every_rank=True)
            v["memory"] = self.memory()  # its peak: while this variant ran
            self.save()
        return v


def worker(rank: int, world: int, a, workdir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # transformers' mesh reads them
    r = Rank(a, world, rank, workdir)
    if r.cuda:
        torch.cuda.set_device(r.device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # With a timeout, a rank that failed does not leave the others waiting in a collective for ever.
    dist.init_process_group("nccl" if r.cuda else "gloo", init_method=f"file://{workdir}/store_w{world}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=a.pg_timeout),
                            **({"device_id": r.device} if r.cuda else {}))
    try:
        with torch.no_grad():  # the fused op is for inference
            run_rank(r)
    except Exception:
        r.rec["errors"].append(traceback.format_exc())
        r.log(f"FAILED:\n{r.rec['errors'][-1]}", every_rank=True)
    r.save()
    dist.destroy_process_group()


def run_rank(r: Rank) -> None:
    a = r.a
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    if r.cuda:
        r.rec["device"] = torch.cuda.get_device_name(r.device)
    t0 = time.perf_counter()
    model = build_model(a, r.device)
    block = model.model.layers[0].mlp
    r.rec["hf_block"] = {"expert_bytes": held_bytes(block.experts), **r.memory()}
    r.log(f"built the block in {time.perf_counter() - t0:.1f} s, experts {held_bytes(block.experts) / GIB:.2f} GiB")
    if r.world > 1 and a.hf_load == "from_pretrained" and HF_EP & set(a.variants):
        # The checkpoint hf_ep loads: written once, by the first world that needs it; all ranks wait.
        if r.rank == 0 and not os.path.exists(os.path.join(r.workdir, "ckpt.done")):
            t0 = time.perf_counter()
            model.save_pretrained(os.path.join(r.workdir, "ckpt"))
            open(os.path.join(r.workdir, "ckpt.done"), "w").close()
            r.log(f"saved the 1-layer checkpoint in {time.perf_counter() - t0:.1f} s")
        dist.barrier()

    def inputs(seed: int, dtype: torch.dtype) -> dict:
        gens = {t: torch.Generator(device=r.device).manual_seed(1000 * seed + t) for t in a.tokens}
        return {t: torch.randn(1, t, a.hidden, generator=g, device=r.device).to(dtype) for t, g in gens.items()}

    # megamoe_ep: each rank its own tokens (local_batch); hf_ep: one batch shared by all ranks (rank 0's).
    own, shared = inputs(r.rank, model.dtype), inputs(0, model.dtype)
    # References from the unfused block, before prepare releases its bf16 experts.
    ref_own = {t: block(x).float() for t, x in own.items()}
    ref_shared = {t: block(x).float() for t, x in shared.items()}
    if r.world == 1 and "hf_grouped_mm" in a.variants:
        r.measure("hf_grouped_mm", block, own, ref_own)
    if {"megamoe_ep", "megamoe_ep_graphs"} & set(a.variants):
        try:
            bench_megamoe(r, block, own, ref_own)
        except Exception:
            r.rec["errors"].append(traceback.format_exc())
            r.log(f"megamoe FAILED:\n{r.rec['errors'][-1]}", every_rank=True)
    del model, block  # before hf_ep, so its memory is its own
    torch._dynamo.reset()
    gc.collect()
    if r.cuda:
        torch.cuda.empty_cache()
    if r.world > 1 and HF_EP & set(a.variants):
        bench_hf_ep(r, shared, ref_shared)


def bench_megamoe(r: Rank, block, inputs: dict, refs: dict) -> None:
    import megamoe_compile as mc
    from megamoe_compile.ops import deepgemm

    a = r.a
    config = mc.MegaMoEConfig(kernel="auto" if r.cuda else "reference",
                              ep_mode="none" if r.world == 1 else "local_batch", release_original_weights=True,
                              max_tokens_per_rank=max(a.tokens), inner_backend=a.inner_backend)
    r.memory(reset=True)
    t0 = time.perf_counter()
    mc.prepare(block, config)
    (plan,) = mc.layer_plans(block)
    expected = "reference"
    if r.cuda:
        expected = "deepgemm_sm90" if torch.cuda.get_device_capability(r.device)[0] == 9 else "deepgemm_sm100"
    buffers = sum(deepgemm._buffer_bytes(b) for b in deepgemm.buffers().values())  # symmetric memory
    r.rec["megamoe"] = {
        "fused": plan.fuse, "kernel": plan.kernel, "expected_kernel": expected, "recipe": plan.recipe,
        "reason": plan.reason, "local_experts": plan.local_experts, "released": plan.released, "notes": plan.notes,
        "prepare_s": round(time.perf_counter() - t0, 1), "expert_bytes": held_bytes(block.experts),
        "buffer_bytes": buffers, **r.memory()}
    r.log(f"megamoe: fused={plan.fuse} {plan.kernel}/{plan.recipe} (expected {expected}), experts "
          f"{plan.local_experts}, {r.rec['megamoe']['expert_bytes'] / GIB:.2f} GiB {plan.reason}")
    r.save()
    counters = torch._dynamo.utils.counters
    for name, mode in (("megamoe_ep", None), ("megamoe_ep_graphs", "reduce-overhead")):
        if name not in a.variants:
            continue
        if mode and not r.cuda:
            r.rec["variants"][name] = {"skipped": "CUDA graphs need a GPU"}
            continue
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(block, backend="megamoe", mode=mode, dynamic=r.dynamic)
        v = r.measure(name, compiled, inputs, refs)
        v["fused_moe_count"] = int(counters["megamoe"]["fused_moe"])  # graphs in which the pass fused the block
        r.save()
        del compiled
    torch._dynamo.reset()  # drops the CUDA graphs over the symmetric buffer before it goes
    dist.barrier()
    deepgemm.release_buffers()


def bench_hf_ep(r: Rank, inputs: dict, refs: dict) -> None:
    from transformers import DeepseekV4ForCausalLM
    from transformers.distributed import DistributedConfig

    a, w = r.a, r.world
    # ep_size == tp_size: the EP group shares one batch (the tp plan's rules are all on the experts, which
    # the EP plan takes over). tp_plan={}, what the deprecated enable_expert_parallel=True sets, fails in
    # 5.23 with "tp_size=N was requested, but DeepseekV4ForCausalLM has no tp_plan".
    dc = DistributedConfig(tp_size=w, ep_size=w)
    info = r.rec["hf_ep"] = {"hf_load": a.hf_load, "note": a.hf_load_note}
    r.memory(reset=True)
    t0 = time.perf_counter()
    try:
        if a.hf_load == "from_pretrained":
            info["api"] = (f"DeepseekV4ForCausalLM.from_pretrained(ckpt, dtype, experts_implementation='grouped_mm', "
                           f"distributed_config=DistributedConfig(tp_size={w}, ep_size={w}))")
            model = DeepseekV4ForCausalLM.from_pretrained(
                os.path.join(r.workdir, "ckpt"), dtype=torch.bfloat16 if r.cuda else torch.float32,
                distributed_config=dc, experts_implementation="grouped_mm")
        else:
            info["api"] = (f"DeepseekV4ForCausalLM.prepare_distribute_model(DistributedConfig(tp_size={w}, "
                           f"ep_size={w})) + maybe_distribute_model(model built in place, ...)")
            dc, _, mesh = DeepseekV4ForCausalLM.prepare_distribute_model(dc)
            model = DeepseekV4ForCausalLM.maybe_distribute_model(build_model(a, r.device), dc, mesh)
        block = model.eval().model.layers[0].mlp
        info.update({"load_s": round(time.perf_counter() - t0, 1), "ep_plan": dict(model.ep_plan),
                     "implementation": ep_implementation(block.experts), "local_experts": block.experts.num_experts,
                     "expert_bytes": held_bytes(block.experts), **r.memory()})
        r.log(f"hf_ep: {info['implementation']}, {block.experts.num_experts} experts per rank, "
              f"{info['expert_bytes'] / GIB:.2f} GiB, set up in {info['load_s']} s")
    except Exception as e:
        info["error"] = f"{type(e).__name__}: {e}"[:3000]
        r.log(f"hf_ep could not be set up: {info['error'][:400]}", every_rank=True)
        r.save()
        return
    if "hf_ep" in a.variants:
        r.measure("hf_ep", block, inputs, refs)
    if "hf_ep_compile" in a.variants:
        torch._dynamo.reset()
        r.measure("hf_ep_compile", torch.compile(block, backend=a.inner_backend, dynamic=r.dynamic), inputs, refs)


# -- the launcher -----------------------------------------------------------------------------

def run_world(a, world: int, workdir: str, deadline: float) -> dict:
    t0 = time.monotonic()
    ctx = mp.spawn(worker, args=(world, a, workdir), nprocs=world, join=False)
    status = "ok"
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:  # e.g. a rank stuck in a kernel, waiting for a failed peer
                status = f"stopped at --time-limit {a.time_limit:.0f} s"
                for p in ctx.processes:  # the processes this launcher started
                    if p.is_alive():
                        p.kill()
                        p.join(10)
                break
    except Exception as e:  # a rank died; spawn stopped the others
        status = f"failed: {type(e).__name__}: {e}"[:2000]
    ranks = []
    for rank in range(world):
        path = os.path.join(workdir, f"w{world}_r{rank}.json")
        ranks.append(json.load(open(path)) if os.path.exists(path) else {"rank": rank, "missing": "no results"})
    print(f"== world {world}: {status} ({time.monotonic() - t0:.0f} s)", flush=True)
    return {"status": status, "wall_s": round(time.monotonic() - t0, 1), "ranks": ranks}


def ratio(x, y):
    return None if x is None or y is None or y == 0 else x / y


def summarize(a, worlds: dict) -> dict:
    """Per T: every variant's slowest rank (and all ranks), the ratios, and the targets."""
    rows, targets = [], []
    for t in a.tokens:
        row = {"tokens": t}
        for w, res in worlds.items():
            for v in VARIANTS:
                each = [rk.get("variants", {}).get(v, {}).get("ms", {}).get(str(t)) for rk in res["ranks"]]
                if each and None not in each:
                    row[f"{v}@{w}"], row[f"{v}@{w}_per_rank"] = max(each), each
            for mm in ("megamoe_ep", "megamoe_ep_graphs") if w > 1 else ():
                row[f"hf_ep/{mm}@{w}"] = ratio(row.get(f"hf_ep@{w}"), row.get(f"{mm}@{w}"))
                row[f"{mm}@{w}/{mm}@1"] = ratio(row.get(f"{mm}@{w}"), row.get(f"{mm}@1"))
                if mm == "megamoe_ep_graphs" and row.get(f"{mm}@{w}") is None:
                    continue  # CUDA graphs not run (CPU, or not asked for)
                tag = " (CUDA graphs)" if mm == "megamoe_ep_graphs" else ""
                if t <= 32:
                    targets.append((f"T={t} world {w}: hf_ep / {mm} >= 2{tag}", row[f"hf_ep/{mm}@{w}"], ">=", 2.0))
                targets.append((f"T={t} world {w}: {mm}@{w} / {mm}@1 <= 1.15{tag}", row[f"{mm}@{w}/{mm}@1"],
                                "<=", 1.15))
        rows.append(row)
    met = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b}
    return {"rows": rows, "targets": [{"target": n, "value": v, "met": None if v is None else met[op](v, b)}
                                      for n, v, op, b in targets]}


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def report(a, worlds: dict, summary: dict) -> None:
    unit = "CUDA events" if a.device == "cuda" else "perf_counter; a CPU smoke run, not a performance result"
    print(f"\nMoE block {a.experts} experts, H {a.hidden}, I {a.intermediate}, top-{a.top_k}: ms per forward ({unit}), "
          f"mean of {a.iters}, slowest rank.\nmm = megamoe_ep, mm+cg = megamoe_ep_graphs, hf@1 = hf_grouped_mm, "
          f"hf_ep+c = hf_ep_compile\n")
    cols = []
    for w in worlds:
        hf = [("hf_grouped_mm", "hf")] if w == 1 else [("hf_ep", "hf_ep"), ("hf_ep_compile", "hf_ep+c")]
        ours = [("megamoe_ep", "mm"), ("megamoe_ep_graphs", "mm+cg")]
        cols += [(f"{v}@{w}", f"{name}@{w}", ".3f") for v, name in ours + hf]
    for w in (w for w in worlds if w > 1):
        cols += [(f"hf_ep/megamoe_ep@{w}", f"hf_ep/mm@{w}", ".2f"),
                 (f"megamoe_ep@{w}/megamoe_ep@1", f"mm@{w}/mm@1", ".2f")]
    print("| T | " + " | ".join(name for _, name, _ in cols) + " |\n" + "|---:" * (len(cols) + 1) + "|")
    for row in summary["rows"]:
        print(f"| {row['tokens']} | " + " | ".join(fmt(row.get(key), spec) for key, _, spec in cols) + " |")

    print("\nper rank, max over ranks: expert weights GiB | allocated GiB | peak GiB (setup) | device used GiB | "
          "peak GiB (timed) | error vs the unfused block")
    for w, res in worlds.items():
        for setup, variant in (("hf_block", "hf_grouped_mm"), ("megamoe", "megamoe_ep"), ("hf_ep", "hf_ep")):
            recs = [rk[setup] for rk in res["ranks"] if setup in rk]
            if not recs or (setup == "hf_block" and w > 1):
                continue
            top = {k: max((x[k] for x in recs if x.get(k) is not None), default=None)
                   for k in ("expert_bytes", "allocated_gib", "peak_gib", "device_used_gib")}
            timed = [rk.get("variants", {}).get(variant, {}) for rk in res["ranks"]]
            peak = max((v["memory"]["peak_gib"] for v in timed if v.get("memory")), default=None)
            diff = max((d for v in timed for d in v.get("diff", {}).values()), default=None)
            gib = (top["allocated_gib"], top["peak_gib"], top["device_used_gib"], peak)
            print(f"  world {w} {setup:8s} | {fmt(ratio(top['expert_bytes'], GIB))} | "
                  + " | ".join(fmt(x, ".2f") for x in gib) + f" | {fmt(diff, '.1e')}")
    print("\ntargets:")
    for tr in summary["targets"]:
        state = "n/a" if tr["met"] is None else "MET" if tr["met"] else "MISSED"
        print(f"  {state:6s} {tr['target']}: {fmt(tr['value'], '.2f')}")
    print("\nnotes:")
    for w, res in worlds.items():
        print(f"  world {w}: {res['status']}")
        for rk in res["ranks"]:
            tag = f"    rank {rk.get('rank')}:"
            if mm := rk.get("megamoe"):
                counts = {n: v["fused_moe_count"] for n, v in rk["variants"].items() if "fused_moe_count" in v}
                print(tag, f"megamoe fused={mm['fused']} kernel={mm['kernel']} (expected {mm['expected_kernel']}) "
                           f"recipe={mm['recipe']} experts={mm['local_experts']} released={mm['released']}, symmetric "
                           f"buffer {mm['buffer_bytes'] / 2**20:.0f} MiB, fused_moe counter {counts} {mm['reason']}")
            if hf := rk.get("hf_ep"):
                print(tag, f"hf_ep via {hf.get('api')}: {hf.get('implementation', hf.get('error', ''))[:600]}")
            problems = [f"{n} T={t}: {e}" for n, v in rk.get("variants", {}).items()
                        for t, e in v.get("errors", {}).items()]
            problems += [e.strip().splitlines()[-1] for e in rk.get("errors", [])]
            for problem in problems + ([rk["missing"]] if "missing" in rk else []):
                print(tag, problem[:600])


def main() -> None:
    a = parse_args()
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    start, deadline = time.time(), time.monotonic() + a.time_limit
    workdir = tempfile.mkdtemp(prefix="bench_ep_")
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    print(f"bench_expert_parallel: worlds {a.worlds}, tokens per rank {a.tokens}, {a.device} ({gpus} GPUs), "
          f"hf_ep via {a.hf_load}", flush=True)
    worlds = {}
    try:
        for w in a.worlds:
            if a.device == "cuda" and w > gpus:
                worlds[w] = {"status": f"skipped: needs {w} GPUs, {gpus} visible", "ranks": []}
            elif deadline - time.monotonic() < 30:
                worlds[w] = {"status": "skipped: --time-limit reached", "ranks": []}
            else:
                worlds[w] = run_world(a, w, workdir, deadline)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # it holds the checkpoint: ~13 GB at V4-Flash sizes
    summary = summarize(a, worlds)
    import transformers

    from megamoe_compile.ops import deepgemm

    meta = {"args": vars(a), "torch": torch.__version__, "transformers": transformers.__version__,
            "deep_gemm": deepgemm._installed_version() if a.device == "cuda" else None,
            "env": {k: os.environ.get(k) for k in MULTICAST_OFF}, "wall_s": round(time.time() - start, 1),
            "batches": "megamoe_ep: each rank its own T tokens (N*T in all); hf_ep: every rank the same T tokens "
                       "(transformers' inference EP shares one batch over the group)"}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, **summary, "worlds": {str(w): res for w, res in worlds.items()}}, f, indent=1)
    report(a, worlds, summary)
    print(f"json: {a.out}")


if __name__ == "__main__":
    main()
