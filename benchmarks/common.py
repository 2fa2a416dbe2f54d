"""Timing and CUDA-graph helpers shared by the benchmark scripts (not a benchmark itself).

The scripts run as `python benchmarks/<script>.py`, which puts benchmarks/ on sys.path, so they
import these with `from common import ...`; megamoe_compile comes from the installed package
(`pip install -e .`).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def time_ms_cpu(fn, warmup: int, reps: int) -> float:
    """Wall-clock median milliseconds per call (CPU dry runs: the code path, not a measurement)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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
    """1 - 2 sum(a b) / sum(a^2 + b^2), in float64 (0 = identical; DeepGEMM's calc_diff)."""
    a, b = a.double(), b.double()
    return float(1 - 2 * (a * b).sum() / (a * a + b * b).sum())


def free_memory() -> None:
    """Drop dynamo's compiled code and Python garbage, and return cached CUDA memory."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
