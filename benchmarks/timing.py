"""Shared by the benchmark scripts: median wall time of a call, synchronising the GPU around it."""

import statistics
import time

import torch


def timed(fn, repeats: int, device: str = "cpu", warmup: int = 1) -> float:
    """Median seconds of `repeats` calls of `fn` after `warmup` unmeasured calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
